"""Node-selection policies: which free adapter a free node gets next (pure logic; RNG passed in).

A policy sees snapshots (``NodeProfile``, ``AdapterInfo``), never the lease book: the relay Strategy
lists the free nodes and free adapters, asks ``assign`` for pairs, and acquires a lease for each.
``assign`` hands out each adapter at most once and gives each node at most one adapter.

Any sequence of adapters works; given an ``AdapterPool`` view (``pool.free()``) the policies use its
indexes and choose in O(log n) what they would choose by scanning (see ``relay.pool``). ``fair``
ranks by tokens, which change at every push: it scans the free adapters (of a node's languages,
through the pool's language index), which for tens of adapters costs microseconds.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional, Protocol, runtime_checkable

from fedem_flwr.errors import ConfigError
from fedem_flwr.relay.pool import FreeAdapters

POLICY_NAMES = ("random", "round-robin", "least-recent", "language", "fair")
FALLBACK_NAMES = POLICY_NAMES[:3]


@dataclass(frozen=True)
class NodeProfile:
    """What a node declared in its ``query`` reply (cached by the Strategy)."""

    node: str
    languages: tuple[str, ...] = ()
    device: str = "cpu"
    data_size: int = 0


@dataclass(frozen=True)
class AdapterInfo:
    """A free adapter as the policy sees it; ``last_served`` is when its last lease ended (None: never);
    ``tokens`` are the tokens trained into it so far (every judged push, accepted or rejected, as its
    node reported them, clamped by the hub)."""

    name: str
    languages: tuple[str, ...]
    version: int
    last_served: Optional[float]
    tokens: int = 0


@runtime_checkable
class Policy(Protocol):
    """Chooses adapters for nodes."""

    def choose(self, node: NodeProfile, free_adapters: Sequence[AdapterInfo]) -> Optional[AdapterInfo]:
        """The adapter ``node`` should train next, or None when none is free."""
        ...

    def assign(
        self, free_nodes: Sequence[NodeProfile], free_adapters: Sequence[AdapterInfo]
    ) -> list[tuple[NodeProfile, AdapterInfo]]:
        """Pairs (node, adapter) for as many free nodes as possible, each adapter at most once."""
        ...

    def observe(self, leased: Sequence[AdapterInfo]) -> None:
        """The adapters under lease now, told before each ``assign``."""
        ...


class BasePolicy:
    """Greedy ``assign``: nodes in the given order each ``choose`` among the adapters still free."""

    def observe(self, leased: Sequence[AdapterInfo]) -> None:
        """The adapters under lease now, told before each ``assign`` (a policy may ignore them)."""

    def choose(self, node: NodeProfile, free_adapters: Sequence[AdapterInfo]) -> Optional[AdapterInfo]:
        raise NotImplementedError

    def assign(
        self, free_nodes: Sequence[NodeProfile], free_adapters: Sequence[AdapterInfo]
    ) -> list[tuple[NodeProfile, AdapterInfo]]:
        if _is_pool(free_adapters):
            return _assign_on_pool(free_adapters, [(node, self.choose) for node in free_nodes])
        remaining = list(free_adapters)
        pairs: list[tuple[NodeProfile, AdapterInfo]] = []
        for node in free_nodes:
            if not remaining:
                break
            chosen = self.choose(node, remaining)
            if chosen is not None:
                pairs.append((node, chosen))
                remaining.remove(chosen)
        return pairs


class RandomPolicy(BasePolicy):
    """Any free adapter, uniformly at random from the given RNG (seeded for reproducible runs)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def choose(self, node: NodeProfile, free_adapters: Sequence[AdapterInfo]) -> Optional[AdapterInfo]:
        return self.rng.choice(free_adapters) if free_adapters else None

    def assign(
        self, free_nodes: Sequence[NodeProfile], free_adapters: Sequence[AdapterInfo]
    ) -> list[tuple[NodeProfile, AdapterInfo]]:
        # Sampling indices draws exactly what ``rng.sample(list(free_adapters), k)`` would.
        n = len(free_adapters)
        picks = self.rng.sample(range(n), min(len(free_nodes), n))
        return [(node, free_adapters[i]) for node, i in zip(free_nodes, picks)]


