"""What a merge costs each adapted language: ``sum`` + zero restart against ``mean`` + residual rebase.

On the tiny model (``seshu-tiny``, random init; ``--pretrain-steps`` first trains the whole base on
every language's training blocks, for a base that already knows something), one LoRA adapter per
``--languages`` entry is trained ``--steps`` steps on that language's training blocks through the
project's own loaders and training loop. Then, on the held-out blocks (the keyed split the hub uses,
at most ``--max-blocks`` a language) of those languages and of ``--others``:

- ``base``: the base alone; ``before``: each language's adapted model before a merge (base + its adapter);
- ``sum+zero``: the summed merge, each adapter restarted from zero: the merged base alone serves it;
- ``sum+resid``: the summed merge, each adapter continuing from its residual (rank-r truncated);
- ``mean+zero`` / ``mean+resid``: ``scale`` times the token-weighted mean of the deltas, likewise;
- ``trunc``: the relative truncation error of each adapter's residual (mean merge, Frobenius, all targets).

Under the table: each variant's base-alone token-weighted loss over all held-out languages and what
the base gate would say (``decide_base`` with ``--tolerance`` on the base alone for rebase zero; for
rebase residual the base alone overall, plus ``decide_adapted`` with ``--tolerance``).

    python benchmarks/merge_rebase.py                                  # en ja es de, 40 steps each
    python benchmarks/merge_rebase.py --pretrain-steps 200 --steps 60  # a base that learned something
    python benchmarks/merge_rebase.py --languages en ja es de pt --scale 1.5 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import time

from corpus_split import corpus_split  # this folder is on the path when run as a script


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--languages", nargs="+", default=["en", "ja", "es", "de"], help="one adapter each")
    parser.add_argument("--others", nargs="*", default=["ko", "fr"], help="held-out languages no adapter trains on")
    parser.add_argument("--steps", type=int, default=40, help="training steps per adapter")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=None, help="LoRA learning rate (default: `train.lr`)")
    parser.add_argument("--pretrain-steps", type=int, default=0, help="full training of the base first (all languages)")
    parser.add_argument("--scale", type=float, default=1.0, help="`merge.scale` of the mean merge")
    parser.add_argument("--tolerance", type=float, default=0.05, help="`merge.tolerance` for the gate verdicts")
    parser.add_argument("--max-blocks", type=int, default=16, help="held-out blocks a language")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    from fedem_flwr.data.blocks import tokenize_blocks
    from fedem_flwr.data.corpus import column
    from fedem_flwr.gate.acceptance import decide_adapted, decide_base
    from fedem_flwr.gate.loss import evaluate
    from fedem_flwr.lineage.merge import (
        WeightedAdapter,
        merge_adapters,
        rebase_residual,
        weight_change,
    )
    from fedem_flwr.lineage.policy import mean_weights
    from fedem_flwr.model.factory import build_model
    from fedem_flwr.model.lora import adapter_state, attach_lora, load_adapter_state
    from fedem_flwr.training.finetune import train

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    cfg, tokenizer, split = corpus_split(b"benchmarks/merge_rebase.py split key")
    lora = cfg.lora
    pad = tokenizer.pad_token_id
    languages = list(dict.fromkeys([*args.languages, *args.others]))
    heldout = {lang: split.heldout[lang][: args.max_blocks] for lang in languages}
    weights = {lang: float((blocks != pad).sum()) for lang, blocks in heldout.items()}

    def blocks_of(langs):
        rows = split.train.filter(lambda row: row["language"] in langs)
        return tokenize_blocks(column(rows, "text"), tokenizer, cfg.data.block_size)

    train_cfg = dataclasses.replace(cfg.train, max_steps=args.steps, batch_size=args.batch_size, progress=False,
                                    device="cpu", warmup_steps=min(cfg.train.warmup_steps, max(1, args.steps // 10)),
                                    **({"lr": args.lr} if args.lr is not None else {}))
    base = build_model(cfg.model, tokenizer, seed=args.seed)
    if args.pretrain_steps:
        full = dataclasses.replace(train_cfg, max_steps=args.pretrain_steps, lr=1e-3, warmup_steps=10)
        result = train(base, blocks_of(set(languages)), full, pad_id=pad, seed=args.seed)
        print(f"base pretrained {result.steps} steps on {len(languages)} languages: loss {result.loss_first:.3f} "
              f"-> {result.loss_last:.3f}")
    base.eval()

    def losses(model):
        return {lang: float(r["loss"]) for lang, r in evaluate(model, heldout, pad_id=pad).items()}

    def adapted(model, state):
        peft_model = attach_lora(copy.deepcopy(model), lora, seed=args.seed)
        load_adapter_state(peft_model, state)
        return losses(peft_model)

    states, tokens = {}, {}
    for i, lang in enumerate(args.languages):
        model = attach_lora(copy.deepcopy(base), lora, seed=args.seed + i)
        result = train(model, blocks_of({lang}), train_cfg, pad_id=pad, seed=args.seed + i)
        states[lang], tokens[lang] = adapter_state(model), float(result.tokens)
        print(f"adapter {lang}: {result.steps} steps, {result.tokens} tokens, loss {result.loss_first:.3f} -> "
              f"{result.loss_last:.3f}")

    bare = losses(base)
    before = {lang: adapted(base, states[lang])[lang] for lang in args.languages}
    share = mean_weights(tokens, {})
    rows, variants = {}, {}
    for method, w in (("sum", dict.fromkeys(tokens, 1.0)), ("mean", share)):
        merged = merge_adapters(base, [WeightedAdapter(lang, 1, states[lang], w[lang]) for lang in args.languages],
                                lora, method, scale=args.scale)
        alone = losses(merged.model)
        change = weight_change(merged.model, base, merged.targets)
        after, trunc = {}, {}
        for lang in args.languages:
            rest = rebase_residual(states[lang], change, lora)
            after[lang] = adapted(merged.model, rest.state)[lang]
            trunc[lang] = rest.relative
        variants[method] = (alone, after)
        rows[f"{method}+zero"] = {lang: alone[lang] for lang in languages}
        rows[f"{method}+resid"] = {**after, **{lang: alone[lang] for lang in args.others}}
        rows[f"{method} trunc"] = trunc

    columns = ["base", "before", "sum+zero", "sum+resid", "mean+zero", "mean+resid", "mean trunc"]
    table = {"base": bare, "before": before, **rows}
    print(f"\nheld-out loss (nats/token), r={lora.r} alpha={lora.alpha} targets={','.join(lora.target_modules)}, "
          f"mean scale {args.scale}, mean weights " + " ".join(f"{k}={v:.3f}" for k, v in share.items()))
    print(f"{'language':<10}" + "".join(f"{c:>12}" for c in columns))
    for lang in languages:
        cells = []
        for c in columns:
            value = table[c].get(lang)
            cells.append(f"{value:>12.4f}" if value is not None and math.isfinite(value) else f"{'-':>12}")
        print(f"{lang + ('' if lang in args.languages else ' (other)'):<10}" + "".join(cells))
    for lang in args.languages:
        print(f"  {lang}: adapted change sum+zero {rows['sum+zero'][lang] - before[lang]:+.4f}, "
              f"mean+resid {rows['mean+resid'][lang] - before[lang]:+.4f}, "
              f"sum+resid {rows['sum+resid'][lang] - before[lang]:+.4f}")

    def overall(values):
        return math.fsum(values[lang] * weights[lang] for lang in languages) / math.fsum(weights.values())

    print(f"\nbase alone over all held-out languages (token-weighted): base {overall(bare):.4f}, "
          f"sum {overall(variants['sum'][0]):.4f}, mean {overall(variants['mean'][0]):.4f}")
    gate = {lang: {lang: before[lang]} for lang in args.languages}
    for method in ("sum", "mean"):
        alone, after = variants[method]
        zero = decide_base(alone, bare, 0.0, args.tolerance, weights=weights)
        base_only = decide_base(alone, bare, 0.0, None, weights=weights)
        kept = decide_adapted({lang: {lang: after[lang]} for lang in args.languages}, gate, args.tolerance)
        print(f"{method}+zero gate: {'PUBLISH' if zero.accepted else 'REFUSE'} ({zero.reason})")
        print(f"{method}+resid gate: {'PUBLISH' if base_only.accepted and kept.accepted else 'REFUSE'} "
              f"(base: {base_only.reason}; adapted: {kept.reason})")
    print(f"\n{time.perf_counter() - started:.0f} s on {args.threads} thread(s)")


if __name__ == "__main__":
    main()
