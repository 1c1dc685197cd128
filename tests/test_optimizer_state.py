"""The optimizer state an adapter carries across relay hops: its schedule, its file, its moments by
name in a real PeftModel, the one-run property of a resumed chain, and every hostile state refused."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import pytest
import torch
from safetensors.torch import save_file

from fedem_flwr.config.schema import LoraConfig, ModelConfig, TrainConfig
from fedem_flwr.data.blocks import tokenize_blocks
from fedem_flwr.errors import FedemError
from fedem_flwr.model.adapter_spec import AdapterSpec
from fedem_flwr.model.factory import build_model
from fedem_flwr.model.lora import adapter_state, attach_lora
from fedem_flwr.training import finetune
from fedem_flwr.training.finetune import adamw, lr_at, train
from fedem_flwr.training.optimizer_state import (
    InvalidOptimizerState,
    OptimizerState,
    carried_lr,
    export_from_optimizer,
    fresh,
    load_into_optimizer,
    load_optimizer_state,
    moment_spec,
    parameter_keys,
    reset_moments,
    save_optimizer_state,
    validate_optimizer_state,
)

SMALL = ModelConfig(hidden_size=32, num_hidden_layers=1, state_size=8, head_dim=16, chunk_size=16)
A = "base_model.model.backbone.layers.0.mixer.in_proj.lora_A.weight"
B = "base_model.model.backbone.layers.0.mixer.in_proj.lora_B.weight"


def schedule(**kw) -> TrainConfig:
    return TrainConfig(**{"lr": 1.0, "min_lr_ratio": 0.1, "warmup_steps": 4, "progress": False, "device": "cpu",
                          **kw})


def tiny_lora(tokenizer, lora: Optional[LoraConfig] = None):
    model = build_model(SMALL, tokenizer, seed=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return attach_lora(model, lora or LoraConfig())


@pytest.fixture(scope="module")
def blocks(tokenizer):
    texts = ["hello world, how are you?", "नमस्ते, आप कैसे हैं?", "నమస్తే, మీరు ఎలా ఉన్నారు?", "你好，你好吗？"] * 2
    return tokenize_blocks(texts, tokenizer, block_size=32)


@pytest.fixture
def spec():
    return AdapterSpec({A: (8, 32), B: (64, 8)})


def moments_for(spec: AdapterSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {key: (torch.rand(shape, generator=generator) if key.endswith("_sq") else torch.randn(shape, generator=generator))
            for key, shape in moment_spec(spec).shapes.items()}


# -- the schedule ------------------------------------------------------------------------------------
def test_carried_lr_warms_up_once_then_stays_at_lr_without_a_horizon():
    cfg = schedule()

    rates = [carried_lr(step, cfg) for step in range(12)]

    assert rates[:4] == [0.2, 0.4, 0.6, 0.8]  # (step + 1) / (warmup + 1)
    assert rates[4:] == [1.0] * 8
    assert carried_lr(10_000, cfg) == 1.0


def test_carried_lr_follows_a_cosine_over_the_adapters_total_steps():
    cfg = schedule(horizon_steps=14)

    assert carried_lr(4, cfg) == 1.0  # the cosine starts where the warmup ends
    assert carried_lr(9, cfg) == pytest.approx(0.55)  # halfway: min + (lr - min) / 2
    assert carried_lr(14, cfg) == pytest.approx(0.1)
    assert carried_lr(500, cfg) == pytest.approx(0.1)  # min_lr after the horizon
    # over a horizon of max_steps it is exactly one lease's per-hop schedule
    one_lease = schedule(horizon_steps=14, max_steps=14)
    assert [carried_lr(s, one_lease) for s in range(20)] == [lr_at(s, one_lease) for s in range(20)]


def test_a_rebase_warms_up_again_to_where_the_schedule_stands():
    flat = schedule(rebase_warmup_steps=3)
    cosine = schedule(rebase_warmup_steps=3, horizon_steps=14)

    assert [carried_lr(s, flat, warmup_from=20) for s in range(20, 25)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert carried_lr(9, cosine, warmup_from=9) == pytest.approx(0.55 / 4)
    assert carried_lr(12, cosine, warmup_from=9) == carried_lr(12, cosine)  # the ramp ends at the cosine
    assert carried_lr(7, schedule(rebase_warmup_steps=0), warmup_from=7) == 1.0  # no re-warmup asked


# -- at rest -----------------------------------------------------------------------------------------
def test_save_and_load_round_trip_exactly(tmp_path, spec):
    state = OptimizerState(37, 30, moments_for(spec))

    path = save_optimizer_state(state, tmp_path / "state.safetensors")
    back = load_optimizer_state(path)

    assert (back.step, back.warmup_from) == (37, 30)
    assert list(back.moments) == sorted(state.moments)
    assert all(torch.equal(back.moments[k], state.moments[k]) for k in state.moments)
    empty = load_optimizer_state(save_optimizer_state(OptimizerState(5, 0), tmp_path / "schedule.safetensors"))
    assert (empty.step, empty.warmup_from, empty.moments) == (5, 0, {})


def test_unreadable_or_foreign_files_are_clear_errors(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 5)
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))  # no optimizer metadata

    with pytest.raises(InvalidOptimizerState, match="corrupt or truncated"):
        load_optimizer_state(tmp_path / "junk.safetensors")
    with pytest.raises(InvalidOptimizerState, match="has format None"):
        load_optimizer_state(tmp_path / "plain.safetensors")
    with pytest.raises(InvalidOptimizerState, match="missing, corrupt"):
        load_optimizer_state(tmp_path / "absent.safetensors")
    assert issubclass(InvalidOptimizerState, FedemError)


# -- by name in a real PeftModel ---------------------------------------------------------------------
def test_parameter_keys_are_the_adapter_state_keys(tokenizer):
    model = tiny_lora(tokenizer)

    keys = parameter_keys(model)

    assert list(keys) == list(adapter_state(model))
    assert all(keys[k].shape == v.shape for k, v in adapter_state(model).items())


def test_moments_load_by_name_whatever_the_order_of_parameters_or_of_the_state(tokenizer):
    # Prepare: a state built in reverse name order (as another node, another device, might), and an
    # optimizer over the parameters in reverse order
    model = tiny_lora(tokenizer, LoraConfig(target_modules=["in_proj", "embeddings"]))
    named = parameter_keys(model)
    spec = AdapterSpec.from_state(adapter_state(model))
    moments = moments_for(spec, seed=3)
    state = OptimizerState(7, 0, {k: moments[k] for k in reversed(list(moments))})
    optimizer = adamw(list(reversed(list(named.values()))), TrainConfig(), torch.device("cpu"))

    # Execute
    load_into_optimizer(optimizer, named, state)

    # Assert: each parameter holds its own moments and the carried step
    assert len(named) > 2
    for key, param in named.items():
        held = optimizer.state[param]
        assert torch.equal(held["exp_avg"], moments[f"{key}::exp_avg"])
        assert torch.equal(held["exp_avg_sq"], moments[f"{key}::exp_avg_sq"])
        assert held["step"].item() == 7.0 and held["step"].dtype == torch.float32
    exported = export_from_optimizer(optimizer, named, OptimizerState())
    assert list(exported) == sorted(moments)
    assert all(torch.equal(exported[k], moments[k]) for k in moments)


def test_moments_of_another_model_are_refused_by_name(tokenizer):
    model = tiny_lora(tokenizer)
    named = parameter_keys(model)
    optimizer = adamw(list(named.values()), TrainConfig(), torch.device("cpu"))
    other = moment_spec(AdapterSpec({"base_model.model.other.lora_A.weight": (8, 32)}))

    with pytest.raises(InvalidOptimizerState, match="do not match the model's trainable parameters: missing"):
        load_into_optimizer(optimizer, named, OptimizerState(1, 0, {k: torch.zeros(s) for k, s in other.shapes.items()}))


# -- training ------------------------------------------------------------------------------------------
@pytest.mark.slow  # trains a tiny model three times
def test_a_chain_resumed_from_its_moments_is_one_uninterrupted_run(tokenizer, blocks):
    # Prepare: every step trains on all blocks, so both halves see the same data whatever the seed
    cfg = TrainConfig(max_steps=6, batch_size=blocks.shape[0], warmup_steps=2, lr=1e-2, progress=False,
                      device="cpu", carry="moments", horizon_steps=6)
    half = dataclasses.replace(cfg, max_steps=3)
    whole, relayed, restarted = tiny_lora(tokenizer), tiny_lora(tokenizer), tiny_lora(tokenizer)

    # Execute: six steps at once; three, then three more resumed from the first hop's state (by
    # another seed, as another node); and three more restarted, as without carry
    one_run = train(whole, blocks, cfg, pad_id=tokenizer.pad_token_id, seed=0)
    first = train(relayed, blocks, half, pad_id=tokenizer.pad_token_id, seed=0)
    second = train(relayed, blocks, half, pad_id=tokenizer.pad_token_id, seed=9, optimizer_state=first.optimizer_state)
    train(restarted, blocks, half, pad_id=tokenizer.pad_token_id, seed=0)
    train(restarted, blocks, dataclasses.replace(half, carry="none"), pad_id=tokenizer.pad_token_id, seed=9)

    # Assert
    assert (first.optimizer_state.step, second.optimizer_state.step, one_run.optimizer_state.step) == (3, 6, 6)
    expected, got = adapter_state(whole), adapter_state(relayed)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)
    for key, value in one_run.optimizer_state.moments.items():
        torch.testing.assert_close(second.optimizer_state.moments[key], value, rtol=1e-5, atol=1e-8)
    gap = max((adapter_state(restarted)[k] - expected[k]).abs().max().item() for k in expected)
    assert gap > 1e-3  # restarting AdamW and the warmup is another run
    assert list(second.optimizer_state.moments) == sorted(f"{k}::{m}" for k in expected for m in ("exp_avg", "exp_avg_sq"))
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in second.optimizer_state.moments.values())


def _recorded_rates(monkeypatch) -> list[float]:
    rates: list[float] = []
    step = finetune.optimizer_step

    def recording(model, batch, micro, pad_id, device, amp_dtype, optimizer, *rest):
        rates.append(optimizer.param_groups[0]["lr"])
        return step(model, batch, micro, pad_id, device, amp_dtype, optimizer, *rest)

    monkeypatch.setattr(finetune, "optimizer_step", recording)
    return rates


@pytest.mark.slow  # trains a tiny model
def test_carry_none_keeps_the_per_hop_schedule_and_returns_no_state(tokenizer, blocks, monkeypatch):
    cfg = TrainConfig(max_steps=4, batch_size=4, warmup_steps=2, progress=False, device="cpu", carry="none")
    rates = _recorded_rates(monkeypatch)
    plain, given = tiny_lora(tokenizer), tiny_lora(tokenizer)

    result = train(plain, blocks, cfg, pad_id=tokenizer.pad_token_id)
    ignored = train(given, blocks, cfg, pad_id=tokenizer.pad_token_id, optimizer_state=OptimizerState(40, 0))

    assert rates == [lr_at(step, cfg) for step in range(4)] * 2  # the state changes nothing with carry=none
    assert result.optimizer_state is None and ignored.optimizer_state is None
    assert all(torch.equal(adapter_state(plain)[k], v) for k, v in adapter_state(given).items())


@pytest.mark.slow  # trains a tiny model
def test_the_schedule_continues_from_the_carried_step_and_lr_schedule_overrides_it(tokenizer, blocks, monkeypatch):
    cfg = TrainConfig(max_steps=3, batch_size=4, warmup_steps=2, progress=False, device="cpu", carry="schedule",
                      horizon_steps=20, rebase_warmup_steps=2)
    rates = _recorded_rates(monkeypatch)

    result = train(tiny_lora(tokenizer), blocks, cfg, pad_id=tokenizer.pad_token_id,
                   optimizer_state=OptimizerState(10, 9))
    assert rates == [carried_lr(step, cfg, 9) for step in (10, 11, 12)]
    assert (result.optimizer_state.step, result.optimizer_state.warmup_from, result.optimizer_state.moments) == (13, 9, {})

    rates.clear()
    train(tiny_lora(tokenizer), blocks, cfg, pad_id=tokenizer.pad_token_id, optimizer_state=OptimizerState(10, 9),
          lr_schedule=lambda step: 0.5 / (step + 1))
    assert rates == [0.5, 0.25, 0.5 / 3]


@pytest.mark.slow  # trains a tiny model
def test_a_passed_deadline_leaves_the_carried_state_as_it_was(tokenizer, blocks, spec):
    model = tiny_lora(tokenizer)
    state = OptimizerState(4, 0, moments_for(AdapterSpec.from_state(adapter_state(model))))
    cfg = TrainConfig(max_steps=3, batch_size=4, progress=False, device="cpu", carry="moments")

    result = train(model, blocks, cfg, pad_id=tokenizer.pad_token_id, deadline=-1.0, optimizer_state=state)

    assert result.steps == 0 and result.optimizer_state.step == 4
    assert all(torch.equal(result.optimizer_state.moments[k], v) for k, v in state.moments.items())


# -- hostile states ------------------------------------------------------------------------------------
def _with(state: OptimizerState, key: str, value) -> OptimizerState:
    return OptimizerState(state.step, state.warmup_from, {**state.moments, key: value})


HOSTILE = {
    "NaN": (lambda s: _with(s, f"{A}::exp_avg", torch.full((8, 32), math.nan)), "1 non-finite|256 non-finite"),
    "infinite": (lambda s: _with(s, f"{B}::exp_avg_sq", torch.full((64, 8), math.inf)), "non-finite"),
    "negative second moment": (lambda s: _with(s, f"{A}::exp_avg_sq", -torch.ones(8, 32)),
                               "256 negative value\\(s\\); a second moment is a mean of squares"),
    "wrong shape": (lambda s: _with(s, f"{A}::exp_avg", torch.zeros(32, 8)), "has shape \\(32, 8\\); the adapter's is"),
    "float64": (lambda s: _with(s, f"{A}::exp_avg", torch.zeros(8, 32, dtype=torch.float64)), "dtype torch.float64"),
    "unknown name": (lambda s: _with(s, "base_model.model.lm_head.weight::exp_avg", torch.zeros(1)),
                     "unexpected 'base_model.model.lm_head.weight::exp_avg'"),
    "missing name": (lambda s: OptimizerState(s.step, 0, {k: v for k, v in s.moments.items() if k.startswith(A)}),
                     f"missing '{B}::exp_avg'"),
    "not a tensor": (lambda s: _with(s, f"{A}::exp_avg", [0.0] * 256), "holds a list, not a tensor"),
    "step ahead": (lambda s: dataclasses.replace(s, step=113), "`step` is 113; .* must lie in \\[100, 105\\]"),
    "step behind": (lambda s: dataclasses.replace(s, step=99), "`step` is 99; .* must lie in \\[100, 105\\]"),
    "new warmup": (lambda s: dataclasses.replace(s, warmup_from=101), "`warmup_from` is 101; the hop was sent 0"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_states_are_refused_naming_what_is_wrong(case, spec):
    honest = OptimizerState(103, 0, moments_for(spec))
    make, message = HOSTILE[case]

    checked = validate_optimizer_state(honest, spec, sent_step=100, sent_warmup_from=0, steps_reported=5, max_steps=8)
    with pytest.raises(InvalidOptimizerState, match=message):
        validate_optimizer_state(make(honest), spec, sent_step=100, sent_warmup_from=0, steps_reported=5, max_steps=8)

    assert checked.step == 103 and list(checked.moments) == sorted(honest.moments)


def test_fewer_steps_than_reported_are_honest_and_max_steps_bounds_the_report(spec):
    state = OptimizerState(100, 0, moments_for(spec))  # a loss scaler skipped every step

    assert validate_optimizer_state(state, spec, sent_step=100, steps_reported=5).step == 100
    with pytest.raises(InvalidOptimizerState, match=r"reports 8 step\(s\)"):
        validate_optimizer_state(dataclasses.replace(state, step=110), spec, sent_step=100, steps_reported=50,
                                 max_steps=8)


@pytest.mark.parametrize("other", [LoraConfig(r=4), LoraConfig(target_modules=["in_proj", "embeddings"])],
                         ids=["another rank", "other targets"])
def test_a_state_of_another_adapter_is_refused(tokenizer, other):
    mine = AdapterSpec.from_state(adapter_state(tiny_lora(tokenizer)))
    theirs = AdapterSpec.from_state(adapter_state(tiny_lora(tokenizer, other)))
    state = OptimizerState(3, 0, moments_for(theirs))

    with pytest.raises(InvalidOptimizerState, match="another adapter's state"):
        validate_optimizer_state(state, mine)


def test_schedule_carry_holds_no_moments(spec):
    assert validate_optimizer_state(OptimizerState(3, 0), spec, carry="schedule").moments == {}
    with pytest.raises(InvalidOptimizerState, match="'schedule' but the state holds 4 moment tensor"):
        validate_optimizer_state(OptimizerState(3, 0, moments_for(spec)), spec, carry="schedule")
    assert fresh(spec, "schedule").moments == {}
    assert all(v.abs().sum() == 0 for v in fresh(spec, "moments").moments.values())


# -- a rebase ---------------------------------------------------------------------------------------
def test_reset_zeroes_the_moments_and_starts_a_warmup_at_the_step(spec):
    state = OptimizerState(50, 0, moments_for(spec))

    reset = reset_moments(state, "reset")

    assert (reset.step, reset.warmup_from) == (50, 50)
    assert list(reset.moments) == sorted(state.moments)
    assert all(v.abs().sum() == 0 for v in reset.moments.values())
    assert state.moments[f"{A}::exp_avg"].abs().sum() > 0  # the state given is left as it was


def test_prune_keeps_the_largest_one_percent_of_exp_avg_and_their_second_moments():
    key = "w"
    avg = torch.arange(1, 201, dtype=torch.float32).reshape(10, 20) * torch.tensor([1.0, -1.0]).repeat(100).reshape(10, 20)
    avg_sq = torch.full((10, 20), 0.5)
    state = OptimizerState(9, 0, {f"{key}::exp_avg": avg, f"{key}::exp_avg_sq": avg_sq})

    pruned = reset_moments(state, "prune")

    kept = pruned.moments[f"{key}::exp_avg"].reshape(-1)
    assert kept.nonzero().reshape(-1).tolist() == [198, 199]  # |199| and |200|: 1% of 200 values
    assert kept[198:].tolist() == [199.0, -200.0]
    assert pruned.moments[f"{key}::exp_avg_sq"].reshape(-1).nonzero().reshape(-1).tolist() == [198, 199]
    assert pruned.warmup_from == 9
