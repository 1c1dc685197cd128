"""Comparing a benchmark run with a saved baseline, and printing its table: shared by the scripts in
this folder (each is run as ``python benchmarks/NAME.py``, which puts this folder on the import path)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def regressions(results: Mapping[str, float], baseline: Mapping[str, Any], metrics: Mapping[str, tuple[str, bool]],
                tolerance: float, fmt: str = ",.3f") -> list[str]:
    """Metrics worse than ``baseline["results"]`` by more than ``tolerance`` (a fraction); ``metrics``
    maps each name to (unit, higher_is_better)."""
    found = []
    for name, (_, higher_is_better) in metrics.items():
        old, new = baseline["results"].get(name), results[name]
        if not old:
            continue
        worse = (old - new) / old if higher_is_better else (new - old) / old
        if worse > tolerance:
            found.append(f"{name}: {new:{fmt}} vs baseline {old:{fmt}} ({worse:.0%} worse)")
    return found


def print_aligned(lines: Sequence[Sequence[Any]]) -> None:
    """``lines[0]`` as the header, a rule under it, every column as wide as its widest cell."""
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(lines[0]))]
    for n, line in enumerate(lines):
        print("  ".join(str(cell).ljust(w) for cell, w in zip(line, widths)))
        if n == 0:
            print("  ".join("-" * w for w in widths))
