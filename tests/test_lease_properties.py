"""Random interleavings of lease operations keep the relay's invariants (hypothesis, stateful).

The machine drives a ``LeaseBook`` with a fake clock, persists every change into a dict standing in
for the registry (which the book reads ended leases back from, as ``registry.lease``), restarts from
those rows now and then, and checks after every step: at most one active lease per adapter and per
node, tokens strictly increasing, the registry matching the book, a push under any token (whichever
node holds that lease, or a token never issued) judged on that token's own lease alone, accepted
exactly when the registry's rows show it active and before its deadline and otherwise rejected with
the reason those rows give, never ending another lease, and a ledger of accepted versions that never
loses one (every accepted push was trained on the adapter's current version, and the registry holds
exactly as many accepted leases as versions). A push's claims (holder, adapter, base version) are
checked where its reply is parsed, not by the book.

``LanesMachine`` runs the same rules with ``lanes = 3`` (DESIGN decision 20): at most one active lease
per lane of an adapter and at most ``lanes`` per adapter, each new lease on the lowest free lane, no
node on two lanes, fencing per lane (``superseded`` only by a newer lease on the token's own lane),
and an accepted push trained on the adapter's version at its lease's start, which other lanes may
have moved on since (it lands as an update; the ledger still counts one version per accepted push).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from fedem_flwr.relay.leases import (
    REJECT_REASONS,
    AdapterBusy,
    Lease,
    LeaseBook,
    LeaseExpired,
    NodeBusy,
    PushRejected,
)

ADAPTERS = ("a", "b", "c")
NODES = ("n1", "n2", "n3", "n4", "n5")
TTL = 100.0
T0 = 1_000.0


class LeaseMachine(RuleBasedStateMachine):
    LANES = 1

    def __init__(self) -> None:
        super().__init__()
        self.now = T0
        self.rows: dict[int, Lease] = {}  # the registry's lease table
        self.book = LeaseBook(lookup=self.rows.get, lanes=self.LANES)
        self.model: dict[int, tuple[str, str, float, int]] = {}  # active leases: adapter, holder, deadline, lane
        self.versions = Counter()  # adapter -> current version (the accepted ledger)
        self.accepted = Counter()  # adapter -> accepted pushes
        self.max_token = 0

    # ----- helpers
    def persist(self) -> None:
        for lease in self.book.pop_changes():
            self.rows[lease.token] = lease

    def expected_reason(self, token: int) -> str:
        """The reason a push under ``token`` must get, read from the registry's rows alone ("": none,
        the push may end the lease)."""
        lease = self.rows.get(token)
        if lease is None:
            return "unknown-token"
        if lease.active:
            return "expired" if self.now >= lease.deadline else ""
        if lease.state == "released":
            return "duplicate"
        newest = max(t for t, row in self.rows.items() if (row.adapter, row.lane) == (lease.adapter, lease.lane))
        return "superseded" if newest > token else "expired"

    def expire_due_in_model(self, *tokens: int) -> None:
        for token in tokens:
            if token in self.model and self.now >= self.model[token][2]:
                del self.model[token]

    # ----- rules
    @rule(dt=st.sampled_from([0.0, 0.5, 30.0, 99.5, 100.0, 150.0]))
    def advance(self, dt: float) -> None:
        self.now += dt

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def jump_to_a_deadline(self, data) -> None:
        deadline = data.draw(st.sampled_from(sorted(d for _, _, d, _ in self.model.values())))
        self.now = max(self.now, deadline)

    @rule(adapter=st.sampled_from(ADAPTERS), node=st.sampled_from(NODES))
    def acquire(self, adapter: str, node: str) -> None:
        blocking = [t for t, (a, h, _, _) in self.model.items() if a == adapter or h == node]
        self.expire_due_in_model(*blocking)
        held = {lane for a, _, _, lane in self.model.values() if a == adapter}
        lane = min(set(range(self.LANES)) - held, default=None)
        free = lane is not None and not any(h == node for _, h, _, _ in self.model.values())
        try:
            lease = self.book.acquire(adapter, node, 0, self.versions[adapter], self.now, TTL)
        except (AdapterBusy, NodeBusy):
            assert not free
        else:
            assert free
            assert lease.token > self.max_token and lease.lane == lane  # the lowest free lane
            self.max_token = lease.token
            self.model[lease.token] = (adapter, node, lease.deadline, lease.lane)
        self.persist()

    @precondition(lambda self: self.model)
    @rule(data=st.data(), accept=st.booleans())
    def valid_push(self, data, accept: bool) -> None:
        token = data.draw(st.sampled_from(sorted(self.model)))
        adapter, holder, deadline, _ = self.model[token]
        try:
            lease = self.book.check_push(token, self.now)
        except LeaseExpired:
            assert self.now >= deadline
            del self.model[token]
        else:
            assert self.now < deadline
            assert (lease.token, lease.adapter, lease.holder, lease.deadline) == (token, adapter, holder, deadline)
            outcome = "accepted" if accept else "rejected"
            self.book.release(token, self.now, outcome)
            del self.model[token]
            if accept:
                # no lost update: the accepted push was trained on the adapter's current version (one
                # lane), or on an earlier one that other lanes moved on from (it lands as an update)
                assert lease.adapter_version <= self.versions[adapter]
                if self.LANES == 1:
                    assert lease.adapter_version == self.versions[adapter]
                self.versions[adapter] += 1
                self.accepted[adapter] += 1
        self.persist()

    @rule(data=st.data(), issued=st.sampled_from([True, True, True, False]))
    def push_under_any_token(self, data, issued: bool) -> None:
        """A push under a token of any lease ever issued, whichever node holds it and whatever state it
        is in, or under a token never issued; the lease is not released afterwards."""
        if issued and self.rows:
            token = data.draw(st.sampled_from(sorted(self.rows)))
        else:
            token = data.draw(st.sampled_from([0, self.book.next_token, self.book.next_token + 5]))
        row = self.rows.get(token)
        due = row is not None and row.active and self.now >= row.deadline
        before = dict(self.model)
        expected = self.expected_reason(token)
        try:
            lease = self.book.check_push(token, self.now)
        except PushRejected as rejected:
            assert rejected.reason in REJECT_REASONS
            assert rejected.reason == expected, (str(rejected), expected)
            # the lease a rejection names is the token's own: ended here if it was due, else as stored
            if row is None:
                assert rejected.lease is None
            elif due:
                assert rejected.lease == replace(row, state="expired", ended=self.now, outcome="expired")
            else:
                assert rejected.lease == row
        else:
            assert expected == "", f"push under token {token} accepted; expected {expected!r}"
            assert lease == row and lease.active  # the token's own lease, unchanged
        # a push only ever expires its own overdue lease, never ends or changes another
        self.expire_due_in_model(token)
        assert set(self.model) == set(before) - ({token} if due else set())
        changes = self.book.pop_changes()
        assert [(change.token, change.state) for change in changes] == ([(token, "expired")] if due else [])
        for change in changes:
            self.rows[change.token] = change

    @rule()
    def sweep(self) -> None:
        ended = self.book.sweep(self.now)
        self.expire_due_in_model(*list(self.model))
        assert all(lease.outcome == "expired" and lease.ended == self.now for lease in ended)
        self.persist()

    @rule(node=st.sampled_from(NODES))
    def node_crash(self, node: str) -> None:
        self.book.expire_holder(node, self.now, reason="node-gone")
        for token in [t for t, (_, h, _, _) in self.model.items() if h == node]:
            del self.model[token]
        self.persist()

    @rule(active_only=st.booleans())
    def restart(self, active_only: bool) -> None:
        """The hub stops and starts again: rebuild from the registry, expire what the last run left."""
        rows = [lease for lease in self.rows.values() if lease.active or not active_only]
        next_token = max(self.rows, default=0) + 1
        latest: dict[tuple[str, int], int] = {}  # what registry.latest_lease_tokens() reads
        for lease in self.rows.values():
            latest[(lease.adapter, lease.lane)] = max(latest.get((lease.adapter, lease.lane), 0), lease.token)
        self.book = LeaseBook(rows, next_token=next_token, lookup=self.rows.get, latest=latest, lanes=self.LANES)
        self.book.expire_all(self.now)
        self.model.clear()
        self.persist()

    # ----- invariants
    @invariant()
    def one_active_lease_per_lane_and_node(self) -> None:
        for leases in (self.book.active(), [lease for lease in self.rows.values() if lease.active]):
            assert len({(lease.adapter, lease.lane) for lease in leases}) == len(leases)
            assert len({lease.holder for lease in leases}) == len(leases)
            assert all(0 <= lease.lane < self.LANES for lease in leases)
            assert max(Counter(lease.adapter for lease in leases).values(), default=0) <= self.LANES
        for adapter in ADAPTERS:
            assert [lease.lane for lease in self.book.leases_of(adapter)] == sorted(
                lane for a, _, _, lane in self.model.values() if a == adapter)

    @invariant()
    def book_matches_model_and_registry(self) -> None:
        assert {lease.token for lease in self.book.active()} == set(self.model)
        for lease in self.book.active():
            assert self.rows[lease.token] == lease
        assert self.book.next_token > max(self.rows, default=0)

    @invariant()
    def no_accepted_version_is_lost(self) -> None:
        assert self.versions == self.accepted
        stored = Counter(lease.adapter for lease in self.rows.values() if lease.outcome == "accepted")
        assert stored == self.versions


LeaseMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=50, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestLeaseMachine = LeaseMachine.TestCase


class LanesMachine(LeaseMachine):
    LANES = 3


LanesMachine.TestCase.settings = LeaseMachine.TestCase.settings
TestLanesMachine = LanesMachine.TestCase
