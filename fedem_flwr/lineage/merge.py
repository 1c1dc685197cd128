"""Merging accepted LoRA adapters into a new base: exact arithmetic on the deltas, and when to merge.

A LoRA adapter changes a target weight ``W`` by ``delta = (alpha / r) * B @ A``; for an ``embeddings``
target PEFT stores ``lora_embedding_A`` ([r, vocab]) and ``lora_embedding_B`` ([dim, r]) and the
delta is the transpose, ``(alpha / r) * (B @ A).T``, shaped like the embedding matrix. Merging adds
each absorbed adapter's delta, times its weight, into the base weights: the merged model then gives
the logits of base + adapter (one adapter) or of base + all of them (several).

API (torch; no registry, store or Flower):

- ``lora_deltas(state, lora_cfg) -> {base parameter name: delta}`` from an adapter state dict keyed
  as ``fedem_flwr.model.lora.adapter_state`` writes it.
- ``merge_adapters(base_model, adapters, lora_cfg, method, seed=, density=, scale=) -> MergeResult``: a
  new merged model (``base_model`` is left as it was) and the record of what it absorbed. Methods:
  ``sum`` (each delta added directly, times its weight), ``mean`` (``scale`` times the weighted mean
  of the deltas: the weights are normalised to sum to 1, then computed exactly as ``sum``), ``cat``
  and ``svd`` (PEFT ``add_weighted_adapter``, ``svd`` at rank = the sum of the ranks, then
  ``merge_and_unload``), all exact; ``ties_svd`` and
  ``dare_ties_svd``: PEFT's TIES / DARE-TIES on the deltas (``peft.utils.merge_utils``, the
  combination PEFT's types of those names compute), added in full: TIES's trimmed, sign-elected sum
  is not low-rank, so re-factoring it at a LoRA rank (PEFT's ``svd`` step) would change it. DARE's
  draw runs under a seeded, forked torch RNG and the seed is recorded. Each ``Absorbed`` row's
  ``weight`` is the factor its delta entered the base with (for ``mean``: ``scale * w_i / sum(w)``).

  PEFT's ``linear``, ``ties`` and ``dare_ties`` are not offered: they combine the ``A`` and ``B``
  matrices separately, and ``sum(w_i B_i) @ sum(w_i A_i)`` is not ``sum(w_i B_i @ A_i)``: it holds
  cross terms between adapters that no contributor trained (1.7-3.1 off in the logits on seshu-tiny).

- ``weight_change(merged_model, base_model, targets) -> {target: merged - base}``: the change a merge
  made (``M``), whatever the method, in float32 on the CPU: what was really added, roundings included.
- ``rebase_residual(state, change, lora_cfg) -> Residual``: an absorbed adapter re-expressed on the
  merged base (DESIGN decision 21). Its residual ``R = delta - M`` on each target is truncated to the
  adapter's rank by SVD (the best rank-``r`` approximation, Eckart-Young) and split back into its own
  ``A`` and ``B`` at its ``alpha / r``, so new base + new adapter is old base + old adapter up to the
  truncation, which is reported per target and overall (``||R - R_r|| / ||R||`` and absolute).
  With ``merge.rebase=residual`` every adapter carrying trained work is rebased so, absorbed or not (an
  adapter not absorbed has no share in ``M`` and subtracts it whole).
- ``factor_deltas(deltas, like_state, lora_cfg) -> Residual``: per-target deltas (weight units) as an
  adapter state shaped like ``like_state``: each truncated to rank ``r`` and split at ``alpha / r``, as
  ``rebase_residual`` does with its residuals.
- ``update_state(current, pushed, start, lora_cfg, weight, overlap) -> Residual``: a push whose lease
  started from ``start`` applied to the adapter's ``current`` version as the change it made (DESIGN
  decision 20): ``current + weight * (pushed - start)`` per target in weight space (exact, float64), or,
  given the other lanes' accepted changes since ``start`` (``overlap``), mixed with them as FedAsync
  mixes models; then ``factor_deltas``.

When to merge and what a merge absorbs is pure policy, in ``lineage.policy``. Whether a merged model is
published is the base gate's call: ``gate.acceptance.decide_base`` (the base alone) and, when absorbed
adapters continue from their residuals, ``gate.acceptance.decide_adapted`` (each one's languages).
"""

