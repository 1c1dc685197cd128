"""What a study reads of a run (``fedem_flwr.simulation.evaluation``): the test split nothing in the
run sees, the relay's test curve, merges read back from the registry and the store, merge counts and
token shares; FedAvg's learning rate per round; the bytes a message moves (real hub, tiny model)."""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedem_flwr.config.loader import load_config
from fedem_flwr.data.corpus import column
from fedem_flwr.hub.lineage import publish_base, record_attempt, store_adapter_version
from fedem_flwr.hub.store import ArtifactRef
from fedem_flwr.lineage.heldout import SETTING
from fedem_flwr.model.tokenizer import build_byte_tokenizer
from fedem_flwr.protocol.wire import (
    adapter_to_arrays,
    content_bytes,
    optimizer_to_arrays,
)
from fedem_flwr.relay.bootstrap import open_hub
from fedem_flwr.simulation import evaluation
from fedem_flwr.simulation.evaluation import (
    TestCurve,
    base_alone,
    base_folder_of,
    final_losses,
    final_split,
    merge_counts,
    merge_events,
    token_shares,
)
from fedem_flwr.simulation.fedavg import round_lr
from fedem_flwr.training.optimizer_state import OptimizerState

LANGUAGES = "data.languages=[hi,ta,mr,de]"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    hub = open_hub(load_config([LANGUAGES, "data.test_fraction=0.1"]), tmp_path_factory.mktemp("study") / "hub")
    yield hub
    hub.registry.close()


def _texts(blocks_by_language) -> set[str]:
    tokenizer = build_byte_tokenizer()
    texts = set()
    for blocks in blocks_by_language.values():
        texts.update(tokenizer.decode(blocks.flatten().tolist()).split(tokenizer.eos_token)[:-1])
    return texts


def _trained(hub, seed: int) -> dict[str, torch.Tensor]:
    """A fresh LoRA with its B matrices drawn: a state that changes the losses."""
    generator = torch.Generator().manual_seed(seed)
    return {key: (0.05 * torch.randn(value.shape, generator=generator) if "lora_B" in key else value.clone())
            for key, value in hub.workbench.initial_state.items()}


def _push(hub, adapter: str, state, base_version: int, kind: str = "push"):
    """Store ``state`` as ``adapter``'s next version on base ``base_version`` (as an accepted push would)."""
    base = hub.registry.checkpoint(base_version)
    with tempfile.TemporaryDirectory() as tmp:
        hub.workbench.save(state, Path(tmp), ArtifactRef(hub.store.repo_id(base.repo), base.revision, base.digest))
        parent = hub.registry.latest_adapter_version(adapter).version
        return store_adapter_version(hub.registry, hub.store, Path(tmp), adapter=adapter, base_version=base_version,
                                     parent_version=parent, kind=kind, metrics={"heldout": {}}, created=1.0)


# -- the test split in a hub -----------------------------------------------------------------------

def test_no_node_and_no_judge_sees_a_test_row(hub):
    # Prepare
    test = _texts(hub.split.test)
    assert final_split(hub) == "test" and len(test) >= 10

    # Assert: no node's rows, no held-out block the gate reads, hold a test text
    for pid in range(3):
        assert test.isdisjoint(column(hub.training_rows(pid, 3), "text"))
    assert test.isdisjoint(_texts(hub.split.heldout)) and test.isdisjoint(_texts(hub.workbench.heldout))
    assert test <= {text for _, text in hub.split.withheld}
    assert test.isdisjoint(column(hub.split.train, "text"))  # CPT trains on split.train


def test_the_fingerprint_names_the_test_split_only_when_there_is_one(hub, tmp_path):
    fingerprint = hub.registry.setting(SETTING)
    assert fingerprint["test-fraction"] == 0.1 and fingerprint["test-languages"] == sorted(hub.split.test)

    plain = open_hub(load_config([LANGUAGES]), tmp_path / "plain")
    try:
        assert not {"test-fraction", "test-languages"} & plain.registry.setting(SETTING).keys()
        assert final_split(plain) == "heldout" and plain.split.test == {}
    finally:
        plain.registry.close()


