"""Open the hub for relaying: seed the base checkpoint and the adapter pool when empty, and build
the coordinator with its blind-evaluation workbench. No Flower here: the ServerApp, simulations and
tests all start the hub the same way.

The seed (base v0) is recorded with its held-out losses, as every published base is, so every curve
of held-out loss over base versions starts at v0; they are measured on the hub's keyed held-out split,
which needs the seed's tokenizer, so v0's registry row is added once its files are stored and measured.
"""

from __future__ import annotations

import logging
import math
import random
import tempfile
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import datasets

from fedem_flwr.config.loader import config_to_dict
from fedem_flwr.config.schema import FedemConfig
from fedem_flwr.data.blocks import HeldoutSplit, without
from fedem_flwr.data.corpus import CHAT as CHAT_COLUMN
from fedem_flwr.data.corpus import DOMAIN, LANGUAGE, column, language_sizes, load_corpus
from fedem_flwr.data.partition import partition
from fedem_flwr.data.tasks import CHAT, AdapterTerms, terms_of_entry
from fedem_flwr.errors import ConfigError
from fedem_flwr.gate.evaluator import HubWorkbench
from fedem_flwr.hub.lineage import write_adapter_card
from fedem_flwr.hub.model_card import base_card, write_card
from fedem_flwr.hub.optimizer_states import OptimizerStates
from fedem_flwr.hub.paths import registry_path
from fedem_flwr.hub.records import Checkpoint, revision_name
from fedem_flwr.hub.registry import Registry
from fedem_flwr.hub.settings import check_and_record
from fedem_flwr.hub.store import ArtifactRef, ArtifactStore, adapter_repo, base_repo
from fedem_flwr.hub.stores import open_store
from fedem_flwr.lineage.heldout import refresh_parent_losses, split_corpus, split_id
from fedem_flwr.model.factory import build_model, load_base, save_base
from fedem_flwr.model.tokenizer import has_chat_template, load_tokenizer
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
    coordinator: RelayCoordinator
    cfg: FedemConfig
    corpus: datasets.Dataset
    split: HeldoutSplit
    split_id: str  # names the held-out split in use (``lineage.heldout.split_id``)
    _rows: dict[tuple[int, int], datasets.Dataset] = field(default_factory=dict, init=False, repr=False)

    @property
    def workbench(self) -> HubWorkbench:
        """The blind evaluator on the newest base: the coordinator's, which adopts each new base."""
        return self.coordinator.workbench

    def training_rows(self, partition_id: int, num_partitions: int) -> datasets.Dataset:
        """The rows simulated node ``partition_id`` of ``num_partitions`` trains on (``text``, ``language``).

        Its partition of the full corpus, computed as the node computes it for its profile, less the
        hub's held-out rows, which only the hub can tell (the split is keyed). Cached per partition.
        """
        key = (partition_id, num_partitions)
        if key not in self._rows:
            data = self.cfg.data
            part = partition(self.corpus, data.partitioner, num_partitions, partition_id, self.cfg.seed,
                             data.dirichlet_alpha)
            self._rows[key] = without(part, self.split.withheld)
        return self._rows[key]


def open_hub(cfg: FedemConfig, hub_path: Path, clock: Callable[[], float] = time.time) -> Hub:
    """Open registry and store, seed what is missing, and build the relay coordinator.

    Deterministic given ``cfg.seed``: the model, the fresh LoRA and the policy each take it.
    """
    registry = Registry.open(registry_path(hub_path))
    store = open_store(hub_path, cfg.hub.store, repo_prefix=cfg.hub.repo_prefix, private=cfg.hub.private)
    check_and_record(registry, cfg, store, hub_path, now=clock())
    corpus = load_corpus(cfg.data)

    base = registry.latest_checkpoint()
    seed = seed_base(cfg, store, corpus) if base is None else base.ref
    model, tokenizer = load_base(str(store.get(seed)))
    split, fingerprint = split_corpus(cfg, registry, corpus, tokenizer)  # keyed: only the hub can rebuild it
    workbench = build_workbench(cfg, model, tokenizer.pad_token_id, split.heldout)
    bare = None  # the base's own held-out losses (a fresh LoRA has B = 0), when measured here
    if base is None:
        bare = workbench.evaluate(workbench.initial_state)
        base = record_seed(cfg, registry, seed, bare, split_id(fingerprint), clock)
    # Parents' losses come from the held-out set in use: evaluated again when the split changed.
    refresh_parent_losses(registry, store, workbench.evaluate, fingerprint, clock, base.version)
    sizes = language_sizes(corpus)
    check_catalog(cfg, corpus, tokenizer, workbench.heldout, sizes)
    seed_adapters(cfg, registry, store, workbench, sizes, base, clock, bare=bare)

    rng = random.Random(cfg.seed)
    coordinator = RelayCoordinator(
        registry, store, make_policy(cfg.relay.policy, rng, fallback=cfg.relay.policy_fallback,
                                     max_lead=cfg.relay.fair_max_lead), workbench,
        lease_ttl_s=cfg.relay.lease_ttl_s, sweep_interval_s=cfg.relay.sweep_interval_s,
        gate=cfg.gate, clock=clock, train=cfg.train, optimizer_states=OptimizerStates(hub_path),
        max_push_tokens=max_push_tokens(cfg), lanes=cfg.relay.lanes,
        lane_update=cfg.relay.lane_update, staleness_power=cfg.relay.staleness_power, catalog=cfg.catalog,
        block_size=cfg.data.block_size,
    )
    return Hub(hub_path, registry, store, coordinator, cfg, corpus, split, split_id(fingerprint))


