"""Merging LoRA adapters into seshu-tiny: exact against base + adapter, every method, trained adapters
of two languages, and the base gate on a harmful merge (real transformers and PEFT, one CPU thread)."""

from __future__ import annotations

import copy
import dataclasses

import datasets
import pytest
import torch

from fedem_flwr.config.loader import load_config
from fedem_flwr.config.schema import SAFE_TARGETS, LoraConfig, TrainConfig
from fedem_flwr.data.blocks import heldout_split, tokenize_blocks
from fedem_flwr.data.corpus import column, load_corpus
from fedem_flwr.gate.acceptance import decide_base
from fedem_flwr.gate.loss import evaluate
from fedem_flwr.lineage.merge import MergeError, WeightedAdapter, lora_deltas, merge_adapters
from fedem_flwr.model.factory import build_model
from fedem_flwr.model.lora import adapter_state, attach_lora
from fedem_flwr.training.finetune import train

datasets.disable_progress_bars()

IN_PROJ = LoraConfig()
ALL_SAFE = LoraConfig(target_modules=list(SAFE_TARGETS))
LANGUAGES = ("en", "ja", "es", "ko")  # two trained adapters (en, ja) and two languages neither trained on
TRAIN = TrainConfig(max_steps=30, batch_size=8, warmup_steps=3, progress=False, device="cpu")


@pytest.fixture(scope="module")
def config():
    return load_config()