def test_final_losses_are_on_the_test_split_and_held_out_when_asked(hub):
    state = _trained(hub, 1)
    states = dict.fromkeys(["hi", "ta"], state)

    test, heldout = final_losses(hub, states), final_losses(hub, states, split="heldout")

    assert test.keys() == heldout.keys() == {"hi", "ta"}
    assert heldout == pytest.approx(hub.workbench.evaluate(state, languages=["hi", "ta"]))
    assert test != pytest.approx(heldout)  # other rows
    with pytest.raises(ValueError, match="`split` is 'train'"):
        final_losses(hub, states, split="train")


# -- the relay's test curve, merges, counts --------------------------------------------------------

def test_the_test_curve_evaluates_only_what_changed(tmp_path, monkeypatch):
    # Prepare: a hub of its own, whose registry this test changes
    hub = open_hub(load_config([LANGUAGES, "data.test_fraction=0.1"]), tmp_path / "hub")
    calls: list[tuple] = []
    real = evaluation.HubWorkbench.evaluate

    def counting(self, state, languages=None):
        calls.append(tuple(languages or ()))
        return real(self, state, languages)

    monkeypatch.setattr(evaluation.HubWorkbench, "evaluate", counting)
    curve = TestCurve(hub)

    # Execute / Assert: every adapter first (all fresh: the base alone), then nothing until a push
    first = curve.update()
    assert first == pytest.approx({lang: base_alone(hub)[lang] for lang in first})
    assert sorted(first) == sorted(a.name for a in hub.registry.adapters())
    calls.clear()
    assert curve.update() == first and calls == []

    state = _trained(hub, 2)
    _push(hub, "hi", state, base_version=0)
    after = curve.update()
    assert calls == [("hi",)]
    assert after["hi"] == pytest.approx(final_losses(hub, {"hi": state})["hi"]) != first["hi"]
    assert {k: v for k, v in after.items() if k != "hi"} == {k: v for k, v in first.items() if k != "hi"}
    hub.registry.close()


def test_merge_events_read_the_absorbed_languages_just_before_and_after(tmp_path):
    # Prepare: hi pushed on v0, a merge that absorbed it into v1 (here: v0's own weights), hi
    # restarted on v1, and one merge attempt refused
    hub = open_hub(load_config([LANGUAGES, "data.test_fraction=0.1"]), tmp_path / "hub")
    state = _trained(hub, 3)
    pushed = _push(hub, "hi", state, base_version=0)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(base_folder_of(hub, 0), tmp, dirs_exist_ok=True)
        merged = publish_base(hub.registry, hub.store, Path(tmp), parent=0, source="merge", metrics={},
                              created=hub.registry.checkpoint(0).created + 7200.0,
                              absorbed=[("hi", pushed.version, 1.0, "sum", None)])
    rebased = _push(hub, "hi", hub.workbench.initial_state, base_version=merged.version, kind="rebase")
    record_attempt(hub.registry, source="merge", parent=1, reason="refused", details={}, created=3.0)

    # Execute
    events = merge_events(hub, t0=hub.registry.checkpoint(0).created)

    # Assert
    before = final_losses(hub, {"hi": state}, base_folder_of(hub, 0))["hi"]
    bare = base_alone(hub, base_folder_of(hub, 1))
    assert len(events) == 1 and (events[0]["version"], events[0]["parent"], events[0]["sim_s"]) == (1, 0, 7200.0)
    assert events[0]["absorbed"] == {"hi": {"adapter": "hi", "version": pushed.version, "before": pytest.approx(before),
                                            "after": pytest.approx(bare["hi"])}}
    assert rebased.version == pushed.version + 1
    assert events[0]["base_losses"] == pytest.approx(bare) and bare.keys() == hub.split.test.keys()
    assert merge_counts(hub.registry) == {"merge_attempts": 2, "merge_published": 1}

    # A merge whose parent base retention pruned cannot be evaluated again: it is left out, not a crash
    hub.registry.mark_version_pruned("hi", pushed.version, at=9.0)
    assert merge_events(hub)[0]["absorbed"] == {}
    hub.registry.mark_checkpoint_pruned(0, at=9.0)
    assert merge_events(hub) == []
    hub.registry.close()


