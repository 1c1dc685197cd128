"""Contributions per minute of a `flwr run` simulation with many virtual clients and the tiny model.

    python benchmarks/relay_simulation.py --supernodes 50 --max-accepted 20 [--save FILE] [--baseline FILE]

The whole app runs (ServerApp relay with blind evaluation, ClientApp fine-tuning) on Flower's
simulation engine; the number is read from the hub's registry afterwards. On two cores the Ray
actor pool (one CPU each) bounds the throughput, not the number of virtual clients.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

from fedem_flwr.hub.registry import Registry
from fedem_flwr.launch.local import run_app
from fedem_flwr.report import summary

APP_DIR = Path(__file__).resolve().parent.parent


def measure(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="fedem-bench-") as tmp:
        hub = Path(tmp) / "hub"
        overrides = (f"relay.max_accepted={args.max_accepted} relay.max_wall_s={args.max_wall_s} "
                     f"train.max_steps={args.steps} train.progress=false")
        with open(Path(tmp) / "flwr.log", "w") as log_file:
            outcome = run_app(
                APP_DIR, flwr_home=Path(tmp) / "flwr",
                federation_config=f"num-supernodes={args.supernodes} client-resources-num-cpus=1",
                run_config={"hub": str(hub), "overrides": overrides}, log_output=log_file,
                echo=lambda line: print(line, file=sys.stderr),
            )
        if not outcome.ok:
            raise SystemExit(outcome.summary())
        with Registry.open(hub, readonly=True) as registry:
            result = summary(registry)
    return {
        "supernodes": args.supernodes,
        "steps_per_lease": args.steps,
        "accepted": result["accepted"],
        "rejected": result["rejected"],
        "leases": result["leases"],
        "relay_seconds": round(result["seconds"], 1),
        "run_seconds": round(outcome.seconds, 1),
        "contributions_per_minute": round(result["contributions_per_minute"], 2),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--supernodes", type=int, default=50)
    parser.add_argument("--max-accepted", type=int, default=20)
    parser.add_argument("--max-wall-s", type=float, default=1200)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--save", type=Path)
    parser.add_argument("--baseline", type=Path)
    args = parser.parse_args()

    result = measure(args)
    for key, value in result.items():
        print(f"{key:>26}: {value}")
    if args.baseline:
        base = json.loads(args.baseline.read_text())
        ratio = result["contributions_per_minute"] / max(base["contributions_per_minute"], 1e-9)
        print(f"{'vs baseline':>26}: {ratio:.2f}x contributions/min ({base['contributions_per_minute']})")
    if args.save:
        args.save.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