from __future__ import annotations

import copy
import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Optional

from fedem_flwr.config.schema import MERGE_METHODS
from fedem_flwr.errors import FedemError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from fedem_flwr.config.schema import LoraConfig

_PREFIX = "base_model.model."
_SUFFIXES = {  # adapter key suffix -> (factor, embedding form)
    ".lora_A.weight": ("A", False),
    ".lora_B.weight": ("B", False),
    ".lora_embedding_A": ("A", True),
    ".lora_embedding_B": ("B", True),
}


class MergeError(FedemError, ValueError):
    """Adapters cannot be merged into this base as asked (keys, shapes, ties, method, values)."""


@dataclass(frozen=True)
class WeightedAdapter:
    """One adapter to absorb: its name, current version, state (``adapter_state`` keys) and weight."""

    name: str
    version: int
    state: Mapping[str, "torch.Tensor"]
    weight: float = 1.0


@dataclass(frozen=True)
class Absorbed:
    """What the record of a merged base says about one absorbed adapter."""

    name: str
    version: int
    weight: float
    method: str


@dataclass(frozen=True)
class MergeResult:
    """A merged model (a new object) and what it absorbed; ``seed`` is DARE's, else None."""

    model: "PreTrainedModel"
    absorbed: tuple[Absorbed, ...]
    method: str
    seed: Optional[int]
    scale: Optional[float] = None  # `mean`'s scale, else None
    targets: tuple[str, ...] = ()  # the base parameters the merge changed

    def record(self) -> dict[str, Any]:
        """The JSON-ready record of the merge (method, seed, ``mean``'s scale, absorbed adapters)."""
        out: dict[str, Any] = {"method": self.method, "seed": self.seed}
        if self.scale is not None:
            out["scale"] = self.scale
        return {**out, "absorbed": [asdict(a) for a in self.absorbed]}


@dataclass(frozen=True)
class Residual:
    """Deltas factored back into an adapter state (``factor_deltas``: a residual on a merged base, or a push
    added to a moved version): the new state (the input's keys, shapes and dtypes) and how much of the
    deltas ``R`` the truncation to rank ``r`` lost.

    ``errors``: per target, ``{"absolute": ||R - R_r||, "relative": that / ||R|| (0 when R = 0),
    "norm": ||R||}`` (Frobenius, in weight units); ``absolute`` / ``relative`` are over all targets.
    """

    state: dict[str, "torch.Tensor"]
    errors: dict[str, dict[str, float]]
    absolute: float
    relative: float

    def record(self) -> dict[str, Any]:
        """The JSON-ready summary: overall errors and the target with the largest relative error."""
        worst = max(self.errors, key=lambda t: (self.errors[t]["relative"], t), default=None)
        norm = math.sqrt(math.fsum(e["norm"] ** 2 for e in self.errors.values()))
        return {"relative": self.relative, "absolute": self.absolute, "norm": norm,
                "worst_target": worst, "worst_relative": self.errors[worst]["relative"] if worst else 0.0}


# -- arithmetic (torch) ----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Factors:
    A: "torch.Tensor"
    B: "torch.Tensor"
    embedding: bool

    def delta(self, scale: float) -> "torch.Tensor":
        product = self.B.float() @ self.A.float()
        return scale * (product.T if self.embedding else product)

    def delta64(self, scale: float) -> "torch.Tensor":
        """The delta in float64 on the CPU (weight orientation), for arithmetic that must not round."""
        import torch

        product = self.B.detach().to("cpu", torch.float64) @ self.A.detach().to("cpu", torch.float64)
        return scale * (product.T if self.embedding else product)


