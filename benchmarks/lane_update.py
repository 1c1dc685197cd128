"""Two lanes on one adapter: a push applied as an update, by SVD (``update_state``) or by adding the factors.

With lanes (DESIGN decision 20) several nodes train one adapter at once, each from the version current when
its lease began (``start``). When lane 2 pushes after lane 1's push was accepted (``current``), the hub
applies lane 2's change to ``current``. On the tiny model (``seshu-tiny``, random init) and a language's
training blocks, through the project's loaders and training loop: ``start`` is a fresh adapter trained
``--start-steps``; two lanes each train ``--steps`` more from it (their own batch order), lane 2 continuing
the adapter's schedule as a lease does; lane 1's push becomes ``current``; lane 2's push is then applied

- ``svd``: ``update_state(current, pushed, start)``: ``delta(current) + delta(pushed) - delta(start)``
  per target in weight space, factored back to rank ``r`` (the best rank-``r`` approximation);
- ``factors``: ``A_cur + (A_push - A_start)`` and ``B_cur + (B_push - B_start)``, whose product holds the
  cross terms ``(B_cur - B_start)(A_push - A_start) + (B_push - B_start)(A_cur - A_start)`` nobody trained.

For each, ``err``: the relative Frobenius distance (over all targets) of its deltas from the exact sum
``delta(current) + delta(pushed) - delta(start)``; and the held-out loss (the keyed split, at most
``gate.max_eval_blocks`` blocks, as the hub's workbench computes it) of ``start``, ``current`` (lane 1),
``lane2`` alone, ``exact`` (the three deltas summed into the base weights: ``merge_adapters`` ``sum`` with
weights 1, 1, -1, no rank limit), ``svd`` and ``factors``. Two more say what the sum is worth: ``mix``, the
default rule (``relay.lane_update=mix``, staleness weight 1/2: the mean of the two lanes' models, FedAsync),
and ``sequential``, lane 2's lease trained on ``current`` instead (one lane: the same tokens in a row).
Under the table: mean and spread (sample standard deviation) over the seeds, and which method lands closer
to the exact sum.

    python benchmarks/lane_update.py                            # en ja, seeds 0 1 2, 10 + 10 steps
    python benchmarks/lane_update.py --languages en --seeds 0 1 2 3 4 --steps 20
    python benchmarks/lane_update.py --start-steps 30 --threads 4
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import statistics
import time

from baseline import print_aligned  # this folder is on the path when run as a script
from corpus_split import corpus_split

LOSSES = ("start", "current", "lane2", "exact", "svd", "factors", "mix", "sequential")


def relative_error(approx, exact) -> float:
    """``||approx - exact|| / ||exact||`` (Frobenius, over all targets, float64)."""
    lost = math.fsum(float((approx[t].double() - exact[t]).square().sum()) for t in exact)
    norm = math.fsum(float(exact[t].square().sum()) for t in exact)
    return math.sqrt(lost / norm) if norm > 0 else 0.0


def spread(values) -> str:
    values = list(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} +- {sd:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--languages", nargs="+", default=["en", "ja"], help="one adapter each, trained on its own")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="base, adapter and batch seeds")
    parser.add_argument("--start-steps", type=int, default=10, help="steps from a fresh adapter to `start`")
    parser.add_argument("--steps", type=int, default=10, help="steps of each lane from `start`")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=None, help="LoRA learning rate (default: `train.lr`)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    import torch

    from fedem_flwr.data.blocks import tokenize_blocks
    from fedem_flwr.data.corpus import column
    from fedem_flwr.gate.evaluator import HubWorkbench
    from fedem_flwr.gate.loss import evaluate
    from fedem_flwr.lineage.merge import WeightedAdapter, lora_deltas, merge_adapters, update_state
    from fedem_flwr.model.factory import build_model
    from fedem_flwr.model.lora import adapter_state, attach_lora, load_adapter_state
    from fedem_flwr.training.finetune import train

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    cfg, tokenizer, split = corpus_split(b"benchmarks/lane_update.py split key")
    lora = cfg.lora
    pad = tokenizer.pad_token_id
    blocks = {lang: tokenize_blocks(column(split.train.filter(lambda row, lang=lang: row["language"] == lang), "text"),
                                    tokenizer, cfg.data.block_size) for lang in args.languages}
    train_cfg = dataclasses.replace(cfg.train, batch_size=args.batch_size, progress=False, device="cpu",
                                    **({"lr": args.lr} if args.lr is not None else {}))
    print(f"seshu-tiny, r={lora.r} alpha={lora.alpha} targets={','.join(lora.target_modules)}, lr {train_cfg.lr:g} "
          f"(carry {train_cfg.carry}), start {args.start_steps} steps, lanes {args.steps} steps each, "
          f"batch {args.batch_size}, {args.threads} thread(s)")

    rows = []
    for seed in args.seeds:
        base = build_model(cfg.model, tokenizer, seed=seed)
        base.eval()
        bench = HubWorkbench(copy.deepcopy(base), lora, split.heldout, pad_id=pad,
                             max_blocks=cfg.gate.max_eval_blocks, seed=seed)
        for n, lang in enumerate(args.languages):
            # start: a fresh adapter trained a few steps, so its factors are not PEFT's B = 0
            model = attach_lora(copy.deepcopy(base), lora, seed=seed)
            first = train(model, blocks[lang], dataclasses.replace(train_cfg, max_steps=args.start_steps),
                          pad_id=pad, seed=1000 * seed + 10 * n)
            start = adapter_state(model)
            lanes = []
            for lane in (1, 2):  # each lease from `start`, continuing the adapter's schedule, its own batches
                load_adapter_state(model, start)
                train(model, blocks[lang], dataclasses.replace(train_cfg, max_steps=args.steps), pad_id=pad,
                      seed=1000 * seed + 10 * n + lane, optimizer_state=first.optimizer_state)
                lanes.append(adapter_state(model))
            current, pushed = lanes
            load_adapter_state(model, current)  # one lane: lane 2's lease on lane 1's push, at its step
            train(model, blocks[lang], dataclasses.replace(train_cfg, max_steps=args.steps), pad_id=pad,
                  seed=1000 * seed + 10 * n + 2, optimizer_state=dataclasses.replace(
                      first.optimizer_state, step=first.optimizer_state.step + args.steps))
            sequential = adapter_state(model)

            svd = update_state(current, pushed, start, lora)
            factors = {key: current[key] + (pushed[key] - start[key]) for key in start}
            d_cur, d_push, d_start = (lora_deltas(s, lora) for s in (current, pushed, start))
            exact = {t: d_cur[t].double() + d_push[t].double() - d_start[t].double() for t in d_start}
            summed = merge_adapters(base, [WeightedAdapter("current", 1, current, 1.0),
                                           WeightedAdapter("pushed", 1, pushed, 1.0),
                                           WeightedAdapter("start", 1, start, -1.0)], lora, "sum")

            def loss(state):
                return bench.evaluate(state, [lang])[lang]

            losses = {"start": loss(start), "current": loss(current), "lane2": loss(pushed),
                      "exact": float(evaluate(summed.model, {lang: bench.heldout[lang]}, pad_id=pad)[lang]["loss"]),
                      "svd": loss(svd.state), "factors": loss(factors),
                      "mix": loss(update_state(current, pushed, start, lora, 0.5, [(start, current)]).state),
                      "sequential": loss(sequential)}
            errors = {"svd": relative_error(lora_deltas(svd.state, lora), exact),
                      "factors": relative_error(lora_deltas(factors, lora), exact)}
            assert abs(errors["svd"] - svd.relative) < 1e-4, (errors["svd"], svd.relative)  # what update_state recorded
            rows.append({"lang": lang, "seed": seed, "errors": errors, "losses": losses})

    print()
    print_aligned([["lang", "seed", "err svd", "err factors", *LOSSES, "svd-exact", "factors-exact"]] + [
        [r["lang"], r["seed"], f"{r['errors']['svd']:.4f}", f"{r['errors']['factors']:.4f}",
         *(f"{r['losses'][k]:.4f}" for k in LOSSES),
         f"{r['losses']['svd'] - r['losses']['exact']:+.4f}", f"{r['losses']['factors'] - r['losses']['exact']:+.4f}"]
        for r in rows])

    print("\nmean +- sd over seeds")
    groups = [(lang, [r for r in rows if r["lang"] == lang]) for lang in args.languages] + [("all", rows)]
    print_aligned([["lang", "err svd", "err factors", *LOSSES, "svd-exact", "factors-exact"]] + [
        [lang, spread(r["errors"]["svd"] for r in group), spread(r["errors"]["factors"] for r in group),
         *(spread(r["losses"][k] for r in group) for k in LOSSES),
         spread(r["losses"]["svd"] - r["losses"]["exact"] for r in group),
         spread(r["losses"]["factors"] - r["losses"]["exact"] for r in group)]
        for lang, group in groups])

    gap = {m: statistics.fmean(abs(r["losses"][m] - r["losses"]["exact"]) for r in rows) for m in ("svd", "factors")}
    err = {m: statistics.fmean(r["errors"][m] for r in rows) for m in ("svd", "factors")}
    closer = sum(abs(r["losses"]["svd"] - r["losses"]["exact"]) < abs(r["losses"]["factors"] - r["losses"]["exact"])
                 for r in rows)
    fewer = sum(r["errors"]["svd"] <= r["errors"]["factors"] for r in rows)
    print(f"\nweight space: svd {err['svd']:.4f} vs factors {err['factors']:.4f} relative error on average "
          f"({err['factors'] / max(err['svd'], 1e-12):.1f}x); svd at most factors in {fewer} of {len(rows)} runs")
    print(f"held-out loss: |svd - exact| {gap['svd']:.4f} vs |factors - exact| {gap['factors']:.4f} nats on average; "
          f"svd closer in {closer} of {len(rows)} runs")
    worth = {m: statistics.fmean(r["losses"][m] - r["losses"]["current"] for r in rows)
             for m in ("svd", "mix", "sequential")}
    print("against lane 1 alone (current), mean: " + ", ".join(f"{m} {d:+.4f}" for m, d in worth.items()))
    print(f"\n{time.perf_counter() - started:.0f} s on {args.threads} thread(s)")


if __name__ == "__main__":
    main()
