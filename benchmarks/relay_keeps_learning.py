"""Does a relay on the default gate keep learning? Accept shares of honest pushes over a simulated hour.

Goal: in a one-hour relay, the share of honest pushes accepted in its last third is at least half
the share in its first third. The adapter gate once also checked every other language within
``gate.tolerance`` of the parent (``gate.check_others``); on a young base that froze a relay (11 of
its first 15 pushes accepted, then none of the next 146, each better on its own language by 0.3-0.6
nats). The default gate judges own languages only; this runs both and compares.

    python benchmarks/relay_keeps_learning.py                   # default gate, then check_others
    python benchmarks/relay_keeps_learning.py --gates default   # the goal only
    python benchmarks/relay_keeps_learning.py --json out.json   # keep the numbers

Each run is the app's own simulation on the virtual clock (``run_simulation``, as the ServerApp
runs ``sim.clock=virtual``): the default config apart from what a simulation must say (four
languages, ``--contributors`` virtual contributors, ``--steps`` steps a lease, ``--speed`` steps a
simulated second, a stop after ``--hours``); the real hub, relay Strategy, blind gate, merges and
ClientApps truly fine-tuning seshu-tiny, on an in-process Grid (one message at a time, as a
SuperNode runs them). Nothing is faulty, so every push is honest; the shares count the pushes the
gate judged (a judged base recorded), by the simulated time they were received, from the hub's
registry. Both runs share a seed and a study secret: the same held-out rows and contributors.
Exit 1 when the default gate misses the goal.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: simulations, tests.support

import torch

from fedem_flwr.client_app import app as client_app
from fedem_flwr.config.loader import load_run_config
from fedem_flwr.hub.paths import registry_path
from fedem_flwr.hub.registry import Registry
from fedem_flwr.simulation.run import run_simulation
from simulations.cells import fresh_hub
from tests.support.fake_grid import InProcessGrid

GATES = {"default": "", "check-others": "gate.check_others=true"}
GOAL = 0.5  # last third's accept share / first third's
STARTUP_S = 300.0  # simulated seconds before the first lease: the nodes' profiles (one jump of the virtual clock)


def simulate(gate: str, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """One relay of ``args.hours`` simulated hours on the ``gate`` variant; its accept shares by third."""
    hub = fresh_hub(folder / gate, args.seed)
    overrides = (f"seed={args.seed} data.languages=[{args.languages}] sim.clock=virtual train.progress=false "
                 f"train.max_steps={args.steps} sim.speed={args.speed} "
                 f"relay.max_wall_s={args.hours * 3600 + STARTUP_S:g} {GATES[gate]} {args.overrides}")
    run_config = {"overrides": " ".join(overrides.split()), "hub": str(hub)}
    n = args.contributors
    grid = InProcessGrid(client_app, {100 + i: {"partition-id": i, "num-partitions": n,
                                                "cache-dir": str(folder / gate / f"cache-{i}")} for i in range(n)},
                         run_config)
    started = time.monotonic()
    result = run_simulation(grid, load_run_config(run_config), hub)
    wall = time.monotonic() - started
    with Registry.open(registry_path(hub), readonly=True) as registry:
        # The relay's time: from its first lease (nodes answer their profile queries first) to its stop.
        start = min(lease.issued for lease in registry.leases())
        end = registry.checkpoint(0).created + result["sim_seconds"]  # the virtual clock began as the hub opened
        contributions = registry.contributions()
        bases = len(registry.checkpoints())
        holders = len({lease.holder for lease in registry.leases()})
    span = end - start
    judged = [c for c in contributions if c.judged_base_version is not None]
    thirds = []
    for k in range(3):
        rows = [c for c in judged if min(int(3 * (c.received - start) / span), 2) == k]
        accepted = sum(c.decision == "accepted" for c in rows)
        thirds.append({"judged": len(rows), "accepted": accepted,
                       "share": round(accepted / len(rows), 3) if rows else None})
    first, last = thirds[0]["share"], thirds[2]["share"]
    ratio = None if not first or last is None else round(last / first, 3)
    reasons: dict[str, int] = {}
    for c in judged:
        if c.decision == "rejected":
            reasons[_why(c.reason)] = reasons.get(_why(c.reason), 0) + 1
    return {
        "gate": gate, "overrides": run_config["overrides"], "wall_s": round(wall, 1),
        "relay_hours": round(span / 3600, 2), "judged": len(judged), "contributors_leased": holders,
        "unjudged": len(contributions) - len(judged), "thirds": thirds, "last_over_first": ratio,
        "goal_met": first is not None and last is not None and last >= GOAL * first,
        "rejected_by_reason": reasons, "base_versions": bases,
        "loss_mean_start": _mean(result.get("initial_losses")), "loss_mean_end": _mean(result.get("losses")),
    }


def _why(reason: str) -> str:
    """A rejection's kind: worse beyond tolerance on another language, no better on its own, or its code."""
    if "worse beyond tolerance" in reason:
        return "worse on another language"
    if reason.startswith("loss ") and "needs" in reason:
        return "no better on its own language"
    return reason.split(":", 1)[0]