def max_push_tokens(cfg: FedemConfig) -> int:
    """The most tokens one lease can train: what a node's reported ``tokens`` is clamped to."""
    return cfg.train.max_steps * cfg.train.batch_size * cfg.train.grad_accum * cfg.data.block_size


def build_workbench(cfg: FedemConfig, model: Any, pad_id: int, heldout: Any) -> HubWorkbench:
    """The blind evaluator of pushes on ``model`` (a base): on the hub's GPU when it has one (`train.device`)."""
    return HubWorkbench(
        model.to(pick_device(cfg.train.device)), cfg.lora, heldout, pad_id=pad_id,
        batch_size=cfg.train.eval_batch_size, max_blocks=cfg.gate.max_eval_blocks, seed=cfg.seed,
        resolved_config=config_to_dict(cfg),
    )


def seed_base(cfg: FedemConfig, store: ArtifactStore, corpus: Any) -> ArtifactRef:
    """The files of base version 0: built from the model config (or loaded from ``model.pretrained``).

    Stored before its registry row (``record_seed``): a crash between the two leaves an orphan that
    the next seeding replaces."""
    tokenizer = load_tokenizer(cfg.tokenizer, corpus["text"] if cfg.tokenizer.bpe_merges else None)
    model = build_model(cfg.model, tokenizer, seed=cfg.seed)
    repo = base_repo(cfg.hub.repo_prefix)
    with tempfile.TemporaryDirectory(prefix="fedem-base-") as tmp:
        save_base(model, tokenizer, Path(tmp), config_to_dict(cfg))
        write_card(Path(tmp), base_card(store.repo_id(repo), 0, None, "init"))
        return store.put(repo, revision_name(0), Path(tmp), message=f"{cfg.model.name}: initial base checkpoint",
                         replace_orphan=True)  # seeding: the registry has no checkpoint


def record_seed(cfg: FedemConfig, registry: Registry, ref: ArtifactRef, losses: Mapping[str, float], split: str,
                clock: Callable[[], float]) -> Checkpoint:
    """Record the stored seed as base version 0 with its held-out ``losses`` (the finite ones) and the
    held-out ``split`` they were measured on."""
    heldout = {lang: float(loss) for lang, loss in losses.items() if math.isfinite(loss)}
    row = registry.add_checkpoint(
        parent=None, source="init", repo=ref.repo, revision=ref.revision, digest=ref.digest,
        metrics={"heldout": heldout, "heldout-split": split}, created=clock(),
    )
    log.info("Seeded base checkpoint v%d (%s) at %s@%s", row.version, cfg.model.name, ref.repo, ref.revision)
    return row


def seed_adapters(
    cfg: FedemConfig,
    registry: Registry,
    store: ArtifactStore,
    workbench: HubWorkbench,
    sizes: Mapping[str, int],
    base: Any,
    clock: Callable[[], float],
    *,
    bare: Optional[Mapping[str, float]] = None,
) -> list[str]:
    """The catalog's adapters that are not registered yet: with ``catalog.per_language`` one language
    adapter per language with enough text and held-out data, and every declared one (checked first
    against the corpus by ``check_catalog``; ``sizes``: the corpus's ``language_sizes``). Version 0 is a
    fresh LoRA, which scores the base itself (``bare``: those losses, when already measured)."""
    existing = {a.name for a in registry.adapters()}
    wanted = [terms for terms in catalog_terms(cfg, sizes, workbench.heldout) if terms.name not in existing]
    if not wanted:
        return []
    losses = dict(bare) if bare is not None else workbench.evaluate(workbench.initial_state)
    base_ref = ArtifactRef(store.repo_id(base.repo), base.revision, base.digest)
    for terms in wanted:
        repo = adapter_repo(cfg.hub.repo_prefix, terms.name)
        with tempfile.TemporaryDirectory(prefix="fedem-adapter-") as tmp:
            workbench.save(workbench.initial_state, Path(tmp), base_ref)
            write_adapter_card(Path(tmp), registry, store, repo=repo, adapter=terms.name, version=0,
                               base_version=base.version, parent_version=None, kind="fresh", heldout=losses,
                               languages=list(terms.languages), task=terms.task)
            ref = store.put(repo, revision_name(0), Path(tmp), message=f"{terms.name}: fresh LoRA",
                            replace_orphan=True)  # a new adapter: the registry has no version of it
        with registry.atomic():
            registry.add_adapter(name=terms.name, languages=list(terms.languages), task=terms.task,
                                 lora_spec=asdict(cfg.lora), created=clock())
            registry.add_adapter_version(
                adapter=terms.name, base_version=base.version, parent_version=None, repo=ref.repo,
                revision=ref.revision, digest=ref.digest, metrics={"heldout": losses}, created=clock(),
            )
    log.info("Seeded %d adapter(s): %s", len(wanted), ", ".join(terms.name for terms in wanted))
    return [terms.name for terms in wanted]


