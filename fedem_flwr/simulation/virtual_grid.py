"""The Grid of a simulation on the virtual clock: Flower's simulation Grid, with simulated time.

Real training still happens on Flower's simulation engine; only waiting is simulated. When a train
message is pushed, the node's ``VirtualContributor`` plans the lease (steps that fit its budget at
its speed, this lease's pace, whether it vanishes), the plan travels with the message (``sim-plan``)
so the ClientApp trains exactly those steps, and the reply is due at the plan's completion time. The
clock moves (``advance``, the Strategy's ``sleep``) to the next event -- a reply due, a message
deadline, a contributor going on- or offline -- once every reply due by then has really arrived;
replies due later keep training on the engine meanwhile. So replies are handled in the order of
their simulated completion and every decision the hub takes (TTLs, sweeps, backoff, merges, CPT)
runs on the same simulated time as in deployment.

What a deployment's SuperLink would do is done here in simulated time:
- a reply due after its message's (simulated) TTL becomes error 3 at the deadline (the SuperLink
  drops it), its tokens wasted;
- a contributor that vanished is silent: error 5 (node gone) ``sim.heartbeat_s`` after it vanished,
  or error 3 at the deadline if that comes first, and it is away until ``back_after_vanishing``;
- a contributor outside its online window is not listed by ``get_nodes`` (it finishes a lease it
  already holds: its machine stays on for the work it accepted).
Lease utilisation (``simulation.utilisation``) is measured on the same time: each train message's
useful time and each contributor's online time, from the plans and the contributors' windows. The
count of listed nodes is not used for it: a vanished node stays listed until the hub hears it is gone.
Flower's own message TTL is set to ``sim.message_ttl_s`` real seconds, a safety bound only.

A peer evaluation (``evaluate.peer``, ``gate.peers`` > 0) takes simulated time as a lease does: its
reply is due ``contributors.evaluation_seconds`` after its push -- candidate and parent scored, a
forward pass each on at most ``max-blocks`` blocks of ``block_size`` tokens per language asked, a
forward pass a third of a training step's ``tokens_per_step`` -- at the contributor's speed. It is
drawn a pace and a chance of vanishing as a lease is, and a reply due after its deadline, or from a
node that vanished or was away, becomes the same SuperLink error. That price is an upper bound (a node
holding fewer held-out blocks scores fewer); by default (``sim.peer_eval_cost=scored``) an evaluation is
priced at the tokens its reply reports (``tokens.<lang>``), at most that bound, as training is priced at
the steps it takes: its due time is then known only once the real reply is in, so it is waited for at
once (a forward pass is quick in real time). ``max-blocks`` prices every evaluation at the bound.
Its seconds are counted apart from training (``counters.peer_eval_s``; training is
``usage()['lease_s']``), and they are not lease time: lease utilisation stays a measure of training.

Harmful contributors (``sim.harmful_share``): the partitions ``contributors.harmful_partitions`` draws
stand for broken or malicious contributors. Every train reply of theirs that the hub hears has every
``lora_B`` of its adapter multiplied by ``sim.harm_scale`` (so the delta ``B @ A`` is scaled by it)
before the Strategy sees it; ``counters.harmful_pushes`` counts them. Other replies are untouched.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid

from fedem_flwr.config.schema import SimConfig
from fedem_flwr.model.adapter_spec import AdapterSpec
from fedem_flwr.protocol import messages
from fedem_flwr.protocol.wire import ADAPTER_KEY, content_bytes
from fedem_flwr.simulation.clock import VirtualClock
from fedem_flwr.simulation.contributors import (
    LeasePlan,
    VirtualContributor,
    evaluation_seconds,
    harmful_partitions,
    scoring_seconds,
    virtual_contributor,
)
from fedem_flwr.simulation.record import Counters
from fedem_flwr.simulation.utilisation import LeaseMeter, ceiling, holders, utilisation_fields

log = logging.getLogger(__name__)

SIM_PLAN = "sim-plan"
VANISHED_METRIC = "sim-vanished"
POLL_S, MAX_POLL_S = 0.02, 0.2  # real seconds between pulls while waiting for a reply that is due


def error_reply(message: Message, code: int, reason: str) -> Message:
    """An error reply to ``message`` as the SuperLink sends it (from node 1)."""
    reply = Message(Error(code, reason), reply_to=message)
    reply.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
    return reply


def attach_plan(message: Message, plan: LeasePlan) -> None:
    message.content[SIM_PLAN] = ConfigRecord({"steps": int(plan.steps_done if plan.vanishes else plan.steps),
                                              "vanish": int(plan.vanishes)})


@dataclass(frozen=True)
class NodePlan:
    """What a simulated node is told to do: train ``steps``, then reply -- as vanished when ``vanish``."""

    steps: int
    vanish: bool

    def metrics(self, tokens: float) -> dict[str, float]:
        """The reply's metrics that the simulation reads: tokens trained, and whether it vanished."""
        return {"tokens": float(tokens), VANISHED_METRIC: float(self.vanish)}


