"""Typed schema of the composed configuration; every check lives in ``__post_init__``.

Hydra 1.3 needs omegaconf < 2.4, which has no ``Literal`` fields: choices are ``str`` plus a check.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Optional

from fedem_flwr.errors import ConfigError, UnsafeLoraTarget


def _choice(section: str, key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(
            f"`{section}.{key}` is {value!r}; allowed: {', '.join(repr(a) for a in allowed)}."
        )


def _positive(section: str, key: str, value: Optional[float], allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"`{section}.{key}` is {value!r}; it must be {bound}.")


def _fraction(section: str, key: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"`{section}.{key}` is {value!r}; it must be in [0, 1).")


@dataclass
class ModelConfig:
    name: str = "seshu-tiny"
    arch: str = field(default="mamba2", metadata={"help": "`mamba2` (default) or `mamba`."})
    pretrained: Optional[str] = field(
        default=None, metadata={"help": "Local folder or Hugging Face repo id to load instead of building."}
    )
    revision: Optional[str] = None
    hidden_size: int = 64
    num_hidden_layers: int = 2
    state_size: int = 16
    expand: int = 2
    head_dim: int = 16
    n_groups: int = 1
    conv_kernel: int = 4
    chunk_size: int = 64
    dtype: str = "float32"
    tie_word_embeddings: bool = field(
        default=False, metadata={"help": "Share embeddings and lm_head; off so LoRA can target each alone."}
    )
    kernels: str = field(
        default="auto", metadata={"help": "`auto` uses fused kernels when they import, `never`, `require`."}
    )

    def __post_init__(self) -> None:
        _choice("model", "arch", self.arch, ("mamba2", "mamba"))
        _choice("model", "dtype", self.dtype, ("float32", "bfloat16", "float16"))
        _choice("model", "kernels", self.kernels, ("auto", "never", "require"))
        for key in ("hidden_size", "num_hidden_layers", "state_size", "expand", "head_dim",
                    "n_groups", "conv_kernel", "chunk_size"):
            _positive("model", key, getattr(self, key))
        if self.arch == "mamba2" and (self.hidden_size * self.expand) % self.head_dim:
            raise ConfigError(
                f"`model.head_dim` ({self.head_dim}) must divide hidden_size * expand "
                f"({self.hidden_size * self.expand}) for Mamba-2."
            )


@dataclass
class TokenizerConfig:
    kind: str = field(default="bytes", metadata={"help": "`bytes` (built locally) or `pretrained`."})
    path: Optional[str] = field(default=None, metadata={"help": "Folder or repo id when kind=pretrained."})
    bpe_merges: int = field(default=0, metadata={"help": "BPE merges trained on the corpus over the bytes; 0 = none."})
    model_max_length: int = 4096
    chat: bool = field(
        default=True,
        metadata={"help": "Give a `bytes` tokenizer the role tokens and chat template `sft-chat` adapters need "
                          "(4 more tokens; off reproduces the 260-token vocabulary of earlier hubs)."},
    )

    def __post_init__(self) -> None:
        _choice("tokenizer", "kind", self.kind, ("bytes", "pretrained"))
        if self.kind == "pretrained" and not self.path:
            raise ConfigError("`tokenizer.path` must be set when `tokenizer.kind` is 'pretrained'.")
        _positive("tokenizer", "bpe_merges", self.bpe_merges, allow_zero=True)


@dataclass
class DataConfig:
    source: str = field(default="chatterbot", metadata={"help": "`chatterbot`, `files` or `hub`."})
    paths: list[str] = field(default_factory=list)
    hub_id: Optional[str] = None
    hub_split: str = "train"
    languages: list[str] = field(default_factory=list, metadata={"help": "Keep only these; empty = all."})
    text_column: str = "text"
    language_column: str = "language"
    messages_column: str = field(
        default="messages",
        metadata={"help": "Column of a JSON/Parquet file holding a conversation (a list of role/content turns): "
                          "its rows serve `sft-chat` adapters, and as flat text the language's own."},
    )
    domain_column: str = field(default="domain", metadata={"help": "Optional column tagging a row's domain."})
    partitioner: str = field(default="language", metadata={"help": "`language`, `iid` or `dirichlet`."})
    dirichlet_alpha: float = 0.5
    block_size: int = 128
    heldout_fraction: float = 0.1
    test_fraction: float = field(
        default=0.0,
        metadata={"help": "Share of each language's text kept out of everything a run does (training, gate, "
                          "merges, CPT), for a study's final numbers; 0 = none (a real hub)."},
    )
    min_heldout_blocks: int = 2
    min_language_bytes: int = field(
        default=4096, metadata={"help": "Languages with less text get no adapter of their own."}
    )

    def __post_init__(self) -> None:
        _choice("data", "source", self.source, ("chatterbot", "files", "hub"))
        _choice("data", "partitioner", self.partitioner, ("language", "iid", "dirichlet"))
        if self.source == "files" and not self.paths:
            raise ConfigError("`data.paths` must list at least one file when `data.source` is 'files'.")
        if self.source == "hub" and not self.hub_id:
            raise ConfigError("`data.hub_id` must be set when `data.source` is 'hub'.")
        _positive("data", "dirichlet_alpha", self.dirichlet_alpha)
        _positive("data", "block_size", self.block_size)
        _fraction("data", "heldout_fraction", self.heldout_fraction)
        _fraction("data", "test_fraction", self.test_fraction)
        if self.heldout_fraction + self.test_fraction >= 1.0:
            raise ConfigError(
                f"`data.heldout_fraction` + `data.test_fraction` is {self.heldout_fraction + self.test_fraction!r}; "
                "it must leave some text to train on (below 1)."
            )
        if self.block_size < 2:
            raise ConfigError(f"`data.block_size` is {self.block_size!r}; a block needs at least 2 tokens.")
        if self.min_heldout_blocks < 2:
            raise ConfigError(
                f"`data.min_heldout_blocks` is {self.min_heldout_blocks!r}; held-out data needs at least 2 blocks."
            )
        _positive("data", "min_language_bytes", self.min_language_bytes, allow_zero=True)


# LoRA targets that train on every execution path (DESIGN 7).
SAFE_TARGETS = ("in_proj", "embeddings", "lm_head")

_WHY = (
    "the fused Mamba kernels read x_proj/dt_proj/out_proj weights directly (LoRA there gets no "
    "gradient), PEFT refuses out_proj/conv1d on Mamba models, and adapters relay between CPU and GPU "
    "nodes, so every target must train on both paths"
)


def check_targets(targets: Iterable[str]) -> None:
    """Refuse any LoRA target outside ``SAFE_TARGETS`` (exact module names, no regex)."""
    if isinstance(targets, str):
        raise UnsafeLoraTarget(
            f"`lora.target_modules` is the string {targets!r}; give a list of names from {list(SAFE_TARGETS)}."
        )
    targets = list(targets)
    if not targets:
        raise UnsafeLoraTarget(f"`lora.target_modules` is empty; name at least one of {list(SAFE_TARGETS)}.")
    for target in targets:
        if target not in SAFE_TARGETS:
            raise UnsafeLoraTarget(
                f"`lora.target_modules` contains {target!r}, which is not safe on every execution path; "
                f"allowed: {list(SAFE_TARGETS)}. Why: {_WHY}."
            )



@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["in_proj"])

    def __post_init__(self) -> None:
        _positive("lora", "r", self.r)
        _positive("lora", "alpha", self.alpha)
        _fraction("lora", "dropout", self.dropout)
        check_targets(self.target_modules)


CARRY_MODES = ("none", "schedule", "moments")


@dataclass
class TrainConfig:
    max_steps: int = field(default=50, metadata={"help": "Optimizer steps; also the cosine schedule's length."})
    max_seconds: Optional[float] = None
    batch_size: int = field(default=8, metadata={"help": "Blocks per micro-step; a step is batch_size * grad_accum."})
    grad_accum: int = 1
    lr: float = field(default=1e-2, metadata={"help": "Peak learning rate (LoRA on seshu-tiny; lower for bigger models)."})
    min_lr_ratio: float = 0.1
    warmup_steps: int = 5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    precision: str = field(
        default="auto", metadata={"help": "`auto` (bf16 autocast on a GPU with native bf16, else fp32), `fp32`, `bf16`, `fp16`."}
    )
    device: str = field(default="auto", metadata={"help": "`auto`, `cpu`, `cuda`, `cuda:N` or `mps`."})
    gradient_checkpointing: bool = False
    auto_batch_size: bool = field(
        default=False, metadata={"help": "On CUDA: largest micro-batch (up to the step's batch) that fits."}
    )
    eval_batch_size: int = 16
    progress: bool = True
    carry: str = field(
        default="schedule",
        metadata={"help": "What of the optimizer travels with a relayed adapter across hops: `none` (a fresh "
                          "AdamW and schedule per lease), `schedule` (one schedule over the adapter's total steps) "
                          "or `moments` (the schedule and AdamW's moments)."},
    )
    horizon_steps: Optional[int] = field(
        default=None,
        metadata={"help": "With `carry` schedule/moments (and in FedAvg's rounds): cosine to `min_lr_ratio` over "
                          "this many total steps of the adapter; null = constant after the warmup."},
    )
    rebase_moments: str = field(
        default="reset",
        metadata={"help": "A re-projected adapter's AdamW moments on a new base: `reset` (zero) or `prune` "
                          "(keep the largest 1%, as ReLoRA)."},
    )
    rebase_warmup_steps: int = field(
        default=5, metadata={"help": "Steps of re-warmup after a new base re-projected the adapter (carry=moments)."}
    )

    def __post_init__(self) -> None:
        _choice("train", "precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        _choice("train", "carry", self.carry, CARRY_MODES)
        _choice("train", "rebase_moments", self.rebase_moments, ("reset", "prune"))
        _positive("train", "horizon_steps", self.horizon_steps)
        _positive("train", "rebase_warmup_steps", self.rebase_warmup_steps, allow_zero=True)
        for key in ("max_steps", "batch_size", "grad_accum", "lr", "eval_batch_size"):
            _positive("train", key, getattr(self, key))
        _positive("train", "max_seconds", self.max_seconds)
        _positive("train", "warmup_steps", self.warmup_steps, allow_zero=True)
        _positive("train", "weight_decay", self.weight_decay, allow_zero=True)
        _positive("train", "grad_clip", self.grad_clip, allow_zero=True)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"`train.min_lr_ratio` is {self.min_lr_ratio!r}; it must be in [0, 1].")


@dataclass
class CptConfig:
    """Continuous pretraining of the base on the hub's own corpus, in slices between relay loop turns."""

    enabled: bool = field(default=False, metadata={"help": "Run CPT slices on the hub between relay turns."})
    slice_s: float = field(
        default=2.0, metadata={"help": "Seconds a slice may take; it starts no step that would end later."}
    )
    margin: float = field(
        default=0.0, metadata={"help": "A checkpoint's token-weighted loss must beat the current base's by this."}
    )
    tolerance: float = field(
        default=0.05, metadata={"help": "No language of a published checkpoint may be worse than the current base's by more."}
    )
    pause_s: float = field(
        default=0.0,
        metadata={"help": "Seconds of relay between two slices: caps CPT's share of the hub's time (a hub whose "
                          "CPU also serves its nodes, as in a simulation, needs some)."},
    )
    checkpoint_every: int = field(
        default=200, metadata={"help": "Optimizer steps between checkpoints (gated, then published as a base)."}
    )
    lr: float = field(default=3e-4, metadata={"help": "Peak learning rate of the whole-model AdamW."})
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    max_steps: int = field(
        default=10000, metadata={"help": "Length of the cosine schedule; past it the rate stays at its minimum."}
    )
    batch_size: int = field(default=8, metadata={"help": "Blocks per micro-step; a step is batch_size * grad_accum."})
    grad_accum: int = 1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    train_layers: list[str] = field(
        default_factory=list,
        metadata={"help": "Glob patterns of parameter names to train (e.g. `backbone.layers.1.*`); empty = all."},
    )
    precision: str = field(
        default="auto",
        metadata={"help": "`auto` (bf16 autocast on a GPU with native bf16, else fp32), `fp32`, `bf16`."},
    )
    device: str = field(default="auto", metadata={"help": "`auto`, `cpu`, `cuda`, `cuda:N` or `mps`."})

    def __post_init__(self) -> None:
        # fp16 would need a loss scaler whose state persists too; bf16 needs none.
        _choice("cpt", "precision", self.precision, ("auto", "fp32", "bf16"))
        for key in ("slice_s", "checkpoint_every", "lr", "max_steps", "batch_size", "grad_accum"):
            value = getattr(self, key)
            if value is None or not math.isfinite(value):
                raise ConfigError(f"`cpt.{key}` is {value!r}; it must be a finite number > 0.")
            _positive("cpt", key, value)
        for key in ("warmup_steps", "weight_decay", "grad_clip", "pause_s", "margin", "tolerance"):
            _positive("cpt", key, getattr(self, key), allow_zero=True)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"`cpt.min_lr_ratio` is {self.min_lr_ratio!r}; it must be in [0, 1].")
        if self.warmup_steps >= self.max_steps:
            raise ConfigError(
                f"`cpt.warmup_steps` ({self.warmup_steps}) must be below `cpt.max_steps` ({self.max_steps})."
            )
        for pattern in self.train_layers:
            if not isinstance(pattern, str) or not pattern.strip():
                raise ConfigError(
                    f"`cpt.train_layers` holds {pattern!r}; each entry must be a non-empty glob over "
                    "parameter names, e.g. 'backbone.layers.1.*'."
                )


