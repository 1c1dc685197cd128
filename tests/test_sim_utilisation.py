"""Lease utilisation and its ceiling, by hand: the ceiling for 1, 2 and 3 lanes, useful lease time
cut at a vanishing and at the run's end, online time inside daily windows in closed form."""

from __future__ import annotations

import math
import random

import pytest

from fedem_flwr.config.schema import SimConfig
from fedem_flwr.simulation.contributors import VirtualContributor, virtual_contributor
from fedem_flwr.simulation.utilisation import LeaseMeter, ceiling, holders, utilisation_fields


def always(a: float, b: float) -> float:
    return max(0.0, b - a)


def _daily(phase_s: float, fraction: float = 0.3, period_s: float = 1000.0) -> VirtualContributor:
    cfg = SimConfig(availability="daily", period_s=period_s)
    return VirtualContributor(0, 0.01, fraction, phase_s, cfg, seed=0)


@pytest.mark.parametrize(("lanes", "expected"), [(1, 3 / 10), (2, 5 / 10), (3, 6 / 10)])
def test_the_ceiling_caps_each_adapter_at_its_lanes_and_its_holders(lanes, expected):
    # Prepare: uneven holders (1, 2 and 4 contributors; one adapter nobody holds) among 10
    held = {"hi": 1, "ta": 2, "de": 4, "bn": 0}

    # Execute
    found = ceiling(held.values(), 10, lanes)

    # Assert: sum of min(holders, lanes) over 10
    assert found == pytest.approx(expected)


def test_the_ceiling_is_one_at_most_and_the_studys_is_six_twentieths():
    assert ceiling([4, 4], 4, lanes=3) == 1.0  # 6 lanes' worth for 4 contributors: each holds one lease
    assert ceiling([4, 4, 3, 3, 3, 3], 20, lanes=1) == pytest.approx(0.3)
    assert math.isnan(ceiling([], 0, lanes=1))
    with pytest.raises(ValueError, match="`lanes` is 0"):
        ceiling([1], 1, lanes=0)


def test_holders_are_the_contributors_with_any_of_an_adapters_languages():
    adapters = {"hi": ["hi"], "south": ["ta", "bn"], "es": ["es"]}
    contributors = [("hi",), ("hi", "ta"), ("bn",), ("de",)]

    assert holders(adapters, contributors) == {"hi": 2, "south": 2, "es": 0}


def test_a_vanished_lease_counts_until_the_vanishing_and_its_contributor_is_offline_while_away():
    # Prepare: two always-online contributors; A leases [0, 1000); B leases from 0 and vanishes at
    # 400, away until 5400
    meter = LeaseMeter()
    meter.lease("A", 0.0, 1000.0)
    meter.lease("B", 0.0, 400.0)
    meter.absent("B", 400.0, 5400.0)
    windows = {"A": always, "B": always}

    # Execute / Assert: at 1500 s, 1000 + 400 useful of 1500 + 400 online
    assert meter.lease_seconds(1500.0) == 1400.0
    assert meter.online_seconds(1500.0, windows) == 1900.0
    fields = utilisation_fields(meter.lease_seconds(1500.0), meter.online_seconds(1500.0, windows),
                                ceiling([2], 2, lanes=1))
    assert fields == {"lease_seconds": 1400.0, "online_seconds": 1900.0, "lease_utilisation": 1400 / 1900,
                      "utilisation_ceiling": 0.5, "utilisation_of_ceiling": 1400 / 1900 / 0.5}
    # nothing past the end: a run ending at 700 s counts A's lease up to then
    assert (meter.lease_seconds(700.0), meter.online_seconds(700.0, windows)) == (1100.0, 1100.0)
    # back at 5400: online again
    assert meter.online_seconds(6000.0, windows) == 6000.0 + 400.0 + 600.0


def test_a_lease_past_its_window_keeps_its_contributor_online_to_its_end():
    # Prepare: online [100, 400) of every 1000 s; a lease from 300 to 700 (300 s past the window)
    who = _daily(phase_s=100.0)
    meter = LeaseMeter()
    meter.lease(0, 300.0, 700.0)

    # Execute / Assert: at 1000 s, the window's 300 s plus the lease's 300 s outside it
    assert meter.online_seconds(1000.0, {0: who.online_seconds}) == 600.0
    assert meter.lease_seconds(1000.0) == 400.0
    assert meter.online_seconds(500.0, {0: who.online_seconds}) == 400.0  # cut at the end too


def test_overlapping_leases_of_one_contributor_count_each_but_keep_it_online_once():
    meter = LeaseMeter()
    meter.lease(0, 0.0, 300.0)  # FedAvg per language: one message per language it holds
    meter.lease(0, 0.0, 500.0)

    assert meter.lease_seconds(1000.0) == 800.0
    assert meter.online_seconds(1000.0, {0: _daily(phase_s=0.0, fraction=0.2).online_seconds}) == 500.0


