"""What a valid adapter looks like, and the check every received or stored adapter goes through.

An adapter comes from another machine (a relay client, a store): its keys, shapes, dtype, values
and size are checked against the spec of the adapter that was handed out before any of it touches
a model. Files are read with safetensors only; nothing is ever unpickled.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from fedem_flwr.errors import InvalidAdapter

if TYPE_CHECKING:
    pass

DTYPE = "float32"
_BYTES_PER_VALUE = 4


@dataclass(frozen=True)
class AdapterSpec:
    """Expected adapter: key -> shape (float32 everywhere) and a bound on the total size in bytes."""

    shapes: Mapping[str, tuple[int, ...]]
    dtype: str = DTYPE
    max_bytes: Optional[int] = None  # None: exactly the size the shapes imply

    def __post_init__(self) -> None:
        if self.dtype != DTYPE:
            raise InvalidAdapter(f"`dtype` is {self.dtype!r}; adapters are {DTYPE!r} at rest and on the wire.")
        shapes = {str(k): tuple(int(d) for d in v) for k, v in sorted(self.shapes.items())}
        object.__setattr__(self, "shapes", shapes)
        if self.max_bytes is None:
            object.__setattr__(self, "max_bytes", self.nbytes)

    @property
    def nbytes(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes.values()) * _BYTES_PER_VALUE

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], max_bytes: Optional[int] = None) -> "AdapterSpec":
        return cls({key: tuple(value.shape) for key, value in state.items()}, max_bytes=max_bytes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form, for storing beside an adapter."""
        return {"dtype": self.dtype, "max_bytes": self.max_bytes,
                "shapes": {key: list(shape) for key, shape in self.shapes.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "AdapterSpec":
        return cls(dict(data["shapes"]), dtype=data.get("dtype", DTYPE), max_bytes=data.get("max_bytes"))


def _names(keys: Any, limit: int = 5) -> str:
    keys = sorted(map(str, keys))
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(repr(k) for k in keys[:limit]) + more


def check_keys(keys: Iterable[str], spec: AdapterSpec) -> None:
    """Raise ``InvalidAdapter`` naming every missing and unexpected key."""
    keys = set(keys)
    missing, extra = set(spec.shapes) - keys, keys - set(spec.shapes)
    if missing or extra:
        parts = ([f"missing key(s) {_names(missing)}"] if missing else []) + (
            [f"unexpected key(s) {_names(extra)}"] if extra else [])
        raise InvalidAdapter(f"adapter keys do not match the spec: {'; '.join(parts)}.")


def validate_adapter_state(state: Mapping[str, torch.Tensor], spec: AdapterSpec) -> dict[str, torch.Tensor]:
    """Return ``state`` as CPU contiguous float32 tensors in spec order, or raise ``InvalidAdapter``."""
    if not isinstance(state, Mapping):
        raise InvalidAdapter(f"adapter state is a {type(state).__name__}, not a mapping of tensors.")
    check_keys(state.keys(), spec)
    total = 0
    for key, shape in spec.shapes.items():
        value = state[key]
        if not isinstance(value, torch.Tensor):
            raise InvalidAdapter(f"adapter key {key!r} holds a {type(value).__name__}, not a tensor.")
        if value.dtype != torch.float32:
            raise InvalidAdapter(f"adapter key {key!r} has dtype {value.dtype}; expected torch.float32.")
        if tuple(value.shape) != shape:
            raise InvalidAdapter(f"adapter key {key!r} has shape {tuple(value.shape)}; expected {shape}.")
        total += value.numel() * value.element_size()
    if total > spec.max_bytes:
        raise InvalidAdapter(f"adapter is {total} bytes; the bound is {spec.max_bytes} bytes.")
    checked = {}
    for key in spec.shapes:
        value = state[key].detach().to("cpu").contiguous()
        bad = int((~torch.isfinite(value)).sum())
        if bad:
            raise InvalidAdapter(f"adapter key {key!r} has {bad} non-finite value(s) (NaN or inf).")
        checked[key] = value
    return checked


def load_adapter_file(path: Path) -> dict[str, torch.Tensor]:
    """Read an adapter's tensors from a safetensors file; anything unreadable is ``InvalidAdapter``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise InvalidAdapter(f"adapter file {str(path)!r} does not exist.")
    if path.suffix != ".safetensors":
        raise InvalidAdapter(f"adapter file {str(path)!r} is not a .safetensors file; no other format is read.")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise InvalidAdapter(f"adapter file {str(path)!r} is corrupt or truncated: {err}") from err