@dataclass
class RelayConfig:
    lease_ttl_s: float = 10800.0
    sweep_interval_s: float = 300.0
    policy: str = field(
        default="fair",
        metadata={"help": "`random`, `round-robin`, `least-recent`, `language` or `fair` (language affinity, "
                          "then the adapter furthest behind its share of tokens)."},
    )
    policy_fallback: str = field(
        default="least-recent",
        metadata={"help": "What `language` uses among matches: `random`, `round-robin` or `least-recent`."},
    )
    fair_max_lead: Optional[int] = field(
        default=None,
        metadata={"help": "With `fair`: an adapter more than this many tokens ahead of the one furthest behind "
                          "(among those being trained or trainable now) waits for it; null = never waits."},
    )
    lanes: int = field(
        default=1,
        metadata={"help": "How many nodes may hold one adapter at once, each from its latest accepted version; "
                          "a push lands as the change it made, applied to whatever the adapter is by then."},
    )
    lane_update: str = field(
        default="add",
        metadata={"help": "How a push lands on a version other lanes moved on: `mix` (FedAsync: current + w * "
                          "(pushed - current), what lanes trained in common counted once) or `add` (current + w * "
                          "(pushed - start)); w is the staleness weight."},
    )
    staleness_power: float = field(
        default=1.0,
        metadata={"help": "A push that lands s accepted pushes after its lease began gets weight (1 + s) ** "
                          "-staleness_power (FedAsync's polynomial staleness); 1 with `mix` is a running mean."},
    )
    no_node_grace_s: float = 60.0
    poll_interval_s: float = 1.0
    max_accepted: Optional[int] = None
    max_wall_s: Optional[float] = None
    drain_s: float = field(
        default=0.0, metadata={"help": "When the relay stops, wait this long for trains in flight to come back."}
    )
    deadline_margin_s: float = field(
        default=60.0, metadata={"help": "A client stops training this long before its lease deadline."}
    )
    backoff_s: float = field(
        default=30.0, metadata={"help": "A node that failed waits this long before its next lease, doubling per failure."}
    )
    backoff_max_s: float = field(
        default=3600.0, metadata={"help": "The longest a failing node waits between leases."}
    )

    def __post_init__(self) -> None:
        _choice("relay", "policy", self.policy, ("random", "round-robin", "least-recent", "language", "fair"))
        _choice("relay", "policy_fallback", self.policy_fallback, ("random", "round-robin", "least-recent"))
        for key in ("lease_ttl_s", "sweep_interval_s", "poll_interval_s", "max_accepted", "max_wall_s", "backoff_s",
                    "backoff_max_s"):
            _positive("relay", key, getattr(self, key))
        _positive("relay", "no_node_grace_s", self.no_node_grace_s, allow_zero=True)
        _positive("relay", "fair_max_lead", self.fair_max_lead, allow_zero=True)
        _choice("relay", "lane_update", self.lane_update, ("mix", "add"))
        if (isinstance(self.staleness_power, bool) or not isinstance(self.staleness_power, (int, float))
                or not math.isfinite(self.staleness_power) or self.staleness_power < 0):
            raise ConfigError(f"`relay.staleness_power` is {self.staleness_power!r}; it must be a number >= 0 "
                              "(0: a push lands in full however stale).")
        if isinstance(self.lanes, bool) or not isinstance(self.lanes, int) or self.lanes < 1:
            raise ConfigError(f"`relay.lanes` is {self.lanes!r}; it must be a whole number >= 1 (1: one holder "
                              "per adapter, the FedEm rule).")
        _positive("relay", "deadline_margin_s", self.deadline_margin_s, allow_zero=True)
        _positive("relay", "drain_s", self.drain_s, allow_zero=True)
        if self.deadline_margin_s >= self.lease_ttl_s:
            raise ConfigError(
                f"`relay.deadline_margin_s` ({self.deadline_margin_s}) must be below "
                f"`relay.lease_ttl_s` ({self.lease_ttl_s})."
            )
        if self.backoff_max_s < self.backoff_s:
            raise ConfigError(
                f"`relay.backoff_max_s` ({self.backoff_max_s}) must be at least `relay.backoff_s` ({self.backoff_s})."
            )


