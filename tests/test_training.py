"""The fine-tuning loop and the held-out evaluator, on tiny Mamba-2 models on one CPU thread."""

from __future__ import annotations

import dataclasses
import itertools
import math
import time

import datasets
import pytest
import torch

from fedem_flwr.config.schema import LoraConfig, ModelConfig, TrainConfig
from fedem_flwr.data.blocks import heldout_split, tokenize_blocks
from fedem_flwr.data.chat import chat_blocks
from fedem_flwr.data.corpus import column, load_corpus
from fedem_flwr.data.labels import inputs_of
from fedem_flwr.errors import ConfigError, DataError, TrainingError
from fedem_flwr.gate.loss import evaluate, mean_loss
from fedem_flwr.model.factory import build_model
from fedem_flwr.model.lora import attach_lora
from fedem_flwr.training.device import pick_device, pick_precision
from fedem_flwr.training.finetune import is_out_of_memory, lr_at, optimizer_step, shrink_micro_batch, train

datasets.disable_progress_bars()
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SMALL = ModelConfig(hidden_size=32, num_hidden_layers=1, state_size=8, head_dim=16, chunk_size=16)
QUICK = TrainConfig(max_steps=3, batch_size=4, warmup_steps=1, progress=False, device="cpu")


@pytest.fixture(scope="module")
def pad_id(tokenizer):
    return tokenizer.pad_token_id


@pytest.fixture(scope="module")
def blocks(tokenizer):
    texts = ["hello world, how are you?", "नमस्ते, आप कैसे हैं?", "నమస్తే, మీరు ఎలా ఉన్నారు?", "你好，你好吗？"] * 4
    return tokenize_blocks(texts, tokenizer, block_size=32)


