"""The real app deployed on loopback: a `flower-superlink` and `flower-supernode`s, each with its own
data files and languages in `--node-config`, as contributors would run them, and one that claims a
simulated node's `partition-id` (on a SuperLink that names nobody: nodes are known by their key)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedem_flwr.config import load_config
from fedem_flwr.data.corpus import load_corpus
from fedem_flwr.hub.registry import Registry
from fedem_flwr.testing.flower import (
    local_superlink,
    run_logs,
    submit_run,
    supernodes,
    wait_for_nodes,
    wait_for_run,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

APP_DIR = Path(__file__).resolve().parent.parent


def _write_contributor_data(folder: Path, languages: list[str]) -> Path:
    """A contributor's own JSONL file (``text``, ``language``), cut from the demo corpus."""
    corpus = load_corpus(load_config([f"data.languages=[{','.join(languages)}]"]).data)
    folder.mkdir(parents=True)
    path = folder / "mine.jsonl"
    with open(path, "w", encoding="utf-8") as out:
        for row in corpus:
            out.write(json.dumps({"text": row["text"], "language": row["language"]}, ensure_ascii=False) + "\n")
    return path


def test_relay_over_real_supernodes_with_their_own_data(tmp_path):
    # Prepare
    hub = tmp_path / "hub"
    nodes = [
        {"data-path": str(_write_contributor_data(tmp_path / "alice", ["hi", "mr"])), "languages": "hi,mr",
         "cache-dir": str(tmp_path / "alice-cache")},
        {"data-path": str(_write_contributor_data(tmp_path / "bob", ["ta"])), "languages": "ta",
         "cache-dir": str(tmp_path / "bob-cache")},
    ]
    # Mallory has no data of her own and claims partition 0, as a simulated node would.
    mallory = {"partition-id": 0, "num-partitions": 2, "cache-dir": str(tmp_path / "mallory-cache")}
    overrides = ("data.languages=[hi,mr,ta] train.max_steps=6 train.batch_size=4 train.progress=false "
                 "relay.max_accepted=4 relay.max_wall_s=420 relay.lease_ttl_s=600")

    # Execute
    with local_superlink(tmp_path / "flwr") as link, \
            supernodes(link.address, [*nodes, mallory], flwr_home=tmp_path / "flwr"):
        wait_for_nodes(link, 3, timeout=120)
        run_id = submit_run(APP_DIR, link, {"hub": str(hub), "overrides": overrides})
        status = wait_for_run(link, run_id, timeout=540)
        logs = run_logs(link, run_id)

    # Assert
    assert status["status"] == "finished:completed", logs[-4000:]
    with Registry.open(hub, readonly=True) as registry:
        accepted = [c for c in registry.contributions() if c.decision == "accepted"]
        assert len(accepted) >= 4
        served = {lease.adapter for lease in registry.leases()}
        assert served <= {"hi", "mr", "ta"} and "ta" in served
        # Flower 1.42 gives every SuperNode a key pair: contributors are keyed by it, never by the
        # partition-id a node reports (Mallory's trains fail without hub rows; she is not `sim:0`).
        identities = set(registry.identities().values())
        assert len(identities) == 3 and all(i.startswith(("pk:", "node:")) for i in identities)
        assert all(lease.holder in identities for lease in registry.leases())
    # Each node cached the base once, by digest.
    for node in nodes:
        assert len(list((Path(node["cache-dir"]) / "bases").iterdir())) == 1