@dataclass
class GateConfig:
    margin: float = field(default=0.0, metadata={"help": "Required held-out loss gain on own languages."})
    tolerance: float = field(default=0.05, metadata={"help": "Allowed loss increase on other languages."})
    check_others: bool = field(
        default=False,
        metadata={"help": "Also hold every other language within `tolerance` of the parent (off: an adapter serves "
                          "its own languages; the merge gate judges what a merge does to the others)."},
    )
    weighting: str = field(
        default="tokens", metadata={"help": "Own-language loss: `tokens` (held-out token weighted) or `mean`."}
    )
    max_eval_blocks: int = field(
        default=64, metadata={"help": "Held-out blocks per language the hub evaluates each push on."}
    )
    min_change: float = field(
        default=1e-6,
        metadata={"help": "A push whose weights all lie within this of its parent's (max |delta|) is `unchanged`."},
    )
    # Judged by peers (docs/peers.md): idle contributors evaluate a push blind on their own held-out rows.
    peers: int = field(
        default=0, metadata={"help": "Peers asked to judge each push on their own held-out rows; 0 = the hub alone."}
    )
    peer_wait_s: float = field(
        default=300.0,
        metadata={"help": "A push waits at most this long for its peers, then is judged on what came in."},
    )
    peer_min: int = field(default=2, metadata={"help": "Peer reports needed before peers count at all."})
    peer_min_tokens: int = field(
        default=256, metadata={"help": "Tokens the counted peer reports must hold together before peers count."}
    )
    peer_aggregate: str = field(
        default="median",
        metadata={"help": "How peers' paired differences combine: `median` (weighted) or `trimmed` (trimmed mean)."},
    )
    peer_trim: float = field(
        default=0.2, metadata={"help": "`trimmed`: share of reports cut from each end (at least one of three)."}
    )
    peer_tolerance: float = field(
        default=0.05, metadata={"help": "Peers veto a push they show worse than its parent by more than this."}
    )
    hub_min_tokens: int = field(
        default=1024,
        metadata={"help": "Held-out tokens the hub needs on a push's own sets to decide (peers may veto); "
                          "below, peers decide."},
    )
    peer_decide: str = field(
        default="peers",
        metadata={"help": "Where the hub has too little text: `peers` decide alone, or `pooled` with the hub's own "
                          "result, weighted by tokens."},
    )
    peer_holdout: Optional[float] = field(
        default=None,
        metadata={"help": "Share of a node's rows kept out of training to judge peers on; null: 0.1 when "
                          "`gate.peers` > 0, else 0."},
    )
    peer_min_weight: float = field(
        default=0.25, metadata={"help": "A peer whose standing (share of agreeing reports) falls below is not asked."}
    )

    def __post_init__(self) -> None:
        _positive("gate", "max_eval_blocks", self.max_eval_blocks)
        for key in ("margin", "tolerance", "min_change", "peer_wait_s", "peer_tolerance"):
            value = getattr(self, key)
            if not math.isfinite(value):
                raise ConfigError(f"`gate.{key}` is {value!r}; it must be a finite number >= 0.")
            _positive("gate", key, value, allow_zero=True)
        _choice("gate", "weighting", self.weighting, ("tokens", "mean"))
        for key in ("peers", "peer_min", "peer_min_tokens", "hub_min_tokens"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"`gate.{key}` is {value!r}; it must be a whole number >= 0.")
        _choice("gate", "peer_aggregate", self.peer_aggregate, ("median", "trimmed"))
        _choice("gate", "peer_decide", self.peer_decide, ("peers", "pooled"))
        if not 0.0 <= self.peer_trim < 0.5:
            raise ConfigError(f"`gate.peer_trim` is {self.peer_trim!r}; it must be in [0, 0.5).")
        _fraction("gate", "peer_min_weight", self.peer_min_weight)
        if self.peer_holdout is not None:
            _fraction("gate", "peer_holdout", self.peer_holdout)
        if self.peers > 0 and self.peer_min > self.peers:
            raise ConfigError(f"`gate.peer_min` is {self.peer_min} but `gate.peers` asks only {self.peers}: "
                              "peers would never count. Lower `gate.peer_min` or ask more peers.")
        if self.peers > 0 and self.holdout_share == 0.0:
            raise ConfigError("`gate.peers` asks peers to judge on held-out rows but `gate.peer_holdout` is 0: "
                              "nodes would hold none out. Set it above 0 or leave it null.")

    @property
    def holdout_share(self) -> float:
        """The share of its rows a node keeps out of training to judge peers' pushes on."""
        if self.peer_holdout is not None:
            return float(self.peer_holdout)
        return 0.1 if self.peers > 0 else 0.0