@pytest.fixture(scope="module")
def base(config, tokenizer):
    return build_model(config.model, tokenizer, seed=0)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(4, 260, (2, 48), generator=torch.Generator().manual_seed(0))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def random_adapter(base, lora_cfg, seed):
    """``base`` (copied) with an adapter whose A and B are both random: a delta far from zero."""
    model = attach_lora(build_like(base), lora_cfg, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return model


def build_like(base):
    return copy.deepcopy(base)


# -- exactness -------------------------------------------------------------------------------------
@pytest.mark.parametrize("lora_cfg", [IN_PROJ, ALL_SAFE], ids=["in_proj", "in_proj+embeddings+lm_head"])
def test_merging_one_adapter_gives_the_logits_of_base_plus_adapter(base, ids, lora_cfg):
    # Prepare: the tiny model's embeddings and lm_head are separate matrices, so both can be merged
    assert base.config.tie_word_embeddings is False
    adapted = random_adapter(base, lora_cfg, seed=1)
    expected, before = logits(adapted, ids), logits(base, ids)

    # Execute
    result = merge_adapters(base, [WeightedAdapter("lang-en", 3, adapter_state(adapted))], lora_cfg)

    # Assert: the adapter matters, the merge reproduces it, and the input base is untouched
    assert (expected - before).abs().max() > 1.0
    assert (logits(result.model, ids) - expected).abs().max() < 1e-5
    assert torch.equal(logits(base, ids), before)
    assert result.model is not base and not hasattr(result.model, "peft_config")
    assert result.record() == {"method": "sum", "seed": None,
                               "absorbed": [{"name": "lang-en", "version": 3, "weight": 1.0, "method": "sum"}]}


def test_an_embedding_delta_is_the_transpose_of_b_at_a(base):
    state = adapter_state(random_adapter(base, ALL_SAFE, seed=2))
    deltas = lora_deltas(state, ALL_SAFE)

    a = state["base_model.model.backbone.embeddings.lora_embedding_A"]
    b = state["base_model.model.backbone.embeddings.lora_embedding_B"]
    assert deltas["backbone.embeddings.weight"].shape == base.backbone.embeddings.weight.shape
    torch.testing.assert_close(deltas["backbone.embeddings.weight"], 2.0 * (b @ a).T)
    head_a, head_b = state["base_model.model.lm_head.lora_A.weight"], state["base_model.model.lm_head.lora_B.weight"]
    torch.testing.assert_close(deltas["lm_head.weight"], 2.0 * head_b @ head_a)  # alpha 16 / r 8


@pytest.mark.parametrize("method", ["cat", "svd"])
def test_peft_cat_and_svd_agree_with_the_sum(base, ids, method):
    # Prepare: two adapters on every safe target, weights 1 and 0.5
    adapters = [WeightedAdapter("a", 1, adapter_state(random_adapter(base, ALL_SAFE, seed=3))),
                WeightedAdapter("b", 4, adapter_state(random_adapter(base, ALL_SAFE, seed=4)), 0.5)]

    # Execute
    summed = merge_adapters(base, adapters, ALL_SAFE, "sum")
    peft_merged = merge_adapters(base, adapters, ALL_SAFE, method)

    # Assert
    for (name, mine), (_, theirs) in zip(summed.model.named_parameters(), peft_merged.model.named_parameters()):
        torch.testing.assert_close(theirs, mine, atol=1e-5, rtol=0, msg=name)
    assert (logits(peft_merged.model, ids) - logits(summed.model, ids)).abs().max() < 1e-5
    assert [(a.name, a.version, a.weight, a.method) for a in peft_merged.absorbed] == [
        ("a", 1, 1.0, method), ("b", 4, 0.5, method)]


@pytest.mark.parametrize("method", ["ties_svd", "dare_ties_svd"])
def test_ties_and_dare_keep_one_adapter_whole_at_full_density(base, ids, method):
    adapted = random_adapter(base, IN_PROJ, seed=5)
    result = merge_adapters(base, [WeightedAdapter("a", 1, adapter_state(adapted))], IN_PROJ, method, density=1.0)
    assert (logits(result.model, ids) - logits(adapted, ids)).abs().max() < 1e-5


def test_dare_is_reproducible_with_its_recorded_seed_and_ties_trims(base):
    # Prepare
    adapters = [WeightedAdapter(f"a{i}", 1, adapter_state(random_adapter(base, IN_PROJ, seed=10 + i)))
                for i in range(2)]
    weight = "backbone.layers.0.mixer.in_proj.weight"

    def merged(method, seed=None):
        result = merge_adapters(base, adapters, IN_PROJ, method, seed=seed, density=0.5)
        return result, dict(result.model.named_parameters())[weight].detach()

    # Execute
    rng = torch.get_rng_state()
    dare, first = merged("dare_ties_svd", seed=7)
    assert torch.equal(torch.get_rng_state(), rng)  # the draw left the caller's RNG as it was
    _, again = merged("dare_ties_svd", seed=7)
    _, other = merged("dare_ties_svd", seed=8)
    drawn, fresh = merged("dare_ties_svd")
    _, replay = merged("dare_ties_svd", seed=drawn.seed)
    ties, trimmed = merged("ties_svd")
    _, summed = merged("sum")

    # Assert
    assert dare.seed == 7 and dare.record()["seed"] == 7
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert isinstance(drawn.seed, int) and torch.equal(fresh, replay)
    assert ties.seed is None and torch.equal(trimmed, merged("ties_svd")[1])
    assert not torch.allclose(trimmed, summed, atol=1e-4)


# -- trained adapters and the base gate -------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(config, tokenizer, base):
    """Two adapters trained 30 steps from the same base, one on English, one on Japanese."""
    split = heldout_split(load_corpus(config.data), config.data.heldout_fraction, config.data.min_heldout_blocks,
                          config.data.block_size, tokenizer, key=b"merge tests: a held-out split key")
    heldout = {lang: split.heldout[lang][:8] for lang in LANGUAGES}
    states = {}
    for seed, lang in enumerate(("en", "ja")):
        rows = split.train.filter(lambda row, lang=lang: row["language"] == lang)
        blocks = tokenize_blocks(column(rows, "text"), tokenizer, config.data.block_size)
        model = attach_lora(build_like(base), IN_PROJ, seed=seed)
        train(model, blocks, TRAIN, pad_id=tokenizer.pad_token_id, seed=seed)
        states[lang] = adapter_state(model)
    return states, heldout


def heldout_losses(model, heldout, pad_id):
    results = evaluate(model, heldout, pad_id=pad_id)
    return {lang: r["loss"] for lang, r in results.items()}, {lang: r["tokens"] for lang, r in results.items()}


def test_merging_two_language_adapters_lowers_loss_on_both_and_passes_the_gate(base, trained, tokenizer):
    # Prepare
    states, heldout = trained
    before, tokens = heldout_losses(base, heldout, tokenizer.pad_token_id)

    # Execute
    result = merge_adapters(base, [WeightedAdapter("lang-en", 1, states["en"]),
                                   WeightedAdapter("lang-ja", 1, states["ja"])], IN_PROJ)
    after, _ = heldout_losses(result.model, heldout, tokenizer.pad_token_id)
    decision = decide_base(after, before, margin=0.0, tolerance=0.05, weights=tokens)

    # Assert
    print({lang: f"{before[lang]:.3f} -> {after[lang]:.3f}" for lang in LANGUAGES})
    assert after["en"] < before["en"] - 0.05 and after["ja"] < before["ja"] - 0.05
    assert decision.accepted, decision.reason


def flipped(state):
    """The adapter with the opposite delta (B carries the sign)."""
    return {key: -value if ".lora_B." in key else value for key, value in state.items()}


@pytest.mark.parametrize(
    ("harm", "hurt"),
    [("en-sign-flipped", "en"), ("en-plus-ja-sign-flipped", "ja")],
)
def test_the_base_gate_refuses_a_merge_that_hurts_a_language_naming_it(base, trained, tokenizer, harm, hurt):
    # Prepare: a sign-flipped adapter alone (worse overall), or beside a good one (better overall,
    # worse on one language: only the per-language clause refuses it)
    states, heldout = trained
    adapters = {
        "en-sign-flipped": [WeightedAdapter("lang-en", 2, flipped(states["en"]))],
        "en-plus-ja-sign-flipped": [WeightedAdapter("lang-en", 1, states["en"]),
                                    WeightedAdapter("lang-ja", 1, flipped(states["ja"]))],
    }[harm]
    before, tokens = heldout_losses(base, heldout, tokenizer.pad_token_id)

    # Execute
    result = merge_adapters(base, adapters, IN_PROJ)
    after, _ = heldout_losses(result.model, heldout, tokenizer.pad_token_id)
    decision = decide_base(after, before, margin=0.0, tolerance=0.05, weights=tokens)

    # Assert
    print(decision.reason)
    assert not decision.accepted
    assert "worse beyond tolerance 0.050 on " in decision.reason
    assert f"{hurt} {before[hurt]:.3f} -> {after[hurt]:.3f}" in decision.reason
    # a tolerance above the harm lets the merge that is better overall through, and only that one
    looser = decide_base(after, before, tolerance=after[hurt] - before[hurt] + 0.01, weights=tokens)
    assert looser.accepted == (harm == "en-plus-ja-sign-flipped")


def test_a_bfloat16_base_is_summed_in_float32_and_cast_once(base):
    # Prepare
    state = adapter_state(random_adapter(base, ALL_SAFE, seed=8))
    low = copy.deepcopy(base).to(torch.bfloat16)
    deltas = lora_deltas(state, ALL_SAFE)

    # Execute
    result = merge_adapters(low, [WeightedAdapter("a", 1, state, 0.5)], ALL_SAFE)

    # Assert: each target is (bf16 weight in float32 + delta) rounded once; the rest is untouched
    merged, original = dict(result.model.named_parameters()), dict(low.named_parameters())
    for name, param in merged.items():
        assert param.dtype == torch.bfloat16
        if name not in deltas:
            assert torch.equal(param, original[name]), name
            continue
        expected = original[name].float() + 0.5 * deltas[name]
        assert (expected - original[name].float()).abs().max() > 0.05  # the delta is far above bf16's rounding
        torch.testing.assert_close(param.float(), expected, rtol=2**-8, atol=1e-6, msg=name)  # one rounding


# -- refusals ---------------------------------------------------------------------------------------
def test_a_tied_base_merges_in_proj_exactly_and_refuses_embedding_targets(config, tokenizer, ids):
    tied = build_model(dataclasses.replace(config.model, tie_word_embeddings=True), tokenizer, seed=0)
    assert tied.get_input_embeddings().weight is tied.get_output_embeddings().weight

    adapted = random_adapter(tied, IN_PROJ, seed=6)
    result = merge_adapters(tied, [WeightedAdapter("a", 1, adapter_state(adapted))], IN_PROJ)
    assert (logits(result.model, ids) - logits(adapted, ids)).abs().max() < 1e-5

    state = adapter_state(random_adapter(tied, LoraConfig(target_modules=["embeddings"]), seed=6))
    with pytest.raises(MergeError, match="ties its embeddings and lm_head"):
        merge_adapters(tied, [WeightedAdapter("a", 1, state)], LoraConfig(target_modules=["embeddings"]))


def test_adapters_that_do_not_fit_are_refused_with_the_key(base):
    state = adapter_state(random_adapter(base, IN_PROJ, seed=7))
    key = "base_model.model.backbone.layers.0.mixer.in_proj.lora_B.weight"

    with pytest.raises(MergeError, match=r"`lora.r` is 4"):
        merge_adapters(base, [WeightedAdapter("a", 1, state)], LoraConfig(r=4, alpha=8))
    with pytest.raises(MergeError, match="has only lora_A"):
        merge_adapters(base, [WeightedAdapter("a", 1, {k: v for k, v in state.items() if k != key})], IN_PROJ)
    with pytest.raises(MergeError, match="'base_model.model.x.weight' is not a LoRA"):
        merge_adapters(base, [WeightedAdapter("a", 1, {**state, "base_model.model.x.weight": state[key]})], IN_PROJ)
    with pytest.raises(MergeError, match="not finite on"):
        merge_adapters(base, [WeightedAdapter("a", 1, {**state, key: state[key] * float("inf")})], IN_PROJ)
    with pytest.raises(MergeError, match="`merge.method` is 'linear'"):
        merge_adapters(base, [WeightedAdapter("a", 1, state)], IN_PROJ, "linear")
    with pytest.raises(MergeError, match="repeat"):
        merge_adapters(base, [WeightedAdapter("a", 1, state), WeightedAdapter("a", 2, state)], IN_PROJ)
