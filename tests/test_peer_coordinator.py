"""A push waiting for its peers, on the coordinator alone (scripted workbench, injected clock): what it
holds, when it is decided, how it lands with lanes, and what a restart makes of it."""

from __future__ import annotations

import torch

from fedem_flwr.config.schema import GateConfig
from fedem_flwr.relay.coordinator import PEER_REVIEW, PENDING, RelayCoordinator
from fedem_flwr.relay.policies import NodeProfile, make_policy
from tests.support.relay import FakeClock, ScriptedWorkbench, seeded_coordinator

GATE = GateConfig(peers=2, peer_min=2, peer_min_tokens=1, peer_wait_s=30.0, hub_min_tokens=0)


class CountingWorkbench(ScriptedWorkbench):
    weights = {"hi": 2000.0, "ta": 2000.0}  # the hub holds enough text to decide (peers may veto)


def nodes(*names: str, languages=("hi",)) -> list[NodeProfile]:
    return [NodeProfile(node=name, languages=tuple(languages), device="cpu", data_size=10_000) for name in names]


def push(coordinator, token: int, loss: float):
    return coordinator.receive_push(token, {"w": torch.tensor([loss])}, metrics={"tokens": 100.0})


def idle(coordinator, *names: str):
    return [(profile, frozenset()) for profile in nodes(*names)]


def leased(coordinator, node: str, adapter: str = "hi"):
    (assignment,) = [a for a in coordinator.assign(nodes(node)) if a.lease.adapter == adapter]
    return assignment.lease


def test_a_waiting_push_ends_its_lease_and_holds_its_adapter_until_decided(tmp_path):
    clock = FakeClock()
    coordinator, registry, _ = seeded_coordinator(tmp_path, clock, gate=GATE, workbench=CountingWorkbench())
    lease = leased(coordinator, "alice")
    outcome = push(coordinator, lease.token, 3.5)
    assert outcome.decision == PENDING and outcome.pending
    assert registry.lease(lease.token).outcome == PEER_REVIEW
    assert registry.contributions() == []  # recorded once decided
    assert coordinator.waiting_for_peers() == 1
    assert "hi" not in {a.lease.adapter for a in coordinator.assign(nodes("bob"))}  # one lane: held

    requests = coordinator.peer_requests(idle(coordinator, "alice", "bob", "carol", "dave"))
    assert {r.identity for r in requests} <= {"bob", "carol", "dave"} and len(requests) == 2  # never the pusher
    assert all(r.candidate["w"].item() == 3.5 and r.parent["w"].item() == 4.0 for r in requests)
    first, second = requests
    coordinator.peer_answered(first.evaluation, {"hi": 300}, {"hi": 3.6}, {"hi": 4.0})
    assert coordinator.conclude_due() == []  # one of two answered, the wait not over
    coordinator.peer_answered(second.evaluation, {"hi": 200}, {"hi": 3.8}, {"hi": 4.0})
    (decided,) = coordinator.conclude_due()
    assert decided.accepted and decided.version == 1

    (contribution,) = registry.contributions()
    assert contribution.evaluation["hub"] == {"tokens": 2000.0, "delta": -0.5, "accepted": True}
    peers = contribution.evaluation["peers"]
    assert (peers["role"], peers["effect"], peers["asked"], peers["counted"]) == ("veto", "agreed", 2, 2)
    assert len(registry.peer_reports(lease.token)) == 2
    assert "hi" in {a.lease.adapter for a in coordinator.assign(nodes("erin"))}  # offered again


