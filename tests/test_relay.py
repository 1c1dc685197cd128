"""The relay over an in-process Grid: leases, fenced pushes, blind gate, versions in registry and store."""

from __future__ import annotations

import time

import pytest

from fedem_flwr.bootstrap import open_hub
from fedem_flwr.client_app import app as client_app
from fedem_flwr.config import load_run_config
from fedem_flwr.relay.strategy import RelayStrategy
from fedem_flwr.testing.fake_grid import InProcessGrid

OVERRIDES = (
    "data.languages=[hi,ta,mr,de] train.max_steps=8 train.batch_size=4 train.progress=false "
    "relay.lease_ttl_s=600 relay.poll_interval_s=0 relay.no_node_grace_s=0 relay.max_accepted=4 "
    "relay.max_wall_s=120"
)


def _relay(tmp_path, overrides=OVERRIDES, nodes=2, kill=None):
    run_config = {"overrides": overrides, "hub": str(tmp_path / "hub")}
    cfg = load_run_config(run_config)
    hub = open_hub(cfg, tmp_path / "hub")
    node_configs = {
        100 + i: {"partition-id": i, "num-partitions": nodes, "cache-dir": str(tmp_path / f"cache-{i}")}
        for i in range(nodes)
    }
    grid = InProcessGrid(client_app, node_configs, run_config)
    if kill is not None:
        grid.kill(kill)
    strategy = RelayStrategy(hub.coordinator, cfg.relay, hub.workbench.spec, max_steps=cfg.train.max_steps)
    return hub, grid, strategy.start(grid)


def test_relay_advances_adapters_through_versions(tmp_path):
    # Execute
    hub, grid, result = _relay(tmp_path)

    # Assert
    registry = hub.registry
    assert result.accepted == 4, result
    assert result.stopped_by == "4 accepted contributions"
    versions = registry.adapter_versions()
    assert sum(1 for v in versions if v.version > 0) == 4
    for version in versions:
        if version.version == 0:
            continue
        parent = next(p for p in versions if p.adapter == version.adapter and p.version == version.parent_version)
        language = registry.adapter(version.adapter).languages[0]
        assert version.metrics["heldout"][language] <= parent.metrics["heldout"][language]
    assert not registry.leases(active_only=True)
    leases = registry.leases()
    assert len({lease.token for lease in leases}) == len(leases)
    # The base travelled once per node, then came from the node's cache.
    assert sum(1 for m in grid.delivered if "base-files" in m.content) == 2


def test_leases_never_overlap_on_an_adapter(tmp_path):
    hub, _, _ = _relay(tmp_path)
    by_adapter = {}
    for lease in hub.registry.leases():
        by_adapter.setdefault(lease.adapter, []).append(lease)
    for leases in by_adapter.values():
        leases.sort(key=lambda lease: lease.issued)
        for earlier, later in zip(leases, leases[1:]):
            assert earlier.ended is not None and earlier.ended <= later.issued


def test_gone_node_stops_relay_after_grace(tmp_path):
    hub, _, result = _relay(tmp_path, OVERRIDES.replace("relay.max_accepted=4", "relay.max_accepted=2"), kill=101)
    assert result.accepted == 2
    assert all(lease.holder != "node:101" or lease.state != "active" for lease in hub.registry.leases())


def test_restart_resumes_from_registry(tmp_path):
    hub, _, first = _relay(tmp_path, OVERRIDES.replace("relay.max_accepted=4", "relay.max_accepted=2"))
    before = {v.adapter: v.version for v in hub.registry.adapter_versions()}
    hub.registry.close()
    hub2, _, second = _relay(tmp_path, OVERRIDES.replace("relay.max_accepted=4", "relay.max_accepted=2"))
    after = hub2.registry.adapter_versions()
    assert second.accepted == 2
    assert sum(1 for v in after if v.version > 0) == 4
    assert max(v.version for v in after) >= max(before.values())
