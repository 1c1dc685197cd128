"""Peers' judgement of a push, combined with the hub's own (pure logic).

A peer reports, per language, the tokens it scored and the mean loss of the candidate and of its parent
on the same held-out rows of its own. Its *delta* is the paired difference, candidate minus parent,
token-weighted over its languages: negative means the push helped on that peer's text.

Peers are strangers, so their deltas are combined robustly (``aggregate``):

- ``median``: the weighted median of the peers' deltas. A peer weighs its tokens times its standing,
  but no peer weighs more than the median peer's tokens: with three or more peers one peer never holds
  half the weight, so one liar cannot move the median past an honest peer's value, whatever it claims.
- ``trimmed``: the weighted mean after cutting ``trim`` of the reports from each end (at least one from
  each end once three came in).

Peers count only once ``min_peers`` reports holding ``min_tokens`` tokens together came in. Then
``combine`` says what they do, by how much held-out text the hub itself has on the push's sets:

- the hub has enough (``hub_min_tokens``): the hub decides and peers may *veto*: a push the hub accepts is
  rejected when the peers show it worse than its parent by more than ``tolerance``; peers never accept
  what the hub rejected;
- the hub has too little: peers *decide*, with the gate's own rule: accepted when the peers' delta is at
  most ``-margin``; with ``pool``, the delta compared is the peers' pooled with the hub's own, weighted
  by tokens (the peers' as they were aggregated, each at most the median peer's), so the hub's thin
  evidence still counts as much as its tokens. Pooling trades a guarantee away: a liar cannot move the
  peers' median past an honest peer's value, but when the hub and the peers disagree, which honest value
  the median lands on can move the pooled delta across the threshold.

Too few peers: the hub decides alone, as without peers.

A peer's standing (``judged_reports``) changes only where the hub had the data: a report that disagrees
both with the peers' consensus and with the hub's own result counts against it, one that agrees with
either counts for it. The registry keeps the counts; ``standing`` turns them into a weight.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Optional

from fedem_flwr.gate.acceptance import Decision

VETO, DECIDE = "veto", "decide"
AGREED, VETOED, DECIDED, TOO_FEW = "agreed", "vetoed", "decided", "too-few"


@dataclass(frozen=True)
class PeerResult:
    """One peer's report as the gate reads it: per language, tokens and both losses."""

    peer: str
    tokens: Mapping[str, int]
    candidate: Mapping[str, float]
    parent: Mapping[str, float]
    standing: float = 1.0

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens.values())

    @property
    def delta(self) -> float:
        """Candidate minus parent loss, weighted by the tokens of each language."""
        total = self.total_tokens
        return sum(n * (self.candidate[lang] - self.parent[lang]) for lang, n in self.tokens.items()) / total


@dataclass(frozen=True)
class PeerVerdict:
    """What the peers said together; ``delta`` is None when too few reports came in to count."""

    counted: int
    tokens: int
    delta: Optional[float]
    deltas: dict[str, float] = field(default_factory=dict)  # per peer
    weights: dict[str, float] = field(default_factory=dict)  # per peer, as aggregated

    @property
    def counts(self) -> bool:
        return self.delta is not None


@dataclass(frozen=True)
class Judgement:
    """The push's decision with the peers' part in it: ``role`` is what peers could do (``veto`` or
    ``decide``), ``effect`` what they did (``agreed``, ``vetoed``, ``decided`` or ``too-few``)."""

    accepted: bool
    reason: str
    role: str
    effect: str


def standing(agreed: int, disagreed: int) -> float:
    """The share of a peer's checked reports that agreed, with one agreement assumed: a new peer weighs 1."""
    return (agreed + 1) / (agreed + disagreed + 1)


def weighted_median(values: Sequence[float], weights: Sequence[float]) -> float:
    """The value at which the cumulative weight reaches half the total; where it reaches exactly half, the
    mean of that value and the next (so two equal peers give their mean, as a plain median would)."""
    pairs = sorted(zip(values, weights))
    half = sum(weights) / 2.0
    seen = 0.0
    for i, (value, weight) in enumerate(pairs):
        seen += weight
        if math.isclose(seen, half, rel_tol=1e-12) and i + 1 < len(pairs):
            return (value + pairs[i + 1][0]) / 2.0
        if seen > half:
            return value
    return pairs[-1][0]


