"""GPU path: LoRA stays correct under the fused kernels and bf16, and GPU-trained adapters move to a CPU.

Every test here is marked `gpu` and skipped where torch sees no CUDA device. Tests that need the
mamba-ssm / causal-conv1d kernels skip without them, or fail when FEDEM_REQUIRE_KERNELS=1 (as
scripts/gpu_check.sh sets, after installing them). Measured differences are printed, and appended as
JSON lines to $FEDEM_GPU_RECORD when set, so a passing run still reports its numbers.

Tolerances, kernel path against PyTorch path, on seshu-130m (random init, LoRA on in_proj), training
mode, same weights and tokens (relative L2 = ||kernel - pytorch|| / ||pytorch||):

    precision  loss (relative)  logits (relative L2)  LoRA gradient (relative L2)
    fp32       2e-3             1e-2                  3e-2
    bf16       2e-2             6e-2                  1.5e-1

fp32 is not exact because the Triton kernels may multiply in TF32 and sum in another order; bf16
autocast rounds every matrix product's inputs to 8 bits of mantissa on both paths, differently.
A GPU-trained adapter evaluated on the CPU must give the GPU's held-out loss within 2e-3 (relative).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fedem_flwr.config.loader import load_config
from fedem_flwr.config.schema import SAFE_TARGETS, LoraConfig, TrainConfig
from fedem_flwr.model.factory import build_model, kernel_path, kernels_available
from fedem_flwr.model.lora import attach_lora
from fedem_flwr.model.tokenizer import build_byte_tokenizer

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parent.parent
ARCHS = {"mamba2": "seshu-130m", "mamba1": "seshu-130m-mamba1"}
SEQ_LEN = {"mamba2": 512, "mamba1": 128}  # Mamba-1's PyTorch path is a sequential loop: keep it short
TOLERANCE = {"fp32": (2e-3, 1e-2, 3e-2), "bf16": (2e-2, 6e-2, 1.5e-1)}  # loss, logits, gradient
CPU_GPU_LOSS_RTOL = 2e-3
WORDS = ["mamba", "relay", "adapter", "hub", "lease", "विकास", "भाषा", "తెలుగు", "données", "modèle", "ஆய்வு", "সমুদায়"]


# ----------------------------------------------------------------------------- helpers
class _BlockKernels:
    """Meta-path finder that keeps the kernel packages from importing, so transformers binds its
    PyTorch references: the PyTorch path, independent of how the factory disables kernels."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("mamba_ssm", "causal_conv1d"):
            raise ModuleNotFoundError(f"{name} blocked for the PyTorch-path reference")
        return None


def _model_config(arch: str, kernels: str):
    return dataclasses.replace(load_config([f"model={ARCHS[arch]}"]).model, kernels=kernels)


