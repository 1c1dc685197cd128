"""Adapters on the wire: LoRA state <-> one packed float32 Flower ``Array``, validated on arrival.

Flower 1.42 moves every ``Array`` of a message as its own object, each way of a hop: a 1 MB adapter
of 48 tensors took 12.3 s a relay hop through a TLS SuperLink, the same bytes in one ``Array`` 6.8 s.
So an adapter travels as ONE ``Array`` under ``ADAPTER_KEY``: its tensors flattened and concatenated
in sorted key order. The layout does not travel: both sides hold the same ``AdapterSpec`` (the hub
the adapter's, a node that of its own LoRA model on the base it trains, ``model.lora.lora_spec``), whose keys
are sorted too.

Flower serialises an ``Array`` as NumPy ``.npy`` bytes read with ``allow_pickle=False``
(``flwr.app.message.array``); nothing here or there unpickles. NumPy has no bfloat16, so adapters
travel as float32. A received record is decoded only after it holds exactly the one expected key,
with NumPy serialisation and exactly the bytes of the spec's float32 values; decoded, they must be
float32 and a flat vector of the spec's count, and are then split by its shapes and checked as every
adapter is (``validate_adapter_state``: keys, shapes, size bound, finite values).

An adapter's optimizer state (``train.carry``, ``training.optimizer_state``) travels the same way:
its AdamW moments as ONE packed float32 ``Array`` under ``OPTIMIZER_KEY``, in sorted moment-name
order (each adapter key twice, ``<key>::exp_avg`` and ``<key>::exp_avg_sq``, so the layout again
comes from the adapter's spec), with no record at all when no moments travel (``carry=schedule``).
Its ``step`` and ``warmup_from`` travel in the message's config record (``protocol.messages``).
Unpacked, it is checked as every optimizer state is (``validate_optimizer_state``).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.common.constant import SType
from numpy.lib import format as npy

from fedem_flwr.errors import InvalidAdapter
from fedem_flwr.model.adapter_spec import AdapterSpec, validate_adapter_state
from fedem_flwr.training.optimizer_state import (
    InvalidOptimizerState,
    OptimizerState,
    moment_spec,
    validate_optimizer_state,
)

ADAPTER_KEY = "adapter"  # the one Array an adapter travels as
OPTIMIZER_KEY = "moments"  # the one Array an adapter's optimizer moments travel as
_NUMPY_STYPE = SType.NUMPY


def adapter_to_arrays(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """The adapter as one float32 ``Array``: its tensors flattened and concatenated in sorted key order."""
    parts = []
    for key in sorted(state):
        value = state[key]
        if not isinstance(value, torch.Tensor):
            raise InvalidAdapter(f"adapter key {key!r} holds a {type(value).__name__}, not a tensor.")
        parts.append(value.detach().to("cpu", torch.float32).reshape(-1))
    packed = torch.cat(parts) if parts else torch.zeros(0)
    return ArrayRecord({ADAPTER_KEY: Array(packed.numpy())})


def arrays_to_adapter(record: ArrayRecord, spec: AdapterSpec) -> dict[str, torch.Tensor]:
    """The adapter in ``record``, unpacked by ``spec`` and validated; anything malformed is ``InvalidAdapter``."""
    if not isinstance(record, ArrayRecord):
        raise InvalidAdapter(f"expected a Flower ArrayRecord, got a {type(record).__name__}.")
    _check_one_key(sorted(map(str, record.keys())))
    packed = _decode(record[ADAPTER_KEY], spec)
    sizes = [math.prod(shape) for shape in spec.shapes.values()]
    state = {key: part.view(shape).clone()  # own storage: safetensors refuses tensors that share it
             for (key, shape), part in zip(spec.shapes.items(), torch.split(packed, sizes))}
    return validate_adapter_state(state, spec)


@dataclass(frozen=True)
class OptimizerRecord:
    """An optimizer state as a message carries it: ``step`` and ``warmup_from`` (config values) and
    the packed moments (None when none travel). Unpacked only against an adapter's spec
    (``arrays_to_optimizer``), since the layout does not travel."""

    step: int
    warmup_from: int
    arrays: Optional[ArrayRecord] = None


def optimizer_to_arrays(state: OptimizerState) -> ArrayRecord:
    """The moments as one float32 ``Array``: flattened and concatenated in sorted moment-name order."""
    parts = []
    for key in sorted(state.moments):
        value = state.moments[key]
        if not isinstance(value, torch.Tensor):
            raise InvalidOptimizerState(f"optimizer moment {key!r} holds a {type(value).__name__}, not a tensor.")
        parts.append(value.detach().to("cpu", torch.float32).reshape(-1))
    packed = torch.cat(parts) if parts else torch.zeros(0)
    return ArrayRecord({OPTIMIZER_KEY: Array(packed.numpy())})


def optimizer_record(state: OptimizerState) -> OptimizerRecord:
    """``state`` as a message carries it: no moments record when it holds none (``carry=schedule``)."""
    return OptimizerRecord(int(state.step), int(state.warmup_from),
                           optimizer_to_arrays(state) if state.moments else None)


def arrays_to_optimizer(
    record: Optional[ArrayRecord],
    spec: AdapterSpec,
    *,
    step: int,
    warmup_from: int,
    carry: str = "moments",
    sent_step: Optional[int] = None,
    sent_warmup_from: Optional[int] = None,
    steps_reported: Optional[int] = None,
    max_steps: Optional[int] = None,
) -> OptimizerState:
    """The optimizer state of adapter ``spec`` from its packed moments (``record``; None: no moments)
    and its ``step``/``warmup_from``, validated (``validate_optimizer_state``, which the remaining
    arguments go to); anything malformed is ``InvalidOptimizerState``."""
    moments: dict[str, torch.Tensor] = {}
    if record is not None:
        if not isinstance(record, ArrayRecord):
            raise InvalidOptimizerState(f"expected a Flower ArrayRecord of moments, got a {type(record).__name__}.")
        layout = moment_spec(spec)
        _check_one_key(sorted(map(str, record.keys())), OPTIMIZER_KEY, "optimizer", InvalidOptimizerState)
        packed = _decode(record[OPTIMIZER_KEY], layout, OPTIMIZER_KEY, InvalidOptimizerState)
        sizes = [math.prod(shape) for shape in layout.shapes.values()]
        moments = {key: part.view(shape).clone() for (key, shape), part in zip(layout.shapes.items(),
                                                                               torch.split(packed, sizes))}
    state = OptimizerState(step, warmup_from, moments)
    return validate_optimizer_state(state, spec, carry=carry, sent_step=sent_step, sent_warmup_from=sent_warmup_from,
                                    steps_reported=steps_reported, max_steps=max_steps)


def _check_one_key(keys: list[str], key: str = ADAPTER_KEY, what: str = "adapter",
                   error: type[Exception] = InvalidAdapter) -> None:
    if keys == [key]:
        return
    extra = [repr(k) for k in keys if k != key]
    problems = [] if key in keys else [f"missing key {key!r}"]
    if extra:
        more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
        problems.append(f"unexpected key(s) {', '.join(extra[:5])}{more}")
    travels = "an adapter travels" if what == "adapter" else "its moments travel"
    raise error(f"{what} record keys do not match: {'; '.join(problems)}; {travels} as the one "
                f"packed float32 array {key!r}.")


def _decode(array: object, spec: AdapterSpec, key: str = ADAPTER_KEY,
            error: type[Exception] = InvalidAdapter) -> torch.Tensor:
    """The packed values: exactly the spec's count of float32, refused before decoding when the bytes cannot fit."""
    if not isinstance(array, Array):
        raise error(f"record key {key!r} holds a {type(array).__name__}, not a Flower Array.")
    if array.stype != _NUMPY_STYPE:
        raise error(f"record key {key!r} has serialisation {array.stype!r}; expected {_NUMPY_STYPE!r}.")
    expected = _npy_bytes(spec.nbytes // 4)
    if len(array.data) != expected:
        raise error(f"record key {key!r} carries {len(array.data)} bytes; expected exactly {expected}: the "
                    f"spec's {spec.nbytes} bytes of float32 in one .npy array.")
    try:
        ndarray = array.numpy()  # np.load(..., allow_pickle=False)
    except (TypeError, ValueError, EOFError, OSError) as err:
        raise error(f"record key {key!r} does not decode as a NumPy array: {err}") from err
    if ndarray.dtype != np.dtype(np.float32):
        raise error(f"record key {key!r} has dtype {ndarray.dtype}; expected float32.")
    count = spec.nbytes // 4
    if ndarray.shape != (count,):
        raise error(f"record key {key!r} has shape {ndarray.shape}; expected ({count},), "
                    f"the {spec.nbytes} bytes the spec's adapter packs.")
    return torch.from_numpy(np.ascontiguousarray(ndarray))


def _npy_bytes(count: int) -> int:
    """Size of ``count`` float32 values as NumPy writes them (``np.save``): its header, then the values."""
    header = io.BytesIO()
    npy.write_array_header_1_0(header, {"descr": npy.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                                        "shape": (count,)})
    return header.tell() + 4 * count


def content_bytes(content: RecordDict) -> int:
    """Bytes of the arrays a message carries (every ``ArrayRecord`` in it): what a simulation counts
    as moved."""
    return sum(len(array.data) for record in content.array_records.values() for array in record.values())
