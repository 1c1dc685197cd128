"""Lazy package exports (PEP 562), one mechanism for every package that needs them.

Packages export names resolved on first use, so that light callers (the CLI, the config schema,
a GPU machine without `datasets`) never import what they do not use.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Mapping
from typing import Any


def export_lazily(package: str, exports: Mapping[str, str]) -> None:
    """Make ``package`` resolve each name in ``exports`` (name -> submodule) on first access.

    When a submodule has the name of a function it exports (``data.partition``), importing it binds
    the submodule over the package attribute; the package then keeps the function instead.
    """
    module = sys.modules[package]

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        module.__dict__[name] = value
        return value

    class LazyPackage(types.ModuleType):
        def __setattr__(self, name: str, value: Any) -> None:
            if not (isinstance(value, types.ModuleType) and exports.get(name) == name):
                super().__setattr__(name, value)

    module.__getattr__ = __getattr__  # type: ignore[method-assign]
    module.__all__ = sorted(exports)
    module.__class__ = LazyPackage
