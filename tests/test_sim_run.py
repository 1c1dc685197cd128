"""Whole simulations on the virtual clock, as the ServerApp runs them (``sim.clock=virtual``): the
real hub, relay Strategy, base keeper, FedAvg and ClientApp on the in-process Grid behind a
VirtualGrid."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from fedem_flwr.client_app import app as client_app
from fedem_flwr.config.loader import load_run_config
from fedem_flwr.errors import ConfigError
from fedem_flwr.hub.paths import registry_path
from fedem_flwr.hub.registry import Registry
from fedem_flwr.server_app import main as server_main
from fedem_flwr.simulation.record import read_result, read_trace
from fedem_flwr.simulation.run import run_simulation
from tests.support.fake_grid import InProcessGrid

pytestmark = pytest.mark.slow  # whole simulations, each training real adapters for many leases

NODES = 6
STEPS, BATCH, BLOCK = 4, 4, 128
LEASE_TOKENS = STEPS * BATCH * BLOCK
BASE = ("data.languages=[hi,ta,mr,de] train.progress=false sim.clock=virtual gate.check_others=false "
        f"train.max_steps={STEPS} train.batch_size={BATCH} merge.every_accepted=null merge.every_s=null")


def _simulate(tmp_path: Path, overrides: str, nodes: int = NODES) -> tuple[dict, Path]:
    hub = tmp_path / "hub"
    run_config = {"overrides": f"{BASE} {overrides}", "hub": str(hub)}
    grid = InProcessGrid(client_app, {100 + i: {"partition-id": i, "num-partitions": nodes,
                                                "cache-dir": str(tmp_path / f"cache-{i}")} for i in range(nodes)},
                         run_config)
    run_simulation(grid, load_run_config(run_config), hub)
    return read_result(hub), hub


def test_a_relay_of_three_hour_leases_runs_simulated_hours_in_seconds_and_spends_its_budget(tmp_path):
    budget = 12 * LEASE_TOKENS
    # Slow contributors (4 steps take about 45 simulated minutes) who sometimes vanish.
    result, hub = _simulate(tmp_path, f"sim.max_tokens={budget} sim.speed=0.0015 sim.vanish_prob=0.25 "
                                      "relay.lease_ttl_s=10800 relay.sweep_interval_s=300")
    assert result["method"] == "relay" and result["stopped_by"].startswith("token budget")
    assert result["sim_seconds"] > 3 * 3600
    assert budget <= result["tokens"] < budget + NODES * LEASE_TOKENS
    assert result["accepted"] > 0 and result["expired"] > 0  # someone vanished: wasted, reported gone
    assert 0 < result["tokens_wasted"] < result["tokens"]
    assert all(result["losses"][lang] < result["initial_losses"][lang] for lang in ("hi", "mr", "de")
               if lang in result["losses"])
    with Registry.open(registry_path(hub), readonly=True) as registry:
        leases = registry.leases()
        gone = [lease for lease in leases if lease.outcome == "node-gone"]
        assert len(gone) == result["expired"]
        # Leases live on the simulated clock: issued over hours, each within its own 3 hours.
        issued = sorted(lease.issued for lease in leases)
        assert issued[-1] - issued[0] > 3600
        assert all(lease.ended is None or lease.ended <= lease.deadline for lease in leases)
        assert registry.contribution_counts()["accepted"] == result["accepted"]
    trace = read_trace(hub)
    assert [row["sim_s"] for row in trace] == sorted(row["sim_s"] for row in trace)
    assert trace[-1]["tokens"] == result["tokens"] and trace[-1]["loss_mean"] == pytest.approx(result["loss_mean"])
    # Lease utilisation: one lane of each of the 4 languages for 6 contributors; the trace's last row is the end
    assert result["ceiling_inputs"] == {"lanes": 1, "contributors": NODES,
                                        "holders": {"de": 2, "hi": 1, "mr": 2, "ta": 1}}
    assert result["utilisation_ceiling"] == pytest.approx(4 / NODES)
    assert 0 < result["lease_seconds"] < result["online_seconds"] < NODES * result["sim_seconds"]  # some were away
    assert result["lease_utilisation"] == pytest.approx(result["lease_seconds"] / result["online_seconds"], rel=1e-6)
    assert result["utilisation_of_ceiling"] == pytest.approx(result["lease_utilisation"] * NODES / 4)
    assert (trace[-1]["lease_s"], trace[-1]["online_s"]) == pytest.approx(
        (result["lease_seconds"], result["online_seconds"]), abs=1e-3)


def test_merges_and_cpt_publish_on_simulated_time_and_cpt_tokens_count_against_the_budget(tmp_path):
    # A merge every 3 accepted pushes and a CPT checkpoint every 6 steps, at the gates' own tolerances.
    result, hub = _simulate(tmp_path, f"sim.max_tokens={16 * LEASE_TOKENS} merge.every_accepted=3 "
                                      "cpt.enabled=true cpt.batch_size=2 cpt.checkpoint_every=6 sim.hub_cpt_speed=0.01")
    assert result["cpt_tokens"] > 0
    with Registry.open(registry_path(hub), readonly=True) as registry:
        checkpoints = registry.checkpoints()
    sources = [checkpoint.source for checkpoint in checkpoints]
    assert sources[0] == "init" and {"merge", "cpt"} <= set(sources), sources
    assert result["base_version"] == checkpoints[-1].version == len(checkpoints) - 1
    assert all(checkpoint.parent == checkpoint.version - 1 for checkpoint in checkpoints[1:])  # one lineage
    # CPT paced by simulated time: about hub_cpt_speed steps a simulated second, never more.
    assert result["cpt_tokens"] <= 0.01 * result["sim_seconds"] * 2 * BLOCK + 2 * BLOCK


@pytest.mark.parametrize("method", ["fedavg-global", "fedavg-language"])
def test_fedavg_rounds_wait_for_their_slowest_node_in_simulated_time(tmp_path, method):
    result, hub = _simulate(tmp_path, f"sim.method={method} sim.max_tokens={10 * LEASE_TOKENS} sim.speed=0.01")
    assert result["method"] == method and result["rounds"] >= 1
    assert result["tokens"] >= 10 * LEASE_TOKENS * 0.9
    assert result["sim_seconds"] >= result["rounds"] * STEPS / (0.01 * 4)  # no contributor is 4x the median
    assert result["loss_mean"] < sum(result["initial_losses"].values()) / len(result["initial_losses"])
    # its own utilisation, measured as the relay's; no lane rule, so no ceiling
    assert 0 < result["lease_utilisation"] <= 1 and result["utilisation_ceiling"] is None
    assert result["lease_utilisation"] == pytest.approx(result["lease_seconds"] / result["online_seconds"], rel=1e-6)


def test_the_virtual_clock_is_refused_on_a_real_superlink(tmp_path):
    run_config = {"overrides": BASE, "hub": str(tmp_path / "hub")}
    grid = InProcessGrid(client_app, {1: {"data-path": str(tmp_path)}}, run_config, simulation=False)
    with pytest.raises(ConfigError, match="sim.clock=virtual"):
        server_main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
