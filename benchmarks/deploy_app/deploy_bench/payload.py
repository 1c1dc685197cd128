"""The adapter-sized payload of a hop, built and read on both sides from the same spec, as the relay does.

``packed`` sends it as the relay does (``fedem_flwr.protocol.wire``: one float32 Array, unpacked by the
spec both sides derive); ``per-tensor`` as the relay did before, one Array per tensor, for comparison.
"""

from __future__ import annotations

import torch
from flwr.app import Array, ArrayRecord

from fedem_flwr.model.adapter_spec import AdapterSpec
from fedem_flwr.protocol.wire import adapter_to_arrays, arrays_to_adapter

WIRES = ("packed", "per-tensor")


def payload_spec(megabytes: float, count: int) -> AdapterSpec:
    """``megabytes`` of float32 in ``count`` tensors (48: a LoRA on seshu-130m's in_proj)."""
    per_tensor = max(1, round(megabytes * 1e6 / 4 / count))
    return AdapterSpec({f"lora_{i:03d}": (per_tensor,) for i in range(count)})


def payload_state(spec: AdapterSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(shape, generator=generator) for key, shape in spec.shapes.items()}


def to_record(state: dict[str, torch.Tensor], wire: str) -> ArrayRecord:
    if wire == "packed":
        return adapter_to_arrays(state)
    return ArrayRecord({key: Array(value.numpy()) for key, value in state.items()})


def from_record(record: ArrayRecord, spec: AdapterSpec, wire: str) -> dict[str, torch.Tensor]:
    if wire == "packed":
        return arrays_to_adapter(record, spec)
    return {key: torch.from_numpy(array.numpy()) for key, array in record.items()}
