"""The optimizer state an adapter carries from hop to hop, so a relay chain is one training run.

A chain of short leases that restarts AdamW and the warmup at every hop never gets past the
warmup (DESIGN 19). With ``train.carry`` set, the adapter's total step count and the start of its
current warmup travel with it (``schedule``), and with ``moments`` AdamW's first and second moments
too. The state is keyed by NAME, never by parameter order: ``"<adapter state key>::exp_avg"`` and
``"<adapter state key>::exp_avg_sq"``, the keys being those of ``model.lora.adapter_state``, so a
state saved on one node resumes on another whatever its device, parameter order or fused kernel.

It comes from other machines, so it is checked like an adapter (``validate_optimizer_state``):
exact names and shapes, float32, finite values, non-negative second moments, and a step count the
hop can have reached. At rest it is one safetensors file (tensors, and ``step``/``warmup_from`` in
its metadata); nothing is ever unpickled.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Union

import torch

from fedem_flwr.config.schema import CARRY_MODES, TrainConfig
from fedem_flwr.errors import FedemError
from fedem_flwr.model.adapter_spec import AdapterSpec

MOMENTS = ("exp_avg", "exp_avg_sq")
SEPARATOR = "::"
FORMAT = "fedem-optimizer-1"  # the safetensors metadata's `format`


class InvalidOptimizerState(FedemError, ValueError):
    """A received or stored optimizer state fails validation (names, shapes, dtype, values, step)."""


@dataclass
class OptimizerState:
    """Where an adapter's one training run stands: its total optimizer steps, the total step its
    current warmup began at (0, or the step of the last rebase), and AdamW's moments by name
    (float32 on the CPU; empty with ``carry=schedule`` or before the first step)."""

    step: int = 0
    warmup_from: int = 0
    moments: dict[str, torch.Tensor] = field(default_factory=dict)


def moment_key(key: str, moment: str) -> str:
    return f"{key}{SEPARATOR}{moment}"


def moment_spec(spec: AdapterSpec) -> AdapterSpec:
    """The moments' layout for adapter ``spec``: each key twice (``exp_avg``, ``exp_avg_sq``), same shape."""
    return AdapterSpec({moment_key(key, m): shape for key, shape in spec.shapes.items() for m in MOMENTS})


def fresh(spec: Optional[AdapterSpec] = None, carry: str = "moments", *, step: int = 0,
          warmup_from: int = 0) -> OptimizerState:
    """A state with zero moments (with ``carry=moments`` and a ``spec``) at ``step``: what AdamW starts
    from, so resuming from a fresh state at step 0 is exactly a fresh optimizer."""
    moments = {}
    if carry == "moments" and spec is not None:
        moments = {key: torch.zeros(shape, dtype=torch.float32) for key, shape in moment_spec(spec).shapes.items()}
    return OptimizerState(step, warmup_from, moments)


def carried_lr(step: int, cfg: TrainConfig, warmup_from: int = 0) -> float:
    """Learning rate of the adapter's total optimizer step ``step`` (0-based).

    The target rate is ``cfg.lr`` until the first warmup ends, then a cosine over the adapter's
    total steps down to ``lr * min_lr_ratio`` at ``horizon_steps`` (``min_lr`` after it), or
    ``cfg.lr`` for ever when ``horizon_steps`` is null. Within a warmup the rate ramps up to that
    target linearly: ``warmup_steps`` long from step 0, ``rebase_warmup_steps`` long from
    ``warmup_from`` > 0 (a rebase). With ``horizon_steps == max_steps`` this is ``lr_at`` exactly."""
    min_lr = cfg.lr * cfg.min_lr_ratio
    target = cfg.lr
    if cfg.horizon_steps is not None and step >= cfg.warmup_steps:
        if step >= cfg.horizon_steps:
            target = min_lr
        else:
            progress = (step - cfg.warmup_steps) / max(1, cfg.horizon_steps - cfg.warmup_steps)
            target = min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)
    warmup = cfg.warmup_steps if warmup_from <= 0 else cfg.rebase_warmup_steps
    since = step - max(0, warmup_from)
    if 0 <= since < warmup:
        return target * (since + 1) / (warmup + 1)
    return target


