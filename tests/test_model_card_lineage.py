"""Model cards filled from the moment an artifact is written: an accepted push through the relay
coordinator and the real PEFT save, a published base version (merge, CPT) and a rebased adapter
version, each card covered by the stored digest and reproducible byte for byte."""

from __future__ import annotations

import random

import pytest
import torch
from huggingface_hub import ModelCard

from fedem_flwr.config.schema import GateConfig, LoraConfig, ModelConfig
from fedem_flwr.gate.evaluator import HubWorkbench
from fedem_flwr.hub.lineage import checkpoint_card, publish_base, record_attempt, store_adapter_version, version_card
from fedem_flwr.hub.model_card import adapter_card, base_card
from fedem_flwr.hub.records import Absorbed
from fedem_flwr.hub.store import ArtifactRef
from fedem_flwr.model.factory import build_model
from fedem_flwr.model.tokenizer import build_byte_tokenizer
from fedem_flwr.relay.coordinator import RelayCoordinator
from fedem_flwr.relay.policies import NodeProfile, make_policy
from tests.support.relay import TTL, FakeClock, seed_real_hub

TEMPLATE = "[More Information Needed]"


class ScoredWorkbench(HubWorkbench):
    """The real workbench (PEFT saves, with its template README) with a scripted held-out loss: 4.0
    less the size of the LoRA B weights, so a push that moved them scores better than its parent."""

    def evaluate(self, state, languages=None):
        moved = sum(float(v.abs().sum()) for k, v in state.items() if "lora_B" in k)
        return {lang: 4.0 - moved for lang in languages or ("hi", "ta")}


@pytest.fixture(scope="module")
def tiny():
    return build_byte_tokenizer()


def hub(tmp_path, tiny, clock):
    """Base v0 and adapter hi v0 stored through the real workbench (PEFT's template README)."""
    tokenizer, model = tiny, build_model(ModelConfig(), tiny, seed=0)
    blocks = {lang: torch.full((2, 8), 70) for lang in ("hi", "ta")}  # token weights of the gate
    workbench = ScoredWorkbench(model, LoraConfig(), blocks, pad_id=tokenizer.pad_token_id, seed=0)
    registry, store = seed_real_hub(tmp_path, workbench, clock)
    return registry, store, workbench


def moved(state, by: float):
    return {k: (v + by if "lora_B" in k else v.clone()) for k, v in state.items()}


def test_an_accepted_push_is_stored_with_its_filled_card(tmp_path, tiny):
    # Prepare
    clock = FakeClock()
    registry, store, workbench = hub(tmp_path, tiny, clock)
    coordinator = RelayCoordinator(registry, store, make_policy("language", random.Random(0)), workbench,
                                   lease_ttl_s=TTL, sweep_interval_s=10, gate=GateConfig(), clock=clock)
    assert TEMPLATE in (store.local_path("t/adapter-hi", "v0") / "README.md").read_text()  # PEFT's template

    # Execute: an accepted push from sim:1 to v1, then one from sim:2 to v2
    outcomes = []
    for node, by in (("sim:1", 1e-4), ("sim:2", 2e-4)):
        (assignment,) = coordinator.assign([NodeProfile(node, ("hi",))])
        lease = assignment.lease
        outcomes.append(coordinator.receive_push(lease.token, moved(workbench.initial_state, by)))
        clock.sleep(5)

    # Assert
    assert [o.version for o in outcomes] == [1, 2], [o.reason for o in outcomes]
    v2 = registry.latest_adapter_version("hi")
    folder = store.get(ArtifactRef(v2.repo, v2.revision, v2.digest))  # the digest covers the card
    text = (folder / "README.md").read_text()
    assert TEMPLATE not in text
    card = ModelCard(text).data
    assert card.contributors == sorted([registry.pseudonym("sim:1"), registry.pseudonym("sim:2")])
    assert card.fedem == {"kind": "adapter", "adapter": "hi", "version": 2, "base_revision": "v0", "task": "causal-lm",
                          "version_kind": "push", "parent_version": 1, "base_version": 0}
    assert (card.base_model, card.language, card.library_name) == ("t/base", ["hi"], "peft")
    assert "causal-lm" in card.tags and card.pipeline_tag == "text-generation"
    assert "task `causal-lm`: causal language modelling on flat text" in text and "chat template" not in text
    assert {r.metric_type: r.metric_value for r in card.eval_results} == {
        f"heldout/{lang}": loss for lang, loss in outcomes[1].losses.items()}
    # the card at write time is the card of the recorded version: rebuilding it gives the same bytes
    assert version_card(registry, v2, "t/adapter-hi", "t/base", "v0").content == text
    assert "sim:1" not in text and "sim:2" not in text