# PEFT combination types that mix lora_A and lora_B separately instead of the deltas B @ A.
_AB_SEPARATE = ("linear", "ties", "dare_ties", "dare_linear", "magnitude_prune")
MERGE_METHODS = ("sum", "mean", "cat", "svd", "ties_svd", "dare_ties_svd")


@dataclass
class MergeConfig:
    every_accepted: Optional[int] = field(
        default=10, metadata={"help": "Merge after this many accepted contributions since the last attempt; null = off."}
    )
    every_s: Optional[float] = field(
        default=86400.0, metadata={"help": "Merge this many seconds after the last attempt (if work was accepted); null = off."}
    )
    method: str = field(
        default="mean",
        metadata={"help": "`sum` (each delta added), `mean` (`scale` times the weighted mean of the deltas), "
                          "`cat`, `svd` (PEFT, exact), `ties_svd`, `dare_ties_svd`."},
    )
    scale: float = field(
        default=0.5, metadata={"help": "`mean`: the merged delta is scale * sum(w_i * delta_i), weights summing to 1."}
    )
    rebase: str = field(
        default="residual",
        metadata={"help": "What an absorbed adapter continues from on the new base: `zero` (a fresh LoRA) or "
                          "`residual` (its delta minus the merged one, truncated to its rank by SVD)."},
    )
    margin: float = field(
        default=0.0, metadata={"help": "Loss gain over all languages a merged base needs over the current one."}
    )
    tolerance: float = field(
        default=0.05,
        metadata={"help": "Allowed loss increase on any one language: of the merged base alone (rebase `zero`), or "
                          "of each absorbed language's adapted model (rebase `residual`)."},
    )
    density: float = field(default=0.5, metadata={"help": "Fraction of each delta kept by `ties_svd` / `dare_ties_svd`."})
    seed: Optional[int] = field(
        default=None, metadata={"help": "Seed of DARE's draw; null = a fresh one per merge (always recorded)."}
    )
    weights: dict[str, float] = field(
        default_factory=dict, metadata={"help": "Weight per adapter name; absent adapters weigh 1."}
    )

    def __post_init__(self) -> None:
        if self.method in _AB_SEPARATE:
            raise ConfigError(
                f"`merge.method` is {self.method!r}: PEFT's `{self.method}` combines lora_A and lora_B "
                "separately, which is not a combination of the deltas B @ A and changes what each adapter "
                f"learned; allowed: {', '.join(repr(m) for m in MERGE_METHODS)}."
            )
        _choice("merge", "method", self.method, MERGE_METHODS)
        _choice("merge", "rebase", self.rebase, ("zero", "residual"))
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ConfigError(f"`merge.scale` is {self.scale!r}; it must be a finite number > 0.")
        _positive("merge", "every_accepted", self.every_accepted)
        _positive("merge", "every_s", self.every_s)
        for key in ("margin", "tolerance"):
            value = getattr(self, key)
            if not math.isfinite(value):
                raise ConfigError(f"`merge.{key}` is {value!r}; it must be a finite number >= 0.")
            _positive("merge", key, value, allow_zero=True)
        if not 0.0 < self.density <= 1.0:
            raise ConfigError(f"`merge.density` is {self.density!r}; it must be in (0, 1].")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ConfigError(f"`merge.seed` is {self.seed!r}; it must be in [0, 2**63) or null.")
        for name, weight in self.weights.items():
            if not (math.isfinite(weight) and weight > 0):
                raise ConfigError(f"`merge.weights.{name}` is {weight!r}; it must be a finite number > 0.")

    def weight(self, adapter: str) -> float:
        """The merge weight of ``adapter``: ``weights[adapter]``, else 1."""
        return float(self.weights.get(adapter, 1.0))


