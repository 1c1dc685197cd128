"""What a merge costs the hub: judging one push, the merge arithmetic for 8 adapters, the merge gate.

Per model (a child process each, torch on ``--threads`` CPU threads, random-init weights):

- ``judge-own`` / ``judge-all``: the hub workbench's evaluation of one pushed adapter (random LoRA
  on ``in_proj``) on its own language (``en``) and on every held-out language, as the gate runs it;
- ``merge-<method>``: ``merge_adapters`` of ``--adapters`` random r=8 ``in_proj`` adapters into the
  base (a copy of the base included), for each ``--methods``;
- ``gate``: the merged base's held-out loss on every language, then ``decide_base``.

Held-out data is the demo corpus's keyed split, at most ``gate.max_eval_blocks`` blocks a language.
Peak memory is the growth of the process's peak resident set over the case (Linux: the peak is
reset before each case through ``/proc/self/clear_refs``; elsewhere it is the process's peak so far).

    python benchmarks/merge.py                                  # seshu-tiny and seshu-130m, 2 threads
    python benchmarks/merge.py --models seshu-tiny --methods sum cat svd ties_svd dare_ties_svd
    python benchmarks/merge.py --models seshu-130m --max-eval-blocks 4   # CPU: 4 blocks a language
    python benchmarks/merge.py --save merge.json
    python benchmarks/merge.py --baseline merge.json            # compare seconds with a saved run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from baseline import print_aligned  # this folder is on the path when run as a script

MODELS = ("seshu-tiny", "seshu-130m")
CASES = ("merge", "gate", "judge")
OWN = "en"


def _status_kb(field: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _measure(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """``fn()``, its wall seconds and its peak memory growth in MiB."""
    import resource

    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set to the current one
    except OSError:
        pass
    before = _status_kb("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    peak = _status_kb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return result, seconds, max(0.0, (peak - before) / 1024)


def run_model(args: dict[str, Any]) -> list[dict[str, Any]]:
    """Every case for one model; runs inside the child process."""
    import torch

    from fedem_flwr.config.loader import load_config
    from fedem_flwr.data.blocks import heldout_split
    from fedem_flwr.data.corpus import load_corpus
    from fedem_flwr.gate.acceptance import decide_base
    from fedem_flwr.gate.evaluator import HubWorkbench
    from fedem_flwr.gate.loss import evaluate
    from fedem_flwr.lineage.merge import WeightedAdapter, merge_adapters
    from fedem_flwr.model.factory import build_model, count_parameters
    from fedem_flwr.model.lora import adapter_state, attach_lora
    from fedem_flwr.model.tokenizer import build_byte_tokenizer

    torch.set_num_threads(args["threads"])
    cfg = load_config([f"model={args['model']}"])
    tokenizer = build_byte_tokenizer()
    split = heldout_split(load_corpus(cfg.data), cfg.data.heldout_fraction, cfg.data.min_heldout_blocks,
                          cfg.data.block_size, tokenizer, key=b"merge benchmark: held-out split key")
    max_blocks = args["max_eval_blocks"] or cfg.gate.max_eval_blocks
    heldout = {lang: blocks[:max_blocks] for lang, blocks in split.heldout.items()}
    pad = tokenizer.pad_token_id
    base = build_model(cfg.model, tokenizer, seed=0)
    wrapped = attach_lora(base, cfg.lora, seed=0)  # in place: PEFT's own key names for the random adapters
    template = adapter_state(wrapped)
    base = wrapped.unload()

    def random_state(seed: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        return {key: 0.01 * torch.randn(value.shape, generator=generator) for key, value in template.items()}

    common = {"model": args["model"], "params": count_parameters(base), "threads": args["threads"],
              "languages": len(heldout), "blocks": sum(len(b) for b in heldout.values()),
              "max_eval_blocks": max_blocks}
    rows = []

    def record(case: str, seconds: float, peak: float, **extra: Any) -> None:
        rows.append({**common, "case": case, "seconds": seconds, "peak_mb": peak, "status": "ok", **extra})
        print(f"{args['model']} {case}: {seconds:.2f} s", file=sys.stderr, flush=True)

    adapters = [WeightedAdapter(f"adapter-{i}", 1, random_state(i + 1)) for i in range(args["adapters"])]
    merged = None
    methods = args["methods"] if "merge" in args["cases"] or "gate" in args["cases"] else []
    for method in methods:
        result, seconds, peak = _measure(
            lambda method=method: merge_adapters(base, adapters, cfg.lora, method, seed=0, density=cfg.merge.density))
        if "merge" in args["cases"]:
            record(f"merge-{method}", seconds, peak, adapters=len(adapters))
        if merged is None:
            merged = result.model
        del result

    if merged is not None and "gate" in args["cases"]:
        current = {lang: r["loss"] for lang, r in evaluate(base, heldout, pad_id=pad).items()}

        def gate() -> Any:
            results = evaluate(merged, heldout, pad_id=pad, batch_size=cfg.train.eval_batch_size)
            losses = {lang: r["loss"] for lang, r in results.items()}
            tokens = {lang: r["tokens"] for lang, r in results.items()}
            return decide_base(losses, current, cfg.merge.margin, cfg.merge.tolerance, weights=tokens)

        decision, seconds, peak = _measure(gate)
        record("gate", seconds, peak, accepted=decision.accepted)
    merged = None  # free the merged model before judging
    if "judge" not in args["cases"]:
        return rows

    bench = HubWorkbench(base, cfg.lora, split.heldout, pad_id=pad, batch_size=cfg.train.eval_batch_size,
                         max_blocks=max_blocks, seed=0)
    push = random_state(99)
    for case, languages in (("judge-own", [OWN]), ("judge-all", None)):
        _, seconds, peak = _measure(lambda languages=languages: bench.evaluate(push, languages))
        record(case, seconds, peak, own_blocks=len(heldout[OWN]))
    return rows


def _child(args: dict[str, Any], timeout: float) -> list[dict[str, Any]]:
    cmd = [sys.executable, __file__, "--case", json.dumps(args)]
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    try:
        # stderr passes through: each case prints its time there as it ends
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return [{"model": args["model"], "case": "all", "status": f"timeout>{timeout:.0f}s"}]
    if done.returncode != 0:
        return [{"model": args["model"], "case": "all", "status": f"error: exit {done.returncode} (see stderr)"}]
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_table(rows: list[dict[str, Any]], baseline: Optional[list[dict[str, Any]]] = None) -> None:
    old = {(r["model"], r["case"]): r for r in baseline or [] if r.get("status") == "ok"}
    header = ["model", "params", "case", "threads", "seconds", "peak MiB", "eval blocks"]
    if baseline is not None:
        header.append("vs baseline")
    lines = [header]
    for r in rows:
        ok = r.get("status") == "ok"
        line = [r["model"], f"{r['params']:,}" if ok else "-", r["case"], str(r.get("threads", "-")),
                f"{r['seconds']:.3f}" if ok else r["status"], f"{r['peak_mb']:,.0f}" if ok else "-",
                f"{r['blocks']} in {r['languages']} langs" if ok and r["case"] in ("gate", "judge-all")
                else f"{r['own_blocks']} ({OWN})" if ok and r["case"] == "judge-own" else "-"]
        if baseline is not None:
            prev = old.get((r["model"], r["case"]))
            line.append(f"x{r['seconds'] / prev['seconds']:.2f}" if ok and prev else "n/a")
        lines.append(line)
    print_aligned(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="config names under conf/model")
    parser.add_argument("--methods", nargs="+", default=["sum"], help="merge methods to time (merge.method values)")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES, help="which parts to run")
    parser.add_argument("--adapters", type=int, default=8, help="random adapters merged at once")
    parser.add_argument("--max-eval-blocks", type=int, default=0,
                        help="held-out blocks per language evaluated (default: gate.max_eval_blocks)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per model, then 'timeout'")
    parser.add_argument("--save", type=Path, help="write the results as JSON")
    parser.add_argument("--baseline", type=Path, help="compare seconds with a JSON file written by --save")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.case:  # child process: one model, one JSON line on stdout
        print(json.dumps(run_model(json.loads(args.case))))
        return 0
    baseline = json.loads(args.baseline.read_text())["results"] if args.baseline else None
    rows = []
    for model in args.models:
        rows += _child({"model": model, "methods": args.methods, "adapters": args.adapters,
                        "threads": args.threads, "cases": args.cases,
                        "max_eval_blocks": args.max_eval_blocks}, args.timeout)
    print_table(rows, baseline)
    if args.save:
        meta = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
                "when": time.time()}
        args.save.write_text(json.dumps({"meta": meta, "results": rows}, indent=2, sort_keys=True) + "\n")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
