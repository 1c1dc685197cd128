"""The live nodes as the relay sees them: identity, profile, cached bases, backoff (pure logic).

A node is known by its public key (``pk:<sha256 of the key>``) or else its node id (``node:<id>``),
never by anything it reports; only on Flower's simulation runtime may its profile's ``partition-id``
name it (``sim:<partition-id>``, set by the Strategy): until then a simulated node's identity is not
``settled`` (Flower gives it a new node id every run). Two live nodes on one identity never share
it: the first one seen keeps it and the other gets no lease while the first is here.

A node that failed (a client error, an invalid push, a malformed reply) waits before its next lease
or profile query: ``backoff_s``, doubling with each consecutive failure, at most ``backoff_max_s``.
A judged push resets it. The clock is passed in as ``now``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Optional

from fedem_flwr.relay.policies import NodeProfile


@dataclass
class NodeState:
    """One live node: who it is, what it declared, and whether it may get a lease now."""

    node_id: int
    identity: str
    settled: bool = True  # False while a simulated node's identity waits for its profile's partition
    profile: Optional[NodeProfile] = None
    partition: Optional[tuple[int, int]] = None  # (partition-id, num-partitions), simulation only
    digests: set[str] = field(default_factory=set)  # bases the hub believes it holds
    busy: bool = False  # a message to it is in flight
    retry_at: float = 0.0
    failures: int = 0  # consecutive; sets the backoff
    refused: bool = False  # its identity is another live node's (logged once)


def key_identity(node_id: int, public_key: bytes) -> str:
    """``pk:<sha256 of the public key>``, or ``node:<node id>`` for a node without a key."""
    return f"pk:{hashlib.sha256(public_key).hexdigest()}" if public_key else f"node:{node_id}"


class NodeTable:
    """The live nodes by node id, in arrival order."""

    def __init__(self, backoff_s: float, backoff_max_s: float) -> None:
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self._nodes: dict[int, NodeState] = {}

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._nodes

    def __len__(self) -> int:
        return len(self._nodes)

    def ids(self) -> list[int]:
        return list(self._nodes)

    def get(self, node_id: int) -> Optional[NodeState]:
        return self._nodes.get(node_id)

    def refresh(self, live: Mapping[int, bytes], settled: bool = True) -> None:
        """``live`` maps each live node id to its public key (b"" without one). New nodes are added
        (``settled``: whether that identity is final); nodes that left are dropped once no message to
        them is in flight."""
        for node_id, key in live.items():
            if node_id not in self._nodes:
                self._nodes[node_id] = NodeState(node_id, key_identity(node_id, key), settled)
        for node_id in [n for n, node in self._nodes.items() if n not in live and not node.busy]:
            del self._nodes[node_id]

    def drop(self, node_id: int) -> None:
        self._nodes.pop(node_id, None)

    def to_profile(self, now: float) -> list[NodeState]:
        """Nodes to ask for a (fresh) profile: none on record, idle, not backing off."""
        return [n for n in self._nodes.values() if n.profile is None and not n.busy and now >= n.retry_at]

    def free(self, now: float, refused: Callable[[NodeState, int], None] = lambda node, owner: None) -> dict[str, NodeState]:
        """Nodes that may take a lease now, by identity, in identity order (not the order Flower's random
        node ids came in, so a policy sees the same nodes the same way in every run): profiled, idle,
        not backing off, and the first live node of their identity; ``refused(node, owner_id)`` is
        called once per clash."""
        owners: dict[str, int] = {}
        free: dict[str, NodeState] = {}
        for node in self._nodes.values():
            owner = owners.setdefault(node.identity, node.node_id)
            if owner != node.node_id:
                if not node.refused:
                    node.refused = True
                    refused(node, owner)
                continue
            node.refused = False
            if node.profile is not None and not node.busy and now >= node.retry_at:
                free[node.identity] = node
        return dict(sorted(free.items()))

    def back_off(self, node: NodeState, now: float) -> float:
        """Count a failure; the node waits the returned number of seconds."""
        node.failures += 1
        delay = min(self.backoff_max_s, self.backoff_s * 2 ** (node.failures - 1))
        node.retry_at = now + delay
        return delay

    @staticmethod
    def succeeded(node: NodeState) -> None:
        node.failures = 0
