"""The relay survives its nodes: hostile or broken replies on an in-process Grid never end the run.

Each node runs a scripted ClientApp that misbehaves as its node config says; the scripted workbench
reads the held-out loss from the adapter weight ``w``. Every scenario checks that the relay goes on,
that no accepted version is lost and that the lease table stays consistent.
"""

from __future__ import annotations

import logging
import math
import sqlite3

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.superlink.grid import InMemoryGrid

from fedem_flwr.config.schema import RelayConfig
from fedem_flwr.errors import ConfigError, HubFault
from fedem_flwr.hub.store import ArtifactRef
from fedem_flwr.model.adapter_spec import AdapterSpec
from fedem_flwr.protocol import messages
from fedem_flwr.protocol.wire import adapter_to_arrays, arrays_to_adapter
from fedem_flwr.relay.coordinator import PushOutcome
from fedem_flwr.relay.strategy import HISTORY_LIMIT, RelayResult, RelayStrategy, is_simulation_grid
from tests.support.fake_grid import InProcessGrid
from tests.support.relay import FakeClock, ScriptedWorkbench, seeded_coordinator

GOOD_PROFILE = {"device": "cpu", "data-bytes": 100, "base-digests": []}
SPEC = AdapterSpec.from_state({"w": torch.zeros(1)})  # the scripted adapter: one weight
START = FakeClock().now  # every run starts here; the relay polls every second (`poll_interval_s=1`)


def _scripted_app(clock: FakeClock) -> ClientApp:
    """Node config keys: ``languages``, ``partition-id``, ``profile`` (a dict replacing the profile),
    ``behaviour`` (what its train handler does), ``has-base`` (claims the base in its profile)."""
    app = ClientApp()
    cached: set[int] = set()  # nodes that hold the base
    trains: dict[int, int] = {}  # train messages each node has run

    @app.query("profile")
    def profile(message: Message, context: Context) -> Message:
        config = context.node_config
        if "profile" in config:
            return Message(RecordDict({"config": ConfigRecord(config["profile"])}), reply_to=message)
        languages = [lang for lang in str(config.get("languages", "")).split(",") if lang]
        answer = {**GOOD_PROFILE, "languages": languages, "base-digests": list(config.get("has-base", []))}
        if "partition-id" in config:
            answer["partition-id"] = config["partition-id"]
        return messages.profile_reply(message, answer)

    @app.train("relay")
    def train(message: Message, context: Context) -> Message:
        instruction = messages.parse_train_instruction(message)
        behaviour = context.node_config.get("behaviour", "improve")
        if messages.BASE_FILES in message.content:
            cached.add(context.node_id)
        trains[context.node_id] = trains.get(context.node_id, 0) + 1
        if behaviour == "crash" or (behaviour == "crash-twice" and trains[context.node_id] <= 2):
            raise RuntimeError("out of patience")
        if behaviour == "bad-envelope":
            config = ConfigRecord({"lease-token": "seven", "adapter": instruction.adapter, "base-version": 0})
            return Message(RecordDict({"config": config}), reply_to=message)
        if behaviour == "no-data":
            return messages.status_reply(message, instruction, messages.NO_DATA, "no rows")
        if behaviour == "needs-base" and context.node_id not in cached:
            return messages.status_reply(message, instruction, messages.MISSING_BASE, "not cached")
        if behaviour == "slow":
            clock.now += instruction.budget_s + 120  # well past the lease
        state = arrays_to_adapter(message.content["arrays"], SPEC)
        state["w"] = state["w"] - 0.25
        metrics = {"steps": 1.0}
        if behaviour == "nan-metrics":
            metrics.update({"loss-first": float("nan"), "loss-last": float("inf"), "tokens": 8.0})
        reply = messages.train_reply(message, instruction, adapter_to_arrays(state), metrics)
        if behaviour == "many-metrics":
            reply.content["metrics"] = MetricRecord({f"m{i:03d}": float(i) for i in range(100)})
        return reply

    return app


