"""The non-federated references (centralized, local-only) on a real tiny hub, at a small token budget."""

from __future__ import annotations

import math
from statistics import mean

import pytest

from fedem_flwr.config.loader import load_run_config
from fedem_flwr.errors import ConfigError
from fedem_flwr.hub.paths import registry_path
from fedem_flwr.hub.registry import Registry
from fedem_flwr.relay.bootstrap import open_hub
from fedem_flwr.simulation.baselines import run_baseline
from fedem_flwr.simulation.record import read_result, read_trace

pytestmark = pytest.mark.slow  # centralized and local-only runs that train real adapters

BUDGET = 16_000
CONTRIBUTORS = 6
OVERRIDES = f"data.languages=[hi,ta,mr,de] train.max_steps=8 train.batch_size=4 train.progress=false sim.max_tokens={BUDGET}"
STEP_TOKENS = 4 * 128  # batch_size x block_size: the most one step trains


def _run(tmp_path_factory, method, contributors=1):
    hub = tmp_path_factory.mktemp(method) / "hub"
    cfg = load_run_config({"overrides": OVERRIDES, "hub": str(hub)})
    return hub, cfg, run_baseline(method, cfg, hub, contributors, progress=False)


@pytest.fixture(scope="module")
def centralized(tmp_path_factory):
    return _run(tmp_path_factory, "centralized")


@pytest.fixture(scope="module")
def local_only(tmp_path_factory):
    return _run(tmp_path_factory, "local-only", CONTRIBUTORS)


def _fresh_losses(hub):
    """Base v0 with each language's fresh adapter, as the hub recorded it when seeding."""
    registry = Registry.open(registry_path(hub))
    return {a.name: registry.adapter_versions(a.name)[0].metrics["heldout"][a.name] for a in registry.adapters()}


@pytest.mark.parametrize("which", ["centralized", "local_only"])
def test_every_language_ends_below_base_v0(which, request):
    hub, _, result = request.getfixturevalue(which)
    fresh = _fresh_losses(hub)
    assert sorted(result["losses"]) == sorted(fresh) == ["de", "hi", "mr", "ta"]
    for language, loss in result["losses"].items():
        assert loss < fresh[language] - 0.1, (language, loss, fresh[language])


@pytest.mark.parametrize("which", ["centralized", "local_only"])
def test_budget_is_spent_within_a_step_per_adapter(which, request):
    _, _, result = request.getfixturevalue(which)
    assert abs(result["tokens"] - BUDGET) <= result["adapters_trained"] * STEP_TOKENS
    assert result["tokens"] > BUDGET - STEP_TOKENS * result["adapters_trained"]


def test_centralized_trains_one_adapter_per_language_on_all_its_rows(centralized):
    _, _, result = centralized
    assert result["adapters_trained"] == 4 and result["contributors"] == 1
    assert "per_contributor" not in result


def test_local_only_averages_over_the_contributors_holding_a_language(local_only):
    hub_path, cfg, result = local_only
    hub = open_hub(cfg, hub_path)
    holders = {}
    for pid in range(CONTRIBUTORS):
        for language in set(hub.training_rows(pid, CONTRIBUTORS)["language"]):
            holders.setdefault(language, []).append(f"p{pid}")
    per = result["per_contributor"]
    assert sorted(per) == sorted(f"p{pid}" for pid in range(CONTRIBUTORS))
    assert any(len(h) > 1 for h in holders.values())  # the mean is over several somewhere
    for language, loss in result["losses"].items():
        assert sorted(p for p in per if language in per[p]["losses"]) == sorted(holders[language])
        assert loss == pytest.approx(mean(per[p]["losses"][language] for p in holders[language]))
    for entry in per.values():  # each contributor alone on its share of the budget
        assert entry["tokens"] <= BUDGET / CONTRIBUTORS + len(entry["losses"]) * STEP_TOKENS


@pytest.mark.parametrize("which", ["centralized", "local_only"])
def test_result_and_trace_are_written(which, request):
    hub, _, result = request.getfixturevalue(which)
    assert read_result(hub) == result
    assert result["method"] == {"centralized": "centralized", "local_only": "local-only"}[which]
    assert result["sim_seconds"] is None and result["wall_seconds"] > 0
    rows = read_trace(hub)
    assert rows[0]["tokens"] == 0 and rows[-1]["tokens"] == result["tokens"]
    assert rows[-1]["losses"] == pytest.approx(result["losses"], abs=1e-6)
    assert len(rows) >= 4  # evaluations as the budget is spent, not only at start and end
    assert [r["tokens"] for r in rows] == sorted(r["tokens"] for r in rows)
    assert all(math.isnan(r["sim_s"]) for r in rows)


def test_a_baseline_needs_a_budget_and_a_known_method(tmp_path):
    cfg = load_run_config({"overrides": "data.languages=[hi,ta]", "hub": str(tmp_path / "hub")})
    with pytest.raises(ConfigError, match="sim.max_tokens"):
        run_baseline("centralized", cfg, tmp_path / "hub")
    with pytest.raises(ConfigError, match="'fedprox'"):
        run_baseline("fedprox", cfg, tmp_path / "hub")
