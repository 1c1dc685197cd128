"""Node-selection policies with hand-computed expectations."""

from __future__ import annotations

import random

import pytest

from fedem_flwr.config.schema import RelayConfig
from fedem_flwr.errors import ConfigError
from fedem_flwr.relay.policies import (
    FALLBACK_NAMES,
    POLICY_NAMES,
    AdapterInfo,
    LanguageAffinityPolicy,
    LeastRecentPolicy,
    NodeProfile,
    Policy,
    RandomPolicy,
    RoundRobinPolicy,
    make_policy,
)
from fedem_flwr.relay.pool import AdapterPool


def adapter(name: str, last_served=None, languages=None) -> AdapterInfo:
    return AdapterInfo(name, tuple(languages or [name]), 0, last_served)


def node(name: str, *languages: str) -> NodeProfile:
    return NodeProfile(name, tuple(languages))


HI, TE, TA, EN = adapter("hi", 50.0), adapter("te", 10.0), adapter("ta"), adapter("en", 10.0)


def names(pairs) -> list[tuple[str, str]]:
    return [(n.node, a.name) for n, a in pairs]


def test_least_recent_prefers_never_served_then_oldest_then_name():
    policy = LeastRecentPolicy()
    assert policy.choose(node("n1"), [HI, TE, TA, EN]) == TA  # never served
    assert policy.choose(node("n1"), [HI, TE, EN]) == EN  # 10.0 tie: "en" < "te"
    assert policy.choose(node("n1"), [HI]) == HI
    assert policy.choose(node("n1"), []) is None


def test_least_recent_assign_equals_greedy_choose():
    # Prepare
    adapters = [HI, TE, TA, EN, adapter("bn"), adapter("fa", 5.0)]
    nodes = [node(f"n{i}") for i in range(4)]

    # Execute
    pairs = LeastRecentPolicy().assign(nodes, adapters)

    # Assert: never-served by name (bn, ta), then by time (fa 5, en 10)
    assert names(pairs) == [("n0", "bn"), ("n1", "ta"), ("n2", "fa"), ("n3", "en")]


def test_round_robin_cycles_by_name_over_what_is_free():
    policy = RoundRobinPolicy()
    n = node("n1")
    picks = [policy.choose(n, [HI, TE, TA, EN]).name for _ in range(5)]
    assert picks == ["en", "hi", "ta", "te", "en"]
    # "hi" is leased now: after "en" comes the next free name
    assert policy.choose(n, [TE, TA, EN]).name == "ta"
    assert policy.choose(n, []) is None


def test_round_robin_assign_hands_each_adapter_once():
    pairs = RoundRobinPolicy().assign([node("a"), node("b"), node("c")], [TE, HI])
    assert names(pairs) == [("a", "hi"), ("b", "te")]


def test_random_policy_is_reproducible_and_never_repeats_an_adapter():
    adapters = [adapter(f"x{i}") for i in range(20)]
    nodes = [node(f"n{i}") for i in range(30)]
    first = RandomPolicy(random.Random(7)).assign(nodes, adapters)
    again = RandomPolicy(random.Random(7)).assign(nodes, adapters)
    assert names(first) == names(again)
    assert len(first) == 20 and len({a.name for _, a in first}) == 20
    assert RandomPolicy(random.Random(7)).choose(node("n"), adapters) in adapters
    assert RandomPolicy(random.Random(7)).choose(node("n"), []) is None


def test_language_affinity_prefers_declared_languages():
    policy = LanguageAffinityPolicy(LeastRecentPolicy())
    adapters = [HI, TE, TA, adapter("hi-te", 1.0, ["hi", "te"])]
    # among te's adapters (te at 10.0, hi-te at 1.0) the fallback picks the least recent
    assert policy.choose(node("n1", "te"), adapters).name == "hi-te"
    assert policy.choose(node("n1", "hi"), [HI, TA]).name == "hi"
    # no languages declared: the fallback over everything (ta never served)
    assert policy.choose(node("n1"), [HI, TA]).name == "ta"
    # languages declared but none of them free: nothing, never a foreign adapter
    assert policy.choose(node("n1", "xx"), [HI, TA]) is None
    assert policy.assign([node("n1", "xx"), node("n2", "hi")], [HI, TA]) == [(node("n2", "hi"), HI)]
    pool = AdapterPool([HI, TA])
    assert policy.assign([node("n1", "xx"), node("n2", "hi")], pool.free()) == [(node("n2", "hi"), HI)]


def test_language_affinity_assign_serves_matching_nodes_first():
    # Prepare: n0 declared nothing and comes first; greedy order would give it "hi" (least recent)
    policy = LanguageAffinityPolicy(LeastRecentPolicy())
    hi_old = adapter("hi", 1.0)
    nodes = [node("n0"), node("n1", "hi"), node("n2", "te")]

    # Execute
    pairs = policy.assign(nodes, [hi_old, TE, EN])

    # Assert: n1 keeps its language; n0 takes what is left; results in node order
    assert names(pairs) == [("n0", "en"), ("n1", "hi"), ("n2", "te")]


def test_make_policy_builds_every_configured_name():
    rng = random.Random(0)
    built = {name: make_policy(name, rng) for name in POLICY_NAMES}
    assert isinstance(built["random"], RandomPolicy)
    assert isinstance(built["round-robin"], RoundRobinPolicy)
    assert isinstance(built["least-recent"], LeastRecentPolicy)
    assert isinstance(built["language"], LanguageAffinityPolicy)
    assert isinstance(built["language"].fallback, LeastRecentPolicy)
    assert isinstance(make_policy("language", rng, fallback="round-robin").fallback, RoundRobinPolicy)
    assert all(isinstance(policy, Policy) for policy in built.values())


def test_make_policy_unknown_name_lists_the_names():
    with pytest.raises(ConfigError, match=r"`relay.policy` is 'fifo'; allowed: 'random', 'round-robin'"):
        make_policy("fifo", random.Random(0))
    with pytest.raises(ConfigError, match=r"`relay.policy_fallback` is 'language'"):
        make_policy("language", random.Random(0), fallback="language")


def test_config_accepts_exactly_the_policy_names():
    for name in POLICY_NAMES:
        assert RelayConfig(policy=name).policy == name
    for name in FALLBACK_NAMES:
        assert RelayConfig(policy_fallback=name).policy_fallback == name
    with pytest.raises(ConfigError, match="`relay.policy_fallback`"):
        RelayConfig(policy_fallback="language")
