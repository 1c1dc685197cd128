"""Shared pieces for relay tests: a fake clock, a scripted workbench and a seeded hub."""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from fedem_flwr.config.schema import GateConfig
from fedem_flwr.hub.registry import Registry
from fedem_flwr.hub.store import ArtifactRef, LocalStore
from fedem_flwr.relay.coordinator import RelayCoordinator
from fedem_flwr.relay.policies import make_policy

TTL = 100.0
LANGUAGES = ("hi", "ta")


class FakeClock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class ScriptedWorkbench:
    """Held-out loss on every language is read from the adapter weights: ``w[0]``."""

    weights = None  # the gate takes a plain mean over the adapter's languages
    heldout = dict.fromkeys(LANGUAGES)  # the languages it holds out

    def evaluate(self, state, languages=None):
        return {language: float(state["w"][0]) for language in languages or LANGUAGES}

    def save(self, state, folder: Path, base: ArtifactRef) -> None:
        (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base.repo}))
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "adapter_model.safetensors"))


def seeded_coordinator(tmp_path: Path, clock: FakeClock, policy: str = "language", loss: float = 4.0,
                       extra: Optional[Mapping[str, torch.Tensor]] = None, store=None, workbench=None,
                       gate: Optional[GateConfig] = None, lanes: int = 1):
    """A hub with base v0 and adapters ``hi`` and ``ta`` at v0 (held-out loss ``loss``); ``extra``
    tensors (e.g. a LoRA pair) are stored in every v0 beside ``w``. ``store`` defaults to a
    ``LocalStore`` under ``tmp_path``; the coordinator judges with ``workbench`` (default: the scripted
    one that seeded the hub) under ``gate``, with ``lanes`` holders per adapter at most."""
    registry = Registry.open(tmp_path / "registry.sqlite")
    store = store if store is not None else LocalStore(tmp_path / "store")
    seeding = ScriptedWorkbench()
    seed = tmp_path / "seed"
    seed.mkdir(exist_ok=True)
    (seed / "config.json").write_text("{}")
    base = store.put("t/base", "v0", seed, message="seed")
    registry.add_checkpoint(None, "init", base.repo, base.revision, base.digest, {}, clock())
    for name in LANGUAGES:
        folder = tmp_path / f"fresh-{name}"
        folder.mkdir()
        seeding.save({"w": torch.tensor([loss]), **(extra or {})}, folder, base)
        ref = store.put(f"t/adapter-{name}", "v0", folder, message="fresh")
        registry.add_adapter(name, [name], "causal-lm", {}, clock())
        registry.add_adapter_version(name, 0, None, ref.repo, ref.revision, ref.digest,
                                     {"heldout": seeding.evaluate({"w": torch.tensor([loss])})}, clock())
    coordinator = RelayCoordinator(
        registry, store, make_policy(policy, random.Random(0)), workbench if workbench is not None else seeding,
        lease_ttl_s=TTL, sweep_interval_s=10, gate=gate, clock=clock, lanes=lanes,
    )
    return coordinator, registry, store


def assert_consistent(coordinator: RelayCoordinator, registry: Registry, store) -> None:
    """The lease table agrees with the coordinator's leases, and every adapter's stored revisions are
    exactly its recorded versions, each readable with its digest (no accepted version lost, no orphan)."""
    active = registry.leases(active_only=True)
    assert coordinator.leased_adapters() == {lease.adapter for lease in active}
    for lease in registry.leases():
        assert coordinator.lease(lease.token) == lease
    for adapter in registry.adapters():
        versions = registry.adapter_versions(adapter.name)
        assert [v.version for v in versions] == list(range(len(versions)))
        for version in versions:
            store.get(ArtifactRef(version.repo, version.revision, version.digest))
        assert store.revisions(versions[0].repo) == [v.revision for v in versions]


def seed_real_hub(tmp_path: Path, workbench, clock: FakeClock):
    """A registry and store holding base v0 and adapter ``hi`` v0, saved and scored by ``workbench``
    (a real ``HubWorkbench`` or one built on it)."""
    registry = Registry.open(tmp_path / "registry.sqlite")
    store = LocalStore(tmp_path / "store")
    (tmp_path / "seed").mkdir()
    (tmp_path / "seed" / "config.json").write_text("{}")
    base = store.put("t/base", "v0", tmp_path / "seed", message="seed")
    registry.add_checkpoint(None, "init", base.repo, base.revision, base.digest, {}, clock())
    workbench.save(workbench.initial_state, tmp_path / "fresh", base)
    ref = store.put("t/adapter-hi", "v0", tmp_path / "fresh", message="fresh")
    registry.add_adapter("hi", ["hi"], "causal-lm", {}, clock())
    registry.add_adapter_version("hi", 0, None, ref.repo, ref.revision, ref.digest,
                                 {"heldout": workbench.evaluate(workbench.initial_state)}, clock())
    return registry, store


# A real hub whose relay and CPT finish in seconds on a CPU (base keeper and site tests).
KEEPER_OVERRIDES = (
    "data.languages=[hi,ta,mr,de] train.max_steps=8 train.batch_size=4 train.progress=false "
    "relay.lease_ttl_s=600 relay.poll_interval_s=0.001 relay.no_node_grace_s=0 relay.max_wall_s=300 "
    "cpt.slice_s=0.5 cpt.checkpoint_every=15 cpt.lr=1e-3 cpt.warmup_steps=2 cpt.batch_size=4"
)


def open_real_hub(tmp_path: Path, overrides: str):
    """A real hub in ``tmp_path/hub`` (tiny model, real workbench) and the run config that opened it."""
    from fedem_flwr.config.loader import load_run_config
    from fedem_flwr.relay.bootstrap import open_hub

    run_config = {"overrides": overrides, "hub": str(tmp_path / "hub")}
    return open_hub(load_run_config(run_config), tmp_path / "hub"), run_config


def relay_in_process(hub, run_config, tmp_path: Path, keeper=None, nodes: int = 2):
    """Relay ``hub`` with ``nodes`` simulated nodes running the real ClientApp on the in-process Grid."""
    from fedem_flwr.client_app import app as client_app
    from fedem_flwr.relay.strategy import RelayStrategy
    from tests.support.fake_grid import InProcessGrid

    node_configs = {
        100 + i: {"partition-id": i, "num-partitions": nodes, "cache-dir": str(tmp_path / f"cache-{i}")}
        for i in range(nodes)
    }
    grid = InProcessGrid(client_app, node_configs, run_config)
    strategy = RelayStrategy(hub.coordinator, hub.cfg.relay, hub.workbench.spec, max_steps=hub.cfg.train.max_steps,
                             training_rows=hub.training_rows,
                             between_turns=keeper.turn if keeper is not None else None)
    return strategy.start(grid)
