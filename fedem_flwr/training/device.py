"""Where training runs and in which precision: one place, so the loop and the evaluator agree.

``auto`` picks CUDA when present, else the CPU. Precision ``auto`` picks bf16 autocast on a GPU that
computes bf16 natively (Ampere and later) and fp32 elsewhere: fp16 needs loss scaling and can still
overflow in the SSM's exponentials, so it is used only when asked for. Autocast keeps weights (LoRA
included) in fp32 and runs matrix products in the low precision.
"""

from __future__ import annotations

from typing import Optional

import torch

from fedem_flwr.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def pick_device(name: str = "auto", key: str = "train.device") -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; ``cpu``, ``cuda``, ``cuda:N`` and ``mps`` as named."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"`{key}` is {name!r}; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'.") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"`{key}` is {name!r} but this torch sees no CUDA GPU "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); use 'auto' or 'cpu'."
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"`{key}` is {name!r} but only {torch.cuda.device_count()} GPU(s) are visible."
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"`{key}` is {name!r} but MPS is not available here; use 'auto' or 'cpu'.")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"`{key}` is {name!r}; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'.")
    return device


def bf16_supported(device: torch.device) -> bool:
    """Native bf16 on this device (emulated bf16 on older GPUs is slower than fp32)."""
    if device.type == "cuda":
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # older torch without the keyword
            return torch.cuda.is_bf16_supported()
    return device.type == "cpu"  # CPU autocast supports bf16 (slowly without AMX); MPS: ask for fp32


def pick_precision(precision: str, device: torch.device, key: str = "train.precision") -> Optional[torch.dtype]:
    """The autocast dtype for ``precision`` on ``device``; None means plain fp32 (no autocast)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"`{key}` is {precision!r}; allowed: {', '.join(map(repr, PRECISIONS))}.")
    if precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and bf16_supported(device) else None
    if precision == "bf16":
        if not bf16_supported(device):
            name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
            raise ConfigError(
                f"`{key}` is 'bf16' but {name} has no native bf16; "
                "use 'fp16' (with loss scaling) or 'fp32', or 'auto' to choose."
            )
        return torch.bfloat16
    if device.type != "cuda":
        raise ConfigError(
            f"`{key}` is 'fp16' on {device.type}; fp16 with loss scaling needs a CUDA GPU. "
            "Use 'fp32' or 'auto'."
        )
    return torch.float16


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """An autocast context for ``dtype``, or a disabled one for fp32."""
    return torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def release_memory(device: torch.device) -> None:
    """Hand cached GPU blocks back to the driver, so the next lease (or another process) can use them."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
