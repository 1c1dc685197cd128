"""The VirtualGrid: simulated completion order, simulated TTLs, vanishing nodes and availability,
on the in-process Grid with a real (small) ClientApp that follows the plan it is sent."""

from __future__ import annotations

import time

import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from fedem_flwr.config.schema import SimConfig
from fedem_flwr.protocol import messages
from fedem_flwr.simulation.clock import VirtualClock
from fedem_flwr.simulation.contributors import virtual_contributor
from fedem_flwr.simulation.virtual_grid import VirtualGrid, read_plan
from tests.support.fake_grid import InProcessGrid

TOKENS_PER_STEP = 100
app = ClientApp()


@app.query("profile")
def _profile(message: Message, context) -> Message:
    return messages.profile_reply(message, {
        "languages": ["hi"], "device": "cpu", "data-bytes": 10, "base-digests": [],
        "partition-id": int(context.node_config["partition-id"]), "num-partitions": 8,
    })


@app.train("relay")
def _train(message: Message, context) -> Message:
    plan = read_plan(message)
    return Message(RecordDict({"metrics": MetricRecord(plan.metrics(tokens=TOKENS_PER_STEP * plan.steps))}),
                   reply_to=message)


def _grid(cfg: SimConfig, nodes: int = 4) -> VirtualGrid:
    inner = InProcessGrid(app, {10 + p: {"partition-id": p} for p in range(nodes)}, {})
    return VirtualGrid(inner, VirtualClock(start=1000.0), cfg, seed=0, max_steps=10)


def _profile_all(grid: VirtualGrid) -> None:
    ids = grid.push_messages([messages.profile_message(n, ttl=60) for n in grid.get_node_ids()])
    assert len(list(grid.pull_messages(ids))) == len(ids)  # due at once: no simulated time passes
    assert grid.clock.elapsed == 0


def _train(node_id: int, token: int, ttl: float, budget: float = 1e9) -> Message:
    return Message(RecordDict({"config": ConfigRecord({"lease-token": token, "budget-s": budget, "max-steps": 10})}),
                   dst_node_id=node_id, message_type=messages.TRAIN, ttl=ttl)


def _run_until_replied(grid: VirtualGrid, ids: list[str]) -> list[tuple[float, Message]]:
    seen = []
    while ids:
        grid.advance()
        for reply in grid.pull_messages(ids):
            seen.append((grid.clock.elapsed, reply))
            ids.remove(reply.metadata.reply_to_message_id)
    return seen


def test_replies_come_in_simulated_completion_order_and_hours_pass_in_no_real_time():
    cfg = SimConfig(speed=0.001, speed_sigma=0.8, jitter_sigma=0.0)
    grid = _grid(cfg)
    _profile_all(grid)
    nodes = sorted(grid.get_node_ids())
    started = time.monotonic()
    ids = list(grid.push_messages([_train(n, token=i, ttl=10 * 3600) for i, n in enumerate(nodes)]))
    seen = _run_until_replied(grid, list(ids))
    assert time.monotonic() - started < 5
    durations = {10 + p: 10 / virtual_contributor(cfg, 0, p).speed for p in range(4)}
    expected = sorted(nodes, key=durations.get)
    assert [reply.metadata.src_node_id for _, reply in seen] == expected
    assert [t for t, _ in seen] == pytest.approx(sorted(durations.values()))
    assert grid.clock.elapsed > 3600  # hours of simulated training
    assert grid.counters.tokens == 4 * 10 * TOKENS_PER_STEP and grid.counters.tokens_wasted == 0


def test_a_reply_due_after_its_ttl_is_an_expired_message_at_the_deadline_and_its_work_is_wasted():
    cfg = SimConfig(speed=0.01, speed_sigma=0.0, jitter_sigma=0.0)  # 10 steps take 1000 s
    grid = _grid(cfg, nodes=1)
    _profile_all(grid)
    ids = list(grid.push_messages([_train(10, token=1, ttl=600)]))
    [(when, reply)] = _run_until_replied(grid, ids)
    assert when == pytest.approx(600)
    assert reply.has_error() and reply.error.code == ErrorCode.MESSAGE_UNAVAILABLE
    assert grid.counters.tokens == grid.counters.tokens_wasted == 10 * TOKENS_PER_STEP
    assert grid.counters.expired == 1


