"""Base model factory: random-init Mamba / Mamba-2 from a config, or load a saved Hugging Face model.

Checkpoints are plain transformers models (``AutoModelForCausalLM.from_pretrained`` loads them), each
saved with its tokenizer and resolved config. Remote code never runs (``trust_remote_code=False``).

Execution path: transformers resolves each Mamba op once, when its modeling module is imported: the
mamba-ssm / causal-conv1d implementation when those packages import, else a PyTorch reference. For
Mamba-2 the fused training op is mamba-ssm's Triton SSD kernel (with causal-conv1d's CUDA conv
inside); it still needs ``import mamba_ssm`` (its compiled extension), so there is no separate
Triton-only path. The kernels have no CPU code and transformers binds them for the whole process
without a device check, so the factory rewraps each bound op to pick by device (``_by_device``): a
model on the CPU is always on the PyTorch path, even beside a CUDA model that runs the kernels.

Without the kernels transformers warns once per op that it falls back to PyTorch, which a CPU user
cannot act on; the factory drops those warnings and says it once per architecture, at info level,
with what to install on a GPU.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import json
import logging
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from fedem_flwr.errors import ConfigError, KernelsUnavailable, ModelNotFound

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from fedem_flwr.config.schema import ModelConfig

log = logging.getLogger(__name__)

FEDEM_CONFIG_FILE = "fedem_config.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
REPO_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

# The transformers module of each architecture and the ops that make its fused training path.
_KERNEL_OPS = {
    "mamba2": ("transformers.models.mamba2.modeling_mamba2",
               ("mamba2_split_conv1d_scan_combined", "causal_conv1d_fn")),
    "mamba": ("transformers.models.mamba.modeling_mamba", ("mamba_inner_fn", "causal_conv1d_fn")),
}
_KERNEL_PACKAGES = ("mamba_ssm", "causal_conv1d")
_FALLBACK_WARNING = "is falling back to its reference PyTorch implementation"
_FALLBACK_LOGGER = "transformers.integrations.hub_kernels"
_told_path: set[str] = set()


def _drop_fallback_warning(record: logging.LogRecord) -> bool:
    return _FALLBACK_WARNING not in record.getMessage()


def _say_kernel_path(arch: str, module: Any) -> None:
    """Once per architecture and process: an info line when its ops run on the PyTorch path."""
    fallback_log = logging.getLogger(_FALLBACK_LOGGER)  # transformers' own loggers are plain `logging` ones
    if _drop_fallback_warning not in fallback_log.filters:
        fallback_log.addFilter(_drop_fallback_warning)
    if arch in _told_path:
        return
    _told_path.add(arch)
    if not all(_uses_kernel(getattr(module, op, None)) for op in _KERNEL_OPS[arch][1]):
        log.info("%s runs its PyTorch path here: correct, but slower than the fused kernels. On a CUDA GPU, "
                 "install them with `pip install 'fedem-flwr[gpu]'` (mamba-ssm, causal-conv1d).", arch)


def _kernel_flag(op: Any) -> Optional[bool]:
    """For one of transformers' kernel-or-reference ops, whether it resolved to a package kernel;
    None for any other callable."""
    code, closure = getattr(op, "__code__", None), getattr(op, "__closure__", None)
    if code is None or not closure or "is_new_implementation" not in code.co_freevars:
        return None
    return bool(closure[code.co_freevars.index("is_new_implementation")].cell_contents)


def _uses_kernel(op: Any) -> bool:
    """Whether transformers resolved ``op`` to a package kernel rather than its PyTorch reference."""
    if hasattr(op, "kernel_op"):
        return _uses_kernel(op.kernel_op)  # our device dispatch: CUDA tensors go to this op
    flag = _kernel_flag(op)
    if flag is not None:
        return flag
    if not hasattr(op, "__wrapped__"):
        return False  # a plain function: the PyTorch reference itself
    # A wrapper of unknown layout: the kernel can only be in use if its package imported.
    return all(name in sys.modules for name in _KERNEL_PACKAGES)


def _is_bound_kernel_op(op: Any) -> bool:
    """One of transformers' kernel-or-reference ops, resolved to a package kernel."""
    return _kernel_flag(op) is True


