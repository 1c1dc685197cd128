"""An in-process ``Grid`` that runs a ClientApp directly: relay tests in well under a second.

It keeps the properties of a real SuperLink that the relay relies on: a node runs one message at a
time, a message past its TTL is answered by an error reply (code 3) from node 1, a node that is
gone answers code 5, a ClientApp exception answers code 2, and a pulled reply is consumed. Its
``simulation`` flag says which runtime it stands for: Flower's simulation (identity from
``partition-id``) or a SuperLink (identity from each node's ``public_keys`` entry, else its id).
Building a ``Message`` outside a Flower runtime needs ``TaskIdentity`` set (a private Flower API).
"""

from __future__ import annotations

import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

SUPERLINK_NODE_ID = 1


@dataclass
class FakeNode:
    node_id: int
    node_config: dict
    state: RecordDict = field(default_factory=RecordDict)
    alive: bool = True
    latency: int = 0  # pulls a train message waits on this node before it runs (a long training)
    waited: int = 0


class InProcessGrid(Grid):
    """Delivers each pushed message to its node's ClientApp when replies are pulled."""

    def __init__(
        self,
        client_app: ClientApp,
        node_configs: Mapping[int, dict],
        run_config: Mapping[str, object],
        *,
        run_id: int = 7,
        clock: Callable[[], float] = time.time,
        latency: Mapping[int, int] | None = None,
        simulation: bool = True,
        public_keys: Mapping[int, bytes] | None = None,
    ) -> None:
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        TaskIdentity.task_id = 0
        self.client_app = client_app
        latency = latency or {}
        self.nodes = {nid: FakeNode(nid, dict(cfg), latency=latency.get(nid, 0)) for nid, cfg in node_configs.items()}
        self.run_config = dict(run_config)
        self.simulation = simulation
        self.public_keys = dict(public_keys or {})
        self.run_id = run_id
        self.clock = clock
        self.queue: dict[str, Message] = {}
        self.replies: dict[str, Message] = {}
        self.delivered: list[Message] = []

    # -- Grid API ----------------------------------------------------------------------------------

    def set_run(self, run: Run) -> None:  # pragma: no cover - not used in-process
        self.run_id = run.run_id

    @property
    def run(self) -> Run:
        return Run.create_empty(self.run_id)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return [nid for nid, node in self.nodes.items() if node.alive]

    def get_nodes(self) -> Iterable[NodeInfo]:
        return [NodeInfo(node_id=nid, public_key=self.public_keys.get(nid, b"")) for nid in self.get_node_ids()]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message_id = uuid.uuid4().hex
            message.metadata.__dict__["_message_id"] = message_id
            message.metadata.__dict__["_created_at"] = self.clock()
            self.queue[message_id] = message
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Run at most one queued message per node (a SuperNode runs one at a time), then answer."""
        wanted = set(message_ids)
        busy: set[int] = set()
        for message_id in [m for m in list(self.queue) if m in wanted]:
            message = self.queue[message_id]
            node = self.nodes.get(message.metadata.dst_node_id)
            if node is not None and node.node_id in busy:
                continue
            training = message.metadata.message_type.startswith("train")
            if node is not None and node.alive and training and node.waited < node.latency:
                node.waited += 1
                busy.add(node.node_id)
                continue
            if node is not None:
                node.waited = 0
            del self.queue[message_id]
            self.replies[message_id] = self._deliver(message, node)
            if node is not None:
                busy.add(node.node_id)
        out = [self.replies.pop(m) for m in list(self.replies) if m in wanted]
        return out

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        ids = list(self.push_messages(messages))
        replies: list[Message] = []
        while len(replies) < len(ids):
            replies.extend(self.pull_messages(ids))
        return replies

    # -- faults ------------------------------------------------------------------------------------

    def kill(self, node_id: int) -> None:
        self.nodes[node_id].alive = False

    # -- delivery ----------------------------------------------------------------------------------

    def _deliver(self, message: Message, node: FakeNode | None) -> Message:
        meta = message.metadata
        if self.clock() >= meta.created_at + meta.ttl:
            return _error(message, ErrorCode.MESSAGE_UNAVAILABLE, "message expired before delivery")
        if node is None or not node.alive:
            return _error(message, ErrorCode.NODE_UNAVAILABLE, "node is gone")
        context = Context(self.run_id, node.node_id, node.node_config, node.state, self.run_config)
        TaskIdentity.node_id = node.node_id
        try:
            reply = self.client_app(message, context)
        except Exception:  # noqa: BLE001 - a ClientApp exception becomes an error reply, as in Flower
            return _error(message, ErrorCode.CLIENT_APP_RAISED_EXCEPTION, traceback.format_exc())
        finally:
            TaskIdentity.node_id = SUPERLINK_NODE_ID
        self.delivered.append(message)
        if self.clock() >= meta.created_at + meta.ttl:
            return _error(message, ErrorCode.REPLY_MESSAGE_UNAVAILABLE, "reply arrived after the TTL")
        return reply


def _error(message: Message, code: int, reason: str) -> Message:
    reply = Message(Error(code, reason), reply_to=message)
    reply.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
    return reply
