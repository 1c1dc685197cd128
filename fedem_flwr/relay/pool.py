"""The free adapters, indexed so a policy chooses in O(log n) instead of scanning them all.

With 10,000 adapters a linear scan per choice costs about as much as the whole lease bookkeeping
budget (milliseconds in Python). ``AdapterPool`` keeps the free adapters with three indexes, updated
as leases start (``take``) and end (``put``):

- a list with O(1) random access (a ``Sequence``, so ``rng.choice`` works on it);
- names in sorted order, overall and per language (round-robin: the next name after the last one);
- a heap by (served at all, last served, name), overall and per language, with lazy deletion
  (least-recent).

Policies recognise a ``FreeAdapters`` view and use the indexes; on any other sequence they scan it.
``fair`` ranks by tokens trained, which change at every push: it scans a node's languages' free
adapters (``matching``) instead of keeping a heap re-keyed at every put. A put replaces the whole
``AdapterInfo``, so what a policy reads is what the coordinator put last (tokens included).
Both paths choose the same adapter (tested), so the pool is an optimisation, never a behaviour.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, bisect_right, insort
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Optional, Union, overload

if TYPE_CHECKING:
    from fedem_flwr.relay.policies import AdapterInfo

_Entry = tuple[bool, float, str, int]  # (served, last_served or 0, name, stamp)


class _Index:
    """Sorted names and a least-recent heap over one subset (all adapters, or one language)."""

    __slots__ = ("names", "heap")

    def __init__(self) -> None:
        self.names: list[str] = []
        self.heap: list[_Entry] = []


class AdapterPool:
    """Free adapters by name; ``take`` when a lease starts, ``put`` (with new version/time) when it ends."""

    def __init__(self, adapters: Iterable[AdapterInfo] = ()) -> None:
        self._info: dict[str, AdapterInfo] = {}
        self._order: list[str] = []  # free names, for O(1) random access
        self._pos: dict[str, int] = {}
        self._stamp: dict[str, int] = {}  # bumped at each put/take: older heap entries are stale
        self._all = _Index()
        self._by_language: dict[str, _Index] = {}
        for info in adapters:
            self.put(info)

    # ----- changes
    def put(self, info: AdapterInfo) -> None:
        """Mark ``info.name`` free with this info (replacing the old info if it was free already)."""
        if info.name in self._info:
            self.take(info.name)
        stamp = self._stamp.get(info.name, 0) + 1
        self._stamp[info.name] = stamp
        self._info[info.name] = info
        self._pos[info.name] = len(self._order)
        self._order.append(info.name)
        entry = (info.last_served is not None, info.last_served or 0.0, info.name, stamp)
        for index in self._indexes(info, create=True):
            insort(index.names, info.name)
            heapq.heappush(index.heap, entry)
            if len(index.heap) > 2 * len(index.names) + 64:
                self._compact(index)

    def take(self, name: str) -> AdapterInfo:
        """Mark ``name`` leased; returns its info. ``KeyError`` when it is not free."""
        info = self._info.pop(name)
        self._stamp[name] += 1
        last = self._order.pop()
        if last != name:  # swap-remove keeps random access O(1)
            index = self._pos[name]
            self._order[index] = last
            self._pos[last] = index
        del self._pos[name]
        for index in self._indexes(info, create=False):
            del index.names[bisect_left(index.names, name)]
        return info

    # ----- views
    def free(self, languages: Optional[Sequence[str]] = None) -> FreeAdapters:
        """The free adapters, or those sharing a language with ``languages`` (what policies receive)."""
        return FreeAdapters(self, tuple(languages) if languages else None)

    def get(self, name: str) -> Optional[AdapterInfo]:
        return self._info.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._info

    def __len__(self) -> int:
        return len(self._order)

    # ----- queries for policies
    def least_recent(self, languages: Optional[Sequence[str]] = None) -> Optional[AdapterInfo]:
        """Never served first, then served longest ago, ties by name; among ``languages`` if given."""
        best: Optional[_Entry] = None
        for index in self._subset(languages):
            heap = index.heap
            while heap and self._stale(heap[0]):
                heapq.heappop(heap)
            if heap and (best is None or heap[0] < best):
                best = heap[0]
        return None if best is None else self._info[best[2]]

    def next_after(self, last: Optional[str], languages: Optional[Sequence[str]] = None) -> Optional[AdapterInfo]:
        """The first free name after ``last`` in name order, wrapping around; among ``languages`` if given."""
        after: Optional[str] = None
        first: Optional[str] = None
        for index in self._subset(languages):
            names = index.names
            if not names:
                continue
            if first is None or names[0] < first:
                first = names[0]
            if last is not None:
                at = bisect_right(names, last)
                if at < len(names) and (after is None or names[at] < after):
                    after = names[at]
        chosen = after if after is not None else first
        return None if chosen is None else self._info[chosen]

    def matching(self, languages: Sequence[str]) -> list[AdapterInfo]:
        """The free adapters sharing a language with ``languages``, by name, from the language indexes:
        what a scanning policy (``fair``) reads costs the matches, not the whole pool."""
        names = set().union(*(index.names for index in self._subset(languages)))
        return [self._info[name] for name in sorted(names)]

    def has_language(self, languages: Sequence[str]) -> bool:
        return any(index.names for index in self._subset(languages))

    # ----- internals
    def _subset(self, languages: Optional[Sequence[str]]) -> list[_Index]:
        if languages is None:
            return [self._all]
        return [self._by_language[lang] for lang in dict.fromkeys(languages) if lang in self._by_language]

    def _indexes(self, info: AdapterInfo, create: bool) -> list[_Index]:
        indexes = [self._all]
        for lang in dict.fromkeys(info.languages):
            if create and lang not in self._by_language:
                self._by_language[lang] = _Index()
            indexes.append(self._by_language[lang])
        return indexes

    def _stale(self, entry: _Entry) -> bool:
        return entry[2] not in self._info or self._stamp[entry[2]] != entry[3]

    def _compact(self, index: _Index) -> None:
        index.heap = [entry for entry in index.heap if not self._stale(entry)]
        heapq.heapify(index.heap)


class FreeAdapters(Sequence["AdapterInfo"]):
    """A read-only view of a pool's free adapters (optionally only those of some languages).

    It is a plain ``Sequence`` for code that scans; the whole pool indexes in O(1), a language view
    builds its list on first indexing.
    """

    def __init__(self, pool: AdapterPool, languages: Optional[tuple[str, ...]] = None) -> None:
        self.pool = pool
        self.languages = languages

    def least_recent(self) -> Optional[AdapterInfo]:
        return self.pool.least_recent(self.languages)

    def next_after(self, last: Optional[str]) -> Optional[AdapterInfo]:
        return self.pool.next_after(last, self.languages)

    def _items(self) -> list[AdapterInfo]:
        pool = self.pool
        if self.languages is None:
            return [pool._info[name] for name in pool._order]
        wanted = set(self.languages)
        return [pool._info[name] for name in pool._order if not wanted.isdisjoint(pool._info[name].languages)]

    def __len__(self) -> int:
        if self.languages is None:
            return len(self.pool)
        return len(self._items()) if self.pool.has_language(self.languages) else 0

    def __bool__(self) -> bool:
        return len(self.pool) > 0 if self.languages is None else self.pool.has_language(self.languages)

    @overload
    def __getitem__(self, i: int) -> AdapterInfo: ...

    @overload
    def __getitem__(self, i: slice) -> list[AdapterInfo]: ...

    def __getitem__(self, i: Union[int, slice]) -> Union[AdapterInfo, list[AdapterInfo]]:
        if self.languages is None and isinstance(i, int):
            return self.pool._info[self.pool._order[i]]
        return self._items()[i]

    def __iter__(self) -> Iterator[AdapterInfo]:
        return iter(self._items())