def _strategy(tmp_path, clock, workbench=None, **relay):
    coordinator, registry, store = seeded_coordinator(tmp_path, clock, workbench=workbench)
    settings = dict(lease_ttl_s=100, sweep_interval_s=10, poll_interval_s=1, no_node_grace_s=5,
                    deadline_margin_s=10, max_wall_s=60.0, backoff_s=4, backoff_max_s=16)
    settings.update(relay)
    strategy = RelayStrategy(coordinator, RelayConfig(**settings), SPEC, max_steps=1, clock=clock, sleep=clock.sleep)
    return strategy, registry, store


def _run(tmp_path, node_configs, *, simulation=True, public_keys=None, workbench=None, **relay):
    clock = FakeClock()
    strategy, registry, store = _strategy(tmp_path, clock, workbench, **relay)
    grid = InProcessGrid(_scripted_app(clock), node_configs, {}, clock=clock, simulation=simulation,
                         public_keys=public_keys)
    _record_pushes(grid)
    return strategy.start(grid), registry, grid


def _record_pushes(grid):
    """Keep every pushed message in ``grid.pushed`` (``delivered`` lacks those a node failed on)."""
    push, grid.pushed = grid.push_messages, []

    def recording(batch):
        batch = list(batch)
        grid.pushed.extend(batch)
        return push(batch)

    grid.push_messages = recording


def _assert_lease_table_consistent(registry):
    """No two leases overlap on one adapter or one holder, and every lease ended."""
    leases = registry.leases()
    assert not registry.leases(active_only=True)
    for key in ("adapter", "holder"):
        for value in {getattr(lease, key) for lease in leases}:
            mine = sorted((lease for lease in leases if getattr(lease, key) == value), key=lambda x: x.token)
            for earlier, later in zip(mine, mine[1:]):
                assert earlier.ended is not None and earlier.ended <= later.issued, (earlier, later)


def _assert_no_version_lost(registry, result):
    versions = [v for v in registry.adapter_versions() if v.version > 0]
    accepted = [c for c in registry.contributions() if c.decision == "accepted"]
    assert len(versions) == len(accepted) == result.accepted


def _sent(grid, node_id, kind):
    return [m for m in grid.delivered if m.metadata.dst_node_id == node_id and m.metadata.message_type == kind]


def test_non_finite_metrics_are_dropped_and_named_and_the_push_is_judged(tmp_path):
    result, registry, _ = _run(tmp_path, {10: {"partition-id": 0, "languages": "hi", "behaviour": "nan-metrics"},
                                          11: {"partition-id": 1, "languages": "ta"}}, max_accepted=6)

    assert result.accepted == 6
    hi = [c for c in registry.contributions() if c.adapter == "hi"]
    assert hi and all(c.decision == "accepted" for c in hi)
    assert all(c.evaluation["train"] == {"steps": 1.0, "tokens": 8.0} for c in hi)
    assert all(c.validation["dropped_metrics"] == ["loss-first", "loss-last"] for c in hi)
    _assert_no_version_lost(registry, result)
    _assert_lease_table_consistent(registry)


def test_metrics_beyond_the_bound_are_dropped_by_name(tmp_path):
    result, registry, _ = _run(tmp_path, {10: {"partition-id": 0, "languages": "hi", "behaviour": "many-metrics"}},
                               max_accepted=1)

    (contribution,) = registry.contributions()
    train = contribution.evaluation["train"]
    dropped = contribution.validation["dropped_metrics"]
    assert len(train) == messages.MAX_METRICS
    assert {"m032", "m033", "...36 more"} <= set(dropped) and not set(dropped) & set(train)
    _assert_lease_table_consistent(registry)