class RoundRobinPolicy(BasePolicy):
    """Adapters in a fixed cycle by name: each choice takes the first free name after the last one given."""

    def __init__(self) -> None:
        self.last: Optional[str] = None

    def choose(self, node: NodeProfile, free_adapters: Sequence[AdapterInfo]) -> Optional[AdapterInfo]:
        if not free_adapters:
            return None
        if _is_pool(free_adapters):
            chosen = free_adapters.next_after(self.last)
            if chosen is not None:
                self.last = chosen.name
            return chosen
        after = None
        if self.last is not None:
            after = min((a for a in free_adapters if a.name > self.last), key=_name, default=None)
        chosen = after if after is not None else min(free_adapters, key=_name)
        self.last = chosen.name
        return chosen


class LeastRecentPolicy(BasePolicy):
    """The adapter served longest ago; never-served adapters first; ties broken by name."""

    def choose(self, node: NodeProfile, free_adapters: Sequence[AdapterInfo]) -> Optional[AdapterInfo]:
        if _is_pool(free_adapters):
            return free_adapters.least_recent()
        never = [a for a in free_adapters if a.last_served is None]
        if never:
            return min(never, key=_name)
        return min(free_adapters, key=_recency, default=None)

    def assign(
        self, free_nodes: Sequence[NodeProfile], free_adapters: Sequence[AdapterInfo]
    ) -> list[tuple[NodeProfile, AdapterInfo]]:
        if _is_pool(free_adapters):
            return super().assign(free_nodes, free_adapters)
        # Same pairs as the greedy loop, with one sort instead of one scan per node.
        ranked = sorted(free_adapters, key=lambda a: (a.last_served is not None, a.last_served or 0.0, a.name))
        return list(zip(free_nodes, ranked))


class LanguageAffinityPolicy(BasePolicy):
    """A node that declared languages gets an adapter sharing one of them, or nothing.

    Among matching adapters (or all of them, when the node declared no language) the ``fallback``
    policy chooses. A node that declared languages is never offered a foreign adapter: it has no
    data to train it on. ``assign`` serves nodes with languages before the others, so a node
    without languages never takes the only adapter a language node could use.
    """

    def __init__(self, fallback: Policy) -> None:
        self.fallback = fallback

    def choose(self, node: NodeProfile, free_adapters: Sequence[AdapterInfo]) -> Optional[AdapterInfo]:
        if _is_pool(free_adapters, whole=True):
            pool = free_adapters.pool
            if not node.languages:
                return self.fallback.choose(node, free_adapters)
            if pool.has_language(node.languages):
                return self.fallback.choose(node, pool.free(node.languages))
            return None
        if not node.languages:
            return self.fallback.choose(node, free_adapters)
        matching = _matching(node, free_adapters)
        return self.fallback.choose(node, matching) if matching else None

    def assign(
        self, free_nodes: Sequence[NodeProfile], free_adapters: Sequence[AdapterInfo]
    ) -> list[tuple[NodeProfile, AdapterInfo]]:
        if _is_pool(free_adapters, whole=True):
            return self._assign_pool(free_nodes, free_adapters)
        remaining = list(free_adapters)
        chosen: dict[int, AdapterInfo] = {}
        for index, node in enumerate(free_nodes):  # pass 1: language matches only
            matching = _matching(node, remaining)
            pick = self.fallback.choose(node, matching) if matching else None
            if pick is not None:
                chosen[index] = pick
                remaining.remove(pick)
        for index, node in enumerate(free_nodes):  # pass 2: nodes without languages, from what is left
            if index in chosen or node.languages or not remaining:
                continue
            pick = self.fallback.choose(node, remaining)
            if pick is not None:
                chosen[index] = pick
                remaining.remove(pick)
        return [(free_nodes[index], chosen[index]) for index in sorted(chosen)]

    def _assign_pool(
        self, free_nodes: Sequence[NodeProfile], free: FreeAdapters
    ) -> list[tuple[NodeProfile, AdapterInfo]]:
        pool = free.pool

        def matched(node: NodeProfile, _free: FreeAdapters) -> Optional[AdapterInfo]:
            if node.languages and pool.has_language(node.languages):
                return self.fallback.choose(node, pool.free(node.languages))
            return None

        first = dict(zip(range(len(free_nodes)), _assign_on_pool(free, [(n, matched) for n in free_nodes], True)))
        # pass 2 runs on the pool with pass 1's picks taken out
        taken = [pool.take(info.name) for info in first.values() if info is not None]
        try:
            later = _assign_on_pool(
                free, [(n, self.fallback.choose) for i, n in enumerate(free_nodes) if first[i] is None and not n.languages]
            )
        finally:
            for info in taken:
                pool.put(info)
        late = iter(later)
        pairs = []
        for index, node in enumerate(free_nodes):
            pick = first[index]
            if pick is None and not node.languages:
                _, pick = next(late, (None, None))
            if pick is not None:
                pairs.append((node, pick))
        return pairs


