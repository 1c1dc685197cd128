"""Peer judging in simulation: what a peer evaluation costs on the virtual clock, harmful contributors'
scaled pushes, and decisions judged afterwards on the test split (``simulation.decisions``)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from fedem_flwr.config.schema import ConfigError, SimConfig
from fedem_flwr.model.adapter_spec import AdapterSpec
from fedem_flwr.protocol import messages
from fedem_flwr.protocol.wire import ADAPTER_KEY, adapter_to_arrays, arrays_to_adapter
from fedem_flwr.simulation import decisions as decisions_module
from fedem_flwr.simulation.clock import VirtualClock
from fedem_flwr.simulation.contributors import evaluation_seconds, harmful_partitions
from fedem_flwr.simulation.decisions import ScoredDecision, contributor_time, decision_summary, scoring_decisions
from fedem_flwr.simulation.virtual_grid import VirtualGrid, read_plan, scale_lora_b
from tests.support.fake_grid import InProcessGrid

SPEC = AdapterSpec(shapes={"m.lora_A.weight": (2, 3), "m.lora_B.weight": (3, 2)})
STATE = {"m.lora_A.weight": torch.arange(6, dtype=torch.float32).view(2, 3) / 7,
         "m.lora_B.weight": torch.arange(6, dtype=torch.float32).view(3, 2) / 3 - 1}
app = ClientApp()


@app.query("profile")
def _profile(message: Message, context) -> Message:
    return messages.profile_reply(message, {
        "languages": ["hi"], "device": "cpu", "data-bytes": 10, "base-digests": [],
        "partition-id": int(context.node_config["partition-id"]), "num-partitions": 4,
    })


@app.train("relay")
def _train(message: Message, context) -> Message:
    plan = read_plan(message)
    return Message(RecordDict({"arrays": adapter_to_arrays(STATE), "metrics": MetricRecord(plan.metrics(tokens=100))}),
                   reply_to=message)


@app.evaluate("peer")
def _peer(message: Message, context) -> Message:
    return Message(RecordDict({"metrics": MetricRecord({"tokens.hi": 10, "candidate.hi": 1.0, "parent.hi": 2.0})}),
                   reply_to=message)


# A peer that reports what no count is (a huge int, a list, nan, a negative number), and pushes an adapter
# that does not decode.
garbled = ClientApp()
garbled.query("profile")(_profile)


@garbled.evaluate("peer")
def _garbled_peer(message: Message, context) -> Message:
    return Message(RecordDict({"metrics": MetricRecord({"tokens.hi": 10**400, "tokens.ta": [1, 2],
                                                        "tokens.de": float("nan"), "tokens.bn": -5,
                                                        "candidate.hi": 1.0, "parent.hi": 2.0})}),
                   reply_to=message)


@garbled.train("relay")
def _garbled_train(message: Message, context) -> Message:
    undecodable = Array(dtype="float32", shape=(3,), stype="other", data=b"xx")
    return Message(RecordDict({"arrays": ArrayRecord({ADAPTER_KEY: undecodable}),
                               "metrics": MetricRecord(read_plan(message).metrics(tokens=100))}), reply_to=message)


def _grid(cfg: SimConfig, nodes: int = 1, client: ClientApp = app) -> VirtualGrid:
    inner = InProcessGrid(client, {10 + p: {"partition-id": p} for p in range(nodes)}, {})
    grid = VirtualGrid(inner, VirtualClock(start=0.0), cfg, seed=0, max_steps=10, sleep=lambda s: None,
                       block_size=128, tokens_per_step=1024, adapter_spec=SPEC)
    ids = grid.push_messages([messages.profile_message(n, ttl=60) for n in grid.get_node_ids()])
    assert len(list(grid.pull_messages(ids))) == nodes
    return grid


def _peer_message(node_id: int, ttl: float) -> Message:
    config = ConfigRecord({"evaluation": 7, "languages": "hi,ta", "max-blocks": 8, "base-digest": "0" * 64})
    return Message(RecordDict({"config": config}), dst_node_id=node_id, message_type=messages.PEER, ttl=ttl)


def _until_replied(grid: VirtualGrid, ids: list[str]) -> list[tuple[float, Message]]:
    seen = []
    while ids:
        grid.advance()
        for reply in grid.pull_messages(ids):
            seen.append((grid.clock.elapsed, reply))
            ids.remove(reply.metadata.reply_to_message_id)
    return seen


def test_evaluation_seconds_by_hand():
    # Prepare: 2 passes x 8 blocks x 128 tokens x 2 languages = 4096 tokens; a step is 1024 tokens, and a
    # forward pass costs a third of a step's work: 4096 / (3 * 1024) = 4/3 steps, at 0.01 steps/s.
    # Execute
    seconds = evaluation_seconds(0.01, max_blocks=8, block_size=128, languages=2, tokens_per_step=1024)
    # Assert
    assert seconds == pytest.approx(400.0 / 3.0)


def test_a_peer_evaluation_is_answered_after_its_simulated_duration_and_counted_apart_from_training():
    # Prepare
    grid = _grid(SimConfig(speed=0.01, speed_sigma=0.0, jitter_sigma=0.0, peer_eval_cost="max-blocks"))
    # Execute
    [(when, reply)] = _until_replied(grid, list(grid.push_messages([_peer_message(10, ttl=3600)])))
    # Assert
    assert not reply.has_error()
    assert when == pytest.approx(400.0 / 3.0)
    assert grid.counters.peer_evals == 1 and grid.counters.peer_eval_s == pytest.approx(400.0 / 3.0)
    assert grid.counters.tokens == 0 and grid.usage()["lease_s"] == 0.0  # not training time


def test_priced_at_the_tokens_it_scored_an_evaluation_is_due_when_its_reply_says():
    # Prepare: the peer reports 10 tokens of hi: 2 passes x 10 tokens / (3 * 0.01 * 1024) seconds.
    grid = _grid(SimConfig(speed=0.01, speed_sigma=0.0, jitter_sigma=0.0, peer_eval_cost="scored"))
    # Execute
    [(when, reply)] = _until_replied(grid, list(grid.push_messages([_peer_message(10, ttl=3600)])))
    # Assert
    assert not reply.has_error()
    assert when == pytest.approx(20.0 / 30.72)
    assert grid.counters.peer_eval_s == pytest.approx(20.0 / 30.72)


def test_a_peer_reporting_malformed_token_counts_is_priced_at_none_and_the_grid_goes_on():
    # Prepare
    grid = _grid(SimConfig(speed=0.01, speed_sigma=0.0, jitter_sigma=0.0, peer_eval_cost="scored"), client=garbled)
    # Execute
    [(when, reply)] = _until_replied(grid, list(grid.push_messages([_peer_message(10, ttl=3600)])))
    # Assert: no usable count, so no scoring time; the reply reaches the hub as it came
    assert not reply.has_error()
    assert when == 0.0 and grid.counters.peer_eval_s == 0.0


def test_a_peer_evaluation_due_after_its_deadline_is_an_expired_message_there():
    # Prepare
    grid = _grid(SimConfig(speed=0.01, speed_sigma=0.0, jitter_sigma=0.0, peer_eval_cost="max-blocks"))
    # Execute
    [(when, reply)] = _until_replied(grid, list(grid.push_messages([_peer_message(10, ttl=100)])))
    # Assert
    assert when == pytest.approx(100.0)
    assert reply.has_error() and reply.error.code == ErrorCode.MESSAGE_UNAVAILABLE
    assert grid.counters.peer_eval_s == pytest.approx(100.0)


def test_a_peer_that_vanishes_while_scoring_is_reported_gone_and_stays_away():
    # Prepare
    grid = _grid(SimConfig(speed=0.01, speed_sigma=0.0, jitter_sigma=0.0, vanish_prob=0.99, heartbeat_s=60))
    # Execute
    [(when, reply)] = _until_replied(grid, list(grid.push_messages([_peer_message(10, ttl=3600)])))
    # Assert
    assert reply.has_error() and reply.error.code == ErrorCode.NODE_UNAVAILABLE
    assert when < 400.0 / 3.0 + 60
    assert list(grid.get_node_ids()) == []


def test_scale_lora_b_scales_every_b_exactly_and_leaves_a():
    # Prepare
    packed = adapter_to_arrays(STATE)[ADAPTER_KEY].numpy()
    # Execute
    scaled = scale_lora_b(packed, SPEC, 8.0)
    # Assert
    record = adapter_to_arrays(STATE)
    record[ADAPTER_KEY] = Array(scaled)
    state = arrays_to_adapter(record, SPEC)
    assert torch.equal(state["m.lora_A.weight"], STATE["m.lora_A.weight"])
    assert torch.equal(state["m.lora_B.weight"], STATE["m.lora_B.weight"] * 8)


def test_a_harmful_contributors_push_reaches_the_hub_scaled_and_is_counted():
    # Prepare
    grid = _grid(SimConfig(clock="virtual", speed=0.01, speed_sigma=0.0, jitter_sigma=0.0, harmful_share=1.0,
                           harm_scale=8.0))
    train = Message(RecordDict({"config": ConfigRecord({"lease-token": 1, "budget-s": 1e9, "max-steps": 10})}),
                    dst_node_id=10, message_type=messages.TRAIN, ttl=1e6)
    # Execute
    [(_, reply)] = _until_replied(grid, list(grid.push_messages([train])))
    # Assert
    state = arrays_to_adapter(reply.content["arrays"], SPEC)
    assert torch.equal(state["m.lora_B.weight"], STATE["m.lora_B.weight"] * 8)
    assert torch.equal(state["m.lora_A.weight"], STATE["m.lora_A.weight"])
    assert grid.counters.harmful_pushes == 1


def test_a_harmful_contributors_undecodable_push_reaches_the_hub_as_it_came():
    # Prepare
    grid = _grid(SimConfig(clock="virtual", speed=0.01, speed_sigma=0.0, jitter_sigma=0.0, harmful_share=1.0),
                 client=garbled)
    train = Message(RecordDict({"config": ConfigRecord({"lease-token": 1, "budget-s": 1e9, "max-steps": 10})}),
                    dst_node_id=10, message_type=messages.TRAIN, ttl=1e6)
    # Execute
    [(_, reply)] = _until_replied(grid, list(grid.push_messages([train])))
    # Assert: left for the hub's checks to refuse
    assert not reply.has_error() and reply.content["arrays"][ADAPTER_KEY].data == b"xx"
    assert grid.counters.harmful_pushes == 0


def test_harmful_partitions_are_the_share_drawn_by_seed():
    cfg = SimConfig(clock="virtual", harmful_share=0.25)
    drawn = harmful_partitions(cfg, 0, 11)
    assert len(drawn) == 3 and drawn <= set(range(11))
    assert harmful_partitions(cfg, 0, 11) == drawn
    assert harmful_partitions(SimConfig(), 0, 11) == frozenset()


def _decision(lang: str, accepted: bool, candidate: float, parent: float) -> ScoredDecision:
    return ScoredDecision(lang, (lang,), accepted, {lang: candidate}, {lang: parent})


def test_decision_summary_counts_wrong_decisions_per_language_and_thin_ones_apart():
    # Prepare: de is thin (500 held-out tokens < 1024); bn is not.
    rows = [_decision("de", True, 3.0, 2.0),  # accepted but worse: wrong
            _decision("de", False, 1.0, 2.0),  # rejected but better: wrong
            _decision("de", True, 1.0, 2.0),  # right
            _decision("bn", False, 3.0, 2.0)]  # right
    # Execute
    summary = decision_summary(rows, {"de": 500.0, "bn": 2000.0}, 1024)
    # Assert
    assert (summary["scored"], summary["wrong"], summary["accepted_worse"], summary["rejected_better"]) == (4, 2, 1, 1)
    assert summary["by_language"]["de"] == {"scored": 3, "wrong": 2, "accepted_worse": 1, "rejected_better": 1,
                                            "hub_tokens": 500.0, "thin": True}
    assert summary["thin"]["wrong"] == 2 and summary["other"] == {"scored": 1, "wrong": 0, "accepted_worse": 0,
                                                                  "rejected_better": 0}


def test_scoring_decisions_scores_what_finish_decided_on_the_test_split(monkeypatch):
    # Prepare: a fake evaluator whose loss is the candidate's mean B, so a larger B is worse.
    class Evaluator:
        heldout = {"de": None}

        def evaluate(self, state, languages):
            return {lang: float(state["m.lora_B.weight"].mean()) for lang in languages}

    monkeypatch.setattr(decisions_module, "evaluator_on", lambda hub, folder, split: Evaluator())
    coordinator = SimpleNamespace(terms={"de": SimpleNamespace(heldout_keys=("de",))},
                                  _finish=lambda *args, **kwargs: "outcome")
    hub = SimpleNamespace(coordinator=coordinator, store=SimpleNamespace(get=lambda ref: "/base"))
    verdict = SimpleNamespace(state={"m.lora_B.weight": torch.ones(2)},
                              parent_state={"m.lora_B.weight": torch.zeros(2)}, base=SimpleNamespace(ref=None))
    found: list[ScoredDecision] = []
    # Execute
    with scoring_decisions(hub, found):
        outcome = coordinator._finish(SimpleNamespace(adapter="de"), None, verdict, True, "better",
                                      peers={"peers": {"role": "decide"}})
    # Assert
    assert outcome == "outcome" and coordinator._finish() == "outcome"  # its own _finish ran, and is back
    [decision] = found
    assert decision.accepted and not decision.better and not decision.right and decision.role == "decide"


def test_a_decision_that_cannot_be_scored_is_left_out_and_the_push_still_concludes(monkeypatch):
    # Prepare: the test split cannot be read (a base retention pruned, say).
    def unreadable(hub, folder, split):
        raise FileNotFoundError(folder)

    monkeypatch.setattr(decisions_module, "evaluator_on", unreadable)
    coordinator = SimpleNamespace(terms={"de": SimpleNamespace(heldout_keys=("de",))},
                                  _finish=lambda *args, **kwargs: "outcome")
    hub = SimpleNamespace(coordinator=coordinator, store=SimpleNamespace(get=lambda ref: "/gone"))
    found: list[ScoredDecision] = []
    # Execute
    with scoring_decisions(hub, found):
        outcome = coordinator._finish(SimpleNamespace(adapter="de"), None,
                                      SimpleNamespace(base=SimpleNamespace(ref=None)), True, "better")
    # Assert
    assert outcome == "outcome" and found == []


def test_contributor_time_share():
    assert contributor_time(900.0, 100.0) == {"training_s": 900.0, "peer_eval_s": 100.0, "peer_eval_share": 0.1}
    assert contributor_time(0.0, 0.0)["peer_eval_share"] == 0.0


@pytest.mark.parametrize("changes, key", [
    ({"harmful_share": 1.5}, "harmful_share"), ({"harmful_share": -0.1}, "harmful_share"),
    ({"harm_scale": float("nan")}, "harm_scale"), ({"harmful_share": 0.2, "clock": "real"}, "virtual"),
    ({"score_decisions": True, "clock": "real"}, "virtual"), ({"peer_eval_cost": "free"}, "peer_eval_cost"),
])
def test_sim_config_refuses_bad_peer_study_fields(changes, key):
    with pytest.raises(ConfigError, match=key):
        SimConfig(**{"clock": "virtual", **changes})


def test_sim_config_accepts_the_study_fields():
    cfg = SimConfig(clock="virtual", harmful_share=0.25, harm_scale=8.0, score_decisions=True)
    assert (cfg.harmful_share, cfg.harm_scale, cfg.score_decisions) == (0.25, 8.0, True)
    assert np.isclose(SimConfig().harm_scale, 8.0)
