"""The relay's node table: identity from keys, one node per identity, bounded exponential backoff."""

from __future__ import annotations

import hashlib

from fedem_flwr.relay.nodes import NodeTable, key_identity
from fedem_flwr.relay.policies import NodeProfile


def _profiled(table: NodeTable, *node_ids: int) -> None:
    for node_id in node_ids:
        node = table.get(node_id)
        node.profile = NodeProfile(node.identity, ("hi",))


def test_identity_is_the_key_hash_or_the_node_id():
    assert key_identity(5, b"key") == f"pk:{hashlib.sha256(b'key').hexdigest()}"
    assert key_identity(5, b"") == "node:5"


def test_second_node_on_one_identity_is_refused_once_and_takes_over_when_the_first_leaves():
    # Prepare
    table = NodeTable(backoff_s=1, backoff_max_s=8)
    table.refresh({1: b"same", 2: b"same", 3: b"other"})
    _profiled(table, 1, 2, 3)
    refusals = []

    # Execute
    first = table.free(0.0, lambda node, owner: refusals.append((node.node_id, owner)))
    again = table.free(1.0, lambda node, owner: refusals.append((node.node_id, owner)))
    table.refresh({2: b"same", 3: b"other"})
    after = table.free(2.0)

    # Assert
    assert {node.node_id for node in first.values()} == {1, 3} and first.keys() == again.keys()
    assert refusals == [(2, 1)]
    assert {node.node_id for node in after.values()} == {2, 3} and 1 not in table


def test_backoff_doubles_to_its_bound_and_a_success_resets_it():
    table = NodeTable(backoff_s=2, backoff_max_s=10)
    table.refresh({1: b""})
    node = table.get(1)

    delays = [table.back_off(node, now=100.0) for _ in range(5)]
    assert delays == [2, 4, 8, 10, 10] and node.retry_at == 110.0
    _profiled(table, 1)
    assert table.free(109.0) == {} and table.to_profile(109.0) == []
    assert list(table.free(110.0)) == ["node:1"]
    table.succeeded(node)
    assert table.back_off(node, now=0.0) == 2


def test_a_simulated_node_has_no_settled_identity_before_its_profile():
    table = NodeTable(backoff_s=1, backoff_max_s=1)
    table.refresh({1: b""}, settled=False)  # a simulated node: its profile's partition will name it
    table.refresh({1: b"", 2: b"key"})  # a node on a SuperLink: its key names it from the start

    assert (table.get(1).identity, table.get(1).settled) == ("node:1", False)
    assert (table.get(2).identity, table.get(2).settled) == (key_identity(2, b"key"), True)


def test_a_node_with_a_message_in_flight_stays_until_it_is_answered():
    table = NodeTable(backoff_s=1, backoff_max_s=1)
    table.refresh({1: b"", 2: b""})
    table.get(1).busy = True
    table.refresh({})
    assert table.ids() == [1]
    assert table.to_profile(0.0) == []


def test_free_nodes_come_in_identity_order_whatever_order_their_node_ids_came_in():
    # Flower gives simulated nodes random ids: the policy must see the same nodes in the same order
    tables = []
    for live in ({30: b"", 10: b"", 20: b""}, {10: b"", 20: b"", 30: b""}):
        table = NodeTable(backoff_s=1, backoff_max_s=8)
        table.refresh(live)
        _profiled(table, *live)
        tables.append(list(table.free(0.0)))

    assert tables[0] == tables[1] == ["node:10", "node:20", "node:30"]
