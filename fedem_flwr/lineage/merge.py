"""Merging accepted LoRA adapters into a new base: exact arithmetic on the deltas, and when to merge.

A LoRA adapter changes a target weight ``W`` by ``delta = (alpha / r) * B @ A``; for an ``embeddings``
target PEFT stores ``lora_embedding_A`` ([r, vocab]) and ``lora_embedding_B`` ([dim, r]) and the
delta is the transpose, ``(alpha / r) * (B @ A).T``, shaped like the embedding matrix. Merging adds
each absorbed adapter's delta, times its weight, into the base weights: the merged model then gives
the logits of base + adapter (one adapter) or of base + all of them (several).

API (torch; no registry, store or Flower):

- ``lora_deltas(state, lora_cfg) -> {base parameter name: delta}`` from an adapter state dict keyed
  as ``fedem_flwr.model.lora.adapter_state`` writes it.
- ``merge_adapters(base_model, adapters, lora_cfg, method, seed=, density=) -> MergeResult``: a new
  merged model (``base_model`` is left as it was) and the record of what it absorbed. Methods:
  ``sum`` (each delta added directly), ``cat`` and ``svd`` (PEFT ``add_weighted_adapter``, ``svd`` at
  rank = the sum of the ranks, then ``merge_and_unload``), all three exact; ``ties_svd`` and
  ``dare_ties_svd``: PEFT's TIES / DARE-TIES on the deltas (``peft.utils.merge_utils``, the
  combination PEFT's types of those names compute), added in full: TIES's trimmed, sign-elected sum
  is not low-rank, so re-factoring it at a LoRA rank (PEFT's ``svd`` step) would change it. DARE's
  draw runs under a seeded, forked torch RNG and the seed is recorded.

  PEFT's ``linear``, ``ties`` and ``dare_ties`` are not offered: they combine the ``A`` and ``B``
  matrices separately, and ``sum(w_i B_i) @ sum(w_i A_i)`` is not ``sum(w_i B_i @ A_i)``: it holds
  cross terms between adapters that no contributor trained (1.7-3.1 off in the logits on seshu-tiny).

When to merge and what a merge absorbs is pure policy, in ``lineage.policy``. Whether a merged model is published is the base gate's call: ``gate.acceptance.decide_base``.
"""

from __future__ import annotations

import copy
import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
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

    def record(self) -> dict[str, Any]:
        """The JSON-ready record of the merge (method, seed, absorbed adapters)."""
        return {"method": self.method, "seed": self.seed, "absorbed": [asdict(a) for a in self.absorbed]}


# -- arithmetic (torch) ----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Factors:
    A: "torch.Tensor"
    B: "torch.Tensor"
    embedding: bool

    def delta(self, scale: float) -> "torch.Tensor":
        product = self.B.float() @ self.A.float()
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
) -> MergeResult:
    """A copy of ``base_model`` with ``adapters`` merged by ``method`` (module doc); the input is untouched.

    ``seed`` seeds DARE's draw (``dare_ties_svd``); None draws a fresh one, recorded in the result.
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
    return MergeResult(model, absorbed, method, used_seed)


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
        if method == "sum":
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
