"""The base improves during a relay: merges of accepted adapters and CPT checkpoints, each published
only through the base gate, on the in-process Grid with the real ClientApp, model, data and hub."""

from __future__ import annotations

import logging

import pytest
import torch

from fedem_flwr.gate.loss import evaluate
from fedem_flwr.hub.registry import Registry
from fedem_flwr.hub.store import ArtifactRef
from fedem_flwr.model.factory import load_base
from fedem_flwr.relay.bootstrap import open_hub
from fedem_flwr.relay.keeper import BaseKeeper
from fedem_flwr.relay.policies import NodeProfile
from tests.support.relay import KEEPER_OVERRIDES, open_real_hub, relay_in_process

pytestmark = pytest.mark.slow  # relays, merges and pretrains real models on a real hub


def _hub(tmp_path, extra=""):
    # The exact sum with a zero restart, whose arithmetic these tests pin down; mean merges with
    # residual rebases (the default) are tested in test_merge_residual.
    return open_real_hub(tmp_path, f"{KEEPER_OVERRIDES} merge.method=sum merge.rebase=zero {extra}")


_relay = relay_in_process


def _losses_of(hub, version):
    row = hub.registry.checkpoint(version)
    model, _ = load_base(str(hub.store.get(ArtifactRef(row.repo, row.revision, row.digest))))
    wb = hub.workbench
    return {lang: r["loss"] for lang, r in evaluate(model, wb.heldout, pad_id=wb.pad_id).items()}