def test_token_shares_sum_to_one():
    assert token_shares({"hi": 300, "ta": 100, "de": 0}) == {"de": 0.0, "hi": 0.75, "ta": 0.25}
    assert token_shares({"hi": 0}) == {}


# -- FedAvg's schedule -----------------------------------------------------------------------------

def test_fedavg_anneals_the_learning_rate_across_rounds_constant_within_one(config):
    # Prepare: 10 steps a round, a warmup of 5 steps, a cosine to 10% of 0.02 over 60 steps
    train = config.train
    train.lr, train.min_lr_ratio, train.warmup_steps, train.max_steps, train.horizon_steps = 0.02, 0.1, 5, 10, 60

    # Execute
    rates = [round_lr(t, train) for t in range(8)]

    # Assert: round t trains at the rate of its first step, t * 10, with no warmup across rounds
    # (round 0 at the peak, as FlowerTune), then the cosine from step 5 to 60: progress (10t - 5) / 55
    expected = [0.02] + [0.002 + 0.5 * (1 + math.cos(math.pi * (10 * t - 5) / 55)) * 0.018 for t in range(1, 6)]
    assert rates == pytest.approx([*expected, 0.002, 0.002])
    train.horizon_steps = None  # no horizon: constant
    assert [round_lr(t, train) for t in range(3)] == pytest.approx([0.02, 0.02, 0.02])


# -- bytes moved -----------------------------------------------------------------------------------

def test_bytes_moved_count_every_array_record_optimizer_moments_included(hub):
    # Prepare: a train message's content as the relay sends it with `train.carry=moments`
    state = hub.workbench.initial_state
    moments = {f"{key}::{m}": torch.zeros_like(value) for key, value in state.items() for m in ("exp_avg", "exp_avg_sq")}
    adapter = adapter_to_arrays(state)
    optimizer = optimizer_to_arrays(OptimizerState(10, 0, moments))
    content = RecordDict({"arrays": adapter, "optimizer": optimizer,
                          "config": ConfigRecord({"optimizer-step": 10}), "metrics": MetricRecord({"tokens": 5})})

    # Assert: every array record's bytes (one .npy each: float32 values plus the same header), the
    # moments twice the adapter's; config and metric records are not counted
    size = sum(value.numel() * 4 for value in state.values())
    alone = content_bytes(RecordDict({"arrays": adapter}))
    header = alone - size
    assert content_bytes(RecordDict({"optimizer": optimizer})) == 2 * size + header
    assert content_bytes(content) == 3 * size + 2 * header
    assert isinstance(content["optimizer"], ArrayRecord)


def test_a_trace_written_before_test_splits_reads_without_test_points(tmp_path):
    from fedem_flwr.simulation.record import read_trace, sim_dir

    sim_dir(tmp_path).mkdir()
    (sim_dir(tmp_path) / "trace.csv").write_text(
        "sim_s,wall_s,tokens,tokens_wasted,bytes_moved,leases_active,online,accepted,rejected,loss_mean,losses\n"
        '60.0,1.00,512,0,10,1,2,1,0,3.000000,"{""hi"": 3.0}"\n')

    (row,) = read_trace(tmp_path)

    assert (row["sim_s"], row["loss_mean"], row["losses"], row["test_losses"]) == (60.0, 3.0, {"hi": 3.0}, {})
    assert math.isnan(row["test_loss_mean"])
