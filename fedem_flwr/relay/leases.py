"""Leases: timed, fenced locks on adapters (pure logic; the clock is passed in as ``now``).

A lease hands one adapter to one node until a deadline, on one of the adapter's ``lanes`` (DESIGN
decision 20; one lane, the FedEm rule, unless ``relay.lanes`` says more). Invariants, always:

- at most one active lease per lane of an adapter (so at most ``lanes`` per adapter, on lanes
  ``0 .. lanes - 1``, the lowest free one first), and at most one per node (a SuperNode runs one
  message at a time): no node holds two lanes, and no token is shared by two lanes;
- fencing tokens strictly increase and are never reused, also across restarts (the registry passes
  its max token + 1 as ``next_token``);
- a push ends a lease only under the token of an active lease, before its deadline. Anything else
  (a token never issued, one already pushed, one whose lane was leased again since, a late push)
  raises a ``PushRejected`` subclass whose ``reason`` is a machine-readable code (``REJECT_REASONS``),
  recorded with the contribution. Fencing is per lane: a lease is ``superseded`` when a newer lease
  was issued on its own lane; a newer lease on another lane of the adapter fences nothing (its push
  lands as an update, ``relay.coordinator``).

The book judges a push by its token alone, on that lease's state and deadline. The push's claims are
checked where the reply is parsed (``protocol.messages.parse_train_reply``): its lease token, adapter
and base version against the instruction it answers, matched by message id, and the pusher is the
node that instruction was sent to. A reply whose claims differ from its lease never reaches the book.

Expiry is exact: a lease is due when ``now >= deadline`` (a push arriving exactly at the deadline is
late). Due leases expire at the periodic ``sweep`` and also on any access after the deadline
(``check_push``, ``acquire``).

Persistence: every operation returns the leases it created or changed, and the book also journals
every change (including leases expired on the way by an access) until ``pop_changes()``; persist that
list in one transaction after each step.

Memory stays flat however many leases were served: the book holds the active leases and, for
fencing, the newest token issued per lane of each adapter. An ended lease lives in the registry; a push naming
one is judged on the lease read through ``lookup`` (``registry.lease``), so it still gets its precise
reason (``duplicate``, ``superseded``, ``expired``), also after a restart.
``LeaseBook(active, next_token, lookup=registry.lease, latest=registry.latest_lease_tokens())``
rebuilds the book from the persisted rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Optional

from fedem_flwr.errors import FedemError
from fedem_flwr.hub.records import Lease

STATES = ("active", "released", "expired")
EXPIRED = "expired"
HUB_RESTART = "hub-restart"


class LeaseError(FedemError):
    """A lease operation is not allowed in the current lease state."""


class AdapterBusy(LeaseError):
    """Every lane of the adapter has an active lease."""


class NodeBusy(LeaseError):
    """The node already holds an active lease."""


class LeaseNotActive(LeaseError):
    """The lease to release or expire is unknown or already ended."""


class PushRejected(LeaseError):
    """A pushed adapter fails the fencing checks; ``reason`` is a machine-readable code."""

    reason = "rejected"

    def __init__(self, message: str, lease: Optional[Lease] = None) -> None:
        super().__init__(f"{self.reason}: {message}")
        self.lease = lease


class UnknownToken(PushRejected):
    """The token was never issued (or not by this hub)."""

    reason = "unknown-token"


class LeaseExpired(PushRejected):
    """The push arrived at or after the lease deadline."""

    reason = "expired"


class DuplicatePush(PushRejected):
    """The lease was already released by an earlier push with the same token."""

    reason = "duplicate"


class Superseded(PushRejected):
    """The token is stale: its lane of the adapter was leased again since."""

    reason = "superseded"


REJECT_REASONS = tuple(cls.reason for cls in (UnknownToken, LeaseExpired, DuplicatePush, Superseded))


class LeaseBook:
    """The hub's active leases in memory: a state machine whose every change the registry persists."""

    def __init__(
        self,
        leases: Iterable[Lease] = (),
        next_token: int = 1,
        *,
        lookup: Optional[Callable[[int], Optional[Lease]]] = None,
        latest: Mapping[tuple[str, int], int] = (),
        lanes: int = 1,
    ) -> None:
        """``leases``: the active leases (ended ones only inform ``latest``); ``lookup``: token -> the
        persisted lease, for pushes naming an ended one; ``latest``: (adapter, lane) -> newest token
        issued on that lane; ``lanes``: how many holders one adapter may have at once."""
        if isinstance(lanes, bool) or not isinstance(lanes, int) or lanes < 1:
            raise LeaseError(f"`lanes` is {lanes!r}; it must be a whole number >= 1.")
        self.lanes = lanes
        self._active: dict[int, Lease] = {}
        self._by_adapter: dict[str, dict[int, Lease]] = {}  # adapter -> lane -> its active lease
        self._by_holder: dict[str, Lease] = {}  # active leases only
        self._latest: dict[tuple[str, int], int] = dict(latest)  # (adapter, lane) -> newest token issued there
        self._lookup = lookup
        self._changes: list[Lease] = []
        seen: set[int] = set()
        top = max(self._latest.values(), default=0)
        for lease in leases:
            if lease.state not in STATES:
                raise LeaseError(f"lease {lease.token} has unknown state {lease.state!r}; allowed: {STATES}")
            if lease.token in seen:
                raise LeaseError(f"lease token {lease.token} appears twice")
            seen.add(lease.token)
            if lease.active:  # a lane past ``lanes`` (a hub restarted with fewer) is kept until it ends
                self._check_lane(lease.adapter, lease.lane, lease.holder)
                self._hold(lease)
            lane = (lease.adapter, lease.lane)
            self._latest[lane] = max(self._latest.get(lane, 0), lease.token)
            top = max(top, lease.token)
        self._next_token = max(int(next_token), top + 1)

    # ----- queries
    @property
    def next_token(self) -> int:
        return self._next_token

    def get(self, token: int) -> Optional[Lease]:
        """The lease of ``token``: active ones from memory, ended ones from the journal or ``lookup``."""
        lease = self._active.get(token)
        if lease is not None:
            return lease
        for changed in reversed(self._changes):  # ended but not yet persisted
            if changed.token == token:
                return changed
        return self._lookup(token) if self._lookup is not None else None

    def active(self) -> list[Lease]:
        """Active leases, oldest token first."""
        return sorted(self._active.values(), key=lambda lease: lease.token)

    def holder_of(self, adapter: str, lane: int = 0) -> Optional[str]:
        lease = self._by_adapter.get(adapter, {}).get(lane)
        return lease.holder if lease else None

    def leases_of(self, adapter: str) -> list[Lease]:
        """The active leases on ``adapter``, by lane."""
        return [lease for _, lease in sorted(self._by_adapter.get(adapter, {}).items())]

    def lease_of(self, holder: str) -> Optional[Lease]:
        return self._by_holder.get(holder)

    def is_free(self, adapter: str, now: Optional[float] = None) -> bool:
        """A lane of ``adapter`` is free (with ``now``: a due lease counts as free, as ``acquire`` sees it)."""
        return self._free_lane(adapter, now) is not None

    def node_free(self, holder: str, now: Optional[float] = None) -> bool:
        """``holder`` holds no active lease (with ``now``: a due lease counts as free)."""
        lease = self._by_holder.get(holder)
        return lease is None or (now is not None and lease.is_due(now))

    def pop_changes(self) -> list[Lease]:
        """Every lease created or changed since the last call, in order: persist them in one transaction."""
        changes, self._changes = self._changes, []
        return changes

    # ----- operations
    def acquire(
        self, adapter: str, holder: str, base_version: int, adapter_version: int, now: float, ttl: float
    ) -> Lease:
        """Lease ``adapter`` to ``holder`` until ``now + ttl`` on its lowest free lane; due leases in the
        way (on the adapter, or the holder's) expire first."""
        if not ttl > 0:
            raise LeaseError(f"lease `ttl` is {ttl!r}; it must be > 0 seconds.")
        for blocking in (*self.leases_of(adapter), self._by_holder.get(holder)):
            # the same lease may block both ways: once ended it is no longer active, so it ends once
            if blocking is not None and blocking.token in self._active and blocking.is_due(now):
                self._end(blocking, "expired", now, EXPIRED)
        lane = self._free_lane(adapter)
        if lane is None:
            held = self.leases_of(adapter)
            if len(held) == 1:
                raise AdapterBusy(f"adapter {adapter!r} is leased to {held[0].holder!r} (token {held[0].token})")
            lanes = ", ".join(f"lane {lease.lane}: {lease.holder!r} (token {lease.token})" for lease in held)
            raise AdapterBusy(f"adapter {adapter!r} has all its {self.lanes} lanes leased ({lanes})")
        self._check_lane(adapter, lane, holder)
        lease = Lease(
            token=self._next_token,
            adapter=adapter,
            holder=holder,
            base_version=base_version,
            adapter_version=adapter_version,
            issued=now,
            deadline=now + ttl,
            lane=lane,
        )
        self._next_token += 1
        self._hold(lease)
        self._latest[(adapter, lane)] = lease.token
        self._changes.append(lease)
        return lease

    def check_push(self, token: int, now: float) -> Lease:
        """May a push under ``token`` end its lease at ``now``? Return the active lease unchanged, or
        raise a ``PushRejected`` subclass.

        Only the lease's state and deadline are judged (the push's claims were checked when its reply
        was parsed). In order: token known (``unknown-token``); an overdue active lease expires here
        (``expired``); an ended lease: ``duplicate`` if released, ``superseded`` if the adapter was
        leased again since on the lease's own lane, else ``expired``.
        """
        lease = self._active.get(token)
        if lease is None:
            ended = self.get(token)
            if ended is None or ended.active:  # an active lease the book does not hold is none of its own
                raise UnknownToken(f"token {token} was never issued")
            if ended.state == "released":
                raise DuplicatePush(f"token {token} was already pushed and released at {ended.ended}", ended)
            newest = self._latest.get((ended.adapter, ended.lane), token)
            if newest > token:
                lane = f" lane {ended.lane}" if self.lanes > 1 or ended.lane else ""
                raise Superseded(f"token {token} of adapter {ended.adapter!r}{lane} was replaced by token {newest}",
                                 ended)
            raise LeaseExpired(f"token {token} expired at {ended.ended} ({ended.outcome})", ended)
        if lease.is_due(now):
            lease = self._end(lease, "expired", now, EXPIRED)
            raise LeaseExpired(
                f"token {token} pushed at {now:.3f}, {now - lease.deadline:.3f} s after its deadline", lease
            )
        return lease

    def release(self, token: int, now: float, outcome: str) -> Lease:
        """End the lease after a valid push, whatever the gate decided (``outcome``: accepted/rejected).

        Call it in the same step as ``check_push``: it does not re-check the deadline (the push was in
        time), but a lease expired meanwhile (sweep, node gone) cannot be released.
        """
        lease = self._active.get(token)
        if lease is None:
            raise LeaseNotActive(f"cannot release lease {token}: it is {self._state(token)}")
        return self._end(lease, "released", now, outcome)

    def sweep(self, now: float) -> list[Lease]:
        """Expire every lease due at ``now`` (outcome ``expired``)."""
        due = [lease for lease in self._active.values() if lease.is_due(now)]
        return [self._end(lease, "expired", now, EXPIRED) for lease in sorted(due, key=lambda lease: lease.token)]

    def expire(self, token: int, now: float, reason: str = EXPIRED) -> Lease:
        """End one active lease early, e.g. its train message failed; ``reason`` is the outcome."""
        lease = self._active.get(token)
        if lease is None:
            raise LeaseNotActive(f"cannot expire lease {token}: it is {self._state(token)}")
        return self._end(lease, "expired", now, reason)

    def expire_holder(self, holder: str, now: float, reason: str) -> list[Lease]:
        """Expire the lease of a node that is gone (error code 5) or failed; ``reason`` is the outcome."""
        lease = self._by_holder.get(holder)
        return [] if lease is None else [self._end(lease, "expired", now, reason)]

    def expire_all(self, now: float, reason: str = HUB_RESTART) -> list[Lease]:
        """Expire every active lease, e.g. those an earlier run left when the ServerApp starts."""
        return [self._end(lease, "expired", now, reason) for lease in self.active()]

    # ----- internals
    def _free_lane(self, adapter: str, now: Optional[float] = None) -> Optional[int]:
        """The lowest lane of ``adapter`` below ``lanes`` with no active lease (with ``now``: or a due one)."""
        held = self._by_adapter.get(adapter, {})
        for lane in range(self.lanes):
            lease = held.get(lane)
            if lease is None or (now is not None and lease.is_due(now)):
                return lane
        return None

    def _check_lane(self, adapter: str, lane: int, holder: str) -> None:
        taken = self._by_adapter.get(adapter, {}).get(lane)
        if taken is not None:
            raise AdapterBusy(f"lane {lane} of adapter {adapter!r} is leased to {taken.holder!r} (token {taken.token})")
        held = self._by_holder.get(holder)
        if held is not None:
            raise NodeBusy(f"node {holder!r} already holds adapter {held.adapter!r} (token {held.token})")

    def _hold(self, lease: Lease) -> None:
        self._active[lease.token] = lease
        self._by_adapter.setdefault(lease.adapter, {})[lease.lane] = lease
        self._by_holder[lease.holder] = lease

    def _state(self, token: int) -> str:
        lease = self.get(token)
        return "unknown" if lease is None else lease.state

    def _end(self, lease: Lease, state: str, now: float, outcome: str) -> Lease:
        assert lease.active, f"lease {lease.token} ended twice"
        ended = replace(lease, state=state, ended=now, outcome=outcome)
        del self._active[lease.token]
        lanes = self._by_adapter[lease.adapter]
        del lanes[lease.lane]
        if not lanes:
            del self._by_adapter[lease.adapter]
        del self._by_holder[lease.holder]
        self._changes.append(ended)
        return ended


class SweepSchedule:
    """When the next periodic sweep is due: at once, then every ``interval_s`` after the last one."""

    def __init__(self, interval_s: float) -> None:
        if not interval_s > 0:
            raise LeaseError(f"`relay.sweep_interval_s` is {interval_s!r}; it must be > 0.")
        self.interval_s = float(interval_s)
        self.last: Optional[float] = None

    def due(self, now: float) -> bool:
        return self.last is None or now >= self.last + self.interval_s

    def mark(self, now: float) -> None:
        self.last = now

    def wait_s(self, now: float) -> float:
        """Seconds until the next sweep is due (0 when due now)."""
        return 0.0 if self.last is None else max(0.0, self.last + self.interval_s - now)
