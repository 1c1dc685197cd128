"""The relay Strategy's message handling over an in-process Grid, with nodes that misbehave on cue.

No model is trained: each node's ClientApp lowers or corrupts the adapter weight ``w`` as its
node config says, and the scripted workbench reads the held-out loss from ``w``.
"""

from __future__ import annotations

import logging
from typing import Optional

import datasets
import pytest
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedem_flwr.config.schema import RelayConfig
from fedem_flwr.model.adapter_spec import AdapterSpec
from fedem_flwr.protocol import messages
from fedem_flwr.protocol.wire import adapter_to_arrays, arrays_to_adapter
from fedem_flwr.relay.nodes import NodeState
from fedem_flwr.relay.strategy import RelayStrategy
from tests.support.fake_grid import InProcessGrid
from tests.support.relay import FakeClock, seeded_coordinator

SPEC = AdapterSpec.from_state({"w": torch.zeros(1)})  # the scripted adapter: one weight


def _codes(node_config, key: str) -> list[str]:
    return [lang for lang in str(node_config.get(key, "")).split(",") if lang]


def _stub_app(clock: FakeClock, seen: Optional[list] = None) -> ClientApp:
    """``seen`` collects the instructions the nodes parse."""
    app = ClientApp()

    @app.query("profile")
    def profile(message: Message, context: Context) -> Message:
        answer = {"languages": _codes(context.node_config, "languages"), "device": "cpu", "data-bytes": 100,
                  "base-digests": []}
        if "chat-languages" in context.node_config:
            answer["chat-languages"] = _codes(context.node_config, "chat-languages")
        if "partition-id" in context.node_config:
            answer["partition-id"] = context.node_config["partition-id"]
        return messages.profile_reply(message, answer)

    @app.train("relay")
    def train(message: Message, context: Context) -> Message:
        instruction = messages.parse_train_instruction(message)
        if seen is not None:
            seen.append(instruction)
        state = arrays_to_adapter(message.content["arrays"], SPEC)
        behaviour = context.node_config.get("behaviour", "improve")
        if behaviour == "crash":
            raise RuntimeError("out of patience")
        if behaviour == "slow":
            clock.now += instruction.budget_s + 120  # well past the lease
        if behaviour == "nan":
            state["w"] = torch.tensor([float("nan")])
        elif behaviour == "wrong-token":
            instruction = messages.TrainInstruction(**{**instruction.__dict__, "token": instruction.token + 50})
        elif behaviour == "other-lane":  # the token issued just before its own: another lane's lease
            instruction = messages.TrainInstruction(**{**instruction.__dict__, "token": instruction.token - 1})
        else:
            state["w"] = state["w"] - 0.25
        return messages.train_reply(message, instruction, adapter_to_arrays(state), {"steps": 1.0})

    return app


def _run(tmp_path, behaviours, max_accepted=None, max_wall_s=60.0, kill_after_lease=None, drain_s=0.0,
         latency=None, lanes=1):
    clock = FakeClock()
    coordinator, registry, _ = seeded_coordinator(tmp_path, clock, lanes=lanes)
    node_configs = {
        10 + i: {"partition-id": i, "languages": lang, "behaviour": behaviour}
        for i, (lang, behaviour) in enumerate(behaviours)
    }
    grid = InProcessGrid(_stub_app(clock), node_configs, {}, clock=clock, latency=latency)
    relay = RelayConfig(lease_ttl_s=100, sweep_interval_s=10, poll_interval_s=1, no_node_grace_s=5,
                        deadline_margin_s=10, max_accepted=max_accepted, max_wall_s=max_wall_s, drain_s=drain_s,
                        lanes=lanes)
    strategy = RelayStrategy(coordinator, relay, SPEC, max_steps=1,
                             clock=clock, sleep=clock.sleep)
    if kill_after_lease is not None:
        push = grid.push_messages

        def push_then_kill(batch):
            batch = list(batch)
            ids = push(batch)
            if any(m.metadata.message_type == messages.TRAIN for m in batch):
                grid.kill(kill_after_lease)
            return ids

        grid.push_messages = push_then_kill
    return strategy.start(grid), registry


def test_improving_nodes_relay_each_adapter_on(tmp_path):
    result, registry = _run(tmp_path, [("hi", "improve"), ("ta", "improve")], max_accepted=6)

    assert (result.accepted, result.rejected) == (6, 0)
    latest = {name: registry.latest_adapter_version(name) for name in ("hi", "ta")}
    assert {name: v.version for name, v in latest.items()} == {"hi": 3, "ta": 3}
    assert latest["hi"].metrics["heldout"]["hi"] == pytest.approx(4.0 - 3 * 0.25)
    assert [lease.holder for lease in registry.leases() if lease.adapter == "hi"] == ["sim:0"] * 3