def _factors(state: Mapping[str, "torch.Tensor"], lora_cfg: "LoraConfig") -> dict[str, _Factors]:
    """The (A, B) pair of each target, keyed by the base parameter it changes; checked."""
    parts: dict[str, dict[str, Any]] = {}
    for key, value in state.items():
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if suffix is None or not key.startswith(_PREFIX):
            raise MergeError(f"adapter key {key!r} is not a LoRA A/B weight under {_PREFIX!r}.")
        factor, embedding = _SUFFIXES[suffix]
        target = parts.setdefault(key[len(_PREFIX):-len(suffix)] + ".weight", {"embedding": embedding})
        if target["embedding"] != embedding:
            raise MergeError(f"adapter key {key!r} mixes embedding and linear LoRA weights on one target.")
        target[factor] = value
    pairs = {}
    for name, target in sorted(parts.items()):
        if "A" not in target or "B" not in target:
            raise MergeError(f"adapter target {name!r} has only lora_{'A' if 'A' in target else 'B'}.")
        A, B = target["A"], target["B"]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != lora_cfg.r or B.shape[1] != lora_cfg.r:
            raise MergeError(f"adapter target {name!r} has A {tuple(A.shape)} and B {tuple(B.shape)}; "
                             f"`lora.r` is {lora_cfg.r}.")
        pairs[name] = _Factors(A, B, target["embedding"])
    return pairs


def lora_deltas(state: Mapping[str, "torch.Tensor"], lora_cfg: "LoraConfig") -> dict[str, "torch.Tensor"]:
    """Each target's delta ``(alpha / r) * B @ A`` (transposed for embeddings), in float32."""
    scale = lora_cfg.alpha / lora_cfg.r
    return {name: factors.delta(scale) for name, factors in _factors(state, lora_cfg).items()}


def merge_adapters(
    base_model: "PreTrainedModel",
    adapters: Sequence[WeightedAdapter],
    lora_cfg: "LoraConfig",
    method: str = "sum",
    *,
    seed: Optional[int] = None,
    density: float = 0.5,
    scale: float = 1.0,
) -> MergeResult:
    """A copy of ``base_model`` with ``adapters`` merged by ``method`` (module doc); the input is untouched.

    ``seed`` seeds DARE's draw (``dare_ties_svd``); None draws a fresh one, recorded in the result.
    ``scale`` multiplies ``mean``'s weighted mean (its weights must be >= 0 with a positive sum).
    Raises ``MergeError`` when the adapters do not fit the base or the merged weights are not finite.
    """
    import torch

    if method not in MERGE_METHODS:
        raise MergeError(f"`merge.method` is {method!r}; allowed: {', '.join(map(repr, MERGE_METHODS))}.")
    if not adapters:
        raise MergeError("no adapters to merge.")
    names = [a.name for a in adapters]
    if len(set(names)) != len(names):
        raise MergeError(f"adapter names repeat in {names}; each adapter is absorbed once.")
    for adapter in adapters:
        if not math.isfinite(adapter.weight):
            raise MergeError(f"adapter {adapter.name!r} has weight {adapter.weight!r}; it must be finite.")
    if method == "mean":
        adapters = _mean_weighted(adapters, scale)
    factors = [_factors(a.state, lora_cfg) for a in adapters]
    targets = sorted(set().union(*factors))
    _check_fit(base_model, targets, factors, names)

    used_seed = None
    if method == "dare_ties_svd":
        used_seed = secrets.randbits(63) if seed is None else int(seed)
    # PEFT's init and DARE's draw use a forked RNG (CPU and the model's CUDA devices), not the caller's.
    devices = sorted({p.device.index or 0 for p in base_model.parameters() if p.device.type == "cuda"})
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        if used_seed is not None:
            torch.manual_seed(used_seed)
        if method in ("cat", "svd"):
            model = _merge_with_peft(base_model, adapters, lora_cfg, method)
        else:
            model = copy.deepcopy(base_model)
            _add_deltas(model, adapters, factors, targets, lora_cfg, method, density)
    params = dict(model.named_parameters(remove_duplicate=False))
    # A float64 sum is finite exactly when every float32/16 element is (it cannot overflow), and on a
    # CPU it runs an order of magnitude faster than isfinite().all().
    bad = [name for name in targets if not torch.isfinite(params[name].detach().sum(dtype=torch.float64))]
    if bad:
        raise MergeError(f"merged weights are not finite on {bad}; nothing is merged.")
    absorbed = tuple(Absorbed(a.name, int(a.version), float(a.weight), method) for a in adapters)
    return MergeResult(model, absorbed, method, used_seed, float(scale) if method == "mean" else None,
                       tuple(targets))


