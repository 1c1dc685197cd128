"""The ClientApp: relay fine-tuning of a leased adapter (``train.relay``), the node profile
(``query.profile``) and a peer's blind judgement of a push on its held-out rows (``evaluate.peer``,
``fedem_flwr.node.peer_eval``). Wiring only: the work is in ``fedem_flwr.node.contributor``; a missing base is
fetched from the Hugging Face Hub when the message says where (``fedem_flwr.node.fetch``). A lease the
node holds no rows for (its languages, domain, or conversations for a chat task), or whose base cannot
render them (no chat template), is answered ``no-data``: a ``DataError`` there is the node's data, never
a crash."""

from __future__ import annotations

import math
import time

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedem_flwr.config.loader import load_run_config
from fedem_flwr.errors import DataError
from fedem_flwr.gate.loss import evaluate
from fedem_flwr.logs import use_flower_logging
from fedem_flwr.model.lora import lora_spec
from fedem_flwr.node.contributor import BaseCache, lease_rows, profile, relay_train, training_data
from fedem_flwr.node.fetch import ensure_base
from fedem_flwr.node.peer_eval import peer_evaluate
from fedem_flwr.node.peer_holdout import held_out_side, training_side
from fedem_flwr.protocol import faults, messages
from fedem_flwr.protocol.wire import adapter_to_arrays, arrays_to_adapter, arrays_to_optimizer, optimizer_record
from fedem_flwr.quiet import quiet_library_progress
from fedem_flwr.simulation.fedavg_client import fedavg_train
from fedem_flwr.simulation.virtual_grid import read_plan

app = ClientApp()
use_flower_logging()
quiet_library_progress()


@app.query("profile")
def query_profile(message: Message, context: Context) -> Message:
    cfg = load_run_config(context.run_config)
    answer = profile(cfg, context.node_config, BaseCache.for_node(context.node_config))
    return messages.profile_reply(message, answer)


@app.train("relay")
def train_relay(message: Message, context: Context) -> Message:
    cfg = load_run_config(context.run_config)
    instruction = messages.parse_train_instruction(message)
    started = time.monotonic()
    cache = BaseCache.for_node(context.node_config)
    messages.keep_sent_base(message, cache, instruction.base.digest)
    missing = ensure_base(cache, instruction.base.digest, instruction.base_hf, context.node_config)
    if missing:
        return messages.status_reply(message, instruction, messages.MISSING_BASE, missing)
    data = training_side(cfg, context.node_config, training_data(cfg, context.node_config, messages.node_rows(message)))
    try:
        rows = lease_rows(data, instruction.languages, instruction.task, instruction.domain)
    except DataError as err:  # answered before the plan: a node without the rows never trains, even 0 steps
        return messages.status_reply(message, instruction, messages.NO_DATA, str(err))
    plan = read_plan(message)  # in a simulation on the virtual clock: the steps to train, in simulated time
    if plan is not None and plan.steps == 0:  # vanished before its first step
        return messages.train_reply(message, instruction, message.content["arrays"], plan.metrics(tokens=0),
                                    instruction.optimizer)
    base = cache.use(instruction.base.digest)
    spec = lora_spec(base, cfg.lora)  # the layout of its own LoRA
    state = arrays_to_adapter(message.content["arrays"], spec)
    sent = instruction.optimizer if cfg.train.carry != "none" else None  # the adapter's run, to continue
    optimizer = None if sent is None else arrays_to_optimizer(sent.arrays, spec, step=sent.step,
                                                              warmup_from=sent.warmup_from, carry=cfg.train.carry)
    try:
        new_state, metrics, new_optimizer = relay_train(
            cfg, base, state, data, instruction.languages,
            budget_s=(max(1.0, instruction.budget_s - (time.monotonic() - started))  # a fetch spends the lease
                      if plan is None else math.inf),
            max_steps=instruction.max_steps if plan is None else plan.steps, seed=cfg.seed + instruction.token,
            optimizer=optimizer, task=instruction.task, domain=instruction.domain, rows=rows,
        )
    except DataError as err:  # e.g. a base without a chat template for a chat task
        return messages.status_reply(message, instruction, messages.NO_DATA, str(err))
    if plan is not None:
        metrics.update(plan.metrics(tokens=metrics["tokens"]))
    carried = optimizer_record(new_optimizer) if sent is not None and new_optimizer is not None else None
    reply = messages.train_reply(message, instruction, adapter_to_arrays(new_state), metrics, carried)
    return faults.misbehave(reply, message, faults.take_node_fault())


@app.evaluate("peer")
def evaluate_peer(message: Message, context: Context) -> Message:
    """Judge a peer's push blind on this node's held-out rows; a base it lacks comes as a train message's does."""
    cfg = load_run_config(context.run_config)
    instruction = messages.parse_peer_instruction(message)
    cache = BaseCache.for_node(context.node_config)
    messages.keep_sent_base(message, cache, instruction.base_digest)
    missing = ensure_base(cache, instruction.base_digest, instruction.base_hf, context.node_config)
    if missing:
        return messages.peer_status_reply(message, instruction, messages.MISSING_BASE, missing)
    try:
        data = training_data(cfg, context.node_config, messages.node_rows(message))
        heldout = held_out_side(cfg, context.node_config, data)
        base = cache.use(instruction.base_digest)
        spec = lora_spec(base, cfg.lora)  # the layout of its own LoRA
        candidate, parent = (arrays_to_adapter(message.content[key], spec) for key in ("candidate", "parent"))
        results = peer_evaluate(cfg, base, candidate, parent, heldout, instruction.languages, task=instruction.task,
                                domain=instruction.domain, max_blocks=instruction.max_blocks, score=evaluate)
    except DataError as err:
        return messages.peer_status_reply(message, instruction, messages.NO_DATA, str(err))
    return faults.peer_misbehave(messages.peer_reply(message, instruction, results), message, context.node_config)


@app.train()
def train_fedavg(message: Message, context: Context) -> Message:
    """Flower's plain ``train`` (the FedAvg baselines): arrays and ``num-examples`` back, as FlowerTune."""
    return fedavg_train(message, context)