def _state(hub, adapter, version):
    from fedem_flwr.model.adapter_spec import load_adapter_file

    row = next(v for v in hub.registry.adapter_versions(adapter) if v.version == version)
    return load_adapter_file(hub.store.get(ArtifactRef(row.repo, row.revision, row.digest)) / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("merged")
    hub, run_config = _hub(tmp_path, "relay.max_accepted=7 merge.every_accepted=3")
    keeper = BaseKeeper(hub)
    result = _relay(hub, run_config, tmp_path, keeper)
    return hub, keeper, result


def test_merges_publish_new_bases_that_beat_v0_on_every_language(merged):
    hub, _, result = merged
    bases = hub.registry.checkpoints()
    assert result.accepted >= 7  # the pushes in flight when the 7th was accepted are judged too
    assert [b.source for b in bases][:2] == ["init", "merge"]
    assert all(b.parent == b.version - 1 for b in bases[1:])  # one lineage
    first, newest = _losses_of(hub, 0), _losses_of(hub, bases[-1].version)
    assert set(newest) == set(first) == {"hi", "ta", "mr", "de"}
    assert all(newest[lang] < first[lang] for lang in first), (first, newest)
    merge = bases[1]
    assert merge.metrics["merge"]["method"] == "sum"
    absorbed = hub.registry.absorbed(merge.version)
    assert absorbed and all(a.method == "sum" and a.weight == 1.0 for a in absorbed)


def test_an_absorbed_adapter_restarts_from_a_zero_delta_on_the_new_base(merged):
    hub, _, _ = merged
    merge = hub.registry.checkpoints()[1]
    for row in hub.registry.absorbed(merge.version):
        versions = hub.registry.adapter_versions(row.adapter)
        rebase = next(v for v in versions if v.kind == "rebase" and v.base_version == merge.version)
        assert rebase.parent_version == row.adapter_version
        state = _state(hub, row.adapter, rebase.version)
        lora_b = [v for k, v in state.items() if "lora_B" in k]
        assert lora_b and all(int(t.count_nonzero()) == 0 for t in lora_b)


def test_every_adapter_is_evaluated_on_the_newest_base_and_pushes_are_judged_there(merged):
    hub, _, _ = merged
    newest = hub.registry.latest_checkpoint()
    for adapter in hub.registry.adapters():  # a zero-delta version scores the new base itself
        current = hub.registry.latest_adapter_version(adapter.name)
        if current.kind != "push":
            assert hub.registry.parent_losses(adapter.name, current.version, newest.version) == \
                newest.metrics["heldout"]
    judged = {c.judged_base_version for c in hub.registry.contributions()}
    assert judged >= {0, 1}
    for c in hub.registry.contributions():
        if c.adapter_version is not None:
            version = next(v for v in hub.registry.adapter_versions(c.adapter) if v.version == c.adapter_version)
            assert version.base_version == c.judged_base_version


def test_a_merge_the_gate_refuses_is_recorded_and_nothing_changes(tmp_path):
    hub, run_config = _hub(tmp_path, "relay.max_accepted=2 merge.every_accepted=null merge.margin=50")
    _relay(hub, run_config, tmp_path)
    keeper = BaseKeeper(hub)

    assert keeper.merge("requested") is None

    assert [b.version for b in hub.registry.checkpoints()] == [0]
    (attempt,) = hub.registry.base_attempts()
    assert attempt.source == "merge" and "requested" in attempt.reason and "margin" in attempt.reason
    assert all(v.kind != "rebase" for v in hub.registry.adapter_versions())


def test_a_leased_adapter_waits_and_a_push_on_an_older_base_is_judged_on_the_newest(tmp_path):
    hub, run_config = _hub(tmp_path, "relay.max_accepted=3 merge.every_accepted=null")
    _relay(hub, run_config, tmp_path)
    keeper = BaseKeeper(hub)
    pushed = [a.name for a in hub.registry.adapters()
              if hub.registry.latest_adapter_version(a.name).kind == "push"]
    held = pushed[0]
    (assignment,) = hub.coordinator.assign([NodeProfile("sim:9", (held,))])
    assert assignment.lease.adapter == held and assignment.lease.base_version == 0

    new = keeper.merge("requested")

    assert new is not None and new.version == 1
    assert held not in {a.adapter for a in hub.registry.absorbed(1)}
    carried = hub.registry.latest_adapter_version(held)
    assert carried.kind == "push"  # carried, not rebased
    # The push comes back trained on base v0, its LoRA B pushed far from anything trained (a worse
    # adapter): judged on v1 against its parent's losses there, and rejected on its own language.
    parent = _state(hub, held, hub.registry.latest_adapter_version(held).version)
    spoiled = {k: v + 0.5 * torch.ones_like(v) if "lora_B" in k else v for k, v in parent.items()}
    outcome = hub.coordinator.receive_push(assignment.lease.token, spoiled)
    (contribution,) = [c for c in hub.registry.contributions() if c.lease_token == assignment.lease.token]
    assert (contribution.base_version, contribution.judged_base_version) == (0, 1)
    before = hub.registry.parent_losses(held, carried.version, 1)[held]  # the parent, evaluated on v1 first
    after = outcome.losses[held]
    assert (outcome.decision, outcome.reason) == (
        "rejected", f"loss {before:.3f} -> {after:.3f} on {held} ({after - before:+.3f}); needs no increase")
    assert hub.registry.latest_adapter_version(held).version == carried.version
    assert not hub.registry.leases(active_only=True)


def test_cpt_checkpoints_pass_the_gate_and_resume_after_a_restart(tmp_path):
    hub, _ = _hub(tmp_path, "cpt.enabled=true")
    keeper = BaseKeeper(hub)
    for _ in range(60):
        keeper.turn(busy=False)
        if len(hub.registry.checkpoints()) > 1:
            break
    cpt_base = hub.registry.latest_checkpoint()
    assert cpt_base.source == "cpt" and cpt_base.parent == 0
    assert cpt_base.metrics["cpt"]["steps"] == 15 and cpt_base.metrics["cpt"]["tokens"] > 0
    first = _losses_of(hub, 0)
    assert all(cpt_base.metrics["heldout"][lang] < first[lang] for lang in first)
    for adapter in hub.registry.adapters():  # every fresh adapter is evaluated on the new base
        assert hub.registry.parent_losses(adapter.name, 0, cpt_base.version)

    keeper.turn(busy=False)  # steps past the checkpoint are gated when the run ends, not lost
    steps = keeper._pretrainer.step
    assert steps > 15
    keeper.finish()
    final = hub.registry.latest_checkpoint()
    attempts = hub.registry.base_attempts(source="cpt")
    assert final.metrics.get("cpt", {}).get("steps") == steps or attempts[-1].details["cpt"]["steps"] == steps

    again = BaseKeeper(open_hub(hub.cfg, hub.path))
    again.turn(busy=False)
    assert again._pretrainer.resumed and again._pretrainer.step > steps


def test_a_failing_merge_is_recorded_and_the_relay_goes_on(tmp_path, monkeypatch):
    hub, run_config = _hub(tmp_path, "relay.max_accepted=2 merge.every_accepted=1")
    keeper = BaseKeeper(hub)

    def broken(*args, **kwargs):
        raise RuntimeError("merged weights fell over")

    monkeypatch.setattr("fedem_flwr.relay.keeper.merge_adapters", broken)
    result = _relay(hub, run_config, tmp_path, keeper)

    assert result.accepted == 2
    attempts = hub.registry.base_attempts()
    assert attempts and all("RuntimeError: merged weights fell over" in a.reason for a in attempts)
    assert [b.version for b in hub.registry.checkpoints()] == [0]


def test_a_backup_request_the_hub_cannot_read_is_logged_and_the_relay_goes_on(tmp_path, caplog, monkeypatch):
    from fedem_flwr.hub.backup_request import pending_backup_requests, requests_path

    monkeypatch.setattr(logging.getLogger("fedem_flwr"), "propagate", True)  # the Flower bridge may have cut it
    hub, _ = _hub(tmp_path)
    keeper = BaseKeeper(hub)
    (requests_path(hub.path) / "0000000000001-deadbeef.json").mkdir(parents=True)  # a folder: reading it fails

    keeper.turn(True)  # busy: no CPT slice; nothing accepted, so no merge either

    assert "Taking the hub's snapshots failed" in caplog.text
    assert pending_backup_requests(hub.path) == []  # taken aside, not tried again at every turn


def test_fedem_merge_now_merges_under_the_writer_lock_when_no_hub_runs(tmp_path):
    from click.testing import CliRunner

    from fedem_flwr.cli import cli

    hub, run_config = _hub(tmp_path, "relay.max_accepted=2 merge.every_accepted=null")
    _relay(hub, run_config, tmp_path)
    hub.registry.close()

    result = CliRunner().invoke(cli, ["--hub", str(hub.path), "merge", "--now", "--overrides", run_config["overrides"]])

    assert result.exit_code == 0, result.output
    assert result.output.strip() == "published base v1 (merge from v0)"
    with Registry.open(hub.path / "registry.sqlite", readonly=True) as registry:
        assert [b.source for b in registry.checkpoints()] == ["init", "merge"]
        assert registry.absorbed(1)


def test_every_published_base_loads_with_transformers_and_carries_its_card(merged):
    from transformers import AutoModelForCausalLM

    hub, _, _ = merged
    for base in hub.registry.checkpoints()[1:]:
        folder = hub.store.get(ArtifactRef(base.repo, base.revision, base.digest))
        model = AutoModelForCausalLM.from_pretrained(str(folder))
        assert sum(p.numel() for p in model.parameters()) > 0
        card = (folder / "README.md").read_text()
        assert base.source in card and "[More Information Needed]" not in card
        for row in hub.registry.absorbed(base.version):
            assert f"{row.adapter}" in card


def test_a_failing_cpt_slice_is_recorded_once_and_retried_after_a_wait(tmp_path, monkeypatch):
    hub, _ = _hub(tmp_path, "cpt.enabled=true")
    keeper = BaseKeeper(hub)

    def damaged(*args, **kwargs):
        raise RuntimeError("CPT state damaged")

    monkeypatch.setattr("fedem_flwr.relay.keeper.ContinuousPretrainer", damaged)
    for _ in range(5):
        keeper.turn(busy=False)

    (attempt,) = hub.registry.base_attempts()
    assert attempt.source == "cpt" and attempt.reason == "error: RuntimeError: CPT state damaged"
    assert [b.version for b in hub.registry.checkpoints()] == [0]