def test_a_vanished_node_is_reported_gone_after_the_heartbeat_and_stays_away():
    cfg = SimConfig(speed=0.01, speed_sigma=0.0, jitter_sigma=0.0, vanish_prob=0.99, heartbeat_s=60, away_s=5000)
    grid = _grid(cfg, nodes=1)
    _profile_all(grid)
    plan = virtual_contributor(cfg, 0, 0).plan(1, 1e9, 10)
    assert plan.vanishes
    [(when, reply)] = _run_until_replied(grid, list(grid.push_messages([_train(10, token=1, ttl=3 * 3600)])))
    assert when == pytest.approx(plan.vanish_at_s + 60)
    assert reply.has_error() and reply.error.code == ErrorCode.NODE_UNAVAILABLE
    assert grid.counters.tokens_wasted == plan.steps_done * TOKENS_PER_STEP
    assert list(grid.get_node_ids()) == []  # away
    while not list(grid.get_node_ids()):
        grid.advance()
    assert grid.clock.elapsed == pytest.approx(plan.vanish_at_s + 5000)


def test_only_contributors_inside_their_daily_window_are_listed():
    cfg = SimConfig(availability="daily", online_fraction=0.3, period_s=1000.0, max_jump_s=50.0)
    grid = _grid(cfg, nodes=8)
    _profile_all(grid)
    people = {10 + p: virtual_contributor(cfg, 0, p) for p in range(8)}
    for _ in range(40):
        t = grid.clock.elapsed
        assert sorted(grid.get_node_ids()) == sorted(n for n, who in people.items() if who.online(t))
        grid.advance()
    assert grid.clock.elapsed >= 1000  # a whole day went by in steps of at most max_jump_s


def test_send_and_receive_waits_in_simulated_time_for_the_slowest_reply():
    cfg = SimConfig(speed=0.01, speed_sigma=0.5, jitter_sigma=0.0)
    grid = _grid(cfg)
    _profile_all(grid)
    nodes = sorted(grid.get_node_ids())
    messages_ = [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type="train", ttl=1e6)
                 for n in nodes]
    replies = list(grid.send_and_receive(messages_))
    assert len(replies) == 4
    slowest = max(10 / virtual_contributor(cfg, 0, p).speed for p in range(4))
    assert grid.clock.elapsed == pytest.approx(slowest)


@pytest.mark.parametrize("tokens", [float("nan"), -5.0, float("inf")])
def test_a_reply_with_an_unusable_token_count_counts_none_and_ends_nothing(tokens):
    bad = ClientApp()
    bad.query("profile")(_profile)

    @bad.train("relay")
    def _lying(message: Message, context) -> Message:
        return Message(RecordDict({"metrics": MetricRecord({"tokens": tokens})}), reply_to=message)

    cfg = SimConfig(speed=0.01, speed_sigma=0.0, jitter_sigma=0.0)
    inner = InProcessGrid(bad, {10: {"partition-id": 0}}, {})
    grid = VirtualGrid(inner, VirtualClock(start=0.0), cfg, seed=0, max_steps=10)
    _profile_all(grid)
    [(_, reply)] = _run_until_replied(grid, list(grid.push_messages([_train(10, token=1, ttl=1e6)])))
    assert not reply.has_error() and grid.counters.tokens == 0


def test_an_idle_fedavg_waits_for_the_next_contributor_to_come_online_not_a_whole_jump():
    from fedem_flwr.config.loader import load_config
    from fedem_flwr.simulation.fedavg import _wait

    cfg = SimConfig(availability="daily", online_fraction=0.2, period_s=1000.0, max_jump_s=10_000.0)
    grid = _grid(cfg, nodes=3)
    _profile_all(grid)
    people = [virtual_contributor(cfg, 0, p) for p in range(3)]
    first = min(who.next_change(0.0) for who in people)
    _wait(grid, grid.clock, load_config([]))
    assert grid.clock.elapsed == pytest.approx(first) and first < cfg.max_jump_s


def _listed_seconds(grid: VirtualGrid, ids: list[str]) -> float:
    """Run until every reply is in, integrating the count of listed nodes over each clock step."""
    listed = 0.0
    while ids:
        before, count = grid.clock.elapsed, grid.online_count()
        grid.advance()
        listed += count * (grid.clock.elapsed - before)
        for reply in grid.pull_messages(ids):
            ids.remove(reply.metadata.reply_to_message_id)
    return listed