def test_online_seconds_of_a_daily_contributor_are_its_windows_within_the_span():
    who = _daily(phase_s=100.0)  # online [100, 400), [1100, 1400), ...
    assert who.online_seconds(0.0, 1200.0) == pytest.approx(300.0 + 100.0)
    assert who.online_seconds(350.0, 2150.0) == pytest.approx(50.0 + 300.0 + 50.0)
    assert who.online_seconds(500.0, 500.0) == 0.0
    late = _daily(phase_s=900.0)  # online [900, 1200) and, before the start, [-100, 200)
    assert late.online_seconds(0.0, 1000.0) == pytest.approx(200.0 + 100.0)


def test_online_seconds_are_the_integral_of_online():
    cfg = SimConfig(availability="daily", online_fraction=0.4, period_s=1000.0)
    for partition in range(5):
        who = virtual_contributor(cfg, 3, partition)
        sampled = sum(who.online((i + 0.5) / 10) for i in range(30_000)) / 10  # 0.1 s steps, at their middle
        assert who.online_seconds(0.0, 3000.0) == pytest.approx(sampled, abs=0.5)  # 0.05 s a window edge


def test_on_every_edge_the_clock_stops_at_online_already_reads_the_new_state():
    # the clock stops exactly on next_change; a listing that lagged there would be wrong for a step
    cfg = SimConfig(availability="daily", online_fraction=0.3, period_s=1000.0)
    for partition in range(8):
        who, t = virtual_contributor(cfg, 0, partition), 0.0
        for _ in range(6):
            edge = who.next_change(t)
            assert who.online(edge) != who.online(t), (partition, t, edge)
            t = edge


def _full_online_seconds(meter: LeaseMeter, now: float, contributors) -> float:
    """The integral from scratch, every interval of the run counted on each call."""
    total = 0.0
    for who, within in contributors.items():
        total += within(0.0, now)
        total -= sum(within(max(0.0, start), min(end, now)) for start, end in meter.away.get(who, ()) if start < now)
        total += sum((min(end, now) - start) - within(start, min(end, now))
                     for start, end in meter.busy.get(who, ()) if start < now)
    return total


def _copy(meter: LeaseMeter) -> LeaseMeter:
    """A fresh meter holding the same intervals (nothing settled yet)."""
    return LeaseMeter(list(meter.leases), {who: [list(span) for span in spans] for who, spans in meter.busy.items()},
                      {who: list(spans) for who, spans in meter.away.items()})


def test_online_seconds_asked_as_the_run_goes_equal_the_integral_from_scratch():
    # Prepare: 6 contributors (daily windows, one always online) leasing and vanishing over 30 periods,
    # asked after every event as a run's trace rows ask; now and then about an earlier time, and leases
    # that extend a span, open or already settled
    rng = random.Random(7)
    windows = {who: _daily(phase_s=rng.uniform(0, 1000), fraction=rng.uniform(0.2, 0.8)).online_seconds
               for who in range(5)}
    windows[5] = always
    meter, free_at, now = LeaseMeter(), dict.fromkeys(windows, 0.0), 0.0
    for step in range(600):
        now += rng.uniform(0.0, 50.0)
        who = rng.randrange(len(windows))
        if free_at[who] <= now:
            end = now + rng.uniform(10.0, 400.0)
            # now and then from where its last (ended, maybe settled) span ended: that span grows
            meter.lease(who, meter.busy[who][-1][1] if who in meter.busy and rng.random() < 0.2 else now, end)
            free_at[who] = end
            if rng.random() < 0.1:  # vanishes at the end of that lease, away for a while
                meter.absent(who, end, end + rng.uniform(100.0, 2000.0))
                free_at[who] = meter.away[who][-1][1]
        elif rng.random() < 0.05:
            start = meter.busy[who][-1][0]
            meter.lease(who, start, free_at[who] + 5.0)  # overlapping its open span: that grows by 5 s
            free_at[who] += 5.0
        asked = now if step % 97 else now / 2  # sometimes about an earlier time: counted again
        found = meter.online_seconds(asked, windows)

        # Assert: bit for bit the answer of a fresh meter asked once; the full integral to rounding
        assert found == _copy(meter).online_seconds(asked, windows), step
        assert found == pytest.approx(_full_online_seconds(meter, asked, windows), rel=1e-12, abs=1e-9), step
    assert meter.online_seconds(now + 5000.0, windows) == pytest.approx(
        _full_online_seconds(meter, now + 5000.0, windows), rel=1e-12)