def _on_cuda(args: tuple, kwargs: dict) -> bool:
    """Whether the first tensor argument lives on a CUDA device."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.is_cuda
    return False


def _by_device(op: Any) -> Any:
    """``op``, bound to a kernel, for CUDA tensors; transformers' PyTorch reference for any other.

    transformers keeps the reference as ``op.__wrapped__`` and, without the kernel, calls it with
    only the keyword arguments it names, refusing packed sequences it cannot keep apart; so does this.
    """
    reference = op.__wrapped__
    accepted = frozenset(inspect.signature(reference).parameters)

    @functools.wraps(reference)
    def by_device(*args: Any, **kwargs: Any) -> Any:
        if _on_cuda(args, kwargs):
            return op(*args, **kwargs)
        if kwargs.get("cu_seqlens") is not None or kwargs.get("seq_idx") is not None:
            raise ValueError(f"`{reference.__name__}` on the CPU cannot keep packed sequences apart "
                             "(`cu_seqlens` / `seq_idx` need the CUDA kernels).")
        return reference(*args, **{key: value for key, value in kwargs.items() if key in accepted})

    by_device.kernel_op = op
    return by_device


def _kernel_module(arch: str) -> Any:
    """transformers' Mamba module of ``arch``, imported, with each op it bound to a kernel made to
    pick by device (idempotent): the kernels have no device check of their own."""
    module = importlib.import_module(_KERNEL_OPS[arch][0])  # binds the kernels if their packages import
    for name, op in list(vars(module).items()):
        if _is_bound_kernel_op(op):
            setattr(module, name, _by_device(op))
    _say_kernel_path(arch, module)
    return module


def _ops_use_kernels(arch: str) -> bool:
    module = _kernel_module(arch)
    return all(_uses_kernel(getattr(module, op, None)) for op in _KERNEL_OPS[arch][1])


def kernels_available(arch: str = "mamba2") -> bool:
    """True when the fused kernels can run here: CUDA present and transformers resolved them.

    Never imports mamba-ssm on a machine without CUDA (its import needs the compiled CUDA extension).
    """
    if arch not in _KERNEL_OPS:
        raise ConfigError(f"`model.arch` is {arch!r}; allowed: {', '.join(map(repr, _KERNEL_OPS))}.")
    if not torch.cuda.is_available():
        return False
    if any(importlib.util.find_spec(name) is None for name in _KERNEL_PACKAGES):
        return False
    return _ops_use_kernels(arch)


def kernel_path(model: "PreTrainedModel") -> str:
    """``"fused"`` when ``model``'s training forward runs the mamba-ssm kernels, else ``"pytorch"``."""
    arch = getattr(model.config, "model_type", None)
    param = next(iter(model.parameters()), None)
    if arch not in _KERNEL_OPS or param is None or param.device.type != "cuda":
        return "pytorch"
    return "fused" if _ops_use_kernels(arch) else "pytorch"


def _disable_kernels(arch: str) -> None:
    """Point transformers' Mamba ops back at their PyTorch references, for the whole process.

    The module is imported first: its import is what binds the kernels, so returning early while it
    is not imported yet would let the next model build bind them after all.
    """
    module = importlib.import_module(_KERNEL_OPS[arch][0])
    replaced = [name for name, op in list(vars(module).items())
                if _is_bound_kernel_op(op) or hasattr(op, "kernel_op")]
    for name in replaced:
        setattr(module, name, getattr(module, name).__wrapped__)  # both wrappers keep the reference there
    if replaced:
        log.warning("model.kernels=never: %s ops use their PyTorch reference in this process", arch)


def _apply_kernel_policy(cfg: "ModelConfig") -> None:
    if cfg.kernels == "require" and not kernels_available(cfg.arch):
        reason = "CUDA is not available" if not torch.cuda.is_available() else (
            "mamba-ssm and causal-conv1d do not both import (install the `gpu` extra)")
        raise KernelsUnavailable(f"`model.kernels` is 'require' but {reason}; set `model.kernels=auto`.")
    if cfg.kernels == "never":
        _disable_kernels(cfg.arch)
    else:
        _kernel_module(cfg.arch)


