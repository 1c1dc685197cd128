"""A push lands as an update (DESIGN decision 20): when a merge rebased its adapter while the push was out,
the coordinator judges and keeps ``current + (pushed - start)`` per target, in weight space, factored back
to the adapter's rank; when nothing moved, the push itself, bit for bit.

No model: the adapter is two LoRA targets (an ``in_proj`` pair and an ``embeddings`` pair, whose delta
is transposed), and the workbench's held-out loss is the distance of the adapter's deltas from a target
(``lora_deltas``), so every expected number is computed here by hand from the states.
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from safetensors.torch import save_file

from fedem_flwr.config.schema import LoraConfig, TrainConfig
from fedem_flwr.hub.lineage import store_adapter_version
from fedem_flwr.hub.optimizer_states import OptimizerStates
from fedem_flwr.hub.paths import optimizer_state_path
from fedem_flwr.hub.registry import Registry
from fedem_flwr.hub.store import LocalStore
from fedem_flwr.lineage.merge import lora_deltas
from fedem_flwr.model.adapter_spec import AdapterSpec
from fedem_flwr.model.lora import read_adapter_state
from fedem_flwr.relay.coordinator import RelayCoordinator
from fedem_flwr.relay.policies import NodeProfile, make_policy
from fedem_flwr.training.optimizer_state import OptimizerState, load_optimizer_state, moment_spec
from tests.support.relay import TTL, FakeClock, assert_consistent

LORA = LoraConfig(r=2, alpha=4)  # scale alpha / r = 2
PREFIX = "base_model.model.backbone."
SHAPES = {  # in_proj: a [10, 6] weight; embeddings: a [12, 5] matrix (vocab 12, dim 5)
    PREFIX + "layers.0.mixer.in_proj.lora_A.weight": (2, 6),
    PREFIX + "layers.0.mixer.in_proj.lora_B.weight": (10, 2),
    PREFIX + "embeddings.lora_embedding_A": (2, 12),
    PREFIX + "embeddings.lora_embedding_B": (5, 2),
}


def lora_state(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {key: 0.5 * torch.randn(shape, generator=generator) for key, shape in SHAPES.items()}


def deltas64(state):
    return {t: d.double() for t, d in lora_deltas(state, LORA).items()}


class DeltaWorkbench:
    """Held-out loss on every language: the Frobenius distance of the adapter's deltas from ``target``."""

    weights = None
    heldout = dict.fromkeys(("hi",))

    def __init__(self, target):
        self.target = target
        self.judged = []  # every state it evaluated

    def evaluate(self, state, languages=None):
        self.judged.append({k: v.clone() for k, v in state.items()})
        deltas = deltas64(state)
        loss = math.sqrt(math.fsum(float((deltas[t] - self.target[t]).square().sum()) for t in deltas))
        return {lang: loss for lang in languages or self.heldout}

    def save(self, state, folder, base):
        (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base.repo}))
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "adapter_model.safetensors"))


