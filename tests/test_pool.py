"""The indexed adapter pool: same choices as scanning, in O(log n)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedem_flwr.relay.policies import (
    AdapterInfo,
    FairPolicy,
    LanguageAffinityPolicy,
    LeastRecentPolicy,
    NodeProfile,
    RandomPolicy,
    RoundRobinPolicy,
)
from fedem_flwr.relay.pool import AdapterPool


def info(name, last=None, languages=("hi",), version=0) -> AdapterInfo:
    return AdapterInfo(name, tuple(languages), version, last)


def test_put_take_and_sequence_view():
    # Prepare
    pool = AdapterPool([info("a"), info("b", 5.0, ["te"]), info("c", 1.0)])

    # Execute
    taken = pool.take("a")
    pool.put(info("b", 9.0, ["te"], version=1))  # an update replaces the old info

    # Assert
    assert taken == info("a")
    assert "a" not in pool and len(pool) == 2
    assert sorted(a.name for a in pool.free()) == ["b", "c"]
    assert pool.get("b").version == 1
    assert pool.free()[0] in list(pool.free())
    assert [a.name for a in pool.free(["te"])] == ["b"]
    assert len(pool.free(["xx"])) == 0 and not pool.free(["xx"])
    with pytest.raises(KeyError):
        pool.take("a")


def test_least_recent_and_next_after_by_language():
    pool = AdapterPool([info("a", 3.0), info("b", 1.0, ["te"]), info("c", 2.0, ["hi", "te"]), info("d")])
    assert pool.least_recent().name == "d"  # never served
    assert pool.least_recent(["te"]).name == "b"
    assert pool.next_after("b").name == "c"
    assert pool.next_after("d").name == "a"  # wraps around
    assert pool.next_after("a", ["te"]).name == "b"
    assert pool.next_after(None, ["xx"]) is None
    pool.take("d")
    assert pool.least_recent().name == "b"


def test_heap_stays_bounded_under_churn():
    pool = AdapterPool([info(f"a{i}", float(i)) for i in range(10)])
    for step in range(2000):
        name = f"a{step % 10}"
        pool.put(pool.take(name))
        pool.put(info(name, float(step)))
    assert len(pool._all.heap) <= 2 * 10 + 64 + 1
    assert pool.least_recent().name == "a0"


LANGS = ("hi", "te", "ta")
adapters_st = st.lists(
    st.builds(
        info,
        name=st.sampled_from([f"x{i}" for i in range(8)]),
        last=st.one_of(st.none(), st.sampled_from([1.0, 2.0, 3.0])),
        languages=st.lists(st.sampled_from(LANGS), min_size=1, max_size=2, unique=True),
    ),
    max_size=10,
)
nodes_st = st.lists(
    st.builds(lambda i, langs: NodeProfile(f"n{i}", tuple(langs)), st.integers(0, 9),
              st.lists(st.sampled_from(LANGS + ("xx",)), max_size=2, unique=True)),
    min_size=1, max_size=5,
)
ops_st = st.lists(st.tuples(st.sampled_from(["put", "take"]), st.integers(0, 20), adapters_st), max_size=8)


def twins():
    """Pairs of identical policies: one reads the pool's indexes, the other scans a list."""
    return [
        (LeastRecentPolicy(), LeastRecentPolicy()),
        (RoundRobinPolicy(), RoundRobinPolicy()),
        (RandomPolicy(random.Random(3)), RandomPolicy(random.Random(3))),
        (LanguageAffinityPolicy(LeastRecentPolicy()), LanguageAffinityPolicy(LeastRecentPolicy())),
        (LanguageAffinityPolicy(RoundRobinPolicy()), LanguageAffinityPolicy(RoundRobinPolicy())),
        (FairPolicy(), FairPolicy()),
    ]


@settings(max_examples=80, deadline=None)
@given(start=adapters_st, ops=ops_st, nodes=nodes_st)
def test_pool_chooses_what_a_scan_chooses(start, ops, nodes):
    # Prepare: a pool after random churn
    pool = AdapterPool()
    for adapter in start:
        pool.put(adapter)
    for op, pick, more in ops:
        if op == "take" and len(pool):
            pool.take(sorted(a.name for a in pool.free())[pick % len(pool)])
        else:
            for adapter in more:
                pool.put(adapter)
    before = sorted(pool.free(), key=lambda a: a.name)

    for indexed, scanning in twins():
        # Execute and Assert: every choice and every assignment agrees
        for node in nodes:
            assert indexed.choose(node, pool.free()) == scanning.choose(node, list(pool.free()))
        pairs = indexed.assign(nodes, pool.free())
        expected = scanning.assign(nodes, list(pool.free()))
        assert pairs == expected
        assert len({a.name for _, a in pairs}) == len(pairs)
        # assign leaves the pool as it found it
        assert sorted(pool.free(), key=lambda a: a.name) == before
