"""Hub state: the registry (SQLite), the artifact store, contributor pseudonyms and the writer lock.

Import-light on purpose: ``fedem --help`` and readers must not pay for the store's dependencies, so
names are resolved on first use (``from fedem_flwr.hub import Registry`` imports only the registry).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Registry": "registry",
    "open_readonly": "registry",
    "Checkpoint": "records",
    "Adapter": "records",
    "AdapterVersion": "records",
    "Contribution": "records",
    "revision_name": "records",
    "HubWriterLock": "paths",
    "resolve_hub_path": "paths",
    "default_hub_path": "paths",
    "require_hub": "paths",
    "ensure_hub": "paths",
    "read_lock_holder": "paths",
    "pseudonym_of": "pseudonym",
    "open_store": "store",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
