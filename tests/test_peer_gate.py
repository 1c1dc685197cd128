"""Peer judging's pure logic: aggregation, the combined decision, standing, peer choice, waiting pushes."""

from __future__ import annotations

import random

import pytest

from fedem_flwr.gate.acceptance import Decision
from fedem_flwr.gate.peers import (
    AGREED,
    DECIDE,
    DECIDED,
    TOO_FEW,
    VETO,
    VETOED,
    PeerResult,
    aggregate,
    combine,
    judged_reports,
    standing,
    trimmed_mean,
    weighted_median,
)
from fedem_flwr.relay.peer_review import COUNTED, UNANSWERED, PeerReview
from fedem_flwr.relay.peers import Candidate, choose_peers

HUB_ACCEPTS = Decision(True, "loss 4.000 -> 3.900 on hi (-0.100)", -0.1)
HUB_REJECTS = Decision(False, "loss 4.000 -> 4.100 on hi (+0.100); needs no increase", 0.1)


def peer(name: str, delta: float, tokens: int = 400, standing_: float = 1.0, lang: str = "hi") -> PeerResult:
    return PeerResult(name, {lang: tokens}, {lang: 4.0 + delta}, {lang: 4.0}, standing_)


def decide(results, hub: Decision, hub_tokens: float, method: str = "median"):
    verdict = aggregate(results, method=method, min_peers=2, min_tokens=256)
    return combine(hub, hub_tokens, verdict, hub_min_tokens=1024, margin=0.0, tolerance=0.05)


# -- one peer's delta, and the aggregates ---------------------------------------------------------------


def test_a_peers_delta_is_its_paired_difference_weighted_by_tokens():
    result = PeerResult("p", {"hi": 300, "mr": 100}, {"hi": 3.0, "mr": 5.0}, {"hi": 3.5, "mr": 4.0})
    assert result.total_tokens == 400
    assert result.delta == pytest.approx((300 * -0.5 + 100 * 1.0) / 400)


def test_weighted_median_and_trimmed_mean_by_hand():
    assert weighted_median([3.0, 1.0, 2.0], [1, 1, 1]) == 2.0
    assert weighted_median([1.0, 2.0], [1, 1]) == 1.5  # two equal weights: their mean
    assert weighted_median([1.0, 2.0, 10.0], [1, 1, 5]) == 10.0
    assert trimmed_mean([0.0, 1.0, 2.0, 100.0], [1, 1, 1, 1], 0.25) == pytest.approx(1.5)
    assert trimmed_mean([-50.0, 1.0, 3.0], [1, 1, 1], 0.0) == pytest.approx(1.0)  # one cut each end from three on


def test_peers_count_only_with_enough_reports_and_tokens():
    assert aggregate([peer("a", -0.1)], min_peers=2).delta is None
    assert aggregate([peer("a", -0.1, 100), peer("b", -0.1, 100)], min_peers=2, min_tokens=256).delta is None
    verdict = aggregate([peer("a", -0.1), peer("b", -0.3)], min_peers=2, min_tokens=256)
    assert verdict.counts and verdict.counted == 2 and verdict.tokens == 800
    assert verdict.delta == pytest.approx(-0.2)


def test_no_peer_weighs_more_than_the_median_peer():
    verdict = aggregate([peer("a", -0.1, 200), peer("b", -0.2, 400), peer("liar", 9.0, 10**9)], min_peers=2)
    assert verdict.weights == {"a": 200.0, "b": 400.0, "liar": 400.0}
    assert verdict.delta == pytest.approx(-0.1)  # the liar's huge claim moves the median to an honest value only


def test_standing_weighs_reports_and_zero_standing_is_not_counted():
    assert standing(0, 0) == 1.0
    assert standing(3, 0) == 1.0
    assert standing(1, 3) == pytest.approx(2 / 5)
    verdict = aggregate([peer("a", -0.1), peer("b", -0.1), peer("c", 5.0, standing_=0.0)], min_peers=2)
    assert verdict.counted == 2 and "c" not in verdict.weights


# -- the decision ---------------------------------------------------------------------------------------


