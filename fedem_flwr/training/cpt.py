"""Continuous pretraining (CPT) on the hub: one run of the base model on the hub's own corpus, in bounded
slices, continued across slices, checkpoints, new bases and restarts.

The pretrainer trains every parameter of the base (or those whose names match a ``cpt.train_layers``
glob) with AdamW on the token blocks it is given: the TRAINING side of the hub's split, never its
held-out blocks. Tensors, folders and numbers in and out; no Flower, no registry::

    cpt = ContinuousPretrainer(model, train_blocks, cfg.cpt, cpt_state_path(hub), pad_id=pad, seed=cfg.seed)
    result = cpt.run_slice(cfg.cpt.slice_s)   # whole optimizer steps within the budget: SliceResult
    if cpt.checkpoint_due():                  # every `cpt.checkpoint_every` steps (a slice stops there)
        ...                                   # gate the weights, publish a base version (source cpt)
        cpt.mark_checkpoint()
        cpt.save(info={"base_version": 7})    # the caller's own notes come back as `cpt.info`
    cpt.load_weights(merged.state_dict())     # a newer base: continue from it, same run

**Slices.** A slice runs whole optimizer steps and starts none that would end after its budget: before
each step it adds the estimated step time (the longest of the last few measured steps) to the time
spent so far, so a slice overruns only when a step is slower than every step in the window. The
exceptions are *probes*, steps run without such a bound because the estimate cannot be trusted or
cannot be met; each is one step, so a probing slice ends at most one step past its budget, and the
result says so (``probed``). A pretrainer probes with its first step (a new object, e.g. after a
restart, has measured nothing). The first step is often the slowest (allocations, lazy initialisation,
kernel tuning), so it is the estimate only until a second step is measured; when it alone says no step
fits the budget, the next slice probes at once. When measured steps say no step fits
(``step_too_long``, logged once), slices run nothing, but every ``PROBE_EVERY``-th such slice probes
one step and its time replaces the window: a load spike or a slow moment must not stop CPT for the rest
of the run. A slice also stops after the step that reaches a multiple of ``cpt.checkpoint_every``, so
checkpoints fall on exact steps. On CUDA each step ends with a device sync: without it the clock would
stop before the GPU does and the bound would not hold.

**One run.** The global step, the tokens seen, the schedule position (warmup then cosine over
``cpt.max_steps``, then flat at the minimum), the AdamW moments and step of every trained parameter
(by name), the data cursor (epoch and position in a seeded permutation of the blocks) and the torch
and Python RNG states persist through :meth:`save` (``cpt_state.py``: safetensors + JSON, atomic).
A new pretrainer on the same ``state_dir`` resumes them, so a restart continues the same run: same
step, same moments, same next batch. The RNG is the run's own: a slice swaps it in and out, leaving
the caller's global RNG as it was. When the blocks differ from those of the saved run (the corpus or
the split changed) the cursor moves to the start of the next epoch.

**Weights** are not part of the state: they are the published bases. :meth:`load_weights` copies a
new base into the model in place, keeping the optimizer state, step, schedule, cursor and RNG. Save
right after a checkpoint is published, so that the state and the newest base agree: a kill then
loses at most the steps since (one checkpoint interval).

After a :class:`TrainingError` (a non-finite loss) the weights and moments may hold NaN: the
pretrainer refuses to run or save again; build a new one, which resumes from the last save.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch

from fedem_flwr.config.schema import CptConfig
from fedem_flwr.errors import ConfigError, DataError, TrainingError
from fedem_flwr.training.cpt_state import CptStateError, SavedState, read_state, write_state
from fedem_flwr.training.device import pick_device, pick_precision
from fedem_flwr.training.finetune import adamw, check_finite, lr_at, optimizer_step

log = logging.getLogger(__name__)

STEP_WINDOW = 8  # measured steps the step-time estimate looks back over
PROBE_EVERY = 10  # slices that ran nothing because no step fits, between two probes (module doc)
MOMENTS = ("exp_avg", "exp_avg_sq", "step")


@dataclass(frozen=True)
class SliceResult:
    """What one slice did; ``stopped_by`` is ``budget``, ``checkpoint``, ``max_steps`` or ``step_too_long``."""

    steps: int
    tokens: int
    loss_mean: float  # mean training loss of the slice's steps; NaN when none ran
    seconds: float
    budget_s: float
    stopped_by: str
    probed: bool  # a step ran without an estimate that bounds it (module doc)

    @property
    def overshoot_s(self) -> float:
        """How far the slice ran past its budget (0 when within it)."""
        return max(0.0, self.seconds - self.budget_s)


class ContinuousPretrainer:
    """One CPT run over ``model`` and ``blocks`` ([n, block_size] token ids); see the module doc.

    The model moves to the device (``device``, else ``cfg.device``) and its parameters outside
    ``cfg.train_layers`` are frozen. ``seed`` seeds a new run (its data order and RNG); a run resumed
    from ``state_dir`` keeps the seed it was saved with.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        blocks: torch.Tensor,
        cfg: CptConfig,
        state_dir: Union[str, Path],
        *,
        pad_id: int,
        seed: int = 0,
        device: Union[str, torch.device, None] = None,
    ) -> None:
        if blocks.ndim != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
            raise DataError(f"CPT needs token blocks of shape [n >= 1, block_size >= 2]; got {tuple(blocks.shape)}.")
        self.cfg = cfg
        self.state_dir = Path(state_dir)
        self.pad_id = pad_id
        self.device = pick_device(str(device) if device is not None else cfg.device, key="cpt.device")
        self.amp_dtype = pick_precision(cfg.precision, self.device, key="cpt.precision")
        self.model = model.to(self.device)
        self._params = _select(model, cfg.train_layers)
        self.optimizer = adamw(list(self._params.values()), cfg, self.device)
        self._blocks = blocks.to("cpu", torch.long)
        self._blocks_sha256 = hashlib.sha256(self._blocks.numpy().tobytes()).hexdigest()
        self._seed = seed
        self._step = self._schedule_step = self._tokens = self._checkpoint_step = 0
        self._epoch = self._position = 0
        self._order: tuple[int, torch.Tensor] = (-1, torch.empty(0, dtype=torch.long))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self._rng_torch = torch.get_rng_state()
        self._rng_cuda: Optional[torch.Tensor] = None
        self._rng_python = random.Random(seed).getstate()
        self._first_step_s: Optional[float] = None  # the first measured step: a warm-up, kept apart
        self._step_times: deque[float] = deque(maxlen=STEP_WINDOW)
        self._too_long = 0  # slices in a row that ran nothing because no step fits
        self._warned_too_long = False
        self._broken = False
        self.info: dict[str, Any] = {}
        saved = read_state(self.state_dir)
        self.resumed = saved is not None
        if saved is not None:
            self._restore(saved)

    # -- what the caller reads -------------------------------------------------------------------
    @property
    def step(self) -> int:
        """Optimizer steps of this run so far, across slices and restarts."""
        return self._step

    @property
    def tokens(self) -> int:
        """Non-padding tokens trained on so far."""
        return self._tokens

    @property
    def cursor(self) -> tuple[int, int]:
        """(epoch, position) of the next block in the epoch's seeded permutation."""
        return self._epoch, self._position

    def step_estimate(self) -> Optional[float]:
        """Seconds the next step is expected to take: the longest of the last few, the first step only
        until another is measured; None before any step was measured."""
        return max(self._step_times) if self._step_times else self._first_step_s

    def checkpoint_due(self) -> bool:
        """Whether a multiple of ``cpt.checkpoint_every`` was reached since :meth:`mark_checkpoint`."""
        every = self.cfg.checkpoint_every
        return self._step // every > self._checkpoint_step // every

    def mark_checkpoint(self) -> None:
        """The caller took this checkpoint (published or refused by its gate); persisted by the next save."""
        self._checkpoint_step = self._step

    def next_batch(self) -> torch.Tensor:
        """The blocks the next step will train on (the cursor does not move)."""
        return self._blocks[self._batch_indices()[0]]

    def optimizer_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """AdamW state by parameter name (``exp_avg``, ``exp_avg_sq``, ``step``); empty before the first step."""
        return {name: {k: self.optimizer.state[p][k] for k in MOMENTS}
                for name, p in self._params.items() if p in self.optimizer.state}

    # -- training --------------------------------------------------------------------------------
    def run_slice(
        self, seconds: float, clock: Callable[[], float] = time.monotonic, *, max_steps: Optional[int] = None
    ) -> SliceResult:
        """Run whole optimizer steps for at most ``seconds`` (module doc), and at most ``max_steps``."""
        if not seconds > 0:
            raise ValueError(f"seconds is {seconds!r}; a slice needs a budget > 0.")
        if self._broken:
            raise TrainingError("this CPT run failed earlier; build a new pretrainer to resume from the last save.")
        params = list(self._params.values())
        losses: list[float] = []
        steps = tokens = 0
        stopped_by, probed = "budget", False
        start = now = clock()
        was_training = self.model.training
        try:
            with self._own_rng():
                self.model.train()
                while True:
                    if max_steps is not None and steps >= max_steps:
                        stopped_by = "max_steps"
                        break
                    estimate = self.step_estimate()
                    if estimate is None or (steps == 0 and estimate > seconds and self._probe_due()):
                        probed = True  # measure one step without a bound (module doc)
                        self._too_long = 0
                    elif now - start + estimate > seconds:
                        if steps == 0 and estimate > seconds:
                            stopped_by = "step_too_long"
                            self._too_long += 1
                            if not self._warned_too_long:
                                self._warned_too_long = True
                                log.warning("a CPT step takes about %.2f s, more than the slice's %.2f s: no "
                                            "slice can run one; raise `cpt.slice_s` or lower `cpt.batch_size`.",
                                            estimate, seconds)
                        break
                    lr = lr_at(self._schedule_step, self.cfg)
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr
                    indices, cursor = self._batch_indices()
                    batch = self._blocks[indices]
                    loss = optimizer_step(self.model, batch, self.cfg.batch_size, self.pad_id, self.device,
                                          self.amp_dtype, self.optimizer, None, params, self.cfg.grad_clip)
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)  # the step's real end, for the slice's bound
                    loss_value = loss.item()
                    check_finite(loss_value, self._step, section="cpt")
                    previous, now = now, clock()
                    if self._first_step_s is None:
                        self._first_step_s = now - previous
                    else:
                        if probed and steps == 0:
                            self._step_times.clear()  # they said no step fits; the probe says what one costs now
                        self._step_times.append(now - previous)
                    self._step += 1
                    self._schedule_step += 1
                    self._epoch, self._position = cursor
                    batch_tokens = int((batch != self.pad_id).sum())
                    self._tokens += batch_tokens
                    tokens += batch_tokens
                    steps += 1
                    losses.append(loss_value)
                    if self._step % self.cfg.checkpoint_every == 0:
                        stopped_by = "checkpoint"
                        break
        except TrainingError:
            self._broken = True
            raise
        finally:
            self.model.train(was_training)
            self.optimizer.zero_grad(set_to_none=True)
        loss_mean = sum(losses) / len(losses) if losses else math.nan
        return SliceResult(steps, tokens, loss_mean, now - start, seconds, stopped_by, probed)

    def load_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Copy a new base's weights into the model in place; optimizer state, step, cursor and RNG stay."""
        try:
            with torch.no_grad():
                self.model.load_state_dict(state_dict, strict=True)
        except RuntimeError as err:
            raise TrainingError(
                f"the new base does not fit the CPT model (same keys and shapes needed): {err}"
            ) from err

    # -- persistence -----------------------------------------------------------------------------
    def save(self, info: Optional[Mapping[str, Any]] = None) -> int:
        """Persist the run (atomically, see ``cpt_state.py``); ``info`` (JSON-able) replaces :attr:`info`.

        Returns the bytes written.
        """
        if self._broken:
            raise TrainingError("this CPT run failed; its state is not saved over the last good one.")
        if info is not None:
            self.info = dict(info)
        tensors: dict[str, torch.Tensor] = {"rng.torch": self._rng_torch}
        if self._rng_cuda is not None:
            tensors["rng.cuda"] = self._rng_cuda
        for name, state in self.optimizer_state().items():
            for key, value in state.items():
                tensors[f"optim.{name}.{key}"] = value
        scalars = {
            "step": self._step, "schedule_step": self._schedule_step, "tokens": self._tokens,
            "checkpoint_step": self._checkpoint_step, "epoch": self._epoch, "position": self._position,
            "seed": self._seed, "n_blocks": int(self._blocks.shape[0]), "blocks_sha256": self._blocks_sha256,
            "rng_python": _python_state_to_json(self._rng_python), "trained": sorted(self._params),
            "cpt_config": asdict(self.cfg), "info": self.info, "saved_at": time.time(),
        }
        return write_state(self.state_dir, scalars, tensors)

    def _restore(self, saved: SavedState) -> None:
        record, tensors = saved.record, saved.tensors
        try:
            for key in ("step", "schedule_step", "tokens", "checkpoint_step", "epoch", "position", "seed"):
                setattr(self, f"_{key}", int(record[key]))
            self._rng_python = _python_state_from_json(record["rng_python"])
            self._rng_torch = tensors["rng.torch"]
        except (KeyError, TypeError, ValueError) as err:
            raise CptStateError(f"the CPT state in {str(self.state_dir)!r} lacks or garbles {err}.") from err
        if self.device.type == "cuda" and "rng.cuda" in tensors:
            self._rng_cuda = tensors["rng.cuda"]
        self.info = dict(record.get("info") or {})
        if record.get("blocks_sha256") != self._blocks_sha256:
            log.warning("the CPT blocks changed since the last save (%s blocks, now %d): the cursor moves to "
                        "the start of epoch %d.", record.get("n_blocks"), self._blocks.shape[0], self._epoch + 1)
            self._epoch, self._position = self._epoch + 1, 0
        self._load_moments(tensors)

    def _load_moments(self, tensors: Mapping[str, torch.Tensor]) -> None:
        # optimizer.load_state_dict casts each moment to its parameter's device and dtype (and the
        # step the way the fused/capturable kernels want it); it addresses parameters by index.
        index = {id(p): i for i, p in enumerate(p for g in self.optimizer.param_groups for p in g["params"])}
        state: dict[int, dict[str, torch.Tensor]] = {}
        fresh = []
        for name, p in self._params.items():
            found = {k: tensors.get(f"optim.{name}.{k}") for k in MOMENTS}
            if any(v is None for v in found.values()):
                fresh.append(name)
                continue
            for k in ("exp_avg", "exp_avg_sq"):
                if found[k].shape != p.shape:
                    raise CptStateError(f"the saved CPT moment `{name}.{k}` has shape {tuple(found[k].shape)}; "
                                        f"the parameter has {tuple(p.shape)}.")
            state[index[id(p)]] = found
        if fresh and state:
            log.info("CPT: %d trained parameter(s) have no saved moments and start fresh (e.g. %s).",
                     len(fresh), fresh[0])
        self.optimizer.load_state_dict({"state": state, "param_groups": self.optimizer.state_dict()["param_groups"]})

    # -- internals -------------------------------------------------------------------------------
    def _probe_due(self) -> bool:
        """When no step fits: probe at once while only the warm-up step is measured, else every PROBE_EVERY."""
        return not self._step_times or self._too_long >= PROBE_EVERY

    def _batch_indices(self) -> tuple[torch.Tensor, tuple[int, int]]:
        """The next step's block indices and the cursor after them (epochs run on into the next)."""
        want, n = self.cfg.batch_size * self.cfg.grad_accum, self._blocks.shape[0]
        epoch, position, parts, have = self._epoch, self._position, [], 0
        while have < want:
            part = self._permutation(epoch)[position: position + want - have]
            parts.append(part)
            have += part.numel()
            position += part.numel()
            if position >= n:
                epoch, position = epoch + 1, 0
        return torch.cat(parts), (epoch, position)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._order[0] != epoch:
            digest = hashlib.sha256(f"cpt:{self._seed}:{epoch}".encode()).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)
            self._order = (epoch, torch.randperm(self._blocks.shape[0], generator=generator))
        return self._order[1]

    @contextmanager
    def _own_rng(self) -> Iterator[None]:
        """Run with this run's torch/CUDA/Python RNG; the caller's comes back afterwards."""
        cuda = self.device.type == "cuda"
        devices = [self.device.index if self.device.index is not None else torch.cuda.current_device()] if cuda else []
        caller_python = random.getstate()
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self._rng_torch)
            if cuda and self._rng_cuda is not None:
                torch.cuda.set_rng_state(self._rng_cuda, devices[0])
            random.setstate(self._rng_python)
            try:
                yield
            finally:
                self._rng_torch = torch.get_rng_state()
                if cuda:
                    self._rng_cuda = torch.cuda.get_rng_state(devices[0])
                self._rng_python = random.getstate()
                random.setstate(caller_python)


def _select(model: torch.nn.Module, patterns: list[str]) -> dict[str, torch.nn.Parameter]:
    """Parameters to train by name (all when ``patterns`` is empty); the others are frozen."""
    named = dict(model.named_parameters())
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in named):
            some = ", ".join(list(named)[:4])
            raise ConfigError(f"`cpt.train_layers` pattern {pattern!r} matches no parameter of the model "
                              f"(names look like {some}).")
    chosen = {n: p for n, p in named.items() if not patterns or any(fnmatch.fnmatchcase(n, pat) for pat in patterns)}
    for name, p in named.items():
        p.requires_grad_(name in chosen)
    return chosen


def _python_state_to_json(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_state_from_json(value: list) -> tuple:
    version, internal, gauss = value
    return int(version), tuple(int(x) for x in internal), gauss