class FairPolicy(BasePolicy):
    """Language affinity, then the adapter furthest behind an equal share of tokens.

    An adapter's share is the tokens trained into it divided by the mean over the adapters
    (``token_shares``); the target is the same for every adapter, 1. So the adapter furthest behind is
    the one with the fewest tokens (dividing by a common mean keeps the order); ties go to the least
    recently served (never served first), then to the first name. Tokens count every judged push,
    accepted or rejected: the share measures the training an adapter was given, not what the gate
    kept of it, so an adapter whose pushes keep being rejected (its language's data exhausted) moves
    up like any other and does not hold the nodes that could serve it.

    Why equal shares: a study scores a run by the plain mean of per-language held-out losses, and its
    baseline (FedAvg per language adapter) gives every language one holder a round, hence about equal
    tokens. Shares by data size would follow the token-weighted gate and starve the small languages,
    whose losses weigh as much in that mean; shares by held-out loss would chase the hub's own
    numbers, and are a study's to try.

    Affinity as ``language``: a node that declared languages is only offered adapters sharing one (it
    has no data for the others); a node without languages may train any. No policy can give an
    adapter more than its languages' nodes can train.

    ``assign`` serves the free adapters furthest behind first: each goes to the free node that can
    serve it with the fewest adapters left to serve, so a flexible node stays free for an adapter only
    it can take; among those, the node that trained this adapter longest ago (never first), then the
    node given any adapter longest ago, then the first in ``free_nodes``. So an adapter moves on to
    the next contributor, as a relay does: every node's data reaches it, and a slow node does not keep
    the adapter its own slowness left behind. Pairs come in the order served; a single node gets
    exactly what ``choose`` gives it.

    With ``max_lead`` (tokens), an adapter that far ahead of the adapter furthest behind waits: the
    floor is the fewest tokens among the adapters in play, those under lease now (``observe``) and
    the free ones some free node can serve. An adapter nobody can train now (its only contributor
    is away) is out of play, so it never stalls the others. This is how a relay spends a token budget
    as evenly as FedAvg's rounds do, at the price of idle nodes; without it fast languages get more.
    """

    def __init__(self, max_lead: Optional[int] = None) -> None:
        self.max_lead = max_lead
        self._leased: tuple[AdapterInfo, ...] = ()
        self._turns = 0  # assignments made so far: the policy's own clock for the tie-breaks
        self._served: dict[str, int] = {}  # node -> the turn it last got an adapter
        self._trained: dict[tuple[str, str], int] = {}  # (adapter, node) -> the turn the node last got it

    def observe(self, leased: Sequence[AdapterInfo]) -> None:
        self._leased = tuple(leased)

    def choose(self, node: NodeProfile, free_adapters: Sequence[AdapterInfo]) -> AdapterInfo | None:
        servable = list(_servable(node, free_adapters))
        return min(self._within_lead(servable, servable), key=_lag, default=None)

    def _within_lead(self, adapters: Sequence[AdapterInfo], in_play: Sequence[AdapterInfo]) -> list[AdapterInfo]:
        """``adapters`` less those more than ``max_lead`` tokens ahead of the fewest in play."""
        if self.max_lead is None:
            return list(adapters)
        floor = min((a.tokens for a in (*self._leased, *in_play)), default=0)
        return [a for a in adapters if a.tokens <= floor + self.max_lead]

    def assign(
        self, free_nodes: Sequence[NodeProfile], free_adapters: Sequence[AdapterInfo]
    ) -> list[tuple[NodeProfile, AdapterInfo]]:
        options: list[set[str] | None] = []  # per node: the adapters it can serve (None: any)
        universe: dict[str, AdapterInfo] = {}
        for node in free_nodes:
            mine = None if not node.languages else list(_servable(node, free_adapters))
            options.append(None if mine is None else {a.name for a in mine})
            universe.update((a.name, a) for a in mine or ())
        if any(names is None for names in options):
            universe = {a.name: a for a in free_adapters}
        playable = list(universe.values())
        order = sorted(self._within_lead(playable, playable), key=_lag)
        servers: dict[str, list[int]] = {}
        for index, names in enumerate(options):
            for name in names or ():
                servers.setdefault(name, []).append(index)
        anyone = [index for index, names in enumerate(options) if names is None]
        left = [len(order) if names is None else len(names) for names in options]  # adapters each can still serve
        free = set(range(len(free_nodes)))
        pairs: list[tuple[NodeProfile, AdapterInfo]] = []
        for adapter in order:
            if not free:
                break
            able = servers.get(adapter.name, []) + anyone
            candidates = [index for index in able if index in free]
            if candidates:
                chosen = min(candidates, key=lambda i: self._node_rank(adapter.name, free_nodes[i].node, left[i], i))
                node = free_nodes[chosen]
                pairs.append((node, adapter))
                free.discard(chosen)
                self._served[node.node] = self._trained[adapter.name, node.node] = self._turns
                self._turns += 1
            for index in able:
                left[index] -= 1
        return pairs

    def _node_rank(self, adapter: str, node: str, left: int, index: int) -> tuple[int, int, int, int]:
        """Which candidate node gets ``adapter``: fewest adapters left, then trained it longest ago, then
        given anything longest ago (never: -1, first), then first in order."""
        return (left, self._trained.get((adapter, node), -1), self._served.get(node, -1), index)