def _mean_weighted(adapters: Sequence[WeightedAdapter], scale: float) -> list[WeightedAdapter]:
    """``mean``'s weights as the factors of a ``sum``: ``scale * w_i / sum(w)``."""
    if not (math.isfinite(scale) and scale > 0):
        raise MergeError(f"`merge.scale` is {scale!r}; it must be a finite number > 0.")
    negative = [a.name for a in adapters if a.weight < 0]
    total = math.fsum(a.weight for a in adapters)
    if negative or not total > 0:
        raise MergeError(f"`mean` needs weights >= 0 with a positive sum; got "
                         f"{ {a.name: a.weight for a in adapters} }.")
    return [replace(a, weight=scale * a.weight / total) for a in adapters]


def _check_fit(model: "PreTrainedModel", targets: list[str], factors: list[dict[str, _Factors]],
               names: list[str]) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    for target in targets:
        if target not in params:
            raise MergeError(f"adapter target {target!r} is not a parameter of the base model.")
        for name, pairs in zip(names, factors):
            if target in pairs:
                f = pairs[target]
                shape = (f.A.shape[1], f.B.shape[0]) if f.embedding else (f.B.shape[0], f.A.shape[1])
                if tuple(params[target].shape) != shape:
                    raise MergeError(f"adapter {name!r} changes {target!r} by a {shape} delta; the base "
                                     f"weight is {tuple(params[target].shape)}.")
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and embeddings.weight.data_ptr() == head.weight.data_ptr()
    if tied and any(params[t].data_ptr() == embeddings.weight.data_ptr() for t in targets):
        raise MergeError(
            "the base ties its embeddings and lm_head, and an adapter targets one of them: merging its "
            "delta into the shared matrix would change the other too, so the merge would not be exact; "
            "target `in_proj` only on a tied base."
        )


def _add_deltas(model: "PreTrainedModel", adapters: Sequence[WeightedAdapter], factors: list[dict[str, _Factors]],
                targets: list[str], lora_cfg: "LoraConfig", method: str, density: float) -> None:
    """Add the weighted deltas target by target, in float32, so memory holds one target's deltas."""
    import torch
    from peft.utils.merge_utils import dare_ties, ties

    scale = lora_cfg.alpha / lora_cfg.r
    params = dict(model.named_parameters(remove_duplicate=False))
    for target in targets:  # sorted: DARE draws in the same order on every run
        param = params[target]
        # A float32 copy is updated in place; a lower-precision one is summed in float32, cast once.
        in_place = param.dtype == torch.float32
        merged = param.detach() if in_place else param.detach().float()
        present = [(a.weight, pairs[target]) for a, pairs in zip(adapters, factors) if target in pairs]
        if method in ("sum", "mean"):  # `mean`'s weights arrive normalised and scaled
            # sum_i w_i s B_i @ A_i is one product of the stacked factors [w_i s B_i] @ [A_i]: one pass
            # over the weight however many adapters, and no delta materialised.
            lhs = torch.cat([weight * scale * f.B.float() for weight, f in present], dim=1).to(merged.device)
            rhs = torch.cat([f.A.float() for _, f in present], dim=0).to(merged.device)
            if present[0][1].embedding:  # the delta is (B @ A).T = A.T @ B.T
                lhs, rhs = rhs.T, lhs.T
            merged.addmm_(lhs, rhs)
        else:
            combine = ties if method == "ties_svd" else dare_ties
            deltas = [f.delta(scale).to(merged.device) for _, f in present]
            merged += combine(deltas, torch.tensor([w for w, _ in present], device=merged.device), density)
        if not in_place:
            param.copy_(merged)


