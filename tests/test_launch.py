"""The launcher: a real local simulation run of the echo app, its status, and cleanup.

Slow tests run `fedem run` / `fedem superlink` as a user would, in a separate process with
its own working directory and HOME, and check what it left behind: the result file, the
exit status, no Flower process still running, nothing written to the user's home.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from fedem_flwr.errors import FlowerProcessError
from fedem_flwr.launch import flwr_cli, processes
from fedem_flwr.launch.local import (
    PIDFILE,
    ensure_superlink,
    flower_local_superlinks,
    run_app,
    running_superlink,
    stop_superlink,
)

try:
    import tomllib
except ModuleNotFoundError:
    import tomli as tomllib

ECHO_APP = Path(__file__).parent / "fixtures" / "echo_app"
SIMULATION = "num-supernodes=2 client-resources-num-cpus=1"


def flower_processes(flwr_home: Path) -> list[int]:
    """Pids of live processes whose environment names this FLWR_HOME."""
    return [proc.pid for proc in psutil.process_iter(["environ"])
            if (proc.info["environ"] or {}).get("FLWR_HOME") == str(flwr_home) and processes.pid_alive(proc.pid)]


def fedem(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """`fedem ARGS` (the console script beside this interpreter) from an unrelated directory with a fresh HOME."""
    caller = tmp_path / "caller"
    caller.mkdir(exist_ok=True)
    env = {**os.environ, "HOME": str(tmp_path / "user-home")}
    env.pop("FLWR_HOME", None)
    env.pop("FEDEM_HUB", None)
    return subprocess.run(
        [str(Path(sys.executable).parent / "fedem"), *args], cwd=caller, env=env,
        capture_output=True, text=True, timeout=240,
    )


def status_line(stdout: str) -> dict:
    """The launcher's final JSON line."""
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


# ---- fast: the pieces, without Flower -------------------------------------------------------


def test_config_args_renders_flower_key_value_form():
    # Execute
    text = flwr_cli.config_args({"num-supernodes": 2, "languages": "hi,te", "gpu": False, "x": 0.5})

    # Assert
    assert text == 'num-supernodes=2 languages="hi,te" gpu=false x=0.5'


@pytest.mark.parametrize("value", ['say "hi"', "C:\\data", float("nan"), None, [1]])
def test_config_args_refuses_values_flower_cannot_parse(value):
    with pytest.raises(FlowerProcessError, match="`k`"):
        flwr_cli.config_args({"k": value})


def test_run_config_file_round_trips_any_string(tmp_path):
    # Prepare
    config = {"hub": "/srv/hub with space", "overrides": 'relay.ttl=60 model.name="x"', "n": 3,
              "fail": True, "languages": "हिन्दी,తెలుగు"}

    # Execute
    path = flwr_cli.write_run_config(tmp_path, config)

    # Assert
    assert tomllib.loads(path.read_text(encoding="utf-8")) == config


def test_write_connection_keeps_other_connections_and_sets_default(tmp_path):
    # Prepare: a user's file with a connection carrying nested options
    (tmp_path / "config.toml").write_text(
        '[superlink]\ndefault = "mine"\n[superlink.mine]\naddress = ":local:"\n'
        '[superlink.mine.options]\nnum-supernodes = 7\n', encoding="utf-8")

    # Execute
    flwr_cli.write_connection(tmp_path, "first", "127.0.0.1:1111")
    flwr_cli.write_connection(tmp_path, "second", "127.0.0.1:2222")

    # Assert
    config = tomllib.loads((tmp_path / "config.toml").read_text(encoding="utf-8"))
    assert config == {"superlink": {
        "default": "second",
        "mine": {"address": ":local:", "options": {"num-supernodes": 7}},
        "first": {"address": "127.0.0.1:1111", "insecure": True},
        "second": {"address": "127.0.0.1:2222", "insecure": True},
    }}


def test_stop_superlink_never_signals_a_pid_that_is_not_our_superlink(tmp_path):
    # Prepare: a pidfile naming this very test process (as after a pid was recycled)
    (tmp_path / PIDFILE).write_text(json.dumps({"pid": os.getpid(), "port": 1}))

    # Execute
    stopped = stop_superlink(tmp_path)

    # Assert: we are alive to check, and the stale record is gone
    assert stopped == []
    assert not (tmp_path / PIDFILE).exists()


def test_stop_ends_a_process_its_children_and_its_orphans(tmp_path):
    # Prepare: a shell with a child, and a grandchild whose parent already exited (an
    # orphan, as a stopped simulation leaves Ray workers): only the spawn tag finds it
    proc = processes.spawn(
        "sleeper", ["bash", "-c", "(sleep 60 &); sleep 60 & wait"], tmp_path, 0, tmp_path)
    family = []
    for _ in range(100):
        family = processes.tagged([proc.tag])
        if len(family) == 3:
            break
        time.sleep(0.05)
    assert len(family) == 3
    assert len(processes.descendants(proc.pid)) == 1

    # Execute
    proc.stop(timeout=2.0)

    # Assert: all gone, and the root's exit status kept by its Popen
    assert processes.tagged([proc.tag]) == []
    assert not any(processes.pid_alive(pid) for pid in family)
    assert proc.popen.returncode == -signal.SIGTERM


def test_kill_tree_kills_a_process_and_its_children_at_once(tmp_path):
    # Prepare: a shell and its child
    proc = processes.spawn("sleeper", ["bash", "-c", "sleep 60 & wait"], tmp_path, 0, tmp_path)
    children = []
    deadline = time.monotonic() + 10
    while len(children) != 1:
        assert time.monotonic() < deadline, "the shell never started its child"
        time.sleep(0.01)
        children = processes.descendants(proc.pid)

    # Execute
    processes.kill_tree(proc.pid, proc.popen)

    # Assert: SIGKILL, with no chance to clean up
    assert proc.popen.returncode == -signal.SIGKILL
    while processes.pid_alive(children[0]):
        assert time.monotonic() < deadline + 10, "the child outlived kill_tree"
        time.sleep(0.01)


