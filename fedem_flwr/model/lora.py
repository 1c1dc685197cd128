"""LoRA adapters on the Mamba base: attach, extract, load, save as standard PEFT folders.

Only targets that train on every execution path are allowed (``SAFE_TARGETS``): an adapter relays
between CPU and GPU nodes, so a target that works on one node must not silently stop learning on
the next. The fused training kernels read ``x_proj`` / ``dt_proj`` / ``out_proj`` weights directly
(LoRA there gets no gradient), transformers applies ``dt_proj`` as a raw ``weight @ x`` on every
path, and PEFT itself refuses ``out_proj`` / ``conv1d`` on Mamba models.

Adapters rest as safetensors and never as pickles; the embedding and output matrices of the base
are never copied into an adapter (PEFT would by default, when they are targeted).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from fedem_flwr.config.schema import check_targets
from fedem_flwr.errors import ConfigError, InvalidAdapter
from fedem_flwr.model.adapter_spec import AdapterSpec, load_adapter_file, validate_adapter_state
from fedem_flwr.model.factory import is_repo_id, write_resolved_config

if TYPE_CHECKING:
    import peft
    import torch
    from transformers import PreTrainedModel

    from fedem_flwr.config.schema import LoraConfig

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"

def peft_config(cfg: "LoraConfig") -> "peft.LoraConfig":
    """The PEFT config for ``cfg``, with the target modules spelled out."""
    import peft

    check_targets(cfg.target_modules)
    return peft.LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach_lora(model: "PreTrainedModel", cfg: "LoraConfig", seed: Optional[int] = None) -> "peft.PeftModel":
    """Wrap ``model`` (modified in place, as PEFT does) with a fresh LoRA adapter.

    PEFT draws LoRA ``A`` from the global RNG; with ``seed`` the adapter is the same on every call
    and the caller's RNG state (CPU and the model's CUDA devices) is left as it was.
    """
    import peft
    import torch

    if seed is None:
        return peft.get_peft_model(model, peft_config(cfg))
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return peft.get_peft_model(model, peft_config(cfg))


def _saved_state(peft_model: "peft.PeftModel") -> dict[str, "torch.Tensor"]:
    """The adapter's tensors under PEFT's saved key names, the base's embedding matrices left out."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(peft_model, save_embedding_layers=False)


def adapter_state(peft_model: "peft.PeftModel") -> dict[str, "torch.Tensor"]:
    """The adapter weights under PEFT's saved key names: float32, on the CPU, contiguous copies."""
    import torch

    return {key: value.detach().to("cpu", torch.float32).contiguous().clone()
            for key, value in sorted(_saved_state(peft_model).items())}


def lora_spec(base_folder: Path, lora: "LoraConfig") -> AdapterSpec:
    """The spec of a LoRA ``lora`` on the base in ``base_folder``: the layout a node unpacks a received
    adapter by. Built on the meta device, so no weight is read (the fine-tune loads the base itself);
    the hub derives the same spec from the same base and LoRA config (``HubWorkbench.spec``)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(base_folder), trust_remote_code=False)
    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # no weights, and the caller's RNG untouched
        model = attach_lora(AutoModelForCausalLM.from_config(config), lora)
    return AdapterSpec({key: tuple(value.shape) for key, value in _saved_state(model).items()})


def load_adapter_state(peft_model: "peft.PeftModel", state: Mapping[str, "torch.Tensor"]) -> None:
    """Load ``state`` (validated against the model's own adapter spec) into the active adapter."""
    from peft import set_peft_model_state_dict

    checked = validate_adapter_state(state, AdapterSpec.from_state(adapter_state(peft_model)))
    result = set_peft_model_state_dict(peft_model, checked)
    # Any adapter key PEFT did not place is a bug in the key naming, not a user error.
    unexpected = [key for key in getattr(result, "unexpected_keys", []) if "lora_" in key]
    assert not unexpected, unexpected


def _check_base_repo(base_repo: str) -> None:
    if not is_repo_id(base_repo or ""):
        raise ConfigError(
            f"`base_repo` is {base_repo!r}; an adapter names its base by a repo id that resolves elsewhere "
            "(like 'fedem/seshu-tiny'), never a local path."
        )


def save_adapter(
    peft_model: "peft.PeftModel",
    folder: Path,
    base_repo: str,
    base_revision: Optional[str],
    resolved_config: Optional[dict[str, Any]] = None,
) -> Path:
    """Write a standard PEFT folder whose config names the base as ``base_repo`` at ``base_revision``."""
    from huggingface_hub import ModelCard

    _check_base_repo(base_repo)
    folder = Path(folder)
    config = peft_model.active_peft_config
    saved = (config.base_model_name_or_path, config.revision)
    config.base_model_name_or_path, config.revision = base_repo, base_revision
    try:
        peft_model.save_pretrained(folder, safe_serialization=True, save_embedding_layers=False)
    finally:
        config.base_model_name_or_path, config.revision = saved
    card_path = folder / "README.md"
    if card_path.is_file():  # PEFT's card names the base by its local path; publish the repo id
        card = ModelCard.load(card_path)
        card.data.base_model = base_repo
        tags = [t for t in card.data.tags or [] if not t.startswith("base_model:")]
        card.data.tags = sorted([*tags, f"base_model:adapter:{base_repo}"])
        card.save(card_path)
    if resolved_config is not None:
        write_resolved_config(folder, resolved_config)
    return folder


def read_adapter_config(folder: Path) -> "peft.LoraConfig":
    """The folder's ``adapter_config.json`` as a PEFT LoRA config, targets checked."""
    import peft

    path = Path(folder) / ADAPTER_CONFIG_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InvalidAdapter(f"cannot read {str(path)!r}: {err}") from err
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        kind = raw.get("peft_type") if isinstance(raw, dict) else type(raw).__name__
        raise InvalidAdapter(f"{str(path)!r} is not a LoRA adapter config (peft_type {kind!r}).")
    targets = raw.get("target_modules")
    check_targets(targets if isinstance(targets, list) else [str(targets)])
    try:
        return peft.LoraConfig.from_pretrained(str(folder))
    except (TypeError, ValueError) as err:
        raise InvalidAdapter(f"{str(path)!r} is not a valid LoRA config: {err}") from err


def read_adapter_state(folder: Path) -> dict[str, "torch.Tensor"]:
    """The weights of a stored PEFT adapter folder (safetensors, checked as they load)."""
    return load_adapter_file(Path(folder) / ADAPTER_WEIGHTS_FILE)


def load_adapter(base_model: "PreTrainedModel", folder: Path, is_trainable: bool = False) -> "peft.PeftModel":
    """Wrap ``base_model`` (in place) with the adapter saved in ``folder``, validated before use.

    Weights are read with safetensors only and checked (keys, shapes, dtype, finite values);
    ``is_trainable`` leaves the LoRA weights trainable, for the next relay leg.
    """
    import peft

    folder = Path(folder)
    config = read_adapter_config(folder)
    state = read_adapter_state(folder)
    config.inference_mode = not is_trainable
    # The task's PeftModel class, as PeftModel.from_pretrained picks it; keeps the config's base name.
    model_cls = peft.MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(config.task_type, peft.PeftModel)
    model = model_cls(base_model, config)
    load_adapter_state(model, state)
    if not is_trainable:
        model.eval()
    return model
