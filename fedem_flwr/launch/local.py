"""Run a Flower app on a local simulation SuperLink that we start, watch and stop.

What `flwr run .` on the local simulation federation does, made safe for scripts:
the SuperLink runs on a free loopback port with an isolated `FLWR_HOME` (default
`<app>/.flwr`, which Flower leaves out of the app bundle), installs nothing, sends no
telemetry, and is stopped by pid when the run ends. The run's final status comes from
`flwr ls`, because `flwr run --stream` exits 0 even when the ServerApp crashed.
A SuperLink kept with `keep_superlink` is recorded in `$FLWR_HOME/superlink.json`;
the next launch with the same home reuses it, and `stop_superlink` (`fedem superlink stop`)
ends it, as well as one that a plain `flwr run` auto-started with that `FLWR_HOME`.

The ServerApp (and, in simulation, every ClientApp) runs in the SuperLink's working
directory (`$FLWR_HOME/superlink-<port>/`) with the environment the SuperLink was started
with: this process's for a new SuperLink (so CUDA_VISIBLE_DEVICES and the like still
apply), that of its first start for a reused one. Pass what the app needs through the
run config, never through the caller's directory or a variable set after the start.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from fedem_flwr.errors import FlowerProcessError
from fedem_flwr.launch import flwr_cli
from fedem_flwr.launch.processes import (
    FlowerProcess,
    cmdline,
    pid_alive,
    start_superlink,
    stop_trees,
)

CONNECTION = "fedem-local"
PIDFILE = "superlink.json"
DEFAULT_FEDERATION_CONFIG = "num-supernodes=4 client-resources-num-cpus=1"


def default_flwr_home(app_dir: Path) -> Path:
    """`<app_dir>/.flwr`: next to the app, out of its bundle, out of the user's home."""
    return Path(app_dir).resolve() / ".flwr"


@dataclass
class RunOutcome:
    """How a launched run ended."""

    run_id: int | None
    status: dict = field(default_factory=dict)
    superlink_pid: int | None = None
    superlink_kept: bool = False
    seconds: float = 0.0
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        """True only for `finished:completed`."""
        return not self.timed_out and self.status.get("status") == flwr_cli.COMPLETED

    def summary(self) -> str:
        """One line for the terminal."""
        state = "timed out" if self.timed_out else self.status.get("status", "unknown")
        details = self.status.get("status-details")
        tail = f" ({details})" if details and details != "N/A" else ""
        return f"Run {self.run_id}: {state}{tail} after {self.seconds:.1f} s"


def running_superlink(flwr_home: Path) -> FlowerProcess | None:
    """The SuperLink an earlier launch kept in this home, if it still runs."""
    flwr_home = Path(flwr_home).resolve()
    try:
        record = json.loads((flwr_home / PIDFILE).read_text(encoding="utf-8"))
        pid, port = int(record["pid"]), int(record["port"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    argv = cmdline(pid)
    # The pid must still be *our* SuperLink: a recycled pid is left alone.
    ours = (
        pid_alive(pid)
        and any(Path(arg).name == "flower-superlink" for arg in argv)
        and str(port) in argv
        and any(arg.startswith(f"{flwr_home}{os.sep}") for arg in argv)
    )
    if not ours:
        return None
    return FlowerProcess("superlink", pid, port, flwr_home, Path(record.get("log", "")),
                         str(record.get("tag", "")))


def flower_local_superlinks(flwr_home: Path) -> list[int]:
    """Pids of SuperLinks that Flower's own `flwr run` auto-started with this FLWR_HOME.

    Flower starts them detached, records no pid, and names its log file
    `$FLWR_HOME/local-superlink/superlink.log` on the command line: that path identifies them.
    """
    log_file = str(Path(flwr_home).resolve() / "local-superlink" / "superlink.log")
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        argv = proc.info["cmdline"] or []  # None: gone, a zombie, or not ours to read
        if log_file in argv and any(Path(arg).name == "flower-superlink" for arg in argv):
            found.append(proc.pid)
    return found


def stop_superlink(flwr_home: Path, timeout: float = 10.0) -> list[int]:
    """Stop the SuperLinks of this home (kept by a launch, or left by a plain `flwr run`).

    Returns the pids stopped; each is stopped with everything it spawned.
    """
    flwr_home = Path(flwr_home).resolve()
    proc = running_superlink(flwr_home)
    (flwr_home / PIDFILE).unlink(missing_ok=True)
    pids = ([proc.pid] if proc else []) + flower_local_superlinks(flwr_home)
    stop_trees([(pid, None) for pid in pids], timeout, [proc.tag] if proc and proc.tag else [])
    return pids


def _record(proc: FlowerProcess) -> None:
    record = {"pid": proc.pid, "port": proc.port, "address": proc.address, "tag": proc.tag,
              "connection": CONNECTION, "log": str(proc.log_path),
              "started-at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (proc.flwr_home / PIDFILE).write_text(json.dumps(record, indent=2), encoding="utf-8")


def ensure_superlink(flwr_home: Path, start_timeout: float = 60.0) -> tuple[FlowerProcess, bool]:
    """A simulation SuperLink for this home: the kept one if alive, else a new one."""
    flwr_home = Path(flwr_home).resolve()
    proc = running_superlink(flwr_home)
    reused = proc is not None
    if proc is None:
        proc = start_superlink(flwr_home, simulation=True, start_timeout=start_timeout)
        _record(proc)
    flwr_cli.write_connection(flwr_home, CONNECTION, proc.address)
    return proc, reused


def run_app(
    app_dir: Path, *, flwr_home: Path | None = None,
    federation_config: str = DEFAULT_FEDERATION_CONFIG,
    run_config_args: Sequence[str] = (), run_config: dict | None = None,
    keep_superlink: bool = False, timeout: float | None = None,
    log_output=None, echo: Callable[[str], None] = print,
) -> RunOutcome:
    """Run `app_dir` on a local simulation SuperLink and report how the run ended.

    `flwr run --stream` output goes to `log_output` (a text stream; None: stdout).
    Never raises for a failed run: check `RunOutcome.ok`. Interrupting (Ctrl-C) stops
    the run, then the SuperLink (unless kept).
    """
    app_dir = Path(app_dir).resolve()
    if not (app_dir / "pyproject.toml").is_file():
        raise FlowerProcessError(f"`{app_dir}` holds no pyproject.toml: not a Flower app")
    flwr_home = Path(flwr_home).resolve() if flwr_home else default_flwr_home(app_dir)
    started = time.monotonic()
    proc, reused = ensure_superlink(flwr_home)
    outcome = RunOutcome(None, superlink_pid=proc.pid)
    if reused:
        echo(f"Reusing the SuperLink kept at {proc.address} (pid {proc.pid}); it keeps the "
             "environment of its first start.")
    try:
        echo(f"Running {app_dir.name} on {proc.address} (FLWR_HOME={flwr_home})")
        outcome.run_id, finished = flwr_cli.run_streaming(
            app_dir, flwr_home, CONNECTION, run_config=run_config,
            run_config_args=list(run_config_args), federation_config=federation_config,
            timeout=timeout, output=log_output)
        if not finished:
            outcome.timed_out = True
            flwr_cli.stop_run(flwr_home, CONNECTION, outcome.run_id)
        outcome.status = flwr_cli.settled_status(flwr_home, CONNECTION, outcome.run_id, timeout=20.0)
    finally:
        outcome.seconds = time.monotonic() - started
        if keep_superlink:
            outcome.superlink_kept = True
        else:
            stop_superlink(flwr_home)
            if proc.alive():  # started here but not recorded (e.g. pidfile removed)
                proc.stop()
    return outcome