def tiny_lora(tokenizer, seed: int = 0, cfg: ModelConfig = SMALL):
    """A tiny Mamba-2 with a LoRA adapter, both initialised from ``seed`` (PEFT draws lora_A from
    the global RNG, so it is seeded here; the caller's RNG is left as it was)."""
    model = build_model(cfg, tokenizer, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return attach_lora(model, LoraConfig())


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class StepClock:
    """A clock that advances ``tick`` seconds at every reading: the loop reads it once a step."""

    def __init__(self, tick: float = 1.0):
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        value = self.now
        self.now += self.tick
        return value


# -- the acceptance check: 50 steps lower held-out loss -------------------------------------------
@pytest.mark.slow  # fifty real optimizer steps
def test_fifty_lora_steps_on_the_demo_corpus_lower_heldout_loss(config, tokenizer, pad_id):
    # Prepare: the embedded defaults (seshu-tiny, LoRA on in_proj, chatterbot-corpus, train/default)
    corpus = load_corpus(config.data)
    split = heldout_split(
        corpus, config.data.heldout_fraction, config.data.min_heldout_blocks, config.data.block_size,
        tokenizer, key=b"hub secret-derived key",
    )
    train_rows, heldout = split.train, split.heldout
    # Up to 8 blocks a language keeps both evaluations near a second (all 21 languages still count).
    heldout = {lang: blocks[:8] for lang, blocks in heldout.items()}
    blocks = tokenize_blocks(column(train_rows, "text"), tokenizer, config.data.block_size)
    model = build_model(config.model, tokenizer, seed=config.seed)
    torch.manual_seed(config.seed)  # PEFT draws lora_A from the global RNG
    model = attach_lora(model, config.lora)
    before = evaluate(model, heldout, pad_id=pad_id, batch_size=config.train.eval_batch_size)

    # Execute
    started = time.monotonic()
    result = train(model, blocks, config.train, pad_id=pad_id, seed=config.seed, progress=False)
    seconds = time.monotonic() - started
    after = evaluate(model, heldout, pad_id=pad_id, batch_size=config.train.eval_batch_size)

    # Assert
    print(f"held-out loss {mean_loss(before):.3f} -> {mean_loss(after):.3f}; train loss "
          f"{result.loss_first:.3f} -> {result.loss_last:.3f}; {seconds:.1f} s, {result.tokens_per_second:.0f} tok/s")
    assert (result.steps, result.stopped_by) == (50, "max_steps")
    assert 0.99 * 50 * 8 * 128 <= result.tokens <= 50 * 8 * 128  # only the last block has padding
    assert mean_loss(after) < mean_loss(before) - 0.3
    improved = [lang for lang in heldout if after[lang]["loss"] < before[lang]["loss"]]
    assert len(improved) >= 0.9 * len(heldout)


# -- the loop -------------------------------------------------------------------------------------
def test_training_is_deterministic_given_seed(tokenizer, blocks, pad_id):
    first, second, other = (tiny_lora(tokenizer) for _ in range(3))

    r1 = train(first, blocks, QUICK, pad_id=pad_id, seed=7)
    r2 = train(second, blocks, QUICK, pad_id=pad_id, seed=7)
    train(other, blocks, QUICK, pad_id=pad_id, seed=8)

    w1, w2, w3 = trainable(first), trainable(second), trainable(other)
    assert all(torch.equal(w1[n], w2[n]) for n in w1)
    assert r1.loss_first == r2.loss_first and r1.loss_last == r2.loss_last
    assert any(not torch.equal(w1[n], w3[n]) for n in w1)  # another seed draws other batches


def test_only_trainable_parameters_change_and_modes_are_restored(tokenizer, blocks, pad_id):
    model = tiny_lora(tokenizer)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora = trainable(model)
    model.eval()

    train(model, blocks, QUICK, pad_id=pad_id)

    assert not model.training
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert all(not torch.equal(p, lora[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_full_training_works_without_lora(tokenizer, blocks, pad_id):
    model = build_model(SMALL, tokenizer)
    weights = trainable(model)

    result = train(model, blocks, QUICK, pad_id=pad_id)

    assert result.steps == 3 and math.isfinite(result.loss_last)
    assert all(not torch.equal(p, weights[n]) for n, p in model.named_parameters() if n.endswith("in_proj.weight"))


def test_deadline_stops_before_a_step_that_would_overrun(tokenizer, blocks, pad_id):
    cfg = dataclasses.replace(QUICK, max_steps=100)

    result = train(tiny_lora(tokenizer), blocks, cfg, pad_id=pad_id, deadline=4.5, clock=StepClock())

    # Steps take 1 s on this clock: after step 4 it reads 4, and a fifth would end at 5 > 4.5.
    assert (result.steps, result.stopped_by, result.seconds) == (4, "deadline", 4.0)


def test_max_seconds_stops_training(tokenizer, blocks, pad_id):
    cfg = dataclasses.replace(QUICK, max_steps=100, max_seconds=2.5)

    result = train(tiny_lora(tokenizer), blocks, cfg, pad_id=pad_id, clock=StepClock())

    assert (result.steps, result.stopped_by) == (2, "max_seconds")


def test_a_passed_deadline_trains_nothing(tokenizer, blocks, pad_id):
    model = tiny_lora(tokenizer)
    weights = trainable(model)

    result = train(model, blocks, QUICK, pad_id=pad_id, deadline=-1.0, clock=StepClock())

    assert (result.steps, result.tokens, result.stopped_by) == (0, 0, "deadline")
    assert math.isnan(result.loss_first) and math.isnan(result.loss_last)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_progress_bar_shows_loss_and_throughput(tokenizer, blocks, pad_id, capsys):
    train(tiny_lora(tokenizer), blocks, dataclasses.replace(QUICK, max_steps=2), pad_id=pad_id, progress=True)

    err = capsys.readouterr().err
    assert "loss=" in err and "tok_s=" in err and "lr=" in err


def test_gradient_checkpointing_gives_the_same_step(tokenizer, blocks, pad_id):
    plain, checkpointed = tiny_lora(tokenizer), tiny_lora(tokenizer)
    calls = {"plain": 0, "checkpointed": 0}
    for name, model in (("plain", plain), ("checkpointed", checkpointed)):
        # A pre-hook inside the checkpointed block: the recomputation stops early, before a post-hook.
        layer = model.get_base_model().backbone.layers[0].mixer
        layer.register_forward_pre_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))

    train(plain, blocks, QUICK, pad_id=pad_id)
    train(checkpointed, blocks, dataclasses.replace(QUICK, gradient_checkpointing=True), pad_id=pad_id)

    assert calls == {"plain": 3, "checkpointed": 6}  # the backward pass reran each layer's forward
    a, b = trainable(plain), trainable(checkpointed)
    assert all(torch.allclose(a[n], b[n], atol=1e-6) for n in a)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in checkpointed.modules())  # off again


def test_bad_inputs_are_clear_errors(tokenizer, blocks, pad_id):
    frozen = build_model(SMALL, tokenizer)
    for p in frozen.parameters():
        p.requires_grad_(False)

    with pytest.raises(TrainingError, match="no trainable parameters"):
        train(frozen, blocks, QUICK, pad_id=pad_id)
    with pytest.raises(DataError, match=r"\(0, 32\)"):
        train(tiny_lora(tokenizer), blocks[:0], QUICK, pad_id=pad_id)


# -- schedule and out-of-memory fallback (pure logic) ---------------------------------------------
def test_lr_warms_up_linearly_then_follows_a_cosine_to_the_floor():
    cfg = TrainConfig(max_steps=10, warmup_steps=2, lr=1.0, min_lr_ratio=0.1)

    lrs = [lr_at(step, cfg) for step in range(11)]

    assert lrs[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert lrs[6] == pytest.approx(0.1 + 0.5 * 0.9)  # half-way down the cosine
    assert lrs[10] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))


