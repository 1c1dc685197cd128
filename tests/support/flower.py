"""Real Flower deployments on loopback for tests: a SuperLink, SuperNodes, runs and statuses.

Every process is started here on free 127.0.0.1 ports with a temporary `FLWR_HOME` and
stopped by pid (SIGTERM, wait, SIGKILL) together with what it spawned, even when the test
fails. Runs are submitted with the real `flwr run` and followed with `flwr log` / `flwr ls`.

    profiles = [{"languages": "hi,te"}, {"languages": "ta"}]
    with local_superlink(tmp_path / "flwr") as link, \\
            supernodes(link.address, profiles, flwr_home=link.flwr_home):
        wait_for_nodes(link, 2)
        run_id = submit_run(app_dir, link, {"result-path": str(tmp_path / "out.json")})
        status = wait_for_run(link, run_id, timeout=120)
        assert status["status"] == "finished:completed", run_logs(link, run_id)
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedem_flwr.errors import FlowerProcessError
from fedem_flwr.launch import flwr_cli
from fedem_flwr.launch.processes import FlowerProcess, start_superlink, start_supernode, stop_trees

CONNECTION = "test"


@dataclass(frozen=True)
class SuperLink:
    """A running SuperLink and the `flwr` connection name that reaches it."""

    process: FlowerProcess
    connection: str = CONNECTION

    @property
    def address(self) -> str:
        """`127.0.0.1:port`: Fleet API for SuperNodes, Control API for `flwr`."""
        return self.process.address

    @property
    def flwr_home(self) -> Path:
        """The `FLWR_HOME` holding its connection (and its state under `superlink-<port>/`)."""
        return self.process.flwr_home


@contextlib.contextmanager
def local_superlink(
    flwr_home: Path, *, simulation: bool = False, isolation: str = "subprocess",
    port: int | None = None, start_timeout: float = 60.0, connection: str = CONNECTION,
) -> Iterator[SuperLink]:
    """A real `flower-superlink --insecure` on a free loopback port, stopped on exit.

    `simulation=True` makes it run apps on the simulation engine (size from each run's
    federation config); otherwise it waits for real SuperNodes (see `supernodes`).
    """
    flwr_home = Path(flwr_home).resolve()
    proc = start_superlink(flwr_home, simulation=simulation, port=port,
                           isolation=isolation, start_timeout=start_timeout)
    try:
        flwr_cli.write_connection(flwr_home, connection, proc.address)
        yield SuperLink(proc, connection)
    finally:
        proc.stop()


@contextlib.contextmanager
def supernodes(
    superlink_address: str, node_configs: Sequence[Mapping[str, bool | int | float | str]],
    *, flwr_home: Path, ports: Sequence[int | None] | None = None, isolation: str = "subprocess",
) -> Iterator[list[FlowerProcess]]:
    """Real `flower-supernode --insecure`s, one per `--node-config`, stopped together on exit.

    Each gets its own Runtime API port (`ports`, free ones by default) and keeps its files in
    `flwr_home/supernode-<port>/`. They are stopped together: each takes seconds to wind down
    its SuperExec, so stopping them one after another adds up.
    """
    ports = list(ports) if ports is not None else [None] * len(node_configs)
    started: list[FlowerProcess] = []
    try:
        for config, port in zip(node_configs, ports, strict=True):
            started.append(start_supernode(Path(flwr_home).resolve(), superlink_address,
                                           flwr_cli.config_args(config), port=port,
                                           isolation=isolation))
        yield started
    finally:
        stop_trees([(proc.pid, proc.popen) for proc in started], tags=[p.tag for p in started])


def submit_run(
    app_dir: Path, superlink: SuperLink,
    run_config: Mapping[str, bool | int | float | str] | None = None,
    federation_config: Mapping[str, bool | int | float | str] | None = None,
) -> int:
    """Start the app in `app_dir` on `superlink` with `flwr run`; its run id."""
    return flwr_cli.submit_run(app_dir, superlink.flwr_home, superlink.connection,
                               run_config=run_config, federation_config=federation_config)


def wait_for_run(superlink: SuperLink, run_id: int, timeout: float = 120.0) -> dict:
    """Block until the run finishes; its `flwr ls --format json` row (`status`, ...).

    Raises RunFailed when it has not finished within `timeout`. A finished run may still
    have failed: check `status["status"] == "finished:completed"`.
    """
    return flwr_cli.wait_for_run(superlink.flwr_home, superlink.connection, run_id, timeout)


def run_logs(superlink: SuperLink, run_id: int) -> str:
    """The run's logs so far (`flwr log ID --show`), for assertion messages."""
    proc = flwr_cli.flwr(["log", str(run_id), superlink.connection, "--show"], superlink.flwr_home)
    return (proc.stdout or "") + (proc.stderr or "")


def node_ids(superlink: SuperLink) -> list[str]:
    """Ids of the SuperNodes the SuperLink lists as online (`flwr supernode list`)."""
    proc = flwr_cli.flwr(["supernode", "list", superlink.connection, "--format", "json"],
                         superlink.flwr_home)
    try:
        payload = json.loads(proc.stdout[proc.stdout.find("{"):])
    except (ValueError, TypeError) as err:
        raise FlowerProcessError(f"`flwr supernode list` gave no JSON: {proc.stdout!r}") from err
    return [str(node["node-id"]) for node in payload.get("nodes", [])
            if str(node.get("status", "online")).lower() == "online"]


def wait_for_nodes(superlink: SuperLink, count: int, timeout: float = 60.0) -> list[str]:
    """Block until at least `count` SuperNodes are online; their ids."""
    deadline = time.monotonic() + timeout
    while True:
        ids = node_ids(superlink)
        if len(ids) >= count:
            return ids
        if time.monotonic() >= deadline:
            raise FlowerProcessError(f"{len(ids)} of {count} SuperNodes online after {timeout:.0f} s")
        time.sleep(1.0)
