"""One push never ends the run, and no credit without work: the coordinator judging bad pushes.

The workbench is scripted (held-out loss = ``w[0]``), so each scenario is a plain registry + store +
coordinator, run in milliseconds. Every test checks that the relay goes on afterwards, that no
accepted version is lost and that the lease table agrees with the coordinator's leases. A reply's
metrics are checked once, where it is parsed (``messages.parse_metrics``); the coordinator records
what the parse kept and dropped.
"""

from __future__ import annotations

import math

import pytest
import torch

from fedem_flwr.config.schema import GateConfig
from fedem_flwr.errors import ConfigError, HubFault
from fedem_flwr.hub.store import ArtifactRef
from fedem_flwr.protocol.messages import parse_metrics
from fedem_flwr.relay.policies import NodeProfile
from tests.support.relay import TTL, FakeClock, ScriptedWorkbench, assert_consistent, seeded_coordinator

PAIR = ("m.lora_A.weight", "m.lora_B.weight")


class SpyWorkbench(ScriptedWorkbench):
    """The scripted workbench, counting calls; ``fault`` raises from ``evaluate`` or ``save``."""

    def __init__(self, fault=None):
        self.calls = {"evaluate": 0, "save": 0}
        self.fault = fault

    def evaluate(self, state, languages=None):
        self.calls["evaluate"] += 1
        if self.fault == "evaluate":
            raise RuntimeError("boom while evaluating\nsecond line")
        return super().evaluate(state, languages)

    def save(self, state, folder, base):
        self.calls["save"] += 1
        if self.fault == "save":
            raise RuntimeError("boom while saving")
        super().save(state, folder, base)


def _hub(tmp_path, fault=None, extra=None, gate=None):
    clock = FakeClock()
    coordinator, registry, store = seeded_coordinator(tmp_path, clock, extra=extra, workbench=SpyWorkbench(fault),
                                                      gate=gate)
    coordinator.recover()
    return coordinator, registry, store, clock


def _lease(coordinator, node="sim:0"):
    (assignment,) = coordinator.assign([NodeProfile(node, ("hi",))])
    return assignment.lease


def _push(coordinator, lease, loss, extra=None, **kw):
    return coordinator.receive_push(lease.token, {"w": torch.tensor([loss]), **(extra or {})}, **kw)


def _goes_on(coordinator, registry, store, loss=2.0, extra=None):
    """The adapter is free again and a better push becomes the next version."""
    before = registry.latest_adapter_version("hi").version
    outcome = _push(coordinator, _lease(coordinator, node="sim:7"), loss, extra)
    assert outcome.accepted and outcome.version == before + 1
    assert_consistent(coordinator, registry, store)


# -- non-finite numbers ---------------------------------------------------------------------------

def _parsed(metrics):
    """A reply's metrics as the protocol hands them on: kept and dropped by name."""
    kept, dropped = parse_metrics(metrics)
    return dict(metrics=kept, dropped_metrics=dropped)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_metrics_are_dropped_and_named(tmp_path, bad):
    coordinator, registry, store, _ = _hub(tmp_path)
    lease = _lease(coordinator)

    # An honest node that trained zero steps reports `loss-first=nan`.
    outcome = _push(coordinator, lease, 3.5, **_parsed({"loss-first": bad, "loss-last": 3.25, "steps": 3}))

    assert outcome.accepted and outcome.version == 1
    (contribution,) = registry.contributions()
    assert contribution.validation == {"ok": True, "dropped_metrics": ["loss-first"]}
    assert contribution.evaluation["train"] == {"loss-last": 3.25, "steps": 3}
    assert registry.latest_adapter_version("hi").metrics["train"] == {"loss-last": 3.25, "steps": 3}
    assert registry.lease(lease.token).outcome == "accepted"
    assert_consistent(coordinator, registry, store)  # the artifact has its registry row: no orphan
    _goes_on(coordinator, registry, store)


def test_metrics_the_parse_dropped_are_recorded_with_the_contribution(tmp_path):
    coordinator, registry, _, _ = _hub(tmp_path)
    metrics = {"steps": 3, "note": "text", "x": math.nan, "flag": True, "big": 2**70, "lr": 1e-3}

    parsed = _parsed(metrics)
    outcome = _push(coordinator, _lease(coordinator), 3.5, **parsed)

    assert parsed == {"metrics": {"lr": 1e-3, "steps": 3.0}, "dropped_metrics": ("big", "flag", "note", "x")}
    assert outcome.accepted
    (contribution,) = registry.contributions()
    assert contribution.validation["dropped_metrics"] == ["big", "flag", "note", "x"]
    assert contribution.evaluation["train"] == {"steps": 3, "lr": 1e-3}