def _hub(tmp_path, start, target, current=None, lanes=1, staleness_power=0.0, lane_update="add", gate=None):
    """Adapter ``hi`` (LoRA r 2, alpha 4) at v0 = ``start``, leased to a node from v0; with ``current``, a
    merge then rebased it: v1 = ``current``, a residual ``rebase`` on base v1, while the lease is out.
    With ``lanes`` > 1, as many nodes lease it from v0, one per lane (the leases are in ``_hub.leases``)."""
    clock = FakeClock()
    registry = Registry.open(tmp_path / "registry.sqlite")
    store = LocalStore(tmp_path / "store")
    workbench = DeltaWorkbench(target)
    (tmp_path / "seed").mkdir()
    (tmp_path / "seed" / "config.json").write_text("{}")
    base = store.put("t/base", "v0", tmp_path / "seed", message="seed")
    registry.add_checkpoint(None, "init", base.repo, base.revision, base.digest, {}, clock())
    (tmp_path / "v0").mkdir()
    workbench.save(start, tmp_path / "v0", base)
    ref = store.put("t/adapter-hi", "v0", tmp_path / "v0", message="v0")
    registry.add_adapter("hi", ["hi"], "causal-lm", {"r": 2, "alpha": 4, "dropout": 0.0,
                                                     "target_modules": ["in_proj", "embeddings"]}, clock())
    registry.add_adapter_version("hi", 0, None, ref.repo, ref.revision, ref.digest,
                                 {"heldout": workbench.evaluate(start)}, clock())
    coordinator = RelayCoordinator(registry, store, make_policy("language", random.Random(0)), workbench,
                                   lease_ttl_s=TTL, sweep_interval_s=10, clock=clock,
                                   train=TrainConfig(carry="moments"), optimizer_states=OptimizerStates(tmp_path),
                                   lanes=lanes, lane_update=lane_update, staleness_power=staleness_power, gate=gate)
    coordinator.recover()
    assignments = coordinator.assign([NodeProfile(f"sim:{i}", ("hi",)) for i in range(lanes)])
    _hub.leases = [a.lease for a in assignments]
    assignment = assignments[0]
    if current is not None:  # what the keeper does at a merge, while the lease is out
        registry.add_checkpoint(0, "merge", base.repo, base.revision, base.digest, {}, clock())
        (tmp_path / "v1").mkdir()
        workbench.save(current, tmp_path / "v1", base)
        store_adapter_version(registry, store, tmp_path / "v1", adapter="hi", base_version=1, parent_version=0,
                              kind="rebase", metrics={"heldout": workbench.evaluate(current),
                                                      "rebase": {"mode": "residual"}}, created=clock())
        coordinator.refresh_adapter("hi")
    workbench.judged.clear()
    return coordinator, registry, store, assignment.lease


