"""Ended leases live in the registry, not in memory: the book stays flat however many leases were
served, and a push naming an ended token still gets its precise reason, also after a restart."""

from __future__ import annotations

import random
import tracemalloc

import pytest
import torch

from fedem_flwr.hub.registry import Registry
from fedem_flwr.relay.coordinator import RelayCoordinator
from fedem_flwr.relay.leases import DuplicatePush, LeaseBook, LeaseExpired, Superseded
from fedem_flwr.relay.policies import NodeProfile, make_policy
from tests.support.relay import FakeClock, seeded_coordinator

T0 = 1_000_000.0
TTL = 100.0


def serve(book: LeaseBook, count: int, start: float, persist=lambda lease: None) -> float:
    """Lease, push and release ``count`` times over 8 adapters and 8 nodes; returns the clock after."""
    now = start
    for i in range(count):
        lease = book.acquire(f"a{i % 8}", f"node:{i % 8}", 0, 0, now, TTL)
        book.check_push(lease.token, now + 1)
        book.release(lease.token, now + 1, "rejected")
        for change in book.pop_changes():
            persist(change)
        now += 2
    return now


def test_book_memory_does_not_grow_with_leases_served():
    # Prepare: a warm book, then measure what 20,000 more leases leave behind in leases.py
    book = LeaseBook()
    now = serve(book, 2_000, T0)
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        serve(book, 20_000, now)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()

    # Assert: nothing per lease stays (the old book kept every lease: about 3 MB here)
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename")
                if stat.traceback[0].filename.endswith("leases.py"))
    assert grown < 16_000, f"the lease book grew by {grown} bytes over 20,000 leases"
    assert book.active() == [] and book.next_token == 22_001


def _registry_with_adapters(names=("hi", "ta")) -> Registry:
    registry = Registry.memory()
    registry.add_checkpoint(None, "init", "t/base", "v0", "d0", {}, T0)
    for name in names:
        registry.add_adapter(name, [name], "causal-lm", {}, T0)
    return registry


def _book_from(registry: Registry) -> LeaseBook:
    """What RelayCoordinator builds at start."""
    return LeaseBook(registry.leases(active_only=True), next_token=registry.max_lease_token() + 1,
                     lookup=registry.lease, latest=registry.latest_lease_tokens())


def _persist(registry: Registry, book: LeaseBook) -> None:
    with registry.atomic():
        for lease in book.pop_changes():
            registry.save_lease(lease)


def test_ended_tokens_keep_their_precise_reason_after_a_restart():
    # Prepare: one run releases a lease (hi), lets one expire (ta), then re-leases ta
    registry = _registry_with_adapters()
    book = _book_from(registry)
    released = book.acquire("hi", "node:1", 0, 0, T0, TTL)
    book.release(released.token, T0 + 1, "accepted")
    expired = book.acquire("ta", "node:2", 0, 0, T0, TTL)
    book.sweep(T0 + TTL)
    _persist(registry, book)
    stale = book.acquire("ta", "node:3", 0, 0, T0 + TTL + 1, TTL)
    book.expire(stale.token, T0 + TTL + 2, "client-error")
    lonely = book.acquire("hi", "node:4", 0, 0, T0 + TTL + 3, TTL)
    book.sweep(T0 + 2 * TTL + 3)
    _persist(registry, book)

    # Execute: the hub restarts; only active leases (none) are read into memory
    restarted = _book_from(registry)
    now = T0 + 3 * TTL

    # Assert: the registry's rows give each old token its own reason, not "unknown-token"
    with pytest.raises(DuplicatePush):
        restarted.check_push(released.token, now)
    with pytest.raises(Superseded, match=f"replaced by token {stale.token}"):
        restarted.check_push(expired.token, now)
    with pytest.raises(LeaseExpired, match="client-error"):
        restarted.check_push(stale.token, now)
    with pytest.raises(LeaseExpired, match=r"\(expired\)"):
        restarted.check_push(lonely.token, now)
    assert restarted.active() == [] and restarted.next_token == lonely.token + 1


def test_latest_lease_tokens_per_adapter():
    registry = _registry_with_adapters(("hi", "ta", "te"))
    book = _book_from(registry)
    book.acquire("hi", "n1", 0, 0, T0, TTL)
    book.acquire("ta", "n2", 0, 0, T0, TTL)
    book.acquire("hi", "n3", 0, 0, T0 + TTL, TTL)  # the first hi lease expires on the way
    _persist(registry, book)
    assert registry.latest_lease_tokens() == {("hi", 0): 3, ("ta", 0): 2}  # te was never leased


def test_coordinator_after_restart_calls_a_second_push_a_duplicate(tmp_path):
    # Prepare: a push accepted in one run
    clock = FakeClock()
    coordinator, registry, store = seeded_coordinator(tmp_path, clock)
    (assignment,) = coordinator.assign([NodeProfile("node:1", ("hi",))])
    lease = assignment.lease
    first = coordinator.receive_push(lease.token, {"w": torch.tensor([3.0])})
    assert first.accepted

    # Execute: the hub restarts and the same reply arrives again
    restarted = RelayCoordinator(registry, store, make_policy("language", random.Random(0)),
                                 coordinator.workbench, lease_ttl_s=TTL, sweep_interval_s=10, clock=clock)
    again = restarted.receive_push(lease.token, {"w": torch.tensor([2.0])})

    # Assert: rejected as a duplicate, and no second version
    assert (again.decision, again.reason.split(":")[0]) == ("rejected", "duplicate")
    assert registry.latest_adapter_version(lease.adapter).version == 1

