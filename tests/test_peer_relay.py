"""Peers judge pushes on the in-process Grid: a real hub, the real ClientApp, six simulated nodes that all
hold English (one adapter, so five nodes are idle while one trains; English, because every node then
holds plenty of rows out, whatever rows the hub's own keyed split leaves it), `gate.peers=3`, and one
peer that lies or misbehaves.

Six relays, one per liar (always "worse", always "better", random) and per role of the peers (where the
hub has the data they may veto; where it has too little they decide alone), each shared by the tests
that read it; and one where four peers of five are hostile (NaN, huge token counts, a reply for another
evaluation, a reply after the deadline).
"""

from __future__ import annotations

import pytest

from fedem_flwr.client_app import app as client_app
from fedem_flwr.config.loader import load_run_config
from fedem_flwr.gate.acceptance import Decision
from fedem_flwr.gate.peers import PeerResult, aggregate, combine
from fedem_flwr.relay.bootstrap import open_hub
from fedem_flwr.relay.coordinator import PEER_REVIEW
from fedem_flwr.relay.strategy import RelayStrategy
from tests.support.fake_grid import InProcessGrid

NODES = 6
OVERRIDES = (
    "data.languages=[en] train.max_steps=6 train.batch_size=4 train.progress=false "
    "relay.lease_ttl_s=600 relay.poll_interval_s=0.001 relay.no_node_grace_s=0 relay.max_wall_s=240 "
    "relay.policy=language relay.drain_s=60 merge.every_accepted=null merge.every_s=null "
    "gate.peers=3 gate.peer_min=2 gate.peer_min_tokens=32 gate.max_eval_blocks=8"
)
LIAR = 102


def relay(root, overrides: str, faults: dict[int, str], max_accepted: int, peer_wait_s: float = 60.0):
    run_config = {"overrides": f"{OVERRIDES} {overrides} relay.max_accepted={max_accepted} "
                               f"gate.peer_wait_s={peer_wait_s}", "hub": str(root / "hub")}
    cfg = load_run_config(run_config)
    hub = open_hub(cfg, root / "hub")
    node_configs = {100 + i: {"partition-id": i, "num-partitions": NODES, "cache-dir": str(root / f"cache-{i}")}
                    for i in range(NODES)}
    for node_id, fault in faults.items():
        node_configs[node_id]["peer-fault"] = fault
    grid = InProcessGrid(client_app, node_configs, run_config)
    strategy = RelayStrategy(hub.coordinator, cfg.relay, hub.workbench.spec, max_steps=cfg.train.max_steps,
                             training_rows=hub.training_rows)
    return hub, strategy, strategy.start(grid), grid


def pseudonym_of(hub, strategy, node_id: int) -> str:
    for nid in strategy.nodes.ids():
        if nid == node_id:
            return hub.registry.pseudonym(strategy.nodes.get(nid).identity)
    raise AssertionError(f"node {node_id} is not live")


ROLES = {"veto": "gate.hub_min_tokens=0", "decide": "gate.hub_min_tokens=1000000000"}
RUNS = [(role, liar) for role in ROLES for liar in ("worse", "better", "random")]


@pytest.fixture(scope="module", params=RUNS, ids=[f"{role}-{liar}" for role, liar in RUNS])
def liar_run(request, tmp_path_factory):
    """A relay where peers ``role`` (the hub has the data, or too little) and one peer lies as ``liar``."""
    role, liar = request.param
    hub, strategy, result, grid = relay(tmp_path_factory.mktemp(f"{role}-{liar}"), ROLES[role], {LIAR: liar},
                                        max_accepted=5)
    return role, liar, hub, strategy, result, grid


def reviewed(hub) -> list:
    return [c for c in hub.registry.contributions() if "peers" in c.evaluation]


def recomputed_without(hub, contribution, liar: str) -> bool:
    """The decision the honest peers' reports (as recorded) and the hub's own result give without ``liar``."""
    gate = hub.cfg.gate
    results = [PeerResult(r.peer, r.report["tokens"], r.report["candidate"], r.report["parent"], r.report["weight"])
               for r in hub.registry.peer_reports(contribution.lease_token)
               if r.report is not None and r.peer != liar]
    verdict = aggregate(results, method=gate.peer_aggregate, trim=gate.peer_trim, min_peers=gate.peer_min,
                        min_tokens=gate.peer_min_tokens)
    own = contribution.evaluation["hub"]
    hub_decision = Decision(own["accepted"], "", own["delta"] if own["delta"] is not None else float("nan"))
    return combine(hub_decision, own["tokens"], verdict, hub_min_tokens=gate.hub_min_tokens, margin=gate.margin,
                   tolerance=gate.peer_tolerance).accepted


