"""Continuous Relay Finetuning as a Flower strategy: an asynchronous relay on the Grid.

Flower's ``Strategy.start`` is a synchronous round loop and Flower has no asynchronous strategy,
so ``RelayStrategy`` overrides ``start`` with an event loop over ``Grid.push_messages`` /
``Grid.pull_messages``: every free node gets an adapter as soon as it is free, every adapter
relays on at its own pace, and there are no rounds. Decisions live in ``RelayCoordinator``.

Replies are routed by ``reply_to_message_id``, never by sender, because error replies come from
the SuperLink itself (``src_node_id`` 1); an id is dropped at its first reply, since pulling it
again answers "message unavailable" (code 3).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Optional

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedem_flwr.config import RelayConfig
from fedem_flwr.errors import InvalidAdapter
from fedem_flwr.model.adapter_spec import AdapterSpec, load_adapter_file
from fedem_flwr.relay import messages
from fedem_flwr.relay.coordinator import Assignment, PushOutcome, RelayCoordinator
from fedem_flwr.relay.policies import NodeProfile
from fedem_flwr.wire import adapter_to_arrays, arrays_to_adapter

log = logging.getLogger(__name__)

PROFILE_TTL_S = 120.0


@dataclass
class RelayResult:
    """What a relay run did; ``history`` holds every push outcome in arrival order."""

    accepted: int = 0
    rejected: int = 0
    leases: int = 0
    failures: int = 0
    seconds: float = 0.0
    stopped_by: str = ""
    history: list[PushOutcome] = field(default_factory=list)


@dataclass
class _Pending:
    kind: str
    node_id: int
    assignment: Optional[Assignment] = None
    sent_base: bool = False


@dataclass
class _Node:
    node_id: int
    identity: str = ""
    profile: Optional[NodeProfile] = None
    digests: set[str] = field(default_factory=set)
    busy: bool = False
    retry_at: float = 0.0


class RelayStrategy(Strategy):
    """Hand each adapter to one node at a time under a lease; judge each push blind."""

    def __init__(
        self,
        coordinator: RelayCoordinator,
        relay: RelayConfig,
        spec: AdapterSpec,
        *,
        max_steps: int,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.coordinator = coordinator
        self.relay = relay
        self.spec = spec
        self.max_steps = max_steps
        self.clock = clock
        self.sleep = sleep
        self.nodes: dict[int, _Node] = {}
        self.pending: dict[str, _Pending] = {}

    # -- Flower's round API: the relay has no rounds ------------------------------------------------
    # ``Strategy`` declares these abstract; the relay's work happens in ``start``, message by message.

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """No round-wide training: leases are issued as nodes become free (see ``start``)."""
        return []

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        """Nothing is averaged: each push is judged on its own (see ``_on_train_reply``)."""
        return None, None

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Optional[MetricRecord]:
        return None

    def summary(self) -> None:
        log.info(
            "\t├── Lease TTL %.0f s, sweep every %.0f s, policy %s",
            self.relay.lease_ttl_s, self.relay.sweep_interval_s, self.relay.policy,
        )
        log.info(
            "\t└── Stop after %s accepted, %s s, or %.0f s without nodes",
            self.relay.max_accepted or "unlimited", self.relay.max_wall_s or "unlimited", self.relay.no_node_grace_s,
        )

    # -- the relay loop ---------------------------------------------------------------------------

    def start(self, grid: Grid, *args: object, **kwargs: object) -> RelayResult:  # type: ignore[override]
        log.info("Starting %s:", type(self).__name__)
        self.summary()
        self.coordinator.recover()
        result = RelayResult()
        started = self.clock()
        last_seen_node = started
        while True:
            now = self.clock()
            self.coordinator.tick()
            live = self._refresh_nodes(grid)
            if live:
                last_seen_node = now
            assignments = self.coordinator.assign(self._free_profiles())
            result.leases += len(assignments)
            self._push(grid, self._profile_queries(now) + [self._train_message(a) for a in assignments])
            self._pull(grid, result)

            stop = self._stop_reason(result, now - started, 0.0 if live else now - last_seen_node)
            if stop:
                result.stopped_by = stop
                break
            self.sleep(self.relay.poll_interval_s)
        self._drain(grid, result)
        self._abandon_pending()
        result.seconds = self.clock() - started
        log.info(
            "Relay stopped (%s) after %.1f s: %d accepted, %d rejected, %d leases",
            result.stopped_by, result.seconds, result.accepted, result.rejected, result.leases,
        )
        return result

    def _stop_reason(self, result: RelayResult, elapsed: float, without_nodes: float) -> str:
        if self.relay.max_accepted is not None and result.accepted >= self.relay.max_accepted:
            return f"{result.accepted} accepted contributions"
        if self.relay.max_wall_s is not None and elapsed >= self.relay.max_wall_s:
            return f"wall-clock limit of {self.relay.max_wall_s:.0f} s"
        if without_nodes > 0 and without_nodes >= self.relay.no_node_grace_s and not self.pending:
            return f"no node for {without_nodes:.0f} s"
        return ""

    def _drain(self, grid: Grid, result: RelayResult) -> None:
        """Issue no more leases; judge the trains in flight that come back within ``drain_s``."""
        until = self.clock() + self.relay.drain_s
        while any(p.kind == "train" for p in self.pending.values()) and self.clock() < until:
            self.sleep(self.relay.poll_interval_s)
            self.coordinator.tick()
            self._pull(grid, result)

    def _abandon_pending(self) -> None:
        """The run ends with trains in flight: end their leases now rather than leave them to the
        next run's restart sweep; their replies, if any, are never pulled."""
        for pending in self.pending.values():
            if pending.assignment is not None:
                self.coordinator.fail(pending.assignment.lease.token, "hub-stopped")
        self.pending.clear()

    # -- nodes ------------------------------------------------------------------------------------

    def _refresh_nodes(self, grid: Grid) -> list[int]:
        """Track the live nodes; the node list can be empty for a moment right after start."""
        infos = {info.node_id: info for info in grid.get_nodes()}
        for node_id, info in infos.items():
            if node_id not in self.nodes:
                key = getattr(info, "public_key", b"")
                identity = f"pk:{hashlib.sha256(key).hexdigest()}" if key else f"node:{node_id}"
                self.nodes[node_id] = _Node(node_id, identity)
        for node_id in list(self.nodes):
            if node_id not in infos and not self.nodes[node_id].busy:
                del self.nodes[node_id]
        return list(infos)

    def _profile_queries(self, now: float) -> list[tuple[Message, _Pending]]:
        queries = []
        ttl = max(PROFILE_TTL_S, self.relay.no_node_grace_s)
        for node in self.nodes.values():
            if node.profile is None and not node.busy and now >= node.retry_at:
                node.busy = True
                queries.append((messages.profile_message(node.node_id, ttl=ttl), _Pending("profile", node.node_id)))
        return queries

    def _free_profiles(self) -> list[NodeProfile]:
        return [n.profile for n in self.nodes.values() if n.profile is not None and not n.busy]

    def _node_by_identity(self, identity: str) -> Optional[_Node]:
        return next((n for n in self.nodes.values() if n.identity == identity), None)

    # -- messages ---------------------------------------------------------------------------------

    def _push(self, grid: Grid, batch: list[tuple[Message, _Pending]]) -> None:
        """One push for all messages of a loop turn; each id is remembered until its first reply."""
        if not batch:
            return
        ids = grid.push_messages([message for message, _ in batch])
        for message_id, (_, pending) in zip(ids, batch):
            self.pending[message_id] = pending

    def _train_message(self, assignment: Assignment) -> tuple[Message, _Pending]:
        """The train message of a new lease; the base files go along when the node lacks them."""
        node = self._node_by_identity(assignment.lease.holder)
        assert node is not None, assignment.lease.holder
        node.busy = True
        lease = assignment.lease
        ttl = lease.remaining(self.clock())
        instruction = messages.TrainInstruction(
            adapter=lease.adapter,
            adapter_version=lease.adapter_version,
            languages=assignment.adapter.languages,
            token=lease.token,
            base=assignment.base_ref,
            base_version=lease.base_version,
            budget_s=max(1.0, ttl - self.relay.deadline_margin_s),
            max_steps=self.max_steps,
        )
        folder = self.coordinator.store.get(assignment.adapter_ref)
        state = load_adapter_file(folder / "adapter_model.safetensors")
        send_base = assignment.base_ref.digest not in node.digests
        base_folder = self.coordinator.store.get(assignment.base_ref) if send_base else None
        message = messages.train_message(
            node.node_id, instruction, adapter_to_arrays(state), ttl=ttl, base_folder=base_folder
        )
        return message, _Pending("train", node.node_id, assignment, send_base)

    def _pull(self, grid: Grid, result: RelayResult) -> None:
        if not self.pending:
            return
        for reply in grid.pull_messages(list(self.pending)):
            pending = self.pending.pop(reply.metadata.reply_to_message_id, None)
            if pending is None:
                continue  # a second answer for an id already handled
            node = self.nodes.get(pending.node_id)
            if node is not None:
                node.busy = False
            if pending.kind == "profile":
                self._on_profile(reply, node)
            else:
                self._on_train_reply(reply, pending, node, result)

    def _on_profile(self, reply: Message, node: Optional[_Node]) -> None:
        if node is None:
            return
        if reply.has_error():
            log.warning("Node %d did not answer its profile query (%s)", node.node_id, reply.error.reason)
            node.retry_at = self.clock() + self.relay.poll_interval_s * 10
            return
        config = reply.content["config"]
        partition = config.get("partition-id")
        if partition is not None:
            # Simulated nodes get a new random id and key every run; their partition is stable.
            node.identity = f"sim:{int(partition)}"
        node.digests = set(config.get("base-digests", []))
        node.profile = NodeProfile(
            node=node.identity,
            languages=tuple(config.get("languages", [])),
            device=str(config.get("device", "cpu")),
            data_size=int(config.get("data-bytes", 0)),
        )
        log.info(
            "Node %s: languages %s, %s, %.0f KB of text",
            self.coordinator.registry.pseudonym(node.identity), ",".join(node.profile.languages) or "-",
            node.profile.device, node.profile.data_size / 1000,
        )

    def _on_train_reply(self, reply: Message, pending: _Pending, node: Optional[_Node], result: RelayResult) -> None:
        lease = pending.assignment.lease
        if reply.has_error():
            code = reply.error.code
            result.failures += 1
            if code == ErrorCode.NODE_UNAVAILABLE:
                self.coordinator.node_gone(lease.holder)
                if node is not None:
                    self.nodes.pop(node.node_id, None)
            else:
                reason = {
                    ErrorCode.MESSAGE_UNAVAILABLE: "message-expired",
                    ErrorCode.REPLY_MESSAGE_UNAVAILABLE: "reply-after-ttl",
                }.get(code, f"client-error: {reply.error.reason}")
                self.coordinator.fail(lease.token, reason)
                if node is not None:  # its cache may have lost the base: send it with the next lease
                    node.digests.discard(pending.assignment.base_ref.digest)
            return
        if pending.sent_base and node is not None:
            node.digests.add(pending.assignment.base_ref.digest)
        try:
            parsed = messages.parse_train_reply(reply)
        except InvalidAdapter as err:
            outcome = self.coordinator.receive_push(
                holder=lease.holder, token=lease.token, adapter=lease.adapter,
                base_version=lease.base_version, state=None, invalid_reason=str(err),
            )
        else:
            state, invalid = None, None
            try:
                state = arrays_to_adapter(parsed.arrays, self.spec)
            except InvalidAdapter as err:
                invalid = str(err)
            holder = node.identity if node is not None else f"node:{reply.metadata.src_node_id}"
            outcome = self.coordinator.receive_push(
                holder=holder, token=parsed.token, adapter=parsed.adapter, base_version=parsed.base_version,
                state=state, invalid_reason=invalid, metrics=parsed.metrics,
            )
        result.history.append(outcome)
        if outcome.accepted:
            result.accepted += 1
        else:
            result.rejected += 1
