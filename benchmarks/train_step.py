"""Tokens per second of a LoRA training step and of a full forward+backward, Mamba-2 vs Mamba-1.

Each case runs in its own Python process, so its peak memory is its own: on CUDA the peak
allocated by torch, on the CPU the growth of the process's peak resident set (VmHWM) over the
imported runtime. Defaults stay small for a CPU (batch 2, 64 tokens, 3 timed steps after 1 warm-up);
a case that runs past ``--case-timeout`` is reported as a timeout (Mamba-1's PyTorch path on a GPU).

    python benchmarks/train_step.py                          # CPU, all four shipped models
    python benchmarks/train_step.py --device cuda --seq-len 1024 --batch-size 8 --save gpu.json
    python benchmarks/train_step.py --models seshu-tiny --baseline gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from baseline import print_aligned  # this folder is on the path when run as a script

MODELS = ("seshu-tiny", "seshu-tiny-mamba1", "seshu-130m", "seshu-130m-mamba1")
MODES = ("lora", "full")


def _peak_rss_mb() -> float:
    """The process's peak resident set so far (Linux ``VmHWM``), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """Build the model, time ``steps`` training steps after ``warmup``; runs inside the child process."""
    import torch

    from fedem_flwr.config.loader import load_config
    from fedem_flwr.config.schema import LoraConfig
    from fedem_flwr.model.factory import build_model, count_parameters, kernel_path
    from fedem_flwr.model.lora import attach_lora
    from fedem_flwr.model.tokenizer import build_byte_tokenizer

    torch.set_num_threads(case["threads"])
    device = torch.device(case["device"])
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[case["dtype"]]
    cfg = load_config([f"model={case['model']}"]).model
    tokenizer = build_byte_tokenizer()
    import peft  # noqa: F401  (imported before the memory baseline: the runtime is not the case's cost)
    import transformers.models.mamba.modeling_mamba  # noqa: F401
    import transformers.models.mamba2.modeling_mamba2  # noqa: F401

    rss_before = _peak_rss_mb()
    model = build_model(cfg, tokenizer, seed=0).to(device=device, dtype=dtype)
    params = count_parameters(model)
    if case["mode"] == "lora":
        model = attach_lora(model, LoraConfig())
        optimizer: Optional[torch.optim.Optimizer] = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=1e-3)
    else:
        optimizer = None  # a full forward+backward: every weight gets a gradient, no update
    model.train()
    trainable = count_parameters(model, trainable_only=True)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, len(tokenizer), (case["batch_size"], case["seq_len"]), generator=generator).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> float:
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # a CPU-GPU sync point: the timing must include the kernels
        return time.perf_counter() - start

    for _ in range(case["warmup"]):
        step()
    times = [step() for _ in range(case["steps"])]
    mean = statistics.mean(times)
    peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
            else _peak_rss_mb() - rss_before)
    return {
        **case,
        "arch": cfg.arch,
        "params": params,
        "trainable": trainable,
        "path": kernel_path(model),
        "step_s": mean,
        "step_s_min": min(times),
        "tokens_per_s": case["batch_size"] * case["seq_len"] / mean,
        "peak_mb": peak,
        "status": "ok",
    }


def _child(case: dict[str, Any], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--case", json.dumps(case)]
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**case, "status": f"timeout>{timeout:.0f}s"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {**case, "status": f"error: {last[:120]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _key(row: dict[str, Any]) -> tuple:
    return (row["model"], row["mode"], row["device"], row["dtype"], row["batch_size"], row["seq_len"])


def print_table(rows: list[dict[str, Any]], baseline: Optional[list[dict[str, Any]]] = None) -> None:
    base = {_key(r): r for r in baseline or [] if r.get("status") == "ok"}
    header = ["model", "arch", "params", "mode", "device", "path", "batch x seq", "step s", "tokens/s", "peak MiB"]
    if baseline is not None:
        header.append("vs baseline")
    lines = [header]
    for r in rows:
        ok = r.get("status") == "ok"
        line = [r["model"], r.get("arch", "?"), f"{r['params']:,}" if ok else "-", r["mode"], r["device"],
                r.get("path", "-"), f"{r['batch_size']} x {r['seq_len']}",
                f"{r['step_s']:.3f}" if ok else r["status"], f"{r['tokens_per_s']:,.0f}" if ok else "-",
                f"{r['peak_mb']:,.0f}" if ok else "-"]
        if baseline is not None:
            old = base.get(_key(r))
            line.append(f"x{r['tokens_per_s'] / old['tokens_per_s']:.2f}" if ok and old else "n/a")
        lines.append(line)
    print_aligned(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="config names under conf/model")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--case-timeout", type=float, default=300.0, help="seconds per case, then 'timeout'")
    parser.add_argument("--save", type=Path, help="write the results as JSON")
    parser.add_argument("--baseline", type=Path, help="compare tokens/s with a JSON file written by --save")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.case:  # child process: one case, one JSON line on stdout
        print(json.dumps(run_case(json.loads(args.case))))
        return 0
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    baseline = json.loads(args.baseline.read_text())["results"] if args.baseline else None
    rows = []
    for model in args.models:
        for mode in args.modes:
            case = {"model": model, "mode": mode, "device": device, "dtype": args.dtype,
                    "batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps,
                    "warmup": args.warmup, "threads": args.threads}
            rows.append(_child(case, args.case_timeout))
            print(f"done {model} {mode}: {rows[-1]['status']}", file=sys.stderr, flush=True)
    print_table(rows, baseline)
    if args.save:
        meta = {"python": platform.python_version(), "machine": platform.machine(), "when": time.time()}
        args.save.write_text(json.dumps({"meta": meta, "results": rows}, indent=2, sort_keys=True) + "\n")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
