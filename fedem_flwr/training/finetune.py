"""The client's fine-tuning loop: one flat loop in nanoGPT's shape, for a LoRA adapter or a full model.

Per optimizer step: set the learning rate (linear warmup, then cosine down to ``min_lr_ratio``), run
``grad_accum`` micro-steps over one batch of blocks, clip, step AdamW. It stops at ``max_steps``, after
``max_seconds``, or before a step that would end past ``deadline`` (an absolute ``clock()`` time: the
lease's deadline minus a margin), so a lease is never lost to a last long step.

Only trainable parameters reach the optimizer, so a PeftModel trains its adapter and nothing else.
With ``train.carry`` set, a relay hop continues the adapter's one training run instead of starting
its own (``training.optimizer_state``): the schedule runs over the adapter's total steps, and with
``moments`` AdamW resumes from the moments and step the last hop left, matched by name.
The loss of a step is the sum of token losses over the whole step divided by its target count, so
the gradient does not depend on how the step is split in micro-batches: a CUDA out-of-memory halves
the micro-batch, doubles the accumulation and reruns the same step with the same result. Blocks may
carry context tokens (``data.labels``: the user's turns of a conversation), which the model reads
and the loss skips; ``TrainResult.tokens`` counts every token processed, targets or not.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm.auto import tqdm

from fedem_flwr.config.schema import CptConfig, TrainConfig
from fedem_flwr.data.labels import inputs_of, labels_for, loss_sum, target_count
from fedem_flwr.errors import ConfigError, DataError, TrainingError
from fedem_flwr.training.device import autocast, pick_device, pick_precision, release_memory
from fedem_flwr.training.optimizer_state import (
    OptimizerState,
    carried_lr,
    export_from_optimizer,
    fresh,
    load_into_optimizer,
    optimizer_steps,
    parameter_keys,
)

log = logging.getLogger(__name__)

LOG_INTERVAL = 10  # steps between loss read-outs (each one is a CPU-GPU sync point)


@dataclass
class TrainResult:
    """What a training run did; ``stopped_by`` is ``max_steps``, ``max_seconds`` or ``deadline``."""

    steps: int
    tokens: int
    loss_first: float
    loss_last: float
    seconds: float
    stopped_by: str
    micro_batch: int = 0
    grad_accum: int = 0
    optimizer_state: Optional[OptimizerState] = None  # where the adapter's run stands now (``train.carry``)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def lr_at(step: int, cfg: "TrainConfig | CptConfig") -> float:
    """Learning rate of optimizer step ``step`` (0-based): warmup, then cosine to ``lr * min_lr_ratio``."""
    min_lr = cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if step >= cfg.max_steps:
        return min_lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)


def shrink_micro_batch(micro_batch: int, grad_accum: int) -> Optional[tuple[int, int]]:
    """The (micro_batch, grad_accum) to retry with after an out-of-memory, or None at micro-batch 1.

    The micro-batch at least halves and the effective batch (their product) stays exactly the same:
    the new micro-batch is the largest divisor of the effective batch not above half the old one.
    """
    if micro_batch <= 1:
        return None
    effective = micro_batch * grad_accum
    smaller = max(d for d in range(1, micro_batch // 2 + 1) if effective % d == 0)
    return smaller, effective // smaller


def is_out_of_memory(err: BaseException) -> bool:
    """A CUDA out-of-memory, whether torch's allocator, cuBLAS or a kernel library reported it."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("CUDA out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text)


