"""No credit without work on a real seshu-tiny adapter, judged by the real hub workbench.

An untouched adapter and an all-zeros one are rejected before evaluation (with the default margin 0,
both would pass the loss gate: the untouched one scores its parent's loss exactly, and the all-zeros
one too, since a fresh LoRA's delta is already zero). Finite but huge weights evaluate to NaN and are
rejected before any artifact. Afterwards honest training on the same adapter is still accepted and
keeps lowering the held-out loss.
"""

from __future__ import annotations

import random

import pytest
import torch

from fedem_flwr.config.schema import GateConfig, LoraConfig, ModelConfig, TrainConfig
from fedem_flwr.data.blocks import tokenize_blocks
from fedem_flwr.gate.evaluator import HubWorkbench
from fedem_flwr.hub.store import ArtifactRef
from fedem_flwr.model.factory import build_model
from fedem_flwr.model.lora import adapter_state, load_adapter
from fedem_flwr.relay.coordinator import RelayCoordinator
from fedem_flwr.relay.policies import NodeProfile, make_policy
from fedem_flwr.training.finetune import train
from tests.support.relay import TTL, FakeClock, assert_consistent, seed_real_hub

pytestmark = pytest.mark.slow  # trains real adapters and judges them on a real hub

MODEL = ModelConfig()  # seshu-tiny
HELDOUT = ["नमस्ते, आप कैसे हैं?", "मैं ठीक हूँ, धन्यवाद।", "आज मौसम अच्छा है।"]
TRAINING = ["यह एक किताब है।", "मुझे हिंदी पढ़ना पसंद है।", "हम कल बाज़ार जाएंगे।", "वह स्कूल जाता है।",
            "पानी ठंडा है।"] * 4


def _hub(tmp_path, tokenizer, clock):
    workbench = HubWorkbench(build_model(MODEL, tokenizer, seed=0), LoraConfig(),
                             {"hi": tokenize_blocks(HELDOUT, tokenizer, 32)}, pad_id=tokenizer.pad_token_id, seed=0)
    registry, store = seed_real_hub(tmp_path, workbench, clock)
    coordinator = RelayCoordinator(registry, store, make_policy("language", random.Random(0)), workbench,
                                   lease_ttl_s=TTL, sweep_interval_s=10, gate=GateConfig(), clock=clock)
    coordinator.recover()
    return coordinator, registry, store


def _push(coordinator, state, node="sim:0"):
    (assignment,) = coordinator.assign([NodeProfile(node, ("hi",))])
    lease = assignment.lease
    return coordinator.receive_push(lease.token, state)


def _trained(registry, store, tokenizer, seed, steps=8):
    """What an honest node sends: the latest version, trained a few steps on its own text."""
    latest = registry.latest_adapter_version("hi")
    folder = store.get(ArtifactRef(latest.repo, latest.revision, latest.digest))
    model = load_adapter(build_model(MODEL, tokenizer, seed=0), folder, is_trainable=True)
    cfg = TrainConfig(max_steps=steps, batch_size=4, warmup_steps=1, progress=False, device="cpu")
    train(model, tokenize_blocks(TRAINING, tokenizer, 32), cfg, pad_id=tokenizer.pad_token_id, seed=seed)
    return adapter_state(model)