def _mean(losses: dict[str, float] | None) -> float | None:
    return round(sum(losses.values()) / len(losses), 4) if losses else None


def show(run: dict[str, Any]) -> None:
    thirds = "  ".join(f"{t['accepted']:>3}/{t['judged']:<3} = {t['share'] if t['share'] is not None else '-':<5}"
                       for t in run["thirds"])
    print(f"{run['gate']:<13} {thirds}  last/first {run['last_over_first']}  "
          f"{'goal met' if run['goal_met'] else 'GOAL MISSED'}")
    print(f"{'':<13} rejected: {run['rejected_by_reason'] or 'none'}; base versions {run['base_versions']}; "
          f"mean held-out loss {run['loss_mean_start']} -> {run['loss_mean_end']}")
    print(f"{'':<13} {run['contributors_leased']} contributors got leases; {run['relay_hours']} simulated h of relay "
          f"in {run['wall_s']} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gates", default="default,check-others", help=f"comma-separated: {', '.join(GATES)}")
    parser.add_argument("--hours", type=float, default=1.0, help="simulated hours of relay")
    parser.add_argument("--contributors", type=int, default=8)
    parser.add_argument("--languages", default="hi,ta,mr,de")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps a lease")
    parser.add_argument("--speed", type=float, default=0.05,
                        help="median steps a simulated second (0.05: a 5-step lease takes about 100 s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overrides", default="", help="more Hydra overrides for every run")
    parser.add_argument("--out", type=Path, help="keep the hubs here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="write the numbers as JSON")
    args = parser.parse_args(argv)
    gates = [g for g in args.gates.split(",") if g]
    unknown = sorted(set(gates) - set(GATES))
    if unknown:
        parser.error(f"--gates names {unknown}; allowed: {', '.join(GATES)}")

    torch.set_num_threads(1)  # reproducible and fair on a shared machine
    logging.getLogger("fedem_flwr").setLevel(logging.WARNING)
    runs = []
    with tempfile.TemporaryDirectory(prefix="fedem-keeps-learning-") as tmp:
        folder = args.out or Path(tmp)
        print(f"{'gate':<13} {'accepted/judged = share, by third of ' + format(args.hours, 'g') + ' simulated h'}")
        for gate in gates:
            runs.append(simulate(gate, args, folder))
            show(runs[-1])
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2, sort_keys=True) + "\n")
    default = next((r for r in runs if r["gate"] == "default"), None)
    if default is None:
        return 0
    print(f"\nGoal (default gate): last third's accept share >= {GOAL} x the first's: "
          f"{'met' if default['goal_met'] else 'MISSED'}")
    return 0 if default["goal_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
