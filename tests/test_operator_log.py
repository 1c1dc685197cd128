"""What a CPU run prints: the missing GPU kernels said once at info level, and no library warning
a user cannot act on (transformers' per-op fallback warnings, deprecation notices)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # builds and trains models in a subprocess

ROOT = Path(__file__).parents[1]

SCRIPT = textwrap.dedent(
    """
    import torch
    torch.set_num_threads(1)
    from fedem_flwr.logs import use_flower_logging
    from fedem_flwr.quiet import quiet_library_progress
    use_flower_logging()
    quiet_library_progress()
    from fedem_flwr.config.loader import load_config
    from fedem_flwr.model.factory import build_model
    from fedem_flwr.model.lora import attach_lora
    from fedem_flwr.model.tokenizer import load_tokenizer
    cfg = load_config()
    tokenizer = load_tokenizer(cfg.tokenizer)
    for _ in range(2):  # a second model in the same process says nothing new
        model = attach_lora(build_model(cfg.model, tokenizer), cfg.lora, seed=0)
        ids = torch.randint(0, 200, (2, 32))
        model(input_ids=ids, labels=ids).loss.backward()
    print("done")
    """
)


def test_a_cpu_run_says_the_missing_kernels_once_and_shows_no_library_warnings():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", "FLWR_TELEMETRY_ENABLED": "0"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)

    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    assert log.count("runs its PyTorch path here") == 1, log
    assert "pip install 'fedem-flwr[gpu]'" in log
    assert "INFO" in next(line for line in log.splitlines() if "runs its PyTorch path here" in line)
    assert "falling back" not in log, log
    assert "Warning" not in log, log  # FutureWarning / DeprecationWarning from the libraries
