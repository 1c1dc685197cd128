"""Adapters on the wire: LoRA state <-> Flower ``ArrayRecord``, validated on arrival.

Flower serialises each ``Array`` as NumPy ``.npy`` bytes written and read with
``allow_pickle=False`` (``flwr.app.message.array``), inside protobuf messages with JSON metadata;
nothing here or there unpickles. ``ArrayRecord`` goes through NumPy, which has no bfloat16, so every
tensor travels as float32. A received record is decoded key by key only after its key set matches
and its byte size is plausible, then checked against the expected ``AdapterSpec``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.common.constant import SType

from fedem_flwr.errors import InvalidAdapter
from fedem_flwr.model.adapter_spec import AdapterSpec, check_keys, validate_adapter_state

_NPY_HEADER_MAX = 4096  # an .npy header is 128 bytes for these arrays; anything far above is not ours
_NUMPY_STYPE = SType.NUMPY


def adapter_to_arrays(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """One ``Array`` per adapter tensor, float32, in sorted key order."""
    arrays = {}
    for key in sorted(state):
        value = state[key]
        if not isinstance(value, torch.Tensor):
            raise InvalidAdapter(f"adapter key {key!r} holds a {type(value).__name__}, not a tensor.")
        arrays[key] = Array(value.detach().to("cpu", torch.float32).contiguous().numpy())
    return ArrayRecord(arrays)


def _decode(key: str, array: object, shape: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(array, Array):
        raise InvalidAdapter(f"record key {key!r} holds a {type(array).__name__}, not a Flower Array.")
    if array.stype != _NUMPY_STYPE:
        raise InvalidAdapter(f"record key {key!r} has serialisation {array.stype!r}; expected {_NUMPY_STYPE!r}.")
    limit = 4 * math.prod(shape) + _NPY_HEADER_MAX
    if len(array.data) > limit:
        raise InvalidAdapter(f"record key {key!r} carries {len(array.data)} bytes; at most {limit} expected.")
    try:
        ndarray = array.numpy()  # np.load(..., allow_pickle=False)
    except (TypeError, ValueError, EOFError, OSError) as err:
        raise InvalidAdapter(f"record key {key!r} does not decode as a NumPy array: {err}") from err
    if ndarray.dtype != np.dtype(np.float32):
        raise InvalidAdapter(f"record key {key!r} has dtype {ndarray.dtype}; expected float32.")
    return torch.from_numpy(np.ascontiguousarray(ndarray))


def arrays_to_adapter(record: ArrayRecord, spec: AdapterSpec) -> dict[str, torch.Tensor]:
    """The adapter state in ``record``, validated against ``spec``; anything malformed is ``InvalidAdapter``."""
    if not isinstance(record, ArrayRecord):
        raise InvalidAdapter(f"expected a Flower ArrayRecord, got a {type(record).__name__}.")
    check_keys(record.keys(), spec)
    state = {key: _decode(key, record[key], shape) for key, shape in spec.shapes.items()}
    return validate_adapter_state(state, spec)


def content_bytes(content: RecordDict) -> int:
    """Bytes of the arrays a message carries (every ``ArrayRecord`` in it): what a simulation counts
    as moved."""
    return sum(len(array.data) for record in content.array_records.values() for array in record.values())
