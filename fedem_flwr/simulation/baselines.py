"""Two non-federated references for a simulated federation, at the same token budget
(``sim.max_tokens``, every token trained counted) and on the same hub: base v0, held-out split,
per-partition training rows and blind evaluator, all from ``open_hub``.

``centralized``  one LoRA per adapter of the hub (``hub.coordinator.terms``) trained on all of its
                 training rows, the budget split equally over the adapters: the upper bound.
``local-only``   each of N contributors (partition p of N) trains alone, from a fresh adapter, one
                 adapter per adapter of the hub it holds rows for, on budget / N tokens split over
                 them; a held-out set's loss is the mean over the contributors' adapters judged on it
                 (base v0's fresh adapter when none is).

An adapter's rows are its languages' training rows (its domain's only, when it has one). A language
adapter reads them as flat text. A chat adapter (``sft-chat``) reads the rows holding a conversation,
as ``sim.chat_loss`` says (``chat_loss_blocks``): ``response`` (SFT: rendered with the chat template,
the loss on the assistant's tokens), ``all`` (the same rendered tokens, every one a target) or
``flat`` (the contents as plain text, as its language's adapter reads them). Each adapter is judged
on its held-out sets (``en``; ``en:chat``: the held-out conversations' assistant tokens, whatever it
trained on). "Tokens" counts every token processed, targets or context, as ``train`` counts them:
at equal tokens, ``response`` and ``all`` read the same conversations, and ``flat`` (no template
tokens) a few more.

Training runs in segments of ``train.max_steps`` steps; segments of all adapters take turns, so the
trace (evaluated about every tenth of the budget) shows every adapter progressing together. A
segment's steps are cut to what is left of its adapter's budget, so each adapter ends within about
half a step's tokens of its share. ``centralized`` is one optimizer run per adapter: its segments
carry AdamW's moments and the schedule (``training.optimizer_state``: warmup once, then the cosine
over ``train.horizon_steps``, or constant when that is null), as one uninterrupted run would. A
``local-only`` contributor restarts its optimizer each segment, as a FedAvg round on a node does
(and a relay lease with ``train.carry=none``). No Flower here: the references run in-process.

Final numbers are on the study's test split when the hub keeps one (``simulation.evaluation``);
the trace follows that split (about every tenth of the budget), and its first and last rows carry
the held-out losses too.

    fedem --hub DIR sim baseline --method centralized --contributors 20 \\
        --overrides "sim.max_tokens=200000 data.languages=[hi,ta]"
"""

from __future__ import annotations

import logging
import math
import sys
import time
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import mean
from typing import Any, Optional

import datasets
import torch
from tqdm.auto import tqdm

from fedem_flwr.config.schema import FedemConfig
from fedem_flwr.data.blocks import tokenize_blocks, without
from fedem_flwr.data.chat import chat_blocks, conversation_text, parse_messages
from fedem_flwr.data.corpus import CHAT, LANGUAGE, column
from fedem_flwr.data.labels import inputs_of
from fedem_flwr.data.tasks import CHAT as CHAT_FORMAT
from fedem_flwr.data.tasks import AdapterTerms
from fedem_flwr.errors import ConfigError, DataError
from fedem_flwr.model.lora import adapter_state, load_adapter_state
from fedem_flwr.node.contributor import NodeData, lease_rows
from fedem_flwr.relay.bootstrap import Hub, open_hub
from fedem_flwr.simulation.evaluation import (
    base_folder_of,
    final_losses,
    final_split,
    study_fields,
    workbench_on,
)
from fedem_flwr.simulation.record import Counters, Trace, read_result, write_result
from fedem_flwr.training.finetune import train
from fedem_flwr.training.optimizer_state import OptimizerState

log = logging.getLogger(__name__)

METHODS = ("centralized", "local-only")
EVALUATIONS = 10  # trace rows over the budget


@dataclass
class _Job:
    """One adapter trained alone: its name, what judges it, its blocks, its budget and how far it got."""

    owner: str  # "all" (centralized) or the contributor's partition
    name: str  # the hub's adapter (a language adapter's name is its language)
    keys: tuple[str, ...]  # the held-out sets judging it (a language adapter's: its language)
    blocks: torch.Tensor
    budget: int
    state: dict[str, torch.Tensor]
    tokens: int = 0
    segments: int = 0
    continuous: bool = False  # one optimizer run over all segments (centralized)
    optimizer: Optional[OptimizerState] = None  # where that run stands

    @property
    def done(self) -> bool:
        return self.tokens >= self.budget