# -- checks ----------------------------------------------------------------------------------------


def _names(keys: Iterable[str], limit: int = 4) -> str:
    keys = sorted(map(str, keys))
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(repr(k) for k in keys[:limit]) + more


def _check_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidOptimizerState(f"optimizer state `{name}` is {value!r}; it must be a non-negative integer.")
    return value


def validate_optimizer_state(
    state: OptimizerState,
    spec: AdapterSpec,
    *,
    carry: str = "moments",
    sent_step: Optional[int] = None,
    sent_warmup_from: Optional[int] = None,
    steps_reported: Optional[int] = None,
    max_steps: Optional[int] = None,
) -> OptimizerState:
    """Return ``state`` with CPU contiguous float32 moments in spec order, or raise ``InvalidOptimizerState``.

    ``spec`` is the adapter's: with ``carry=moments`` the names must be exactly its keys times
    (``exp_avg``, ``exp_avg_sq``) with its shapes, so a state of another adapter (another rank or
    targets) is refused; with ``carry=schedule`` there are none. The hub also passes the step it
    sent (``sent_step``, ``sent_warmup_from``) and the steps the reply reports (at most ``max_steps``,
    the lease's): the step must lie between ``sent_step`` and ``sent_step + steps``, fewer being
    honest (a mixed-precision loss scaler skips the steps whose gradients overflowed), and the warmup
    start is the one sent (only the hub starts a warmup, at a rebase)."""
    if carry not in CARRY_MODES or carry == "none":
        raise ValueError(f"`carry` is {carry!r}; a state is validated under 'schedule' or 'moments'.")
    if not isinstance(state, OptimizerState):
        raise InvalidOptimizerState(f"optimizer state is a {type(state).__name__}, not an OptimizerState.")
    step = _check_int("step", state.step)
    warmup_from = _check_int("warmup_from", state.warmup_from)
    if warmup_from > step:
        raise InvalidOptimizerState(f"optimizer state `warmup_from` is {warmup_from}, past its `step` {step}.")
    if sent_step is not None:
        reported = steps_reported if steps_reported is not None else 0
        if max_steps is not None:
            reported = min(reported, max_steps)
        if not sent_step <= step <= sent_step + reported:
            raise InvalidOptimizerState(
                f"optimizer state `step` is {step}; the hop started at {sent_step} and reports {reported} step(s), "
                f"so it must lie in [{sent_step}, {sent_step + reported}]."
            )
    if sent_warmup_from is not None and warmup_from != sent_warmup_from:
        raise InvalidOptimizerState(
            f"optimizer state `warmup_from` is {warmup_from}; the hop was sent {sent_warmup_from} (only the hub "
            "starts a warmup)."
        )
    moments = state.moments
    if not isinstance(moments, Mapping):
        raise InvalidOptimizerState(f"optimizer moments are a {type(moments).__name__}, not a mapping of tensors.")
    if carry == "schedule":
        if moments:
            raise InvalidOptimizerState(f"`train.carry` is 'schedule' but the state holds {len(moments)} moment "
                                        f"tensor(s) ({_names(moments)}); it carries none.")
        return OptimizerState(step, warmup_from, {})
    expected = moment_spec(spec)
    missing, extra = set(expected.shapes) - set(moments), set(moments) - set(expected.shapes)
    if missing or extra:
        parts = ([f"missing {_names(missing)}"] if missing else []) + ([f"unexpected {_names(extra)}"] if extra else [])
        raise InvalidOptimizerState(f"optimizer moments do not match the adapter (another adapter's state?): "
                                    f"{'; '.join(parts)}.")
    checked = {}
    for key, shape in expected.shapes.items():
        value = moments[key]
        if not isinstance(value, torch.Tensor):
            raise InvalidOptimizerState(f"optimizer moment {key!r} holds a {type(value).__name__}, not a tensor.")
        if value.dtype != torch.float32:
            raise InvalidOptimizerState(f"optimizer moment {key!r} has dtype {value.dtype}; expected torch.float32.")
        if tuple(value.shape) != shape:
            raise InvalidOptimizerState(f"optimizer moment {key!r} has shape {tuple(value.shape)}; the adapter's is "
                                        f"{shape} (another adapter's state?).")
        value = value.detach().to("cpu").contiguous()
        bad = int((~torch.isfinite(value)).sum())
        if bad:
            raise InvalidOptimizerState(f"optimizer moment {key!r} has {bad} non-finite value(s) (NaN or inf).")
        if key.endswith(SEPARATOR + "exp_avg_sq"):
            negative = int((value < 0).sum())
            if negative:
                raise InvalidOptimizerState(f"optimizer moment {key!r} has {negative} negative value(s); a second "
                                            "moment is a mean of squares.")
        checked[key] = value
    return OptimizerState(step, warmup_from, checked)


