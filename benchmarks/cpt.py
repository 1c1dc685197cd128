"""Continuous pretraining on the hub: what a slice trains, what a checkpoint costs, how long a reply waits.

A random-init base (``seshu-130m`` by default) pretrains on the demo corpus's blocks in slices of
``--slice-s`` seconds, as the hub runs them between relay loop turns:

- steps/s and tokens/s over the measured slices (the first slice is cold: its first step runs with no
  steady-state step time, which the module allows), and the peak memory, as the growth of the
  process's peak resident set over the imported runtime (on CUDA: torch's peak allocation);
- a checkpoint publication: ``save_base`` of the model to a folder (seconds, MB) and the CPT state's
  save (optimizer moments, cursor, RNG: seconds, MB), then a restart's load of that state;
- the longest a reply would wait: the longest slice, and the largest overshoot of a slice past its
  budget, against one step; a checkpoint's publication (the two saves) blocks the relay as well.

On one CPU thread a step of seshu-130m takes seconds, so the defaults are one block of 64 tokens a
step; a slice shorter than one step runs none (``step_too_long``).

    python benchmarks/cpt.py                                  # seshu-130m on the CPU, 4 slices of 10 s
    python benchmarks/cpt.py --model seshu-tiny --slice-s 2   # quick
    python benchmarks/cpt.py --device cuda --batch-size 8 --block-size 1024
    python benchmarks/cpt.py --save cpt.json                  # keep the numbers
    python benchmarks/cpt.py --baseline cpt.json              # compare; exit 1 on a regression
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from baseline import regressions

# name -> (unit, higher is better)
METRICS = {
    "steps_per_s": ("steps/s", True),
    "tokens_per_s": ("tok/s", True),
    "step_s_max": ("s", False),
    "peak_mb": ("MiB", False),
    "max_slice_s": ("s", False),
    "first_slice_overshoot_s": ("s", False),
    "max_overshoot_s": ("s", False),
    "max_overshoot_steps": ("steps", False),
    "save_base_s": ("s", False),
    "save_base_mb": ("MB", False),
    "state_save_s": ("s", False),
    "state_mb": ("MB", False),
    "state_load_s": ("s", False),
}


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


def _folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def run(args: argparse.Namespace) -> dict[str, Any]:
    import datasets
    import torch
    import transformers

    from fedem_flwr.config.loader import load_config
    from fedem_flwr.data.blocks import tokenize_blocks
    from fedem_flwr.data.corpus import load_corpus
    from fedem_flwr.model.factory import build_model, count_parameters, save_base
    from fedem_flwr.model.tokenizer import build_byte_tokenizer
    from fedem_flwr.training.cpt import ContinuousPretrainer

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    cfg = load_config([f"model={args.model}", f"cpt.batch_size={args.batch_size}", f"cpt.device={args.device}",
                       f"data.block_size={args.block_size}", "cpt.checkpoint_every=1000000"])
    tokenizer = build_byte_tokenizer()
    blocks = tokenize_blocks(load_corpus(cfg.data)["text"], tokenizer, cfg.data.block_size)
    import transformers.models.mamba2.modeling_mamba2  # noqa: F401  (the runtime is not the slice's cost)

    rss_before = _peak_rss_mb()
    model = build_model(cfg.model, tokenizer, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        cpt = ContinuousPretrainer(model, blocks, cfg.cpt, Path(tmp) / "cpt", pad_id=tokenizer.pad_token_id)
        if cpt.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(cpt.device)
        slices = []
        for n in range(args.slices):
            result = cpt.run_slice(args.slice_s)
            slices.append(result)
            print(f"slice {n}: {result.steps} steps in {result.seconds:.2f} s, loss {result.loss_mean:.3f}, "
                  f"overshoot {result.overshoot_s:.3f} s ({result.stopped_by})", file=sys.stderr, flush=True)
        peak = (torch.cuda.max_memory_allocated(cpt.device) / 2**20 if cpt.device.type == "cuda"
                else _peak_rss_mb() - rss_before)
        step_max = cpt.step_estimate() or float("nan")
        warm = slices[1:] or slices
        steps, seconds = sum(r.steps for r in warm), sum(r.seconds for r in warm)
        tokens = sum(r.tokens for r in warm)

        start = time.perf_counter()
        folder = save_base(model, tokenizer, Path(tmp) / "base")
        save_base_s = time.perf_counter() - start
        start = time.perf_counter()
        state_bytes = cpt.save()
        state_save_s = time.perf_counter() - start
        start = time.perf_counter()
        resumed = ContinuousPretrainer(model, blocks, cfg.cpt, Path(tmp) / "cpt", pad_id=tokenizer.pad_token_id)
        state_load_s = time.perf_counter() - start
        assert resumed.step == cpt.step
        save_base_mb = _folder_mb(folder)

    overshoot = max(r.overshoot_s for r in warm)
    results = {
        "steps_per_s": steps / seconds if seconds else 0.0,
        "tokens_per_s": tokens / seconds if seconds else 0.0,
        "step_s_max": step_max,
        "peak_mb": peak,
        "max_slice_s": max(r.seconds for r in slices),
        "first_slice_overshoot_s": slices[0].overshoot_s,
        "max_overshoot_s": overshoot,
        "max_overshoot_steps": overshoot / step_max if step_max == step_max and step_max else 0.0,
        "save_base_s": save_base_s,
        "save_base_mb": save_base_mb,
        "state_save_s": state_save_s,
        "state_mb": state_bytes / 1e6,
        "state_load_s": state_load_s,
    }
    config = {"model": args.model, "params": count_parameters(model), "device": str(cpt.device),
              "threads": args.threads, "batch_size": args.batch_size, "block_size": args.block_size,
              "slice_s": args.slice_s, "slices": args.slices, "blocks": int(blocks.shape[0]),
              "steps": [r.steps for r in slices]}
    meta = {"python": platform.python_version(), "machine": platform.machine(), "when": time.time()}
    return {"config": config, "results": results, "meta": meta}


def table(report: dict[str, Any], baseline: Optional[dict[str, Any]]) -> str:
    cfg = report["config"]
    lines = [f"cpt: {cfg['model']} ({cfg['params']:,} parameters) on {cfg['device']}, {cfg['threads']} thread(s), "
             f"batch {cfg['batch_size']} x {cfg['block_size']} tokens, {cfg['slices']} slices of {cfg['slice_s']} s "
             f"(steps {cfg['steps']}; rates over all but the first)",
             f"{'metric':<26}{'value':>12}  {'unit':<7}" + ("  baseline      change" if baseline else "")]
    for name, (unit, _) in METRICS.items():
        value = report["results"][name]
        line = f"{name:<26}{value:>12,.3f}  {unit:<7}"
        if baseline and name in baseline["results"]:
            old = baseline["results"][name]
            line += f"  {old:>12,.3f}  {(value / old - 1) * 100 if old else 0.0:>+6.1f}%"
        lines.append(line)
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="seshu-130m", help="config name under conf/model")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--batch-size", type=int, default=1, help="blocks per optimizer step")
    parser.add_argument("--block-size", type=int, default=64, help="tokens per block")
    parser.add_argument("--slice-s", type=float, default=10.0, help="seconds per slice")
    parser.add_argument("--slices", type=int, default=4, help="slices to run (the first is cold)")
    parser.add_argument("--save", type=Path, help="write the results as JSON")
    parser.add_argument("--baseline", type=Path, help="compare with a saved JSON; exit 1 on a regression")
    parser.add_argument("--tolerance", type=float, default=0.3, help="allowed fraction worse than the baseline")
    args = parser.parse_args(argv)
    report = run(args)
    baseline = json.loads(args.baseline.read_text()) if args.baseline else None
    print(table(report, baseline))
    if args.save:
        args.save.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    if baseline:
        worse = regressions(report["results"], baseline, METRICS, args.tolerance)
        for line in worse:
            print(f"REGRESSION {line}")
        return 1 if worse else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
