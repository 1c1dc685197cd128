"""The hub's held-out set: split with a key only the hub holds, fingerprinted in the registry, and
the gate's reference losses evaluated again when the split changes.

The split (``fedem_flwr.data.blocks``) is keyed with ``registry.derived_key("heldout-split")``, derived
from the hub's secret, so no node can tell which rows the hub evaluates on. What shapes the split is
recorded as the ``heldout-split`` setting: the key's id (a hash of the key, never the key), the
fraction, the minimum blocks, the block size, the languages held out, and digests of the corpus, the
tokenizer and the withheld rows; with a study's test split (``data.test_fraction`` > 0) also its
fraction and languages (absent at 0, so a hub without one keeps its fingerprint). The catalog's task
adapters add held-out sets of their own (``en:chat``: the held-out conversations, scored on the
assistant's turns); drawn from the same held-out rows, they move no language's split, and they are
named in the fingerprint's ``languages`` like the languages' own.

When that record differs at start (``data.heldout_fraction`` or the corpus changed, or the hub predates
keyed splits), each adapter's latest version -- the parent the gate compares the next push with -- is
evaluated again on the new held-out set, and ``Registry.update_version_heldout`` replaces its
``metrics["heldout"]`` (the old losses stay in the version's metrics, with the split they came from).
Replaced in place rather than recorded beside: the gate reads the parent's ``metrics["heldout"]``, and
losses from another held-out set would judge the next push against other texts.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Callable
from typing import Any, Optional

import datasets

from fedem_flwr.config.schema import FedemConfig
from fedem_flwr.data.blocks import HeldoutSplit, heldout_split
from fedem_flwr.data.corpus import corpus_digest
from fedem_flwr.data.tasks import DataKey, parse_key, terms_of_entry
from fedem_flwr.hub.registry import Registry
from fedem_flwr.hub.store import ArtifactStore
from fedem_flwr.model.lora import read_adapter_state

log = logging.getLogger(__name__)

SETTING = "heldout-split"
KEY_PURPOSE = "heldout-split"


def split_corpus(cfg: FedemConfig, registry: Registry, corpus: datasets.Dataset, tokenizer) -> tuple[HeldoutSplit, dict]:
    """The hub's keyed split of ``corpus`` and its fingerprint (what the ``heldout-split`` setting records)."""
    key = registry.derived_key(KEY_PURPOSE)
    data = cfg.data
    split = heldout_split(corpus, data.heldout_fraction, data.min_heldout_blocks, data.block_size, tokenizer, key,
                          test_fraction=data.test_fraction, extra_keys=task_keys(cfg))
    fingerprint = {
        "key-id": hmac.new(key, b"key-id", hashlib.sha256).hexdigest()[:16],
        "fraction": data.heldout_fraction,
        "min-blocks": data.min_heldout_blocks,
        "block-size": data.block_size,
        "languages": sorted(split.heldout),
        "corpus": corpus_digest(corpus),
        "tokenizer": tokenizer_digest(tokenizer),
        "withheld": _sha256("\x00".join(f"{lang}\x00{text}" for lang, text in sorted(split.withheld))),
    }
    if data.test_fraction:  # only then: a hub without a test split keeps the fingerprint it always had
        fingerprint["test-fraction"] = data.test_fraction
        fingerprint["test-languages"] = sorted(split.test)
    return split, fingerprint


def task_keys(cfg: FedemConfig) -> list[str]:
    """The held-out sets the catalog's task adapters need beyond the languages' own (``data.tasks``)."""
    keys = (key for entry in cfg.catalog.adapters for key in terms_of_entry(entry).heldout_keys)
    return sorted({key for key in keys if parse_key(key) != DataKey(key)})


def split_id(fingerprint: dict) -> str:
    """A short name for one split, stored with the losses measured on it."""
    return _sha256(json.dumps(fingerprint, sort_keys=True))[:16]


def tokenizer_digest(tokenizer) -> str:
    """sha256 of the tokenizer's full definition (a fast tokenizer's JSON), else of its vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return _sha256(f"{type(tokenizer).__name__}\x00{text}")


def refresh_parent_losses(
    registry: Registry,
    store: ArtifactStore,
    evaluate: Callable[[dict[str, Any]], dict[str, float]],
    fingerprint: dict,
    clock: Callable[[], float],
    base_version: Optional[int] = None,
) -> list[str]:
    """Record ``fingerprint``; if the recorded one differs, re-evaluate every adapter's latest version
    with ``evaluate`` (held-out loss per language of a state, on base ``base_version``: the one the
    workbench holds) first. Returns the adapters re-evaluated."""
    recorded: Optional[dict] = registry.setting(SETTING)
    if recorded == fingerprint:
        return []
    changed = sorted(k for k in fingerprint.keys() | (recorded or {}).keys()
                     if (recorded or {}).get(k) != fingerprint.get(k))
    latest = registry.latest_adapter_versions()
    name = split_id(fingerprint)
    for adapter, version in latest.items():
        losses = evaluate(read_adapter_state(store.get(version.ref)))
        registry.update_version_heldout(adapter, version.version, losses, split=name, updated=clock(),
                                        replaced_split=split_id(recorded) if recorded else None,
                                        base_version=base_version)
    registry.put_setting(SETTING, fingerprint, updated=clock())
    if recorded is None and not latest:
        log.info("Held-out split %s recorded", name)
    else:
        what = ", ".join(_change(k, recorded, fingerprint) for k in changed) if recorded else "no split recorded"
        log.info("Held-out split changed (%s): now %s; re-evaluated the parent losses of %d adapter(s)%s",
                 what, name, len(latest), f": {', '.join(latest)}" if latest else "")
    return list(latest)


def _change(key: str, old: dict, new: dict) -> str:
    before, after = old.get(key), new.get(key)
    if isinstance(after, (int, float)) and isinstance(before, (int, float)):
        return f"{key} {before} -> {after}"
    return key


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
