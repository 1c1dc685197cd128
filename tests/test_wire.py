"""Adapter <-> one packed float32 Array: exact round trip, the node's own layout, every malformed record refused."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from numpy.lib import format as npy

from fedem_flwr.config.loader import load_config
from fedem_flwr.config.schema import LoraConfig
from fedem_flwr.errors import InvalidAdapter
from fedem_flwr.model.adapter_spec import AdapterSpec, load_adapter_file, validate_adapter_state
from fedem_flwr.model.factory import build_model, save_base
from fedem_flwr.model.lora import adapter_state, attach_lora, load_adapter_state, lora_spec
from fedem_flwr.protocol.wire import ADAPTER_KEY, adapter_to_arrays, arrays_to_adapter

A, B = "base_model.model.backbone.layers.0.mixer.in_proj.lora_A.weight", "base_model.model.lm_head.lora_B.weight"


@pytest.fixture
def state():
    generator = torch.Generator().manual_seed(0)
    return {A: torch.randn(4, 8, generator=generator), B: torch.randn(10, 4, generator=generator)}


@pytest.fixture
def spec(state):
    return AdapterSpec.from_state(state)


def packed(record):
    return record[ADAPTER_KEY]


def with_packed(state, ndarray):
    record = adapter_to_arrays(state)
    record[ADAPTER_KEY] = Array(ndarray)
    return record


def flat(state):
    return np.concatenate([state[k].numpy().reshape(-1) for k in sorted(state)])


def test_round_trip_is_exact(state, spec):
    record = adapter_to_arrays(state)

    back = arrays_to_adapter(record, spec)

    assert list(record.keys()) == [ADAPTER_KEY]
    assert (packed(record).dtype, packed(record).shape) == ("float32", (4 * 8 + 10 * 4,))
    np.testing.assert_array_equal(packed(record).numpy(), flat(state))  # sorted key order: A, then B
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_unpacked_tensors_own_their_memory(state, spec):
    from safetensors.torch import save

    back = arrays_to_adapter(adapter_to_arrays(state), spec)

    assert save(back)  # safetensors refuses tensors that share storage


def test_bfloat16_state_travels_as_float32(state, spec):
    bf16 = {k: v.to(torch.bfloat16) for k, v in state.items()}

    back = arrays_to_adapter(adapter_to_arrays(bf16), spec)

    assert all(v.dtype == torch.float32 for v in back.values())
    assert torch.equal(back[A], bf16[A].float())


def test_non_tensor_value_is_refused_when_packing(state):
    with pytest.raises(InvalidAdapter, match=f"{A!r} holds a list, not a tensor"):
        adapter_to_arrays({**state, A: [[0.0] * 8] * 4})


def test_extra_key_is_named(state, spec):
    record = adapter_to_arrays(state)
    record["extra"] = Array(np.zeros(3, np.float32))

    with pytest.raises(InvalidAdapter, match=r"unexpected key\(s\) 'extra'; an adapter travels as the one packed"):
        arrays_to_adapter(record, spec)


def test_one_array_per_tensor_is_refused(state, spec):
    record = ArrayRecord({k: Array(v.numpy()) for k, v in state.items()})

    with pytest.raises(InvalidAdapter, match=rf"missing key 'adapter'; unexpected key\(s\) {A!r}, {B!r}"):
        arrays_to_adapter(record, spec)


def test_empty_record_is_refused(spec):
    with pytest.raises(InvalidAdapter, match="missing key 'adapter'"):
        arrays_to_adapter(ArrayRecord({}), spec)


@pytest.mark.parametrize("values", [71, 73, 36, 72 * 2])
def test_wrong_size_is_refused_before_decoding(state, spec, values):
    record = with_packed(state, np.zeros(values, np.float32))

    with pytest.raises(InvalidAdapter, match=rf"'adapter' carries {128 + 4 * values} bytes; expected exactly 416: "):
        arrays_to_adapter(record, spec)


def test_values_of_another_layout_are_refused(state, spec):
    record = with_packed(state, flat(state).reshape(8, 9))  # the right bytes, not a flat vector

    with pytest.raises(InvalidAdapter, match=r"shape \(8, 9\); expected \(72,\)"):
        arrays_to_adapter(record, spec)


def test_wrong_dtype_is_refused(state, spec):
    record = with_packed(state, np.zeros(72 // 2, np.float64))  # the same bytes as the float32 adapter

    with pytest.raises(InvalidAdapter, match="'adapter' has dtype float64; expected float32"):
        arrays_to_adapter(record, spec)


def test_float64_of_the_right_count_is_refused_by_its_size(state, spec):
    with pytest.raises(InvalidAdapter, match="carries 704 bytes"):
        arrays_to_adapter(with_packed(state, flat(state).astype(np.float64)), spec)


def test_nan_and_inf_are_counted_and_their_key_named(state, spec):
    bad = flat(state)
    bad[4 * 8], bad[4 * 8 + 5] = np.nan, np.inf  # the first values of B

    with pytest.raises(InvalidAdapter, match=f"{B!r} has 2 non-finite"):
        arrays_to_adapter(with_packed(state, bad), spec)


def test_size_bound(state):
    spec = AdapterSpec.from_state(state, max_bytes=100)

    with pytest.raises(InvalidAdapter, match="bound is 100 bytes"):
        arrays_to_adapter(adapter_to_arrays(state), spec)


def test_truncated_array_bytes_are_refused(state, spec):
    record = adapter_to_arrays(state)
    good = packed(record)
    record[ADAPTER_KEY] = Array(dtype=good.dtype, shape=good.shape, stype=good.stype, data=good.data[:-7])

    with pytest.raises(InvalidAdapter, match="'adapter' carries 409 bytes; expected exactly 416"):
        arrays_to_adapter(record, spec)


def test_a_header_that_lies_about_its_values_does_not_decode(state, spec):
    header = io.BytesIO()
    npy.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (100,)})
    data = header.getvalue() + flat(state).tobytes()  # exactly the expected size, but 100 values claimed
    record = adapter_to_arrays(state)
    record[ADAPTER_KEY] = Array(dtype="float32", shape=(72,), stype=packed(record).stype, data=data)

    with pytest.raises(InvalidAdapter, match="'adapter' does not decode as a NumPy array"):
        arrays_to_adapter(record, spec)


def test_oversized_array_bytes_are_refused_before_decoding(state, spec):
    record = adapter_to_arrays(state)
    good = packed(record)
    record[ADAPTER_KEY] = Array(dtype=good.dtype, shape=good.shape, stype=good.stype, data=good.data + bytes(10_000))

    with pytest.raises(InvalidAdapter, match="carries 10416 bytes"):
        arrays_to_adapter(record, spec)


class _Payload:
    """Unpickling this would create a marker file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_pickled_object_array_is_never_unpickled(state, spec, tmp_path):
    live = tmp_path / "live"
    buffer = io.BytesIO()
    np.save(buffer, np.array([_Payload(tmp_path / "unpickled")], dtype=object), allow_pickle=True)
    data = buffer.getvalue() + bytes(416 - len(buffer.getvalue()))  # padded to the size a float32 adapter has
    record = adapter_to_arrays(state)
    record[ADAPTER_KEY] = Array(dtype="float32", shape=(72,), stype=packed(record).stype, data=data)

    with pytest.raises(InvalidAdapter, match="does not decode"):
        arrays_to_adapter(record, spec)
    assert not (tmp_path / "unpickled").exists()
    control = io.BytesIO()
    np.save(control, np.array([_Payload(live)], dtype=object), allow_pickle=True)
    np.load(io.BytesIO(control.getvalue()), allow_pickle=True)
    assert live.exists()  # the payload is live: only allow_pickle=False kept it out


