"""Corpora through `datasets`, partitioning through flwr-datasets, token blocks and the held-out split.

Names resolve lazily (PEP 562): ``fedem_flwr.data.labels`` (torch only) serves training on a machine
without `datasets` or flwr-datasets, which only reading and partitioning corpora needs.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

_EXPORTS = {
    "heldout_split": "blocks", "tokenize_blocks": "blocks",
    "language_sizes": "corpus", "load_corpus": "corpus",
    "IGNORE_INDEX": "labels", "labels_for": "labels",
    "partition": "partition", "partition_languages": "partition", "partitions": "partition", "spread": "partition",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """Keeps ``partition`` the function: loading the same-named submodule makes the import system bind
    the submodule over the package attribute, and ``__getattr__`` would then never be asked."""

    def __setattr__(self, name: str, value: Any) -> None:
        if not (isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
