"""Node faults for tests on real processes: a SuperNode whose replies misbehave on cue.

A node's faults are a queue in a file named by ``FEDEM_NODE_FAULTS`` in the SuperNode's environment
(its ClientApp inherits it): each train reply takes the first line, if any, and misbehaves as it says,
so a test decides when a node turns hostile by appending a line:

- ``wrong-token``: claims the lease token before the one it was given (another lease's);
- ``malformed-adapter``: drops the adapter's array (the reply carries an empty record);
- ``oversized-adapter``: sends the adapter's packed array at four times its size;
- ``late``: replies only after the message's TTL has passed (the lease has expired);
- ``nan-moments`` / ``negative-moments``: the optimizer moments it returns (``train.carry=moments``)
  hold a NaN / are negated, so trained second moments turn negative;
- ``optimizer-step-ahead``: claims 1000 optimizer steps more than it took.

An optimizer fault on a reply that carries no optimizer state changes nothing.

Unarmed, a node fault costs one environment lookup.

A peer's judgements (``evaluate.peer``) misbehave by the node config key ``peer-fault`` (set in a
test's in-process Grid, or with ``flower-supernode --node-config 'peer-fault="worse"'``), on every
``ok`` reply the node sends:

- ``worse`` / ``better``: every candidate loss is its parent's + 1.0 / - 1.0 (floored at 0);
- ``random``: every candidate loss is its parent's + or - 1.0 (floored at 0), by one coin seeded from the
  evaluation id;
- ``nan``: every candidate loss is NaN;
- ``huge-tokens``: every language claims 10**9 scored tokens;
- ``other-evaluation``: claims the evaluation id after the one it was asked;
- ``late``: replies only 2 s after the message's TTL has passed;
- ``silent``: waits as ``late`` does, then raises, so no reply ever comes.

Unset, a peer fault costs one dict lookup.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord

from fedem_flwr.durable import atomic_write

NODE_FAULTS_ENV = "FEDEM_NODE_FAULTS"
NODE_FAULTS = ("wrong-token", "malformed-adapter", "oversized-adapter", "late", "nan-moments", "negative-moments",
               "optimizer-step-ahead")
PEER_FAULT_KEY = "peer-fault"
PEER_FAULTS = ("worse", "better", "random", "nan", "huge-tokens", "other-evaluation", "late", "silent")


def take_node_fault() -> str | None:
    """The first fault queued in ``FEDEM_NODE_FAULTS``'s file, removed from it; None when unarmed or empty."""
    armed = os.environ.get(NODE_FAULTS_ENV)
    if not armed:
        return None
    path = Path(armed)
    try:
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return None
    if not lines:
        return None
    with atomic_write(path, "w") as rest:
        rest.write("".join(f"{line}\n" for line in lines[1:]))
    if lines[0] not in NODE_FAULTS:
        raise ValueError(f"{NODE_FAULTS_ENV}: unknown fault {lines[0]!r}; known: {', '.join(NODE_FAULTS)}")
    return lines[0]


def misbehave(reply: Message, instruction_message: Message, fault: str | None) -> Message:
    """``reply`` changed as ``fault`` says (in place), or as it is when ``fault`` is None."""
    if fault == "wrong-token":
        config = reply.content["config"]
        config["lease-token"] = int(config["lease-token"]) - 1
    elif fault in ("malformed-adapter", "oversized-adapter"):
        arrays = reply.content["arrays"]
        keys = sorted(arrays.keys())
        kept = {key: arrays[key] for key in keys[1:]}
        if fault == "oversized-adapter":
            kept[keys[0]] = Array(np.tile(arrays[keys[0]].numpy(), 4))
        reply.content["arrays"] = ArrayRecord(kept)
    elif fault == "late":
        _past_ttl(instruction_message)
    elif fault in ("nan-moments", "negative-moments") and "optimizer" in reply.content:
        moments = reply.content["optimizer"]
        key = min(moments.keys())
        values = moments[key].numpy().copy()
        if fault == "nan-moments":
            values[0] = np.nan
        else:
            values = -values
        moments[key] = Array(values)
    elif fault == "optimizer-step-ahead" and "optimizer-step" in reply.content["config"]:
        config = reply.content["config"]
        config["optimizer-step"] = int(config["optimizer-step"]) + 1000
    return reply


def _past_ttl(message: Message, sleep: Callable[[float], None] = time.sleep,
              now: Callable[[], float] = time.time) -> None:
    """Wait until 2 s after ``message``'s TTL: its reply is refused as late."""
    meta = message.metadata
    sleep(max(0.0, meta.created_at + meta.ttl + 2.0 - now()))


def peer_misbehave(reply: Message, message: Message, node_config: Mapping[str, object], *,
                   sleep: Callable[[float], None] = time.sleep, now: Callable[[], float] = time.time) -> Message:
    """The peer ``reply`` to ``message`` changed (in place) as the node config's ``peer-fault`` says."""
    fault = node_config.get(PEER_FAULT_KEY)
    if not fault:
        return reply
    if fault not in PEER_FAULTS:
        raise ValueError(f"node config `{PEER_FAULT_KEY}` is {fault!r}; known: {', '.join(PEER_FAULTS)}")
    config = reply.content["config"]
    if fault == "other-evaluation":
        config["evaluation"] = int(config["evaluation"]) + 1
    elif fault in ("late", "silent"):
        _past_ttl(message, sleep, now)
        if fault == "silent":
            raise RuntimeError(f"{PEER_FAULT_KEY}=silent: this peer never answers")
    elif "metrics" in reply.content:
        reply.content["metrics"] = _misjudge(reply.content["metrics"], fault, int(config["evaluation"]))
    return reply


def _misjudge(metrics: MetricRecord, fault: str, evaluation: int) -> MetricRecord:
    """``metrics`` (``tokens.<lang>``, ``candidate.<lang>``, ``parent.<lang>``) with the candidate's
    losses or the token counts changed as ``fault`` says."""
    moves = {"worse": 1.0, "better": -1.0}
    if fault == "random":
        moves[fault] = 1.0 if random.Random(evaluation).random() < 0.5 else -1.0  # one coin per evaluation
    changed = dict(metrics)
    for key in metrics:
        name, _, language = str(key).partition(".")
        if name == "tokens" and fault == "huge-tokens":
            changed[key] = 10**9
        elif name == "candidate" and fault == "nan":
            changed[key] = math.nan
        elif name == "candidate" and fault in moves:  # a loss is >= 0: the floor only bites moving down
            changed[key] = max(0.0, float(metrics.get(f"parent.{language}", 0.0)) + moves[fault])
    return MetricRecord(changed)