def run_baseline(method: str, cfg: FedemConfig, hub_path: Path, num_contributors: int = 1,
                 progress: Optional[bool] = None) -> dict[str, Any]:
    """Run ``method`` on the hub at ``hub_path`` (opened or seeded with ``cfg``), write
    ``<hub>/sim/trace.csv`` and ``<hub>/sim/result.json``, and return the result."""
    if method not in METHODS:
        raise ConfigError(f"baseline `method` is {method!r}; allowed: {', '.join(METHODS)}")
    if cfg.sim.max_tokens is None:
        raise ConfigError("a baseline needs a token budget: set `sim.max_tokens`.")
    if num_contributors < 1:
        raise ConfigError(f"`num_contributors` is {num_contributors}; it must be at least 1.")
    started = time.monotonic()
    hub = open_hub(cfg, Path(hub_path))
    base_folder = base_folder_of(hub, 0)
    workbench = workbench_on(hub, base_folder)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_folder))
    adapters = [terms for _, terms in sorted(hub.coordinator.terms.items())]
    keys = sorted({key for terms in adapters for key in terms.heldout_keys})  # a language's, a task's
    jobs = _jobs(method, hub, adapters, num_contributors, tokenizer, workbench.initial_state)
    initial = final_losses(hub, dict.fromkeys(keys, workbench.initial_state), base_folder)
    testing = final_split(hub) == "test"

    def heldout_of(states: dict) -> dict[str, float]:
        return final_losses(hub, states, base_folder, split="heldout") if testing else {}

    counters = Counters()
    trace = Trace(hub.path)

    def row(losses: dict[str, float], heldout: Optional[dict[str, float]] = None) -> None:
        """A trace row: ``losses`` on the final split; with a test split, ``heldout`` beside them."""
        if testing:
            trace.row(math.nan, counters, losses=heldout, test_losses=losses)
        else:
            trace.row(math.nan, counters, losses=losses)

    row(initial, heldout_of(dict.fromkeys(keys, workbench.initial_state)))
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=cfg.sim.max_tokens, disable=not show, unit="tok", unit_scale=True, desc=method, leave=False)
    step_cap = cfg.train.batch_size * cfg.train.grad_accum * cfg.data.block_size
    every = max(1, cfg.sim.max_tokens // EVALUATIONS)
    next_eval = every
    try:
        while True:
            pending = [job for job in jobs if not job.done]
            if not pending:
                break
            job = min(pending, key=lambda j: (j.tokens / j.budget, j.owner, j.name))  # the furthest behind
            spent = _segment(job, workbench.model, cfg, tokenizer.pad_token_id, step_cap)
            counters.tokens += spent
            bar.update(spent)
            if counters.tokens >= next_eval and any(not j.done for j in jobs):
                row(_losses(_job_losses(hub, jobs, base_folder), keys, initial))
                next_eval = (counters.tokens // every + 1) * every
        job_losses = _job_losses(hub, jobs, base_folder)
        losses = _losses(job_losses, keys, initial)
        heldout_initial = heldout_of(dict.fromkeys(keys, workbench.initial_state))
        heldout = (_losses(_job_losses(hub, jobs, base_folder, "heldout"), keys, heldout_initial)
                   if testing else losses)
        row(losses, heldout)
    finally:
        bar.close()
        trace.close()
    adapter_tokens: dict[str, int] = {}
    for job in jobs:  # by adapter, as the relay counts them
        adapter_tokens[job.name] = adapter_tokens.get(job.name, 0) + job.tokens
    extra = {"contributors": num_contributors if method == "local-only" else 1, "budget_tokens": cfg.sim.max_tokens,
             "adapters_trained": len(jobs), "segments": sum(j.segments for j in jobs),
             **study_fields(hub, initial=initial, base=initial, heldout=heldout, adapter_tokens=adapter_tokens)}
    if method == "local-only":
        extra["per_contributor"] = _per_contributor(jobs, job_losses)
    write_result(hub.path, method=method, losses=losses, counters=counters, sim_seconds=None,
                 wall_seconds=time.monotonic() - started, extra=extra)
    log.info("%s: %d tokens over %d adapters, mean %s loss %.4f", method, counters.tokens, len(jobs), final_split(hub),
             mean(losses.values()) if losses else math.nan)
    return read_result(hub.path)


def _jobs(method: str, hub: Hub, adapters: list[AdapterTerms], num_contributors: int, tokenizer: Any,
          initial: dict[str, torch.Tensor]) -> list[_Job]:
    """The adapters a method trains: one per adapter of the hub (centralized), one per (contributor,
    adapter it holds rows for) (local-only), each with its share of the budget."""
    budget = int(hub.cfg.sim.max_tokens)
    if method == "centralized":
        rows = without(hub.corpus, hub.split.withheld)  # the whole corpus less the held-out rows
        share = budget // len(adapters) if adapters else 0
        made = (_job("all", terms, adapter_rows(terms, rows), share, hub.cfg, tokenizer, initial, continuous=True)
                for terms in adapters)
        return [job for job in made if job is not None]
    jobs: list[_Job] = []
    per_contributor = budget // num_contributors
    for pid in range(num_contributors):
        rows = hub.training_rows(pid, num_contributors)
        held = [(terms, picked) for terms in adapters if len(picked := adapter_rows(terms, rows))]
        for terms, picked in held:
            job = _job(f"p{pid}", terms, picked, per_contributor // len(held), hub.cfg, tokenizer, initial,
                       continuous=False)
            if job is not None:
                jobs.append(job)
    return jobs


def _job(owner: str, terms: AdapterTerms, rows: datasets.Dataset, budget: int, cfg: FedemConfig, tokenizer: Any,
         initial: dict[str, torch.Tensor], *, continuous: bool) -> Optional[_Job]:
    """``terms``' adapter trained on ``rows`` from ``initial``; None when they make no block."""
    blocks = adapter_blocks(terms, rows, tokenizer, cfg)
    if not len(blocks):
        return None
    return _Job(owner, terms.name, terms.heldout_keys, blocks, budget, dict(initial), continuous=continuous)


def adapter_rows(terms: AdapterTerms, rows: datasets.Dataset) -> datasets.Dataset:
    """The rows of ``rows`` an adapter trains on, as a node picks a lease's (``lease_rows``): its
    languages', its domain's only when it has one, and for a chat adapter only those holding a
    conversation; none when none is left."""
    try:
        return lease_rows(NodeData(rows, tuple(rows.unique(LANGUAGE))), terms.languages, terms.task, terms.domain)
    except DataError:
        return rows.select([])


def adapter_blocks(terms: AdapterTerms, rows: datasets.Dataset, tokenizer: Any, cfg: FedemConfig) -> torch.Tensor:
    """An adapter's training blocks of ``rows`` (from ``adapter_rows``): flat text, or conversations as
    ``sim.chat_loss`` says."""
    if terms.data_format != CHAT_FORMAT:
        return tokenize_blocks(rows["text"], tokenizer, cfg.data.block_size)
    languages = column(rows, LANGUAGE)
    conversations = [parse_messages(chat, where=f"{terms.name}: training row {i} ({languages[i]})")
                     for i, chat in enumerate(column(rows, CHAT))]
    return chat_loss_blocks(conversations, tokenizer, cfg.data.block_size, cfg.sim.chat_loss)


def chat_loss_blocks(conversations: list[list[dict[str, str]]], tokenizer: Any, block_size: int,
                     chat_loss: str) -> torch.Tensor:
    """Blocks of ``conversations`` whose targets ``chat_loss`` picks: ``response`` the assistant's tokens
    of the rendered chat (SFT), ``all`` every rendered token, ``flat`` every token of the plain text."""
    if chat_loss == "flat":
        return tokenize_blocks([conversation_text(messages) for messages in conversations], tokenizer, block_size)
    blocks = chat_blocks(conversations, tokenizer, block_size)
    return inputs_of(blocks) if chat_loss == "all" else blocks


def _segment(job: _Job, model: torch.nn.Module, cfg: FedemConfig, pad_id: int, step_cap: int) -> int:
    """Train ``job`` for one segment (at most ``train.max_steps`` steps, fewer when its budget ends
    sooner); returns the tokens trained."""
    tokens_per_step = min(step_cap, max(1, int((job.blocks != pad_id).sum()) * step_cap // job.blocks.numel()))
    left = job.budget - job.tokens
    # Nearest, not ceiling: over many adapters, overshoots and shortfalls of under half a step cancel.
    steps = min(cfg.train.max_steps, (left + tokens_per_step // 2) // tokens_per_step)
    if steps == 0:
        job.budget = job.tokens  # less than half a step left: this adapter is done
        return 0
    load_adapter_state(model, job.state)
    # A new seed a segment: each segment walks other batches, as each new lease does.
    segment = replace(cfg.train, max_steps=steps, carry="moments" if job.continuous else "none")
    result = train(model, job.blocks, segment, pad_id=pad_id, optimizer_state=job.optimizer,
                   seed=cfg.seed + 1009 * job.segments + hash_key(job.owner, job.name), progress=False)
    job.state = adapter_state(model)
    job.optimizer = result.optimizer_state
    job.tokens += result.tokens
    job.segments += 1
    return result.tokens


def hash_key(*parts: str) -> int:
    """A small stable integer from ``parts`` (Python's ``hash`` of a str is salted per process)."""
    return zlib.crc32("/".join(parts).encode("utf-8")) % 100_003


def _job_losses(hub: Hub, jobs: list[_Job], base_folder: Path,
                split: Optional[str] = None) -> list[dict[str, float]]:
    """Each adapter's loss on each of its held-out sets, on ``split`` (default: the final split)."""
    return [final_losses(hub, dict.fromkeys(job.keys, job.state), base_folder, split=split) for job in jobs]


def _losses(job_losses: list[dict[str, float]], keys: list[str], initial: dict[str, float]) -> dict[str, float]:
    """Each held-out set's loss: its one adapter's, or the mean over the adapters judged on it."""
    by_key: dict[str, list[float]] = {}
    for losses in job_losses:
        for key, loss in losses.items():
            by_key.setdefault(key, []).append(loss)
    return {key: mean(by_key[key]) if key in by_key else initial[key] for key in keys if key in initial}


def _per_contributor(jobs: list[_Job], job_losses: list[dict[str, float]]) -> dict[str, dict[str, Any]]:
    """Each local-only contributor's tokens and its own adapters' losses (what the means are of)."""
    out: dict[str, dict[str, Any]] = {}
    for job, losses in zip(jobs, job_losses):
        entry = out.setdefault(job.owner, {"tokens": 0, "losses": {}})
        entry["tokens"] += job.tokens
        entry["losses"].update(losses)
    return out