def test_non_finite_metrics_on_a_fenced_rejection_are_recorded(tmp_path):
    coordinator, registry, store, clock = _hub(tmp_path)
    lease = _lease(coordinator)
    clock.now += TTL  # at the deadline: late

    outcome = _push(coordinator, lease, 3.5, **_parsed({"loss-first": math.nan}))

    assert outcome.reason == f"expired: token {lease.token} pushed at {clock.now:.3f}, 0.000 s after its deadline"
    (contribution,) = registry.contributions()
    assert (contribution.lease_token, contribution.decision) == (lease.token, "rejected")
    assert contribution.validation["dropped_metrics"] == ["loss-first"]
    assert registry.lease(lease.token).state == "expired"
    assert_consistent(coordinator, registry, store)
    _goes_on(coordinator, registry, store)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_loss_is_rejected_before_any_artifact(tmp_path, bad):
    coordinator, registry, store, _ = _hub(tmp_path, gate=GateConfig(check_others=True))
    lease = _lease(coordinator)

    outcome = _push(coordinator, lease, bad)

    assert not outcome.accepted
    # with gate.check_others the gate holds every held-out language, so both are evaluated
    assert outcome.reason == f"non-finite-loss: held-out loss hi={bad}, ta={bad}"
    assert coordinator.workbench.calls == {"evaluate": 1, "save": 0}
    assert store.revisions("t/adapter-hi") == ["v0"]
    (contribution,) = registry.contributions()
    assert contribution.evaluation["heldout"] == {"hi": None, "ta": None}
    assert contribution.evaluation["non_finite"] == ["hi", "ta"]
    stored = registry.lease(lease.token)
    assert (stored.state, stored.outcome) == ("released", "rejected")
    _goes_on(coordinator, registry, store)


# -- no credit without work -----------------------------------------------------------------------

@pytest.mark.parametrize("change", [0.0, 5e-7, -1e-6])
def test_an_unchanged_push_is_rejected_before_evaluation(tmp_path, change):
    coordinator, registry, store, _ = _hub(tmp_path)
    lease = _lease(coordinator)

    outcome = _push(coordinator, lease, 4.0 + change)  # v0 holds w = 4.0

    assert not outcome.accepted and outcome.reason.startswith("unchanged: ")
    assert "v0" in outcome.reason and "gate.min_change 1e-06" in outcome.reason
    assert coordinator.workbench.calls["evaluate"] == 0
    assert registry.latest_adapter_version("hi").version == 0
    assert registry.lease(lease.token).outcome == "rejected"
    assert [c.reason for c in registry.contributions()] == [outcome.reason]
    _goes_on(coordinator, registry, store)


def test_a_change_just_above_min_change_is_judged(tmp_path):
    coordinator, _, _, _ = _hub(tmp_path, gate=GateConfig(min_change=1e-3))

    outcome = _push(coordinator, _lease(coordinator), 4.0 - 2e-3)

    assert outcome.accepted and coordinator.workbench.calls["evaluate"] == 1


def _pair(a: float, b: float):
    return {PAIR[0]: torch.full((2, 3), a), PAIR[1]: torch.full((3, 2), b)}


def test_a_degenerate_lora_pair_is_rejected_before_evaluation(tmp_path):
    coordinator, registry, store, _ = _hub(tmp_path, extra=_pair(0.5, 0.0))  # v0: A random-like, B = 0
    lease = _lease(coordinator)

    outcome = _push(coordinator, lease, 1.0, extra=_pair(0.0, 0.0))

    assert not outcome.accepted
    assert outcome.reason == "degenerate: lora_A and lora_B are both all zero for 'm'; no gradient can move them"
    assert coordinator.workbench.calls["evaluate"] == 0
    assert registry.latest_adapter_version("hi").version == 0
    # A zero A with a non-zero B is a normal pair: it learns again.
    _goes_on(coordinator, registry, store, extra=_pair(0.0, 0.25))