def trimmed_mean(values: Sequence[float], weights: Sequence[float], trim: float) -> float:
    """The weighted mean of ``values`` after cutting ``trim`` of them from each end (one each from three on)."""
    pairs = sorted(zip(values, weights))
    cut = int(len(pairs) * trim)
    if len(pairs) >= 3:
        cut = max(cut, 1)
    kept = pairs[cut:len(pairs) - cut] or pairs
    total = sum(weight for _, weight in kept)
    if total <= 0:
        return sum(value for value, _ in kept) / len(kept)
    return sum(value * weight for value, weight in kept) / total


def aggregate(results: Sequence[PeerResult], *, method: str = "median", trim: float = 0.2, min_peers: int = 2,
              min_tokens: int = 0) -> PeerVerdict:
    """The peers' combined delta (module doc); reports without tokens or with zero standing are not counted."""
    usable = [r for r in results if r.total_tokens > 0 and r.standing > 0 and math.isfinite(r.delta)]
    tokens = sum(r.total_tokens for r in usable)
    deltas = {r.peer: r.delta for r in usable}
    if len(usable) < max(1, min_peers) or tokens < min_tokens:
        return PeerVerdict(len(usable), tokens, None, deltas)
    cap = statistics.median(float(r.total_tokens) for r in usable)
    weights = {r.peer: min(float(r.total_tokens), cap) * r.standing for r in usable}
    values = [deltas[r.peer] for r in usable]
    per_peer = [weights[r.peer] for r in usable]
    delta = weighted_median(values, per_peer) if method == "median" else trimmed_mean(values, per_peer, trim)
    return PeerVerdict(len(usable), tokens, delta, deltas, weights)


def combine(hub: Decision, hub_tokens: float, verdict: PeerVerdict, *, hub_min_tokens: int, margin: float,
            tolerance: float, pool: bool = False) -> Judgement:
    """The push's decision from the hub's own ``hub`` and the peers' ``verdict`` (module doc)."""
    role = VETO if hub_tokens >= hub_min_tokens else DECIDE
    if not verdict.counts:
        return Judgement(hub.accepted, f"{hub.reason}; peers: {verdict.counted} counted, too few to judge",
                         role, TOO_FEW)
    peers = f"peers: {verdict.delta:+.3f} over {verdict.counted} ({verdict.tokens} tokens)"
    if role == VETO:
        if hub.accepted and verdict.delta > tolerance:
            return Judgement(False, f"{hub.reason}; vetoed by {peers}, worse beyond tolerance {tolerance:.3f}",
                             role, VETOED)
        return Judgement(hub.accepted, f"{hub.reason}; {peers}", role, AGREED)
    delta, by = verdict.delta, peers
    if pool and hub_tokens > 0 and math.isfinite(hub.delta):
        weight = sum(verdict.weights.values())
        delta = (hub_tokens * hub.delta + weight * verdict.delta) / (hub_tokens + weight)
        by = f"{peers} pooled with the hub's own ({hub.delta:+.3f}, {hub_tokens:.0f} tokens): {delta:+.3f}"
    accepted = delta <= -margin
    need = "" if accepted else (f"; needs <= {-margin:+.3f}" if margin else "; needs no increase")
    thin = f"hub's own held-out ({hub_tokens:.0f} tokens, too few to decide alone): {hub.reason}"
    return Judgement(accepted, f"decided by {by}{need}; {thin}", role, DECIDED)


def judged_reports(results: Sequence[PeerResult], verdict: PeerVerdict, hub: Decision, role: str,
                   margin: float) -> dict[str, bool]:
    """Which peers agreed (True) or disagreed (False), where it can be told: only when the hub had the data
    (``role`` veto) and the peers counted. A peer disagrees when its own call (better by the margin, or not)
    differs both from the consensus's and from the hub's."""
    if role != VETO or not verdict.counts:
        return {}
    consensus = verdict.delta <= -margin
    judged = {}
    for result in results:
        if result.peer not in verdict.deltas:
            continue
        says = verdict.deltas[result.peer] <= -margin
        judged[result.peer] = says == consensus or says == hub.accepted
    return judged

