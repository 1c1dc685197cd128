"""Continuous pretraining on tiny Mamba-2 models on one CPU thread: slices bounded in time, one run kept
across saves, new bases, a kill -9 and a restart."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fedem_flwr import durable
from fedem_flwr.config.loader import load_config
from fedem_flwr.config.schema import CptConfig, ModelConfig
from fedem_flwr.data.blocks import tokenize_blocks
from fedem_flwr.errors import ConfigError, TrainingError
from fedem_flwr.model.factory import build_model
from fedem_flwr.training import cpt_state
from fedem_flwr.training.cpt import PROBE_EVERY, ContinuousPretrainer
from fedem_flwr.training.cpt_state import CptStateError, read_state
from tests.support.relay import FakeClock

ROOT = Path(__file__).resolve().parent.parent
SMALL = ModelConfig(hidden_size=32, num_hidden_layers=1, state_size=8, head_dim=16, chunk_size=16)
CPT = CptConfig(lr=3e-3, warmup_steps=2, max_steps=100, batch_size=4, checkpoint_every=1000, weight_decay=0.1,
                precision="fp32", device="cpu")
TEXTS = ["hello world, how are you today?", "नमस्ते, आप कैसे हैं?", "నమస్తే, మీరు ఎలా ఉన్నారు?", "你好，你好吗？"]


@pytest.fixture(scope="module")
def blocks(tokenizer):
    """Ten blocks: an effective batch of 4 crosses an epoch every few steps."""
    return tokenize_blocks(TEXTS * 3, tokenizer, block_size=32)[:10]


def pretrainer(tokenizer, blocks, state_dir, weights=None, cfg=CPT, seed=0):
    """A pretrainer on a fresh model object: the seed-0 base, or ``weights`` (a published base) copied in."""
    model = build_model(SMALL, tokenizer, seed=0)
    if weights is not None:
        model.load_state_dict(weights)
    return ContinuousPretrainer(model, blocks, cfg, state_dir, pad_id=tokenizer.pad_token_id, seed=seed)


def clone_state(state):
    return {name: {k: v.clone() for k, v in moments.items()} for name, moments in state.items()}


def assert_same_state(a, b):
    assert a.keys() == b.keys() and a
    for name in a:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(a[name][key], b[name][key]), f"{name}.{key}"


def test_two_slices_restore_optimizer_state_and_lower_the_loss(tokenizer, blocks, tmp_path):
    # Prepare: a first slice of 10 steps, saved; its weights stand for the published base.
    first = pretrainer(tokenizer, blocks, tmp_path / "cpt")
    assert not first.resumed and first.optimizer_state() == {}
    r1 = first.run_slice(60.0, max_steps=10)
    first.save()
    # Execute: a NEW pretrainer (new model object, the saved state) runs the second slice.
    second = pretrainer(tokenizer, blocks, tmp_path / "cpt", weights=first.model.state_dict())
    restored = clone_state(second.optimizer_state())
    r2 = second.run_slice(60.0, max_steps=10)
    # Assert: moments restored bit for bit (not re-created: a new AdamW has none), the step continues,
    # and the second slice trains at a lower loss than the first.
    assert second.resumed and second.step == 20 and (r1.steps, r2.steps) == (10, 10)
    assert_same_state(restored, first.optimizer_state())
    assert all(int(m["step"]) == 10 for m in restored.values())
    assert all(int(m["step"]) == 20 for m in second.optimizer_state().values())
    assert second.tokens == first.tokens + r2.tokens
    assert r2.loss_mean < r1.loss_mean


def test_a_resumed_run_takes_the_same_batches_and_steps_as_an_uninterrupted_one(tokenizer, blocks, tmp_path):
    # Prepare: one run without a break, one saved after 3 steps and resumed in a new object.
    straight = pretrainer(tokenizer, blocks, tmp_path / "a")
    straight.run_slice(60.0, max_steps=3)
    broken = pretrainer(tokenizer, blocks, tmp_path / "b")
    broken.run_slice(60.0, max_steps=3)
    broken.save()
    resumed = pretrainer(tokenizer, blocks, tmp_path / "b", weights=broken.model.state_dict())
    caller_rng = torch.get_rng_state()
    # Execute
    expected_batch = straight.next_batch()
    resumed_batch = resumed.next_batch()
    r_straight = straight.run_slice(60.0, max_steps=4)
    r_resumed = resumed.run_slice(60.0, max_steps=4)
    # Assert: the cursor (which crossed epochs), schedule, moments and RNG all continued, so the
    # resumed run computes exactly what the uninterrupted one did; the caller's RNG is untouched.
    assert resumed.cursor == straight.cursor and straight.cursor[0] >= 2
    assert torch.equal(resumed_batch, expected_batch)
    assert r_resumed.loss_mean == r_straight.loss_mean
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name
    assert torch.equal(torch.get_rng_state(), caller_rng)


def test_new_blocks_start_the_next_epoch_on_resume(tokenizer, blocks, tmp_path):
    cpt = pretrainer(tokenizer, blocks, tmp_path / "cpt")
    cpt.run_slice(60.0, max_steps=1)
    cpt.save()
    same = pretrainer(tokenizer, blocks, tmp_path / "cpt")
    other = pretrainer(tokenizer, blocks[:8], tmp_path / "cpt")
    assert cpt.cursor == same.cursor == (0, 4)
    assert other.cursor == (1, 0) and other.step == 1


def test_a_slice_starts_no_step_that_would_end_after_its_budget(tokenizer, blocks, tmp_path):
    # Prepare: every step costs 0.3 s of a fake clock (one forward a step: grad_accum is 1).
    clock = FakeClock(0.0)
    cpt = pretrainer(tokenizer, blocks, tmp_path / "cpt")
    cpt.model.register_forward_pre_hook(lambda module, args: clock.sleep(0.3))
    # Execute: a fresh pretrainer measured nothing, then slices of 1.0 s and 0.2 s.
    first = cpt.run_slice(0.1, clock)
    second = cpt.run_slice(1.0, clock)
    third = cpt.run_slice(0.2, clock)
    # Assert: the first step is allowed unmeasured (and says so); then 3 steps of 0.3 s fit in 1.0 s
    # and a 4th would end at 1.2 s; a budget below one measured step runs none.
    assert (first.steps, first.probed) == (1, True)
    assert first.overshoot_s == pytest.approx(0.2)
    assert (second.steps, second.stopped_by, second.probed) == (3, "budget", False)
    assert second.seconds == pytest.approx(0.9) and second.overshoot_s == 0.0
    assert (third.steps, third.stopped_by) == (0, "step_too_long")
    assert cpt.step == 4


def test_when_no_step_fits_a_probe_now_and_then_lets_cpt_recover(tokenizer, blocks, tmp_path):
    # Prepare: steps of 0.3 s measured, then the machine gets faster (0.1 s a step).
    clock = FakeClock(0.0)
    cost = [0.3]
    cpt = pretrainer(tokenizer, blocks, tmp_path / "cpt")
    cpt.model.register_forward_pre_hook(lambda module, args: clock.sleep(cost[0]))
    cpt.run_slice(1.0, clock)
    cost[0] = 0.1
    # Execute: slices of 0.25 s, in which no 0.3 s step fits.
    results = [cpt.run_slice(0.25, clock) for _ in range(PROBE_EVERY + 2)]
    # Assert: PROBE_EVERY slices run nothing, the next probes one step (0.1 s now), and from then on
    # the window holds the new time: two steps fit in 0.25 s.
    assert [r.steps for r in results] == [0] * PROBE_EVERY + [2, 2]
    assert all(r.stopped_by == "step_too_long" for r in results[:PROBE_EVERY])
    assert [r.probed for r in results[-2:]] == [True, False]


def test_a_slow_first_step_does_not_stop_cpt_for_good(tokenizer, blocks, tmp_path):
    # Prepare: the first step costs 2.0 s (a warm-up), every later one 0.3 s.
    clock = FakeClock(0.0)
    cpt = pretrainer(tokenizer, blocks, tmp_path / "cpt")
    costs = iter([2.0])
    cpt.model.register_forward_pre_hook(lambda module, args: clock.sleep(next(costs, 0.3)))
    # Execute
    results = [cpt.run_slice(1.0, clock) for _ in range(3)]
    # Assert: after the warm-up, one probe step measures the steady time, then slices fill up again;
    # no slice ever runs more than one step past its budget.
    assert [(r.steps, r.probed) for r in results] == [(1, True), (3, True), (3, False)]
    assert results[1].seconds == pytest.approx(0.9) and results[2].overshoot_s == 0.0


def test_slices_stop_at_checkpoints_until_marked(tokenizer, blocks, tmp_path):
    cpt = pretrainer(tokenizer, blocks, tmp_path / "cpt", cfg=dataclasses.replace(CPT, checkpoint_every=4))
    first = cpt.run_slice(60.0, max_steps=10)
    assert (first.steps, first.stopped_by, cpt.checkpoint_due()) == (4, "checkpoint", True)
    cpt.mark_checkpoint()
    assert not cpt.checkpoint_due()
    cpt.run_slice(60.0, max_steps=2)
    assert (cpt.step, cpt.checkpoint_due()) == (6, False)
    cpt.run_slice(60.0, max_steps=10)
    assert (cpt.step, cpt.checkpoint_due()) == (8, True)


def test_load_weights_keeps_moments_step_and_cursor(tokenizer, blocks, tmp_path):
    # Prepare
    cpt = pretrainer(tokenizer, blocks, tmp_path / "cpt")
    cpt.run_slice(60.0, max_steps=3)
    moments, step, cursor = clone_state(cpt.optimizer_state()), cpt.step, cpt.cursor
    merged = build_model(SMALL, tokenizer, seed=1).state_dict()  # stands for a newly published base
    # Execute
    cpt.load_weights(merged)
    # Assert: the new weights are in, the run's state is not reset, and training goes on from both.
    for name, p in cpt.model.named_parameters():
        assert torch.equal(p, merged[name]), name
    assert_same_state(moments, cpt.optimizer_state())
    assert (cpt.step, cpt.cursor) == (step, cursor)
    cpt.run_slice(60.0, max_steps=1)
    assert all(int(m["step"]) == 4 for m in cpt.optimizer_state().values())
    wider = build_model(dataclasses.replace(SMALL, hidden_size=48), tokenizer, seed=0).state_dict()
    with pytest.raises(TrainingError, match="does not fit"):
        cpt.load_weights(wider)


def test_train_layers_trains_only_matching_parameters(tokenizer, blocks, tmp_path):
    cfg = dataclasses.replace(CPT, train_layers=["backbone.layers.0.mixer.in_proj.*"])
    cpt = pretrainer(tokenizer, blocks, tmp_path / "cpt", cfg=cfg)
    before = {n: p.detach().clone() for n, p in cpt.model.named_parameters()}
    cpt.run_slice(60.0, max_steps=2)
    changed = {n for n, p in cpt.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"backbone.layers.0.mixer.in_proj.weight"} == set(cpt.optimizer_state())
    with pytest.raises(ConfigError, match=r"`cpt.train_layers` pattern 'nothing\.\*'"):
        pretrainer(tokenizer, blocks, tmp_path / "other", cfg=dataclasses.replace(CPT, train_layers=["nothing.*"]))


class Killed(BaseException):
    """Stands for the process dying at a given point (a BaseException, like a signal's)."""


def test_an_interrupted_save_leaves_the_previous_state(tokenizer, blocks, tmp_path, monkeypatch):
    # Prepare: a state saved at step 2, then 2 more steps.
    cpt = pretrainer(tokenizer, blocks, tmp_path / "cpt")
    cpt.run_slice(60.0, max_steps=2)
    cpt.save()
    cpt.run_slice(60.0, max_steps=2)
    real_replace = os.replace

    def die_before_commit(src, dst):
        if Path(dst).name == cpt_state.STATE_FILE:
            raise Killed  # the process dies after the tensors file, before state.json
        real_replace(src, dst)

    monkeypatch.setattr(durable.os, "replace", die_before_commit)
    # Execute
    with pytest.raises(Killed):
        cpt.save()
    monkeypatch.setattr(durable.os, "replace", real_replace)
    # Assert: the committed state is still step 2's and verifies; the orphan goes at the next save.
    assert read_state(tmp_path / "cpt").record["step"] == 2
    assert len(list((tmp_path / "cpt").glob("tensors-*"))) == 2
    assert pretrainer(tokenizer, blocks, tmp_path / "cpt").step == 2
    cpt.save()
    record = read_state(tmp_path / "cpt").record
    assert record["step"] == 4
    assert sorted(p.name for p in (tmp_path / "cpt").iterdir()) == sorted(["state.json", record["tensors_file"]])


def test_a_damaged_tensors_file_is_refused(tokenizer, blocks, tmp_path):
    cpt = pretrainer(tokenizer, blocks, tmp_path / "cpt")
    cpt.run_slice(60.0, max_steps=1)
    cpt.save()
    tensors = tmp_path / "cpt" / read_state(tmp_path / "cpt").record["tensors_file"]
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0xFF
    tensors.write_bytes(bytes(data))
    with pytest.raises(CptStateError, match="sha256"):
        pretrainer(tokenizer, blocks, tmp_path / "cpt")


RUN_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    torch.set_num_threads(1)
    from safetensors.torch import load_file
    from fedem_flwr.config.schema import CptConfig, ModelConfig
    from fedem_flwr.model.tokenizer import build_byte_tokenizer
    from fedem_flwr.model.factory import build_model
    from fedem_flwr.training.cpt import PROBE_EVERY, ContinuousPretrainer

    def say(event, cpt):
        print(json.dumps({"event": event, "step": cpt.step}), flush=True)

    tok = build_byte_tokenizer()
    blocks = load_file(sys.argv[2])["blocks"]
    model = build_model(ModelConfig(**%(model)r), tok, seed=0)
    cpt = ContinuousPretrainer(model, blocks, CptConfig(**%(cpt)r), sys.argv[1], pad_id=tok.pad_token_id)
    say("start", cpt)
    while True:  # runs until killed
        cpt.run_slice(0.2)
        if cpt.checkpoint_due():
            cpt.mark_checkpoint()
            say("saving", cpt)
            cpt.save()
            say("saved", cpt)
""")


@pytest.mark.slow  # a real process, killed mid-run
def test_kill_9_during_cpt_then_resume_continues_from_the_last_save(tokenizer, blocks, tmp_path):
    # Prepare: a real process running CPT slices on the same base and blocks, saving every 3 steps.
    cfg = dataclasses.replace(CPT, checkpoint_every=3)
    script = tmp_path / "run_cpt.py"
    script.write_text(RUN_SCRIPT % {"model": dataclasses.asdict(SMALL), "cpt": dataclasses.asdict(cfg)})
    save_file({"blocks": blocks}, tmp_path / "blocks.safetensors")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
    state = tmp_path / "cpt"
    proc = subprocess.Popen([sys.executable, str(script), str(state), str(tmp_path / "blocks.safetensors")],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    events = []
    try:
        # Execute: SIGKILL as soon as the first save is reported, while the next slice trains.
        for line in proc.stdout:
            events.append(json.loads(line))
            if events[-1]["event"] == "saved":
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=60)
        events += [json.loads(line) for line in proc.stdout]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, events
    saved = [e["step"] for e in events if e["event"] == "saved"]
    saving = [e["step"] for e in events if e["event"] == "saving"]
    assert saved and saved[0] == 3
    # Assert: the committed state verifies (size and sha256) and is the last save reported, or one
    # that committed in the instant before the kill without being reported; a new pretrainer here
    # resumes it, moments and step included, and the step count goes on from there.
    saved_state = read_state(state)
    step = saved_state.record["step"]
    assert step in {saved[-1], saving[-1]}
    resumed = pretrainer(tokenizer, blocks, state, cfg=cfg)
    assert resumed.step == step
    for name, moments in resumed.optimizer_state().items():
        assert torch.equal(moments["exp_avg_sq"], saved_state.tensors[f"optim.{name}.exp_avg_sq"]), name
        assert int(moments["step"]) == step
    resumed.run_slice(60.0, max_steps=2)
    assert resumed.step == step + 2


@pytest.mark.parametrize("override, key", [
    ("cpt.slice_s=0", "cpt.slice_s"),
    ("cpt.checkpoint_every=0", "cpt.checkpoint_every"),
    ("cpt.precision=fp16", "cpt.precision"),
    ("cpt.min_lr_ratio=2", "cpt.min_lr_ratio"),
    ("cpt.warmup_steps=20000", "cpt.warmup_steps"),
    ("cpt.grad_clip=-1", "cpt.grad_clip"),
    ("cpt.train_layers=['']", "cpt.train_layers"),
])
def test_a_bad_cpt_value_names_its_key(override, key):
    with pytest.raises(ConfigError, match=f"`{key}`"):
        load_config([override])


def test_the_default_config_has_cpt_off():
    assert load_config().cpt == CptConfig()
    assert CptConfig().enabled is False
