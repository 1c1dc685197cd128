"""No credit without work: did a push change its parent's weights, and can it still learn?

Both checks run before the held-out evaluation, on the pushed weights and the leased parent
version's weights (key -> tensor; no registry, no Flower, and only tensor methods, so any
tensor-like with ``abs``/``max``/``count_nonzero`` works):

- ``unchanged``: every weight lies within ``min_change`` of the parent's (max |delta| <= min_change).
  At the gate's default margin 0 an untouched adapter scores exactly its parent's loss and would pass.
- ``degenerate``: a LoRA pair whose ``lora_A`` and ``lora_B`` (or ``lora_embedding_A`` / ``_B``) are
  both all zero. Its delta ``B @ A`` is zero and so are both gradients (dL/dA = B^T G, dL/dB = G A^T),
  so no later training can move the pair again: accepting it would freeze the adapter for good.
  A pair with only one side zero is PEFT's own initialisation (``lora_B = 0``) and learns normally.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

_LORA_A = re.compile(r"^(?P<module>.*)\.lora_(?P<kind>embedding_)?A(?P<rest>(\..*)?)$")


def max_change(state: Mapping[str, Any], parent: Mapping[str, Any]) -> float:
    """Largest |state - parent| over all weights; inf when the keys or a shape differ, or a value is NaN."""
    if set(state) != set(parent):
        return math.inf
    largest = 0.0
    for key, value in state.items():
        before = parent[key]
        if tuple(value.shape) != tuple(before.shape):
            return math.inf
        if value.numel():
            change = float((value.float() - before.float()).abs().max())
            if math.isnan(change):  # a NaN weight is no evidence of "unchanged"
                return math.inf
            largest = max(largest, change)
    return largest


def degenerate_pairs(state: Mapping[str, Any]) -> list[str]:
    """Modules whose LoRA pair is all zero on both sides, in key order; a state without pairs has none."""
    names = []
    for key in sorted(state):
        match = _LORA_A.match(key)
        if match is None:
            continue
        partner = f"{match['module']}.lora_{match['kind'] or ''}B{match['rest']}"
        if partner in state and not int(state[key].count_nonzero()) and not int(state[partner].count_nonzero()):
            names.append(match["module"])
    return names


def no_work(state: Mapping[str, Any], parent: Mapping[str, Any], min_change: float, parent_name: str) -> str:
    """Why ``state`` earns no evaluation against ``parent`` (named ``parent_name``), or "" when it may."""
    change = max_change(state, parent)
    if change <= min_change:
        return f"unchanged: max |delta| {change:.1e} from {parent_name} <= gate.min_change {min_change:g}"
    frozen = degenerate_pairs(state)
    if frozen:
        shown = ", ".join(repr(name) for name in frozen[:3]) + (f" and {len(frozen) - 3} more" if len(frozen) > 3 else "")
        return f"degenerate: lora_A and lora_B are both all zero for {shown}; no gradient can move them"
    return ""
