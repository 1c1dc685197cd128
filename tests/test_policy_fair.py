"""The `fair` policy: language affinity, then the adapter furthest behind an equal share of tokens.

Pure logic on a fake clock (``relay_on_a_fake_clock`` plays leases as events); the last tests drive the
coordinator, which counts each judged push's tokens and offers them to the policy.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedem_flwr.relay.policies import (
    AdapterInfo,
    FairPolicy,
    LanguageAffinityPolicy,
    LeastRecentPolicy,
    NodeProfile,
    Policy,
    make_policy,
    token_shares,
)
from fedem_flwr.relay.pool import AdapterPool


def adapter(name: str, tokens: int = 0, last_served=None, languages=None) -> AdapterInfo:
    return AdapterInfo(name, tuple(languages or [name]), 0, last_served, tokens)


def node(name: str, *languages: str) -> NodeProfile:
    return NodeProfile(name, tuple(languages))


def names(pairs) -> list[tuple[str, str]]:
    return [(n.node, a.name) for n, a in pairs]


Lease = Callable[[NodeProfile, int], tuple[float, int]]  # (node, lease number) -> (seconds, tokens trained)


def relay_on_a_fake_clock(policy: Policy, nodes: Sequence[NodeProfile], adapters: Mapping[str, tuple[str, ...]],
                          lease: Lease, leases: int, tokens: Mapping[str, int] | None = None,
                          ) -> tuple[dict[str, int], list[tuple[float, str, str]]]:
    """Play ``leases`` leases as the relay does: whenever nodes are free, ``assign`` pairs them with the
    free adapters; a lease ends after its seconds and adds its tokens to its adapter (which starts with
    ``tokens``, else 0). Returns the tokens per adapter once every lease ended, and each lease as
    (issued, node, adapter)."""
    tokens = {name: (tokens or {}).get(name, 0) for name in adapters}
    last: dict[str, float] = {}
    running: list[tuple[float, int, str, int]] = []  # (ends, node index, adapter, tokens)
    free = list(range(len(nodes)))
    held: set[str] = set()
    now, history = 0.0, []
    while len(history) < leases or running:
        offer = [AdapterInfo(name, adapters[name], 0, last.get(name), tokens[name])
                 for name in sorted(adapters) if name not in held]
        policy.observe([AdapterInfo(name, adapters[name], 0, last.get(name), tokens[name]) for name in sorted(held)])
        for who, info in policy.assign([nodes[i] for i in free], offer)[: leases - len(history)]:
            index = nodes.index(who)
            free.remove(index)
            held.add(info.name)
            last[info.name] = now
            seconds, trained = lease(who, len(history))
            running.append((now + seconds, index, info.name, trained))
            history.append((now, who.node, info.name))
        running.sort()
        now = running[0][0]
        while running and running[0][0] == now:
            _, index, name, trained = running.pop(0)
            tokens[name] += trained
            held.discard(name)
            free.append(index)
        free.sort()
    return tokens, history


# -- choose --------------------------------------------------------------------------------------


def test_choose_takes_the_adapter_with_the_fewest_tokens_among_the_nodes_languages():
    policy = FairPolicy()
    adapters = [adapter("hi", 300), adapter("te", 100), adapter("ta", 50),
                adapter("hi-te", 200, languages=["hi", "te"])]
    assert policy.choose(node("n", "hi"), adapters).name == "hi-te"  # 200 < 300; ta (50) is foreign
    assert policy.choose(node("n", "te"), adapters).name == "te"
    assert policy.choose(node("n"), adapters).name == "ta"  # no languages declared: any adapter
    assert policy.choose(node("n", "xx"), adapters) is None  # never a foreign adapter
    assert policy.choose(node("n", "hi"), []) is None


def test_ties_go_to_never_served_then_least_recent_then_name():
    policy = FairPolicy()
    assert policy.choose(node("n"), [adapter("b", 10, 5.0), adapter("c", 10), adapter("a", 10, 1.0)]).name == "c"
    assert policy.choose(node("n"), [adapter("b", 10, 5.0), adapter("a", 10, 1.0)]).name == "a"
    assert policy.choose(node("n"), [adapter("b", 10, 1.0), adapter("a", 10, 1.0)]).name == "a"
    assert policy.choose(node("n"), [adapter("b", 9, 5.0), adapter("a", 10)]).name == "b"  # tokens first


def test_token_shares_are_tokens_over_the_mean():
    assert token_shares({"hi": 300, "ta": 100, "te": 200}) == {"hi": 1.5, "ta": 0.5, "te": 1.0}
    assert token_shares({"hi": 0, "ta": 0}) == {"hi": 1.0, "ta": 1.0}  # nothing trained yet: all even
    assert token_shares({}) == {}


def test_make_policy_builds_fair():
    assert isinstance(make_policy("fair", random.Random(0)), FairPolicy)


# -- assign --------------------------------------------------------------------------------------


def test_assign_serves_the_lagging_adapter_first_with_the_node_that_has_fewest_options():
    # Prepare: ru lags; n0 can serve hi and ru, n1 only ru. Greedy by node order would give ru to n0
    # and leave n1 idle; by adapter lag alone ru would still go to n0, the first node able.
    policy = FairPolicy()
    nodes = [node("n0", "hi", "ru"), node("n1", "ru")]
    adapters = [adapter("hi", 900), adapter("ru", 100)]

    # Execute
    pairs = policy.assign(nodes, adapters)

    # Assert: ru (furthest behind) first, to n1 (one option); then hi to n0
    assert names(pairs) == [("n1", "ru"), ("n0", "hi")]


def test_assign_keeps_a_node_without_languages_for_what_no_one_else_can_serve():
    policy = FairPolicy()
    nodes = [node("any"), node("n1", "hi"), node("n2", "te")]
    adapters = [adapter("hi", 10), adapter("te", 20), adapter("en", 30)]
    assert names(policy.assign(nodes, adapters)) == [("n1", "hi"), ("n2", "te"), ("any", "en")]


def test_assign_never_offers_a_foreign_adapter_even_when_it_lags():
    policy = FairPolicy()
    pairs = policy.assign([node("n0", "xx"), node("n1", "hi")], [adapter("ta", 0), adapter("hi", 500)])
    assert names(pairs) == [("n1", "hi")]


def test_an_adapter_moves_on_to_the_node_that_trained_it_longest_ago():
    # Prepare: two nodes of one language and its one adapter, each lease 10 s and 100 tokens
    policy = FairPolicy()
    nodes = [node("p0", "de"), node("p1", "de")]

    # Execute
    tokens, history = relay_on_a_fake_clock(policy, nodes, {"de": ("de",)}, lambda who, k: (10.0, 100), 4)

    # Assert: the nodes take turns (the first in order would otherwise get every lease)
    assert history == [(0.0, "p0", "de"), (10.0, "p1", "de"), (20.0, "p0", "de"), (30.0, "p1", "de")]
    assert tokens == {"de": 400}


# -- on a fake clock ----------------------------------------------------------------------------


def test_interchangeable_nodes_train_every_adapter_equally():
    # Prepare: 3 adapters, 2 nodes without languages, every lease 10 s and 100 tokens
    policy = FairPolicy()
    nodes = [node("n0"), node("n1")]

    # Execute
    tokens, history = relay_on_a_fake_clock(policy, nodes, {"a": (), "b": (), "c": ()}, lambda who, k: (10.0, 100), 6)

    # Assert, by hand: t=0 a, b (never served, by name) to n0, n1; t=10 c (0 tokens) to n0 (given an
    # adapter longest ago), then a (100, served at 0) to n1; t=20 b (100, served at 0) to n0, which
    # never trained it, then c (100, served at 10) to n1. Each adapter moves on to the other node.
    assert history == [(0.0, "n0", "a"), (0.0, "n1", "b"), (10.0, "n0", "c"), (10.0, "n1", "a"),
                       (20.0, "n0", "b"), (20.0, "n1", "c")]
    assert tokens == {"a": 200, "b": 200, "c": 200}


def test_a_lagging_adapter_is_served_until_it_caught_up_where_least_recent_alternates():
    # Prepare: one node for hi and ru; ru trained 600 tokens before (a restarted hub), hi none; every
    # lease 10 s and 100 tokens
    nodes = [node("n0", "hi", "ru")]
    adapters = {"hi": ("hi",), "ru": ("ru",)}
    before = {"ru": 600}

    def lease(who: NodeProfile, k: int) -> tuple[float, int]:
        return 10.0, 100

    # Execute
    fair, fair_leases = relay_on_a_fake_clock(FairPolicy(), nodes, adapters, lease, 8, before)
    recent, recent_leases = relay_on_a_fake_clock(LanguageAffinityPolicy(LeastRecentPolicy()), nodes, adapters,
                                                  lease, 8, before)

    # Assert: hi six times (0 .. 500 < 600), then at 600 each ru (never served in this run) and hi
    assert [a for _, _, a in fair_leases] == ["hi"] * 6 + ["ru", "hi"]
    assert fair == {"hi": 700, "ru": 700}
    # least-recent alternates from the start, blind to what each adapter was given
    assert [a for _, _, a in recent_leases] == ["hi", "ru"] * 4
    assert recent == {"hi": 400, "ru": 1000}


@settings(max_examples=60, deadline=None)
@given(n_adapters=st.integers(2, 6), n_nodes=st.integers(1, 5), seconds=st.sampled_from([5.0, 10.0]),
       per_lease=st.integers(1, 1000), languages=st.sampled_from([(), ("x",)]), leases=st.integers(1, 60))
def test_shares_converge_to_equal_when_nodes_are_interchangeable(n_adapters, n_nodes, seconds, per_lease,
                                                                 languages, leases):
    # Prepare: every node alike (same languages, same lease time and tokens)
    nodes = [node(f"n{i}", *languages) for i in range(n_nodes)]
    adapters = {f"a{i}": ("x",) for i in range(n_adapters)}

    # Execute
    tokens, history = relay_on_a_fake_clock(FairPolicy(), nodes, adapters, lambda who, k: (seconds, per_lease),
                                            leases)

    # Assert: no adapter is ever more than one lease ahead of another, so each share is within one
    # lease's tokens of the mean and tends to 1 as the relay goes on
    assert len(history) == leases and sum(tokens.values()) == leases * per_lease
    assert max(tokens.values()) - min(tokens.values()) <= per_lease
    mean = leases * per_lease / n_adapters
    assert all(abs(share - 1.0) <= per_lease / mean for share in token_shares(tokens).values())


adapters_st = st.lists(
    st.builds(adapter, name=st.sampled_from([f"x{i}" for i in range(8)]), tokens=st.integers(0, 3),
              last_served=st.one_of(st.none(), st.sampled_from([1.0, 2.0])),
              languages=st.lists(st.sampled_from(["hi", "te", "ta"]), min_size=1, max_size=2, unique=True)),
    max_size=8, unique_by=lambda a: a.name,
)
nodes_st = st.lists(
    st.builds(lambda i, langs: node(f"n{i}", *langs), st.integers(0, 9),
              st.lists(st.sampled_from(["hi", "te", "ta", "xx"]), max_size=2, unique=True)),
    max_size=6, unique_by=lambda n: n.node,
)


@settings(max_examples=150, deadline=None)
@given(adapters=adapters_st, nodes=nodes_st, seed=st.integers(0, 1000))
def test_assign_is_affine_deterministic_and_the_same_on_a_pool(adapters, nodes, seed):
    # Execute
    pairs = FairPolicy().assign(nodes, adapters)
    shuffled = list(adapters)
    random.Random(seed).shuffle(shuffled)

    # Assert: each node and adapter at most once, never a foreign adapter
    assert len({n.node for n, _ in pairs}) == len({a.name for _, a in pairs}) == len(pairs)
    assert all(not n.languages or set(n.languages) & set(a.languages) for n, a in pairs)
    # the adapters' order does not matter, and neither does the pool's index
    assert FairPolicy().assign(nodes, shuffled) == pairs
    assert FairPolicy().assign(nodes, AdapterPool(adapters).free()) == pairs
    # a node alone gets what choose gives it
    for one in nodes:
        chosen = FairPolicy().choose(one, adapters)
        assert FairPolicy().assign([one], adapters) == ([] if chosen is None else [(one, chosen)])
    # no free node that could serve a free adapter is left idle beside it
    used = {a.name for _, a in pairs}
    idle = [n for n in nodes if n not in {p for p, _ in pairs}]
    left = [a for a in adapters if a.name not in used]
    assert not any(not n.languages or set(n.languages) & set(a.languages) for n in idle for a in left)


# -- the coordinator counts tokens and offers them ------------------------------------------------


@pytest.fixture
def fair_hub(tmp_path):
    # torch is imported by these tests only: the policy's own stay pure logic
    from tests.support.relay import FakeClock, seeded_coordinator

    clock = FakeClock()
    coordinator, registry, store = seeded_coordinator(tmp_path, clock, policy="fair")
    coordinator.recover()
    return coordinator, registry, store, clock


def _push(coordinator, lease, loss: float, tokens: float):
    import torch

    return coordinator.receive_push(lease.token, {"w": torch.tensor([loss])}, metrics={"tokens": tokens})


def test_the_coordinator_counts_judged_pushes_and_the_policy_sees_the_counts(fair_hub):
    coordinator, registry, _, _ = fair_hub
    both = NodeProfile("sim:0", ("hi", "ta"))

    # Execute: hi (first by name) trains 1000 tokens, accepted; ta 300, rejected but counted
    (first,) = coordinator.assign([both])
    assert _push(coordinator, first.lease, 3.5, 1000.0).accepted
    (second,) = coordinator.assign([both])
    assert not _push(coordinator, second.lease, 4.5, 300.0).accepted
    (third,) = coordinator.assign([both])

    # Assert
    assert (first.adapter.name, second.adapter.name, third.adapter.name) == ("hi", "ta", "ta")
    assert third.adapter.tokens == 300  # the pool offered the count after the push
    assert coordinator.adapter_tokens() == {"hi": 1000, "ta": 300}
    assert coordinator.token_shares() == {"hi": 1000 / 650, "ta": 300 / 650}
    assert registry.tokens_by_adapter() == {"hi": 1000, "ta": 300}


def test_counts_are_clamped_and_unjudged_pushes_do_not_count(fair_hub, tmp_path):
    from fedem_flwr.relay.coordinator import RelayCoordinator

    coordinator, registry, store, clock = fair_hub
    (lease_hi,) = coordinator.assign([NodeProfile("sim:0", ("hi",))])
    _push(coordinator, lease_hi.lease, 3.5, 5000.0)
    (lease_ta,) = coordinator.assign([NodeProfile("sim:1", ("ta",))])
    _push(coordinator, lease_ta.lease, 3.5, -40.0)  # below 0: counts 0
    (late,) = coordinator.assign([NodeProfile("sim:1", ("ta",))])
    clock.now += 1000.0  # past the lease's deadline: fenced, never judged
    assert _push(coordinator, late.lease, 3.0, 700.0).reason.startswith("expired")
    assert coordinator.adapter_tokens() == {"hi": 5000, "ta": 0}

    # A restarted hub counts from the registry, with the bound of one lease when it knows it
    restarted = RelayCoordinator(registry, store, FairPolicy(), coordinator.workbench, lease_ttl_s=100.0,
                                 sweep_interval_s=10, clock=clock, max_push_tokens=2048)
    assert restarted.adapter_tokens() == {"hi": 2048, "ta": 0}
    assert registry.tokens_by_adapter(2048) == {"hi": 2048, "ta": 0}
    assert restarted.pool.get("hi").tokens == 2048


# -- the lead bound (relay.fair_max_lead) ---------------------------------------------------------

def test_with_a_lead_bound_an_adapter_far_ahead_waits_for_the_one_under_lease():
    policy = FairPolicy(max_lead=100)
    policy.observe([adapter("hi", tokens=0)])  # hi is being trained: it sets the floor

    pairs = policy.assign([node("n-ru", "ru"), node("n-ta", "ta")], [adapter("ru", tokens=500), adapter("ta", tokens=50)])

    assert names(pairs) == [("n-ta", "ta")]  # ru is 500 ahead: its node stays idle
    assert policy.choose(node("n-ru", "ru"), [adapter("ru", tokens=500)]) is None
    assert names(FairPolicy().assign([node("n-ru", "ru")], [adapter("ru", tokens=500)])) == [("n-ru", "ru")]


def test_an_adapter_nobody_can_train_now_does_not_hold_the_others_back():
    policy = FairPolicy(max_lead=100)
    policy.observe([])

    # hi has no tokens, but no free node serves it (its contributor is away): it is out of play
    pairs = policy.assign([node("n-ru", "ru")], [adapter("hi", tokens=0), adapter("ru", tokens=500)])

    assert names(pairs) == [("n-ru", "ru")]


def test_a_lead_bound_keeps_a_fast_language_within_reach_of_a_slow_one():
    nodes = [node("fast", "ru"), node("slow", "hi")]
    adapters = {"ru": ("ru",), "hi": ("hi",)}

    def lease(who: NodeProfile, _: int) -> tuple[float, int]:
        return (1.0, 100) if who.node == "fast" else (5.0, 100)

    free_run, _ = relay_on_a_fake_clock(FairPolicy(), nodes, adapters, lease, 30)
    bounded, _ = relay_on_a_fake_clock(FairPolicy(max_lead=200), nodes, adapters, lease, 30)

    assert free_run["ru"] - free_run["hi"] >= 1500  # unbounded, ru runs five times as fast
    assert abs(bounded["ru"] - bounded["hi"]) <= 200 + 100  # within the lead and one lease
    assert sum(bounded.values()) == sum(free_run.values()) == 3000


def test_make_policy_passes_the_lead_bound():
    assert make_policy("fair", random.Random(0), max_lead=4096).max_lead == 4096