def test_min_change_is_validated():
    assert GateConfig().min_change == 1e-6
    for bad in (-1e-6, math.nan, math.inf):
        with pytest.raises(ConfigError, match=r"`gate.min_change` is"):
            GateConfig(min_change=bad)


# -- errors while judging -------------------------------------------------------------------------

@pytest.mark.parametrize("fault", ["evaluate", "save"])
def test_an_error_while_judging_ends_that_lease_only(tmp_path, fault, caplog):
    coordinator, registry, store, _ = _hub(tmp_path, fault=fault)
    lease = _lease(coordinator)

    outcome = _push(coordinator, lease, 3.5, metrics={"steps": 2})

    assert not outcome.accepted
    assert outcome.reason == f"hub-error: RuntimeError: boom while {fault[:-1]}ing"
    assert "Traceback" in caplog.text
    stored = registry.lease(lease.token)
    assert (stored.state, stored.outcome) == ("released", "hub-error")
    (contribution,) = registry.contributions()
    assert (contribution.decision, contribution.reason) == ("rejected", outcome.reason)
    assert contribution.evaluation["train"] == {"steps": 2}
    assert store.revisions("t/adapter-hi") == ["v0"]
    coordinator.workbench.fault = None
    _goes_on(coordinator, registry, store)


def test_a_registry_that_cannot_be_written_stops_the_run(tmp_path):
    coordinator, registry, _, _ = _hub(tmp_path)
    lease = _lease(coordinator)
    registry._conn.execute("PRAGMA query_only = ON")  # as a full disk or a read-only file would

    with pytest.raises(HubFault) as err:
        _push(coordinator, lease, 3.5)

    assert "\n" not in str(err.value) and "OperationalError" in str(err.value)
    registry._conn.execute("PRAGMA query_only = OFF")
    assert registry.lease(lease.token).state == "active"  # a restart expires it (hub-restart)


def test_a_store_that_cannot_be_read_stops_the_run(tmp_path):
    coordinator, registry, store, _ = _hub(tmp_path)
    lease = _lease(coordinator)
    v0 = registry.latest_adapter_version("hi")
    (store.get(ArtifactRef(v0.repo, v0.revision, v0.digest)) / "adapter_model.safetensors").unlink()

    with pytest.raises(HubFault) as err:
        _push(coordinator, lease, 3.5)

    assert "\n" not in str(err.value) and "DigestMismatch" in str(err.value)
    assert registry.latest_adapter_version("hi").version == 0
    assert store.revisions("t/adapter-hi") == ["v0"]


# -- the pure checks ------------------------------------------------------------------------------

def test_max_change_and_degenerate_pairs_on_plain_tensors():
    from fedem_flwr.gate.novelty import degenerate_pairs, max_change

    parent = {"w": torch.tensor([1.0, 2.0]), "e.lora_embedding_A": torch.zeros(2, 2),
              "e.lora_embedding_B": torch.zeros(2, 2)}
    assert max_change({**parent, "w": torch.tensor([1.0, 2.5])}, parent) == 0.5
    assert max_change({**parent, "w": torch.tensor([1.0, math.nan])}, parent) == math.inf
    assert max_change({**parent, "w": torch.zeros(3)}, parent) == math.inf
    assert max_change({"w": parent["w"]}, parent) == math.inf
    assert degenerate_pairs(parent) == ["e"]
    assert degenerate_pairs({"m.lora_A.weight": torch.zeros(1)}) == []  # no partner: no pair
    assert degenerate_pairs({"w": torch.zeros(1)}) == []


def test_a_store_that_cannot_be_written_stops_the_run(tmp_path):
    from fedem_flwr.hub.store import TMP_DIR

    coordinator, registry, store, _ = _hub(tmp_path)
    lease = _lease(coordinator)
    scratch = store.root / TMP_DIR
    if scratch.is_dir():
        scratch.rmdir()
    scratch.write_text("not a folder")  # every write goes through this folder first

    with pytest.raises(HubFault, match=r"^cannot write t/adapter-hi@v1: \w+Error: ") as err:
        _push(coordinator, lease, 3.5)

    assert "\n" not in str(err.value)
    assert coordinator.workbench.calls == {"evaluate": 1, "save": 1}
    assert registry.latest_adapter_version("hi").version == 0 and not registry.contributions()
    assert store.revisions("t/adapter-hi") == ["v0"]
