"""A real hub process for crash tests: the relay on the in-process Grid with the real ClientApp.

    python tests/hub_process.py HUB_DIR MAX_ACCEPTED [OVERRIDES]

Run from the repository root with it on PYTHONPATH. Prints one JSON line (accepted, rejected,
stopped_by) when the relay stops; a kill point (``FEDEM_KILL_AT``) ends it earlier on purpose.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from fedem_flwr.client_app import app as client_app
from fedem_flwr.config.loader import load_run_config
from fedem_flwr.relay.bootstrap import open_hub
from fedem_flwr.relay.strategy import RelayStrategy
from tests.support.fake_grid import InProcessGrid

OVERRIDES = (
    "data.languages=[hi] train.max_steps=8 train.batch_size=4 train.progress=false relay.lease_ttl_s=600 "
    "relay.poll_interval_s=0.001 relay.no_node_grace_s=0 relay.max_wall_s=120"
)


def main(hub_dir: str, max_accepted: str, overrides: str = "") -> None:
    torch.set_num_threads(1)
    hub_path = Path(hub_dir)
    run_config = {"overrides": f"{OVERRIDES} relay.max_accepted={max_accepted} {overrides}", "hub": str(hub_path)}
    cfg = load_run_config(run_config)
    hub = open_hub(cfg, hub_path)
    grid = InProcessGrid(client_app, {100: {"partition-id": 0, "num-partitions": 1,
                                            "cache-dir": str(hub_path.parent / "node-cache")}}, run_config)
    result = RelayStrategy(hub.coordinator, cfg.relay, hub.workbench.spec, max_steps=cfg.train.max_steps,
                           training_rows=hub.training_rows).start(grid)
    print(json.dumps({"accepted": result.accepted, "rejected": result.rejected, "stopped_by": result.stopped_by}))


if __name__ == "__main__":
    main(*sys.argv[1:])
