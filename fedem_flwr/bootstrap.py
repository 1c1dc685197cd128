"""Open the hub for relaying: seed the base checkpoint and the adapter pool when empty, and build
the coordinator with its blind-evaluation workbench. No Flower here: the ServerApp, simulations and
tests all start the hub the same way.
"""

from __future__ import annotations

import logging
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets

from fedem_flwr.config import DataConfig, FedemConfig, config_to_dict
from fedem_flwr.data.blocks import heldout_split
from fedem_flwr.data.corpus import language_sizes, load_corpus
from fedem_flwr.data.partition import partition
from fedem_flwr.gate.evaluator import HubWorkbench
from fedem_flwr.hub.paths import registry_path
from fedem_flwr.hub.records import revision_name
from fedem_flwr.hub.registry import Registry
from fedem_flwr.hub.store import ArtifactRef, ArtifactStore, adapter_repo, base_repo, open_store
from fedem_flwr.model.factory import build_model, load_base, save_base
from fedem_flwr.model.tokenizer import load_tokenizer
from fedem_flwr.relay.coordinator import RelayCoordinator
from fedem_flwr.relay.policies import make_policy
from fedem_flwr.training.device import pick_device

log = logging.getLogger(__name__)


@dataclass
class Hub:
    """The hub's open state for one ServerApp run."""

    path: Path
    registry: Registry
    store: ArtifactStore
    workbench: HubWorkbench
    coordinator: RelayCoordinator

    def training_rows(self, partition_id: int, num_partitions: int) -> datasets.Dataset:
        """The rows simulated node ``partition_id`` of ``num_partitions`` trains on: its partition of
        the training side of the hub's split, so it never sees a held-out row."""
        from transformers import AutoTokenizer

        resolved = self.workbench.resolved_config or {}
        data, seed = DataConfig(**resolved["data"]), int(resolved["seed"])
        base = self.registry.latest_checkpoint()
        tokenizer = AutoTokenizer.from_pretrained(str(self.store.get(ArtifactRef(base.repo, base.revision, base.digest))))
        rows, _ = heldout_split(
            load_corpus(data), data.heldout_fraction, data.min_heldout_blocks, data.block_size, tokenizer, seed
        )
        return partition(rows, data.partitioner, num_partitions, partition_id, seed, data.dirichlet_alpha)


def open_hub(cfg: FedemConfig, hub_path: Path, clock: Callable[[], float] = time.time) -> Hub:
    """Open registry and store, seed what is missing, and build the relay coordinator.

    Deterministic given ``cfg.seed``: the model, the fresh LoRA and the policy each take it.
    """
    registry = Registry.open(registry_path(hub_path))
    store = open_store(hub_path, cfg.hub.store, repo_prefix=cfg.hub.repo_prefix)
    corpus = load_corpus(cfg.data)

    base = registry.latest_checkpoint() or seed_base(cfg, registry, store, corpus, clock)
    model, tokenizer = load_base(str(store.get(ArtifactRef(base.repo, base.revision, base.digest))))
    _, heldout = heldout_split(
        corpus, cfg.data.heldout_fraction, cfg.data.min_heldout_blocks, cfg.data.block_size, tokenizer, cfg.seed
    )
    # The hub evaluates every push: on its GPU when it has one (`train.device`).
    workbench = HubWorkbench(
        model.to(pick_device(cfg.train.device)), cfg.lora, heldout, pad_id=tokenizer.pad_token_id,
        batch_size=cfg.train.eval_batch_size, max_blocks=cfg.gate.max_eval_blocks, seed=cfg.seed,
        resolved_config=config_to_dict(cfg),
    )
    seed_adapters(cfg, registry, store, workbench, language_sizes(corpus), base, clock)

    rng = random.Random(cfg.seed)
    coordinator = RelayCoordinator(
        registry, store, make_policy(cfg.relay.policy, rng, fallback=cfg.relay.policy_fallback), workbench,
        lease_ttl_s=cfg.relay.lease_ttl_s, sweep_interval_s=cfg.relay.sweep_interval_s,
        gate=cfg.gate, clock=clock,
    )
    return Hub(hub_path, registry, store, workbench, coordinator)


def seed_base(cfg: FedemConfig, registry: Registry, store: ArtifactStore, corpus: Any, clock: Callable[[], float]):
    """Base version 0: built from the model config (or loaded from ``model.pretrained``)."""
    tokenizer = load_tokenizer(cfg.tokenizer, corpus["text"] if cfg.tokenizer.bpe_merges else None)
    model = build_model(cfg.model, tokenizer, seed=cfg.seed)
    repo = base_repo(cfg.hub.repo_prefix)
    with tempfile.TemporaryDirectory(prefix="fedem-base-") as tmp:
        save_base(model, tokenizer, Path(tmp), config_to_dict(cfg))
        ref = store.put(repo, revision_name(0), Path(tmp), message=f"{cfg.model.name}: initial base checkpoint")
    row = registry.add_checkpoint(
        parent=None, source="init", repo=ref.repo, revision=ref.revision, digest=ref.digest,
        metrics={}, created=clock(),
    )
    log.info("Seeded base checkpoint v%d (%s) at %s@%s", row.version, cfg.model.name, ref.repo, ref.revision)
    return row


def seed_adapters(
    cfg: FedemConfig,
    registry: Registry,
    store: ArtifactStore,
    workbench: HubWorkbench,
    sizes: dict[str, int],
    base: Any,
    clock: Callable[[], float],
) -> list[str]:
    """One adapter per language with enough text and held-out data; version 0 is a fresh LoRA."""
    existing = {a.name for a in registry.adapters()}
    languages = sorted(
        lang for lang, size in sizes.items()
        if size >= cfg.data.min_language_bytes and lang in workbench.heldout and lang not in existing
    )
    if not languages:
        return []
    losses = workbench.evaluate(workbench.initial_state)
    base_ref = ArtifactRef(store.repo_id(base.repo), base.revision, base.digest)
    for language in languages:
        repo = adapter_repo(cfg.hub.repo_prefix, language)
        with tempfile.TemporaryDirectory(prefix="fedem-adapter-") as tmp:
            workbench.save(workbench.initial_state, Path(tmp), base_ref)
            ref = store.put(repo, revision_name(0), Path(tmp), message=f"{language}: fresh LoRA")
        with registry.atomic():
            registry.add_adapter(
                name=language, languages=[language], task="causal-lm", lora_spec=asdict(cfg.lora), created=clock()
            )
            registry.add_adapter_version(
                adapter=language, base_version=base.version, parent_version=None, repo=ref.repo,
                revision=ref.revision, digest=ref.digest, metrics={"heldout": losses}, created=clock(),
            )
    log.info("Seeded %d adapter(s): %s", len(languages), ", ".join(languages))
    return languages