def test_every_push_waits_for_peers_that_are_never_its_pusher(liar_run):
    role, _, hub, strategy, result, grid = liar_run
    assert result.accepted >= 1, result
    judged = reviewed(hub)
    assert judged, [c.reason for c in hub.registry.contributions()]
    for contribution in judged:
        peers = contribution.evaluation["peers"]
        rows = hub.registry.peer_reports(contribution.lease_token)
        assert len(rows) == peers["asked"] <= 3
        assert all(row.peer != contribution.pseudonym and row.pusher == contribution.pseudonym for row in rows)
        if peers["counted"] >= 2:
            assert peers["role"] == role
        lease = hub.registry.lease(contribution.lease_token)
        assert lease.outcome == PEER_REVIEW
    assert any(c.evaluation["peers"]["counted"] >= 2 for c in judged)
    peer_messages = [m for m in grid.delivered if m.metadata.message_type == "evaluate.peer"]
    assert peer_messages
    # blind: a question names neither the lease nor the pusher
    config = dict(peer_messages[0].content["config"])
    assert not {"lease-token", "holder", "adapter", "pseudonym"} & set(config)


def test_the_liar_never_flips_a_decision(liar_run):
    """The liar never moves the peers' delta outside the honest peers' range, so wherever the honest peers
    agree on which side of the line the push falls, the decision is the one they and the hub give alone.
    (Where two honest peers fall on either side, some peer must break the tie: the liar may.)"""
    role, _, hub, strategy, _, _ = liar_run
    liar = pseudonym_of(hub, strategy, LIAR)
    line = -hub.cfg.gate.margin if role == "decide" else hub.cfg.gate.peer_tolerance
    heard = agreeing = 0
    for contribution in reviewed(hub):
        rows = [r for r in hub.registry.peer_reports(contribution.lease_token) if r.outcome == "counted"]
        honest = [r.report["delta"] for r in rows if r.peer != liar]
        if len(honest) < 2 or len(honest) == len(rows):
            continue  # the liar was not heard on this push, or too few honest peers to compare with
        heard += 1
        delta = contribution.evaluation["peers"]["delta"]
        assert min(honest) - 1e-9 <= delta <= max(honest) + 1e-9, (delta, honest, contribution.reason)
        if all(d <= line for d in honest) or all(d > line for d in honest):
            agreeing += 1
            assert (contribution.decision == "accepted") == recomputed_without(hub, contribution, liar), \
                contribution.reason
    assert heard and agreeing, ("the liar was never heard beside agreeing honest peers; the test shows nothing",
                                [(r.lease_token, r.peer == liar, r.outcome) for r in hub.registry.peer_reports()])


@pytest.mark.parametrize("liar_run", [("veto", "worse")], indirect=True, ids=["veto-worse"])
def test_where_the_hub_has_data_a_liar_saying_worse_loses_standing(liar_run):
    _, _, hub, strategy, _, _ = liar_run
    liar = pseudonym_of(hub, strategy, LIAR)
    standing = hub.registry.peer_standing()
    accepted_with_liar = [c for c in reviewed(hub) if c.decision == "accepted" and any(
        r.peer == liar and r.outcome == "counted" for r in hub.registry.peer_reports(c.lease_token))]
    assert accepted_with_liar, "no accepted push was judged by the liar: the test shows nothing"
    assert standing[liar].disagreed >= 1 and standing[liar].weight < 1.0
    honest = [s for peer, s in standing.items() if peer != liar]
    assert honest and max(s.weight for s in honest) > standing[liar].weight


@pytest.mark.parametrize("liar_run", [("decide", "worse"), ("decide", "random")], indirect=True,
                         ids=["decide-worse", "decide-random"])
def test_where_peers_decide_standing_is_never_changed(liar_run):
    _, _, hub, _, _, _ = liar_run
    assert all(s.agreed == 0 and s.disagreed == 0 for s in hub.registry.peer_standing().values())


def test_hostile_peers_are_recorded_and_dropped_and_the_relay_goes_on(tmp_path):
    faults = {101: "nan", 102: "huge-tokens", 103: "other-evaluation", 104: "late"}
    hub, strategy, result, _ = relay(tmp_path, "gate.hub_min_tokens=0 gate.peer_min=1", faults, max_accepted=3,
                                     peer_wait_s=4.0)
    assert result.accepted >= 1, result
    outcomes = {}
    for node_id, fault in faults.items():
        peer = pseudonym_of(hub, strategy, node_id)
        outcomes[fault] = {r.outcome for r in hub.registry.peer_reports() if r.peer == peer}
    asked = {fault for fault, seen in outcomes.items() if seen}
    assert len(asked) >= 2, outcomes  # most hostile peers were asked at least once
    for fault, seen in outcomes.items():
        assert "counted" not in seen, (fault, seen)  # no hostile report ever counted
    # each failure names what was wrong; a question the late peer's sleep kept from delivery expired (code 3)
    named = {"nan": "finite loss", "huge-tokens": "tokens", "other-evaluation": "claim-mismatch: evaluation",
             "late": "error code 4"}
    for fault, seen in outcomes.items():
        for outcome in seen:
            assert named[fault] in outcome or outcome in ("failed: error code 3", "unanswered"), (fault, outcome)
    assert any(named["late"] in o or o == "unanswered" for o in outcomes["late"]), outcomes
