"""Lease utilisation on simulated time, and the ceiling a setup allows it.

Utilisation is useful lease time over contributor online time, both in simulated seconds since the
run's start:

- a lease's time runs from its push until its reply is due (the plan's completion), but stops when
  its contributor vanishes, at the message's deadline (the hub no longer waits for it) and at the
  run's end;
- a contributor is online inside its availability windows, except while it is away after vanishing;
  a lease it finishes after its window closed keeps it online to the end of that lease (its machine
  stays on for the work it accepted), so useful time never exceeds online time. Online time is
  integrated in closed form from each contributor's windows (``VirtualContributor.online_seconds``):
  exact whatever steps the clock took.

The ceiling: with ``lanes`` holders an adapter at most and one lease a contributor at a time, at most
``sum over adapters of min(holders, lanes)`` contributors train at once, out of all of them.

Pure logic: no Flower, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

OnlineWithin = Callable[[float, float], float]  # (a, b) -> seconds of [a, b) inside a contributor's windows


def holders(adapters: Mapping[str, Iterable[str]], contributors: Iterable[Iterable[str]]) -> dict[str, int]:
    """Per adapter, how many contributors hold data in at least one of its languages."""
    held = [set(languages) for languages in contributors]
    return {name: sum(1 for mine in held if mine & set(languages)) for name, languages in adapters.items()}


def ceiling(holders_per_adapter: Iterable[int], contributors: int, lanes: int) -> float:
    """``min(1, sum_a min(holders_a, lanes) / contributors)``: the share of contributors that can
    hold a lease at once (nan without contributors)."""
    if lanes < 1:
        raise ValueError(f"`lanes` is {lanes!r}; it must be >= 1.")
    if contributors <= 0:
        return math.nan
    return min(1.0, sum(min(int(h), lanes) for h in holders_per_adapter) / contributors)


@dataclass
class _Settled:
    """What one contributor's intervals ended by ``until`` add to its online time, counted once: ``away_s``
    (the online time its ``away_first`` first absences removed) and ``outside_s`` (the time its
    ``busy_first`` first busy spans spent outside its windows), for its windows' integral ``within``."""

    within: OnlineWithin
    until: float = 0.0
    away_first: int = 0
    away_s: float = 0.0
    busy_first: int = 0
    outside_s: float = 0.0


@dataclass
class LeaseMeter:
    """Useful lease seconds and contributor online seconds, as intervals on simulated time (seconds
    since the start). A contributor's leases are recorded in the order they start; its absences do
    not overlap its leases (a vanished contributor is given none while away).

    A run asks at every trace row, with ``now`` moving forward: what an interval ended by then adds is
    settled once (leases, and each contributor's busy and away intervals), so a row costs the
    intervals still open, not every lease and absence of the run. Asked about an earlier ``now``, it
    counts everything again."""

    leases: list[tuple[float, float]] = field(default_factory=list)
    busy: dict[Hashable, list[list[float]]] = field(default_factory=dict)  # merged lease intervals per contributor
    away: dict[Hashable, list[tuple[float, float]]] = field(default_factory=dict)
    _lease_settled: tuple[float, float, int] = (0.0, 0.0, 0)  # (until, seconds, leases before the first open one)
    _online_settled: dict[Hashable, _Settled] = field(default_factory=dict, repr=False)  # per contributor

    def lease(self, who: Hashable, start: float, end: float) -> None:
        """A lease ``who`` works on from ``start`` to ``end`` (its useful time)."""
        end = max(start, end)
        self.leases.append((start, end))
        spans = self.busy.setdefault(who, [])
        if spans and start <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], end)  # overlapping leases (FedAvg: one per language)
            settled = self._online_settled.get(who)
            if settled is not None and settled.busy_first >= len(spans):  # a settled span grew: count again
                del self._online_settled[who]
        else:
            spans.append([start, end])

    def absent(self, who: Hashable, start: float, end: float) -> None:
        """``who`` is away (vanished) from ``start`` until ``end``."""
        self.away.setdefault(who, []).append((start, max(start, end)))

    def lease_seconds(self, now: float) -> float:
        """Useful lease time up to ``now``: each lease counted as far as it got."""
        until, settled, first = self._lease_settled
        if now < until:
            until, settled, first = 0.0, 0.0, 0
        # leases start in push order; a leading run of ended ones is settled for every later ``now``
        while first < len(self.leases) and self.leases[first][1] <= now:
            settled += self.leases[first][1] - self.leases[first][0]
            first += 1
        self._lease_settled = (now, settled, first)
        return settled + sum(max(0.0, min(end, now) - start) for start, end in self.leases[first:])

    def online_seconds(self, now: float, contributors: Mapping[Hashable, OnlineWithin]) -> float:
        """Online time of ``contributors`` (each with its windows' integral) from 0 to ``now``: inside
        the windows and not away, plus the lease time each spent outside its windows.

        Per contributor, the busy and away intervals ended by ``now`` are summed once, in their order,
        and kept with the ``now`` and the integral they were summed for; a later call adds only what
        ended since and the intervals still open. The sums run in the same order however the calls
        fell, so the result is the same, bit for bit, as one call at ``now`` on a fresh meter."""
        total = 0.0
        for who, within in contributors.items():
            settled = self._online_settled.get(who)
            if settled is None or now < settled.until or settled.within != within:
                settled = self._online_settled[who] = _Settled(within=within)
            settled.until = now
            away = self.away.get(who, ())
            while settled.away_first < len(away) and away[settled.away_first][1] <= now:
                start, end = away[settled.away_first]
                settled.away_s += within(max(0.0, start), end)
                settled.away_first += 1
            busy = self.busy.get(who, ())
            while settled.busy_first < len(busy) and busy[settled.busy_first][1] <= now:
                start, end = busy[settled.busy_first]
                settled.outside_s += (end - start) - within(start, end)
                settled.busy_first += 1
            mine = within(0.0, now) - settled.away_s + settled.outside_s
            for start, end in away[settled.away_first:]:
                mine -= within(max(0.0, start), min(end, now)) if start < now else 0.0
            for start, end in busy[settled.busy_first:]:
                if start < now:
                    stop = min(end, now)
                    mine += (stop - start) - within(start, stop)
            total += mine
        return total


def utilisation_fields(lease_s: float, online_s: float, ceiling_: Optional[float]) -> dict[str, Any]:
    """A run's result fields: the times, their ratio, the ceiling and how close the ratio came to it
    (None where a number is undefined: no online time, no ceiling)."""
    utilisation = lease_s / online_s if online_s > 0 else None
    limit = ceiling_ if ceiling_ is not None and math.isfinite(ceiling_) else None
    return {
        "lease_seconds": round(lease_s, 3),
        "online_seconds": round(online_s, 3),
        "lease_utilisation": utilisation,
        "utilisation_ceiling": limit,
        "utilisation_of_ceiling": utilisation / limit if utilisation is not None and limit else None,
    }
