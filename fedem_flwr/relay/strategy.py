"""Continuous Relay Finetuning as a Flower strategy: an asynchronous relay on the Grid.

Flower's ``Strategy.start`` is a synchronous round loop and Flower has no asynchronous strategy,
so ``RelayStrategy`` overrides ``start`` with an event loop over ``Grid.push_messages`` /
``Grid.pull_messages``: every free node gets an adapter as soon as it is free, every adapter
relays on at its own pace, and there are no rounds. Decisions live in ``RelayCoordinator``.

Replies are routed by ``reply_to_message_id``, never by sender, because error replies come from
the SuperLink itself (``src_node_id`` 1); an id is dropped at its first reply, since pulling it
again answers "message unavailable" (code 3).

Base checkpoints. A node that lacks the lease's base gets it in-band (its files in the train
message), unless the store is on a Hugging Face Hub: then every train message names the base's Hub
repo and the node fetches it itself (``fedem_flwr.node.fetch``); a node that answers
``missing-base`` to that gets the in-band copy with its next lease. ``RelayStrategy.bases`` counts
the ways: ``in-band`` (files sent), ``hf`` (a node without the base told to fetch it answered
anything but ``missing-base``), ``hf-failed`` (a node's Hub fetch failed; the reply's detail is logged).

Every reply is checked once, by ``protocol.messages`` as it is parsed (its claims against the
instruction it answers, its metrics); the coordinator trusts what passes. Logs name a node by its
pseudonym; its Flower node id stands beside it where an operator matches Flower's own logs (failures,
the profile that binds the two).

With ``train.carry`` a train message carries the adapter's optimizer state and a reply returns the
updated one, checked here against the adapter's spec, the step sent and the steps the reply reports
(``validate_optimizer_state``); a state that fails goes to the coordinator as a reason, never as a
rejection of the adapter.

Judged by peers (``gate.peers`` > 0): a push the hub judged waits for peers (``RelayCoordinator``). Each
loop turn first offers the idle nodes to the pushes that wait (``evaluate.peer`` messages: the candidate,
its parent and the base's digest; a node that lacks the base gets it as with a lease), then leases
adapters to the nodes left (why in ``relay.peer_review``). A node asked is busy until its answer or an error comes.
Its answer is checked by ``protocol.messages.parse_peer_reply`` (the evaluation it answers, finite
losses, at most ``gate.max_eval_blocks`` blocks' tokens per language and twice the bytes its profile
declared); what fails is that question's, never the push's, and the node backs off.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedem_flwr.config.schema import RelayConfig
from fedem_flwr.data.tasks import CHAT, node_serving
from fedem_flwr.errors import HubFault, InvalidAdapter, is_hub_fault, one_line
from fedem_flwr.hub.store import ArtifactRef
from fedem_flwr.model.adapter_spec import AdapterSpec
from fedem_flwr.node.fetch import HfLocation
from fedem_flwr.protocol import messages
from fedem_flwr.protocol.wire import adapter_to_arrays, arrays_to_adapter, arrays_to_optimizer, optimizer_record
from fedem_flwr.relay.coordinator import Assignment, PeerRequest, PushOutcome, RelayCoordinator
from fedem_flwr.relay.nodes import NodeState, NodeTable
from fedem_flwr.relay.policies import NodeProfile
from fedem_flwr.training.optimizer_state import InvalidOptimizerState

log = logging.getLogger(__name__)

PROFILE_TTL_S = 120.0
HISTORY_LIMIT = 1000

TrainingRows = Callable[[int, int], Any]
"""``(partition_id, num_partitions) -> rows`` (``text`` and ``language`` columns, and ``chat`` and ``domain``
when the corpus has them) of a simulated node."""


def is_simulation_grid(grid: Grid) -> bool:
    """Flower's simulation runtime hands the ServerApp an ``InMemoryGrid``; a SuperLink an HTTP one.
    A test Grid says which it stands for with its own ``simulation`` flag."""
    flag = getattr(grid, "simulation", None)
    if isinstance(flag, bool):
        return flag
    # Not imported unless the simulation runtime made one (the import costs about half a second).
    module = sys.modules.get("flwr.superlink.grid.inmemory_grid")
    return module is not None and isinstance(grid, module.InMemoryGrid)


@dataclass
class RelayResult:
    """What a relay run did: counters, and the last ``HISTORY_LIMIT`` push outcomes in arrival order."""

    accepted: int = 0
    rejected: int = 0
    leases: int = 0
    failures: int = 0
    seconds: float = 0.0
    stopped_by: str = ""
    history: deque[PushOutcome] = field(default_factory=lambda: deque(maxlen=HISTORY_LIMIT))

    def record(self, outcome: Optional[PushOutcome]) -> None:
        if outcome is None or outcome.pending:  # a push waiting for peers is recorded once decided
            return
        self.history.append(outcome)
        if outcome.accepted:
            self.accepted += 1
        else:
            self.rejected += 1


# How a node that lacked a lease's base was to get it (``_Pending.base_via``).
IN_BAND, HF = "in-band", "hf"
HF_FAILED = "hf-failed"


@dataclass
class _Pending:
    kind: str
    node_id: int
    assignment: Optional[Assignment] = None
    instruction: Optional[messages.TrainInstruction] = None  # what the train message asked
    base_via: str = ""  # IN_BAND, HF, or "" when the hub thought the node had it
    hf_named: bool = False  # the message named the base's Hub repo
    peer: Optional[messages.PeerInstruction] = None  # what a peer evaluation asked
    peer_max_tokens: int = 0  # the most tokens its report may claim per language


def _row_lists(rows: Any, wanted: Sequence[str] = messages.OPTIONAL_ROW_COLUMNS) -> dict[str, list[str]]:
    """A node's rows as the lists a train message carries: ``text`` and ``language``, and of ``wanted``
    (``chat``, ``domain``) those some row has (a corpus of plain text sends no lists of empty strings)."""
    names = rows.column_names if hasattr(rows, "column_names") else list(rows)
    lists = {name: list(rows[name]) for name in messages.ROW_COLUMNS}
    for name in wanted:
        values = list(rows[name]) if name in names else []
        if any(values):
            lists[name] = values
    return lists


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
        training_rows: Optional[TrainingRows] = None,
        between_turns: Optional[Callable[[bool], None]] = None,
        stop_when: Optional[Callable[[], str]] = None,
    ) -> None:
        self.coordinator = coordinator
        self.relay = relay
        self.spec = spec
        self.max_steps = max_steps
        self.clock = clock
        self.sleep = sleep
        self.nodes = NodeTable(relay.backoff_s, relay.backoff_max_s)
        self.pending: dict[str, _Pending] = {}
        self.training_rows = training_rows
        self.between_turns = between_turns  # the hub's own work (merges, CPT); told whether replies came
        self.stop_when = stop_when  # another stop condition (a simulation's token budget): a reason, or ""
        self.simulation = False  # set from the Grid in ``start``
        self._rows: dict[tuple[int, int], dict[str, list[str]]] = {}
        self.bases: Counter[str] = Counter()  # how nodes got the bases they lacked (module docstring)
        self._hf_failed: set[tuple[int, str]] = set()  # (node id, base digest) whose Hub fetch failed

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
        tokens, shares = self.coordinator.adapter_tokens(), self.coordinator.token_shares()
        shown = sorted(shares, key=lambda name: (shares[name], name))
        if len(shown) > 12:  # the furthest behind and the furthest ahead
            shown = shown[:6] + ["..."] + shown[-6:]
        log.info(
            "\t├── Tokens trained per adapter (share of the mean): %s",
            ", ".join(n if n == "..." else f"{n} {tokens[n]} ({shares[n]:.2f})" for n in shown) or "no adapters",
        )
        log.info(
            "\t└── Stop after %s accepted, %s s, or %.0f s without nodes",
            self.relay.max_accepted or "unlimited", self.relay.max_wall_s or "unlimited", self.relay.no_node_grace_s,
        )

    # -- the relay loop ---------------------------------------------------------------------------

    def start(self, grid: Grid, *args: object, **kwargs: object) -> RelayResult:  # type: ignore[override]
        log.info("Starting %s:", type(self).__name__)
        self.summary()
        self.simulation = is_simulation_grid(grid)
        result = RelayResult()
        try:
            self._run(grid, result)
        except Exception as err:
            if is_hub_fault(err) and not isinstance(err, HubFault):
                raise HubFault(f"the hub cannot go on: {one_line(err)}") from err
            raise
        log.info(
            "Relay stopped (%s) after %.1f s: %d accepted, %d rejected, %d leases",
            result.stopped_by, result.seconds, result.accepted, result.rejected, result.leases,
        )
        return result

    def _run(self, grid: Grid, result: RelayResult) -> None:
        self.coordinator.recover()
        started = self.clock()
        last_seen_node = started
        while True:
            now = self.clock()
            self.coordinator.tick()
            live = self._refresh_nodes(grid)
            if live:
                last_seen_node = now
            free = self._free_nodes(now)
            evaluations = self._peer_messages(free)  # first: a push waits on them (relay.peer_review)
            assignments = self.coordinator.assign([node.profile for node in free.values()])
            result.leases += len(assignments)
            trains = [self._train_message(a, free[a.lease.holder]) for a in assignments]
            self._push(grid, self._profile_queries(now) + evaluations + [t for t in trains if t is not None])
            handled = self._pull(grid, result)
            for outcome in self.coordinator.conclude_due():
                result.record(outcome)
            if self.between_turns is not None:
                self.between_turns(handled > 0)

            stop = self._stop_reason(result, now - started, 0.0 if live else now - last_seen_node)
            if stop:
                result.stopped_by = stop
                break
            self.sleep(self.relay.poll_interval_s)
        self._drain(grid, result)
        self._abandon_pending()
        result.seconds = self.clock() - started

    def _stop_reason(self, result: RelayResult, elapsed: float, without_nodes: float) -> str:
        if self.relay.max_accepted is not None and result.accepted >= self.relay.max_accepted:
            return f"{result.accepted} accepted contributions"
        if self.relay.max_wall_s is not None and elapsed >= self.relay.max_wall_s:
            return f"wall-clock limit of {self.relay.max_wall_s:.0f} s"
        if without_nodes > 0 and without_nodes >= self.relay.no_node_grace_s and not self.pending:
            return f"no node for {without_nodes:.0f} s"
        return self.stop_when() if self.stop_when is not None else ""

    def _drain(self, grid: Grid, result: RelayResult) -> None:
        """Issue no more leases; judge the trains in flight that come back within ``drain_s``, with the
        peers their pushes wait for; then decide every push still waiting on what came in."""
        until = self.clock() + self.relay.drain_s
        while (any(p.kind == "train" for p in self.pending.values()) or self.coordinator.waiting_for_peers()) \
                and self.clock() < until:
            self.sleep(self.relay.poll_interval_s)
            self.coordinator.tick()
            self._push(grid, self._peer_messages(self._free_nodes(self.clock())))
            self._pull(grid, result)
            for outcome in self.coordinator.conclude_due():
                result.record(outcome)
        for outcome in self.coordinator.conclude_due(force=True):
            result.record(outcome)

    def _abandon_pending(self) -> None:
        """The run ends with trains in flight: end their leases now rather than leave them to the
        next run's restart sweep; their replies, if any, are never pulled."""
        for pending in self.pending.values():
            if pending.assignment is not None:
                self.coordinator.fail(pending.assignment.lease.token, "hub-stopped")
        self.pending.clear()

    # -- nodes ------------------------------------------------------------------------------------

    def _refresh_nodes(self, grid: Grid) -> list[int]:
        """Track the live nodes; the node list can be empty for a moment right after start. A
        simulated node's identity is settled by its profile (``_on_profile``)."""
        live = {info.node_id: bytes(getattr(info, "public_key", b"")) for info in grid.get_nodes()}
        self.nodes.refresh(live, settled=not self.simulation)
        return list(live)

    def _who(self, node_id: int, node: Optional[NodeState]) -> str:
        """A node as a log line names it: its pseudonym, beside the node id Flower's own logs show. A
        simulated node whose profile has not yet named its partition has no identity but that id."""
        if node is None or not node.settled:
            return f"{node_id} (identity not yet known)"
        return f"{self.coordinator.pseudonym(node.identity)} (node id {node_id})"

    def _profile_queries(self, now: float) -> list[tuple[Message, _Pending]]:
        ttl = max(PROFILE_TTL_S, self.relay.no_node_grace_s)
        queries = []
        for node in self.nodes.to_profile(now):
            node.busy = True
            queries.append((messages.profile_message(node.node_id, ttl=ttl), _Pending("profile", node.node_id)))
        return queries

    def _free_nodes(self, now: float) -> dict[str, NodeState]:
        def refused(node: NodeState, owner: int) -> None:
            log.warning(
                "Node %d is %s, as live node %d is: it gets no lease while that node is here",
                node.node_id, self.coordinator.pseudonym(node.identity), owner,
            )

        return self.nodes.free(now, refused)

    def _back_off(self, node: Optional[NodeState], why: str) -> None:
        """The node failed: no lease (nor profile query) before an exponential, bounded wait."""
        if node is not None:
            delay = self.nodes.back_off(node, self.clock())
            log.warning("Node %s backs off %.0f s after %d failure(s): %s",
                        self._who(node.node_id, node), delay, node.failures, why)

    # -- messages ---------------------------------------------------------------------------------

    def _push(self, grid: Grid, batch: list[tuple[Message, _Pending]]) -> None:
        """One push for all messages of a loop turn; each id is remembered until its first reply."""
        if not batch:
            return
        ids = grid.push_messages([message for message, _ in batch])
        for message_id, (_, pending) in zip(ids, batch):
            self.pending[message_id] = pending

    def _train_message(self, assignment: Assignment, node: NodeState) -> Optional[tuple[Message, _Pending]]:
        """The train message of a new lease; the base files go along when the node lacks them, and in
        simulation the node's training rows. A failure to build it ends the lease (hub faults stop)."""
        try:
            return self._build_train_message(assignment, node)
        except Exception as err:
            if is_hub_fault(err):
                raise
            log.exception("Could not build the train message of lease %d", assignment.lease.token)
            self.coordinator.fail(assignment.lease.token, f"hub-error: {one_line(err)}")
            return None

    def _build_train_message(self, assignment: Assignment, node: NodeState) -> tuple[Message, _Pending]:
        lease = assignment.lease
        ttl = lease.remaining(self.clock())
        payload = self.coordinator.train_payload(assignment)
        hf = payload.base_hf
        instruction = messages.TrainInstruction(
            adapter=lease.adapter,
            adapter_version=lease.adapter_version,
            languages=assignment.languages,  # plain codes: the adapter's own are its serving keys (``en:chat``)
            token=lease.token,
            base=assignment.base_ref,
            base_version=lease.base_version,
            budget_s=max(1.0, ttl - self.relay.deadline_margin_s),
            max_steps=self.max_steps,
            base_hf=hf,
            optimizer=None if payload.optimizer is None else optimizer_record(payload.optimizer),
            task=assignment.task,
            domain=assignment.domain,
        )
        via, base_folder = self._base_delivery(node, assignment.base_ref, hf, f"lease {lease.token}",
                                               lease.base_version)
        message = messages.train_message(
            node.node_id, instruction, adapter_to_arrays(payload.state), ttl=ttl, base_folder=base_folder,
            rows=self._node_rows(node),
        )
        node.busy = True
        return message, _Pending("train", node.node_id, assignment, instruction, via, hf is not None)

    def _base_delivery(self, node: NodeState, base: ArtifactRef, hf: Optional[HfLocation], why: str,
                       version: int) -> tuple[str, Optional[Path]]:
        """How a node that lacks ``base`` gets it with a message: told to fetch it from the Hub (``HF``),
        unless its fetch of it failed before, else its files in-band (``IN_BAND``, with the folder); ""
        when the hub believes it holds it. The node caches what it is sent or fetches; were it lost,
        its typed reply says so and it is sent again (in-band)."""
        if base.digest in node.digests:
            return "", None
        via = HF if hf is not None and (node.node_id, base.digest) not in self._hf_failed else IN_BAND
        who = self.coordinator.pseudonym(node.identity)
        if via == IN_BAND:
            self.bases[IN_BAND] += 1
            log.info("Node %s gets base v%d in-band with %s", who, version, why)
        else:
            log.info("Node %s is to fetch base v%d from %s (%s)", who, version, hf, why)
        node.digests.add(base.digest)
        return via, self.coordinator.base_folder(base) if via == IN_BAND else None

    def _peer_messages(self, free: dict[str, NodeState]) -> list[tuple[Message, _Pending]]:
        """Evaluations for idle nodes while pushes wait for peers; a node asked is taken out of ``free``
        (it is busy until its answer or an error comes). A failure to build one is that question's."""
        if not self.coordinator.waiting_for_peers():
            return []
        idle = [(node.profile, frozenset(node.digests)) for node in free.values() if node.profile is not None]
        batch = []
        for request in self.coordinator.peer_requests(idle):
            node = free.pop(request.identity)
            try:
                batch.append(self._peer_message(request, node))
            except Exception as err:
                if is_hub_fault(err):
                    raise
                log.exception("Could not build evaluation %d for %s", request.evaluation,
                              self._who(node.node_id, node))
                self.coordinator.peer_failed(request.evaluation, f"hub-error: {one_line(err)}")
        return batch

    def _peer_message(self, request: PeerRequest, node: NodeState) -> tuple[Message, _Pending]:
        instruction = messages.PeerInstruction(
            evaluation=request.evaluation, base_digest=request.base_ref.digest, base_version=request.base_version,
            languages=request.terms.languages, max_blocks=request.max_blocks, task=request.terms.task,
            domain=request.terms.domain, base_hf=request.base_hf,
        )
        via, base_folder = self._base_delivery(node, request.base_ref, request.base_hf,
                                               f"evaluation {request.evaluation}", request.base_version)
        message = messages.peer_message(
            node.node_id, instruction, adapter_to_arrays(request.candidate), adapter_to_arrays(request.parent),
            ttl=max(1.0, request.deadline - self.clock()), rows=self._node_rows(node), base_folder=base_folder,
        )
        node.busy = True
        # A byte-level tokenizer gives a token per byte and one per row: no report may claim more
        # than twice the bytes the node declared, nor more than the blocks it was asked to score.
        limit = 2 * max(1, node.profile.data_size)
        if request.max_tokens:
            limit = min(limit, request.max_tokens)
        return message, _Pending("peer", node.node_id, base_via=via, hf_named=request.base_hf is not None,
                                 peer=instruction, peer_max_tokens=limit)

    def _node_rows(self, node: NodeState) -> Optional[dict[str, list[str]]]:
        """A simulated node's training rows, from the hub (it cannot tell which rows are held out).
        Read once per partition: every lease of that node carries the same lists."""
        if not self.simulation or self.training_rows is None or node.partition is None:
            return None
        if node.partition not in self._rows:
            self._rows[node.partition] = _row_lists(self.training_rows(*node.partition), self._row_columns())
        return self._rows[node.partition]

    def _row_columns(self) -> list[str]:
        """The optional row columns some adapter trains on: conversations for a chat adapter, domains for
        a domain adapter (a hub of language adapters sends its nodes text alone, as it always did)."""
        terms = self.coordinator.terms.values()
        return [name for name, needed in (("chat", any(t.data_format == CHAT for t in terms)),
                                           ("domain", any(t.domain for t in terms))) if needed]

    def _pull(self, grid: Grid, result: RelayResult) -> int:
        """Handle every reply that has arrived; returns how many."""
        if not self.pending:
            return 0
        handled = 0
        for reply in grid.pull_messages(list(self.pending)):
            pending = self.pending.pop(reply.metadata.reply_to_message_id, None)
            if pending is None:
                continue  # a second answer for an id already handled
            handled += 1
            node = self.nodes.get(pending.node_id)
            if node is not None:
                node.busy = False
            try:
                if pending.kind == "profile":
                    self._on_profile(reply, node)
                elif pending.kind == "peer":
                    self._on_peer_reply(reply, pending, node)
                else:
                    self._on_train_reply(reply, pending, node, result)
            except Exception as err:
                if is_hub_fault(err):
                    raise
                self._contain(err, pending, node, result)
        return handled

    def _contain(self, err: Exception, pending: _Pending, node: Optional[NodeState], result: RelayResult) -> None:
        """An unexpected error while handling one reply: log it, end that lease with the reason, go on."""
        log.exception("Handling a %s reply from %s failed; the relay goes on", pending.kind,
                      self._who(pending.node_id, node))
        self._back_off(node, one_line(err))
        if pending.assignment is not None:
            result.record(self.coordinator.reject_lease(pending.assignment.lease.token, f"hub-error: {one_line(err)}"))

    def _on_profile(self, reply: Message, node: Optional[NodeState]) -> None:
        if node is None:
            return
        if reply.has_error():
            self._back_off(node, f"no answer to its profile query (code {reply.error.code})")
            return
        try:
            parsed = messages.parse_profile_reply(reply)
        except messages.InvalidReply as err:
            self._back_off(node, f"malformed profile: {err}")
            return
        if self.simulation and parsed.partition_id is not None:
            # Simulated nodes get a new random id and key every run; their partition is stable.
            node.identity, node.settled = f"sim:{parsed.partition_id}", True
            if parsed.num_partitions is not None:
                node.partition = (parsed.partition_id, parsed.num_partitions)
        node.digests = set(parsed.base_digests)
        node.profile = NodeProfile(  # what it can train: its languages' text and the chat it declared
            node=node.identity, languages=node_serving(parsed.languages, parsed.chat_languages),
            device=parsed.device, data_size=parsed.data_bytes,
        )
        chat = f" (chat: {','.join(parsed.chat_languages)})" if parsed.chat_languages else ""
        log.info(
            "Node %s: languages %s%s, %s, %.0f KB of text",
            self._who(node.node_id, node), ",".join(parsed.languages) or "-", chat,
            node.profile.device, node.profile.data_size / 1000,
        )

    def _on_peer_reply(self, reply: Message, pending: _Pending, node: Optional[NodeState]) -> None:
        """A peer's answer, checked like any reply: what fails is that question's, never the push's."""
        sent = pending.peer
        if reply.has_error():
            code = reply.error.code
            self.coordinator.peer_failed(sent.evaluation, f"error code {code}")
            self._after_error(node, code, f"peer evaluation failed (code {code})")
            return
        try:
            parsed = messages.parse_peer_reply(reply, sent, pending.peer_max_tokens)
        except messages.InvalidReply as err:
            self.coordinator.peer_failed(sent.evaluation, f"invalid report: {err}")
            self._back_off(node, f"invalid peer report: {err}")
            return
        if parsed.status == messages.MISSING_BASE:
            self._lost_base(pending, node, sent.base_digest, sent.base_version, parsed.detail)
        if parsed.status != messages.OK:
            self.coordinator.peer_failed(sent.evaluation, f"{parsed.status}: {parsed.detail}".rstrip(": "))
            return
        self.coordinator.peer_answered(sent.evaluation, parsed.tokens, parsed.candidate, parsed.parent)

    def _on_train_reply(self, reply: Message, pending: _Pending, node: Optional[NodeState], result: RelayResult) -> None:
        """Judge a reply as the hub's own lease of the message it answers: the parse has checked its
        claims against that message, and what passes is trusted."""
        lease = pending.assignment.lease
        if reply.has_error():
            self._on_train_error(reply, lease.token, node, result)
            return
        try:
            parsed = messages.parse_train_reply(reply, pending.instruction)
        except messages.ClaimMismatch as err:
            self._back_off(node, str(err))
            result.record(self.coordinator.reject_lease(lease.token, str(err), metrics=err.metrics,
                                                        dropped_metrics=err.dropped_metrics))
            return
        except messages.InvalidReply as err:
            self._back_off(node, str(err))
            result.record(self.coordinator.receive_push(lease.token, None,
                                                        invalid_reason=f"malformed train reply: {err}"))
            return
        if parsed.status == messages.MISSING_BASE:
            self._on_missing_base(parsed, pending, node)
            return
        if pending.base_via == HF:
            self.bases[HF] += 1
            log.info("Node %s fetched base v%d from the Hugging Face Hub",
                     self.coordinator.pseudonym(lease.holder), lease.base_version)
        if parsed.status == messages.NO_DATA:
            self.coordinator.fail(lease.token, messages.NO_DATA)  # no contribution, no backoff
            return
        state, invalid = None, None
        try:
            state = arrays_to_adapter(parsed.arrays, self.spec)
        except InvalidAdapter as err:
            invalid = str(err)
        optimizer, optimizer_invalid = self._pushed_optimizer(parsed, pending.instruction)
        outcome = self.coordinator.receive_push(lease.token, state, invalid_reason=invalid, metrics=parsed.metrics,
                                                dropped_metrics=parsed.dropped_metrics, optimizer_state=optimizer,
                                                optimizer_invalid=optimizer_invalid)
        result.record(outcome)
        if invalid is not None:
            self._back_off(node, f"invalid adapter: {invalid}")
        elif outcome.reason.startswith("expired") and node is not None:
            node.profile = None  # its lease ended without a timely reply: ask it afresh
        elif node is not None:
            self.nodes.succeeded(node)

    def _pushed_optimizer(self, parsed: messages.TrainReply, sent: messages.TrainInstruction) -> tuple[Any, Optional[str]]:
        """The reply's optimizer state, checked against the adapter's spec and what the hop can have
        done (from the step sent, at most the steps it reports), or None and why it fails. Nothing is
        checked when none was sent (``carry=none``): whatever the reply holds is ignored."""
        if sent.optimizer is None:
            return None, None
        if parsed.optimizer_problem or parsed.optimizer is None:
            return None, parsed.optimizer_problem or "the reply carries no optimizer state"
        try:
            return arrays_to_optimizer(
                parsed.optimizer.arrays, self.spec, step=parsed.optimizer.step,
                warmup_from=parsed.optimizer.warmup_from, carry=self.coordinator.carry, sent_step=sent.optimizer.step,
                sent_warmup_from=sent.optimizer.warmup_from, steps_reported=int(parsed.metrics.get("steps", 0.0)),
                max_steps=sent.max_steps,
            ), None
        except InvalidOptimizerState as err:
            log.warning("Lease %d: the pushed optimizer state is refused (the adapter is judged as ever): %s",
                        sent.token, err)
            return None, str(err)

    def _on_missing_base(self, parsed: messages.TrainReply, pending: _Pending, node: Optional[NodeState]) -> None:
        """The node lacks the lease's base: its next lease carries it in-band (``_lost_base``)."""
        assignment = pending.assignment
        self._lost_base(pending, node, assignment.base_ref.digest, assignment.lease.base_version, parsed.detail)
        self.coordinator.fail(assignment.lease.token, messages.MISSING_BASE)

    def _lost_base(self, pending: _Pending, node: Optional[NodeState], digest: str, version: int, detail: str) -> None:
        """A node answered ``missing-base``: its next message carries the base in-band. A node that was just
        sent the files fails to keep them and backs off; one whose Hub fetch failed does not."""
        if pending.hf_named and pending.base_via != IN_BAND:
            self.bases[HF_FAILED] += 1
            self._hf_failed.add((pending.node_id, digest))
            log.warning("Node %s could not fetch base v%d from the Hugging Face Hub (%s); it gets the base in-band",
                        self._who(pending.node_id, node), version, " ".join(detail.split()) or "no detail")
        if node is not None:
            node.digests.discard(digest)
            if pending.base_via == IN_BAND:  # it was just sent: the node fails to keep it
                self._back_off(node, "lost the base it was sent")

    def _on_train_error(self, reply: Message, token: int, node: Optional[NodeState], result: RelayResult) -> None:
        """An error reply from the SuperLink: the lease ends. A node that never answered must answer a
        fresh profile query before its next lease; a node whose ClientApp failed backs off."""
        code = reply.error.code
        result.failures += 1
        if code == ErrorCode.NODE_UNAVAILABLE:
            self.coordinator.fail(token, "node-gone")
            self._after_error(node, code, "node-gone")
            return
        silent = {ErrorCode.MESSAGE_UNAVAILABLE: "message-expired", ErrorCode.REPLY_MESSAGE_UNAVAILABLE: "reply-after-ttl"}
        if code in silent:
            if self.coordinator.fail(token, silent[code]) is None:
                ended = self.coordinator.lease(token)
                log.info("Lease %d had already ended (%s) when the SuperLink reported %s; nothing of it is kept",
                         token, ended.outcome if ended is not None else "unknown",
                         "a reply after its deadline" if code == ErrorCode.REPLY_MESSAGE_UNAVAILABLE
                         else "no reply before its deadline")
            self._after_error(node, code, silent[code])
            return
        lines = str(reply.error.reason).strip().splitlines() or [""]
        reason = f"client-error: {lines[-1][:200]}"
        self.coordinator.fail(token, reason)
        self._after_error(node, code, reason)

    def _after_error(self, node: Optional[NodeState], code: int, why: str) -> None:
        """What an error reply from the SuperLink means for the node it was sent to (None: no longer
        tracked): one that is gone is dropped; one that never answered in time must answer a fresh
        profile query before its next message; one whose ClientApp failed backs off."""
        if node is None:
            return
        if code == ErrorCode.NODE_UNAVAILABLE:
            self.nodes.drop(node.node_id)
        elif code in (ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE):
            if node is not None:
                node.profile = None
        else:
            self._back_off(node, why)