def test_peers_veto_a_push_the_hub_accepts_and_their_standing_is_recorded(tmp_path):
    clock = FakeClock()
    gate = GateConfig(peers=3, peer_min=2, peer_min_tokens=1, peer_wait_s=30.0, hub_min_tokens=0)
    coordinator, registry, _ = seeded_coordinator(tmp_path, clock, gate=gate, workbench=CountingWorkbench())
    lease = leased(coordinator, "alice")
    push(coordinator, lease.token, 3.5)
    requests = coordinator.peer_requests(idle(coordinator, "bob", "carol", "dave"))
    for request, worse in zip(requests, (0.4, 0.3, -0.2)):
        coordinator.peer_answered(request.evaluation, {"hi": 300}, {"hi": 4.0 + worse}, {"hi": 4.0})
    (decided,) = coordinator.conclude_due()
    assert not decided.accepted and "vetoed by peers: +0.300 over 3" in decided.reason
    standing = registry.peer_standing()
    # the one that said "better" agreed with the hub; the two that said "worse" agreed with the consensus
    assert sorted((s.agreed, s.disagreed) for s in standing.values()) == [(1, 0), (1, 0), (1, 0)]


def test_a_push_is_decided_on_what_came_in_once_its_wait_is_over(tmp_path):
    clock = FakeClock()
    coordinator, registry, _ = seeded_coordinator(tmp_path, clock, gate=GATE, workbench=CountingWorkbench())
    lease = leased(coordinator, "alice")
    push(coordinator, lease.token, 3.5)
    (request, _) = coordinator.peer_requests(idle(coordinator, "bob", "carol"))
    coordinator.peer_failed(request.evaluation, "error code 2")
    clock.now += 31
    (decided,) = coordinator.conclude_due()
    assert decided.accepted and "too few" in decided.reason  # the hub decides alone
    outcomes = sorted(r.outcome for r in registry.peer_reports(lease.token))
    assert outcomes == ["failed: error code 2", "unanswered"]
    coordinator.peer_answered(request.evaluation + 1, {"hi": 5}, {"hi": 1.0}, {"hi": 4.0})  # late: dropped
    assert len(registry.contributions()) == 1


def test_with_lanes_the_adapter_relays_on_and_a_waiting_push_lands_as_an_update(tmp_path):
    from tests.test_push_update import _hub, deltas64, lora_state

    start = lora_state(0)
    deciding = GateConfig(peers=2, peer_min=2, peer_min_tokens=1, peer_wait_s=30.0, hub_min_tokens=10**9)
    coordinator, registry, _, _ = _hub(tmp_path, start, target=deltas64(lora_state(9)), lanes=2, gate=deciding)
    alice, bob = _hub.leases
    assert coordinator.receive_push(alice.token, lora_state(1), metrics={"tokens": 10.0}).pending
    assert coordinator.receive_push(bob.token, lora_state(2), metrics={"tokens": 10.0}).pending
    assert coordinator.waiting_for_peers() == 2 and coordinator.pool.get("hi") is not None  # it relays on

    def answer_better(request) -> None:
        coordinator.peer_answered(request.evaluation, {"hi": 100}, {"hi": 3.0}, {"hi": 4.0})

    requests = coordinator.peer_requests([(profile, frozenset()) for profile in nodes("c", "d", "e", "f")])
    assert len(requests) == 4
    for request in requests:
        answer_better(request)
    first, second = coordinator.conclude_due()
    assert first.accepted and first.version == 1
    # the second push started from v0 too: it lands as its change added to v1, judged again by the hub
    assert second.accepted and second.version == 2
    landed = registry.adapter_version("hi", 2)
    assert landed.metrics["update"]["onto_version"] == 1 and landed.metrics["update"]["from_version"] == 0


def test_a_push_waiting_when_the_hub_stopped_is_recorded_as_rejected_at_the_next_start(tmp_path):
    clock = FakeClock()
    coordinator, registry, store = seeded_coordinator(tmp_path, clock, gate=GATE, workbench=CountingWorkbench())
    lease = leased(coordinator, "alice")
    push(coordinator, lease.token, 3.5)
    restarted = RelayCoordinator(registry, store, make_policy("language", __import__("random").Random(0)),
                                 CountingWorkbench(), lease_ttl_s=100, sweep_interval_s=10, gate=GATE, clock=clock)
    restarted.recover()
    (contribution,) = registry.contributions()
    assert contribution.decision == "rejected" and contribution.reason.startswith("hub-restart")
    restarted.recover()  # once only
    assert len(registry.contributions()) == 1
    assert "hi" in {a.lease.adapter for a in restarted.assign(nodes("bob"))}
