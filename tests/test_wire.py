"""Adapter <-> ArrayRecord: exact float32 round trip, and every malformed record refused with its reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedem_flwr.errors import InvalidAdapter
from fedem_flwr.model.adapter_spec import AdapterSpec, load_adapter_file, validate_adapter_state
from fedem_flwr.wire import adapter_to_arrays, arrays_to_adapter

A, B = "base_model.model.backbone.layers.0.mixer.in_proj.lora_A.weight", "base_model.model.lm_head.lora_B.weight"


@pytest.fixture
def state():
    generator = torch.Generator().manual_seed(0)
    return {A: torch.randn(4, 8, generator=generator), B: torch.randn(10, 4, generator=generator)}


@pytest.fixture
def spec(state):
    return AdapterSpec.from_state(state)


def with_array(state, key, ndarray):
    record = adapter_to_arrays(state)
    record[key] = Array(ndarray)
    return record


def test_round_trip_is_exact(state, spec):
    record = adapter_to_arrays(state)

    back = arrays_to_adapter(record, spec)

    assert list(record.keys()) == sorted(state)
    assert all(record[k].dtype == "float32" for k in record)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_bfloat16_state_travels_as_float32(state, spec):
    bf16 = {k: v.to(torch.bfloat16) for k, v in state.items()}

    back = arrays_to_adapter(adapter_to_arrays(bf16), spec)

    assert all(v.dtype == torch.float32 for v in back.values())
    assert torch.equal(back[A], bf16[A].float())


def test_missing_and_extra_keys_are_named(state, spec):
    record = adapter_to_arrays(state)
    del record[B]
    record["base_model.model.backbone.layers.0.mixer.out_proj.lora_A.weight"] = Array(np.zeros((4, 8), np.float32))

    with pytest.raises(InvalidAdapter, match=r"missing key\(s\) '.*lm_head.lora_B.weight'.*unexpected.*out_proj"):
        arrays_to_adapter(record, spec)


def test_wrong_shape_names_expected_and_got(state, spec):
    record = with_array(state, A, np.zeros((4, 9), np.float32))

    with pytest.raises(InvalidAdapter, match=r"shape \(4, 9\); expected \(4, 8\)"):
        arrays_to_adapter(record, spec)


def test_wrong_dtype_is_refused(state, spec):
    record = with_array(state, A, np.zeros((4, 8), np.float64))

    with pytest.raises(InvalidAdapter, match=f"{A!r} has dtype float64"):
        arrays_to_adapter(record, spec)


def test_nan_and_inf_are_counted(state, spec):
    bad = state[B].numpy().copy()
    bad[0, 0], bad[1, 1] = np.nan, np.inf

    with pytest.raises(InvalidAdapter, match=f"{B!r} has 2 non-finite"):
        arrays_to_adapter(with_array(state, B, bad), spec)


def test_size_bound(state):
    spec = AdapterSpec.from_state(state, max_bytes=100)

    with pytest.raises(InvalidAdapter, match="bound is 100 bytes"):
        arrays_to_adapter(adapter_to_arrays(state), spec)


def test_truncated_array_bytes_are_refused(state, spec):
    record = adapter_to_arrays(state)
    good = record[A]
    record[A] = Array(dtype=good.dtype, shape=good.shape, stype=good.stype, data=good.data[:-7])

    with pytest.raises(InvalidAdapter, match=f"{A!r} does not decode"):
        arrays_to_adapter(record, spec)


def test_oversized_array_bytes_are_refused_before_decoding(state, spec):
    record = adapter_to_arrays(state)
    good = record[A]
    record[A] = Array(dtype=good.dtype, shape=good.shape, stype=good.stype, data=good.data + bytes(10_000))

    with pytest.raises(InvalidAdapter, match="bytes; at most"):
        arrays_to_adapter(record, spec)


class _Payload:
    """Unpickling this would create a marker file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_pickled_object_array_is_never_unpickled(state, spec, tmp_path):
    marker = tmp_path / "unpickled"
    buffer = io.BytesIO()
    np.save(buffer, np.array([_Payload(marker)] * 32, dtype=object).reshape(4, 8), allow_pickle=True)
    record = adapter_to_arrays(state)
    record[A] = Array(dtype="float32", shape=(4, 8), stype=record[A].stype, data=buffer.getvalue())

    with pytest.raises(InvalidAdapter, match="does not decode"):
        arrays_to_adapter(record, spec)
    assert not marker.exists()


def test_foreign_serialisation_type_is_refused(state, spec):
    record = adapter_to_arrays(state)
    good = record[A]
    record[A] = Array(dtype=good.dtype, shape=good.shape, stype="torch.pickle", data=good.data)

    with pytest.raises(InvalidAdapter, match="serialisation 'torch.pickle'"):
        arrays_to_adapter(record, spec)


def test_not_a_record_is_refused(state, spec):
    with pytest.raises(InvalidAdapter, match="ArrayRecord"):
        arrays_to_adapter(state, spec)


def test_validate_rejects_non_tensor_and_non_mapping(state, spec):
    with pytest.raises(InvalidAdapter, match="not a tensor"):
        validate_adapter_state({**state, A: [[0.0] * 8] * 4}, spec)
    with pytest.raises(InvalidAdapter, match="not a mapping"):
        validate_adapter_state([state[A]], spec)


def test_spec_round_trips_through_dict(spec):
    assert AdapterSpec.from_dict(spec.to_dict()) == spec
    assert spec.max_bytes == 4 * (4 * 8 + 10 * 4)


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"", "corrupt or truncated"), (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json", "corrupt or truncated")],
)
def test_corrupt_adapter_file_names_the_file(tmp_path, content, reason):
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(content)

    with pytest.raises(InvalidAdapter, match=rf"adapter_model.safetensors.*{reason}"):
        load_adapter_file(path)


def test_truncated_adapter_file_names_the_file(tmp_path, state):
    from safetensors.torch import save_file

    path = tmp_path / "adapter_model.safetensors"
    save_file(state, str(path))
    path.write_bytes(path.read_bytes()[:-16])

    with pytest.raises(InvalidAdapter, match="corrupt or truncated"):
        load_adapter_file(path)


def test_pickle_files_are_not_read(tmp_path, state):
    path = tmp_path / "adapter_model.bin"
    torch.save(state, path)

    with pytest.raises(InvalidAdapter, match="not a .safetensors file"):
        load_adapter_file(path)
