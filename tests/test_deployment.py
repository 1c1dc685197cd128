"""A real deployment on loopback: one SuperLink, two SuperNodes with their own node configs.

The echo app's ServerApp asks every node for its profile; the test checks it saw exactly
the two `--node-config`s, and that a crashing ServerApp is reported as failed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedem_flwr.launch import processes
from tests.support.flower import (
    local_superlink,
    run_logs,
    submit_run,
    supernodes,
    wait_for_nodes,
    wait_for_run,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ECHO_APP = Path(__file__).parent / "fixtures" / "echo_app"
PROFILES = [{"languages": "hi,te", "device": "cpu"}, {"languages": "ta", "data-size": 3}]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """A SuperLink and two SuperNodes, shared by this module's tests (each start costs seconds)."""
    home = tmp_path_factory.mktemp("flwr")
    with local_superlink(home) as link, supernodes(link.address, PROFILES, flwr_home=home) as nodes:
        node_ids = wait_for_nodes(link, 2, timeout=90)
        yield link, nodes, node_ids
    assert not any(processes.pid_alive(proc.pid) for proc in [link.process, *nodes])


def test_echo_serverapp_sees_both_supernode_profiles(deployment, tmp_path):
    # Prepare
    link, nodes, node_ids = deployment
    result = tmp_path / "result.json"

    # Execute
    run_id = submit_run(ECHO_APP, link, {"result-path": str(result), "expected-nodes": 2})
    status = wait_for_run(link, run_id, timeout=180)

    # Assert
    assert status["status"] == "finished:completed", run_logs(link, run_id)
    echoed = json.loads(result.read_text())
    assert echoed["run-id"] == str(run_id)
    assert sorted(echoed["node-ids"]) == sorted(node_ids)
    profiles = sorted(echoed["profiles"].values(), key=lambda p: p["languages"])
    assert profiles == PROFILES
    assert nodes[0].port != nodes[1].port


def test_failing_serverapp_is_reported_as_failed(deployment, tmp_path):
    # Prepare
    link, _, _ = deployment

    # Execute
    run_id = submit_run(ECHO_APP, link, {"result-path": str(tmp_path / "never.json"), "fail": True})
    status = wait_for_run(link, run_id, timeout=180)

    # Assert
    assert status["status"] == "finished:failed", run_logs(link, run_id)
    assert "`fail` is set" in status["status-details"]
    assert not (tmp_path / "never.json").exists()