def test_crashing_node_loses_its_lease_and_the_relay_goes_on(tmp_path):
    result, registry = _run(tmp_path, [("hi", "crash"), ("ta", "improve")], max_accepted=2)

    assert result.accepted == 2 and result.failures >= 1
    crashed = [lease for lease in registry.leases() if lease.holder == "sim:0"]
    assert crashed and all(lease.outcome.startswith("client-error") for lease in crashed)
    assert registry.latest_adapter_version("hi").version == 0


def test_reply_after_the_lease_is_refused_by_its_ttl(tmp_path):
    result, registry = _run(tmp_path, [("hi", "slow")], max_wall_s=400)

    assert result.accepted == 0
    outcomes = {lease.outcome for lease in registry.leases()}
    assert outcomes <= {"reply-after-ttl", "expired"} and outcomes
    assert registry.latest_adapter_version("hi").version == 0


def test_non_finite_weights_are_rejected_without_a_version(tmp_path):
    result, registry = _run(tmp_path, [("hi", "nan")], max_wall_s=5)

    assert result.accepted == 0 and result.rejected >= 1
    assert all(c.reason.startswith("invalid-adapter") for c in registry.contributions())
    assert registry.latest_adapter_version("hi").version == 0


def test_reply_claiming_another_token_ends_its_own_lease_at_once(tmp_path):
    # node 10 answers every lease with a token 50 above its own; node 11 trains honestly
    result, registry = _run(tmp_path, [("hi", "wrong-token"), ("ta", "improve")], max_wall_s=150)

    wrong = [lease for lease in registry.leases() if lease.holder == "sim:0"]
    assert wrong and all(lease.outcome == "claim-mismatch" for lease in wrong)
    # ended in the poll its reply came back, not at the TTL (100 s)
    assert all(lease.ended - lease.issued <= 1.0 for lease in wrong)
    reasons = sorted(c.reason for c in registry.contributions() if c.adapter == "hi")
    assert reasons == sorted(f"claim-mismatch: token {lease.token + 50} claimed, lease {lease.token}" for lease in wrong)
    assert registry.latest_adapter_version("hi").version == 0
    assert result.accepted == registry.latest_adapter_version("ta").version > 0
    assert not registry.leases(active_only=True)


def test_hostile_lane_pushes_are_rejected_with_reasons_and_the_honest_lane_relays_on(tmp_path):
    # Prepare: three lanes of hi; node 10 trains honestly, node 11 answers each lease with the token of
    # the lease issued just before its own (another lane's), node 12 answers long after its lane ended
    result, registry = _run(tmp_path, [("hi", "improve"), ("hi", "other-lane"), ("hi", "improve")], max_wall_s=400,
                            latency={10: 3, 12: 150}, lanes=3)

    # Assert
    leases = registry.leases()
    by_holder = {holder: [lease for lease in leases if lease.holder == holder]
                 for holder in ("sim:0", "sim:1", "sim:2")}
    assert all(lease.adapter == "hi" and 0 <= lease.lane < 3 for lease in leases)
    # the honest lane relays: every judged push accepted, one version each
    assert result.accepted == registry.latest_adapter_version("hi").version > 0
    assert {lease.outcome for lease in by_holder["sim:0"] if lease.state == "released"} == {"accepted"}
    # another lane's token: refused as a claim the lease does not make, at once, ending only its own lease
    wrong = by_holder["sim:1"]
    assert wrong and all(lease.outcome == "claim-mismatch" for lease in wrong)
    reasons = {c.reason for c in registry.contributions() if c.pseudonym == registry.pseudonym("sim:1")}
    assert reasons == {f"claim-mismatch: token {lease.token - 1} claimed, lease {lease.token}" for lease in wrong}
    # a push for a lane that ended: refused by its TTL, never a version
    late = {lease.outcome for lease in by_holder["sim:2"]}
    assert late & {"reply-after-ttl", "expired"} and late <= {"reply-after-ttl", "expired", "hub-stopped"}
    assert not [c for c in registry.contributions() if c.pseudonym == registry.pseudonym("sim:2")]
    # lanes were held at once: some lease of sim:0 overlaps one of another node, on another lane
    assert any(a.issued < (b.ended or float("inf")) and b.issued < (a.ended or float("inf")) and a.lane != b.lane
               for a in by_holder["sim:0"] for b in by_holder["sim:1"] + by_holder["sim:2"])
    assert not registry.leases(active_only=True)