def test_where_the_hub_has_data_peers_veto_but_never_accept():
    worse = [peer("a", 0.3), peer("b", 0.2), peer("c", 0.4)]
    vetoed = decide(worse, HUB_ACCEPTS, hub_tokens=4096)
    assert (vetoed.accepted, vetoed.role, vetoed.effect) == (False, VETO, VETOED)
    assert "vetoed by peers: +0.300 over 3" in vetoed.reason
    better = [peer("a", -0.3), peer("b", -0.2), peer("c", -0.4)]
    kept = decide(better, HUB_REJECTS, hub_tokens=4096)
    assert (kept.accepted, kept.effect) == (False, AGREED)
    assert decide(better, HUB_ACCEPTS, hub_tokens=4096).accepted


def test_where_the_hub_has_too_little_peers_decide():
    better = [peer("a", -0.3), peer("b", -0.2), peer("c", -0.4)]
    judged = decide(better, HUB_REJECTS, hub_tokens=480)
    assert (judged.accepted, judged.role, judged.effect) == (True, DECIDE, DECIDED)
    assert "hub's own held-out (480 tokens, too few to decide alone)" in judged.reason
    assert not decide([peer("a", 0.3), peer("b", 0.2)], HUB_ACCEPTS, hub_tokens=480).accepted


def test_pooled_peers_decide_with_the_hubs_own_result_weighted_by_tokens():
    peers = [peer("a", -0.10, 300), peer("b", -0.20, 300)]
    verdict = aggregate(peers, min_peers=2)
    hub = Decision(False, "loss 4.000 -> 4.300 on hi (+0.300)", 0.3)
    alone = combine(hub, 600, verdict, hub_min_tokens=1024, margin=0.0, tolerance=0.05)
    pooled = combine(hub, 600, verdict, hub_min_tokens=1024, margin=0.0, tolerance=0.05, pool=True)
    assert alone.accepted and not pooled.accepted  # (600 * 0.3 + 600 * -0.15) / 1200 = +0.075
    assert "pooled with the hub's own (+0.300, 600 tokens): +0.075" in pooled.reason


def test_too_few_peers_leave_the_hub_to_decide():
    judged = decide([peer("a", 5.0)], HUB_ACCEPTS, hub_tokens=480)
    assert (judged.accepted, judged.effect) == (True, TOO_FEW)


@pytest.mark.parametrize("method", ["median", "trimmed"])
@pytest.mark.parametrize("liar", ["worse", "better", "random"])
@pytest.mark.parametrize("hub_tokens", [4096, 480])
def test_one_liar_among_three_never_flips_a_decision(method, liar, hub_tokens):
    rng = random.Random(f"{method}{liar}{hub_tokens}")
    for _ in range(300):
        sign = rng.choice([-1, 1])
        honest = [peer("a", sign * rng.uniform(0.06, 0.5), rng.randint(256, 2048)),
                  peer("b", sign * rng.uniform(0.06, 0.5), rng.randint(256, 2048))]
        hub = HUB_ACCEPTS if sign < 0 else HUB_REJECTS
        told = {"worse": 10.0, "better": -10.0, "random": rng.choice([-10.0, 10.0])}[liar]
        lying = peer("liar", told, rng.choice([1, 2048, 10**9]))
        alone = decide(honest, hub, hub_tokens, method)
        with_liar = decide(honest + [lying], hub, hub_tokens, method)
        assert with_liar.accepted == alone.accepted, (honest, lying)


def test_standing_changes_only_where_the_hub_had_data_and_against_both():
    results = [peer("a", -0.2), peer("b", -0.3), peer("liar", 1.0)]
    verdict = aggregate(results, min_peers=2)
    assert judged_reports(results, verdict, HUB_ACCEPTS, VETO, 0.0) == {"a": True, "b": True, "liar": False}
    assert judged_reports(results, verdict, HUB_ACCEPTS, DECIDE, 0.0) == {}  # the hub could not tell
    # a peer that disagrees with the consensus but agrees with the hub is not counted against
    split = [peer("a", -0.2), peer("b", -0.3), peer("c", 0.4)]
    assert judged_reports(split, aggregate(split, min_peers=2), HUB_REJECTS, VETO, 0.0)["c"] is True


# -- who is asked ----------------------------------------------------------------------------------------


def candidates(*names: str, serving=("hi",), base: str = "b1") -> list[Candidate]:
    return [Candidate(name, tuple(serving), frozenset({base})) for name in names]