def train(
    model: torch.nn.Module,
    blocks: torch.Tensor,
    cfg: TrainConfig,
    *,
    pad_id: int,
    seed: int = 0,
    deadline: Optional[float] = None,
    clock: Callable[[], float] = time.monotonic,
    progress: Optional[bool] = None,
    optimizer_state: Optional[OptimizerState] = None,
    lr_schedule: Optional[Callable[[int], float]] = None,
) -> TrainResult:
    """Train the trainable parameters of ``model`` on token ``blocks`` ([n, block_size]) under ``cfg``.

    The model moves to ``cfg.device`` and stays there; its train/eval mode is restored afterwards.
    Deterministic given ``seed`` on a CPU (the global RNG is forked, not reseeded for the caller).

    With ``cfg.carry`` ``schedule`` or ``moments`` the run continues ``optimizer_state`` (a fresh one
    when None): step ``i`` here is the adapter's step ``state.step + i`` of ``carried_lr``, and with
    ``moments`` AdamW starts from the state's moments and step; the result's ``optimizer_state`` is
    where the run stands after it. With ``carry=none`` the state is ignored and none is returned.
    ``lr_schedule`` (the rate of this run's step ``i``) overrides either schedule: FedAvg's rounds
    pass their own.
    """
    if blocks.ndim != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
        raise DataError(f"training needs token blocks of shape [n >= 1, block_size >= 2]; got {tuple(blocks.shape)}.")
    device = pick_device(cfg.device)
    amp_dtype = pick_precision(cfg.precision, device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("the model has no trainable parameters (attach LoRA or unfreeze some weights).")
    if amp_dtype == torch.float16 and any(p.dtype != torch.float32 for p in params):
        raise ConfigError(
            "`train.precision` is 'fp16' but some trainable weights are not float32 (loss scaling needs "
            "fp32 weights); set `model.dtype=float32` or use LoRA, whose weights stay fp32."
        )
    model.to(device)
    was_training = model.training
    checkpointing = cfg.gradient_checkpointing and _enable_checkpointing(model)

    # Blocks stay on the CPU; only each step's batch travels (a few KB: copying it is not the cost).
    blocks = blocks.to("cpu", torch.long)
    effective = cfg.batch_size * cfg.grad_accum
    # auto_batch_size: start with the whole step in one micro-batch and let the out-of-memory
    # fallback halve it; the first step is the probe. A CPU gives no out-of-memory signal to act on.
    if cfg.auto_batch_size and device.type == "cuda":
        micro, accum = effective, 1
    else:
        micro, accum = cfg.batch_size, cfg.grad_accum

    optimizer = adamw(params, cfg, device)
    carried = named = None
    start_step = 0  # AdamW's own step count at the start (the carried one, once its moments are loaded)
    if cfg.carry != "none":
        carried = optimizer_state if optimizer_state is not None else fresh(carry=cfg.carry)
        if cfg.carry == "moments":
            named = parameter_keys(model)
            load_into_optimizer(optimizer, named, carried)  # by name, onto each parameter's device
            start_step = carried.step if carried.moments else 0
    if lr_schedule is not None:
        lr_of = lr_schedule
    elif carried is not None:
        lr_of = lambda i: carried_lr(carried.step + i, cfg, carried.warmup_from)
    else:
        lr_of = lambda i: lr_at(i, cfg)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    generator = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    show = cfg.progress if progress is None else progress
    bar = tqdm(total=cfg.max_steps, disable=not show, unit="step", dynamic_ncols=True, leave=False)

    steps = tokens = 0
    loss_first = loss_last = math.nan
    last_loss: Optional[torch.Tensor] = None
    stopped_by = "max_steps"
    start = now = clock()
    step_s = 0.0
    rng_devices = [device.index or torch.cuda.current_device()] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(seed)  # dropout, if the adapter has any
            model.train()
            for step in range(cfg.max_steps):
                if deadline is not None and now + step_s > deadline:
                    stopped_by = "deadline"
                    break
                if cfg.max_seconds is not None and now - start + step_s > cfg.max_seconds:
                    stopped_by = "max_seconds"
                    break
                lr = lr_of(step)
                for group in optimizer.param_groups:
                    group["lr"] = lr

                # Next batch: walk seeded permutations of the blocks, epoch after epoch.
                while order.numel() < effective:
                    order = torch.cat([order, torch.randperm(blocks.shape[0], generator=generator)])
                batch, order = blocks[order[:effective]], order[effective:]

                while True:
                    try:
                        last_loss = optimizer_step(model, batch, micro, pad_id, device, amp_dtype, optimizer, scaler,
                                          params, cfg.grad_clip)
                        break
                    except (torch.OutOfMemoryError, RuntimeError) as err:
                        if not is_out_of_memory(err):
                            raise
                    # Out of the except block, so its traceback (holding the activations) is freed first.
                    optimizer.zero_grad(set_to_none=True)
                    release_memory(device)
                    smaller = shrink_micro_batch(micro, accum)
                    if smaller is None:
                        raise TrainingError(
                            f"out of GPU memory at micro-batch 1 (block size {blocks.shape[1]}); lower "
                            "`data.block_size`, set `train.gradient_checkpointing=true` or use a smaller model."
                        )
                    log.warning("out of memory at micro-batch %d: retrying step %d as %d x %d",
                                micro, step, smaller[0], smaller[1])
                    micro, accum = smaller

                steps += 1
                tokens += int((batch != pad_id).sum())  # CPU tensor: no sync
                # On a GPU the CPU queues kernels ahead of the device, at most about one step for
                # models of many layers: the deadline check may be a step late, which the lease's
                # margin covers. Syncing every step would idle the GPU while Python launches the next.
                previous, now = now, clock()
                step_s = now - previous
                if step == 0 or (show and step % LOG_INTERVAL == 0):
                    loss_value = last_loss.item()  # this is a CPU-GPU sync point
                    if step == 0:
                        loss_first = loss_value
                    check_finite(loss_value, step)
                    if show:
                        tok_s = tokens / max(now - start, 1e-9)
                        bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tok_s:.0f}", lr=f"{lr:.1e}")
                bar.update(1)
        new_state = None
        if carried is not None:
            # Steps AdamW applied (a loss scaler skips overflowed ones): the run's position moves by these.
            taken = optimizer_steps(optimizer) - start_step  # a CPU-GPU sync point, once a run
            moments = export_from_optimizer(optimizer, named, carried) if named is not None else {}
            new_state = OptimizerState(carried.step + taken, carried.warmup_from, moments)
    finally:
        bar.close()
        model.train(was_training)
        if checkpointing:
            _disable_checkpointing(model)
        optimizer.zero_grad(set_to_none=True)
        del optimizer
        release_memory(device)
    if last_loss is not None:
        loss_last = last_loss.item()
        check_finite(loss_last, steps - 1)
    return TrainResult(steps, tokens, loss_first, loss_last, now - start, stopped_by, micro, accum, new_state)