def test_node_that_disappears_mid_lease_frees_its_adapter(tmp_path):
    result, registry = _run(tmp_path, [("hi", "improve")], max_wall_s=30, kill_after_lease=10)

    (lease,) = registry.leases()
    assert lease.outcome == "node-gone"
    assert result.stopped_by.startswith("no node")


def test_trains_in_flight_at_the_stop_are_drained_or_ended(tmp_path):
    # Node 11 (ta) trains for 5 polls; node 10 (hi) answers at once and reaches the stop condition.
    behaviours = [("hi", "improve"), ("ta", "improve")]
    drained, registry = _run(tmp_path / "drained", behaviours, max_accepted=1, drain_s=50, latency={11: 5})
    abandoned, registry_ab = _run(tmp_path / "abandoned", behaviours, max_accepted=1, drain_s=0, latency={11: 5})

    assert not registry.leases(active_only=True) and not registry_ab.leases(active_only=True)
    assert {lease.adapter: lease.outcome for lease in registry.leases()} == {"hi": "accepted", "ta": "accepted"}
    assert drained.accepted == 2
    assert {lease.adapter: lease.outcome for lease in registry_ab.leases()} == {"hi": "accepted", "ta": "hub-stopped"}
    assert abandoned.accepted == 1


class _TaskLease:
    """An assignment of a chat adapter limited to a domain, as the coordinator issues task leases."""

    languages, task, domain = ("hi",), "sft-chat", "health"

    def __init__(self, assignment) -> None:
        self._assignment = assignment

    def __getattr__(self, name):
        return getattr(self._assignment, name)


def test_a_node_serves_its_chat_languages_and_a_task_lease_names_its_task_and_domain(tmp_path, caplog):
    # Prepare: one node with Hindi text and conversations; every lease issued is a chat lease of health
    clock, seen = FakeClock(), []
    coordinator, _, _ = seeded_coordinator(tmp_path, clock)
    assign = coordinator.assign
    coordinator.assign = lambda nodes: [_TaskLease(a) for a in assign(nodes)]
    grid = InProcessGrid(_stub_app(clock, seen), {10: {"partition-id": 0, "languages": "hi", "chat-languages": "hi"}},
                         {}, clock=clock)
    relay = RelayConfig(lease_ttl_s=100, sweep_interval_s=10, poll_interval_s=1, no_node_grace_s=5,
                        deadline_margin_s=10, max_accepted=1, max_wall_s=60)
    strategy = RelayStrategy(coordinator, relay, SPEC, max_steps=1, clock=clock, sleep=clock.sleep)

    # Execute
    with caplog.at_level(logging.INFO, logger="fedem_flwr.relay.strategy"):
        result = strategy.start(grid)

    # Assert
    assert result.accepted == 1
    assert strategy.nodes.get(10).profile.languages == ("hi", "hi:chat")  # serving keys: text and chat
    assert "languages hi (chat: hi)" in caplog.text
    assert [(i.languages, i.task, i.domain) for i in seen] == [(("hi",), "sft-chat", "health")]


def test_a_simulated_nodes_rows_carry_conversations_only_when_an_adapter_trains_on_them_and_some_row_has_one():
    from types import SimpleNamespace

    from fedem_flwr.data.tasks import AdapterTerms

    corpus = {
        "chatty": datasets.Dataset.from_dict({"text": ["a", "b"], "language": ["en", "en"],
                                              "chat": ["[]", ""], "domain": ["", ""]}),
        "plain": datasets.Dataset.from_dict({"text": ["a"], "language": ["en"], "chat": [""], "domain": [""]}),
    }

    def strategy_of(*terms: AdapterTerms) -> RelayStrategy:
        hub = SimpleNamespace(terms={t.name: t for t in terms})
        strategy = RelayStrategy(hub, RelayConfig(), SPEC, max_steps=1,
                                 training_rows=lambda pid, num: corpus["chatty" if pid == 0 else "plain"])
        strategy.simulation = True
        return strategy

    language = AdapterTerms("en", "causal-lm", ("en",))
    strategy = strategy_of(language, AdapterTerms("en-chat", "sft-chat", ("en",)))
    chatty = strategy._node_rows(NodeState(1, "sim:0", partition=(0, 2)))
    plain = strategy._node_rows(NodeState(2, "sim:1", partition=(1, 2)))

    assert chatty == {"text": ["a", "b"], "language": ["en", "en"], "chat": ["[]", ""]}
    assert plain == {"text": ["a"], "language": ["en"]}
    assert strategy._node_rows(NodeState(1, "sim:0", partition=(0, 2))) is chatty  # read once per partition
    # language adapters only: the conversations stay home, as before catalogs existed
    assert strategy_of(language)._node_rows(NodeState(1, "sim:0", partition=(0, 2))) == {
        "text": ["a", "b"], "language": ["en", "en"]}
