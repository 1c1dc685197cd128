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
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.common.constant import SType
from numpy.lib import format as npy

from fedem_flwr.errors import InvalidAdapter
from fedem_flwr.model.adapter_spec import AdapterSpec, validate_adapter_state

ADAPTER_KEY = "adapter"  # the one Array an adapter travels as
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


def _check_one_key(keys: list[str]) -> None:
    if keys == [ADAPTER_KEY]:
        return
    extra = [repr(key) for key in keys if key != ADAPTER_KEY]
    problems = [] if ADAPTER_KEY in keys else [f"missing key {ADAPTER_KEY!r}"]
    if extra:
        more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
        problems.append(f"unexpected key(s) {', '.join(extra[:5])}{more}")
    raise InvalidAdapter(f"adapter record keys do not match: {'; '.join(problems)}; an adapter travels as the one "
                         f"packed float32 array {ADAPTER_KEY!r}.")


def _decode(array: object, spec: AdapterSpec) -> torch.Tensor:
    """The packed values: exactly the spec's count of float32, refused before decoding when the bytes cannot fit."""
    key = ADAPTER_KEY
    if not isinstance(array, Array):
        raise InvalidAdapter(f"record key {key!r} holds a {type(array).__name__}, not a Flower Array.")
    if array.stype != _NUMPY_STYPE:
        raise InvalidAdapter(f"record key {key!r} has serialisation {array.stype!r}; expected {_NUMPY_STYPE!r}.")
    expected = _npy_bytes(spec.nbytes // 4)
    if len(array.data) != expected:
        raise InvalidAdapter(f"record key {key!r} carries {len(array.data)} bytes; expected exactly {expected}: the "
                             f"spec's {spec.nbytes} bytes of float32 in one .npy array.")
    try:
        ndarray = array.numpy()  # np.load(..., allow_pickle=False)
    except (TypeError, ValueError, EOFError, OSError) as err:
        raise InvalidAdapter(f"record key {key!r} does not decode as a NumPy array: {err}") from err
    if ndarray.dtype != np.dtype(np.float32):
        raise InvalidAdapter(f"record key {key!r} has dtype {ndarray.dtype}; expected float32.")
    count = spec.nbytes // 4
    if ndarray.shape != (count,):
        raise InvalidAdapter(f"record key {key!r} has shape {ndarray.shape}; expected ({count},), "
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