def test_no_credit_without_work_and_the_adapter_keeps_improving(tmp_path, tokenizer):
    clock = FakeClock()
    coordinator, registry, store = _hub(tmp_path, tokenizer, clock)
    evaluated = []
    evaluate = coordinator.workbench.evaluate
    coordinator.workbench.evaluate = lambda state, languages=None: evaluated.append(1) or evaluate(state, languages)
    fresh = coordinator.workbench.initial_state

    untouched = _push(coordinator, {key: value.clone() for key, value in fresh.items()})
    zeros = _push(coordinator, {key: torch.zeros_like(value) for key, value in fresh.items()})

    assert untouched.reason.startswith("unchanged: max |delta| 0.0e+00 from v0")
    assert zeros.reason.startswith("degenerate: lora_A and lora_B are both all zero for "
                                   "'base_model.model.backbone.layers.0.mixer.in_proj'")
    assert evaluated == [] and registry.latest_adapter_version("hi").version == 0

    honest = _trained(registry, store, tokenizer, seed=1)
    huge = _push(coordinator, {key: value * 1e20 for key, value in honest.items()})
    assert huge.reason == "non-finite-loss: held-out loss hi=nan"
    assert store.revisions("t/adapter-hi") == ["v0"] and registry.contributions()[0].evaluation["heldout"] == {"hi": None}

    losses = [registry.latest_adapter_version("hi").metrics["heldout"]["hi"]]
    for seed in (1, 2):
        outcome = _push(coordinator, _trained(registry, store, tokenizer, seed))
        assert outcome.accepted, outcome.reason
        losses.append(outcome.losses["hi"])
    assert losses[0] > losses[1] > losses[2]
    assert [v.version for v in registry.adapter_versions("hi")] == [0, 1, 2]
    assert [lease.outcome for lease in registry.leases()] == ["rejected"] * 3 + ["accepted"] * 2
    assert_consistent(coordinator, registry, store)


TAMIL = ["வணக்கம், நீங்கள் எப்படி இருக்கிறீர்கள்?", "நான் நன்றாக இருக்கிறேன், நன்றி.", "இன்று வானிலை நன்றாக உள்ளது."]


def _hostile(tokenizer, steps=30):
    """A fresh LoRA trained on Hindi's loss minus Tamil's: better on its own language, worse on another."""
    from fedem_flwr.data.labels import labels_for, loss_sum, target_count
    from fedem_flwr.model.lora import attach_lora

    model = attach_lora(build_model(MODEL, tokenizer, seed=0), LoraConfig(), seed=0)
    hindi, tamil = tokenize_blocks(TRAINING, tokenizer, 32), tokenize_blocks(TAMIL * 4, tokenizer, 32)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)

    def loss(blocks):
        labels = labels_for(blocks, tokenizer.pad_token_id)
        return loss_sum(model(input_ids=blocks).logits, labels) / target_count(labels)

    for _ in range(steps):
        optimizer.zero_grad()
        (loss(hindi) - 0.5 * loss(tamil)).backward()
        optimizer.step()
    return adapter_state(model)


def test_the_gate_rejects_a_flipped_and_a_hostile_adapter_and_accepts_the_trained_one(tmp_path, tokenizer):
    # Prepare: held-out Hindi and Tamil; an adapter honestly trained on Hindi (on this young base it
    # helps Tamil too), and a hostile one trained to lower Hindi's loss while raising Tamil's
    clock = FakeClock()
    coordinator, registry, store = _hub(tmp_path, tokenizer, clock)
    workbench = coordinator.workbench
    workbench.heldout["ta"] = tokenize_blocks(TAMIL, tokenizer, 32)
    workbench.weights["ta"] = float((workbench.heldout["ta"] != tokenizer.pad_token_id).sum())
    parent = workbench.evaluate(workbench.initial_state)
    trained = _trained(registry, store, tokenizer, seed=1, steps=40)
    hostile = _hostile(tokenizer)
    helped, hurt = workbench.evaluate(trained), workbench.evaluate(hostile)
    harm = hurt["ta"] - parent["ta"]
    assert helped["hi"] < parent["hi"] and helped["ta"] < parent["ta"], (parent, helped)
    assert hurt["hi"] < parent["hi"] and harm > 0.05, (parent, hurt)

    # Execute: the full gate, as by default
    coordinator.gate = GateConfig(check_others=True, tolerance=0.05)
    # (A x10 copy of a trained adapter still lowers the loss on a base this young, so it is no test here.)
    flipped = _push(coordinator, {k: -v if "lora_B" in k else v for k, v in trained.items()})
    harmful = _push(coordinator, hostile)
    accepted = _push(coordinator, trained)

    # Assert
    assert not flipped.accepted and "needs no increase" in flipped.reason, flipped.reason
    assert not harmful.accepted and "worse beyond tolerance" in harmful.reason and "ta " in harmful.reason
    assert accepted.accepted, accepted.reason
    assert [v.version for v in registry.adapter_versions("hi")] == [0, 1]
    assert_consistent(coordinator, registry, store)
