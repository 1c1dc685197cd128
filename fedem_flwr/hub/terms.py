"""What each registered adapter is and is judged on, read back from the registry alone.

The CLI, the report, the site and the model cards need an adapter's task, domain and own held-out
sets without the run config: the hub records its catalog (``catalog`` setting, ``asdict`` of
``CatalogConfig``) next to the adapters table. A hub set up before catalogs existed has no such
setting, and an adapter the catalog does not name is a language adapter (``data.tasks``), so every
hub reads the same way: a language adapter is judged on its languages' text, a chat adapter on
its conversations (``en:chat``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import fields
from typing import Any, Optional

from fedem_flwr.config.schema import CatalogConfig, CatalogEntry
from fedem_flwr.data.tasks import AdapterTerms, adapter_terms
from fedem_flwr.errors import ConfigError
from fedem_flwr.hub.registry import Registry

LANGUAGE_TASK = "causal-lm"
# Each task's heading where adapters are listed by task; a task this version does not know is shown by name.
TASK_TITLES = {"causal-lm": "Language adapters",
               "sft-chat": "Chat adapters (supervised, loss on the assistant's turns)"}
_ENTRY_KEYS = frozenset(f.name for f in fields(CatalogEntry))


def catalog_from(value: Optional[Mapping[str, Any]]) -> Optional[CatalogConfig]:
    """The catalog a hub recorded (its ``catalog`` setting), or None when it has none.

    Entries this version cannot read (an unknown task, keys from a newer version) are left out, so
    those adapters read as their registry rows say rather than failing the whole listing.
    """
    if not isinstance(value, Mapping):
        return None
    entries = [entry for entry in map(_entry, value.get("adapters") or []) if entry is not None]
    try:
        return CatalogConfig(per_language=bool(value.get("per_language", True)), adapters=entries)
    except ConfigError:  # a name twice: never recorded by a hub, but a listing still reads
        return None


def _entry(raw: Any) -> Optional[CatalogEntry]:
    if not isinstance(raw, Mapping):
        return None
    try:
        return CatalogEntry(**{k: v for k, v in raw.items() if k in _ENTRY_KEYS})
    except (ConfigError, TypeError):
        return None


def recorded_catalog(registry: Registry) -> Optional[CatalogConfig]:
    return catalog_from(registry.setting("catalog"))


def adapter_terms_of(registry: Registry) -> dict[str, AdapterTerms]:
    """name -> terms of every registered adapter: its recorded catalog entry, else a language adapter."""
    catalog = recorded_catalog(registry)
    return {a.name: adapter_terms(a.name, a.languages, a.task, catalog) for a in registry.adapters()}


def terms_of(registry: Registry, name: str, languages: Optional[list[str]] = None,
             task: Optional[str] = None) -> AdapterTerms:
    """The terms of adapter ``name``; ``languages`` and ``task`` stand in for an adapter not registered
    yet (its version 0 card is written first) or override what its row says."""
    row = registry.adapter(name)
    languages = list(languages) if languages is not None else (list(row.languages) if row is not None else [])
    task = task or (row.task if row is not None else LANGUAGE_TASK)
    return adapter_terms(name, languages, task, recorded_catalog(registry))


def own_losses(heldout: Optional[Mapping[str, Any]], terms: AdapterTerms) -> dict[str, float]:
    """The finite losses of ``heldout`` on the adapter's own held-out sets (what its gate compares)."""
    heldout = heldout or {}
    return {key: float(heldout[key]) for key in terms.heldout_keys if _finite(heldout.get(key))}


def own_loss(heldout: Optional[Mapping[str, Any]], terms: AdapterTerms) -> Optional[float]:
    """Mean loss over the adapter's own held-out sets, or None when none of them was measured."""
    values = list(own_losses(heldout, terms).values())
    return sum(values) / len(values) if values else None


def task_title(task: str) -> str:
    return TASK_TITLES.get(task, f"{task} adapters")


def task_order(task: str) -> tuple[int, str]:
    """Language adapters first, then the known tasks in their catalog order, then any other by name."""
    known = list(TASK_TITLES)
    return (known.index(task), "") if task in known else (len(known), task)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