def _merge_with_peft(base_model: "PreTrainedModel", adapters: Sequence[WeightedAdapter],
                     lora_cfg: "LoraConfig", method: str) -> "PreTrainedModel":
    """PEFT's exact combinations: ``cat``, or ``svd`` at the sum of the ranks; then merge and unload."""
    import peft
    from peft import set_peft_model_state_dict

    from fedem_flwr.model.lora import peft_config

    names = [f"absorb{i}" for i in range(len(adapters))]  # PEFT module keys, not user text
    model = peft.get_peft_model(copy.deepcopy(base_model), peft_config(lora_cfg), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, peft_config(lora_cfg))
    for name, adapter in zip(names, adapters):
        result = set_peft_model_state_dict(model, dict(adapter.state), adapter_name=name)
        unexpected = [key for key in getattr(result, "unexpected_keys", []) if "lora_" in key]
        if unexpected:
            raise MergeError(f"adapter {adapter.name!r} has keys PEFT cannot place: {unexpected[:3]}.")
    model.base_model.add_weighted_adapter(
        names, [float(a.weight) for a in adapters], "merged", combination_type=method,
        svd_rank=lora_cfg.r * len(adapters) if method == "svd" else None,
    )
    return model.merge_and_unload(adapter_names=["merged"])


# -- an absorbed adapter continues on the merged base from its residual (torch) ---------------------
def weight_change(merged_model: "PreTrainedModel", base_model: "PreTrainedModel",
                  targets: Sequence[str]) -> dict[str, "torch.Tensor"]:
    """What a merge added to each of ``targets`` (``M``): merged minus base weight, float32, on the CPU.

    Taken from the weights themselves, so it is what any method really added, the rounding of a
    lower-precision base included: an adapter rebased on it reproduces the old base + adapter exactly.
    """
    import torch

    merged = dict(merged_model.named_parameters(remove_duplicate=False))
    base = dict(base_model.named_parameters(remove_duplicate=False))
    missing = [t for t in targets if t not in merged or t not in base]
    if missing:
        raise MergeError(f"targets {missing} are not parameters of both the merged and the base model.")
    with torch.no_grad():
        return {t: merged[t].detach().to("cpu", torch.float32) - base[t].detach().to("cpu", torch.float32)
                for t in targets}


def rebase_residual(state: Mapping[str, "torch.Tensor"], change: Mapping[str, "torch.Tensor"],
                    lora_cfg: "LoraConfig") -> Residual:
    """``state`` re-expressed on a base that ``change`` (``weight_change``) moved: its residual
    ``R = delta - M`` per target, truncated to rank ``r`` and split into its own ``A`` and ``B``
    (``factor_deltas``). A target the adapter does not hold cannot take its residual ``-M``: it counts
    as lost in full. Computed in float64 on the CPU; raises ``MergeError`` on non-finite values or a
    change shaped unlike the delta.
    """
    import torch

    scale = lora_cfg.alpha / lora_cfg.r
    factors = _factors(state, lora_cfg)
    residuals: dict[str, torch.Tensor] = {}
    for target, f in factors.items():
        with torch.no_grad():
            residual = f.delta64(scale)
            if target in change:
                moved = change[target].detach().to("cpu", torch.float64)
                if moved.shape != residual.shape:
                    raise MergeError(f"the merge changed {target!r} by a {tuple(moved.shape)} matrix; the "
                                     f"adapter's delta there is {tuple(residual.shape)}.")
                residual = residual - moved
            if not bool(torch.isfinite(residual).all()):
                raise MergeError(f"the residual on {target!r} is not finite; the adapter cannot be rebased.")
        residuals[target] = residual
    fitted = factor_deltas(residuals, state, lora_cfg)
    errors = dict(fitted.errors)
    for target in sorted(set(change) - set(factors)):  # the adapter has no factors there to hold -M
        norm = float(torch.linalg.vector_norm(change[target].detach().to("cpu", torch.float64)))
        errors[target] = {"absolute": norm, "relative": 1.0 if norm > 0 else 0.0, "norm": norm}
    return _with_errors(fitted.state, errors)