def test_foreign_serialisation_type_is_refused(state, spec):
    record = adapter_to_arrays(state)
    good = packed(record)
    record[ADAPTER_KEY] = Array(dtype=good.dtype, shape=good.shape, stype="torch.pickle", data=good.data)

    with pytest.raises(InvalidAdapter, match="serialisation 'torch.pickle'"):
        arrays_to_adapter(record, spec)


@pytest.mark.parametrize(("arch", "targets"), [("seshu-tiny", ["in_proj"]),
                                              ("seshu-tiny", ["in_proj", "embeddings", "lm_head"]),
                                              ("seshu-tiny-mamba1", ["in_proj"])])
def test_a_real_lora_travels_and_the_node_derives_the_hubs_spec(tokenizer, tmp_path, arch, targets):
    # Prepare: a tiny base as the hub saves it, and its LoRA as the hub hands it out.
    lora, model_cfg = LoraConfig(target_modules=targets), load_config([f"model={arch}"]).model
    base = save_base(build_model(model_cfg, tokenizer), tokenizer, tmp_path / "base")
    model = attach_lora(build_model(model_cfg, tokenizer), lora, seed=1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()  # PEFT starts B at zero; a real hop carries trained values
    sent = adapter_state(model)

    # Execute: the node unpacks with the spec of its own LoRA on that base.
    node_spec = lora_spec(base, lora)
    received = arrays_to_adapter(adapter_to_arrays(sent), node_spec)

    # Assert
    assert node_spec == AdapterSpec.from_state(sent)  # what the hub validates against (HubWorkbench.spec)
    assert list(received) == sorted(sent) and all(torch.equal(received[k], sent[k]) for k in sent)
    node_model = attach_lora(build_model(model_cfg, tokenizer), lora, seed=2)
    load_adapter_state(node_model, received)
    assert all(torch.equal(v, sent[k]) for k, v in adapter_state(node_model).items())


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
