"""Which idle nodes judge a push (pure logic).

A peer for a push holds data the push serves (one of its serving keys: ``hi``, or ``en:chat`` for a chat
adapter), is not the node that pushed it, and stands well (its standing is at least ``min_standing``).
The caller passes only idle nodes that hold no lease.

Among those, no single node should judge the same contributor again and again, or a pair of
contributors could vouch for each other: candidates are ranked by how often each has judged this
pusher before (fewest first), then by whether it holds the push's base already (a node without it is
sent the base, which it keeps for its next lease, but that costs more than the evaluation), then by
when it last judged anyone (longest ago first, which spreads the work), then by a keyed hash of
(push, candidate), so ties break differently for every push rather than always in the same identity
order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    """An idle node as peer selection sees it: who (its pseudonym) and what it serves."""

    pseudonym: str
    serving: tuple[str, ...]
    bases: frozenset[str]  # digests of the bases it holds
    standing: float = 1.0


def choose_peers(candidates: Sequence[Candidate], *, pusher: str, serving: Sequence[str], base: str, wanted: int,
                 pairs: Mapping[tuple[str, str], int], last_asked: Mapping[str, float], key: str,
                 min_standing: float = 0.0, exclude: Sequence[str] = ()) -> list[str]:
    """Up to ``wanted`` pseudonyms to ask (module doc). ``pairs[(peer, pusher)]`` counts how often a peer
    was asked about that pusher's pushes; ``last_asked`` when each peer was last asked; ``exclude`` the
    peers already asked about this push; ``base`` the digest of the base the push is judged on."""
    if wanted <= 0:
        return []
    eligible = [c for c in candidates
                if c.pseudonym != pusher and c.pseudonym not in exclude
                and c.standing >= min_standing and not set(c.serving).isdisjoint(serving)]

    def rank(c: Candidate) -> tuple[int, bool, float, str]:
        tie = hashlib.sha256(f"{key}\0{c.pseudonym}".encode()).hexdigest()
        return (pairs.get((c.pseudonym, pusher), 0), base not in c.bases, last_asked.get(c.pseudonym, float("-inf")),
                tie)

    return [c.pseudonym for c in sorted(eligible, key=rank)[:wanted]]