@pytest.mark.parametrize(
    ("pair", "expected"),
    [((8, 1), (4, 2)), ((4, 2), (2, 4)), ((2, 4), (1, 8)), ((1, 8), None), ((6, 1), (3, 2)),
     ((5, 1), (1, 5)), ((12, 2), (6, 4))],
)
def test_out_of_memory_halves_the_micro_batch_and_keeps_the_step(pair, expected):
    assert shrink_micro_batch(*pair) == expected


def test_shrinking_always_keeps_the_effective_batch():
    for micro, accum in itertools.product(range(1, 33), range(1, 5)):
        smaller = shrink_micro_batch(micro, accum)
        if smaller is not None:
            assert smaller[0] <= micro // 2 and smaller[0] * smaller[1] == micro * accum


class OutOfMemoryAbove(torch.nn.Module):
    """Raises the out-of-memory error a GPU raises, for micro-batches above ``limit`` (on a CPU)."""

    def __init__(self, model: torch.nn.Module, limit: int):
        super().__init__()
        self.model, self.limit = model, limit

    def forward(self, input_ids, **kwargs):
        if input_ids.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"out of memory at micro-batch {input_ids.shape[0]}")
        return self.model(input_ids=input_ids, **kwargs)


def test_out_of_memory_mid_training_retries_smaller_with_the_same_result(tokenizer, blocks, pad_id):
    cfg = dataclasses.replace(QUICK, batch_size=8, grad_accum=1)
    squeezed, reference = tiny_lora(tokenizer), tiny_lora(tokenizer)

    result = train(OutOfMemoryAbove(squeezed, limit=2), blocks, cfg, pad_id=pad_id)
    train(reference, blocks, dataclasses.replace(cfg, batch_size=2, grad_accum=4), pad_id=pad_id)

    assert (result.steps, result.micro_batch, result.grad_accum) == (3, 2, 4)
    a, b = trainable(squeezed), trainable(reference)
    assert all(torch.allclose(a[n], b[n], atol=1e-6) for n in a)  # the step's loss ignores the split


def test_out_of_memory_is_recognised_whoever_reports_it():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("CUDA out of memory"))