def update_state(current: Mapping[str, "torch.Tensor"], pushed: Mapping[str, "torch.Tensor"],
                 start: Mapping[str, "torch.Tensor"], lora_cfg: "LoraConfig", weight: float = 1.0,
                 overlap: Sequence[tuple[Mapping[str, "torch.Tensor"], Mapping[str, "torch.Tensor"]]] = ()
                 ) -> Residual:
    """A push applied as an update (DESIGN decision 20): its lease started from ``start``, the adapter is
    now at ``current``; per target, in weight space (float64, exact),
    ``current + weight * ((pushed - start) - sum(after - before for before, after in overlap))``, factored
    back to rank ``r`` like ``pushed`` (``factor_deltas``).

    Without ``overlap`` the push's change is added (scaled by ``weight``). ``overlap`` holds the changes
    other lanes' accepted pushes made since ``start`` (each version and its parent): when they are all
    that moved the adapter, this is ``(1 - weight) * current + weight * pushed``, FedAsync's mixing of the
    stale model into the current one, which keeps what lanes trained in common once instead of adding it
    once per lane. A rebase in between (a new base) is no lane's change: it stays out of ``overlap`` and
    is kept whole. The errors say what the truncation lost. Raises ``MergeError`` when the states do not
    hold the same targets or ``weight`` is not in (0, 1] with ``overlap``, > 0 without.
    """
    if not (math.isfinite(weight) and weight > 0) or (overlap and weight > 1):
        raise MergeError(f"the update's `weight` is {weight!r}; it must be a finite number > 0"
                         f"{' and at most 1 when it mixes' if overlap else ''}.")
    scale = lora_cfg.alpha / lora_cfg.r
    now, new, old = (_factors(s, lora_cfg) for s in (current, pushed, start))
    pairs = [(_factors(before, lora_cfg), _factors(after, lora_cfg)) for before, after in overlap]
    if not set(now) == set(new) == set(old) or any(set(b) != set(now) or set(a) != set(now) for b, a in pairs):
        raise MergeError(f"the pushed, start and current states (or the lanes' changes since) hold different "
                         f"targets: {sorted(new)}, {sorted(old)}, {sorted(now)}.")
    deltas = {}
    for t in sorted(now):
        change = new[t].delta64(scale) - old[t].delta64(scale)
        for before, after in pairs:
            change = change - (after[t].delta64(scale) - before[t].delta64(scale))
        deltas[t] = now[t].delta64(scale) + weight * change
    return factor_deltas(deltas, pushed, lora_cfg)