def read_plan(message: Message) -> Optional[NodePlan]:
    """The plan a simulated node is to follow, or None outside a simulation on the virtual clock."""
    if SIM_PLAN not in message.content:
        return None
    record = message.content[SIM_PLAN]
    return NodePlan(int(record["steps"]), bool(record["vanish"]))


@dataclass
class _InFlight:
    message: Message
    node_id: int
    pushed_at: float
    deadline: float
    due: float
    seq: int = 0  # push order: replies due at one simulated instant are released in it
    plan: Optional[LeasePlan] = None
    reply: Optional[Message] = None
    peer_draw: str = ""  # its plan's draw (pace, vanishing), to price it again at the tokens it scored
    priced: bool = True  # False while its due time waits on the tokens its reply reports (peer_eval_cost=scored)

    @property
    def peer(self) -> bool:
        """A peer evaluation: its plan takes time, but trains nothing."""
        return self.message.metadata.message_type == messages.PEER


class VirtualGrid(Grid):
    """Wraps the simulation runtime's Grid; the relay Strategy and FedAvg use it as any Grid."""

    simulation = True

    def __init__(self, grid: Grid, clock: VirtualClock, cfg: SimConfig, seed: int, *, max_steps: int,
                 sleep: Callable[[float], None] = time.sleep, block_size: int = 128, tokens_per_step: int = 1024,
                 adapter_spec: Optional[AdapterSpec] = None) -> None:
        """``block_size`` and ``tokens_per_step`` (batch_size * grad_accum * block_size) price a peer
        evaluation; ``adapter_spec`` unpacks the adapters harmful contributors push (needed only then)."""
        self.inner = grid
        self.clock = clock
        self.cfg = cfg
        self.seed = seed
        self.max_steps = max_steps
        self.block_size = block_size
        self.tokens_per_step = tokens_per_step
        self.adapter_spec = adapter_spec
        self.harmful: frozenset[int] = frozenset()  # harmful partitions, drawn once the partition count is known
        self.real_sleep = sleep
        self.counters = Counters()
        self.waiting_s = 0.0  # real seconds the hub waited for a reply that was due
        self.node_train_s = 0.0  # real seconds the nodes reported training (metric ``seconds``)
        self.partitions: dict[int, int] = {}  # node id -> partition id, learnt from profile replies
        self.languages: dict[int, tuple[str, ...]] = {}  # node id -> languages it holds, from the same replies
        self.meter = LeaseMeter()
        self.away_until: dict[int, float] = {}  # node id -> simulated time it is back
        self.in_flight: dict[str, _InFlight] = {}
        self._contributors: dict[int, VirtualContributor] = {}
        self._draws = 0  # numbers plans of messages that carry no lease token
        self._pushed = 0  # messages pushed so far: each entry's ``seq``

    # -- Grid ----------------------------------------------------------------------------------------

    def set_run(self, run: Any) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Any:
        return self.inner.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: Optional[float] = None) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return [info.node_id for info in self.get_nodes()]

    def get_nodes(self) -> Iterable[Any]:
        return [info for info in self.inner.get_nodes() if self.online(info.node_id)]

    def push_messages(self, batch: Iterable[Message]) -> Iterable[str]:
        batch = list(batch)
        now = self.clock()
        entries = []
        for message in batch:
            meta = message.metadata
            ttl = meta.ttl if meta.ttl and math.isfinite(meta.ttl) else self.cfg.message_ttl_s
            self._pushed += 1
            entry = _InFlight(message, meta.dst_node_id, now, now + ttl, now, seq=self._pushed)
            if message.metadata.message_type.startswith("train"):
                entry.plan = self._plan(message)
                if entry.plan is not None:
                    attach_plan(message, entry.plan)
                    entry.due = min(entry.deadline, now + self._heard_after(entry.plan))
                    self.counters.leases += 1
                    self._meter(entry)
            elif entry.peer:
                entry.plan, entry.peer_draw = self._evaluation_plan(message)
                if entry.plan is not None:
                    entry.due = min(entry.deadline, now + self._heard_after(entry.plan))
                    self.counters.peer_evals += 1
                    if self.cfg.peer_eval_cost == "scored" and math.isfinite(entry.plan.duration_s):
                        entry.priced, entry.due = False, now  # due once its reply says what it scored
            meta.ttl = self.cfg.message_ttl_s  # Flower's TTL: real seconds, a safety bound
            self.counters.bytes_moved += content_bytes(message.content)
            entries.append(entry)
        ids = list(self.inner.push_messages(batch))
        for message_id, entry in zip(ids, entries):
            self.in_flight[message_id] = entry
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies due by now, in the order of their simulated arrival (ties in push order).

        Every reply due by now is waited for in real time first, as ``advance`` does: what the hub
        sees at a simulated instant never depends on which real replies happened to be back (a profile
        reply is due the moment it is sent), so a run is the same each time it is run."""
        message_ids = list(message_ids)
        now = self.clock()
        self._wait_for(lambda entry: entry.due <= now)
        ready = sorted(
            ((entry.due, entry.seq, message_id) for message_id in message_ids
             if (entry := self.in_flight.get(message_id)) is not None and entry.reply is not None and entry.due <= now),
        )
        return [self._release(message_id) for _, _, message_id in ready]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: Optional[float] = None) -> Iterable[Message]:
        """Push, then let simulated time run until every reply is in (a synchronous round's wait)."""
        ids = list(self.push_messages(messages))
        replies: list[Message] = []
        while ids:
            replies.extend(self.pull_messages(ids))
            handled = {reply.metadata.reply_to_message_id for reply in replies}
            ids = [message_id for message_id in ids if message_id not in handled]
            if ids:
                self.advance()
        return replies

    # -- simulated time ------------------------------------------------------------------------------

    def advance(self, _poll_s: float = 0.0) -> None:
        """The Strategy's ``sleep``: move to the next event once every reply due by then has arrived."""
        if any(not entry.priced for entry in self.in_flight.values()):
            self._wait_for(lambda entry: not entry.priced)  # their due times wait on their replies
        now = self.clock()
        target = now + self.cfg.max_jump_s
        dues = [entry.due for entry in self.in_flight.values()]
        if dues:
            target = min(target, min(dues))
        elapsed = now - self.clock.start
        for node_id in self.partitions:
            change = self.clock.start + self._contributor(node_id).next_change(elapsed)
            if change > now:
                target = min(target, change)
        for back in self.away_until.values():
            if back > now:
                target = min(target, back)
        target = max(now, target)
        self._wait_for(lambda entry: entry.due <= target)
        self.clock.advance_to(target)

    def online(self, node_id: int) -> bool:
        now = self.clock()
        if self.away_until.get(node_id, -math.inf) > now:
            return False
        if node_id not in self.partitions:
            return True  # not profiled yet: listed, so that it is asked who it is
        return self._contributor(node_id).online(now - self.clock.start)

    def timing(self) -> dict[str, float]:
        """Where real time went, as the grid saw it (rounded seconds)."""
        return {"waiting_for_nodes_s": round(self.waiting_s, 2), "node_training_s": round(self.node_train_s, 2)}

    def usage(self) -> dict[str, float]:
        """Useful lease seconds and contributor online seconds so far (a trace row's ``lease_s`` and
        ``online_s``)."""
        now = self.clock.elapsed
        return {"lease_s": self.meter.lease_seconds(now), "online_s": self.meter.online_seconds(now, self._windows())}

    def utilisation(self, adapters: Optional[Mapping[str, Iterable[str]]] = None, lanes: int = 1) -> dict[str, Any]:
        """The run's utilisation fields as of now (its end), with the ceiling of ``lanes`` holders an
        adapter when ``adapters`` (name -> languages) are given; the ceiling counts the profiled
        contributors and the languages they declared."""
        usage = self.usage()
        limit, inputs = None, None
        if adapters is not None:
            held = holders(adapters, [self.languages.get(node_id, ()) for node_id in self.partitions])
            limit = ceiling(held.values(), len(self.partitions), lanes)
            inputs = {"lanes": lanes, "contributors": len(self.partitions), "holders": held}
        return {**utilisation_fields(usage["lease_s"], usage["online_s"], limit), "ceiling_inputs": inputs}

    @property
    def leases_active(self) -> int:
        return sum(1 for entry in self.in_flight.values() if entry.plan is not None)

    def online_count(self) -> int:
        return len(self.get_node_ids())

    # -- inside --------------------------------------------------------------------------------------

    def _contributor(self, node_id: int) -> VirtualContributor:
        partition = self.partitions[node_id]
        if partition not in self._contributors:
            self._contributors[partition] = virtual_contributor(self.cfg, self.seed, partition)
        return self._contributors[partition]

    def _plan(self, message: Message) -> Optional[LeasePlan]:
        node_id = message.metadata.dst_node_id
        if node_id not in self.partitions:
            log.warning("Train message to node %d, whose partition is unknown: it trains in no simulated time", node_id)
            return None
        config = message.content.get("config")
        budget, max_steps, token = math.inf, self.max_steps, None
        if isinstance(config, ConfigRecord):
            budget = float(config.get("budget-s", budget))
            max_steps = int(config.get("max-steps", max_steps))
            token = config.get("lease-token")
        if token is None:
            self._draws += 1
            token = f"draw-{self._draws}"
        return self._contributor(node_id).plan(token, budget, max_steps)

    def _meter(self, entry: _InFlight) -> None:
        """A lease's useful time -- from its push to its plan's completion, to the moment its node
        vanishes, or to its deadline, whichever comes first -- and a vanishing node's absence, which
        starts when that time ends and lasts until it is back (as ``_release`` will tell the hub)."""
        plan, start = entry.plan, entry.pushed_at - self.clock.start
        end = min(entry.deadline - self.clock.start, start + (plan.vanish_at_s if plan.vanishes else plan.duration_s))
        self.meter.lease(entry.node_id, start, end)
        if plan.vanishes:
            vanished_at = start + plan.vanish_at_s
            self.meter.absent(entry.node_id, end, self._contributor(entry.node_id).back_after_vanishing(vanished_at))

    def _windows(self) -> dict[int, Callable[[float, float], float]]:
        """Each profiled contributor's online-window integral."""
        return {node_id: self._contributor(node_id).online_seconds for node_id in self.partitions}

    def _heard_after(self, plan: LeasePlan) -> float:
        """Simulated seconds from push to what the hub hears: the reply, or the SuperLink's report
        that the node is gone."""
        return plan.vanish_at_s + self.cfg.heartbeat_s if plan.vanishes else plan.duration_s

    def _wait_for(self, due: Callable[[_InFlight], bool]) -> None:
        """Pull real replies until every message in flight that ``due`` selects has its reply."""
        started, pause = time.monotonic(), POLL_S
        self._collect()
        while any(entry.reply is None and due(entry) for entry in self.in_flight.values()):
            self.real_sleep(pause)
            pause = min(MAX_POLL_S, pause * 2)  # each pull costs the SuperLink too
            self._collect()
        self.waiting_s += time.monotonic() - started

    def _collect(self) -> None:
        """Pull every real reply that has arrived; count what it trained."""
        waiting = [message_id for message_id, entry in self.in_flight.items() if entry.reply is None]
        if not waiting:
            return
        for reply in self.inner.pull_messages(waiting):
            entry = self.in_flight.get(reply.metadata.reply_to_message_id)
            if entry is None or entry.reply is not None:
                continue
            entry.reply = reply
            self._on_arrival(entry, reply)

    def _on_arrival(self, entry: _InFlight, reply: Message) -> None:
        if reply.metadata.message_type == messages.PROFILE and not reply.has_error():
            self._learn_partition(entry.node_id, reply)
        if entry.peer and not entry.priced:
            self._price_scored(entry, reply)

    def _evaluation_plan(self, message: Message) -> tuple[Optional[LeasePlan], str]:
        """A peer evaluation's plan, and its draw: ``evaluation_seconds`` at its contributor's speed (module
        doc); a node that is away when asked never answers (the SuperLink reports it gone, as for a lease)."""
        node_id = message.metadata.dst_node_id
        if node_id not in self.partitions:
            log.warning("Peer evaluation for node %d, whose partition is unknown: it takes no simulated time", node_id)
            return None, ""
        config = message.content.get("config")
        max_blocks, languages, evaluation = 1, 1, None
        if isinstance(config, ConfigRecord):
            max_blocks = int(config.get("max-blocks", max_blocks))
            languages = max(1, len([code for code in str(config.get("languages", "")).split(",") if code]))
            evaluation = config.get("evaluation")
        self._draws += 1
        contributor = self._contributor(node_id)
        seconds = evaluation_seconds(contributor.speed, max_blocks=max_blocks, block_size=self.block_size,
                                     languages=languages, tokens_per_step=self.tokens_per_step)
        draw = f"eval-{evaluation}-{self._draws}"
        if self.away_until.get(node_id, -math.inf) > self.clock():  # vanished earlier, not back: silent
            return LeasePlan(0, math.inf, vanish_at_s=0.0), draw
        return contributor.evaluation(draw, seconds), draw

    def _price_scored(self, entry: _InFlight, reply: Message) -> None:
        """``peer_eval_cost=scored``: the evaluation's plan again, at the tokens its reply says it scored
        (the same draw: the same pace and vanishing), at most the bound it was pushed with."""
        entry.priced = True
        metrics = reply.content.get("metrics") if not reply.has_error() else None
        keys = metrics.keys() if isinstance(metrics, MetricRecord) else ()
        scored = sum(_count_metric(metrics, key) for key in keys if str(key).startswith("tokens."))
        contributor = self._contributor(entry.node_id)
        bound = entry.plan.duration_s
        plan = contributor.evaluation(entry.peer_draw, scoring_seconds(contributor.speed, tokens=scored,
                                                                      tokens_per_step=self.tokens_per_step))
        entry.plan = plan if plan.duration_s <= bound else entry.plan
        entry.due = min(entry.deadline, entry.pushed_at + self._heard_after(entry.plan))

    def _count(self, entry: _InFlight, reply: Message, heard: bool) -> None:
        """What a train reply cost, counted when it is due in simulated time: its tokens, wasted
        unless the hub hears the reply in time; its arrays' bytes when it does."""
        metrics = reply.content.get("metrics") if not reply.has_error() else None
        tokens = int(_count_metric(metrics, "tokens"))
        self.counters.tokens += tokens
        self.node_train_s += _count_metric(metrics, "seconds")
        if heard:
            self.counters.bytes_moved += content_bytes(reply.content)
        else:
            self.counters.tokens_wasted += tokens
            self.counters.expired += 1

    def _learn_partition(self, node_id: int, reply: Message) -> None:
        try:
            parsed = messages.parse_profile_reply(reply)
        except messages.InvalidReply:
            return
        if parsed.partition_id is not None:
            self.partitions[node_id] = parsed.partition_id
            self.languages[node_id] = parsed.languages
            if self.cfg.harmful_share > 0 and parsed.num_partitions and not self.harmful:
                self.harmful = harmful_partitions(self.cfg, self.seed, parsed.num_partitions)

    def _count_evaluation(self, entry: _InFlight) -> None:
        """A peer evaluation's contributor seconds: until it answered, vanished, or its deadline."""
        plan = entry.plan
        spent = min(entry.deadline - entry.pushed_at, plan.vanish_at_s if plan.vanishes else plan.duration_s)
        self.counters.peer_eval_s += max(0.0, spent)

    def _harm(self, entry: _InFlight, reply: Message) -> None:
        """A harmful contributor's push, scaled (module doc)."""
        if self.partitions.get(entry.node_id) not in self.harmful or reply.has_error():
            return
        record = reply.content.get("arrays")
        if not isinstance(record, ArrayRecord) or ADAPTER_KEY not in record:
            return
        if self.adapter_spec is None:
            log.warning("Harmful contributor's push left as it is: the grid has no adapter spec to unpack it")
            return
        try:
            packed = record[ADAPTER_KEY].numpy()
        except (TypeError, ValueError, EOFError, OSError):  # malformed: left for the hub's checks to refuse
            return
        record[ADAPTER_KEY] = Array(scale_lora_b(packed, self.adapter_spec, self.cfg.harm_scale))
        self.counters.harmful_pushes += 1

    def _release(self, message_id: str) -> Message:
        """The reply the hub sees: the node's, or the SuperLink's error when it came too late or the
        node vanished."""
        entry = self.in_flight.pop(message_id)
        reply = entry.reply
        if entry.peer and entry.plan is not None:
            self._count_evaluation(entry)
        if entry.plan is None or reply.has_error():
            return reply
        plan = entry.plan
        late = entry.pushed_at + plan.duration_s > entry.deadline
        if not entry.peer:
            self._count(entry, reply, heard=not (plan.vanishes or late))
            if not (plan.vanishes or late):
                self._harm(entry, reply)
        if plan.vanishes:
            if not entry.peer or plan.vanish_at_s > 0:  # a peer vanishing at 0 was away already when asked
                self._vanished(entry, plan, meter=entry.peer)  # a lease's absence was metered at its push
            if entry.due < entry.deadline:  # the SuperLink reports the silent node gone
                return error_reply(entry.message, ErrorCode.NODE_UNAVAILABLE, "node went silent (simulated)")
        if plan.vanishes or late:
            return error_reply(entry.message, ErrorCode.MESSAGE_UNAVAILABLE, "no reply before the TTL (simulated)")
        return reply

    def _vanished(self, entry: _InFlight, plan: LeasePlan, meter: bool) -> None:
        """A node that vanished during a lease or a peer evaluation is away until it is back; ``meter``:
        count that absence now (a lease's was counted when it was pushed, ``_meter``)."""
        vanished_at = entry.pushed_at + plan.vanish_at_s - self.clock.start
        back = self._contributor(entry.node_id).back_after_vanishing(vanished_at)
        self.away_until[entry.node_id] = self.clock.start + back
        if meter:
            self.meter.absent(entry.node_id, vanished_at, back)


def scale_lora_b(packed: np.ndarray, spec: AdapterSpec, scale: float) -> np.ndarray:
    """A packed adapter (``wire.adapter_to_arrays``: float32 tensors flattened in sorted key order) with
    every ``lora_B`` tensor multiplied by ``scale`` and the rest unchanged; an array the spec does not
    describe (not float32, or another size) is returned as it is (the hub's own checks will say what is
    wrong with it)."""
    sizes = [math.prod(shape) for shape in spec.shapes.values()]
    if packed.dtype != np.float32 or sum(sizes) != packed.size:
        return packed
    out = packed.astype(np.float32, copy=True).reshape(-1)
    offset = 0
    for key, size in zip(spec.shapes, sizes):
        if "lora_B" in key:
            out[offset:offset + size] *= np.float32(scale)
        offset += size
    return out


def _count_metric(metrics: Any, key: str) -> float:
    """A count a node reported (``tokens``, ``seconds``), or 0 when it sent none or no usable one:
    what a node says is read, never trusted to be well formed."""
    value = metrics.get(key, 0.0) if isinstance(metrics, MetricRecord) else 0.0
    if not isinstance(value, (int, float)):
        return 0.0
    try:
        number = float(value)
    except OverflowError:  # an int no float holds
        return 0.0
    return number if math.isfinite(number) and number >= 0 else 0.0