def test_settled_status_polls_until_finished_and_gives_up_after_timeout(monkeypatch):
    # Prepare: `flwr ls` reads `running` twice before the run is finished
    rows = iter([{"status": "running"}, {"status": "running"}, {"status": "finished:completed"}])
    monkeypatch.setattr(flwr_cli, "run_status", lambda *args: next(rows))

    # Execute
    settled = flwr_cli.settled_status(Path("home"), "test", 1, timeout=5.0, poll=0.0)
    monkeypatch.setattr(flwr_cli, "run_status", lambda *args: {"status": "running"})
    last = flwr_cli.settled_status(Path("home"), "test", 1, timeout=0.0)

    # Assert
    assert settled == {"status": "finished:completed"}
    assert last == {"status": "running"}


def test_run_app_refuses_a_folder_without_pyproject(tmp_path):
    with pytest.raises(FlowerProcessError, match="pyproject.toml"):
        run_app(tmp_path)


# ---- slow: real runs ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_launcher_runs_echo_app_in_simulation_and_cleans_up(tmp_path):
    # Prepare
    home = tmp_path / "flwr"
    result = tmp_path / "result.json"
    run_config = f'result-path="{result}" expected-nodes=2'

    # Execute
    proc = fedem(tmp_path, "run", str(ECHO_APP), "--flwr-home", str(home),
                 "--federation-config", SIMULATION, "--run-config", run_config)

    # Assert: exit status and reported status
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert status_line(proc.stdout)["status"] == "finished:completed"
    # Assert: both virtual SuperNodes answered from their own node_config
    echoed = json.loads(result.read_text())
    assert sorted(p["partition-id"] for p in echoed["profiles"].values()) == [0, 1]
    assert {p["num-partitions"] for p in echoed["profiles"].values()} == {2}
    assert echoed["errors"] == [] and echoed["unanswered"] == []
    # Assert: the ServerApp ran in the SuperLink's folder, not the caller's
    assert Path(echoed["cwd"]).parent == home.resolve()
    # Assert: nothing left running, nothing written to the user's home
    assert flower_processes(home.resolve()) == []
    assert not (home / PIDFILE).exists()
    assert not (tmp_path / "user-home" / ".flwr").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_launcher_exits_non_zero_when_serverapp_fails_and_stops_kept_superlink(tmp_path):
    # Prepare
    home = tmp_path / "flwr"
    run_config = f'result-path="{tmp_path / "never.json"}" fail=true'

    # Execute
    proc = fedem(tmp_path, "run", str(ECHO_APP), "--flwr-home", str(home),
                 "--federation-config", SIMULATION, "--run-config", run_config, "--keep-superlink")

    # Assert: Flower's own `flwr run --stream` exits 0 here; the launcher must not
    assert proc.returncode == 1, proc.stdout + proc.stderr
    status = status_line(proc.stdout)
    assert status["status"] == "finished:failed"
    assert "`fail` is set" in status["status-details"]
    assert not (tmp_path / "never.json").exists()
    # Assert: the kept SuperLink is found again (and would be reused), then stopped by pid
    kept = running_superlink(home)
    assert kept is not None and f"pid {kept.pid}" in proc.stdout
    listed = fedem(tmp_path, "superlink", "status", "--flwr-home", str(home), "--json")
    assert json.loads(listed.stdout) == {"pid": kept.pid, "address": kept.address}
    again, reused = ensure_superlink(home)
    assert reused and again.pid == kept.pid
    stopped = fedem(tmp_path, "superlink", "stop", "--flwr-home", str(home))
    assert stopped.returncode == 0 and f"pid {kept.pid}" in stopped.stdout
    assert flower_processes(home.resolve()) == []


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_launcher_stops_a_run_that_exceeds_its_timeout(tmp_path):
    # Prepare: the ServerApp waits up to 120 s for a third node that never comes
    home = tmp_path / "flwr"
    run_config = f'result-path="{tmp_path / "late.json"}" expected-nodes=3 timeout=120.0'

    # Execute
    proc = fedem(tmp_path, "run", str(ECHO_APP), "--flwr-home", str(home), "--timeout", "40",
                 "--federation-config", SIMULATION, "--run-config", run_config)

    # Assert
    assert proc.returncode == 1, proc.stdout + proc.stderr
    status = status_line(proc.stdout)
    assert status["timed-out"] is True
    assert status["status"] == "finished:stopped"
    assert flower_processes(home.resolve()) == []


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_stop_ends_the_superlink_a_plain_flwr_command_left_running(tmp_path):
    # Prepare: Flower's default connection (`:local:`) auto-starts a detached SuperLink
    home = (tmp_path / "flwr").resolve()
    http_port, control_port = processes.free_ports(2)
    env = processes.flower_env(home, {"FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
                                      "FLWR_LOCAL_CONTROL_API_PORT": str(control_port)})
    listed = subprocess.run([processes.flower_bin("flwr"), "ls", "--format", "json"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert '"success": true' in listed.stdout, listed.stdout + listed.stderr
    left = flower_local_superlinks(home)
    assert len(left) == 1 and processes.http_ok(f"http://127.0.0.1:{http_port}/health")

    # Execute
    stopped = fedem(tmp_path, "superlink", "stop", "--flwr-home", str(home))

    # Assert
    assert stopped.returncode == 0 and f"pid {left[0]}" in stopped.stdout
    assert flower_processes(home) == []
