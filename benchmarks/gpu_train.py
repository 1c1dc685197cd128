"""Training throughput on a GPU: seshu-130m Mamba-2 and Mamba-1, fused kernels vs PyTorch, vs a Llama.

Every cell is one (model, execution path, LoRA or full-parameter step, sequence length): tokens per
second and peak GPU memory of a training step (bf16 autocast, fp32 weights, AdamW, as the client
trains). Each step holds the same number of tokens (``--tokens-per-step``: the batch shrinks as the
sequence grows), so cells compare cost per token. The Llama has the same width (768), depth (24) and
byte vocabulary, SDPA attention, and an MLP sized so its parameter count is within 5% of seshu-130m.

Each (model, path) runs in its own process, so the PyTorch path can be forced by keeping the kernel
packages from importing, and a cell that runs past ``--cell-timeout`` (a warm-up step plus at least
one timed step) is killed and reported as ``timeout``; the longer sequences of that row are then not
run (``timeout*``). A CUDA out-of-memory is reported as ``oom``. Triton compiles its kernels in a
priming step before the first cell, outside the cells' timers.

    python benchmarks/gpu_train.py --save gpu.json                    # the full grid on a GPU
    python benchmarks/gpu_train.py --seq-lens 1024 4096 --baseline gpu.json
    python benchmarks/gpu_train.py --device cpu --seq-lens 64 --quick  # smoke check on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"mamba2": "seshu-130m", "mamba1": "seshu-130m-mamba1", "llama": "llama-sdpa"}
PATHS = ("kernels", "pytorch")
MODES = ("lora", "full")
KERNEL_PACKAGES = ("mamba_ssm", "causal_conv1d")
LLAMA_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


# ----------------------------------------------------------------------------- the child process
class _BlockKernels:
    """A meta-path finder that makes the kernel packages fail to import: transformers then binds its
    PyTorch references. Installed before transformers' Mamba modules load, so no kernel is ever bound."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in KERNEL_PACKAGES:
            raise ModuleNotFoundError(f"{name} is blocked: benchmarking the PyTorch path")
        return None


def _emit(**record: Any) -> None:
    print(json.dumps(record), flush=True)