def optimizer_step(model, batch, micro, pad_id, device, amp_dtype, optimizer, scaler, params, grad_clip) -> torch.Tensor:
    """One optimizer step over ``batch`` in micro-batches of ``micro``; returns the step's loss (a tensor)."""
    labels = labels_for(batch, pad_id)
    targets = max(1, target_count(labels))  # counted on the CPU, so no sync
    total = torch.zeros((), device=device)
    for x, y in zip(batch.split(micro), labels.split(micro)):
        x, y = inputs_of(x).to(device), y.to(device)
        with autocast(device, amp_dtype):
            logits = model(input_ids=x, use_cache=False).logits
        loss = loss_sum(logits, y) / targets  # in fp32, outside autocast
        (scaler.scale(loss) if scaler else loss).backward()
        total += loss.detach()
    if scaler:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    if scaler:
        scaler.step(optimizer)  # skips the step when the scaled gradients overflowed
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def adamw(params: list[torch.nn.Parameter], cfg: "TrainConfig | CptConfig", device: torch.device) -> torch.optim.AdamW:
    """AdamW over ``params`` with ``cfg.lr`` and ``cfg.weight_decay`` on matrices only."""
    # nanoGPT: decay matrices only; biases and norms (1-D) never decay.
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    # The fused CUDA kernel does the update in one launch instead of one per tensor.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def _enable_checkpointing(model: torch.nn.Module) -> bool:
    base = _base(model)
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ConfigError(
            f"`train.gradient_checkpointing` is true but {type(base).__name__} does not support it."
        )
    # Non-reentrant checkpointing works with frozen embeddings (LoRA), without enable_input_require_grads.
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x renamed it
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return True


def _disable_checkpointing(model: torch.nn.Module) -> None:
    base = _base(model)
    if hasattr(base, "activation_checkpointing_disable"):
        base.activation_checkpointing_disable()
    else:
        base.gradient_checkpointing_disable()


def _base(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def check_finite(loss: float, step: int, section: str = "train") -> None:
    """Raise :class:`TrainingError` naming ``section``'s keys when a step's loss is NaN or infinite."""
    if not math.isfinite(loss):
        raise TrainingError(
            f"the training loss is {loss} at step {step}; lower `{section}.lr` or use `{section}.precision=fp32`."
        )