def test_a_published_merge_carries_its_lineage_in_its_card(tmp_path, tiny):
    # Prepare: hi v1 accepted from sim:1, a merged model folder
    clock = FakeClock()
    registry, store, workbench = hub(tmp_path, tiny, clock)
    v1 = store_adapter_version(registry, store, _adapter_folder(tmp_path / "hi-v1", workbench, store),
                               adapter="hi", base_version=0, parent_version=0, kind="push",
                               metrics={"heldout": {"hi": 3.5}}, created=clock())
    registry.add_contribution(registry.pseudonym("sim:1"), "hi", None, clock(), "d", {}, {}, "accepted", "ok", 1)
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "config.json").write_text('{"merged": true}')
    metrics = {"heldout": {"hi": 3.6, "ta": 4.0}, "merge": {"method": "sum", "seed": None}}

    # Execute
    row = publish_base(registry, store, merged, parent=0, source="merge", metrics=metrics, created=clock(),
                       absorbed=[("hi", v1.version, 1.0, "sum", None)])

    # Assert
    assert (row.version, row.parent, row.source, row.revision) == (1, 0, "merge", "v1")
    assert registry.absorbed(1) == [Absorbed("hi", 1, 1.0, "sum", None)]
    folder = store.get(ArtifactRef(row.repo, row.revision, row.digest))
    card = ModelCard((folder / "README.md").read_text())
    alias = registry.pseudonym("sim:1")
    assert card.data.fedem["merge"] == {"method": "sum", "seed": None, "absorbed": [
        {"adapter": "hi", "version": 1, "weight": 1.0, "method": "sum", "seed": None, "contributors": [alias]}]}
    assert card.data.contributors == [alias]
    assert f"absorbed adapter `hi` v1, weight 1, contributors {alias}" in card.text
    assert "| ta | 4.0000 |" in card.text
    assert checkpoint_card(registry, "t/base", 1, 0, "merge", metrics, registry.absorbed(1)).content == card.content


def test_a_cpt_checkpoint_card_names_steps_tokens_and_losses(tmp_path, tiny):
    clock = FakeClock()
    registry, store, _ = hub(tmp_path, tiny, clock)
    folder = tmp_path / "cpt"
    folder.mkdir()
    (folder / "config.json").write_text("{}")

    row = publish_base(registry, store, folder, parent=0, source="cpt", created=clock(),
                       metrics={"heldout": {"hi": 3.9}, "cpt": {"steps": 200, "tokens": 409600}})

    text = (store.local_path("t/base", row.revision) / "README.md").read_text()
    card = ModelCard(text)
    assert card.data.fedem == {"kind": "base", "version": 1, "parent": 0, "source": "cpt",
                               "cpt": {"steps": 200, "tokens": 409600}}
    assert "- version v1 (cpt from v0)" in text and "200 optimizer step(s), 409,600 token(s) so far" in text
    assert [(r.metric_type, r.metric_value) for r in card.data.eval_results] == [("heldout/hi", 3.9)]


def test_a_rebased_version_restarts_with_no_contributors(tmp_path, tiny):
    clock = FakeClock()
    registry, store, workbench = hub(tmp_path, tiny, clock)
    registry.add_checkpoint(0, "merge", "t/base", None, "d", {}, clock(), absorbed=[("hi", 0, 1.0, "sum", None)])

    row = store_adapter_version(registry, store, _adapter_folder(tmp_path / "rebase", workbench, store),
                                adapter="hi", base_version=1, parent_version=0, kind="rebase",
                                metrics={"heldout": {"hi": 3.7}}, created=clock())

    assert (row.version, row.kind, row.base_version) == (1, "rebase", 1)
    assert registry.parent_losses("hi", 1, 1) == {"hi": 3.7}
    text = (store.local_path("t/adapter-hi", "v1") / "README.md").read_text()
    assert "restarted from a zero delta after a merge absorbed v0" in text and TEMPLATE not in text
    assert ModelCard(text).data.contributors == []


