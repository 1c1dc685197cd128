"""Compare node-selection policies on `flwr run` simulations of the same app.

Each policy gets its own hub folder and one local simulation run (the real ServerApp and
ClientApp, Flower's simulation engine); the hubs' registries are then read back into one table
and one figure per policy.

    python simulations/compare_policies.py --policies language,least-recent,random \\
        --supernodes 6 --max-accepted 12 --out runs/policies

Prints a Markdown table (accepted, rejected, contributions per minute, mean held-out gain) and
writes `<out>/<policy>/relay.png`, `<out>/summary.json` and `<out>/policies.png`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedem_flwr.hub.registry import Registry  # noqa: E402
from fedem_flwr.launch.local import run_app  # noqa: E402
from fedem_flwr.report import plot_hub, summary  # noqa: E402

APP_DIR = Path(__file__).resolve().parent.parent


def run_policy(policy: str, out: Path, args: argparse.Namespace) -> dict:
    hub = (out / policy / "hub").resolve()
    overrides = " ".join(
        [
            f"relay.policy={policy}",
            f"relay.max_accepted={args.max_accepted}",
            f"relay.max_wall_s={args.max_wall_s}",
            f"train.max_steps={args.steps}",
            "train.progress=false",
            f"seed={args.seed}",
            *shlex.split(args.overrides),
        ]
    )
    federation = f"num-supernodes={args.supernodes} client-resources-num-cpus=1"
    with open(out / policy / "flwr.log", "w") as log_file:
        outcome = run_app(
            APP_DIR, federation_config=federation, run_config={"hub": str(hub), "overrides": overrides},
            log_output=log_file, echo=lambda line: print(f"[{policy}] {line}", file=sys.stderr),
        )
    if not outcome.ok:
        raise SystemExit(f"[{policy}] {outcome.summary()} (log: {out / policy / 'flwr.log'})")
    with Registry.open(hub, readonly=True) as registry:
        result = summary(registry)
        result["figure"] = str(plot_hub(registry, out / policy / "relay.png", title=f"policy: {policy}"))
    result["run_seconds"] = outcome.seconds
    return result


def _gain(result: dict) -> float:
    gains = [a["loss_v0"] - a["loss_latest"] for a in result["adapters"].values()]
    return sum(gains) / len(gains) if gains else 0.0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policies", default="language,least-recent,random")
    parser.add_argument("--supernodes", type=int, default=4)
    parser.add_argument("--max-accepted", type=int, default=8)
    parser.add_argument("--max-wall-s", type=float, default=900)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overrides", default="", help="More Hydra overrides for every run.")
    parser.add_argument("--out", type=Path, default=Path("runs/policies"))
    args = parser.parse_args(argv)

    results = {}
    for policy in args.policies.split(","):
        (args.out / policy).mkdir(parents=True, exist_ok=True)
        results[policy] = run_policy(policy, args.out, args)
    (args.out / "summary.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")

    print("| policy | accepted | rejected | contributions/min | mean held-out gain |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for policy, r in results.items():
        print(f"| {policy} | {r['accepted']} | {r['rejected']} | {r['contributions_per_minute']:.1f} | {_gain(r):.3f} |")

    fig, ax = plt.subplots(figsize=(6, 4))
    names = list(results)
    ax.bar(names, [results[n]["accepted"] for n in names], label="accepted", color="tab:green")
    ax.bar(names, [results[n]["rejected"] for n in names], bottom=[results[n]["accepted"] for n in names],
           label="rejected", color="tab:red")
    ax.set(ylabel="contributions", title="decisions by policy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "policies.png", dpi=110)
    print(f"figures: {args.out}/<policy>/relay.png, {args.out}/policies.png")


if __name__ == "__main__":
    main()