@dataclass
class RetentionConfig:
    """What the hub's local store keeps (``hub.retention``); what is still needed is never removed."""

    bases: Optional[int] = field(
        default=None, metadata={"help": "Newest base versions kept in the local store; null = all."})
    adapter_versions: Optional[int] = field(
        default=None, metadata={"help": "Newest versions of each adapter kept in the local store; null = all."})
    publish_first: bool = field(
        default=False,
        metadata={"help": "Never remove a version `fedem publish` has not pushed yet (a hub that publishes)."})

    def __post_init__(self) -> None:
        for key in ("bases", "adapter_versions"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"`hub.retention.{key}` is {value!r}; it must be an integer >= 1 or null (keep all).")


@dataclass
class BackupConfig:
    """Snapshots the running hub takes of itself (``hub.backup``; ``fedem backup`` takes one on demand)."""

    dir: Optional[str] = field(
        default=None, metadata={"help": "Absolute folder the hub writes its snapshots to; null = none on its own."})
    every_s: Optional[float] = field(
        default=None, metadata={"help": "Seconds between snapshots the running hub takes; null = only on request."})
    key_file: Optional[str] = field(
        default=None, metadata={"help": "File holding the passphrase or key that encrypts the hub's secret."})
    keep: int = field(default=7, metadata={"help": "Snapshots kept in `dir`; older ones are removed."})

    def __post_init__(self) -> None:
        _positive("hub.backup", "every_s", self.every_s)
        _positive("hub.backup", "keep", self.keep)
        for key in ("dir", "key_file"):
            value = getattr(self, key)
            if value and not os.path.isabs(value):
                raise ConfigError(f"`hub.backup.{key}` is {value!r}; it must be an absolute path (the ServerApp "
                                  "runs in the SuperLink's working directory).")
        if self.every_s is not None and not (self.dir and self.key_file):
            raise ConfigError("`hub.backup.every_s` is set: the hub needs `hub.backup.dir` and "
                              "`hub.backup.key_file` to write its snapshots.")


