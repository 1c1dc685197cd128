"""The registry's records for a hub that runs for months: pruned rows stay, publications are kept
once with their content, and counters never go back below a floor a restore raised."""

from __future__ import annotations

import pytest

from fedem_flwr.errors import RegistryConflict
from fedem_flwr.hub.registry import CHECKPOINT_COUNTER, CONTRIBUTION_COUNTER, LEASE_COUNTER, Registry, adapter_counter

D = "d" * 64


@pytest.fixture
def registry(tmp_path):
    registry = Registry.open(tmp_path / "registry.sqlite")
    registry.add_checkpoint(None, "init", "t/base", None, D, {}, 1.0)
    registry.add_adapter("hi", ["hi"], "causal-lm", {}, 1.0)
    registry.add_adapter_version("hi", 0, None, "t/adapter-hi", None, D, {}, 1.0)
    return registry


def test_a_pruned_version_keeps_its_row_and_says_when(registry):
    registry.mark_version_pruned("hi", 0, at=5.0)
    registry.mark_version_pruned("hi", 0, at=9.0)  # once pruned, the first time stays
    registry.mark_checkpoint_pruned(0, at=6.0)

    assert registry.adapter_version("hi", 0).pruned == 5.0 and registry.checkpoint(0).pruned == 6.0
    assert registry.latest_adapter_version("hi").digest == D  # the lineage is whole
    with pytest.raises(RegistryConflict, match="adapter 'hi' v7 is not in the registry"):
        registry.mark_version_pruned("hi", 7, at=5.0)


def test_a_publication_is_recorded_once_and_never_with_other_content(registry):
    registry.record_publication("t/base", "v0", D, "hf:http://hub", at=2.0)
    registry.record_publication("t/base", "v0", D, "hf:http://hub", at=3.0)  # published again: the same

    assert registry.publications() == {("t/base", "v0"): {"digest": D, "target": "hf:http://hub", "published": 2.0}}
    assert registry.publications("hf:elsewhere") == {}
    with pytest.raises(RegistryConflict, match="a published tag never changes content"):
        registry.record_publication("t/base", "v0", "e" * 64, "hf:http://hub", at=4.0)


def test_counters_move_past_a_floor_and_never_back(registry):
    registry.raise_floor(CHECKPOINT_COUNTER, 5, at=1.0)
    registry.raise_floor(adapter_counter("hi"), 9, at=1.0)
    registry.raise_floor(LEASE_COUNTER, 100, at=1.0)
    registry.raise_floor(CONTRIBUTION_COUNTER, 40, at=1.0)
    assert registry.raise_floor(LEASE_COUNTER, 50, at=2.0) == 100  # never lowered

    assert registry.add_checkpoint(0, "cpt", "t/base", None, D, {}, 2.0).version == 5
    assert registry.add_adapter_version("hi", 5, 0, "t/adapter-hi", None, D, {}, 2.0).version == 9
    assert registry.max_lease_token() == 99
    assert registry.next_contribution_id() == 40  # what an adapter card records before the row exists
    first = registry.add_contribution(registry.pseudonym("sim:0", 1.0), "hi", None, 2.0, D, {}, {}, "rejected")
    second = registry.add_contribution(registry.pseudonym("sim:0", 1.0), "hi", None, 3.0, D, {}, {}, "rejected")
    assert (first, second) == (40, 41) and registry.next_contribution_id() == 42
    assert registry.floors() == {"adapter:hi": 9, "checkpoint": 5, "contribution": 40, "lease": 100}


def test_the_accepted_contribution_of_a_version_is_the_one_that_made_it(registry):
    pseudonym = registry.pseudonym("sim:0", 1.0)
    registry.add_adapter_version("hi", 0, 0, "t/adapter-hi", None, D, {}, 2.0)  # hi v1
    registry.add_contribution(pseudonym, "hi", None, 2.0, D, {}, {}, "rejected", "worse", None)
    made = registry.add_contribution(pseudonym, "hi", None, 3.0, D, {}, {}, "accepted", "better", 1)

    assert registry.accepted_contribution("hi", 1).id == made
    assert registry.accepted_contribution("hi", 0) is None  # a fresh start: no push made it
