"""Two non-federated references for a simulated federation, at the same token budget
(``sim.max_tokens``, every token trained counted) and on the same hub: base v0, held-out split,
per-partition training rows and blind evaluator, all from ``open_hub``.

``centralized``  one LoRA per language trained on all of that language's training rows, the budget
                 split equally over the languages that have adapters: the upper bound.
``local-only``   each of N contributors (partition p of N) trains alone, from a fresh adapter, one
                 adapter per language it holds, on budget / N tokens split over its languages; a
                 language's loss is the mean over the contributors holding it (base v0's fresh
                 adapter when none does).

Training runs in segments of ``train.max_steps`` steps; segments of all adapters take turns, so the
trace (evaluated about every tenth of the budget) shows every language progressing together. A
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

import torch
from tqdm.auto import tqdm

from fedem_flwr.config.schema import FedemConfig
from fedem_flwr.data.blocks import tokenize_blocks, without
from fedem_flwr.data.corpus import select_languages
from fedem_flwr.errors import ConfigError
from fedem_flwr.model.lora import adapter_state, load_adapter_state
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
    """One adapter trained alone: its language, its blocks, its budget and how far it got."""

    owner: str  # "all" (centralized) or the contributor's partition
    language: str
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
    languages = sorted({lang for adapter in hub.registry.adapters() for lang in adapter.languages})
    jobs = _jobs(method, hub, languages, num_contributors, tokenizer, workbench.initial_state)
    initial = final_losses(hub, dict.fromkeys(languages, workbench.initial_state), base_folder)
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

    row(initial, heldout_of(dict.fromkeys(languages, workbench.initial_state)))
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
            job = min(pending, key=lambda j: (j.tokens / j.budget, j.owner, j.language))  # the furthest behind
            spent = _segment(job, workbench.model, cfg, tokenizer.pad_token_id, step_cap)
            counters.tokens += spent
            bar.update(spent)
            if counters.tokens >= next_eval and any(not j.done for j in jobs):
                row(_losses(jobs, _job_losses(hub, jobs, base_folder), languages, initial))
                next_eval = (counters.tokens // every + 1) * every
        job_losses = _job_losses(hub, jobs, base_folder)
        losses = _losses(jobs, job_losses, languages, initial)
        heldout_initial = heldout_of(dict.fromkeys(languages, workbench.initial_state))
        heldout = (_losses(jobs, _job_losses(hub, jobs, base_folder, "heldout"), languages, heldout_initial)
                   if testing else losses)
        row(losses, heldout)
    finally:
        bar.close()
        trace.close()
    adapter_tokens: dict[str, int] = {}
    for job in jobs:  # by language: the federated methods' adapters are per language too
        adapter_tokens[job.language] = adapter_tokens.get(job.language, 0) + job.tokens
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


def _jobs(method: str, hub: Hub, languages: list[str], num_contributors: int, tokenizer: Any,
          initial: dict[str, torch.Tensor]) -> list[_Job]:
    """The adapters a method trains: one per language (centralized), one per (contributor, language
    it holds) (local-only), each with its share of the budget."""
    budget = int(hub.cfg.sim.max_tokens)
    block_size = hub.cfg.data.block_size
    jobs: list[_Job] = []
    if method == "centralized":
        rows = without(hub.corpus, hub.split.withheld)  # the whole corpus less the held-out rows
        share = budget // len(languages) if languages else 0
        for language in languages:
            blocks = tokenize_blocks(select_languages(rows, [language])["text"], tokenizer, block_size)
            if len(blocks):
                jobs.append(_Job("all", language, blocks, share, dict(initial), continuous=True))
        return jobs
    per_contributor = budget // num_contributors
    for pid in range(num_contributors):
        rows = hub.training_rows(pid, num_contributors)
        held = [lang for lang in languages if lang in set(rows["language"])]
        for language in held:
            blocks = tokenize_blocks(select_languages(rows, [language])["text"], tokenizer, block_size)
            if len(blocks):
                jobs.append(_Job(f"p{pid}", language, blocks, per_contributor // len(held), dict(initial)))
    return jobs


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
                   seed=cfg.seed + 1009 * job.segments + hash_key(job.owner, job.language), progress=False)
    job.state = adapter_state(model)
    job.optimizer = result.optimizer_state
    job.tokens += result.tokens
    job.segments += 1
    return result.tokens


def hash_key(*parts: str) -> int:
    """A small stable integer from ``parts`` (Python's ``hash`` of a str is salted per process)."""
    return zlib.crc32("/".join(parts).encode("utf-8")) % 100_003


def _job_losses(hub: Hub, jobs: list[_Job], base_folder: Path, split: Optional[str] = None) -> list[Optional[float]]:
    """Each adapter's loss on its own language, on ``split`` (default: the final split)."""
    return [final_losses(hub, {job.language: job.state}, base_folder, split=split).get(job.language) for job in jobs]


def _losses(jobs: list[_Job], job_losses: list[Optional[float]], languages: list[str],
            initial: dict[str, float]) -> dict[str, float]:
    """Each language's loss: its one adapter's, or the mean over the contributors holding it."""
    by_language: dict[str, list[float]] = {}
    for job, loss in zip(jobs, job_losses):
        if loss is not None:
            by_language.setdefault(job.language, []).append(loss)
    return {lang: mean(by_language[lang]) if lang in by_language else initial[lang]
            for lang in languages if lang in initial}


def _per_contributor(jobs: list[_Job], job_losses: list[Optional[float]]) -> dict[str, dict[str, Any]]:
    """Each local-only contributor's tokens and its own adapters' losses (what the means are of)."""
    out: dict[str, dict[str, Any]] = {}
    for job, loss in zip(jobs, job_losses):
        entry = out.setdefault(job.owner, {"tokens": 0, "losses": {}})
        entry["tokens"] += job.tokens
        if loss is not None:
            entry["losses"][job.language] = loss
    return out
