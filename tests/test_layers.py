"""The package's layering holds: import-linter's contracts (pyproject) are kept, and the hub's
readers (``fedem status``, ``fedem verify``) and the relay's coordinator load neither Flower nor Hydra."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from importlinter import configuration
from importlinter.application.use_cases import lint_imports

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, sys
import fedem_flwr.hub.registry, fedem_flwr.hub.stores, fedem_flwr.hub.views, fedem_flwr.relay.coordinator
print(json.dumps(sorted(name for name in ("flwr", "hydra", "omegaconf", "ray") if name in sys.modules)))
"""


def test_import_contracts_are_kept(capsys):
    # The use case, not `importlinter.cli`: the command line reconfigures logging for the whole process.
    configuration.configure()
    kept = lint_imports(config_filename=str(ROOT / "pyproject.toml"), cache_dir=None, no_logo=True)

    assert kept, capsys.readouterr().out[-4000:]


@pytest.mark.slow  # starts a process: only a fresh interpreter shows what an import loads
def test_hub_and_coordinator_load_no_flower_and_no_hydra():
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120)

    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout) == []