MALFORMED_PROFILES = {
    "data-bytes is a word": {**GOOD_PROFILE, "languages": ["hi"], "data-bytes": "lots"},
    "languages is a string": {**GOOD_PROFILE, "languages": "hi"},
    "10,000 languages": {**GOOD_PROFILE, "languages": [f"l{chr(97 + i % 26)}{chr(97 + i // 26 % 26)}" for i in range(10_000)]},
    "not a language code": {**GOOD_PROFILE, "languages": ["hi; DROP TABLE"]},
    "no device": {"languages": ["hi"], "data-bytes": 100, "base-digests": []},
    "no languages": {"device": "cpu", "data-bytes": 100, "base-digests": []},
    "digest not hex": {**GOOD_PROFILE, "languages": ["hi"], "base-digests": ["../../etc"]},
    "negative size": {**GOOD_PROFILE, "languages": ["hi"], "data-bytes": -1},
}


@pytest.mark.parametrize("case", sorted(MALFORMED_PROFILES))
def test_malformed_profile_gets_no_lease_and_is_asked_again_with_backoff(tmp_path, caplog, case):
    nodes = {10: {"partition-id": 0, "profile": MALFORMED_PROFILES[case]}, 11: {"partition-id": 1, "languages": "ta"}}
    with caplog.at_level(logging.WARNING, logger="fedem_flwr.relay.strategy"):
        result, registry, grid = _run(tmp_path, nodes, max_wall_s=60)

    assert result.accepted > 0  # the honest node relays on
    assert all(lease.holder == "sim:1" for lease in registry.leases())
    queries = _sent(grid, 10, messages.PROFILE)
    assert len(queries) == 6  # at 0, 4, 12, 28, 44, 60 s: asked again, ever less often (backoff 4 s to 16 s)
    warnings = [r.getMessage() for r in caplog.records if "malformed profile" in r.getMessage()]
    assert len(warnings) == len(queries)
    # a simulated node that never named its partition has no identity but its node id: no pseudonym is
    # registered for it
    assert all(w.startswith("Node 10 (identity not yet known) backs off") for w in warnings)
    assert set(registry.identities().values()) == {"sim:1"}
    _assert_no_version_lost(registry, result)
    _assert_lease_table_consistent(registry)


def test_profile_reply_is_parsed_into_checked_deduplicated_fields():
    clock = FakeClock()
    grid = InProcessGrid(ClientApp(), {}, {}, clock=clock)  # sets the task identity messages need
    query = messages.profile_message(10, ttl=60)
    query.metadata.__dict__["_message_id"] = "q"
    digest = "a" * 64
    answer = {"languages": ["te", "hi", "te", "pt-BR"], "device": "cuda", "data-bytes": 5,
              "base-digests": [digest], "partition-id": 2, "num-partitions": 4}
    parsed = messages.parse_profile_reply(messages.profile_reply(query, answer))

    assert parsed == messages.ProfileReply(("hi", "pt-BR", "te"), "cuda", 5, frozenset({digest}), 2, 4)
    with pytest.raises(messages.InvalidReply, match=r"`partition-id` is 4; it must be below `num-partitions` 4"):
        messages.parse_profile_reply(messages.profile_reply(query, {**answer, "partition-id": 4}))
    assert grid.simulation


CLAIMS = {
    "token": ({"token": 57}, "claim-mismatch: token 57 claimed, lease 7"),
    "adapter": ({"adapter": "ta"}, "claim-mismatch: adapter 'ta' claimed, lease 7 is on 'hi'"),
    "base version": ({"base_version": 3}, "claim-mismatch: base version 3 claimed, lease 7 is on 0"),
}


