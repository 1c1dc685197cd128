"""Fine-tuning loop and held-out evaluation; tensors in, numbers out (no Flower, no registry).

Names resolve lazily (PEP 562), and neither loop imports `datasets` or flwr-datasets: a GPU machine
trains on blocks it is handed without carrying them.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

_EXPORTS = {
    "pick_device": "device", "pick_precision": "device",
    "evaluate": "evaluate", "mean_loss": "evaluate",
    "TrainResult": "finetune", "is_out_of_memory": "finetune", "lr_at": "finetune",
    "shrink_micro_batch": "finetune", "train": "finetune",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """Keeps ``evaluate`` the function: loading the same-named submodule makes the import system bind
    the submodule over the package attribute, and ``__getattr__`` would then never be asked."""

    def __setattr__(self, name: str, value: Any) -> None:
        if not (isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