# -- a rebase --------------------------------------------------------------------------------------


def reset_moments(state: OptimizerState, mode: str, fraction: float = 0.01) -> OptimizerState:
    """The state for an adapter re-projected onto a new base: the schedule position kept, the warmup
    started again here (``warmup_from = step``), and the moments, which describe the old
    parametrisation, zeroed (``reset``) or pruned to the largest ``fraction`` of ``exp_avg`` by
    magnitude per tensor, the matching ``exp_avg_sq`` entries kept with them (``prune``, as ReLoRA)."""
    if mode not in ("reset", "prune"):
        raise ValueError(f"`mode` is {mode!r}; allowed: 'reset', 'prune'.")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"`fraction` is {fraction}; it must lie in [0, 1].")
    moments: dict[str, torch.Tensor] = {}
    for key, value in state.moments.items():
        if not key.endswith(SEPARATOR + "exp_avg"):
            continue
        paired = key + "_sq"
        avg, avg_sq = value.detach().to("cpu", torch.float32), state.moments[paired].detach().to("cpu", torch.float32)
        keep = torch.zeros(avg.numel(), dtype=torch.bool)
        count = math.ceil(fraction * avg.numel()) if mode == "prune" else 0
        if count:
            keep[avg.reshape(-1).abs().topk(count).indices] = True
        keep = keep.view(avg.shape)
        moments[key] = torch.where(keep, avg, torch.zeros_like(avg))
        moments[paired] = torch.where(keep, avg_sq, torch.zeros_like(avg_sq))
    return replace(state, warmup_from=state.step, moments={k: moments[k] for k in sorted(moments)})


# -- at rest ---------------------------------------------------------------------------------------


def optimizer_state_bytes(state: OptimizerState) -> bytes:
    """The state as one safetensors file's bytes: the moments, and ``step``/``warmup_from`` as metadata."""
    from safetensors.torch import save

    tensors = {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in sorted(state.moments.items())}
    metadata = {"format": FORMAT, "step": str(int(state.step)), "warmup_from": str(int(state.warmup_from))}
    return save(tensors, metadata=metadata)


def save_optimizer_state(state: OptimizerState, path: Union[str, Path]) -> Path:
    """Write ``state`` to ``path`` atomically (a reader sees the old file or the new one)."""
    from fedem_flwr.durable import atomic_write

    path = Path(path)
    with atomic_write(path, permissions=0o600) as handle:
        handle.write(optimizer_state_bytes(state))
    return path