def _tokens(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(4, 260, (batch, length), generator=torch.Generator().manual_seed(seed))


def _text_blocks(tokenizer, n_blocks: int, length: int, seed: int) -> torch.Tensor:
    """Multilingual word salad over a small vocabulary: learnable within a few steps."""
    rng = random.Random(seed)
    ids: list[int] = []
    while len(ids) < n_blocks * length:
        text = " ".join(rng.choice(WORDS) for _ in range(200))
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return torch.tensor(ids[: n_blocks * length]).view(n_blocks, length)


def _forward_backward(arch: str, precision: str, kernels: str) -> dict:
    """Loss, logits and LoRA-B gradient of one training-mode step on CUDA (LoRA B starts at zero,
    so its gradient is the signal; A's is zero until the first optimizer step)."""
    tokenizer = build_byte_tokenizer()
    model = build_model(_model_config(arch, kernels), tokenizer, seed=0)
    model = attach_lora(model, LoraConfig(target_modules=["in_proj"]), seed=1)  # the same A in both processes
    model.to("cuda").train()
    x = _tokens(2, SEQ_LEN[arch], seed=1).to("cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = model(input_ids=x, use_cache=False).logits
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    loss.backward()
    grad = torch.cat([p.grad.flatten() for n, p in sorted(model.named_parameters()) if "lora_B" in n])
    return {"loss": loss.detach().float().cpu().reshape(1), "logits": logits.detach().float().cpu(),
            "grad": grad.float().cpu(), "path": kernel_path(model)}


def _child_env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def _relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def kernels():
    """The fused kernels must import here; skip (or fail, with FEDEM_REQUIRE_KERNELS=1) otherwise."""
    if kernels_available("mamba2") and kernels_available("mamba"):
        return
    message = "mamba-ssm and causal-conv1d do not both import (install the `gpu` extra or the built wheels)"
    if os.environ.get("FEDEM_REQUIRE_KERNELS") == "1":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def record(request):
    """Print measured values and append them to $FEDEM_GPU_RECORD (JSON lines) when set."""
    def _record(**values):
        line = json.dumps({"test": request.node.name, **values}, default=float)
        print(line)
        if os.environ.get("FEDEM_GPU_RECORD"):
            with open(os.environ["FEDEM_GPU_RECORD"], "a", encoding="utf-8") as sink:
                sink.write(line + "\n")
    return _record


@pytest.fixture(scope="module")
def pytorch_reference(tmp_path_factory, kernels):
    """_forward_backward on the PyTorch path for every (arch, precision), from a fresh process."""
    from safetensors.torch import load_file

    out = tmp_path_factory.mktemp("reference") / "reference.safetensors"
    run = subprocess.run([sys.executable, __file__, "--reference", str(out)], env=_child_env(),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return load_file(str(out))


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_lora_parameter_learns_on_the_fused_path(arch, tokenizer, kernels):
    # Prepare: every safe target, bf16 autocast as a client trains
    model = build_model(_model_config(arch, "require"), tokenizer, seed=0)
    model = attach_lora(model, LoraConfig(target_modules=list(SAFE_TARGETS))).to("cuda").train()
    assert kernel_path(model) == "fused"
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x = _tokens(2, 256, seed=0).to("cuda")

    # Execute: one optimizer step (lora_B leaves zero), then the gradients of a second forward
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(input_ids=x, use_cache=False).logits
        F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).backward()
        if optimizer.state == {}:
            optimizer.step()

    # Assert: every LoRA tensor has a non-zero gradient, nothing else has one
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad for p in lora.values())
    silent = [n for n, p in lora.items() if p.grad is None or not torch.any(p.grad != 0)]
    assert silent == [], f"LoRA parameters without gradient on the fused path: {silent}"
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_fused_path_matches_pytorch_path(arch, precision, pytorch_reference, record):
    # Execute
    fused = _forward_backward(arch, precision, kernels="require")
    ref = {key: pytorch_reference[f"{arch}.{precision}.{key}"] for key in ("loss", "logits", "grad")}

    # Assert
    assert fused["path"] == "fused"
    loss_tol, logits_tol, grad_tol = TOLERANCE[precision]
    loss_err = abs(float(fused["loss"]) - float(ref["loss"])) / abs(float(ref["loss"]))
    logits_err = _relative_l2(fused["logits"], ref["logits"])
    grad_err = _relative_l2(fused["grad"], ref["grad"])
    record(arch=arch, precision=precision, loss_fused=float(fused["loss"]), loss_pytorch=float(ref["loss"]),
           loss_rel=loss_err, logits_rel_l2=logits_err, grad_rel_l2=grad_err)
    assert loss_err <= loss_tol, f"loss differs by {loss_err:.2e} (relative), allowed {loss_tol:.0e}"
    assert logits_err <= logits_tol, f"logits differ by {logits_err:.2e} (relative L2), allowed {logits_tol:.0e}"
    assert grad_err <= grad_tol, f"LoRA gradients differ by {grad_err:.2e} (relative L2), allowed {grad_tol:.0e}"


def test_kernels_never_forces_the_pytorch_path_in_a_fresh_process(kernels):
    # A fresh process: `never` must hold even before transformers' Mamba modules are imported.
    code = (
        "import torch\n"
        "from fedem_flwr.config.schema import ModelConfig\n"
        "from fedem_flwr.model.factory import build_model, kernel_path\n"
        "from fedem_flwr.model.tokenizer import build_byte_tokenizer\n"
        "model = build_model(ModelConfig(kernels='never'), build_byte_tokenizer()).cuda().train()\n"
        "model(input_ids=torch.randint(4, 260, (1, 64), device='cuda')).logits.sum().backward()\n"
        "print(kernel_path(model))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], env=_child_env(), capture_output=True, text=True, timeout=300)

    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[-1] == "pytorch"


CPU_NODE = """
import json, sys
class NoKernels:  # a CPU node has no kernel packages
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("mamba_ssm", "causal_conv1d"):
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, NoKernels())
from safetensors.torch import load_file
from fedem_flwr.config.loader import load_config
from fedem_flwr.model.tokenizer import build_byte_tokenizer
from fedem_flwr.model.factory import build_model
from fedem_flwr.model.lora import load_adapter
from fedem_flwr.gate.loss import evaluate
tokenizer = build_byte_tokenizer()
heldout = load_file(sys.argv[2])
base = build_model(load_config(["model=seshu-130m"]).model, tokenizer, seed=0)
base_loss = evaluate(base, heldout, pad_id=tokenizer.pad_token_id)["text"]["loss"]
model = load_adapter(base, sys.argv[1])
loss = evaluate(model, heldout, pad_id=tokenizer.pad_token_id)["text"]["loss"]
print(json.dumps({"base_loss": base_loss, "loss": loss}))
"""


def test_adapter_trained_on_gpu_gives_the_same_heldout_loss_on_a_cpu_node(tokenizer, tmp_path, record):
    from safetensors.torch import save_file

    from fedem_flwr.gate.loss import evaluate
    from fedem_flwr.model.lora import save_adapter
    from fedem_flwr.training.finetune import train

    # Prepare
    lora = LoraConfig(target_modules=["in_proj"])
    train_blocks, heldout = _text_blocks(tokenizer, 32, 256, seed=2), {"text": _text_blocks(tokenizer, 4, 256, seed=3)}
    model = attach_lora(build_model(_model_config("mamba2", "auto"), tokenizer, seed=0), lora).to("cuda")
    train_cfg = TrainConfig(max_steps=10, batch_size=4, lr=1e-2, warmup_steps=0, precision="bf16", device="cuda",
                            progress=False)

    # Execute: train and evaluate on the GPU; the adapter folder goes to a CPU-only process without kernels
    train(model, train_blocks, train_cfg, pad_id=tokenizer.pad_token_id)
    gpu_loss = evaluate(model, heldout, pad_id=tokenizer.pad_token_id)["text"]["loss"]
    save_adapter(model, tmp_path / "adapter", base_repo="fedem/seshu-130m", base_revision="v0")
    save_file(heldout, str(tmp_path / "heldout.safetensors"))
    env = dict(_child_env(), CUDA_VISIBLE_DEVICES="")
    run = subprocess.run([sys.executable, "-c", CPU_NODE, str(tmp_path / "adapter"), str(tmp_path / "heldout.safetensors")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    cpu = json.loads(run.stdout.strip().splitlines()[-1])

    # Assert: same loss on both, and the adapter did change it (so the comparison is not vacuous)
    record(path=kernel_path(model), gpu_loss=gpu_loss, cpu_loss=cpu["loss"], base_loss=cpu["base_loss"])
    assert abs(gpu_loss - cpu["loss"]) <= CPU_GPU_LOSS_RTOL * cpu["loss"]
    assert cpu["base_loss"] - cpu["loss"] > 10 * CPU_GPU_LOSS_RTOL * cpu["loss"]


def test_cpu_evaluation_and_training_work_in_a_process_with_kernels_bound(tokenizer, kernels):
    # The hub may evaluate on its CPU on a GPU machine: transformers has bound the CUDA kernels for
    # the whole process, and a CPU model must still take the PyTorch path.
    from fedem_flwr.gate.loss import evaluate

    model = attach_lora(build_model(_model_config("mamba2", "auto"), tokenizer, seed=0), LoraConfig())
    blocks = _tokens(2, 128, seed=7)

    loss = evaluate(model, {"x": blocks}, pad_id=tokenizer.pad_token_id)["x"]["loss"]
    model.train()
    model(input_ids=blocks, labels=blocks).loss.backward()

    assert kernel_path(model) == "pytorch" and math.isfinite(loss)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_cuda_model_runs_the_kernels_and_its_cpu_copy_the_reference_in_one_process(arch, tokenizer, kernels):
    # Prepare: one model, a CUDA copy and a CPU copy; the first mixer's output tells which op made it
    # (the kernels are autograd Functions: MambaSplitConv1dScanCombinedFn / MambaInnerFn)
    import copy

    cpu = build_model(_model_config(arch, "require"), tokenizer, seed=0).train()
    cuda = copy.deepcopy(cpu).to("cuda")
    x = _tokens(2, SEQ_LEN[arch], seed=8)
    made_by = {}
    for name, model in (("cpu", cpu), ("cuda", cuda)):
        model.backbone.layers[0].mixer.register_forward_hook(
            lambda module, args, out, name=name: made_by.__setitem__(name, type(out.grad_fn).__name__))

    # Execute
    losses = {name: float(model(input_ids=x.to(device), labels=x.to(device)).loss)
              for name, model, device in (("cpu", cpu, "cpu"), ("cuda", cuda, "cuda"))}

    # Assert
    assert kernel_path(cuda) == "fused" and kernel_path(cpu) == "pytorch"
    assert "Mamba" in made_by["cuda"] and "Mamba" not in made_by["cpu"], made_by
    assert abs(losses["cuda"] - losses["cpu"]) <= TOLERANCE["fp32"][0] * losses["cpu"], losses


def test_bf16_training_keeps_lora_weights_fp32_and_releases_memory(tokenizer, record):
    from fedem_flwr.training.finetune import train

    # Prepare
    model = attach_lora(build_model(_model_config("mamba2", "auto"), tokenizer), LoraConfig()).to("cuda")
    before = torch.cuda.memory_allocated()
    cfg = TrainConfig(max_steps=3, batch_size=4, precision="bf16", device="cuda", warmup_steps=0, progress=False)

    # Execute
    result = train(model, _tokens(16, 512, seed=4), cfg, pad_id=tokenizer.pad_token_id)

    # Assert
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and {p.dtype for p in lora.values()} == {torch.float32}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert result.steps == 3 and math.isfinite(result.loss_last)
    after = torch.cuda.memory_allocated()
    record(allocated_before_mib=before / 2**20, allocated_after_mib=after / 2**20, tokens_per_s=result.tokens_per_second)
    assert after - before <= 16 * 2**20, "optimizer state or activations outlived train()"


@pytest.mark.parametrize("auto_batch_size", [False, True])
def test_out_of_memory_mid_training_retries_with_a_smaller_micro_batch(tokenizer, auto_batch_size, record):
    from fedem_flwr.training.finetune import train

    # Prepare: measure what one micro-batch of 2 x 1024 costs, then cap this process's GPU memory
    # so that a micro-batch of 16 cannot fit but 2 can: a real CUDA out-of-memory, not a simulated one.
    model = attach_lora(build_model(_model_config("mamba2", "auto"), tokenizer), LoraConfig()).to("cuda")
    blocks = _tokens(32, 1024, seed=5)
    probe = TrainConfig(max_steps=1, batch_size=2, precision="bf16", device="cuda", warmup_steps=0, progress=False)
    train(model, blocks, probe, pad_id=tokenizer.pad_token_id)  # also compiles the kernels
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    train(model, blocks, probe, pad_id=tokenizer.pad_token_id)
    per_two = torch.cuda.max_memory_allocated() - base
    total = torch.cuda.get_device_properties(0).total_memory
    if auto_batch_size:
        cfg = dataclasses.replace(probe, max_steps=2, batch_size=4, grad_accum=4, auto_batch_size=True)
    else:
        cfg = dataclasses.replace(probe, max_steps=2, batch_size=16)

    # Execute
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(min(1.0, (base + 3 * per_two + 256 * 2**20) / total))
    try:
        result = train(model, blocks, cfg, pad_id=tokenizer.pad_token_id)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()

    # Assert: the lease's steps all ran, with a smaller micro-batch and the same effective batch
    record(auto_batch_size=auto_batch_size, per_micro_batch_of_two_mib=per_two / 2**20,
           micro_batch=result.micro_batch, grad_accum=result.grad_accum)
    assert result.steps == 2
    assert 1 <= result.micro_batch < 16 and result.micro_batch * result.grad_accum == 16


def test_gradient_checkpointing_lowers_peak_memory_on_the_fused_path(tokenizer, kernels, record):
    from fedem_flwr.training.finetune import train

    peaks = {}
    for checkpointing in (False, True):
        model = attach_lora(build_model(_model_config("mamba2", "require"), tokenizer), LoraConfig()).to("cuda")
        cfg = TrainConfig(max_steps=1, batch_size=8, precision="bf16", device="cuda", warmup_steps=0,
                          gradient_checkpointing=checkpointing, progress=False)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = train(model, _tokens(8, 2048, seed=6), cfg, pad_id=tokenizer.pad_token_id)
        peaks[checkpointing] = torch.cuda.max_memory_allocated() - base
        assert result.steps == 1 and math.isfinite(result.loss_last)
        del model

    record(peak_mib_plain=peaks[False] / 2**20, peak_mib_checkpointing=peaks[True] / 2**20)
    assert peaks[True] < 0.7 * peaks[False]


# ----------------------------------------------------------------------------- reference child
def _write_reference(out: str) -> None:
    """Compute _forward_backward on the PyTorch path for all cases (run in a fresh process)."""
    from safetensors.torch import save_file

    sys.meta_path.insert(0, _BlockKernels())
    tensors = {}
    for arch in ARCHS:
        for precision in TOLERANCE:
            result = _forward_backward(arch, precision, kernels="never")
            assert result["path"] == "pytorch", result["path"]
            for key in ("loss", "logits", "grad"):
                tensors[f"{arch}.{precision}.{key}"] = result[key].contiguous()
    save_file(tensors, out)


if __name__ == "__main__" and sys.argv[1:2] == ["--reference"]:
    _write_reference(sys.argv[2])