@pytest.mark.parametrize("case", sorted(CLAIMS))
def test_a_train_reply_is_checked_against_the_instruction_it_answers(case):
    InProcessGrid(ClientApp(), {}, {})  # sets the task identity messages need
    base = ArtifactRef("t/base", "v0", "a" * 64)
    sent = messages.TrainInstruction("hi", 0, ("hi",), 7, base, 0, 60.0, 1)
    message = messages.train_message(10, sent, adapter_to_arrays({"w": torch.zeros(1)}), ttl=60)
    message.metadata.__dict__["_message_id"] = "m"
    change, reason = CLAIMS[case]
    claimed = messages.TrainInstruction(**{**sent.__dict__, **change})
    metrics = {"steps": 2.0, "loss-first": math.nan}

    honest = messages.parse_train_reply(messages.train_reply(message, sent, adapter_to_arrays({"w": torch.ones(1)}),
                                                             metrics), sent)
    with pytest.raises(messages.ClaimMismatch) as mismatch:
        messages.parse_train_reply(messages.train_reply(message, claimed, adapter_to_arrays({"w": torch.ones(1)}),
                                                        metrics), sent)

    assert (honest.token, honest.adapter, honest.base_version, honest.status) == (7, "hi", 0, messages.OK)
    assert (honest.metrics, honest.dropped_metrics) == ({"steps": 2.0}, ("loss-first",))
    assert str(mismatch.value) == reason
    # what the rejection records: the metrics as parsed
    assert (mismatch.value.metrics, mismatch.value.dropped_metrics) == ({"steps": 2.0}, ("loss-first",))


def test_partition_id_is_no_identity_on_a_superlink(tmp_path):
    # node 11 claims node 10's partition; on a SuperLink each is known by its own key
    nodes = {10: {"partition-id": 0, "languages": "hi"}, 11: {"partition-id": 0, "languages": "ta"}}
    keys = {10: b"alice-key", 11: b"bob-key"}
    result, registry, _ = _run(tmp_path, nodes, simulation=False, public_keys=keys, max_accepted=4)

    holders = {lease.holder for lease in registry.leases()}
    assert len(holders) == 2 and all(holder.startswith("pk:") for holder in holders)
    assert {lease.adapter for lease in registry.leases()} == {"hi", "ta"}
    assert set(registry.identities().values()) == holders
    _assert_no_version_lost(registry, result)
    _assert_lease_table_consistent(registry)


def test_nodes_without_a_key_on_a_superlink_are_known_by_node_id(tmp_path):
    nodes = {10: {"partition-id": 0, "languages": "hi"}}
    result, registry, _ = _run(tmp_path, nodes, simulation=False, max_accepted=1)

    assert {lease.holder for lease in registry.leases()} == {"node:10"}


@pytest.mark.parametrize("simulation", [True, False])
def test_two_live_nodes_on_one_identity_never_crash_the_hub(tmp_path, caplog, simulation):
    # In simulation both claim partition 0; on a SuperLink both show one public key.
    nodes = {10: {"partition-id": 0, "languages": "hi"}, 11: {"partition-id": 0, "languages": "hi,ta"}}
    keys = {10: b"same", 11: b"same"}
    with caplog.at_level(logging.WARNING, logger="fedem_flwr.relay.strategy"):
        result, registry, grid = _run(tmp_path, nodes, simulation=simulation, public_keys=keys, max_accepted=4)

    assert result.accepted == 4
    refused = [r for r in caplog.records if "gets no lease while that node is here" in r.getMessage()]
    assert len(refused) == 1 and "Node 11 " in refused[0].getMessage()
    assert not _sent(grid, 11, messages.TRAIN)
    assert len({lease.holder for lease in registry.leases()}) == 1
    _assert_no_version_lost(registry, result)
    _assert_lease_table_consistent(registry)


def test_node_without_data_for_the_lease_ends_it_without_contribution_or_backoff(tmp_path):
    result, registry, grid = _run(tmp_path, {10: {"partition-id": 0, "languages": "hi", "behaviour": "no-data"}},
                                  max_wall_s=20)

    leases = registry.leases()
    assert leases and all(lease.outcome == messages.NO_DATA for lease in leases)
    assert not registry.contributions() and result.accepted == result.rejected == 0
    # leased again at once: one lease a poll from the first lease at 1 s to the stop at 20 s, no backoff
    assert [lease.issued - START for lease in leases] == [float(s) for s in range(1, 21)]
    _assert_lease_table_consistent(registry)


