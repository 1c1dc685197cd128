"""LoRA core: safe targets only, every LoRA weight learns, state and folders round-trip, bad input refused."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from fedem_flwr.config.loader import load_config
from fedem_flwr.config.schema import SAFE_TARGETS, LoraConfig, ModelConfig, check_targets
from fedem_flwr.errors import ConfigError, InvalidAdapter, UnsafeLoraTarget
from fedem_flwr.model.adapter_spec import AdapterSpec, load_adapter_file, validate_adapter_state
from fedem_flwr.model.factory import build_model, count_parameters
from fedem_flwr.model.lora import (
    adapter_state,
    attach_lora,
    load_adapter,
    load_adapter_state,
    peft_config,
    save_adapter,
)

ALL_SAFE = LoraConfig(target_modules=list(SAFE_TARGETS))


MODELS = {"seshu-tiny": ModelConfig(), "seshu-tiny-mamba1": load_config(["model=seshu-tiny-mamba1"]).model}


def tiny(tokenizer, seed=0, arch="seshu-tiny"):
    return build_model(MODELS[arch], tokenizer, seed=seed)


def batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(4, 260, (2, 24), generator=generator)


@pytest.mark.parametrize("target", ["out_proj", "x_proj", "dt_proj", "conv1d", "all-linear", "mixer.in_proj"])
def test_unsafe_targets_are_refused_with_reason(target):
    with pytest.raises(UnsafeLoraTarget) as err:
        check_targets(["in_proj", target])

    message = str(err.value)
    assert repr(target) in message and "'in_proj', 'embeddings', 'lm_head'" in message
    assert "fused" in message and "CPU and GPU" in message


def test_unsafe_target_fails_at_config_load():
    with pytest.raises(UnsafeLoraTarget, match="out_proj"):
        load_config(["lora.target_modules=[in_proj,out_proj]"])


def test_peft_config_spells_out_targets():
    config = peft_config(ALL_SAFE)

    assert set(config.target_modules) == set(SAFE_TARGETS)
    assert (config.r, config.lora_alpha, config.task_type) == (8, 16, "CAUSAL_LM")


@pytest.mark.parametrize("arch", ["seshu-tiny", "seshu-tiny-mamba1"])
def test_every_lora_weight_gets_a_gradient_after_one_step(tokenizer, arch):
    # Prepare: at PEFT's init lora_B is zero, so lora_A's first gradient is zero; step once first.
    model = attach_lora(tiny(tokenizer, arch=arch), ALL_SAFE)
    model.train()
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(lora.values(), lr=1e-2)
    ids = batch()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()

    # Execute
    model(input_ids=ids, labels=ids).loss.backward()

    # Assert: only LoRA weights train, and every one of them (A and B, every target) learns
    assert lora and all("lora_" in name for name in lora)
    assert {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in lora} == set(SAFE_TARGETS)
    assert sum("lora_A" in n or "lora_embedding_A" in n for n in lora) == sum(
        "lora_B" in n or "lora_embedding_B" in n for n in lora)
    for name, param in lora.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_adapter_state_is_float32_cpu_contiguous_under_peft_names(tokenizer):
    model = attach_lora(tiny(tokenizer).to(torch.bfloat16), ALL_SAFE)

    state = adapter_state(model)

    assert all(v.dtype == torch.float32 and v.device.type == "cpu" and v.is_contiguous() for v in state.values())
    assert "base_model.model.backbone.layers.0.mixer.in_proj.lora_A.weight" in state
    assert "base_model.model.backbone.embeddings.lora_embedding_A" in state
    assert not any(".default." in key for key in state)
    assert sum(v.numel() for v in state.values()) == count_parameters(model, trainable_only=True)
    assert "base_model.model.lm_head.weight" not in state  # base matrices never travel


def test_load_adapter_state_round_trip(tokenizer):
    source = attach_lora(tiny(tokenizer), ALL_SAFE)
    with torch.no_grad():
        for name, param in source.named_parameters():
            if "lora_" in name:
                param.normal_()
    target = attach_lora(tiny(tokenizer), ALL_SAFE)

    load_adapter_state(target, adapter_state(source))

    for key, value in adapter_state(source).items():
        assert torch.equal(adapter_state(target)[key], value), key


def test_load_adapter_state_refuses_wrong_shape(tokenizer):
    model = attach_lora(tiny(tokenizer), ALL_SAFE)
    state = adapter_state(model)
    key = "base_model.model.lm_head.lora_B.weight"
    state[key] = torch.zeros(264, 4)

    with pytest.raises(InvalidAdapter, match=r"lm_head.lora_B.weight.*\(264, 4\).*\(264, 8\)"):
        load_adapter_state(model, state)


def _trained(tokenizer):
    model = attach_lora(tiny(tokenizer), ALL_SAFE)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.uniform_(-0.1, 0.1)
    return model


def test_save_adapter_is_a_standard_peft_folder(tokenizer, tmp_path):
    # Prepare
    model = _trained(tokenizer)
    ids = batch(1)
    with torch.no_grad():
        expected = model(input_ids=ids).logits

    # Execute
    folder = save_adapter(model, tmp_path / "adapter", "fedem/seshu-tiny", "v3", resolved_config={"seed": 0})
    plain = PeftModel.from_pretrained(tiny(tokenizer), folder)
    ours = load_adapter(tiny(tokenizer), folder)

    # Assert
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == ("fedem/seshu-tiny", "v3")
    assert str(tmp_path) not in (folder / "README.md").read_text()
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "fedem_config.json"]
    assert model.active_peft_config.revision is None  # the live model's config is left alone
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, expected, atol=1e-6)
        assert torch.allclose(ours(input_ids=ids).logits, expected, atol=1e-6)
    assert not any(p.requires_grad for p in ours.parameters())
    assert ours.active_peft_config.base_model_name_or_path == "fedem/seshu-tiny"


def test_load_adapter_trainable_for_the_next_leg(tokenizer, tmp_path):
    folder = save_adapter(_trained(tokenizer), tmp_path, "fedem/seshu-tiny", None)

    model = load_adapter(tiny(tokenizer), folder, is_trainable=True)

    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.parametrize("base_repo", ["/abs/base", "./rel", "C:\\base", "", "~/x", "fedem/..", "a/b/c"])
def test_save_adapter_refuses_local_base_paths(tokenizer, tmp_path, base_repo):
    with pytest.raises(ConfigError, match="base_repo"):
        save_adapter(attach_lora(tiny(tokenizer), LoraConfig()), tmp_path, base_repo, None)


def test_load_adapter_refuses_unsafe_target_in_folder(tokenizer, tmp_path):
    folder = save_adapter(attach_lora(tiny(tokenizer), LoraConfig()), tmp_path, "fedem/seshu-tiny", None)
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["target_modules"] = ["in_proj", "out_proj"]
    config_path.write_text(json.dumps(config))

    with pytest.raises(UnsafeLoraTarget, match="out_proj"):
        load_adapter(tiny(tokenizer), folder)


def test_load_adapter_with_nan_weights_is_refused(tokenizer, tmp_path):
    from safetensors.torch import save_file

    folder = save_adapter(_trained(tokenizer), tmp_path, "fedem/seshu-tiny", None)
    weights = folder / "adapter_model.safetensors"
    state = load_adapter_file(weights)
    key = sorted(state)[0]
    state[key][0, 0] = float("nan")
    save_file(state, str(weights))

    with pytest.raises(InvalidAdapter, match=rf"{key!r} has 1 non-finite"):
        load_adapter(tiny(tokenizer), folder)


def test_load_adapter_without_safetensors_is_refused(tokenizer, tmp_path):
    folder = save_adapter(_trained(tokenizer), tmp_path, "fedem/seshu-tiny", None)
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")

    with pytest.raises(InvalidAdapter, match="does not exist"):
        load_adapter(tiny(tokenizer), folder)


def test_spec_from_a_models_state_matches_it(tokenizer):
    model = attach_lora(tiny(tokenizer), LoraConfig(r=4))

    spec = AdapterSpec.from_state(adapter_state(model))

    assert spec.shapes["base_model.model.backbone.layers.1.mixer.in_proj.lora_B.weight"] == (296, 4)
    assert spec.max_bytes == spec.nbytes == 4 * count_parameters(model, trainable_only=True)
    assert validate_adapter_state(adapter_state(model), spec).keys() == spec.shapes.keys()


def test_lora_adds_only_trainable_parameters(tokenizer):
    base = tiny(tokenizer)
    before = count_parameters(base)

    model = attach_lora(base, LoraConfig())

    assert count_parameters(model) - count_parameters(model, trainable_only=True) == before


def test_seeded_adapter_is_reproducible_and_leaves_the_global_rng_alone(tokenizer):
    # Prepare
    torch.manual_seed(123)
    rng_before = torch.random.get_rng_state()

    # Execute
    first = adapter_state(attach_lora(tiny(tokenizer), ALL_SAFE, seed=7))
    again = adapter_state(attach_lora(tiny(tokenizer), ALL_SAFE, seed=7))
    other = adapter_state(attach_lora(tiny(tokenizer), ALL_SAFE, seed=8))
    rng_after = torch.random.get_rng_state()

    # Assert: same seed same adapter, another seed another one, the caller's RNG untouched
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert any(not torch.equal(first[key], other[key]) for key in first)
    assert torch.equal(rng_before, rng_after)


def test_unseeded_adapter_draws_from_the_global_rng(tokenizer):
    # Execute: the default keeps PEFT's behaviour, so the global seed decides the adapter
    states = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        states.append(adapter_state(attach_lora(tiny(tokenizer), ALL_SAFE)))

    # Assert
    assert all(torch.equal(states[0][key], states[1][key]) for key in states[0])
    assert any(not torch.equal(states[0][key], states[2][key]) for key in states[0])