def test_out_of_memory_at_micro_batch_one_is_a_training_error(tokenizer, blocks, pad_id):
    with pytest.raises(TrainingError, match="micro-batch 1"):
        train(OutOfMemoryAbove(tiny_lora(tokenizer), limit=0), blocks, QUICK, pad_id=pad_id)


# -- evaluation -----------------------------------------------------------------------------------
def test_padding_never_counts_in_the_heldout_loss(tokenizer, pad_id):
    model = tiny_lora(tokenizer)
    texts = ["ఒకటి రెండు మూడు", "one two three four"]
    short = tokenize_blocks(texts, tokenizer, block_size=64)  # one block, padded
    long = tokenize_blocks(texts, tokenizer, block_size=128)  # the same tokens, more padding

    a = evaluate(model, {"x": short}, pad_id=pad_id)["x"]
    b = evaluate(model, {"x": long}, pad_id=pad_id)["x"]

    real = int((short != pad_id).sum())
    assert a["tokens"] == b["tokens"] == real - 1  # every real token but the first is a target
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    assert a["perplexity"] == pytest.approx(math.exp(a["loss"]))


def test_heldout_loss_is_token_weighted_whatever_the_batch(tokenizer, blocks, pad_id):
    model = tiny_lora(tokenizer)
    model.train()

    one = evaluate(model, {"mix": blocks}, pad_id=pad_id, batch_size=1)
    many = evaluate(model, {"mix": blocks}, pad_id=pad_id, batch_size=16)

    assert one["mix"]["loss"] == pytest.approx(many["mix"]["loss"], abs=1e-5)
    assert model.training  # mode restored


def test_mean_loss_by_tokens_or_by_language():
    results = {"a": {"loss": 1.0, "tokens": 10.0}, "b": {"loss": 4.0, "tokens": 30.0}}

    assert mean_loss(results) == pytest.approx(3.25)
    assert mean_loss(results, weighting="language") == pytest.approx(2.5)
    assert mean_loss(results, ["a"]) == pytest.approx(1.0)
    with pytest.raises(KeyError, match="'c'"):
        mean_loss(results, ["a", "c"])


# -- device and precision -------------------------------------------------------------------------
def test_cpu_precision_choices():
    cpu = torch.device("cpu")

    assert pick_device("cpu") == cpu
    assert pick_precision("auto", cpu) is None  # fp32 on a CPU
    assert pick_precision("fp32", cpu) is None
    assert pick_precision("bf16", cpu) is torch.bfloat16
    with pytest.raises(ConfigError, match="`train.precision` is 'fp16' on cpu"):
        pick_precision("fp16", cpu)
    with pytest.raises(ConfigError, match="`train.device` is 'tpu'"):
        pick_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_asking_for_cuda_without_one_names_the_key():
    assert pick_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="`train.device` is 'cuda' but this torch sees no CUDA GPU"):
        pick_device("cuda")


# -- GPU ------------------------------------------------------------------------------------------
@pytest.mark.gpu
@needs_cuda
def test_cuda_training_in_bf16_keeps_lora_in_fp32_and_releases_memory(tokenizer, blocks, pad_id):
    model = tiny_lora(tokenizer)
    cfg = dataclasses.replace(QUICK, device="cuda", max_steps=20, lr=1e-2)

    result = train(model, blocks, cfg, pad_id=pad_id)

    assert pick_precision("auto", torch.device("cuda")) in (torch.bfloat16, None)
    assert all(p.dtype == torch.float32 and p.device.type == "cuda" for p in model.parameters() if p.requires_grad)
    assert result.loss_last < result.loss_first
    assert torch.cuda.memory_reserved() - torch.cuda.memory_allocated() < 64 << 20  # cache handed back


@pytest.mark.gpu
@needs_cuda
def test_cuda_auto_batch_size_takes_the_whole_step_when_it_fits(tokenizer, blocks, pad_id):
    cfg = dataclasses.replace(QUICK, device="cuda", batch_size=2, grad_accum=4, auto_batch_size=True)

    result = train(tiny_lora(tokenizer), blocks, cfg, pad_id=pad_id)

    assert (result.micro_batch, result.grad_accum) == (8, 1)