def catalog_terms(cfg: FedemConfig, sizes: Mapping[str, int], heldout: Collection[str]) -> list[AdapterTerms]:
    """Every adapter the catalog asks for: the language adapters (``catalog.per_language``: each
    language with at least ``data.min_language_bytes`` of text and held-out data), then the declared ones."""
    declared = [terms_of_entry(entry) for entry in cfg.catalog.adapters]
    names = {terms.name for terms in declared}
    languages = sorted(
        lang for lang, size in sizes.items()
        if cfg.catalog.per_language and size >= cfg.data.min_language_bytes and lang in heldout and lang not in names
    )
    return [AdapterTerms(lang, "causal-lm", (lang,)) for lang in languages] + declared


def check_catalog(cfg: FedemConfig, corpus: datasets.Dataset, tokenizer: Any, heldout: Collection[str],
                  sizes: Optional[Mapping[str, int]] = None) -> None:
    """Refuse a catalog that declares adapters this hub cannot train or judge, naming each problem."""
    problems = catalog_problems(cfg, corpus, tokenizer, heldout, sizes)
    if problems:
        raise ConfigError("the catalog (`catalog`) declares adapters this hub cannot train or judge:\n"
                          + "\n".join(f"  {p}" for p in problems))


def catalog_problems(cfg: FedemConfig, corpus: datasets.Dataset, tokenizer: Any, held: Collection[str],
                     sizes: Optional[Mapping[str, int]] = None) -> list[str]:
    """Why each declared adapter cannot be trained or judged here (none: all can). ``sizes``: the
    corpus's ``language_sizes``, when already counted."""
    entries = cfg.catalog.adapters
    if not entries:
        return []
    sizes = language_sizes(corpus) if sizes is None else sizes
    chats = chat_keys(corpus) if any(entry.data_format == CHAT for entry in entries) else set()
    problems = []
    for entry in entries:
        terms = terms_of_entry(entry)
        chat = terms.data_format == CHAT
        where = f"adapter {entry.name!r} ({entry.task}" + (f", domain {entry.domain!r}" if entry.domain else "") + ")"
        if entry.task != "causal-lm" and entry.name in sizes and cfg.catalog.per_language:
            problems.append(f"{where}: its name is the language adapter of {entry.name!r}; name it e.g. "
                            f"'{entry.name}-{entry.task}'")
        if chat and not has_chat_template(tokenizer):
            problems.append(f"{where}: the base's tokenizer has no chat template with role tokens (a hub seeded "
                            "with `tokenizer.chat=false` or a pretrained tokenizer without one)")
            continue
        for language, key in zip(terms.languages, terms.heldout_keys):
            if language not in sizes:
                problems.append(f"{where}: the corpus has no text in {language!r}; it holds {', '.join(sizes)}")
            elif chat and (language, entry.domain or None) not in chats:
                problems.append(f"{where}: the corpus has no conversations in {language!r}"
                                + (f" tagged {entry.domain!r}" if entry.domain else "")
                                + " (rows with a `messages` column; see README, \"Your data\")")
            elif key not in held:
                problems.append(f"{where}: no held-out data {key!r} to judge it on (its held-out rows give fewer "
                                f"than `data.min_heldout_blocks`={cfg.data.min_heldout_blocks} full blocks)")
    return problems


def chat_keys(corpus: datasets.Dataset) -> set[tuple[str, Optional[str]]]:
    """(language, domain) of every conversation in ``corpus``, and (language, None) for each language
    holding one: what ``sft-chat`` adapters train on."""
    if CHAT_COLUMN not in corpus.column_names:
        return set()
    languages = column(corpus, LANGUAGE)
    domains = column(corpus, DOMAIN) if DOMAIN in corpus.column_names else [""] * len(languages)
    keys: set[tuple[str, Optional[str]]] = set()
    for chat, language, domain in zip(column(corpus, CHAT_COLUMN), languages, domains):
        if chat:
            keys.update(((language, None), (language, domain)))
    return keys