def model_config(cfg: "ModelConfig", tokenizer: "PreTrainedTokenizerBase") -> Any:
    """The transformers config for ``cfg``, with vocabulary and special ids from ``tokenizer``."""
    from transformers import Mamba2Config, MambaConfig

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        state_size=cfg.state_size,
        expand=cfg.expand,
        conv_kernel=cfg.conv_kernel,
        pad_token_id=pad,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos,
        tie_word_embeddings=cfg.tie_word_embeddings,
    )
    if cfg.arch == "mamba":
        return MambaConfig(**common)
    return Mamba2Config(
        **common,
        num_heads=cfg.hidden_size * cfg.expand // cfg.head_dim,
        head_dim=cfg.head_dim,
        n_groups=cfg.n_groups,
        chunk_size=cfg.chunk_size,
    )


def build_model(cfg: "ModelConfig", tokenizer: "PreTrainedTokenizerBase", seed: int = 0) -> "PreTrainedModel":
    """A random-init model of ``cfg`` (same seed, same weights), or ``cfg.pretrained`` loaded."""
    _apply_kernel_policy(cfg)
    if cfg.pretrained:
        model, _ = load_base(cfg.pretrained, cfg.revision)
        if len(tokenizer) > model.config.vocab_size:
            raise ConfigError(
                f"`model.pretrained` {cfg.pretrained!r} has {model.config.vocab_size} embeddings but the "
                f"tokenizer has {len(tokenizer)} tokens; use the tokenizer saved with the model."
            )
        return model.to(_DTYPES[cfg.dtype])
    from transformers import Mamba2ForCausalLM, MambaForCausalLM

    model_cls = MambaForCausalLM if cfg.arch == "mamba" else Mamba2ForCausalLM
    config = model_config(cfg, tokenizer)
    with torch.random.fork_rng(devices=[]):  # reproducible without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = model_cls(config)
    return model.to(_DTYPES[cfg.dtype])


def load_base(path_or_repo: str, revision: Optional[str] = None) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """A saved base model and its tokenizer, from a local folder or a Hugging Face repo id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(path_or_repo).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelNotFound(f"base model folder {str(local)!r} has no config.json; it is not a saved model.")
        source = str(local)
    elif not is_repo_id(path_or_repo):
        raise ModelNotFound(f"base model folder {path_or_repo!r} does not exist (and is not a repo id).")
    else:
        source = path_or_repo
    try:
        model = AutoModelForCausalLM.from_pretrained(source, revision=revision, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=False)
    except (OSError, ValueError) as err:
        where = f"{source!r}" + (f" at revision {revision!r}" if revision else "")
        raise ModelNotFound(f"cannot load base model {where}: {err}") from err
    if model.config.model_type in _KERNEL_OPS:
        _kernel_module(model.config.model_type)  # a CPU copy of it must not reach the kernels
    return model, tokenizer


def save_base(
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    folder: Path,
    resolved_config: Optional[dict[str, Any]] = None,
) -> Path:
    """Save a loadable checkpoint: safetensors weights, config, tokenizer and the resolved config."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)  # transformers 5 writes safetensors only
    tokenizer.save_pretrained(folder)
    if resolved_config is not None:
        write_resolved_config(folder, resolved_config)
    return folder


def write_resolved_config(folder: Path, resolved_config: dict[str, Any]) -> None:
    """``fedem_config.json`` in ``folder``: the resolved config as sorted JSON, beside the artifact."""
    text = json.dumps(resolved_config, sort_keys=True, indent=2, default=str)
    (Path(folder) / FEDEM_CONFIG_FILE).write_text(text + "\n", encoding="utf-8")


def is_repo_id(text: str) -> bool:
    """Whether ``text`` reads as a Hugging Face repo id (``org/name``), never a path (no ``..``)."""
    return bool(REPO_ID_PATTERN.match(text)) and ".." not in text


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
