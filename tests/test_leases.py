"""Leases with a fake clock: exact expiry, sweep, fencing on the lease's state and deadline, node crash."""

from __future__ import annotations

import pytest

from fedem_flwr.relay.leases import (
    REJECT_REASONS,
    AdapterBusy,
    DuplicatePush,
    Lease,
    LeaseBook,
    LeaseError,
    LeaseExpired,
    LeaseNotActive,
    NodeBusy,
    PushRejected,
    Superseded,
    SweepSchedule,
    UnknownToken,
)

T0 = 1_000_000.0
TTL = 100.0


class Table(dict):
    """The registry's lease table: the book's changes persisted by token, read back as its ``lookup``."""

    def persist(self, book: LeaseBook) -> list[Lease]:
        changes = book.pop_changes()
        self.update((lease.token, lease) for lease in changes)
        return changes


@pytest.fixture
def table() -> Table:
    return Table()


@pytest.fixture
def book(table) -> LeaseBook:
    return LeaseBook(lookup=table.get)


def take(book: LeaseBook, adapter: str = "hi", holder: str = "node:1", now: float = T0, base: int = 0) -> Lease:
    return book.acquire(adapter, holder, base_version=base, adapter_version=3, now=now, ttl=TTL)


def test_acquire_returns_active_lease_with_deadline(book, table):
    # Execute
    lease = take(book)

    # Assert
    assert lease == Lease(1, "hi", "node:1", 0, 3, T0, T0 + TTL)
    assert lease.remaining(T0 + 40) == 60
    assert book.holder_of("hi") == "node:1"
    assert book.lease_of("node:1") == lease
    assert not book.is_free("hi") and not book.node_free("node:1")
    assert book.is_free("te") and book.node_free("node:2")
    assert table.persist(book) == [lease]
    assert table.persist(book) == []


def test_one_lease_per_adapter_and_per_node(book):
    take(book, "hi", "node:1")
    with pytest.raises(AdapterBusy, match="'hi' is leased to 'node:1'"):
        take(book, "hi", "node:2")
    with pytest.raises(NodeBusy, match="'node:1' already holds adapter 'hi'"):
        take(book, "te", "node:1")
    assert [lease.token for lease in book.active()] == [1]
    assert book.next_token == 2  # refused acquires consume no token


def test_tokens_strictly_increase_and_survive_restart(book):
    # Prepare
    first = take(book, "hi", "node:1")
    book.release(first.token, T0 + 1, "accepted")
    second = take(book, "hi", "node:2", now=T0 + 2)
    rows = [book.get(1), book.get(2)]

    # Execute: the registry rebuilds the book from its rows and max token + 1
    restarted = LeaseBook(rows, next_token=3)
    third = take(restarted, "te", "node:3", now=T0 + 3)

    # Assert
    assert (first.token, second.token, third.token) == (1, 2, 3)
    assert LeaseBook(rows).next_token == 3  # never below max token + 1, even if the caller says less
    assert LeaseBook([], next_token=7).next_token == 7


def test_rebuild_refuses_two_active_leases_on_one_adapter():
    rows = [Lease(1, "hi", "node:1", 0, 0, T0, T0 + TTL), Lease(2, "hi", "node:2", 0, 0, T0, T0 + TTL)]
    with pytest.raises(AdapterBusy):
        LeaseBook(rows)
    with pytest.raises(LeaseError, match="unknown state 'paused'"):
        LeaseBook([Lease(1, "hi", "node:1", 0, 0, T0, T0 + TTL, state="paused")])


def test_ttl_must_be_positive(book):
    with pytest.raises(LeaseError, match="`ttl` is 0"):
        book.acquire("hi", "node:1", 0, 0, T0, 0)


def test_push_just_before_deadline_is_valid(book):
    lease = take(book)
    assert book.check_push(lease.token, now=T0 + TTL - 0.001) == lease


def test_push_exactly_at_deadline_is_expired(book, table):
    # Prepare
    lease = take(book)
    table.persist(book)

    # Execute
    with pytest.raises(LeaseExpired) as rejected:
        book.check_push(lease.token, now=T0 + TTL)

    # Assert: the access expired the lease, and the change is journaled for persistence
    assert rejected.value.reason == "expired"
    ended = rejected.value.lease
    assert (ended.state, ended.ended, ended.outcome) == ("expired", T0 + TTL, "expired")
    assert table.persist(book) == [ended]
    assert book.is_free("hi") and book.node_free("node:1")


def test_late_push_after_sweep_is_expired(book):
    lease = take(book)
    book.sweep(T0 + TTL + 5)
    with pytest.raises(LeaseExpired, match="expired at"):
        book.check_push(lease.token, now=T0 + TTL + 10)


