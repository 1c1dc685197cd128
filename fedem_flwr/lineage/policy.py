"""When the hub merges and which adapters a merge absorbs: pure policy (no torch; the clock and
every input are arguments), so it is tested in milliseconds.

- ``select_absorbed(candidates, leased, base_losses, token_weights=, rebase=) -> Selection``: which
  adapters a merge absorbs: those whose current version beats the bare current base on their own
  languages, by the gate's own-language rule (``fedem_flwr.gate.acceptance.decide``), strictly; with
  ``merge.rebase=zero`` only those not under lease (a push in flight would apply their work twice),
  with ``residual`` leased ones too (their push in flight lands as an update of the rebased version).
- ``merge_due(accepted_since, last_merge_at, now, cfg, requested=) -> reason or None``.
- ``mean_weights(tokens, multipliers=) -> {adapter: weight}``: the weights of a ``mean`` merge, summing
  to 1, each proportional to the tokens trained into the adapter since its last fresh start (times its
  ``merge.weights`` multiplier); node-reported counts that are negative or not finite count as 0.

The arithmetic of a merge is in ``lineage.merge``.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from fedem_flwr.gate.acceptance import decide

if TYPE_CHECKING:
    from fedem_flwr.config.schema import MergeConfig


@dataclass(frozen=True)
class Candidate:
    """An adapter's current version and its held-out losses on the current base."""

    name: str
    version: int
    languages: tuple[str, ...]
    losses: Mapping[str, float]


@dataclass(frozen=True)
class Selection:
    """The adapters a merge absorbs, and each skipped adapter's name with its reason."""

    absorbed: tuple[Candidate, ...]
    skipped: tuple[tuple[str, str], ...]


def select_absorbed(
    candidates: Sequence[Candidate],
    leased: Collection[str],
    base_losses: Mapping[str, float],
    *,
    token_weights: Optional[Mapping[str, float]] = None,
    rebase: str = "zero",
) -> Selection:
    """Adapters whose losses beat ``base_losses`` (the bare base) on their own languages; with
    ``rebase`` ``"zero"``, only those not in ``leased``.

    "Beat" is the gate's own-language comparison (token-weighted with ``token_weights``, else a plain
    mean), strictly lower: an adapter equal to the base has nothing to give. Under ``merge.rebase=zero``
    a leased adapter waits for the next merge: its push in flight was trained on the version absorbed
    and would restart from a zero delta with that work applied twice. Under ``residual`` it is absorbed
    like a free one: the push lands as the change it made, added to the rebased version (DESIGN 20).
    """
    absorbed, skipped = [], []
    for candidate in candidates:
        if rebase != "residual" and candidate.name in leased:
            skipped.append((candidate.name, "under lease; waits for the next merge"))
            continue
        verdict = decide(candidate.losses, base_losses, candidate.languages, weights=token_weights)
        if verdict.accepted and verdict.delta < 0:
            absorbed.append(candidate)
        else:
            skipped.append((candidate.name, f"does not beat the base: {verdict.reason}"))
    return Selection(tuple(absorbed), tuple(skipped))


def merge_due(
    accepted_since: int,
    last_merge_at: Optional[float],
    now: float,
    cfg: "MergeConfig",
    requested: bool = False,
) -> Optional[str]:
    """Why a merge is due now (``"requested"``, ``"every_accepted"``, ``"every_s"``), or None.

    ``accepted_since`` counts accepted contributions since the later of the current base and the last
    merge attempt, so a refused merge is not retried before new work arrives; ``last_merge_at`` is
    that moment (None: never). Without accepted work only a request starts a merge.
    """
    if requested:
        return "requested"
    if accepted_since <= 0:
        return None
    if cfg.every_accepted is not None and accepted_since >= cfg.every_accepted:
        return "every_accepted"
    if cfg.every_s is not None and (last_merge_at is None or now - last_merge_at >= cfg.every_s):
        return "every_s"
    return None


def mean_weights(tokens: Mapping[str, float], multipliers: Optional[Mapping[str, float]] = None) -> dict[str, float]:
    """The weight of each adapter in a ``mean`` merge: ``tokens[a] * multipliers.get(a, 1)``, normalised
    to sum to 1 (module doc). Token counts are node-reported: a negative or non-finite one counts as 0.
    When no adapter has a positive product (no counts reported), the multipliers alone are used, and
    with none, every adapter weighs the same. Empty in, empty out.
    """
    def clean(value: float) -> float:
        value = float(value)
        return value if math.isfinite(value) and value > 0 else 0.0

    scale = {name: clean((multipliers or {}).get(name, 1.0)) for name in tokens}
    raw = {name: clean(clean(count) * scale[name]) for name, count in tokens.items()}
    for fallback in (raw, scale, dict.fromkeys(tokens, 1.0)):
        top = max(fallback.values(), default=0.0)
        if top > 0:  # divided by the largest first: huge reported counts cannot overflow the sum
            share = {name: value / top for name, value in fallback.items()}
            total = math.fsum(share.values())
            return {name: value / total for name, value in share.items()}
    return {}