def _optimizer(state, step, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = moment_spec(AdapterSpec.from_state(state)).shapes
    return OptimizerState(step, 0, {key: torch.rand(shape, generator=generator) for key, shape in shapes.items()})


def test_a_push_on_a_rebased_adapter_is_kept_as_its_change_added_to_the_current_version(tmp_path):
    # Prepare: the push trained v0 -> pushed; meanwhile a merge rebased the adapter to v1 = current.
    # Their exact sum S = current + (pushed - start) per target has rank up to 3r: truncated to r.
    start, pushed, current = lora_state(1), lora_state(2), lora_state(3)
    exact = {t: deltas64(current)[t] + deltas64(pushed)[t] - deltas64(start)[t] for t in deltas64(start)}
    coordinator, registry, store, lease = _hub(tmp_path, start, exact, current)
    best, lost, norm = {}, 0.0, 0.0
    for target, matrix in exact.items():  # Eckart-Young: the best rank-r approximation of each target
        U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
        best[target] = U[:, :2] @ torch.diag(S[:2]) @ Vh[:2]
        lost, norm = lost + float(S[2:].square().sum()), norm + float(S.square().sum())

    # Execute
    outcome = coordinator.receive_push(lease.token, pushed, metrics={"steps": 4.0},
                                       optimizer_state=_optimizer(pushed, step=7))

    # Assert: accepted as v2 on v1; the judged and stored state is the truncated update, in pushed's layout
    assert outcome.accepted and outcome.version == 2, outcome.reason
    row = registry.latest_adapter_version("hi")
    stored = read_adapter_state(store.get(row.ref))
    (judged,) = coordinator.workbench.judged
    assert {k: (v.shape, v.dtype) for k, v in stored.items()} == {k: (v.shape, v.dtype) for k, v in pushed.items()}
    assert all(torch.equal(stored[k], judged[k]) for k in stored)
    for target, delta in deltas64(stored).items():
        torch.testing.assert_close(delta, best[target], atol=1e-5, rtol=0, msg=target)
    # what the truncation lost is recorded with the version and the contribution; the loss is that loss
    update = row.metrics["update"]
    assert (update["from_version"], update["onto_version"]) == (0, 1)
    assert update["relative"] == pytest.approx(math.sqrt(lost / norm), rel=1e-6)
    assert update["absolute"] == pytest.approx(math.sqrt(lost), rel=1e-6) == pytest.approx(outcome.losses["hi"])
    assert 0.05 < update["relative"] < 1.0
    (contribution,) = registry.contributions()
    assert contribution.evaluation["update"] == update and contribution.adapter_version == 2
    assert (row.parent_version, row.base_version) == (1, 1)
    # the push's optimizer run goes on at its step, its moments zeroed and the warmup started there
    kept = load_optimizer_state(optimizer_state_path(tmp_path, "hi", 2))
    assert (kept.step, kept.warmup_from) == (7, 7)
    assert all(int(v.count_nonzero()) == 0 for v in kept.moments.values()) and kept.moments
    assert_consistent(coordinator, registry, store)


def test_a_push_whose_version_did_not_move_is_kept_bit_for_bit(tmp_path):
    # Prepare: nothing rebased the adapter while the lease was out
    start, pushed = lora_state(1), lora_state(2)
    coordinator, registry, store, lease = _hub(tmp_path, start, deltas64(pushed))
    moments = _optimizer(pushed, step=7)

    # Execute
    outcome = coordinator.receive_push(lease.token, pushed, optimizer_state=moments)

    # Assert
    assert outcome.accepted and outcome.version == 1 and outcome.losses == {"hi": 0.0}
    row = registry.latest_adapter_version("hi")
    stored = read_adapter_state(store.get(row.ref))
    assert all(torch.equal(stored[k], pushed[k]) for k in pushed) and set(stored) == set(pushed)
    assert "update" not in row.metrics and "update" not in registry.contributions()[0].evaluation
    kept = load_optimizer_state(optimizer_state_path(tmp_path, "hi", 1))
    assert (kept.step, kept.warmup_from) == (7, 0)
    assert all(torch.equal(kept.moments[k], moments.moments[k]) for k in moments.moments)


@pytest.mark.parametrize("sent", ["idle", "broken"])
def test_an_idle_or_broken_push_on_a_rebased_adapter_is_rejected_for_what_it_sent(tmp_path, sent):
    # Prepare: the node sends back the version its lease started from (v0), or one with a NaN weight
    start, current = lora_state(1), lora_state(3)
    coordinator, registry, store, lease = _hub(tmp_path, start, deltas64(current), current)
    pushed = {k: v.clone() for k, v in start.items()}
    if sent == "broken":
        pushed[PREFIX + "layers.0.mixer.in_proj.lora_B.weight"][0, 0] = math.nan

    # Execute
    outcome = coordinator.receive_push(lease.token, pushed)

    # Assert: unchanged from v0, the version its lease started from (v1 differs from it); a NaN cannot be
    # added to the current version. Nothing is kept, and the adapter is offered again at v1.
    assert not outcome.accepted
    if sent == "idle":
        assert outcome.reason.startswith("unchanged: max |delta| 0.0e+00 from v0 <= gate.min_change")
    else:
        assert outcome.reason.startswith("invalid-update: the delta on 'backbone.layers.0.mixer.in_proj.weight' "
                                         "is not finite")
    assert registry.latest_adapter_version("hi").version == 1 and not coordinator.workbench.judged
    (again,) = coordinator.assign([NodeProfile("sim:1", ("hi",))])
    assert again.lease.adapter_version == 1
    assert_consistent(coordinator, registry, store)


# -- lanes ---------------------------------------------------------------------------------------------
def _rebase(tmp_path, registry, store, coordinator, state, parent):
    """What the keeper does at a merge: a new base and a residual ``rebase`` version of ``hi``."""
    base = registry.latest_checkpoint()
    registry.add_checkpoint(base.version, "merge", base.repo, base.revision, base.digest, {}, 0.0)
    folder = tmp_path / f"rebase-{parent}"
    folder.mkdir()
    coordinator.workbench.save(state, folder, base.ref)
    store_adapter_version(registry, store, folder, adapter="hi", base_version=base.version + 1, parent_version=parent,
                          kind="rebase", metrics={"heldout": coordinator.workbench.evaluate(state),
                                                  "rebase": {"mode": "residual"}}, created=0.0)
    coordinator.refresh_adapter("hi")


@pytest.mark.parametrize("merge_between", [False, True], ids=["lanes", "lanes and a merge"])
def test_a_lane_push_lands_on_another_lanes_accepted_push(tmp_path, merge_between):
    # Prepare: two lanes lease hi v0. Lane 1 pushes first (nothing moved: kept as sent, v1); lane 0's push
    # then lands on v1 (or, with a merge between, on its rebase v2) as the change it made from v0.
    start, first, second = lora_state(1), lora_state(2), lora_state(3)
    rebased = lora_state(4)
    onto = rebased if merge_between else first
    exact = {t: deltas64(onto)[t] + deltas64(second)[t] - deltas64(start)[t] for t in deltas64(start)}
    coordinator, registry, store, _ = _hub(tmp_path, start, exact, lanes=2)
    lane0, lane1 = _hub.leases
    assert (lane0.lane, lane1.lane, lane0.adapter_version, lane1.adapter_version) == (0, 1, 0, 0)
    assert [(lease.adapter, lease.lane) for lease in registry.leases(active_only=True)] == [("hi", 0), ("hi", 1)]
    assert not coordinator.assign([NodeProfile("sim:9", ("hi",))])  # both lanes are held

    # Execute
    kept_first = coordinator.receive_push(lane1.token, first, optimizer_state=_optimizer(first, step=7, seed=1))
    if merge_between:
        _rebase(tmp_path, registry, store, coordinator, rebased, parent=1)
    coordinator.workbench.judged.clear()
    outcome = coordinator.receive_push(lane0.token, second, optimizer_state=_optimizer(second, step=9, seed=2))

    # Assert: the first push is v1 as sent; the second is onto's delta plus its own change, truncated
    assert kept_first.accepted and kept_first.version == 1, kept_first.reason
    onto_version = 2 if merge_between else 1
    assert outcome.accepted and outcome.version == onto_version + 1, outcome.reason
    row = registry.latest_adapter_version("hi")
    stored = read_adapter_state(store.get(row.ref))
    (judged,) = coordinator.workbench.judged
    assert all(torch.equal(stored[k], judged[k]) for k in stored)
    for target, delta in deltas64(stored).items():
        U, S, Vh = torch.linalg.svd(exact[target], full_matrices=False)
        torch.testing.assert_close(delta, U[:, :2] @ torch.diag(S[:2]) @ Vh[:2], atol=1e-5, rtol=0, msg=target)
    assert (row.metrics["update"]["from_version"], row.metrics["update"]["onto_version"]) == (0, onto_version)
    assert row.parent_version == onto_version
    # the schedule counts both lanes' steps (7 + 9 from v0's step 0); the moments start at zero; the
    # warmup starts again only where a merge rebased the adapter
    kept = load_optimizer_state(optimizer_state_path(tmp_path, "hi", outcome.version))
    assert (kept.step, kept.warmup_from) == ((16, 16) if merge_between else (16, 0))
    assert all(int(v.count_nonzero()) == 0 for v in kept.moments.values()) and kept.moments
    assert registry.leases(active_only=True) == []
    (again,) = coordinator.assign([NodeProfile("sim:9", ("hi",))])
    assert (again.lease.lane, again.lease.adapter_version) == (0, outcome.version)
    assert_consistent(coordinator, registry, store)


def test_with_one_lane_nothing_but_the_fedem_rule_changes(tmp_path):
    # one lane: a second node waits, and the push is kept bit for bit (as without lanes)
    start, pushed = lora_state(1), lora_state(2)
    coordinator, registry, store, lease = _hub(tmp_path, start, deltas64(pushed))

    waiting = coordinator.assign([NodeProfile("sim:1", ("hi",))])
    outcome = coordinator.receive_push(lease.token, pushed)

    assert waiting == [] and lease.lane == 0 and coordinator.lanes == 1
    assert outcome.accepted and "update" not in registry.latest_adapter_version("hi").metrics


def test_a_stale_lane_push_is_weighted_by_its_staleness(tmp_path):
    # Prepare: two lanes from v0; lane 1's push is accepted first, so lane 0's lands one push stale
    start, first, second = lora_state(1), lora_state(2), lora_state(3)
    weighted = {t: deltas64(first)[t] + 0.5 * (deltas64(second)[t] - deltas64(start)[t]) for t in deltas64(start)}
    coordinator, registry, store, _ = _hub(tmp_path, start, weighted, lanes=2, staleness_power=1.0, lane_update="add")
    lane0, lane1 = _hub.leases

    # Execute
    coordinator.receive_push(lane1.token, first)
    outcome = coordinator.receive_push(lane0.token, second)

    # Assert: weight (1 + 1) ** -1 on its change, recorded with the version
    assert outcome.accepted and outcome.version == 2, outcome.reason
    update = registry.latest_adapter_version("hi").metrics["update"]
    assert (update["staleness"], update["weight"], update["rule"]) == (1, 0.5, "add")
    stored = read_adapter_state(store.get(registry.latest_adapter_version("hi").ref))
    for target, delta in deltas64(stored).items():
        U, S, Vh = torch.linalg.svd(weighted[target], full_matrices=False)
        torch.testing.assert_close(delta, U[:, :2] @ torch.diag(S[:2]) @ Vh[:2], atol=1e-5, rtol=0, msg=target)


@pytest.mark.parametrize("merge_between", [False, True], ids=["lanes", "lanes and a merge"])
def test_a_mixed_lane_push_counts_what_the_lanes_trained_in_common_once(tmp_path, merge_between):
    # Prepare: two lanes from v0; lane 1's push is accepted first (v1); with a merge, v1 is then rebased
    # (v2 = v1 + R, R the rebase's change). Mixing at weight 1/2 gives v_cur + (second - v1) / 2: the mean
    # of the two lanes' models, with the rebase kept whole.
    start, first, second, rebased = lora_state(1), lora_state(2), lora_state(3), lora_state(4)
    onto = rebased if merge_between else first
    mixed = {t: deltas64(onto)[t] + 0.5 * (deltas64(second)[t] - deltas64(first)[t]) for t in deltas64(start)}
    coordinator, registry, store, _ = _hub(tmp_path, start, deltas64(first), lanes=2, staleness_power=1.0,
                                           lane_update="mix")
    lane0, lane1 = _hub.leases

    # Execute
    assert coordinator.receive_push(lane1.token, first).accepted
    if merge_between:
        _rebase(tmp_path, registry, store, coordinator, rebased, parent=1)
    coordinator.workbench.judged.clear()
    coordinator.receive_push(lane0.token, second)

    # Assert: what was judged is the mix, truncated to rank r (whatever the gate then decided)
    (contribution,) = [c for c in registry.contributions() if c.lease_token == lane0.token]
    update = contribution.evaluation["update"]
    assert (update["rule"], update["staleness"], update["weight"]) == ("mix", 1, 0.5)
    (judged,) = coordinator.workbench.judged
    for target, delta in deltas64(judged).items():
        U, S, Vh = torch.linalg.svd(mixed[target], full_matrices=False)
        torch.testing.assert_close(delta, U[:, :2] @ torch.diag(S[:2]) @ Vh[:2], atol=1e-5, rtol=0, msg=target)
    if not merge_between:  # nothing but lanes moved it: the mean of the two lanes' models
        for target in mixed:
            torch.testing.assert_close(mixed[target], 0.5 * (deltas64(first)[target] + deltas64(second)[target]))