@dataclass
class HubConfig:
    path: Optional[str] = field(
        default=None, metadata={"help": "Hub state folder; else $FEDEM_HUB, else the per-user default."}
    )
    store: str = field(default="local", metadata={"help": "`local` folder or `hf` (Hugging Face Hub)."})
    repo_prefix: str = "fedem"
    private: bool = False
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    backup: BackupConfig = field(default_factory=BackupConfig)

    def __post_init__(self) -> None:
        _choice("hub", "store", self.store, ("local", "hf"))
        if self.path and not os.path.isabs(self.path):
            raise ConfigError(
                f"`hub.path` is {self.path!r}; it must be an absolute path: under `flwr run` the ServerApp "
                "runs in the SuperLink's working directory and environment, not the caller's."
            )
        if not self.repo_prefix:
            raise ConfigError("`hub.repo_prefix` must not be empty.")


SIM_METHODS = ("relay", "fedavg-language", "fedavg-global")


@dataclass
class SimConfig:
    """What a `flwr run` simulation simulates: its clock, its virtual contributors, its method and
    its token budget (``fedem_flwr.simulation``). Ignored on a real SuperLink."""

    method: str = field(
        default="relay",
        metadata={"help": "`relay`, `fedavg-language` (Flower's FedAvg per language adapter) or `fedavg-global` "
                          "(one adapter, as FlowerTune)."},
    )
    clock: str = field(
        default="real", metadata={"help": "`real`, or `virtual`: training takes simulated time and waiting none."}
    )
    max_tokens: Optional[int] = field(
        default=None, metadata={"help": "Stop once this many tokens were trained, wasted work included; null = no budget."}
    )
    max_jump_s: float = field(
        default=300.0, metadata={"help": "Longest step of the virtual clock when no event is due sooner."}
    )
    speed: float = field(
        default=0.01, metadata={"help": "Median optimizer steps per simulated second of a contributor."}
    )
    speed_sigma: float = field(
        default=0.5, metadata={"help": "Spread of speeds across contributors (sigma of a log-normal); 0 = all alike."}
    )
    jitter_sigma: float = field(
        default=0.2, metadata={"help": "Spread of one lease's duration around the contributor's speed (log-normal)."}
    )
    availability: str = field(
        default="always", metadata={"help": "`always`, or `daily`: online for part of every `period_s`, at its own hour."}
    )
    online_fraction: float = field(
        default=0.5, metadata={"help": "Mean share of each period a `daily` contributor is online."}
    )
    period_s: float = 86400.0
    vanish_prob: float = field(
        default=0.0, metadata={"help": "Chance that a contributor vanishes mid-lease (offline until its next window)."}
    )
    away_s: float = field(
        default=3600.0, metadata={"help": "How long a vanished `always` contributor stays away."}
    )
    heartbeat_s: float = field(
        default=60.0, metadata={"help": "Simulated seconds before the SuperLink reports a silent node gone."}
    )
    message_ttl_s: float = field(
        default=3600.0, metadata={"help": "Flower's TTL of a message in real seconds under a virtual clock (a safety bound)."}
    )
    fedavg_fraction: float = field(
        default=1.0, metadata={"help": "Share of the online contributors FedAvg samples each round."}
    )
    hub_cpt_speed: float = field(
        default=0.05, metadata={"help": "CPT optimizer steps the hub runs per simulated second (virtual clock)."}
    )
    chat_loss: str = field(
        default="response",
        metadata={"help": "What the baselines train a chat adapter on: `response` (SFT: the assistant's tokens), "
                          "`all` (every token of the rendered chat) or `flat` (the conversations as plain text)."},
    )
    harmful_share: float = field(
        default=0.0,
        metadata={"help": "Share of contributors (drawn by seed) that are harmful: a broken or malicious contributor "
                          "whose pushed adapter the simulation scales by `harm_scale`."},
    )
    harm_scale: float = field(
        default=8.0, metadata={"help": "A harmful contributor's pushes have every `lora_B` (so B @ A) scaled by it."}
    )
    peer_eval_cost: str = field(
        default="scored",
        metadata={"help": "What a peer evaluation costs its contributor in simulated time: `scored` (the tokens "
                          "its report says it scored) or `max-blocks` (every block it may score: an upper bound)."},
    )
    score_decisions: bool = field(
        default=False,
        metadata={"help": "Judge every concluded push afterwards on the test split (measurement only, an evaluation "
                          "of candidate and parent a push): was accepting or rejecting it right?"},
    )

    def __post_init__(self) -> None:
        _choice("sim", "method", self.method, SIM_METHODS)
        _choice("sim", "chat_loss", self.chat_loss, ("response", "all", "flat"))
        _choice("sim", "clock", self.clock, ("real", "virtual"))
        _choice("sim", "availability", self.availability, ("always", "daily"))
        _positive("sim", "max_tokens", self.max_tokens)
        for key in ("max_jump_s", "speed", "period_s", "away_s", "heartbeat_s", "message_ttl_s", "hub_cpt_speed"):
            value = getattr(self, key)
            if value is None or not math.isfinite(value):
                raise ConfigError(f"`sim.{key}` is {value!r}; it must be a finite number > 0.")
            _positive("sim", key, value)
        for key in ("speed_sigma", "jitter_sigma"):
            value = getattr(self, key)
            if not (math.isfinite(value) and 0.0 <= value <= 3.0):
                raise ConfigError(f"`sim.{key}` is {value!r}; it must be in [0, 3].")
        _fraction("sim", "vanish_prob", self.vanish_prob)
        for key in ("online_fraction", "fedavg_fraction"):
            value = getattr(self, key)
            if not 0.0 < value <= 1.0:
                raise ConfigError(f"`sim.{key}` is {value!r}; it must be in (0, 1].")
        if self.method != "relay" and self.clock != "virtual":
            raise ConfigError(f"`sim.method={self.method}` runs on the virtual clock only: set `sim.clock=virtual`.")
        _choice("sim", "peer_eval_cost", self.peer_eval_cost, ("max-blocks", "scored"))
        if not (isinstance(self.harmful_share, (int, float)) and 0.0 <= self.harmful_share <= 1.0):
            raise ConfigError(f"`sim.harmful_share` is {self.harmful_share!r}; it must be a share in [0, 1].")
        if not (isinstance(self.harm_scale, (int, float)) and math.isfinite(self.harm_scale)):
            raise ConfigError(f"`sim.harm_scale` is {self.harm_scale!r}; it must be a finite number (1 = harmless).")
        if (self.harmful_share > 0 or self.score_decisions) and self.clock != "virtual":
            raise ConfigError("`sim.harmful_share` and `sim.score_decisions` act on the virtual clock's grid only: "
                              "set `sim.clock=virtual`, or leave them at 0 and false.")


