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
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from fedem_flwr.durable import atomic_write

NODE_FAULTS_ENV = "FEDEM_NODE_FAULTS"
NODE_FAULTS = ("wrong-token", "malformed-adapter", "oversized-adapter", "late", "nan-moments", "negative-moments",
               "optimizer-step-ahead")


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
        meta = instruction_message.metadata
        time.sleep(max(0.0, meta.created_at + meta.ttl + 2.0 - time.time()))
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
