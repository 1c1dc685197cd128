"""Model factory: shipped shapes, reproducible init, save/load as a plain HF model, kernel policy."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Mamba2ForCausalLM, MambaForCausalLM

from fedem_flwr.config.loader import load_config
from fedem_flwr.config.schema import ModelConfig
from fedem_flwr.errors import ConfigError, KernelsUnavailable, ModelNotFound
from fedem_flwr.model.factory import (
    build_model,
    count_parameters,
    kernel_path,
    kernels_available,
    load_base,
    save_base,
)
from fedem_flwr.model.tokenizer import build_byte_tokenizer

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_seshu_tiny_is_mamba2_with_byte_vocab(tokenizer):
    cfg = load_config(["model=seshu-tiny"]).model

    model = build_model(cfg, tokenizer)

    assert isinstance(model, Mamba2ForCausalLM)
    assert model.config.vocab_size == 264  # 4 special tokens, 256 bytes, 4 chat role tokens
    assert (model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id) == (0, 1, 2)
    assert model.config.num_heads * model.config.head_dim == cfg.hidden_size * cfg.expand
    assert count_parameters(model) == 90_160
    assert kernel_path(model) == "pytorch"


@pytest.mark.parametrize(
    ("name", "cls", "expected"),
    [("seshu-130m", Mamba2ForCausalLM, 90_773_952), ("seshu-130m-mamba1", MambaForCausalLM, 90_925_824)],
)
def test_130m_shapes_on_meta_device(tokenizer, name, cls, expected):
    cfg = load_config([f"model={name}"]).model

    with torch.device("meta"):  # shapes only: no 360 MB allocation in a unit test
        model = build_model(cfg, tokenizer)

    assert isinstance(model, cls)
    assert count_parameters(model) == expected


def test_same_seed_same_weights_and_rng_untouched(tokenizer):
    cfg = ModelConfig()
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)

    a = build_model(cfg, tokenizer, seed=7)
    after = torch.rand(1)
    b = build_model(cfg, tokenizer, seed=7)
    c = build_model(cfg, tokenizer, seed=8)

    assert torch.equal(before, after)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_mamba1_forward_backward(tokenizer):
    model = build_model(load_config(["model=seshu-tiny-mamba1"]).model, tokenizer)
    ids = torch.randint(4, 260, (2, 16))

    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()

    assert torch.isfinite(loss)
    assert model.backbone.layers[0].mixer.in_proj.weight.grad.abs().sum() > 0


def test_save_base_loads_with_plain_transformers(tokenizer, tmp_path):
    # Prepare
    model = build_model(ModelConfig(), tokenizer, seed=3)
    resolved = {"seed": 3, "model": {"name": "seshu-tiny"}}

    # Execute
    folder = save_base(model, tokenizer, tmp_path / "base", resolved_config=resolved)
    plain = AutoModelForCausalLM.from_pretrained(folder)
    plain_tok = AutoTokenizer.from_pretrained(folder)
    loaded, loaded_tok = load_base(str(folder))

    # Assert
    assert (folder / "model.safetensors").is_file()
    assert not list(folder.glob("*.bin"))
    text = (folder / "fedem_config.json").read_text()
    assert json.loads(text) == resolved and text.index('"model"') < text.index('"seed"')
    ids = plain_tok("नमस्ते 🙂", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        assert torch.allclose(plain(input_ids=ids).logits, expected, atol=1e-6)
        assert torch.allclose(loaded(input_ids=ids).logits, expected, atol=1e-6)
    assert len(loaded_tok) == 264


def test_build_model_from_pretrained_folder(tokenizer, tmp_path):
    source = build_model(ModelConfig(), tokenizer, seed=5)
    save_base(source, tokenizer, tmp_path)

    model = build_model(ModelConfig(pretrained=str(tmp_path)), tokenizer)

    assert torch.equal(model.lm_head.weight, source.lm_head.weight)


def test_missing_base_folder_is_model_not_found(tmp_path):
    missing = tmp_path / "no-such-base"

    with pytest.raises(ModelNotFound, match="no-such-base"):
        load_base(str(missing))


def test_folder_without_config_is_model_not_found(tmp_path):
    (tmp_path / "README.md").write_text("not a model")

    with pytest.raises(ModelNotFound, match="config.json"):
        load_base(str(tmp_path))


def test_unknown_model_name_is_config_error():
    with pytest.raises(ConfigError, match="seshu-huge"):
        load_config(["model=seshu-huge"])


def test_tokenizer_larger_than_pretrained_vocab_is_refused(tokenizer, tmp_path):
    save_base(build_model(ModelConfig(), tokenizer), tokenizer, tmp_path)
    bigger = build_byte_tokenizer(["abab abab cdcd cdcd"] * 5, bpe_merges=4)

    with pytest.raises(ConfigError, match="tokenizer has"):
        build_model(ModelConfig(pretrained=str(tmp_path)), bigger)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_require_kernels_without_cuda_is_a_clear_error(tokenizer):
    with pytest.raises(KernelsUnavailable, match="CUDA is not available"):
        build_model(ModelConfig(kernels="require"), tokenizer)


class _RecordKernelLookups:
    """A meta-path finder that records every attempt to find (hence import) a kernel package."""

    def __init__(self):
        self.seen = []

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("mamba_ssm", "causal_conv1d"):
            self.seen.append(name)
        return None


def test_kernels_available_never_looks_for_mamba_ssm_without_cuda(monkeypatch):
    recorder = _RecordKernelLookups()
    monkeypatch.setattr(sys, "meta_path", [recorder, *sys.meta_path])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("mamba_ssm", "causal_conv1d"):
        monkeypatch.delitem(sys.modules, name, raising=False)

    assert kernels_available() is False and kernels_available("mamba") is False
    assert recorder.seen == []
    assert "mamba_ssm" not in sys.modules


@needs_cuda
def test_kernel_path_on_cuda_matches_availability(tokenizer):
    model = build_model(ModelConfig(), tokenizer).cuda()

    assert kernel_path(model) == ("fused" if kernels_available() else "pytorch")


@needs_cuda
def test_kernels_never_runs_the_pytorch_path_on_cuda(tokenizer, monkeypatch):
    from fedem_flwr.model import factory

    monkeypatch.setattr(factory, "_pytorch_only", set())  # `never` holds for the process: not past this test
    model = build_model(ModelConfig(kernels="never"), tokenizer).cuda()
    ids = torch.randint(4, 260, (2, 32), device="cuda")

    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()

    assert kernel_path(model) == "pytorch"
    assert torch.isfinite(loss)


def test_kernels_available_names_an_unknown_architecture():
    with pytest.raises(ConfigError, match="`model.arch` is 'mamba3'"):
        kernels_available("mamba3")


def test_a_routed_op_runs_the_kernel_for_cuda_tensors_and_the_reference_otherwise(monkeypatch):
    # transformers' decorator binding json.dumps as the "kernel"; the reference names one keyword only
    from transformers.integrations import use_kernel_func_from_hub_with_fallback

    from fedem_flwr.model import factory

    @use_kernel_func_from_hub_with_fallback("dumps", "json")
    def op(x, scale=1, **kwargs):
        return ("reference", sum(x) * scale, sorted(kwargs))

    # Execute
    dispatch = factory._by_device(op, "mamba2")

    # Assert: off CUDA the reference runs, with the keywords it names, and refuses packed sequences
    assert dispatch.__wrapped__ is op.__wrapped__
    assert dispatch([1, 2], scale=2, dt_limit=(0, 1)) == ("reference", 6, [])
    with pytest.raises(ValueError, match="`op` on the PyTorch path cannot keep packed sequences apart"):
        dispatch([1], seq_idx=[0])
    # Assert: on CUDA transformers' op runs its kernel, unless `never` holds the architecture
    monkeypatch.setattr(factory, "_on_cuda", lambda args, kwargs: True)
    assert dispatch([1, 2], scale=2) == "[1, 2]"
    monkeypatch.setattr(factory, "_pytorch_only", {"mamba2"})
    assert dispatch([1, 2], scale=2) == ("reference", 6, [])