def factor_deltas(deltas: Mapping[str, "torch.Tensor"], like_state: Mapping[str, "torch.Tensor"],
                  lora_cfg: "LoraConfig") -> Residual:
    """``deltas`` (one per target of ``like_state``, in weight units and orientation, as ``lora_deltas``
    gives them) as an adapter state with ``like_state``'s keys, shapes, dtypes and devices.

    With ``D ~= U S V^T`` (its ``r`` largest singular values) and ``s = alpha / r``, ``B @ A`` is
    ``U (S / s) V^T`` (transposed for ``embeddings``), split balanced (``sqrt(S / s)`` on each side) except
    that each rank slot keeps, on the factor PEFT initialises non-zero (``A`` on linear targets, ``B`` on
    ``embeddings``), at least the RMS slot norm that factor has in ``like_state``: a slot whose delta is
    zero is then left as PEFT leaves a fresh one (that factor non-zero, the other exactly zero), still
    trainable, and not dead with both factors zero. The product does not depend on the split. Computed
    in float64 on the CPU; raises ``MergeError`` on a missing, extra, misshapen or non-finite delta.
    """
    import torch

    scale = lora_cfg.alpha / lora_cfg.r
    factors = _factors(like_state, lora_cfg)
    if set(deltas) != set(factors):
        raise MergeError(f"the deltas are on {sorted(deltas)}; the adapter's targets are {sorted(factors)}.")
    out: dict[str, torch.Tensor] = {}
    errors: dict[str, dict[str, float]] = {}
    for target, f in factors.items():
        shape = (f.A.shape[1], f.B.shape[0]) if f.embedding else (f.B.shape[0], f.A.shape[1])
        with torch.no_grad():
            delta = deltas[target].detach().to("cpu", torch.float64)
            if tuple(delta.shape) != shape:
                raise MergeError(f"the delta on {target!r} is {tuple(delta.shape)}; the adapter's is {shape}.")
            if not bool(torch.isfinite(delta).all()):
                raise MergeError(f"the delta on {target!r} is not finite; it cannot be factored.")
            A, B, lost, norm = _best_rank(delta.T if f.embedding else delta, f, lora_cfg.r, scale)
        prefix = _PREFIX + target[: -len(".weight")]
        a_key, b_key = ((prefix + ".lora_embedding_A", prefix + ".lora_embedding_B") if f.embedding
                        else (prefix + ".lora_A.weight", prefix + ".lora_B.weight"))
        out[a_key] = A.to(like_state[a_key].device, like_state[a_key].dtype).contiguous()
        out[b_key] = B.to(like_state[b_key].device, like_state[b_key].dtype).contiguous()
        errors[target] = {"absolute": lost, "relative": lost / norm if norm > 0 else 0.0, "norm": norm}
    return _with_errors({key: out[key] for key in like_state}, errors)


def _with_errors(state: dict[str, "torch.Tensor"], errors: dict[str, dict[str, float]]) -> Residual:
    """A ``Residual`` whose overall errors are summed from the per-target ones."""
    lost = math.sqrt(math.fsum(e["absolute"] ** 2 for e in errors.values()))
    total = math.sqrt(math.fsum(e["norm"] ** 2 for e in errors.values()))
    return Residual(state, errors, lost, lost / total if total > 0 else 0.0)


def _best_rank(residual: "torch.Tensor", f: _Factors, r: int, scale: float
               ) -> tuple["torch.Tensor", "torch.Tensor", float, float]:
    """``(A, B, ||R - R_r||, ||R||)`` for ``residual`` in the ``B @ A`` orientation (float64): ``scale *
    B @ A`` is its best rank-``r`` approximation, split as ``factor_deltas`` says."""
    import torch

    U, S, Vh = torch.linalg.svd(residual / scale, full_matrices=False)
    norm = float(torch.linalg.vector_norm(S)) * scale
    lost = float(torch.linalg.vector_norm(S[r:])) * scale
    k = min(r, S.numel())
    U, S, Vh = U[:, :k], S[:k], Vh[:k]
    # The factor PEFT starts non-zero keeps its slots' current RMS norm at least (PEFT's init norm
    # when it is all zero: kaiming-uniform rows of norm sqrt(1/3) for A, N(0, 1) columns for B).
    live = f.B.detach().double().norm(dim=0) if f.embedding else f.A.detach().double().norm(dim=1)
    floor = float(live.square().mean().sqrt()) if live.numel() else 0.0
    if not floor > 0:
        floor = math.sqrt(f.B.shape[0]) if f.embedding else math.sqrt(1.0 / 3.0)
    kept = torch.clamp(S.sqrt(), min=floor)
    other = S / kept
    b, a = (kept, other) if f.embedding else (other, kept)
    A = torch.zeros(r, Vh.shape[1], dtype=torch.float64)
    B = torch.zeros(U.shape[0], r, dtype=torch.float64)
    A[:k] = a[:, None] * Vh
    B[:, :k] = U * b[None, :]
    return A, B, lost, norm
