"""The relay's decisions without Flower or a model: fencing, gate, persistence, restart.

The workbench is scripted (it returns the held-out losses a test wants): the coordinator must not
care how losses are computed, only act on them.
"""

from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import load_file

from fedem_flwr.hub.store import ArtifactRef
from fedem_flwr.relay.coordinator import RelayCoordinator, state_digest
from fedem_flwr.relay.policies import NodeProfile, make_policy
from tests.support.relay import TTL, FakeClock, ScriptedWorkbench, seeded_coordinator


@pytest.fixture
def hub(tmp_path):
    clock = FakeClock()
    coordinator, registry, store = seeded_coordinator(tmp_path, clock)
    coordinator.recover()
    return coordinator, registry, store, clock


def _lease_hi(coordinator, node="sim:0"):
    (assignment,) = coordinator.assign([NodeProfile(node, ("hi",))])
    assert assignment.adapter.name == "hi"
    return assignment.lease


def _push(coordinator, lease, loss, **kw):
    args = dict(token=lease.token, state={"w": torch.tensor([loss])})
    args.update(kw)
    return coordinator.receive_push(**args)


def test_better_push_becomes_a_new_version(hub):
    coordinator, registry, store, clock = hub
    lease = _lease_hi(coordinator)
    clock.now += 5

    outcome = _push(coordinator, lease, 3.5)

    assert outcome.accepted and outcome.version == 1
    version = registry.latest_adapter_version("hi")
    assert (version.version, version.parent_version, version.revision) == (1, 0, "v1")
    assert version.metrics["heldout"]["hi"] == 3.5
    stored = store.get(ArtifactRef(version.repo, version.revision, version.digest))
    assert load_file(str(stored / "adapter_model.safetensors"))["w"].tolist() == [3.5]
    (contribution,) = registry.contributions()
    assert contribution.decision == "accepted" and contribution.adapter_version == 1
    assert contribution.pseudonym == registry.pseudonym("sim:0") and "sim:0" not in contribution.pseudonym
    assert contribution.digest == state_digest({"w": torch.tensor([3.5])})
    assert registry.lease(lease.token).state == "released"


def test_worse_push_is_rejected_and_keeps_nothing(hub):
    coordinator, registry, _, _ = hub
    lease = _lease_hi(coordinator)

    outcome = _push(coordinator, lease, 4.5)

    assert not outcome.accepted and "hi" in outcome.reason
    assert registry.latest_adapter_version("hi").version == 0
    stored = registry.lease(lease.token)
    assert (stored.state, stored.outcome) == ("released", "rejected")


# A push names only the hub's own lease token: a reply's claims (token, adapter, base version) are
# checked against its instruction when it is parsed (claim-mismatch, test_relay_hardening), and the
# lease book's own rules on holder, adapter and base are tested in test_leases.


def test_a_push_under_a_token_never_issued_is_dropped_and_the_lease_goes_on(hub):
    coordinator, registry, _, _ = hub
    lease = _lease_hi(coordinator)

    outcome = _push(coordinator, lease, 1.0, token=999)

    assert (outcome.decision, outcome.reason) == ("rejected", "unknown-token: token 999 was never issued")
    assert registry.latest_adapter_version("hi").version == 0
    assert registry.contributions() == []  # no lease names an adapter to record it against
    assert registry.lease(lease.token).state == "active"  # the holder may still push
    assert _push(coordinator, lease, 3.5).accepted


def test_a_push_under_a_superseded_token_is_recorded_against_its_adapter(hub):
    coordinator, registry, _, clock = hub
    stale = _lease_hi(coordinator)
    clock.now += TTL  # the lease expires, and the adapter is leased again
    fresh = _lease_hi(coordinator, node="sim:1")

    outcome = _push(coordinator, stale, 1.0)

    assert outcome.reason == f"superseded: token {stale.token} of adapter 'hi' was replaced by token {fresh.token}"
    (contribution,) = registry.contributions()
    assert (contribution.adapter, contribution.lease_token, contribution.decision) == ("hi", stale.token, "rejected")
    assert contribution.pseudonym == registry.pseudonym("sim:0")
    assert registry.latest_adapter_version("hi").version == 0


def test_late_and_duplicate_pushes_are_rejected(hub):
    coordinator, registry, _, clock = hub
    first = _lease_hi(coordinator)
    assert _push(coordinator, first, 3.9).accepted
    assert _push(coordinator, first, 3.0).reason.startswith("duplicate")

    late = _lease_hi(coordinator)
    clock.now += TTL  # exactly at the deadline: late
    outcome = _push(coordinator, late, 1.0)

    assert outcome.reason.startswith("expired")
    assert registry.lease(late.token).state == "expired"
    assert registry.latest_adapter_version("hi").version == 1
    assert [c.decision for c in sorted(registry.contributions(), key=lambda c: c.id)] == ["accepted", "rejected", "rejected"]


def test_invalid_weights_end_the_lease_as_rejected(hub):
    coordinator, registry, _, _ = hub
    lease = _lease_hi(coordinator)

    outcome = _push(coordinator, lease, 0.0, state=None, invalid_reason="non-finite values in `w`")

    assert outcome.reason == "invalid-adapter: non-finite values in `w`"
    assert registry.lease(lease.token).outcome == "rejected"
    assert registry.contributions()[0].validation == {"ok": False}


def test_one_lease_per_adapter_and_per_node(hub):
    coordinator, _, _, _ = hub
    nodes = [NodeProfile("sim:0", ("hi",)), NodeProfile("sim:1", ("hi", "ta")), NodeProfile("sim:2", ("hi",))]

    assignments = coordinator.assign(nodes)
    again = coordinator.assign(nodes)

    assert sorted(a.adapter.name for a in assignments) == ["hi", "ta"]  # two adapters, three nodes
    assert len({a.lease.holder for a in assignments}) == 2
    assert again == []


def test_sweep_restart_and_node_loss_expire_leases(hub, tmp_path):
    coordinator, registry, store, clock = hub
    lease = _lease_hi(coordinator)
    clock.now += 5
    assert coordinator.tick() == []  # the next sweep is not due yet
    clock.now += TTL
    swept = coordinator.tick()
    assert [l.token for l in swept] == [lease.token]
    assert registry.lease(lease.token).outcome == "expired"

    held = _lease_hi(coordinator, node="sim:1")
    assert [l.token for l in coordinator.node_gone("sim:1")] == [held.token]

    left_over = _lease_hi(coordinator, node="sim:2")
    restarted = RelayCoordinator(
        registry, store, make_policy("language", random.Random(0)), ScriptedWorkbench(),
        lease_ttl_s=TTL, sweep_interval_s=10, clock=clock,
    )
    assert [l.token for l in restarted.recover()] == [left_over.token]
    assert registry.lease(left_over.token).outcome == "hub-restart"
    assert not registry.leases(active_only=True)
    # Tokens keep increasing across the restart.
    assert _lease_hi(restarted, node="sim:3").token > left_over.token
