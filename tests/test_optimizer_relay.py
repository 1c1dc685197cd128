"""The optimizer state on the relay: on the wire, in messages, kept by the hub for each accepted
version, sent with the next lease, replaced (never rejecting the adapter) when a node sends a bad
one, and checked by ``fedem verify``.

The coordinator and strategy tests use the scripted one-weight adapter ``w`` of ``tests.support.relay``;
the last test relays a real tiny model through the real ClientApp.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from fedem_flwr.config.schema import RelayConfig, TrainConfig
from fedem_flwr.hub import views
from fedem_flwr.hub.optimizer_states import FORMAT, MOMENTS, SEPARATOR, OptimizerStates
from fedem_flwr.hub.paths import optimizer_state_path
from fedem_flwr.hub.store import ArtifactRef
from fedem_flwr.model.adapter_spec import AdapterSpec
from fedem_flwr.protocol import faults, messages
from fedem_flwr.protocol.wire import (
    OPTIMIZER_KEY,
    adapter_to_arrays,
    arrays_to_adapter,
    arrays_to_optimizer,
    optimizer_record,
    optimizer_to_arrays,
)
from fedem_flwr.relay.coordinator import RelayCoordinator
from fedem_flwr.relay.policies import NodeProfile, make_policy
from fedem_flwr.relay.strategy import RelayStrategy
from fedem_flwr.training import optimizer_state as training_state
from fedem_flwr.training.optimizer_state import (
    InvalidOptimizerState,
    OptimizerState,
    load_optimizer_state,
    optimizer_state_bytes,
    save_optimizer_state,
)
from tests.support.fake_grid import InProcessGrid
from tests.support.relay import TTL, FakeClock, ScriptedWorkbench, seeded_coordinator

A, B = "base_model.model.backbone.layers.0.mixer.in_proj.lora_A.weight", "base_model.model.lm_head.lora_B.weight"
W = AdapterSpec.from_state({"w": torch.zeros(1)})  # the scripted adapter: one weight


def _moments(spec: AdapterSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.rand(shape, generator=generator)
            for key, shape in training_state.moment_spec(spec).shapes.items()}


def _w_state(step: int, avg: float, avg_sq: float, warmup_from: int = 0) -> OptimizerState:
    return OptimizerState(step, warmup_from, {"w::exp_avg": torch.tensor([avg]), "w::exp_avg_sq": torch.tensor([avg_sq])})


# -- the wire ------------------------------------------------------------------------------------------
@pytest.fixture
def spec():
    return AdapterSpec({A: (4, 8), B: (10, 4)})


def test_moments_travel_as_one_packed_array_in_sorted_name_order(spec):
    state = OptimizerState(12, 4, _moments(spec))

    record = optimizer_to_arrays(state)
    back = arrays_to_optimizer(record, spec, step=12, warmup_from=4)

    assert list(record.keys()) == [OPTIMIZER_KEY]
    assert (record[OPTIMIZER_KEY].dtype, record[OPTIMIZER_KEY].shape) == ("float32", (2 * (32 + 40),))
    flat = np.concatenate([state.moments[k].numpy().reshape(-1) for k in sorted(state.moments)])
    np.testing.assert_array_equal(record[OPTIMIZER_KEY].numpy(), flat)
    assert sorted(state.moments)[:2] == [f"{A}::exp_avg", f"{A}::exp_avg_sq"]
    assert (back.step, back.warmup_from) == (12, 4)
    assert all(torch.equal(back.moments[k], state.moments[k]) for k in state.moments)


def test_schedule_carry_sends_no_moments_record(spec):
    carried = optimizer_record(OptimizerState(7, 0))

    assert (carried.step, carried.warmup_from, carried.arrays) == (7, 0, None)
    assert arrays_to_optimizer(None, spec, step=7, warmup_from=0, carry="schedule").moments == {}
    with pytest.raises(InvalidOptimizerState, match="missing"):  # carry=moments: moments must come
        arrays_to_optimizer(None, spec, step=7, warmup_from=0)


@pytest.mark.parametrize("record, message", [
    (lambda r: ArrayRecord({**{k: r[k] for k in r}, "extra": Array(np.zeros(1, np.float32))}),
     r"optimizer record keys do not match: unexpected key\(s\) 'extra'"),
    (lambda r: ArrayRecord({OPTIMIZER_KEY: Array(np.zeros(3, np.float32))}), "carries .* bytes; expected exactly"),
    (lambda r: ArrayRecord({OPTIMIZER_KEY: Array(r[OPTIMIZER_KEY].numpy().astype(np.float64)[:72])}),
     "carries .* bytes|dtype float64"),
    (lambda r: ArrayRecord({OPTIMIZER_KEY: Array(np.full(144, np.nan, np.float32))}), "non-finite"),
], ids=["extra key", "too short", "float64", "NaN"])
def test_malformed_moments_records_are_refused(spec, record, message):
    good = optimizer_to_arrays(OptimizerState(1, 0, _moments(spec)))

    with pytest.raises(InvalidOptimizerState, match=message):
        arrays_to_optimizer(record(good), spec, step=1, warmup_from=0)


# -- messages ------------------------------------------------------------------------------------------
def _sent(optimizer=None):
    InProcessGrid(ClientApp(), {}, {})  # sets the task identity messages need
    base = ArtifactRef("t/base", "v0", "a" * 64)
    instruction = messages.TrainInstruction("hi", 0, ("hi",), 7, base, 0, 60.0, 5, optimizer=optimizer)
    message = messages.train_message(10, instruction, adapter_to_arrays({"w": torch.zeros(1)}), ttl=60)
    message.metadata.__dict__["_message_id"] = "m"
    return instruction, message


def test_a_train_message_and_its_reply_carry_the_optimizer_state():
    sent_state = _w_state(10, 0.5, 0.25, warmup_from=3)
    instruction, message = _sent(optimizer_record(sent_state))

    received = messages.parse_train_instruction(message)
    node_state = arrays_to_optimizer(received.optimizer.arrays, W, step=received.optimizer.step,
                                     warmup_from=received.optimizer.warmup_from)
    reply = messages.train_reply(message, received, adapter_to_arrays({"w": torch.ones(1)}), {"steps": 2.0},
                                 optimizer_record(_w_state(12, 0.75, 0.5, warmup_from=3)))
    parsed = messages.parse_train_reply(reply, instruction)

    assert message.content["config"][messages.OPTIMIZER_STEP] == 10
    assert (node_state.step, node_state.warmup_from, node_state.moments["w::exp_avg"].item()) == (10, 3, 0.5)
    assert (parsed.optimizer.step, parsed.optimizer.warmup_from, parsed.optimizer_problem) == (12, 3, "")
    back = arrays_to_optimizer(parsed.optimizer.arrays, W, step=12, warmup_from=3, sent_step=10, sent_warmup_from=3,
                               steps_reported=2)
    assert back.moments["w::exp_avg"].item() == 0.75


def test_without_carry_nothing_travels():
    instruction, message = _sent()
    reply = messages.train_reply(message, instruction, adapter_to_arrays({"w": torch.ones(1)}), {"steps": 2.0})

    assert messages.parse_train_instruction(message).optimizer is None
    assert messages.OPTIMIZER not in message.content and messages.OPTIMIZER_STEP not in message.content["config"]
    parsed = messages.parse_train_reply(reply, instruction)
    assert (parsed.optimizer, parsed.optimizer_problem) == (None, "")


@pytest.mark.parametrize("change, problem", [
    ({messages.OPTIMIZER_STEP: -1}, "`optimizer-step` is -1; it must be a non-negative integer"),
    ({messages.OPTIMIZER_STEP: "12"}, "`optimizer-step` is '12'"),
    ({messages.OPTIMIZER_WARMUP_FROM: 13}, "`optimizer-warmup-from` is 13, past `optimizer-step` 12"),
], ids=["negative", "text", "warmup past step"])
def test_a_malformed_optimizer_in_a_reply_is_named_without_failing_the_reply(change, problem):
    instruction, message = _sent(optimizer_record(_w_state(10, 0.5, 0.25)))
    reply = messages.train_reply(message, instruction, adapter_to_arrays({"w": torch.ones(1)}), {"steps": 2.0},
                                 optimizer_record(_w_state(12, 0.75, 0.5)))
    for key, value in change.items():
        reply.content["config"][key] = value

    parsed = messages.parse_train_reply(reply, instruction)

    assert parsed.optimizer is None and problem in parsed.optimizer_problem
    assert parsed.status == messages.OK and parsed.arrays is not None  # the adapter is still judged


@pytest.mark.parametrize("fault, message", [
    ("nan-moments", "non-finite"),
    ("negative-moments", "negative value"),
    ("optimizer-step-ahead", r"`step` is 1012; the hop started at 10 and reports 2 step\(s\)"),
])
def test_hostile_node_faults_return_states_the_hub_refuses(fault, message):
    instruction, sent = _sent(optimizer_record(_w_state(10, 0.5, 0.25)))
    reply = messages.train_reply(sent, instruction, adapter_to_arrays({"w": torch.ones(1)}), {"steps": 2.0},
                                 optimizer_record(_w_state(12, 0.75, 0.5)))

    parsed = messages.parse_train_reply(faults.misbehave(reply, sent, fault), instruction)

    assert fault in faults.NODE_FAULTS
    with pytest.raises(InvalidOptimizerState, match=message):
        arrays_to_optimizer(parsed.optimizer.arrays, W, step=parsed.optimizer.step, sent_step=10, steps_reported=2,
                            warmup_from=parsed.optimizer.warmup_from, max_steps=instruction.max_steps)


# -- the coordinator -----------------------------------------------------------------------------------
def _carrying(tmp_path, carry="moments", **train):
    clock = FakeClock()
    _, registry, store = seeded_coordinator(tmp_path, clock)
    coordinator = RelayCoordinator(
        registry, store, make_policy("language", random.Random(0)), ScriptedWorkbench(), lease_ttl_s=TTL,
        sweep_interval_s=10, clock=clock, train=TrainConfig(carry=carry, **train),
        optimizer_states=OptimizerStates(tmp_path),
    )
    coordinator.recover()
    return coordinator, registry, clock


def _lease(coordinator):
    (assignment,) = coordinator.assign([NodeProfile("sim:0", ("hi",))])
    return assignment


def _push(coordinator, assignment, loss, **kw):
    return coordinator.receive_push(assignment.lease.token, {"w": torch.tensor([loss])}, metrics={"steps": 3.0}, **kw)


def _kept(tmp_path, version):
    return load_optimizer_state(optimizer_state_path(tmp_path, "hi", version))


def test_the_first_lease_starts_a_fresh_run_and_an_accepted_push_keeps_its_state(tmp_path):
    coordinator, registry, _ = _carrying(tmp_path)
    first = _lease(coordinator)

    sent = coordinator.train_payload(first).optimizer
    outcome = _push(coordinator, first, 3.5, optimizer_state=_w_state(3, 0.5, 0.25))
    second = _lease(coordinator)

    assert (sent.step, sent.warmup_from) == (0, 0)
    assert {k: v.tolist() for k, v in sent.moments.items()} == {"w::exp_avg": [0.0], "w::exp_avg_sq": [0.0]}
    assert outcome.accepted and outcome.version == 1
    kept = _kept(tmp_path, 1)
    assert (kept.step, kept.moments["w::exp_avg"].item()) == (3, 0.5)
    payload = coordinator.train_payload(second)
    assert second.lease.adapter_version == 1
    assert (payload.optimizer.step, payload.optimizer.moments["w::exp_avg_sq"].item()) == (3, 0.25)
    assert registry.contributions()[0].validation == {"ok": True, "optimizer": "ok"}


def test_a_rejected_push_leaves_the_parents_state(tmp_path):
    coordinator, _, _ = _carrying(tmp_path)
    _push(coordinator, _lease(coordinator), 3.5, optimizer_state=_w_state(3, 0.5, 0.25))

    lease = _lease(coordinator)
    outcome = _push(coordinator, lease, 3.9, optimizer_state=_w_state(6, 9.0, 9.0))  # worse than v1's 3.5

    assert not outcome.accepted
    assert optimizer_state_path(tmp_path, "hi", 2).exists() is False
    assert coordinator.train_payload(_lease(coordinator)).optimizer.step == 3  # v1's state, as kept


def test_an_invalid_state_is_replaced_and_recorded_and_the_adapter_still_accepted(tmp_path):
    coordinator, registry, _ = _carrying(tmp_path)
    _push(coordinator, _lease(coordinator), 3.5, optimizer_state=_w_state(3, 0.5, 0.25, warmup_from=0))

    outcome = _push(coordinator, _lease(coordinator), 3.0, optimizer_invalid="optimizer moment 'w::exp_avg' has 1 "
                                                                            "non-finite value(s) (NaN or inf).")
    missing = _push(coordinator, _lease(coordinator), 2.5)

    assert outcome.accepted and outcome.version == 2 and missing.accepted
    replaced = _kept(tmp_path, 2)
    assert (replaced.step, replaced.warmup_from) == (3, 0)  # the leased state's position, moments zero
    assert [v.item() for v in replaced.moments.values()] == [0.0, 0.0]
    validations = [c.validation for c in sorted(registry.contributions(), key=lambda c: c.id)]
    assert validations[1] == {"ok": True, "optimizer": "replaced: optimizer moment 'w::exp_avg' has 1 non-finite "
                                                       "value(s) (NaN or inf)."}
    assert validations[2] == {"ok": True, "optimizer": "replaced: the push carried no optimizer state"}
    assert _kept(tmp_path, 3).step == 3


def test_carry_none_sends_and_keeps_nothing(tmp_path):
    coordinator, registry, _ = _carrying(tmp_path, carry="none")
    lease = _lease(coordinator)

    assert coordinator.train_payload(lease).optimizer is None
    assert _push(coordinator, lease, 3.5, optimizer_state=_w_state(3, 0.5, 0.25)).accepted
    assert not (tmp_path / "optimizer").exists()
    assert registry.contributions()[0].validation == {"ok": True}


def test_schedule_carry_keeps_the_position_without_moments(tmp_path):
    coordinator, _, _ = _carrying(tmp_path, carry="schedule")
    lease = _lease(coordinator)

    assert coordinator.train_payload(lease).optimizer.moments == {}
    _push(coordinator, lease, 3.5, optimizer_state=OptimizerState(3, 0))

    assert (_kept(tmp_path, 1).step, _kept(tmp_path, 1).moments) == (3, {})
    assert coordinator.train_payload(_lease(coordinator)).optimizer.step == 3


@pytest.mark.parametrize("mode, avg", [("reset", 0.0), ("prune", 0.5)])
def test_a_rebased_version_continues_its_parents_run_with_a_new_warmup(tmp_path, mode, avg):
    coordinator, registry, clock = _carrying(tmp_path, rebase_moments=mode)
    _push(coordinator, _lease(coordinator), 3.5, optimizer_state=_w_state(3, 0.5, 0.25))
    v1 = registry.latest_adapter_version("hi")
    registry.add_adapter_version("hi", 0, 1, v1.repo, v1.revision, v1.digest, {}, clock(), kind="rebase")
    coordinator.refresh_adapter("hi")

    sent = coordinator.train_payload(_lease(coordinator)).optimizer

    assert (sent.step, sent.warmup_from) == (3, 3)
    assert sent.moments["w::exp_avg"].item() == avg  # prune keeps the largest 1% (at least one value)


def test_carry_without_a_place_for_states_is_refused(tmp_path):
    clock = FakeClock()
    _, registry, store = seeded_coordinator(tmp_path, clock)

    with pytest.raises(ValueError, match="needs `optimizer_states`"):
        RelayCoordinator(registry, store, make_policy("language", random.Random(0)), ScriptedWorkbench(),
                         lease_ttl_s=TTL, sweep_interval_s=10, clock=clock, train=TrainConfig(carry="moments"))


# -- the strategy, with nodes that continue the state sent (or corrupt it on cue) ------------------------
def _carrying_app() -> ClientApp:
    app = ClientApp()

    @app.query("profile")
    def profile(message: Message, context: Context) -> Message:
        answer = {"languages": ["hi"], "device": "cpu", "data-bytes": 100, "base-digests": [],
                  "partition-id": context.node_config["partition-id"]}
        return messages.profile_reply(message, answer)

    @app.train("relay")
    def train(message: Message, context: Context) -> Message:
        instruction = messages.parse_train_instruction(message)
        state = arrays_to_adapter(message.content["arrays"], W)
        sent = instruction.optimizer
        carried = arrays_to_optimizer(sent.arrays, W, step=sent.step, warmup_from=sent.warmup_from)
        moved = OptimizerState(carried.step + 2, carried.warmup_from, {k: v + 1 for k, v in carried.moments.items()})
        reply = messages.train_reply(message, instruction, adapter_to_arrays({"w": state["w"] - 0.25}),
                                     {"steps": 2.0}, optimizer_record(moved))
        return faults.misbehave(reply, message, context.node_config.get("fault"))

    return app


@pytest.mark.parametrize("fault", [None, "nan-moments", "negative-moments", "optimizer-step-ahead"])
def test_the_strategy_relays_the_state_and_replaces_a_hostile_one(tmp_path, fault):
    coordinator, registry, clock = _carrying(tmp_path)
    grid = InProcessGrid(_carrying_app(), {10: {"partition-id": 0, "fault": fault}}, {}, clock=clock)
    relay = RelayConfig(lease_ttl_s=100, sweep_interval_s=10, poll_interval_s=1, no_node_grace_s=5,
                        deadline_margin_s=10, max_accepted=3, max_wall_s=60.0)

    result = RelayStrategy(coordinator, relay, W, max_steps=2, clock=clock, sleep=clock.sleep).start(grid)

    assert result.accepted == 3  # a bad optimizer state never costs the adapter
    kept = _kept(tmp_path, 3)
    notes = {c.validation.get("optimizer", "")[:9] for c in registry.contributions()}
    if fault is None:
        assert (kept.step, kept.moments["w::exp_avg"].item(), kept.moments["w::exp_avg_sq"].item()) == (6, 3.0, 3.0)
        assert notes == {"ok"}
    else:  # each push replaced at the leased step: the run never moves
        assert (kept.step, [v.item() for v in kept.moments.values()]) == (0, [0.0, 0.0])
        assert notes == {"replaced:"}


# -- fedem verify ----------------------------------------------------------------------------------------
def _verify(tmp_path, repair=False):
    from fedem_flwr.hub.registry import Registry

    registry = Registry.open(tmp_path / "registry.sqlite")
    try:
        return views.verify_view(registry, views.StoreView(tmp_path), repair=repair)
    finally:
        registry.close()


def test_verify_accepts_kept_states_and_versions_without_one(tmp_path):
    coordinator, _, _ = _carrying(tmp_path)
    _push(coordinator, _lease(coordinator), 3.5, optimizer_state=_w_state(3, 0.5, 0.25))

    view = _verify(tmp_path)

    assert view["ok"], view["problems"]
    assert (FORMAT, MOMENTS, SEPARATOR) == (training_state.FORMAT, training_state.MOMENTS, training_state.SEPARATOR)


def test_verify_names_broken_foreign_and_orphan_states_and_repair_removes_orphans(tmp_path):
    coordinator, _, _ = _carrying(tmp_path)
    _push(coordinator, _lease(coordinator), 3.5, optimizer_state=_w_state(3, 0.5, 0.25))
    _push(coordinator, _lease(coordinator), 3.0, optimizer_state=_w_state(5, 0.5, 0.25))
    v1, v2 = optimizer_state_path(tmp_path, "hi", 1), optimizer_state_path(tmp_path, "hi", 2)
    v1.write_bytes(v1.read_bytes()[:-3])  # truncated
    save_optimizer_state(OptimizerState(5, 0, {"w::exp_avg": torch.zeros(2), "w::exp_avg_sq": torch.zeros(2)}), v2)
    OptimizerStates(tmp_path).put("ta", 4, optimizer_state_bytes(_w_state(9, 0.5, 0.25)))  # no such version

    view = _verify(tmp_path)

    found = {(p["kind"], p["revision"]): p["detail"] for p in view["problems"]}
    assert not view["ok"] and set(found) == {("optimizer-state", "v1"), ("optimizer-state", "v2"),
                                             ("optimizer-orphan", "ta/v4")}
    assert "does not load" in found[("optimizer-state", "v1")]
    assert "is F32[2]; its adapter's is F32[1]" in found[("optimizer-state", "v2")]
    repaired = _verify(tmp_path, repair=True)
    assert [p["revision"] for p in repaired["removed"]] == ["ta/v4"]
    assert not optimizer_state_path(tmp_path, "ta", 4).exists()
    assert {p["kind"] for p in repaired["problems"]} == {"optimizer-state"}


def test_verify_names_non_finite_and_negative_moments(tmp_path):
    coordinator, _, _ = _carrying(tmp_path)
    _push(coordinator, _lease(coordinator), 3.5, optimizer_state=_w_state(3, 0.5, 0.25))
    save_optimizer_state(_w_state(3, 0.5, -0.25), optimizer_state_path(tmp_path, "hi", 1))

    (problem,) = _verify(tmp_path)["problems"]

    assert "moment 'w::exp_avg_sq' has 1 negative value(s)" in problem["detail"]
    save_optimizer_state(_w_state(3, float("nan"), 0.25), optimizer_state_path(tmp_path, "hi", 1))
    assert "non-finite" in _verify(tmp_path)["problems"][0]["detail"]


# -- a real relay ----------------------------------------------------------------------------------------
@pytest.mark.slow  # relays real pushes of a tiny model through the real ClientApp
def test_a_real_relay_carries_each_versions_moments_to_the_next_hop(tmp_path):
    from tests.support.relay import KEEPER_OVERRIDES, open_real_hub, relay_in_process

    # Prepare: two adapters and three pushes to accept, so one adapter relays twice (from a kept state)
    assert "data.languages=[hi,ta,mr,de]" in KEEPER_OVERRIDES
    overrides = KEEPER_OVERRIDES.replace("data.languages=[hi,ta,mr,de]", "data.languages=[hi,ta]")
    hub, run_config = open_real_hub(tmp_path, f"{overrides} relay.max_accepted=3 train.max_steps=3 "
                                              "train.carry=moments train.horizon_steps=30 gate.margin=0")

    # Execute
    relay_in_process(hub, run_config, tmp_path, nodes=1)

    # Assert: each accepted version keeps its parent's step plus the steps its push took, by the hub's names
    accepted = [c for c in hub.registry.contributions() if c.decision == "accepted"]
    assert len(accepted) == 3 and all(c.validation.get("optimizer") == "ok" for c in accepted)
    kept = {(c.adapter, c.adapter_version): load_optimizer_state(optimizer_state_path(tmp_path / "hub", c.adapter,
                                                                                        c.adapter_version))
            for c in accepted}
    chained = 0
    for c in accepted:
        parent = hub.registry.adapter_version(c.adapter, c.adapter_version).parent_version
        before = kept[(c.adapter, parent)].step if parent else 0
        chained += bool(parent)
        state = kept[(c.adapter, c.adapter_version)]
        assert state.step == before + int(c.evaluation["train"]["steps"])
        training_state.validate_optimizer_state(state, hub.workbench.spec)
        assert all(v.abs().sum() > 0 for k, v in state.moments.items() if k.endswith("_sq"))
    assert chained >= 1