def load_optimizer_state(path: Union[str, Path]) -> OptimizerState:
    """Read a state written by ``save_optimizer_state`` (safetensors only); anything unreadable or
    without its metadata is ``InvalidOptimizerState``. Check it with ``validate_optimizer_state``."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (a safe_open handle is not a dict)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise InvalidOptimizerState(f"optimizer state file {str(path)!r} is missing, corrupt or truncated: {err}") from err
    if metadata.get("format") != FORMAT:
        raise InvalidOptimizerState(f"optimizer state file {str(path)!r} has format {metadata.get('format')!r}; "
                                    f"this version reads {FORMAT!r}.")
    numbers = {}
    for name in ("step", "warmup_from"):
        text = metadata.get(name, "")
        if not text.isdigit():
            raise InvalidOptimizerState(f"optimizer state file {str(path)!r} has `{name}` {text!r} in its metadata; "
                                        "expected a non-negative integer.")
        numbers[name] = int(text)
    return OptimizerState(numbers["step"], numbers["warmup_from"], dict(sorted(tensors.items())))


# -- in a model's optimizer ------------------------------------------------------------------------


def parameter_keys(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The model's trainable parameters under their adapter state keys (as ``model.lora.adapter_state``
    names them: PEFT drops the adapter's name, ``.default``, from the parameter's), sorted by key.
    A model without an adapter keeps its parameter names."""
    adapter_name = getattr(model, "active_adapter", None) if hasattr(model, "peft_config") else None
    keys: dict[str, torch.nn.Parameter] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = name.replace(f".{adapter_name}", "") if isinstance(adapter_name, str) else name
        if key in keys:
            raise InvalidOptimizerState(f"two trainable parameters map to the state key {key!r}.")
        keys[key] = param
    return dict(sorted(keys.items()))


def load_into_optimizer(optimizer: torch.optim.Optimizer, params: Mapping[str, torch.nn.Parameter],
                        state: OptimizerState) -> None:
    """Put ``state``'s moments into ``optimizer``'s per-parameter state by name, with ``step`` as
    every parameter's step, so AdamW's bias correction continues where the last hop stopped.

    Goes through ``Optimizer.load_state_dict``, which moves each tensor to its parameter's device
    and dtype and hosts ``step`` where a fused or capturable kernel wants it."""
    if not state.moments:
        return  # nothing carried yet: AdamW starts from zeros itself
    expected = {moment_key(key, m) for key in params for m in MOMENTS}
    missing, extra = expected - set(state.moments), set(state.moments) - expected
    if missing or extra:
        parts = ([f"missing {_names(missing)}"] if missing else []) + ([f"unexpected {_names(extra)}"] if extra else [])
        raise InvalidOptimizerState(f"optimizer moments do not match the model's trainable parameters: "
                                    f"{'; '.join(parts)}.")
    index = {id(p): i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])}
    per_param = {}
    for key, param in params.items():
        if id(param) not in index:
            raise InvalidOptimizerState(f"trainable parameter {key!r} is not in the optimizer.")
        avg, avg_sq = (state.moments[moment_key(key, m)] for m in MOMENTS)
        if avg.shape != param.shape or avg_sq.shape != param.shape:
            raise InvalidOptimizerState(f"optimizer moments of {key!r} have shape {tuple(avg.shape)}; the parameter's "
                                        f"is {tuple(param.shape)}.")
        per_param[index[id(param)]] = {"step": torch.tensor(float(state.step), dtype=torch.float32),
                                       "exp_avg": avg, "exp_avg_sq": avg_sq}
    current = optimizer.state_dict()
    optimizer.load_state_dict({"state": per_param, "param_groups": current["param_groups"]})


def optimizer_steps(optimizer: torch.optim.Optimizer) -> int:
    """The most steps any parameter of ``optimizer`` took (0 before the first): a CPU-GPU sync point."""
    steps = [state["step"] for state in optimizer.state.values() if "step" in state]
    return max((int(s.item() if isinstance(s, torch.Tensor) else s) for s in steps), default=0)


def export_from_optimizer(optimizer: torch.optim.Optimizer, params: Mapping[str, torch.nn.Parameter],
                          fallback: OptimizerState) -> dict[str, torch.Tensor]:
    """The optimizer's moments by name, float32 on the CPU; a parameter it holds no state for (no
    step yet) keeps ``fallback``'s moments, or zeros."""
    moments: dict[str, torch.Tensor] = {}
    for key, param in params.items():
        held = optimizer.state.get(param, {})
        for m in MOMENTS:
            name = moment_key(key, m)
            if m in held:
                moments[name] = held[m].detach().to("cpu", torch.float32).contiguous().clone()
            elif name in fallback.moments:
                moments[name] = fallback.moments[name].detach().to("cpu", torch.float32).contiguous().clone()
            else:
                moments[name] = torch.zeros(tuple(param.shape), dtype=torch.float32)
    return dict(sorted(moments.items()))