def test_a_refused_merge_is_only_recorded(tmp_path, tiny):
    clock = FakeClock()
    registry, store, _ = hub(tmp_path, tiny, clock)
    attempt = record_attempt(registry, source="merge", parent=0, reason="merge-gate: ta worse beyond tolerance",
                             details={"heldout": {"ta": 4.4}}, created=clock())
    assert registry.base_attempts() == [attempt]
    assert [c.version for c in registry.checkpoints()] == [0] and store.revisions("t/base") == ["v0"]


def test_cards_are_deterministic_and_never_hold_a_nan():
    args = ("org/base", 3, 2, "merge", {"heldout": {"hi": 3.0, "ta": float("nan")}, "merge": {"method": "sum"}})
    first = base_card(*args, absorbed=[Absorbed("hi", 4)], contributors={"hi": ["c-b", "c-a"]})
    again = base_card(*args, absorbed=[Absorbed("hi", 4)], contributors={"hi": ["c-a", "c-b"]})
    assert first.content == again.content
    assert "nan" not in first.content.lower()
    adapter = adapter_card("org/adapter-hi", "hi", 1, "org/base", "v0", ["hi"], ["c-a"],
                           {"heldout": {"hi": 2.0}, "train": {"loss": 1.0}}, parent_version=0, base_version=0,
                           kind="push")
    assert [r.metric_type for r in adapter.data.eval_results] == ["heldout/hi"]  # node metrics are not evaluations


def _adapter_folder(folder, workbench, store):
    """A PEFT adapter folder as the workbench saves it (with PEFT's template README)."""
    folder.mkdir()
    workbench.save(workbench.initial_state, folder, ArtifactRef("t/base", "v0", "-"))
    assert TEMPLATE in (folder / "README.md").read_text()
    return folder


def test_a_seeded_hub_stores_base_v0_and_every_fresh_adapter_with_its_card(tmp_path):
    from fedem_flwr.config.loader import load_config
    from fedem_flwr.relay.bootstrap import open_hub

    hub = open_hub(load_config(["data.languages=[hi,ta]"]), tmp_path / "hub")
    try:
        base = hub.registry.checkpoint(0)
        text = (hub.store.get(ArtifactRef(base.repo, base.revision, base.digest)) / "README.md").read_text()
        assert ModelCard(text).data.fedem == {"kind": "base", "version": 0, "parent": None, "source": "init"}
        for v in hub.registry.adapter_versions():
            text = (hub.store.get(ArtifactRef(v.repo, v.revision, v.digest)) / "README.md").read_text()
            card = ModelCard(text).data
            assert TEMPLATE not in text and card.fedem["version_kind"] == "fresh"
            assert card.language == [v.adapter] and card.base_model == base.repo
            assert {r.metric_type: r.metric_value for r in card.eval_results} == {
                f"heldout/{lang}": loss for lang, loss in v.metrics["heldout"].items()}
    finally:
        hub.registry.close()


def test_a_residual_rebase_says_what_it_continues_from(tmp_path, tiny):
    clock = FakeClock()
    registry, store, workbench = hub(tmp_path, tiny, clock)
    registry.add_checkpoint(0, "merge", "t/base", None, "d", {}, clock(), absorbed=[("hi", 0, 0.5, "mean", None)])

    store_adapter_version(registry, store, _adapter_folder(tmp_path / "rebase", workbench, store),
                          adapter="hi", base_version=1, parent_version=0, kind="rebase",
                          metrics={"heldout": {"hi": 3.7}, "rebase": {"mode": "residual", "relative": 0.2}},
                          created=clock())

    text = (store.local_path("t/adapter-hi", "v1") / "README.md").read_text()
    assert "continues from its residual" in text and "zero delta" not in text
