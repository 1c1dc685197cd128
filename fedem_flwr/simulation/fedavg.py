"""FedAvg baselines with Flower's own ``FedAvg`` (McMahan et al., 2017, arXiv:1602.05629), on the
same hub, data and token budget as the relay.

``fedavg-global``    one LoRA adapter over all languages, as FlowerTune trains one: every sampled
                     node trains it on all its rows and answers a plain ``train`` message with the
                     arrays and ``num-examples`` (``fedem_flwr.simulation.fedavg_client``).
``fedavg-language``  one ``FedAvg`` per language adapter; each samples among the online nodes that
                     hold its language (a grid view listing only them), and all languages' messages
                     of a round go out in one ``send_and_receive``, so they train in parallel.

Both start from base v0 and the hub's fresh LoRA. As FlowerTune's clients, every node starts a
fresh optimizer each round, and the learning rate anneals across rounds, constant within one: round
``t`` (0-based) trains at ``round_lr(t)``, the adapter's one schedule (``carried_lr``: warmup over
``train.warmup_steps`` steps, then a cosine to ``lr * min_lr_ratio`` over ``train.horizon_steps``
steps, or constant when that is null) at the round's first step, ``t * train.max_steps``, past the
warmup (FlowerTune has none across rounds: round 0 trains at the peak); it travels as the round's ``lr``. Each round is what ``Strategy.start`` runs (the
strategy's ``configure_train``, then its ``aggregate_train``), driven here because rounds go on
until the token budget ``sim.max_tokens`` is spent, which ``start`` (a fixed number of rounds)
cannot say. Every token a reply reports counts, wasted ones included. As FedAvg does, error
replies are dropped and logged (counted ``rejected``), and so are replies that break the reply
format (wrong adapter keys or shapes, non-finite values, missing metrics), which FedAvg's own
check would turn into an exception ending the round. A node that vanished (``vanished`` = 1)
spent its tokens for nothing: they count as wasted.

The base travels once per node (``base-files``, cached by digest on the node) and a simulated
node's training rows go with each message, as the relay sends them (only the hub knows which
rows it holds out). The rounds judge on the held-out split; with a test split (``data.test_fraction``)
the trace also follows each language's test loss (only the adapters a round changed are evaluated
again) and the final numbers are measured on it (``simulation.evaluation``).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedem_flwr.config.schema import FedemConfig, TrainConfig
from fedem_flwr.data.corpus import select_languages
from fedem_flwr.errors import FedemError
from fedem_flwr.protocol import messages
from fedem_flwr.protocol.wire import adapter_to_arrays, arrays_to_adapter, content_bytes
from fedem_flwr.relay.bootstrap import Hub
from fedem_flwr.simulation.clock import VirtualClock
from fedem_flwr.simulation.evaluation import (
    base_folder_of,
    final_losses,
    final_split,
    study_fields,
    workbench_on,
)
from fedem_flwr.simulation.fedavg_client import METRIC_KEYS
from fedem_flwr.simulation.record import Counters, Trace, read_result, write_result
from fedem_flwr.training.optimizer_state import carried_lr

log = logging.getLogger(__name__)

METHODS = ("fedavg-global", "fedavg-language")
GLOBAL = "global"  # the key of fedavg-global's one adapter
MAX_ROUNDS = 10_000
MAX_FRUITLESS_ROUNDS = 10  # rounds in a row without one accepted reply end the run (a broken ClientApp)


class BadReply(FedemError, ValueError):
    """A FedAvg train reply breaks the reply format; the message names the field and the value."""


class NodeView:
    """What one FedAvg sees of the grid: the nodes it may sample this round, nothing else."""

    def __init__(self, node_ids: Iterable[int]) -> None:
        self._node_ids = list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)


@dataclass
class _Node:
    node_id: int
    languages: tuple[str, ...]
    partition: Optional[tuple[int, int]]
    digests: set[str] = field(default_factory=set)


def run_fedavg(
    grid: Grid,
    hub: Hub,
    cfg: FedemConfig,
    clock: Callable[[], float],
    trace: Optional[Trace] = None,
    counters: Optional[Counters] = None,
    *,
    max_rounds: int = MAX_ROUNDS,
    more: Optional[Callable[[], Mapping[str, Any]]] = None,
) -> dict[str, Any]:
    """Run ``cfg.sim.method`` over ``grid`` until ``sim.max_tokens`` tokens or ``max_rounds`` rounds,
    write ``<hub>/sim/trace.csv`` (when ``trace`` is None) and ``<hub>/sim/result.json``, and return
    the result.

    Tokens (trained and wasted) and bytes are counted here from the messages, unless
    ``grid.counters`` is ``counters`` (a grid that counts them itself); accepted and rejected
    replies are always counted here. Trace rows: ``sim_s`` since the virtual clock's start,
    ``leases_active`` the round's train messages, and the grid's ``usage()`` (lease and online seconds
    so far) when it measures them. ``more()`` gives more fields for the result, asked for when the run
    ends (a simulation's timing and utilisation)."""
    method = cfg.sim.method
    if method not in METHODS:
        raise ValueError(f"`sim.method` is {method!r}; run_fedavg runs {', '.join(METHODS)}")
    started = time.monotonic()
    t0 = clock.start if isinstance(clock, VirtualClock) else clock()  # simulated time counts from the clock's start
    counters = counters if counters is not None else Counters()
    counting = getattr(grid, "counters", None) is not counters
    own_trace = trace is None
    trace = trace if trace is not None else Trace(hub.path)
    random.seed(cfg.seed)  # Flower's FedAvg samples nodes with the module-level generator

    base = hub.registry.checkpoint(0)
    base_folder = base_folder_of(hub, 0)
    workbench = workbench_on(hub, base_folder)
    languages = sorted({lang for adapter in hub.registry.adapters() for lang in adapter.languages
                        if lang in workbench.heldout})
    groups = {GLOBAL: tuple(languages)} if method == "fedavg-global" else {lang: (lang,) for lang in languages}
    strategies = {key: FedAvg(fraction_train=cfg.sim.fedavg_fraction, fraction_evaluate=0.0, min_train_nodes=1,
                              min_evaluate_nodes=0, min_available_nodes=1) for key in groups}
    arrays = {key: adapter_to_arrays(workbench.initial_state) for key in groups}
    losses = workbench.evaluate(workbench.initial_state, languages=languages)
    initial = final_losses(hub, dict.fromkeys(languages, workbench.initial_state), base_folder)
    testing = final_split(hub) == "test"
    test_losses = dict(initial) if testing else {}
    adapter_tokens = dict.fromkeys(groups, 0)
    nodes: dict[int, _Node] = {}
    rows_cache: dict[tuple[tuple[int, int], str], dict[str, list[str]]] = {}
    budget = cfg.sim.max_tokens
    usage = getattr(grid, "usage", lambda: {})  # a VirtualGrid measures lease and online time
    trace.row(clock() - t0, counters, losses=losses, test_losses=test_losses, **usage())

    server_round, idle_since, stopped_by, fruitless = 0, None, f"{max_rounds} rounds", 0
    tokens_per_step = [float(cfg.train.batch_size * cfg.train.grad_accum * cfg.data.block_size)]  # then measured
    try:
        while server_round < max_rounds:
            if budget is not None and counters.tokens >= budget:
                stopped_by = f"token budget {budget}"
                break
            online = list(grid.get_node_ids())
            _profile(grid, nodes, [nid for nid in online if nid not in nodes], cfg.sim.message_ttl_s)
            batch: list[tuple[str, int, Message]] = []
            for key, langs in groups.items():
                holders = [nid for nid in online if nid in nodes and set(nodes[nid].languages) & set(langs)]
                if not holders:
                    continue
                config = ConfigRecord({"base-digest": base.digest, "languages": ",".join(langs),
                                       "lr": round_lr(server_round, cfg.train)})
                for message in strategies[key].configure_train(server_round + 1, arrays[key], config,
                                                               NodeView(holders)):
                    node = nodes[message.metadata.dst_node_id]
                    batch.append((key, node.node_id, _train_message(
                        message, key, node, langs, base.digest, base_folder, hub, rows_cache, cfg)))
            if budget is not None and batch and not _fit_last_round(batch, budget - counters.tokens,
                                                                   tokens_per_step, cfg):
                stopped_by = f"token budget {budget}"  # what is left is under half a step a node
                break
            if not batch:
                idle_since = clock() if idle_since is None else idle_since
                if _give_up(clock() - idle_since, cfg):
                    stopped_by = "no node holding a language online"
                    break
                _wait(grid, clock, cfg)
                continue
            idle_since = None
            server_round += 1
            sent = [m for _, _, m in batch]
            replies = list(grid.send_and_receive(sent, timeout=cfg.sim.message_ttl_s))
            if counting:
                counters.bytes_moved += sum(content_bytes(m.content) for m in sent)
            by_key = _route(batch, replies)
            updated = []
            _measure(tokens_per_step, [r for got in by_key.values() for _, r in got])
            accepted_before = counters.accepted
            for key, got in by_key.items():
                good = [reply for nid, reply in got if _accept(nid, reply, workbench.spec, counters, counting, nodes)]
                adapter_tokens[key] += sum(int(_metrics(reply)["tokens"]) for reply in good)
                if good:
                    aggregated, _ = strategies[key].aggregate_train(server_round, good)
                    if aggregated is not None:
                        arrays[key] = aggregated
                        updated.append(key)
                if counting:
                    counters.bytes_moved += sum(content_bytes(r.content) for _, r in got if not r.has_error())
            losses.update(_evaluate(workbench, arrays, groups, updated))
            if testing:
                test_losses.update(_evaluate_final(hub, base_folder, arrays, groups, updated, workbench.spec))
            trace.row(clock() - t0, counters, leases_active=len(sent), online=len(online), losses=losses,
                      test_losses=test_losses, **usage())
            log.info("FedAvg round %d (%s): %d sent, %d replies, %d tokens so far", server_round, method,
                     len(sent), len(replies), counters.tokens)
            fruitless = 0 if counters.accepted > accepted_before else fruitless + 1
            if fruitless >= MAX_FRUITLESS_ROUNDS:
                stopped_by = f"no reply accepted in {fruitless} rounds"
                break
    finally:
        if own_trace:
            trace.close()
    states = {lang: arrays_to_adapter(arrays[GLOBAL if method == "fedavg-global" else lang], workbench.spec)
              for lang in languages}
    final = final_losses(hub, states, base_folder)
    heldout = final_losses(hub, states, base_folder, split="heldout") if testing else final
    study = study_fields(hub, initial=initial, base=initial, heldout=heldout,  # the base never changes: v0
                         adapter_tokens=adapter_tokens)
    write_result(hub.path, method=method, losses=final, counters=counters, sim_seconds=clock() - t0,
                 wall_seconds=time.monotonic() - started,
                 extra={"rounds": server_round, "stopped_by": stopped_by, "budget_tokens": budget, **study,
                        "fedavg_fraction": cfg.sim.fedavg_fraction, **(more() if more is not None else {})})
    return read_result(hub.path)


def _profile(grid: Grid, nodes: dict[int, _Node], unknown: Sequence[int], ttl: float) -> None:
    """Ask new nodes what they hold (languages, partition, cached bases); one that fails is asked again next round."""
    if not unknown:
        return
    for reply in grid.send_and_receive([messages.profile_message(nid, ttl) for nid in unknown], timeout=ttl):
        if reply.has_error():
            continue
        try:
            profile = messages.parse_profile_reply(reply)
        except messages.InvalidReply as err:
            log.warning("Node %d: malformed profile (%s); asked again next round", reply.metadata.src_node_id, err)
            continue
        partition = None
        if profile.partition_id is not None and profile.num_partitions is not None:
            partition = (profile.partition_id, profile.num_partitions)
        nid = reply.metadata.src_node_id
        nodes[nid] = _Node(nid, profile.languages, partition, set(profile.base_digests))


def _train_message(message: Message, key: str, node: _Node, langs: Sequence[str], digest: str, base_folder,
                   hub: Hub, rows_cache: dict, cfg: FedemConfig) -> Message:
    """FedAvg's message for ``node``, with what this node alone needs: the base (once) and its rows."""
    content = RecordDict({name: record for name, record in message.content.items()})
    if digest not in node.digests:
        content[messages.BASE_FILES] = messages.folder_to_arrays(base_folder)
        node.digests.add(digest)
    if node.partition is not None:
        cache_key = (node.partition, key)
        if cache_key not in rows_cache:
            rows = hub.training_rows(*node.partition)
            mine = [lang for lang in langs if lang in set(rows["language"])]
            rows = select_languages(rows, mine) if mine else rows.select([])
            rows_cache[cache_key] = {"text": list(rows["text"]), "language": list(rows["language"])}
        content[messages.NODE_ROWS] = ConfigRecord(rows_cache[cache_key])
    # A round waits for a node as long as a relay lease lasts: on the virtual clock a reply due later
    # is dropped by the (simulated) SuperLink, as a relay lease expires.
    return Message(content, dst_node_id=node.node_id, message_type=MessageType.TRAIN,
                   ttl=cfg.relay.lease_ttl_s, group_id=key)


def _route(batch: Sequence[tuple[str, int, Message]], replies: Sequence[Message]) -> dict[str, list[tuple[int, Message]]]:
    """Replies by strategy key, with the node each message went to, matched on the message they
    answer (error replies come from the SuperLink, not from the node); a grid that pushed copies
    of the messages leaves their ids unknown here: then the reply's group (the key) and sender."""
    by_id = {message.metadata.message_id: (key, nid) for key, nid, message in batch}
    routed: dict[str, list[tuple[int, Message]]] = {key: [] for key, _, _ in batch}
    for reply in replies:
        target = by_id.get(reply.metadata.reply_to_message_id)
        if target is None and reply.metadata.group_id in routed:
            target = (reply.metadata.group_id, reply.metadata.src_node_id)
        if target is None:
            log.warning("Dropped a reply to an unknown message %r", reply.metadata.reply_to_message_id)
            continue
        routed[target[0]].append((target[1], reply))
    return routed


def _accept(nid: int, reply: Message, spec, counters: Counters, counting: bool, nodes: dict[int, _Node]) -> bool:
    """Whether node ``nid``'s reply goes to FedAvg's aggregation; its tokens count either way, and
    what is dropped is logged with the reason."""
    if reply.has_error():
        counters.rejected += 1
        reason = reply.error.reason.strip().splitlines()
        log.info("Node %d: dropped an error reply (code %d): %s", nid, reply.error.code, reason[-1] if reason else "")
        nodes.pop(nid, None)  # asked for its profile (and cached bases) again before its next message
        return False
    try:
        metrics = _metrics(reply)
    except BadReply as err:
        counters.rejected += 1
        log.warning("Node %d: dropped its reply: %s", nid, err)
        return False
    if counting:
        counters.tokens += int(metrics["tokens"])
    if metrics["vanished"]:
        if counting:
            counters.tokens_wasted += int(metrics["tokens"])
        log.info("Node %d vanished after %d steps: its work is lost", nid, int(metrics["steps"]))
        return False
    try:
        if len(reply.content.array_records) != 1 or "arrays" not in reply.content.array_records:
            raise BadReply(f"reply holds array records {sorted(reply.content.array_records)}; expected ['arrays']")
        arrays_to_adapter(reply.content["arrays"], spec)  # keys, shapes, dtypes, finite values
    except (BadReply, ValueError) as err:
        counters.rejected += 1
        log.warning("Node %d: dropped its reply: %s", nid, err)
        return False
    counters.accepted += 1
    return True


def _metrics(reply: Message) -> dict[str, float]:
    records = reply.content.metric_records
    if len(records) != 1 or "metrics" not in records:
        raise BadReply(f"reply holds metric records {sorted(records)}; expected ['metrics']")
    kept, dropped = messages.parse_metrics(records["metrics"])
    if dropped or set(kept) != set(METRIC_KEYS):
        raise BadReply(f"reply `metrics` hold {sorted(records['metrics'])}; expected {list(METRIC_KEYS)}")
    if kept["num-examples"] <= 0 or kept["tokens"] < 0:
        raise BadReply(f"reply `num-examples` is {kept['num-examples']} and `tokens` {kept['tokens']}; "
                       "they must be > 0 and >= 0")
    return kept


def _evaluate(workbench, arrays: Mapping[str, ArrayRecord], groups: Mapping[str, tuple[str, ...]],
              keys: Iterable[str]) -> dict[str, float]:
    """Held-out losses of the adapters aggregated this round, on their own languages."""
    losses: dict[str, float] = {}
    for key in keys:
        losses.update(workbench.evaluate(arrays_to_adapter(arrays[key], workbench.spec), languages=list(groups[key])))
    return losses


def _evaluate_final(hub: Hub, base_folder, arrays: Mapping[str, ArrayRecord], groups: Mapping[str, tuple[str, ...]],
                    keys: Iterable[str], spec) -> dict[str, float]:
    """Final-split (test) losses of the adapters aggregated this round, on their own languages."""
    states: dict[str, Any] = {}
    for key in keys:
        state = arrays_to_adapter(arrays[key], spec)
        states.update(dict.fromkeys(groups[key], state))
    return final_losses(hub, states, base_folder) if states else {}


def round_lr(server_round: int, train: TrainConfig) -> float:
    """The learning rate of FedAvg round ``server_round`` (0-based), constant within the round, as
    FlowerTune anneals it across rounds: the adapter's schedule (``carried_lr``) at the round's
    first step, counting ``train.max_steps`` steps a round. FlowerTune has no warmup across rounds,
    so round 0 starts at the peak rate (the schedule past its warmup), not at a warmup's first step."""
    return carried_lr(max(server_round * train.max_steps, train.warmup_steps), train)


def _fit_last_round(batch: Sequence[tuple[str, int, Message]], left: int, tokens_per_step: list[float],
                    cfg: FedemConfig) -> bool:
    """When a full round would overshoot what is left of the budget, ask each node for fewer
    steps (``max-steps``: the nearest count, so the run ends within about half a step a node of
    the budget); False when that is no step at all."""
    if len(batch) * cfg.train.max_steps * tokens_per_step[0] <= left:
        return True
    steps = min(cfg.train.max_steps, round(left / (len(batch) * tokens_per_step[0])))
    for _, _, message in batch:
        message.content["config"]["max-steps"] = steps
    return steps > 0


def _measure(tokens_per_step: list[float], replies: Iterable[Message]) -> None:
    """Tokens a step actually trains (blocks hold padding), from the replies' own counts."""
    steps = tokens = 0.0
    for reply in replies:
        record = reply.content.metric_records.get("metrics") if not reply.has_error() else None
        if record is not None and isinstance(record.get("steps"), (int, float)) and isinstance(record.get("tokens"), (int, float)):
            steps, tokens = steps + float(record["steps"]), tokens + float(record["tokens"])
    if steps > 0 and tokens > 0:
        tokens_per_step[0] = tokens / steps


def _give_up(idle_s: float, cfg: FedemConfig) -> bool:
    """No node to train: wait up to a whole availability period (a ``daily`` fleet comes back
    within one), else ``relay.no_node_grace_s`` (or ``sim.away_s`` when nodes vanish)."""
    if cfg.sim.availability == "daily":
        return idle_s >= cfg.sim.period_s
    away = cfg.sim.away_s if cfg.sim.vanish_prob > 0 else 0.0  # every node may have vanished at once
    return idle_s >= max(cfg.relay.no_node_grace_s, away)


def _wait(grid: Grid, clock: Callable[[], float], cfg: FedemConfig) -> None:
    """Let time pass while no node is there: a simulation's grid moves its clock to the next event
    (a contributor coming online), a bare virtual clock jumps, a real one sleeps."""
    advance = getattr(grid, "advance", None)
    if advance is not None:
        advance()
    elif isinstance(clock, VirtualClock):
        clock.advance_to(clock() + cfg.sim.max_jump_s)
    else:
        time.sleep(cfg.relay.poll_interval_s)