# What each task trains on: a task adapter is served by rows of this format (``fedem_flwr.data.tasks``).
TASK_FORMATS = {"causal-lm": "text", "sft-chat": "chat"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass
class CatalogEntry:
    """One adapter the hub operator declares (``conf/catalog``): what it is trained on and judged by."""

    name: str = field(default="", metadata={"help": "The adapter's name (its repo is `<prefix>-<name>`)."})
    task: str = field(default="causal-lm", metadata={"help": f"One of {', '.join(TASK_FORMATS)}."})
    languages: list[str] = field(default_factory=list, metadata={"help": "Language codes it serves."})
    domain: str = field(default="", metadata={"help": "Only rows tagged with this domain; empty = every row."})
    merge: Optional[bool] = field(
        default=None,
        metadata={"help": "May merges absorb it into the base? null: `causal-lm` adapters yes, task adapters no."},
    )
    margin: Optional[float] = field(default=None, metadata={"help": "Its own `gate.margin`; null = the gate's."})
    tolerance: Optional[float] = field(default=None, metadata={"help": "Its own `gate.tolerance`; null = the gate's."})

    def __post_init__(self) -> None:
        where = f"catalog adapter {self.name!r}"
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ConfigError(
                f"`catalog.adapters` entry has name {self.name!r}; a name is 1-64 letters, digits, '-', '_' or '.', "
                "starting with a letter or digit (it names the adapter's repo)."
            )
        if self.task not in TASK_FORMATS:
            raise ConfigError(
                f"{where}: unknown task {self.task!r}. Task must be one of {', '.join(repr(t) for t in TASK_FORMATS)}."
            )
        if not self.languages:
            raise ConfigError(f"{where}: `languages` is empty; name the language codes it serves, e.g. ['hi'].")
        if len(set(self.languages)) != len(self.languages):
            raise ConfigError(f"{where}: `languages` {list(self.languages)} names a language twice.")
        if self.domain and not _NAME.match(self.domain):
            raise ConfigError(f"{where}: `domain` {self.domain!r} is not a plain tag (letters, digits, '-', '_', '.').")
        for key in ("margin", "tolerance"):
            value = getattr(self, key)
            if value is not None and (not math.isfinite(value) or value < 0):
                raise ConfigError(f"{where}: `{key}` is {value!r}; it must be a finite number >= 0 (or null).")

    @property
    def data_format(self) -> str:
        return TASK_FORMATS[self.task]

    @property
    def mergeable(self) -> bool:
        return self.task == "causal-lm" if self.merge is None else bool(self.merge)


@dataclass
class CatalogConfig:
    per_language: bool = field(
        default=True,
        metadata={"help": "One `causal-lm` adapter per language with at least `data.min_language_bytes` of text, "
                          "named by its language code (the hub's adapters before catalogs existed)."},
    )
    adapters: list[CatalogEntry] = field(default_factory=list, metadata={"help": "Adapters declared by name."})

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for entry in self.adapters:
            if entry.name in seen:
                raise ConfigError(f"`catalog.adapters` declares {entry.name!r} twice; adapter names are unique.")
            seen.add(entry.name)

    def entry(self, name: str) -> Optional[CatalogEntry]:
        return next((e for e in self.adapters if e.name == name), None)


@dataclass
class FedemConfig:
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    cpt: CptConfig = field(default_factory=CptConfig)
    sim: SimConfig = field(default_factory=SimConfig)
    catalog: CatalogConfig = field(default_factory=CatalogConfig)
