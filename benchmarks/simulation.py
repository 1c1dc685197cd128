"""Simulated contributions per wall-clock minute of the relay on the virtual clock, and where the time goes.

    python benchmarks/simulation.py                                   # 20 and 100 virtual contributors
    python benchmarks/simulation.py --contributors 100 --accepted 60 --save base.json
    python benchmarks/simulation.py --baseline base.json              # compare; exit 1 on a regression

Each size runs the whole app on Flower's simulation engine as a sweep cell does (the ServerApp's
relay with the blind gate on each contribution's own languages, ClientApps really fine-tuning the
tiny model on one Ray actor per core), until ``--accepted`` contributions were accepted. A
contribution is a judged push (accepted or rejected). The relay's rate is taken over the relay
loop alone; the run's rate also pays for the SuperLink, Ray and the hub's start and the final
evaluation. Where the time goes comes from the run's ``sim/result.json``: the nodes' training
(summed over the actors, which run side by side), the hub's judging of each push (blind evaluation,
artifact store and registry), the base keeper, and the hub waiting for replies that were due.

Goal: at least 30 contributions a minute with 100 virtual contributors on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's `simulations` package

from baseline import print_aligned, regressions  # noqa: E402

from simulations.cells import run_cell  # noqa: E402

GOAL_PER_MINUTE = 30.0
GOAL_CONTRIBUTORS = 100
METRICS = {"relay_contributions_per_minute": ("1/min", True), "run_contributions_per_minute": ("1/min", True)}


def measure(contributors: int, args: argparse.Namespace, out: Path) -> dict:
    overrides = (f"relay.max_accepted={args.accepted} train.max_steps={args.steps} gate.check_others=false "
                 f"merge.every_accepted=null merge.every_s=null {args.overrides}")
    cell = {"method": "relay", "contributors": contributors, "seed": args.seed, "overrides": overrides}
    status = run_cell(cell, out / f"n{contributors}", cell_cpus=args.cpus)
    if status["status"] != "ok":
        raise SystemExit(f"{contributors} contributors: {status['reason']} (in {out / f'n{contributors}'})")
    timing = status["timing"]
    judged = status["accepted"] + status["rejected"]
    relay_min = timing["relay_s"] / 60
    return {
        "contributors": contributors,
        "accepted": status["accepted"],
        "rejected": status["rejected"],
        "leases": status["leases"],
        "simulated_hours": round(status["sim_seconds"] / 3600, 2),
        "relay_contributions_per_minute": round(judged / relay_min, 1),
        "run_contributions_per_minute": round(judged / (status["cell_wall_s"] / 60), 1),
        "run_s": status["cell_wall_s"],
        "startup_and_final_s": round(status["cell_wall_s"] - timing["relay_s"], 1),
        "relay_s": round(timing["relay_s"], 1),
        "node_training_s": timing["node_training_s"],
        "hub_judging_s": timing.get("judging_s", 0.0),
        "hub_base_keeper_s": timing.get("base_keeper_s", 0.0),
        "hub_waiting_s": timing["waiting_for_nodes_s"],
        "final_evaluation_s": timing.get("final_evaluation_s", 0.0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contributors", default="20,100", help="comma-separated numbers of virtual contributors")
    parser.add_argument("--accepted", type=int, default=40, help="accepted contributions per run")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per lease")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="Ray CPUs: one ClientApp actor each")
    parser.add_argument("--overrides", default="", help="more Hydra overrides for every run")
    parser.add_argument("--out", type=Path, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--save", type=Path, help="write the numbers as a JSON baseline")
    parser.add_argument("--baseline", type=Path, help="compare with a saved JSON; exit 1 on a regression")
    parser.add_argument("--tolerance", type=float, default=0.3, help="allowed fraction worse than the baseline")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="fedem-bench-sim-") as tmp:
        out = args.out or Path(tmp)
        rows = [measure(int(n), args, out) for n in args.contributors.split(",")]
    keys = list(rows[0])
    print_aligned([["measure", *[f"{row['contributors']} contributors" for row in rows]],
                   *[[key, *[row[key] for row in rows]] for key in keys[1:]]])
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores")

    failed = []
    goal = [row for row in rows if row["contributors"] == GOAL_CONTRIBUTORS]
    if goal and goal[0]["relay_contributions_per_minute"] < GOAL_PER_MINUTE:
        failed.append(f"goal missed: {goal[0]['relay_contributions_per_minute']} contributions a minute with "
                      f"{GOAL_CONTRIBUTORS} contributors (goal {GOAL_PER_MINUTE:.0f})")
    results = {f"{name}@{row['contributors']}": row[name] for row in rows for name in METRICS}
    if args.baseline:
        baseline = json.loads(args.baseline.read_text())
        metrics = {key: METRICS[key.split("@")[0]] for key in results}
        failed += regressions(results, baseline, metrics, args.tolerance, fmt=",.1f")
    if args.save:
        args.save.write_text(json.dumps({"results": results, "rows": rows}, indent=2, sort_keys=True) + "\n")
    for line in failed:
        print(line)
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