def test_lease_utilisation_counts_a_vanished_lease_until_it_vanished_and_its_node_offline_while_away():
    # Prepare: two contributors whose 10 steps take 1000 s; node 10 finishes, node 11 vanishes
    cfg = SimConfig(speed=0.01, speed_sigma=0.0, jitter_sigma=0.0, vanish_prob=0.5, heartbeat_s=60, away_s=5000)
    grid = _grid(cfg, nodes=2)
    _profile_all(grid)
    a, b = virtual_contributor(cfg, 0, 0), virtual_contributor(cfg, 0, 1)
    stays = next(t for t in range(100) if not a.plan(t, 1e9, 10).vanishes)
    goes = next(t for t in range(100) if b.plan(t, 1e9, 10).vanishes)
    vanished = b.plan(goes, 1e9, 10).vanish_at_s
    assert a.plan(stays, 1e9, 10).duration_s == pytest.approx(1000.0)

    # Execute
    ids = list(grid.push_messages([_train(10, token=stays, ttl=3 * 3600), _train(11, token=goes, ttl=3 * 3600)]))
    listed = _listed_seconds(grid, ids)
    end = grid.clock.elapsed
    fields = grid.utilisation({"hi": ["hi"], "ta": ["ta"]}, lanes=1)

    # Assert: useful 1000 + vanished s; online: node 10 all along, node 11 until it vanished
    assert end == pytest.approx(max(1000.0, vanished + 60))
    assert fields["lease_seconds"] == pytest.approx(1000.0 + vanished, abs=1e-3)
    assert fields["online_seconds"] == pytest.approx(end + vanished, abs=1e-3)
    assert fields["lease_utilisation"] == pytest.approx((1000.0 + vanished) / (end + vanished), rel=1e-6)
    # both hold hi, nobody ta: one lane of hi for two contributors
    assert fields["utilisation_ceiling"] == 0.5
    assert fields["ceiling_inputs"] == {"lanes": 1, "contributors": 2, "holders": {"hi": 2, "ta": 0}}
    assert fields["utilisation_of_ceiling"] == pytest.approx(fields["lease_utilisation"] / 0.5)
    assert grid.utilisation({"hi": ["hi"]}, lanes=2)["utilisation_ceiling"] == 1.0
    # the listed count keeps the vanished node until the hub hears it is gone: a heartbeat too many
    assert listed == pytest.approx(fields["online_seconds"] + 60, abs=1e-3)


def test_online_time_in_daily_windows_is_the_listed_count_integrated_over_each_clock_step():
    # Prepare: eight daily contributors, no lease: the clock stops at every window's edge
    cfg = SimConfig(availability="daily", online_fraction=0.3, period_s=1000.0, max_jump_s=170.0)
    grid = _grid(cfg, nodes=8)
    _profile_all(grid)

    # Execute: two and a half days, integrating the listed count step by step
    listed = 0.0
    while grid.clock.elapsed < 2500:
        before, count = grid.clock.elapsed, grid.online_count()
        grid.advance()
        listed += count * (grid.clock.elapsed - before)

    # Assert
    end = grid.clock.elapsed
    windows = sum(virtual_contributor(cfg, 0, p).online_seconds(0.0, end) for p in range(8))
    assert grid.usage() == {"lease_s": 0.0, "online_s": pytest.approx(windows)}
    assert listed == pytest.approx(windows)
    assert 0 < windows < 8 * end


class _Trickling(InProcessGrid):
    """Replies come back one per pull, the newest first: as real replies race each other."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.held: dict[str, Message] = {}  # replies that have run but not come back yet

    def pull_messages(self, message_ids):
        wanted = list(message_ids)
        self.held.update((reply.metadata.reply_to_message_id, reply) for reply in super().pull_messages(wanted))
        ready = [message_id for message_id in reversed(list(self.held)) if message_id in wanted]
        return [self.held.pop(ready[0])] if ready else []


def test_replies_due_at_one_instant_come_whole_and_in_push_order_however_they_really_arrive():
    # Prepare: four profile replies, due the moment they are sent, that really arrive one per pull
    inner = _Trickling(app, {10 + p: {"partition-id": p} for p in range(4)}, {})
    grid = VirtualGrid(inner, VirtualClock(start=1000.0), SimConfig(), seed=0, max_steps=10, sleep=lambda s: None)
    nodes = sorted(grid.get_node_ids())

    # Execute
    ids = list(grid.push_messages([messages.profile_message(n, ttl=60) for n in nodes]))
    replies = list(grid.pull_messages(ids))

    # Assert: one pull gives all four, in the order they were sent, and no simulated time passed
    assert [reply.metadata.src_node_id for reply in replies] == nodes
    assert grid.clock.elapsed == 0