def test_sweep_expires_exactly_the_due_leases(book, table):
    # Prepare: deadlines at T0+100, T0+110, T0+120
    a = take(book, "a", "n1", now=T0)
    b = take(book, "b", "n2", now=T0 + 10)
    c = take(book, "c", "n3", now=T0 + 20)
    table.persist(book)

    # Execute
    early = book.sweep(T0 + 99.999)
    due = book.sweep(T0 + 110)

    # Assert
    assert early == []
    assert [(x.token, x.state, x.outcome, x.ended) for x in due] == [
        (a.token, "expired", "expired", T0 + 110),
        (b.token, "expired", "expired", T0 + 110),
    ]
    assert book.active() == [c]
    assert table.persist(book) == due


def test_acquire_after_deadline_expires_the_blocking_lease(book, table):
    old = take(book, "hi", "node:1")
    assert not book.is_free("hi") and book.is_free("hi", now=T0 + TTL)
    new = take(book, "hi", "node:2", now=T0 + TTL)
    assert [x.token for x in table.persist(book)] == [old.token, old.token, new.token]
    assert book.get(old.token).state == "expired"  # ended and persisted: read back through the lookup
    assert book.holder_of("hi") == "node:2"


def test_release_after_valid_push(book):
    # Prepare
    lease = take(book)
    book.check_push(lease.token, now=T0 + 50)

    # Execute
    released = book.release(lease.token, T0 + 50, outcome="rejected")

    # Assert
    assert (released.state, released.outcome, released.ended) == ("released", "rejected", T0 + 50)
    assert released.remaining(T0 + 60) == 0 and not released.is_due(T0 + 1000)
    assert book.is_free("hi") and book.node_free("node:1")
    with pytest.raises(LeaseNotActive, match="lease 1: it is released"):
        book.release(lease.token, T0 + 51, outcome="accepted")


def test_unknown_token_is_rejected_and_ends_no_lease(book, table):
    # Prepare
    mine = take(book, "hi", "node:1")
    other = take(book, "te", "node:2")
    table.persist(book)

    # Execute
    with pytest.raises(UnknownToken) as rejected:
        book.check_push(99, now=T0 + 1)

    # Assert: a bad push never ends someone else's lease
    assert rejected.value.reason == "unknown-token"
    assert str(rejected.value) == "unknown-token: token 99 was never issued"
    assert rejected.value.lease is None
    assert book.active() == [mine, other]
    assert table.persist(book) == []


def test_push_is_judged_by_its_tokens_lease_alone(book, table):
    # Prepare: two live leases, on different adapters, nodes and base versions
    mine = take(book, "hi", "node:1", base=0)
    other = take(book, "te", "node:2", base=1)
    table.persist(book)

    # Execute: the book sees a token and a time, nothing the reply claims
    fenced = book.check_push(other.token, now=T0 + 1)

    # Assert: the token's own lease comes back unchanged, and nothing ended or changed
    assert fenced == other == Lease(2, "te", "node:2", 1, 3, T0, T0 + TTL)
    assert book.active() == [mine, other]
    assert table.persist(book) == []


def test_overdue_push_expires_only_its_own_lease(book, table):
    # Prepare: node:1's lease is due, node:2's is live
    mine = take(book, "hi", "node:1")
    other = take(book, "te", "node:2", now=T0 + 50)
    table.persist(book)

    # Execute
    with pytest.raises(LeaseExpired) as rejected:
        book.check_push(mine.token, now=T0 + TTL)

    # Assert
    assert rejected.value.lease.token == mine.token
    assert [(x.token, x.state) for x in table.persist(book)] == [(mine.token, "expired")]
    assert book.active() == [other]


def test_second_push_with_same_token_is_duplicate(book):
    lease = take(book)
    book.check_push(lease.token, now=T0 + 1)
    book.release(lease.token, T0 + 1, "accepted")
    with pytest.raises(DuplicatePush) as rejected:
        book.check_push(lease.token, now=T0 + 2)
    assert rejected.value.reason == "duplicate"


def test_stale_token_after_re_lease_is_superseded(book):
    # Prepare: node:1's lease expires and node:2 gets the adapter
    old = take(book, "hi", "node:1")
    book.sweep(T0 + TTL)
    new = take(book, "hi", "node:2", now=T0 + TTL + 1)

    # Execute
    with pytest.raises(Superseded, match=f"replaced by token {new.token}") as rejected:
        book.check_push(old.token, now=T0 + TTL + 2)

    # Assert
    assert rejected.value.reason == "superseded"
    assert book.get(new.token).active


def test_every_reason_is_a_distinct_code():
    assert sorted(REJECT_REASONS) == sorted({"unknown-token", "expired", "duplicate", "superseded"})
    assert issubclass(Superseded, PushRejected) and issubclass(PushRejected, LeaseError)