def token_shares(tokens: Mapping[str, int]) -> dict[str, float]:
    """Each adapter's tokens over the mean over the adapters, by name: 1.0 is its equal share (and every
    adapter's before any token was trained)."""
    if not tokens:
        return {}
    mean = sum(tokens.values()) / len(tokens)
    return {name: (count / mean if mean > 0 else 1.0) for name, count in sorted(tokens.items())}


def make_policy(name: str, rng: random.Random, fallback: str = "least-recent",
                max_lead: Optional[int] = None) -> Policy:
    """Build the policy named in ``relay.policy``; ``language`` falls back to ``relay.policy_fallback``
    (``fair`` has no fallback: its ties are broken by recency, then name)."""
    if name == "random":
        return RandomPolicy(rng)
    if name == "round-robin":
        return RoundRobinPolicy()
    if name == "least-recent":
        return LeastRecentPolicy()
    if name == "language":
        if fallback not in FALLBACK_NAMES:
            raise ConfigError(
                f"`relay.policy_fallback` is {fallback!r}; allowed: {', '.join(repr(n) for n in FALLBACK_NAMES)}."
            )
        return LanguageAffinityPolicy(make_policy(fallback, rng))
    if name == "fair":
        return FairPolicy(max_lead)
    raise ConfigError(f"`relay.policy` is {name!r}; allowed: {', '.join(repr(n) for n in POLICY_NAMES)}.")


def _is_pool(adapters: Sequence[AdapterInfo], whole: bool = False) -> bool:
    """An indexed pool view (``whole``: of every free adapter, not only some languages')."""
    return isinstance(adapters, FreeAdapters) and (adapters.languages is None or not whole)


def _assign_on_pool(free: FreeAdapters, choosers: list, keep_none: bool = False) -> list:
    """Greedy assignment on a pool: take each pick so the next chooser cannot get it, then put back.

    ``choosers`` pairs each node with a function ``(node, free) -> AdapterInfo | None``; the result
    is ``(node, pick)`` per chosen pick, or one ``pick`` (maybe None) per chooser with ``keep_none``.
    """
    pool = free.pool
    taken: list[AdapterInfo] = []
    out: list = []
    try:
        for node, choose in choosers:
            pick = choose(node, free) if free else None
            if pick is not None:
                taken.append(pool.take(pick.name))
            if keep_none:
                out.append(pick)
            elif pick is not None:
                out.append((node, pick))
    finally:
        for info in reversed(taken):
            pool.put(info)
    return out


def _name(adapter: AdapterInfo) -> str:
    return adapter.name


def _recency(adapter: AdapterInfo) -> tuple[float, str]:
    return (adapter.last_served if adapter.last_served is not None else float("-inf"), adapter.name)


def _lag(adapter: AdapterInfo) -> tuple[int, bool, float, str]:
    """Furthest behind first: fewest tokens, then never served, then served longest ago, then name."""
    return (adapter.tokens, adapter.last_served is not None, adapter.last_served or 0.0, adapter.name)


def _servable(node: NodeProfile, adapters: Sequence[AdapterInfo]) -> Sequence[AdapterInfo]:
    """The adapters ``node`` may train: those sharing one of its languages (through the pool's language
    index when given the whole pool), or all of them when it declared none."""
    if not node.languages:
        return adapters
    if _is_pool(adapters, whole=True):
        return adapters.pool.matching(node.languages)
    return _matching(node, adapters)


def _matching(node: NodeProfile, adapters: Sequence[AdapterInfo]) -> list[AdapterInfo]:
    if not node.languages:
        return []
    wanted = set(node.languages)
    return [a for a in adapters if not wanted.isdisjoint(a.languages)]
