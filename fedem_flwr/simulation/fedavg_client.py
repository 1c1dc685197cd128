"""The node's side of the FedAvg baselines: Flower's plain ``train`` message, answered as FlowerTune
does (the trained arrays and a MetricRecord with ``num-examples``).

What the hub's FedAvg sends (``fedem_flwr.simulation.fedavg``):

``arrays``          the global (or one language's) LoRA adapter
``config``          ``server-round`` (FedAvg's), ``base-digest`` (the base to train on),
                    ``languages`` (comma-separated; empty: all the rows sent), ``lr`` (the
                    round's learning rate, for every step of it) and, in a last
                    round cut to the token budget, ``max-steps`` (else ``train.max_steps``)
``base-files``      the base checkpoint's files, only to a node that does not cache it yet
``node-rows``       the node's training rows (a simulated node cannot tell which rows are held out)
``sim-plan``        optional, from a simulation's virtual grid: ``steps`` to train (at most), and ``vanish``
                    (1: train them, then answer ``vanished`` = 1 as a node that went silent)

The reply's metrics: ``num-examples`` (rows trained on: FedAvg's weight), ``tokens``, ``steps``,
``train-loss`` and ``vanished``, the same keys in every reply, as FedAvg's aggregation requires.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Optional

from flwr.app import Context, Message, MetricRecord, RecordDict

from fedem_flwr.config.loader import load_run_config
from fedem_flwr.errors import BaseUnavailable
from fedem_flwr.model.lora import lora_spec
from fedem_flwr.node.cache import BaseCache
from fedem_flwr.node.contributor import relay_train, training_data
from fedem_flwr.node.fetch import ensure_base
from fedem_flwr.protocol import messages
from fedem_flwr.protocol.wire import adapter_to_arrays, arrays_to_adapter
from fedem_flwr.simulation.virtual_grid import read_plan

METRIC_KEYS = ("num-examples", "steps", "tokens", "train-loss", "vanished")


def fedavg_train(message: Message, context: Context) -> Message:
    """Train the received adapter on this node's rows of the asked languages and send it back."""
    cfg = load_run_config(context.run_config)
    config = message.content["config"]
    digest = str(config["base-digest"])
    cache = BaseCache.for_node(context.node_config)
    messages.keep_sent_base(message, cache, digest)
    missing = ensure_base(cache, digest, None, context.node_config)
    if missing:
        raise BaseUnavailable(missing)
    data = training_data(cfg, context.node_config, messages.node_rows(message))
    wanted = tuple(lang for lang in str(config.get("languages", "")).split(",") if lang) or data.languages
    steps, vanish = int(config.get("max-steps", cfg.train.max_steps)), False
    plan = read_plan(message)
    if plan is not None:
        steps, vanish = min(steps, plan.steps), plan.vanish
    if steps <= 0:  # vanished before its first step (or asked for none): the adapter goes back untouched
        return _reply(message, message.content["arrays"], examples=1, steps=0, tokens=0, loss=0.0, vanish=vanish)
    server_round = int(config.get("server-round", 0))
    # Simulated node ids are new every run; partitions are not, so seeded runs repeat their batches.
    who = int(context.node_config.get("partition-id", context.node_id)) % 7919
    base = cache.use(digest)
    state, metrics, _ = relay_train(  # FedAvg restarts its optimizer every round: no state kept
        cfg, base, arrays_to_adapter(message.content["arrays"], lora_spec(base, cfg.lora)), data, wanted,
        budget_s=math.inf, max_steps=steps, seed=cfg.seed + 7919 * server_round + who,
        lr_schedule=_round_schedule(config.get("lr")),
    )
    return _reply(message, adapter_to_arrays(state), examples=int(metrics["own-language-rows"]), steps=int(metrics["steps"]),
                  tokens=int(metrics["tokens"]), loss=float(metrics["loss-last"]), vanish=vanish)


def _round_schedule(lr: object) -> Optional[Callable[[int], float]]:
    """The round's learning rate for every step of it (FlowerTune: constant within a round,
    annealed across rounds by the hub); None without one (the node's own schedule)."""
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not (math.isfinite(lr) and lr >= 0):
        return None
    return lambda step: float(lr)


def _reply(message: Message, arrays, *, examples: int, steps: int, tokens: int, loss: float, vanish: bool) -> Message:
    record = MetricRecord({"num-examples": examples, "steps": steps, "tokens": tokens, "train-loss": loss,
                           "vanished": int(vanish)})
    return Message(RecordDict({"arrays": arrays, "metrics": record}), reply_to=message)