def test_node_crash_expires_its_lease_only(book):
    # Prepare
    mine = take(book, "hi", "node:1")
    other = take(book, "te", "node:2")

    # Execute
    ended = book.expire_holder("node:1", T0 + 5, reason="node-gone")

    # Assert
    assert [(x.token, x.state, x.outcome) for x in ended] == [(mine.token, "expired", "node-gone")]
    assert book.expire_holder("node:1", T0 + 6, reason="node-gone") == []
    assert book.active() == [other]
    with pytest.raises(LeaseExpired):
        book.check_push(mine.token, now=T0 + 7)
    # the crashed node and its adapter are free again
    assert take(book, "hi", "node:1", now=T0 + 8).token == 3


def test_expire_one_lease(book):
    lease = take(book)
    ended = book.expire(lease.token, T0 + 3, reason="client-error")
    assert (ended.state, ended.outcome) == ("expired", "client-error")
    with pytest.raises(LeaseNotActive, match="lease 1: it is expired"):
        book.expire(lease.token, T0 + 4)
    with pytest.raises(LeaseNotActive, match="lease 5: it is unknown"):
        book.expire(5, T0 + 4)


def test_hub_restart_expires_every_lease_left_active():
    # Prepare: rows the registry kept from an earlier run
    rows = [
        Lease(4, "hi", "node:1", 0, 2, T0, T0 + TTL),
        Lease(6, "te", "node:2", 0, 1, T0, T0 + TTL),
        Lease(5, "ta", "node:3", 0, 1, T0, T0 + 10, state="released", ended=T0 + 5, outcome="accepted"),
    ]
    book = LeaseBook(rows, next_token=7)

    # Execute
    ended = book.expire_all(T0 + 20)

    # Assert
    assert [(x.token, x.outcome) for x in ended] == [(4, "hub-restart"), (6, "hub-restart")]
    assert book.active() == []
    assert take(book, "hi", "node:9", now=T0 + 21).token == 7


def test_sweep_schedule():
    schedule = SweepSchedule(300)
    assert schedule.due(T0) and schedule.wait_s(T0) == 0
    schedule.mark(T0)
    assert not schedule.due(T0 + 299.9)
    assert schedule.wait_s(T0 + 100) == 200
    assert schedule.due(T0 + 300)
    with pytest.raises(LeaseError, match="`relay.sweep_interval_s` is 0"):
        SweepSchedule(0)


def test_acquire_same_adapter_same_node_after_deadline(book):
    old = take(book, "hi", "node:1")
    new = take(book, "hi", "node:1", now=T0 + TTL)
    assert book.get(old.token).state == "expired" and book.active() == [new]


# -- lanes ---------------------------------------------------------------------------------------------
def test_lanes_fill_lowest_first_and_fence_per_lane():
    # Prepare: two lanes of hi, each held
    book = LeaseBook(lanes=2)
    first, second = take(book, holder="node:1"), take(book, holder="node:2")
    assert (first.lane, second.lane) == (0, 1) and book.leases_of("hi") == [first, second]
    with pytest.raises(AdapterBusy, match=r"all its 2 lanes leased \(lane 0: 'node:1' \(token 1\), lane 1: 'node:2'"):
        take(book, holder="node:3")
    with pytest.raises(NodeBusy):  # no node holds two lanes
        take(book, adapter="te", holder="node:1")

    # Execute: lane 0 expires and is leased again; lane 1's holder pushes in time
    book.sweep(T0 + TTL)
    again = take(book, holder="node:3", now=T0 + TTL)
    with pytest.raises(LeaseExpired):  # lane 1's deadline passed too: it expired at the sweep
        book.check_push(second.token, T0 + TTL)

    # Assert: fencing is per lane
    assert again.lane == 0 and book.holder_of("hi", 0) == "node:3" and book.holder_of("hi", 1) is None


def test_a_stale_token_is_superseded_only_by_its_own_lane():
    book = LeaseBook(lanes=2)
    zero, one = take(book, holder="node:1"), take(book, holder="node:2")
    book.expire(zero.token, T0 + 1)
    book.expire(one.token, T0 + 1)
    newer = take(book, holder="node:3", now=T0 + 2)  # lane 0 again

    replaced = f"token {zero.token} of adapter 'hi' lane 0 was replaced by token {newer.token}"
    with pytest.raises(Superseded, match=replaced):
        book.check_push(zero.token, T0 + 3)
    with pytest.raises(LeaseExpired):  # lane 1 was not leased again: its token simply expired
        book.check_push(one.token, T0 + 3)
    with pytest.raises(LeaseError, match="`lanes` is 0"):
        LeaseBook(lanes=0)