def test_node_missing_the_base_gets_it_with_its_next_lease_only(tmp_path, caplog):
    clock = FakeClock()
    strategy, registry, store = _strategy(tmp_path, clock, max_accepted=3)
    digest = registry.latest_checkpoint().digest
    # the node claims the base in its profile but does not hold it
    nodes = {10: {"partition-id": 0, "languages": "hi", "behaviour": "needs-base", "has-base": [digest]}}
    grid = InProcessGrid(_scripted_app(clock), nodes, {}, clock=clock)
    with caplog.at_level(logging.INFO, logger="fedem_flwr.relay.strategy"):
        result = strategy.start(grid)

    trains = _sent(grid, 10, messages.TRAIN)
    assert [messages.BASE_FILES in m.content for m in trains] == [False, True, False, False]
    first, *rest = sorted(registry.leases(), key=lambda lease: lease.token)
    assert first.outcome == messages.MISSING_BASE and [lease.outcome for lease in rest] == ["accepted"] * 3
    # the log names the node by its pseudonym; its Flower node id only where Flower's own logs are matched
    alias = registry.pseudonym("sim:0")
    lines = [r.getMessage() for r in caplog.records]
    assert f"Node {alias} gets base v0 in-band with lease {rest[0].token}" in lines
    assert f"Node {alias} (node id 10): languages hi, cpu, 0 KB of text" in lines
    _assert_no_version_lost(registry, result)
    _assert_lease_table_consistent(registry)


def test_failing_node_backs_off_and_gets_the_base_once(tmp_path):
    nodes = {10: {"partition-id": 0, "languages": "hi", "behaviour": "crash"}, 11: {"partition-id": 1, "languages": "ta"}}
    result, registry, grid = _run(tmp_path, nodes, max_wall_s=100)

    crashed = sorted((lease for lease in registry.leases() if lease.holder == "sim:0"), key=lambda x: x.issued)
    # the first lease at 1 s, then 4 s doubling to at most 16 s between leases, not one a poll
    assert [lease.issued - START for lease in crashed] == [1.0, 5.0, 13.0, 29.0, 45.0, 61.0, 77.0, 93.0]
    trains = [m for m in grid.pushed if m.metadata.dst_node_id == 10 and m.metadata.message_type == messages.TRAIN]
    assert len(trains) == len(crashed) and sum(messages.BASE_FILES in m.content for m in trains) == 1
    assert result.accepted > 0
    _assert_no_version_lost(registry, result)
    _assert_lease_table_consistent(registry)


def test_malformed_train_reply_is_recorded_and_its_node_backs_off(tmp_path):
    result, registry, _ = _run(tmp_path, {10: {"partition-id": 0, "languages": "hi", "behaviour": "bad-envelope"}},
                               max_wall_s=30)

    contributions = registry.contributions()
    # pushed at 1 s, then after backing off 4, 8 and 16 s; the next would come after the stop at 30 s
    assert sorted(c.received - START for c in contributions) == [1.0, 5.0, 13.0, 29.0]
    assert result.rejected == len(contributions)
    assert {c.reason for c in contributions} == {
        "invalid-adapter: malformed train reply: train reply `lease-token` is 'seven'; "
        "it must be a non-negative integer"
    }
    _assert_lease_table_consistent(registry)


def test_a_success_resets_the_backoff(tmp_path):
    nodes = {10: {"partition-id": 0, "languages": "hi", "behaviour": "crash-twice"}}
    result, registry, _ = _run(tmp_path, nodes, max_accepted=4)

    leases = sorted(registry.leases(), key=lambda lease: lease.token)
    assert [lease.outcome.split(":")[0] for lease in leases] == ["client-error"] * 2 + ["accepted"] * 4
    # backing off 4 s, then 8 s, after each failure; after a success it is leased again the next poll
    assert [lease.issued - START for lease in leases] == [1.0, 5.0, 13.0, 14.0, 15.0, 16.0]
    _assert_no_version_lost(registry, result)