def test_peers_exclude_the_pusher_those_without_data_and_the_distrusted():
    pool = candidates("p1", "p2") + candidates("ta-only", serving=("ta",)) + candidates("old", base="b0")
    pool.append(Candidate("distrusted", ("hi",), frozenset({"b1"}), standing=0.1))
    chosen = choose_peers(pool + candidates("pusher"), pusher="pusher", serving=("hi",), base="b1", wanted=5,
                          pairs={}, last_asked={}, key="7", min_standing=0.25)
    assert sorted(chosen[:2]) == ["p1", "p2"] and chosen[2:] == ["old"]  # a node without the base comes last


def test_peers_rotate_so_no_node_judges_one_contributor_again_and_again():
    pool = candidates("p1", "p2", "p3", "p4")
    pairs = {("p1", "x"): 3, ("p2", "x"): 1}
    chosen = choose_peers(pool, pusher="x", serving=("hi",), base="b1", wanted=2, pairs=pairs,
                          last_asked={"p3": 10.0, "p4": 5.0}, key="1")
    assert chosen == ["p4", "p3"]  # never asked about x; p4 rested longest


def test_review_asks_each_node_once_and_decides_when_all_answered_or_the_wait_is_over():
    review = PeerReview(2, 60.0)
    review.add(1, "hi", "pusher", ("hi",), "b1", now=0.0, judged=None)
    review.add(2, "hi", "other", ("hi",), "b1", now=1.0, judged=None)
    nodes = [(c, f"id:{c.pseudonym}") for c in candidates("p1", "p2", "p3", "pusher")]
    asked = review.ask(2.0, nodes)
    # the oldest push gets two peers, never its pusher; the next push gets the two nodes left
    by_push = {token: sorted(q.peer for a, q in asked if a.token == token) for token in (1, 2)}
    assert len(by_push[1]) == 2 and "pusher" not in by_push[1]
    assert sorted(by_push[1] + by_push[2]) == ["p1", "p2", "p3", "pusher"]
    first = [q for a, q in asked if a.token == 1]
    review.answer(first[0].evaluation, peer(first[0].peer, -0.1), 3.0)
    assert review.due(3.0) == []
    review.fail(first[1].evaluation, "error code 2", 4.0)
    due = review.due(4.0)
    assert [a.token for a in due] == [1]
    assert first[0].outcome == COUNTED and first[1].outcome.startswith("failed")
    later = review.due(62.0)  # the second push's wait is over
    assert [a.token for a in later] == [2]
    assert all(q.outcome == UNANSWERED for q in later[0].questions.values())
    assert review.question(first[0].evaluation) is None  # a late answer finds nothing


def test_review_keeps_standing_from_settled_reports():
    review = PeerReview(3, 60.0, standings={"liar": (0, 2)})
    assert review.standing("liar") == pytest.approx(1 / 3)
    assert review.settle({"liar": False, "a": True}) == {"liar": (0, 1), "a": (1, 0)}
    assert review.standing("liar") == pytest.approx(1 / 4)


# -- settings --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("changes", "named"), [
    ({"peers": -1}, "gate.peers"), ({"peers": 1.5}, "gate.peers"), ({"peer_min_tokens": True}, "gate.peer_min_tokens"),
    ({"peer_aggregate": "mean"}, "gate.peer_aggregate"), ({"peer_decide": "hub"}, "gate.peer_decide"),
    ({"peer_trim": 0.5}, "gate.peer_trim"), ({"peer_min_weight": 1.0}, "gate.peer_min_weight"),
    ({"peer_holdout": -0.1}, "gate.peer_holdout"), ({"peer_wait_s": float("inf")}, "gate.peer_wait_s"),
    ({"peers": 2, "peer_min": 3}, "gate.peer_min"), ({"peers": 2, "peer_holdout": 0.0}, "gate.peer_holdout"),
])
def test_bad_peer_settings_are_refused_naming_the_key(changes, named):
    from fedem_flwr.config.schema import GateConfig
    from fedem_flwr.errors import ConfigError

    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        GateConfig(**changes)


def test_nodes_hold_rows_out_only_when_peers_judge():
    from fedem_flwr.config.schema import GateConfig

    assert GateConfig().holdout_share == 0.0
    assert GateConfig(peers=3).holdout_share == 0.1
    assert GateConfig(peer_holdout=0.3).holdout_share == 0.3