def _llama_config(tokenizer, intermediate_size: int, max_len: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=768, num_hidden_layers=24, num_attention_heads=12,
        num_key_value_heads=12, intermediate_size=intermediate_size, max_position_embeddings=max_len,
        tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def _build(model_key: str, path: str, mode: str, args, tokenizer):
    """(model on the device, trainable parameters, parameter count, path the model reports)."""
    import dataclasses

    import peft
    import torch

    from fedem_flwr.config.loader import load_config
    from fedem_flwr.config.schema import LoraConfig
    from fedem_flwr.model.factory import build_model, count_parameters, kernel_path
    from fedem_flwr.model.lora import attach_lora

    if model_key == "llama":
        from transformers import LlamaForCausalLM

        config = _llama_config(tokenizer, args.llama_intermediate, max(args.seq_lens))
        config._attn_implementation = "sdpa"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = LlamaForCausalLM(config)
        reported = "sdpa"
    else:
        cfg = load_config([f"model={MODELS[model_key]}"]).model
        cfg = dataclasses.replace(cfg, kernels="require" if path == "kernels" else "never")
        model = build_model(cfg, tokenizer)
    total = count_parameters(model)
    if mode == "lora":
        if model_key == "llama":
            model = peft.get_peft_model(model, peft.LoraConfig(
                r=8, lora_alpha=16, target_modules=LLAMA_LORA_TARGETS, bias="none", task_type="CAUSAL_LM"))
        else:
            model = attach_lora(model, LoraConfig(r=8, alpha=16, target_modules=["in_proj"]))
    model.to(args.device)
    if model_key != "llama":
        reported = kernel_path(model)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, total, reported


def _step(model, params, optimizer, x, amp_dtype) -> None:
    import torch
    import torch.nn.functional as F

    with torch.autocast(device_type=x.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        logits = model(input_ids=x, use_cache=False).logits
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prime(model, params, device, amp_dtype, seq_len: int) -> None:
    """One small step: Triton compiles and autotunes its kernels here, outside the cells' timers."""
    import torch

    optimizer = torch.optim.AdamW(params, lr=0.0, fused=device.type == "cuda")
    x = torch.randint(4, 260, (1, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    _step(model, params, optimizer, x, amp_dtype)
    _sync(device)
    optimizer.zero_grad(set_to_none=True)


def _run_cell(model, params, device, amp_dtype, seq_len: int, args) -> dict[str, Any]:
    import torch

    batch = max(1, args.tokens_per_step // seq_len)
    generator = torch.Generator().manual_seed(seq_len)
    x = torch.randint(4, 260, (batch, seq_len), generator=generator).to(device)
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        _step(model, params, optimizer, x, amp_dtype)
    _sync(device)
    steps, start = 0, time.perf_counter()
    while steps < args.steps:
        _step(model, params, optimizer, x, amp_dtype)
        steps += 1
        _sync(device)
        if time.perf_counter() - start > args.measure_seconds:
            break
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del optimizer
    return {"status": "ok", "tokens_per_s": batch * seq_len * steps / seconds, "peak_gib": peak,
            "step_s": seconds / steps, "batch": batch, "steps": steps}


def child(args) -> int:
    """Run the cells of one (model, path) and print one JSON line per event."""
    if args.path == "pytorch" and args.model != "llama":
        sys.meta_path.insert(0, _BlockKernels())
    import torch

    from fedem_flwr.model.tokenizer import build_byte_tokenizer

    torch.backends.cuda.matmul.allow_tf32 = True  # as a trainer would: tf32 for any fp32 matmul left
    device = torch.device(args.device)
    amp_dtype = torch.bfloat16 if args.precision == "bf16" else None
    tokenizer = build_byte_tokenizer()
    cells = [(mode, int(seq)) for mode, seq in (c.split(":") for c in args.cells.split(","))]
    for mode in dict.fromkeys(mode for mode, _ in cells):
        try:
            model, params, total, reported = _build(args.model, args.path, mode, args, tokenizer)
        except Exception as err:  # noqa: BLE001 -- reported per cell, e.g. KernelsUnavailable
            for m, seq in cells:
                if m == mode:
                    _emit(event="result", mode=m, seq_len=seq, status="unavailable", error=f"{type(err).__name__}: {err}")
            continue
        _emit(event="model", mode=mode, params=total, trainable=sum(p.numel() for p in params), ran=reported)
        _prime(model, params, device, amp_dtype, min(256, min(seq for _, seq in cells)))
        for m, seq in cells:
            if m != mode:
                continue
            _emit(event="start", mode=mode, seq_len=seq)
            try:
                result = _run_cell(model, params, device, amp_dtype, seq, args)
            except torch.OutOfMemoryError:
                result = {"status": "oom"}
            if result["status"] == "oom" and device.type == "cuda":
                torch.cuda.empty_cache()
            _emit(event="result", mode=mode, seq_len=seq, ran=reported, **result)
        del model, params
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


# ----------------------------------------------------------------------------- the parent process
def llama_intermediate_size(target: int, vocab: int, width: int = 768, layers: int = 24) -> int:
    """The Llama MLP width (a multiple of 32) whose total parameters come closest to ``target``.

    Per layer: attention 4 w^2, MLP 3 w m, two RMSNorms 2 w; plus untied embeddings and head 2 v w,
    and the final norm w.
    """
    fixed = 2 * vocab * width + width + layers * (4 * width * width + 2 * width)
    per_unit = 3 * width * layers
    return max(32, round((target - fixed) / per_unit / 32) * 32)


def parameter_counts() -> dict[str, Any]:
    """Parameter counts of the two Mamba shapes (built on the meta device: no memory, no time)."""
    import torch
    from transformers import LlamaForCausalLM, Mamba2ForCausalLM, MambaForCausalLM

    from fedem_flwr.config.loader import load_config
    from fedem_flwr.model.factory import count_parameters, model_config
    from fedem_flwr.model.tokenizer import build_byte_tokenizer

    tokenizer = build_byte_tokenizer()
    counts = {}
    with torch.device("meta"):
        for key, cls in (("mamba2", Mamba2ForCausalLM), ("mamba1", MambaForCausalLM)):
            counts[key] = count_parameters(cls(model_config(load_config([f"model={MODELS[key]}"]).model, tokenizer)))
        intermediate = llama_intermediate_size(counts["mamba2"], len(tokenizer))
        counts["llama"] = count_parameters(LlamaForCausalLM(_llama_config(tokenizer, intermediate, 1024)))
    counts["llama_intermediate"] = intermediate
    return counts


def environment(device: str) -> dict[str, Any]:
    from importlib import metadata

    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for dist in ("transformers", "peft", "triton", "mamba-ssm", "causal-conv1d"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") and torch.cuda.is_available() else None
    return {"device": device, "gpu": gpu, "cpu": platform.processor() or platform.machine(), "versions": versions}


def _reader(stream, sink: "queue.Queue[Optional[dict]]") -> None:
    for line in stream:
        line = line.strip()
        if line.startswith("{"):
            try:
                sink.put(json.loads(line))
            except ValueError:
                pass
    sink.put(None)  # end of output: the child exited


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_row_group(model: str, path: str, cells: list[tuple[str, int]], args, deadline: float) -> list[dict]:
    """Run ``cells`` of one (model, path) in child processes; a timed-out cell kills its child."""
    results: dict[tuple[str, int], dict] = {}
    built: dict[str, dict] = {}  # mode -> the child's "model" event (parameter counts, path it ran)
    pending = list(cells)
    while pending:
        if time.monotonic() > deadline:
            for mode, seq in pending:
                results[(mode, seq)] = {"status": "skipped", "error": "over --budget"}
            break
        command = [sys.executable, str(Path(__file__).resolve()), "--child", "--model", model, "--path", path,
                   "--device", args.device, "--precision", args.precision, "--cells",
                   ",".join(f"{m}:{s}" for m, s in pending), "--tokens-per-step", str(args.tokens_per_step),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--measure-seconds",
                   str(args.measure_seconds), "--llama-intermediate", str(args.llama_intermediate),
                   "--seq-lens", *map(str, args.seq_lens)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        stderr_path = Path(args.log_dir) / f"{model}-{path}.stderr" if args.log_dir else None
        stderr = open(stderr_path, "a") if stderr_path else subprocess.DEVNULL
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env,
                                start_new_session=True)
        events: "queue.Queue[Optional[dict]]" = queue.Queue()
        threading.Thread(target=_reader, args=(proc.stdout, events), daemon=True).start()
        current: Optional[tuple[str, int]] = None
        wait_until = min(deadline, time.monotonic() + args.startup_timeout)
        while True:
            try:
                event = events.get(timeout=max(0.1, wait_until - time.monotonic()))
            except queue.Empty:
                event = "timeout"
            if event is None or event == "timeout":
                _kill(proc)
                if current is None and event == "timeout":  # stuck building or priming
                    for cell in pending:
                        results[cell] = {"status": "timeout", "error": f"no cell started in {args.startup_timeout} s"}
                    pending = []
                elif current is not None:
                    mode, seq = current
                    why = "timeout" if event == "timeout" else "error"
                    results[current] = {"status": why, "error": None if why == "timeout" else _tail(stderr_path)}
                    for later in [c for c in pending if c[0] == mode and c[1] > seq]:
                        results[later] = {"status": "timeout*" if why == "timeout" else "skipped",
                                          "error": f"not run: {seq} timed out" if why == "timeout" else "child crashed"}
                    pending = [c for c in pending if c not in results]
                else:  # exited before starting any cell
                    for cell in pending:
                        results[cell] = {"status": "error", "error": _tail(stderr_path)}
                    pending = []
                break
            if event["event"] == "model":
                built[event["mode"]] = event
                wait_until = min(deadline, time.monotonic() + args.startup_timeout)
            elif event["event"] == "start":
                current = (event["mode"], event["seq_len"])
                wait_until = min(deadline, time.monotonic() + args.cell_timeout)
            elif event["event"] == "result":
                cell = (event["mode"], event["seq_len"])
                results[cell] = event
                pending = [c for c in pending if c != cell]
                current = None
                wait_until = min(deadline, time.monotonic() + args.startup_timeout)
        if stderr_path:
            stderr.close()
    rows = []
    for mode, seq in cells:
        info = built.get(mode, {})
        rows.append({"model": model, "path": path, "mode": mode, "seq_len": seq, "params": info.get("params"),
                     "trainable": info.get("trainable"), "ran": info.get("ran"),
                     **{k: v for k, v in results[(mode, seq)].items() if k not in ("event", "mode", "seq_len")}})
    return rows


def _tail(path: Optional[Path]) -> Optional[str]:
    if not path or not path.is_file():
        return None
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][-300:] if lines else None


def _cell_text(row: dict) -> str:
    if row["status"] != "ok":
        return row["status"]
    peak = f", {row['peak_gib']:.1f} GiB" if row.get("peak_gib") is not None else ""
    rate = row["tokens_per_s"]
    return (f"{rate / 1000:.1f}k" if rate >= 1000 else f"{rate:.1f}") + f" tok/s{peak}"


def print_table(rows: list[dict], seq_lens: list[int], baseline: Optional[dict]) -> None:
    old = {(r["model"], r["path"], r["mode"], r["seq_len"]): r for r in (baseline or {}).get("cells", [])}
    llama = {(r["mode"], r["seq_len"]): r for r in rows if r["model"] == "llama" and r["status"] == "ok"}
    header = f"{'model':<8} {'path':<8} {'mode':<5} " + " ".join(f"{s:>26}" for s in seq_lens)
    print(header)
    print("-" * len(header))
    keys = list(dict.fromkeys((r["model"], r["path"], r["mode"]) for r in rows))
    for model, path, mode in keys:
        cells = {r["seq_len"]: r for r in rows if (r["model"], r["path"], r["mode"]) == (model, path, mode)}
        text = []
        for s in seq_lens:
            row = cells.get(s)
            cell = _cell_text(row) if row else "-"
            ref = llama.get((mode, s))
            if row and row["status"] == "ok" and model != "llama" and ref:
                cell += f" x{row['tokens_per_s'] / ref['tokens_per_s']:.2f}"
            prev = old.get((model, path, mode, s))
            if row and row["status"] == "ok" and prev and prev.get("status") == "ok":
                cell += f" ({row['tokens_per_s'] / prev['tokens_per_s'] - 1:+.0%})"
            text.append(f"{cell:>26}")
        print(f"{model:<8} {path:<8} {mode:<5} " + " ".join(text))
    print("xN: tokens/s relative to the Llama (same mode and length); (+N%): change against --baseline;")
    print("timeout*: not run because a shorter sequence of the row timed out.")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--tokens-per-step", type=int, default=16384, help="batch = max(1, this // seq len)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per cell (at most)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--measure-seconds", type=float, default=4.0, help="stop timing a cell after this")
    parser.add_argument("--cell-timeout", type=float, default=20.0)
    parser.add_argument("--startup-timeout", type=float, default=180.0, help="import, build and priming")
    parser.add_argument("--budget", type=float, default=None, help="seconds for the whole run; later cells skipped")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--quick", action="store_true", help="one timed step of one sequence: a smoke check")
    parser.add_argument("--save", type=Path, help="write the results as JSON")
    parser.add_argument("--baseline", type=Path, help="a --save file to compare against")
    parser.add_argument("--log-dir", type=Path, help="keep each child's stderr here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--cells", help=argparse.SUPPRESS)
    parser.add_argument("--llama-intermediate", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.precision is None:
        args.precision = "fp32" if args.device == "cpu" else "bf16"
    if args.quick:  # the priming step has warmed up already
        args.steps, args.warmup = 1, 0
        args.tokens_per_step = max(args.seq_lens)
        args.cell_timeout = max(args.cell_timeout, 120.0)
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args)
    start = time.monotonic()
    deadline = start + args.budget if args.budget else float("inf")
    meta = environment(args.device)
    counts = parameter_counts()
    args.llama_intermediate = counts["llama_intermediate"]
    print(f"device: {meta['device']}  gpu: {meta['gpu']}  versions: {json.dumps(meta['versions'])}")
    gap = counts["llama"] / counts["mamba2"] - 1
    print(f"parameters: seshu-130m (Mamba-2) {counts['mamba2']:,}; seshu-130m-mamba1 {counts['mamba1']:,}; "
          f"Llama (768 x 24, 12 heads, MLP {args.llama_intermediate}) {counts['llama']:,} ({gap:+.2%} vs Mamba-2)")
    assert abs(gap) <= 0.05 and abs(counts["llama"] / counts["mamba1"] - 1) <= 0.05, counts
    if args.log_dir:
        args.log_dir.mkdir(parents=True, exist_ok=True)
    groups = [("mamba2", "kernels"), ("llama", "sdpa"), ("mamba1", "kernels"), ("mamba2", "pytorch"), ("mamba1", "pytorch")]
    rows: list[dict] = []
    for model, path in groups:
        if model not in args.models or (path != "sdpa" and path not in args.paths):
            continue
        cells = [(mode, seq) for mode in args.modes for seq in sorted(args.seq_lens)]
        if path == "kernels" and args.device == "cpu":
            rows += [{"model": model, "path": path, "mode": m, "seq_len": s, "status": "n/a",
                      "error": "the kernels have no CPU code"} for m, s in cells]
            continue
        t0 = time.monotonic()
        group_rows = run_row_group(model, "pytorch" if path == "sdpa" else path, cells, args, deadline)
        for row in group_rows:
            row["path"] = path
        rows += group_rows
        print(f"  {model}/{path}: {time.monotonic() - t0:.0f} s", flush=True)
    print()
    baseline = json.loads(args.baseline.read_text()) if args.baseline else None
    print_table(rows, sorted(args.seq_lens), baseline)
    for row in rows:
        if row["status"] not in ("ok", "n/a", "timeout*") and row.get("error"):
            print(f"  {row['model']}/{row['path']}/{row['mode']}/{row['seq_len']}: {row['status']}: {row['error']}")
    expected = {"kernels": "fused", "pytorch": "pytorch", "sdpa": "sdpa"}
    mismatched = [r for r in rows if r["status"] == "ok" and r.get("ran") != expected[r["path"]]]
    for row in mismatched:
        print(f"  WRONG PATH: {row['model']}/{row['path']}/{row['mode']}/{row['seq_len']} ran {row.get('ran')!r}")
    for model in ("mamba2", "mamba1", "llama"):
        trainable = {r["mode"]: r["trainable"] for r in rows if r["model"] == model and r.get("trainable")}
        if trainable:
            print(f"  {model}: trainable parameters " + ", ".join(f"{m} {n:,}" for m, n in trainable.items()))
    print(f"total {time.monotonic() - start:.0f} s")
    if args.save:
        args.save.write_text(json.dumps({"meta": meta, "counts": counts, "args": {k: str(v) for k, v in vars(args).items()},
                                         "cells": rows}, indent=2) + "\n")
    return 1 if mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