@pytest.mark.gpu
@needs_cuda
def test_cuda_fp16_uses_loss_scaling(tokenizer, blocks, pad_id):
    cfg = dataclasses.replace(QUICK, device="cuda", precision="fp16", max_steps=10)

    result = train(tiny_lora(tokenizer), blocks, cfg, pad_id=pad_id)

    assert math.isfinite(result.loss_last)


# -- masked blocks: conversations, scored on the assistant's tokens only ----------------------------
CONVERSATIONS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi there"},
     {"role": "assistant", "content": "hello!"}],
    [{"role": "user", "content": "नमस्ते"}, {"role": "assistant", "content": "नमस्ते, कैसे हैं?"},
     {"role": "user", "content": "ठीक"}, {"role": "assistant", "content": "अच्छा"}],
] * 3


def hand_masked_loss(model, blocks: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the assistant's tokens, written out: position t predicts token t + 1,
    and only tokens stored as ids (not ~id, not padding) are scored."""
    ids = torch.where(blocks < 0, -blocks - 1, blocks)
    logits = model(input_ids=ids, use_cache=False).logits.float()
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    scored = (blocks[:, 1:] >= 0) & (blocks[:, 1:] != pad_id)
    return losses[scored].sum(), int(scored.sum())


def test_the_heldout_loss_of_conversations_is_the_assistants_cross_entropy(tokenizer, pad_id):
    model = tiny_lora(tokenizer)
    blocks = chat_blocks(CONVERSATIONS, tokenizer, block_size=48)

    result = evaluate(model, {"en:chat": blocks}, pad_id=pad_id, batch_size=2)["en:chat"]

    with torch.no_grad():
        total, count = hand_masked_loss(model, blocks, pad_id)
    assert result["tokens"] == count < int((blocks != pad_id).sum()) - blocks.shape[0]
    assert result["loss"] == pytest.approx(total.item() / count, abs=1e-5)


class CapturingOptimizer:
    """Stands in for AdamW in ``optimizer_step``: keeps the gradients it would have stepped with."""

    def __init__(self, params):
        self.params, self.grads = params, []

    def step(self):
        self.grads = [p.grad.detach().clone() for p in self.params]

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


def test_a_training_step_on_conversations_learns_nothing_from_user_or_system_tokens(tokenizer, pad_id):
    # Prepare: a LoRA whose B is not zero, so every adapter weight has a gradient
    model = tiny_lora(tokenizer)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    params = [p for p in model.parameters() if p.requires_grad]
    masked = chat_blocks(CONVERSATIONS, tokenizer, block_size=48)

    def step(blocks: torch.Tensor) -> list[torch.Tensor]:
        capture = CapturingOptimizer(params)
        optimizer_step(model, blocks, 2, pad_id, torch.device("cpu"), None, capture, None, params, 0.0)
        return capture.grads

    # Execute: the production step; the hand-written loss over the assistant's tokens; every token scored
    grads = step(masked)
    total, count = hand_masked_loss(model, masked, pad_id)
    expected = torch.autograd.grad(total / count, params)
    unmasked = step(inputs_of(masked))

    # Assert: the step's gradient is the assistant tokens' alone (user and system targets add nothing)
    for got, want, every in zip(grads, expected, unmasked):
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-4)
    assert any(not torch.allclose(got, every, atol=1e-6) for got, every in zip(grads, unmasked))


def test_training_on_conversations_counts_every_token_it_reads(tokenizer, pad_id):
    blocks = chat_blocks(CONVERSATIONS, tokenizer, block_size=32)
    cfg = dataclasses.replace(QUICK, max_steps=1, batch_size=blocks.shape[0])

    result = train(tiny_lora(tokenizer), blocks, cfg, pad_id=pad_id)

    assert result.tokens == int((blocks != pad_id).sum())  # context tokens are read, so counted
    assert math.isfinite(result.loss_first)
