"""A sweep cell joins an existing Ray cluster: the test starts a local Ray head (`ray start --head`,
2 CPUs, its own temporary folder and ports), runs one small federated cell of the app with
`ray_address`, checks that the simulation ran as a driver of that cluster, and stops the head's
processes by the tag they carry (never `ray stop`, which stops every Ray instance of the machine)."""

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

from fedem_flwr.launch.processes import TAG_VAR, free_ports, stop_trees, tagged
from fedem_flwr.simulation.record import sim_dir
from simulations.cells import HUB_DIR, run_cell

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture
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


def test_a_federated_cell_runs_on_an_existing_ray_cluster(ray_head, tmp_path):
    # Prepare
    address, folder = ray_head
    env_before = os.environ.get("RAY_ADDRESS")
    drivers_before = set(folder.glob("session_*/logs/python-core-driver-*"))
    cell = {"method": "relay", "contributors": 2, "max_tokens": 6000,  # two leases of 3 steps
            "overrides": "train.max_steps=3 data.languages=[hi,de] gate.check_others=false"}

    # Execute
    status = run_cell(cell, tmp_path / "cell", ray_address=address, timeout=240)

    # Assert: the run completed, as a driver of the head's cluster (its core-driver log is there)
    run = json.loads((tmp_path / "cell" / "run.json").read_text())
    assert run["status"] == "finished:completed", (status, (tmp_path / "cell" / "flwr.log").read_text()[-3000:])
    assert run["ray_address"] == address
    assert set(folder.glob("session_*/logs/python-core-driver-*")) - drivers_before
    assert os.environ.get("RAY_ADDRESS") == env_before  # the address does not leak into this process
    # The relay ran on the virtual clock to its token budget and left its numbers.
    assert status["status"] == "ok", status
    assert status["method"] == "relay" and status["tokens"] >= 6000 and status["sim_seconds"] > 0
    assert (sim_dir(tmp_path / "cell" / HUB_DIR) / "trace.csv").is_file()