def test_lease_ended_without_a_reply_needs_a_fresh_profile(tmp_path):
    result, registry, grid = _run(tmp_path, {10: {"partition-id": 0, "languages": "hi", "behaviour": "slow"}},
                                  max_wall_s=600)

    kinds = [m.metadata.message_type for m in grid.delivered if m.metadata.dst_node_id == 10]
    # every train message follows a fresh profile query, and one more is asked as the run ends
    assert kinds == [messages.PROFILE, messages.TRAIN] * 3 + [messages.PROFILE]
    _assert_lease_table_consistent(registry)


class _BrokenWorkbench(ScriptedWorkbench):
    """Evaluation fails from the second push of every adapter on (w below 3.6)."""

    def evaluate(self, state, languages=None):
        if float(state["w"][0]) < 3.6:
            raise RuntimeError("evaluation blew up")
        return super().evaluate(state, languages)


def test_an_unexpected_error_on_one_reply_ends_that_lease_and_the_relay_goes_on(tmp_path):
    nodes = {10: {"partition-id": 0, "languages": "hi"}, 11: {"partition-id": 1, "languages": "ta"}}
    result, registry, _ = _run(tmp_path, nodes, workbench=_BrokenWorkbench(), max_wall_s=40)

    failed = [c for c in registry.contributions() if c.reason.startswith("hub-error")]
    assert failed and all(c.reason == "hub-error: RuntimeError: evaluation blew up" for c in failed)
    assert {lease.outcome for lease in registry.leases()} == {"accepted", "hub-error"}
    assert result.accepted == 2  # each adapter's first push
    _assert_no_version_lost(registry, result)
    _assert_lease_table_consistent(registry)


def test_a_registry_that_cannot_be_written_stops_the_run_with_one_line(tmp_path):
    clock = FakeClock()
    strategy, registry, _ = _strategy(tmp_path, clock)
    grid = InProcessGrid(_scripted_app(clock), {10: {"partition-id": 0, "languages": "hi"}}, {}, clock=clock)

    def unwritable(*args, **kwargs):
        raise sqlite3.OperationalError("attempt to write a readonly database")

    registry.add_contribution = unwritable
    with pytest.raises(HubFault) as halted:
        strategy.start(grid)
    assert str(halted.value).startswith("the hub cannot go on")
    assert str(halted.value).endswith("OperationalError: attempt to write a readonly database")
    assert "\n" not in str(halted.value)


def test_history_keeps_counters_and_the_last_outcomes_only():
    result = RelayResult()
    for token in range(HISTORY_LIMIT + 50):
        result.record(PushOutcome("accepted" if token % 2 else "rejected", "", "hi", token))
    assert (result.accepted, result.rejected) == ((HISTORY_LIMIT + 50) // 2, (HISTORY_LIMIT + 50) // 2)
    assert len(result.history) == HISTORY_LIMIT and result.history[0].lease_token == 50


def test_backoff_settings_are_checked():
    with pytest.raises(ConfigError, match=r"`relay.backoff_max_s` \(1\) must be at least `relay.backoff_s` \(2\)"):
        RelayConfig(backoff_s=2, backoff_max_s=1)
    with pytest.raises(ConfigError, match=r"`relay.backoff_s` is 0"):
        RelayConfig(backoff_s=0)
    assert math.isclose(RelayConfig().backoff_max_s, 3600)


def test_only_flowers_in_memory_grid_counts_as_simulation():
    assert is_simulation_grid(InMemoryGrid.__new__(InMemoryGrid))
    assert not is_simulation_grid(InProcessGrid(ClientApp(), {}, {}, simulation=False))
    assert is_simulation_grid(InProcessGrid(ClientApp(), {}, {}))
