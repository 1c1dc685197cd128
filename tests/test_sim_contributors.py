"""Virtual contributors: seeded, budget-bound plans, vanishing, daily windows (pure logic)."""

from __future__ import annotations

import math
import statistics

import pytest

from fedem_flwr.config.schema import SimConfig
from fedem_flwr.errors import ConfigError
from fedem_flwr.simulation.contributors import virtual_contributor


def test_the_hub_and_a_node_draw_the_same_contributor_and_lease():
    cfg = SimConfig(vanish_prob=0.3, availability="daily")
    a, b = virtual_contributor(cfg, 7, 3), virtual_contributor(cfg, 7, 3)
    assert a == b
    assert [a.plan(t, 3600, 10) for t in range(20)] == [b.plan(t, 3600, 10) for t in range(20)]
    assert virtual_contributor(cfg, 8, 3).speed != a.speed
    assert virtual_contributor(cfg, 7, 4).speed != a.speed


def test_speeds_spread_log_normally_around_the_median():
    cfg = SimConfig(speed=0.02, speed_sigma=0.5)
    speeds = [virtual_contributor(cfg, 0, p).speed for p in range(400)]
    assert statistics.median(speeds) == pytest.approx(0.02, rel=0.15)
    assert statistics.stdev(math.log(s) for s in speeds) == pytest.approx(0.5, rel=0.15)
    alike = SimConfig(speed=0.02, speed_sigma=0.0, jitter_sigma=0.0)
    assert {virtual_contributor(alike, 0, p).speed for p in range(10)} == {0.02}


def test_a_plan_trains_what_fits_the_budget_and_takes_steps_over_speed():
    cfg = SimConfig(speed=0.01, speed_sigma=0.0, jitter_sigma=0.0)
    who = virtual_contributor(cfg, 0, 0)
    assert who.plan(1, budget_s=3600, max_steps=10).steps == 10
    short = who.plan(1, budget_s=450, max_steps=10)
    assert short.steps == 4 and short.duration_s == pytest.approx(400) and not short.vanishes
    assert who.plan(1, budget_s=5, max_steps=10).steps == 1  # at least one step, even if it will be late


def test_jitter_makes_some_leases_late_and_vanishing_spends_part_of_the_work():
    cfg = SimConfig(speed=0.01, speed_sigma=0.0, jitter_sigma=0.3, vanish_prob=0.25)
    who = virtual_contributor(cfg, 0, 0)
    plans = [who.plan(t, 1000, 10) for t in range(400)]
    assert any(p.duration_s > 1000 for p in plans) and any(p.duration_s < 1000 for p in plans)
    vanished = [p for p in plans if p.vanishes]
    assert 0.15 < len(vanished) / len(plans) < 0.35
    assert all(0 <= p.vanish_at_s <= p.duration_s and p.steps_done <= p.steps for p in vanished)
    assert all(p.steps_done == p.steps for p in plans if not p.vanishes)


def test_a_daily_contributor_is_online_for_its_window_and_says_when_that_changes():
    cfg = SimConfig(availability="daily", online_fraction=0.5, period_s=100.0)
    who = virtual_contributor(cfg, 0, 5)
    window = who.online_fraction * 100.0
    online = [t for t in range(300) if who.online(float(t))]
    assert len(online) == pytest.approx(3 * window, abs=4)
    t = 0.0
    for _ in range(6):
        change = who.next_change(t)
        assert change > t
        assert who.online(change - 1e-6) == who.online(t) != who.online(change + 1e-6)
        t = change + 1e-6
    back = who.back_after_vanishing(t + 1.0)
    assert who.online(back + 1e-6) and not who.online(back - 1e-6)


def test_an_always_online_contributor_is_away_for_away_s_after_vanishing():
    who = virtual_contributor(SimConfig(away_s=900.0), 0, 1)
    assert who.online(1e9) and who.next_change(5.0) == math.inf
    assert who.back_after_vanishing(100.0) == 1000.0


@pytest.mark.parametrize("override, key", [
    ({"method": "fedavg-global"}, "sim.clock=virtual"),
    ({"speed": 0.0}, "sim.speed"),
    ({"vanish_prob": 1.0}, "sim.vanish_prob"),
    ({"availability": "weekly"}, "sim.availability"),
    ({"speed_sigma": -1.0}, "sim.speed_sigma"),
    ({"max_tokens": 0}, "sim.max_tokens"),
])
def test_bad_simulation_settings_are_refused_by_name(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        SimConfig(**override)
