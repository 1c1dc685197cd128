"""The real app on Flower's simulation engine, run as a sweep cell on the virtual clock and joined to
an existing Ray cluster: one `flwr run` simulation for the whole module.

The module starts a local Ray head (`ray start --head`, 2 CPUs, its own temporary folder and ports),
runs one relay cell of the app with `ray_address` (its own SuperLink, 3 virtual contributors, a
token budget), and stops the head's processes by the tag they carry (never `ray stop`, which stops
every Ray instance of the machine). Then it checks what a user relies on: the cell joined the
cluster and left its result; several adapters advanced through several versions; leases never
overlap on an adapter; accepted versions are no worse than their parents; nothing is left active.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from fedem_flwr.hub.registry import Registry
from fedem_flwr.launch.processes import TAG_VAR, free_ports, stop_trees, tagged
from fedem_flwr.simulation.record import read_trace
from simulations.cells import HUB_DIR, run_cell

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

LEASE_TOKENS = 6 * 4 * 128
CELL = {"method": "relay", "contributors": 3, "max_tokens": 10 * LEASE_TOKENS,
        "overrides": "data.languages=[hi,ta,mr,de] train.max_steps=6 train.batch_size=4 gate.check_others=false "
                     "merge.every_accepted=null merge.every_s=null"}


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on free ports in a short temporary folder (Ray's socket paths must stay short);
    yields (address, session folder)."""
    folder = Path(tempfile.mkdtemp(prefix="ray-"))
    port, client_port, agent_port, env_port = free_ports(4)
    tag = f"ray-head-{uuid.uuid4().hex[:8]}"
    argv = [str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={port}", "--num-cpus=2",
            f"--temp-dir={folder}", f"--ray-client-server-port={client_port}",
            f"--dashboard-agent-listen-port={agent_port}", f"--runtime-env-agent-port={env_port}",
            "--include-dashboard=false", "--disable-usage-stats"]
    env = {**os.environ, TAG_VAR: tag, "RAY_ADDRESS": ""}
    started = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield f"127.0.0.1:{port}", folder
    finally:
        stop_trees([], timeout=10.0, tags=[tag])
        assert not tagged([tag])
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def cell(ray_head, tmp_path_factory):
    address, folder = ray_head
    env_before = os.environ.get("RAY_ADDRESS")
    drivers_before = set(folder.glob("session_*/logs/python-core-driver-*"))
    cell_dir = tmp_path_factory.mktemp("cell")
    status = run_cell(CELL, cell_dir, ray_address=address, timeout=480)
    assert os.environ.get("RAY_ADDRESS") == env_before  # the address does not leak into this process
    joined = set(folder.glob("session_*/logs/python-core-driver-*")) - drivers_before
    return {"status": status, "dir": cell_dir, "address": address, "joined": joined}


@pytest.fixture(scope="module")
def registry(cell):
    with Registry.open(cell["dir"] / HUB_DIR, readonly=True) as registry:
        yield registry


def test_the_cell_ran_on_the_existing_ray_cluster_to_its_token_budget(cell):
    run = json.loads((cell["dir"] / "run.json").read_text())
    log = (cell["dir"] / "flwr.log").read_text()[-3000:]
    assert run["status"] == "finished:completed", (cell["status"], log)
    assert run["ray_address"] == cell["address"]
    assert cell["joined"]  # the simulation was a driver of the head's cluster (its core-driver log is there)
    status = cell["status"]
    assert status["status"] == "ok", status
    assert status["method"] == "relay" and status["stopped_by"].startswith("token budget")
    assert CELL["max_tokens"] <= status["tokens"] and status["sim_seconds"] > status["wall_seconds"]
    trace = read_trace(cell["dir"] / HUB_DIR)
    assert trace[-1]["tokens"] == status["tokens"]


def test_several_adapters_advance_through_several_versions(registry):
    versions = [v for v in registry.adapter_versions() if v.version > 0]
    assert len(versions) >= 6
    assert len({v.adapter for v in versions}) >= 2
    assert max(v.version for v in versions) >= 2


def test_no_two_leases_ever_overlap_on_an_adapter(registry):
    leases = registry.leases()
    assert not registry.leases(active_only=True)
    for adapter in {lease.adapter for lease in leases}:
        mine = sorted((lease for lease in leases if lease.adapter == adapter), key=lambda lease: lease.issued)
        for earlier, later in zip(mine, mine[1:]):
            assert earlier.ended <= later.issued


def test_accepted_versions_are_no_worse_than_their_parents(registry):
    versions = {(v.adapter, v.version): v for v in registry.adapter_versions()}
    for (adapter, number), version in versions.items():
        if number:
            (language,) = registry.adapter(adapter).languages
            parent = versions[(adapter, version.parent_version)]
            assert version.metrics["heldout"][language] <= parent.metrics["heldout"][language]


def test_simulated_contributors_are_keyed_by_partition(registry):
    assert set(registry.identities().values()) <= {"sim:0", "sim:1", "sim:2"}
