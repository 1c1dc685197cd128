"""Base model factory: random-init Mamba / Mamba-2 from a config, or load a saved Hugging Face model.

Checkpoints are plain transformers models (``AutoModelForCausalLM.from_pretrained`` loads them), each
saved with its tokenizer and resolved config. Remote code never runs (``trust_remote_code=False``).

Execution path: transformers resolves each Mamba op once, when its modeling module is imported
(``use_kernel_func_from_hub_with_fallback``): the mamba-ssm / causal-conv1d implementation when that
package imports, else its PyTorch reference, kept as the op's ``__wrapped__``. For Mamba-2 the fused
training op is mamba-ssm's Triton SSD kernel (with causal-conv1d's CUDA conv inside); it still needs
``import mamba_ssm`` (its compiled extension), so there is no separate Triton-only path. Whether the
kernels can run is transformers' own check (``is_mamba_2_ssm_available`` / ``is_mamba_ssm_available``
and ``is_causal_conv1d_available``: CUDA and the packages installed) plus the packages having imported.

What stays ours: the kernels have no CPU code and transformers binds them for the whole process without
a device check, so once a kernel package imported the factory routes each op by device (``_by_device``):
a model on the CPU is always on the PyTorch path, even beside a CUDA model that runs the kernels. The
same routing holds ``model.kernels=never`` (the PyTorch path for the rest of the process).

Without the kernels transformers warns once per op that it falls back to PyTorch, which a CPU user
cannot act on; the factory drops those warnings and says it once per architecture, at info level,
with what to install on a GPU.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import logging
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from fedem_flwr.errors import ConfigError, KernelsUnavailable, ModelNotFound

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from fedem_flwr.config.schema import ModelConfig

log = logging.getLogger(__name__)

FEDEM_CONFIG_FILE = "fedem_config.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
REPO_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

# Each architecture's transformers module and transformers' check that its mamba-ssm kernels can run.
_ARCHS = {
    "mamba2": ("transformers.models.mamba2.modeling_mamba2", "is_mamba_2_ssm_available"),
    "mamba": ("transformers.models.mamba.modeling_mamba", "is_mamba_ssm_available"),
}
_KERNEL_PACKAGES = ("mamba_ssm", "causal_conv1d")
# transformers' fallback warning, filtered by its text: transformers offers no switch to turn it off.
_FALLBACK_WARNING = "is falling back to its reference PyTorch implementation"
_FALLBACK_LOGGER = "transformers.integrations.hub_kernels"
_pytorch_only: set[str] = set()  # architectures under `model.kernels=never`, for the rest of the process
_told_path: set[str] = set()


def _drop_fallback_warning(record: logging.LogRecord) -> bool:
    return _FALLBACK_WARNING not in record.getMessage()


def _say_kernel_path(arch: str) -> None:
    """Once per architecture and process: an info line when it runs its PyTorch path here."""
    fallback_log = logging.getLogger(_FALLBACK_LOGGER)  # transformers' own loggers are plain `logging` ones
    if _drop_fallback_warning not in fallback_log.filters:
        fallback_log.addFilter(_drop_fallback_warning)
    if arch in _told_path or arch in _pytorch_only:
        return
    _told_path.add(arch)
    if not kernels_available(arch):
        log.info("%s runs its PyTorch path here: correct, but slower than the fused kernels. On a CUDA GPU, "
                 "install them with `pip install 'fedem-flwr[gpu]'` (mamba-ssm, causal-conv1d).", arch)


def _kernels_imported(every: bool = True) -> bool:
    """Whether the kernel packages imported (``every``: both, else any). transformers binds an op to its
    package exactly when that package imports, at the first import of the Mamba module."""
    check = all if every else any
    return check(name in sys.modules for name in _KERNEL_PACKAGES)


def _on_cuda(args: tuple, kwargs: dict) -> bool:
    """Whether the first tensor argument lives on a CUDA device."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.is_cuda
    return False


def _by_device(op: Callable[..., Any], arch: str) -> Callable[..., Any]:
    """``op`` (transformers' kernel-or-reference op) for CUDA tensors, unless ``arch`` is held to the
    PyTorch path; its PyTorch reference for any other.

    transformers keeps the reference as ``op.__wrapped__`` and, without the kernel, calls it with
    only the keyword arguments it names, refusing packed sequences it cannot keep apart; so does this.
    """
    reference = op.__wrapped__
    accepted = frozenset(inspect.signature(reference).parameters)

    @functools.wraps(reference)
    def by_device(*args: Any, **kwargs: Any) -> Any:
        if arch not in _pytorch_only and _on_cuda(args, kwargs):
            return op(*args, **kwargs)
        if kwargs.get("cu_seqlens") is not None or kwargs.get("seq_idx") is not None:
            raise ValueError(f"`{reference.__name__}` on the PyTorch path cannot keep packed sequences apart "
                             "(`cu_seqlens` / `seq_idx` need the CUDA kernels).")
        return reference(*args, **{key: value for key, value in kwargs.items() if key in accepted})

    by_device.kernel_op = op  # type: ignore[attr-defined]
    return by_device


def _kernel_module(arch: str) -> Any:
    """transformers' Mamba module of ``arch``, imported (which binds the kernels whose packages import),
    with its ops routed by device once a kernel package imported (idempotent).

    The one reach into transformers: its modeling module calls each op by module-global name and
    binds it at import with no device check and no switch back, so routing means replacing those
    globals. Its ops are the module's own functions that keep a reference as ``__wrapped__``.
    """
    module = importlib.import_module(_ARCHS[arch][0])
    if not _kernels_imported(every=False):
        return module  # nothing bound: transformers' ops are its PyTorch references
    for name, op in list(vars(module).items()):
        if (inspect.isfunction(op) and op.__module__ == module.__name__ and hasattr(op, "__wrapped__")
                and not hasattr(op, "kernel_op")):
            setattr(module, name, _by_device(op, arch))
    return module


def kernels_available(arch: str = "mamba2") -> bool:
    """True when the fused kernels can run here: CUDA, mamba-ssm and causal-conv1d installed (transformers'
    own checks) and imported, so transformers bound them.

    Never looks for mamba-ssm on a machine without CUDA: transformers' checks look the package up (and
    import it when it has no metadata) before they ask for CUDA, so CUDA is asked first.
    """
    if arch not in _ARCHS:
        raise ConfigError(f"`model.arch` is {arch!r}; allowed: {', '.join(map(repr, _ARCHS))}.")
    if not torch.cuda.is_available():
        return False
    from transformers.utils import import_utils

    if not (getattr(import_utils, _ARCHS[arch][1])() and import_utils.is_causal_conv1d_available()):
        return False
    _kernel_module(arch)  # the import that binds them, if they import
    return _kernels_imported()


def kernel_path(model: "PreTrainedModel") -> str:
    """``"fused"`` when ``model``'s training forward runs the mamba-ssm kernels, else ``"pytorch"``."""
    arch = getattr(model.config, "model_type", None)
    param = next(iter(model.parameters()), None)
    if arch not in _ARCHS or arch in _pytorch_only or param is None or param.device.type != "cuda":
        return "pytorch"
    return "fused" if kernels_available(arch) else "pytorch"


def _apply_kernel_policy(cfg: "ModelConfig") -> None:
    """``never`` holds ``cfg.arch`` to the PyTorch path for the rest of the process; ``require`` refuses
    to build a model the kernels cannot run; every policy routes the ops by device."""
    if cfg.kernels == "require" and (cfg.arch in _pytorch_only or not kernels_available(cfg.arch)):
        reason = ("`model.kernels=never` already holds this process to the PyTorch path"
                  if cfg.arch in _pytorch_only else "CUDA is not available" if not torch.cuda.is_available()
                  else "mamba-ssm and causal-conv1d do not both import (install the `gpu` extra)")
        raise KernelsUnavailable(f"`model.kernels` is 'require' but {reason}; set `model.kernels=auto`.")
    held = cfg.kernels == "never" and cfg.arch not in _pytorch_only
    if held:
        _pytorch_only.add(cfg.arch)
    _kernel_module(cfg.arch)  # its import binds the kernels whose packages import; the routing holds `never`
    if held and _kernels_imported(every=False):
        log.warning("model.kernels=never: %s ops use their PyTorch reference in this process", cfg.arch)
    _say_kernel_path(cfg.arch)


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
    if model.config.model_type in _ARCHS:
        _kernel_module(model.config.model_type)  # a CPU copy of it must not reach the kernels
        _say_kernel_path(model.config.model_type)
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
