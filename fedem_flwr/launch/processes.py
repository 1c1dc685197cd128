"""Start Flower's server processes on loopback and stop exactly what was started.

Flower's own `flwr run` starts a detached local SuperLink on fixed ports, records no pid
and reuses it silently, with the working directory and environment of its first start.
Here every SuperLink and SuperNode is started by us, on free ports, with an isolated
`FLWR_HOME`, and stopped by pid together with the processes it spawned (SuperExec,
the ServerApp/ClientApp processes, Ray). Nothing else is ever signalled.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from fedem_flwr.deploy.credentials import ServerCredentials
from fedem_flwr.errors import FlowerProcessError
from fedem_flwr.pids import pid_alive, process_alive

LOOPBACK = "127.0.0.1"
TAG_VAR = "FEDEM_FLOWER_TAG"


def flower_bin(name: str) -> str:
    """Path of a Flower executable installed beside this interpreter (or on PATH)."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else name


def flower_env(flwr_home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for every Flower process: isolated home, nothing installed, no telemetry.

    The SuperLink and SuperNode start their helpers (`flower-superexec`, `flwr-serverapp`,
    `flwr-simulation`, `flwr-clientapp`) by name, so this interpreter's bin folder goes
    first on PATH: the launcher works from a venv that is not activated.
    """
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        PYTHONUNBUFFERED="1",  # logs reach their pipe or file as they happen
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    )
    env.update(extra or {})
    return env


def free_ports(count: int = 1) -> list[int]:
    """`count` distinct free TCP ports on loopback (all held open until all are chosen)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind((LOOPBACK, 0))
        return [sock.getsockname()[1] for sock in socks]


def http_ok(url: str, timeout: float = 0.5, ca_cert: Path | None = None) -> bool:
    """True when `url` answers 2xx (an https `url` verified against `ca_cert`)."""
    context = ssl.create_default_context(cafile=str(ca_cert)) if ca_cert else None
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:  # noqa: S310 (loopback)
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError):
        return False


def cmdline(pid: int) -> list[str]:
    """The command line of `pid` ([] when it is gone or unreadable)."""
    try:
        return psutil.Process(pid).cmdline()
    except psutil.Error:
        return []


def descendants(pid: int) -> list[int]:
    """All descendants of `pid`, parents before children."""
    return [child.pid for child in _children(pid)]


def tagged(tags: list[str]) -> list[int]:
    """Live processes whose environment carries one of our spawn tags (see `spawn`).

    Descendants inherit the tag, so this finds what a process tree left behind after its
    parent died (e.g. Ray workers of a stopped simulation, re-parented to init).
    """
    return [proc.pid for proc in _tagged(tags)]


def stop_tree(pid: int, timeout: float = 10.0, popen: subprocess.Popen | None = None,
              tag: str | None = None) -> None:
    """Stop `pid` and everything it spawned: SIGTERM, wait, then SIGKILL what is left."""
    stop_trees([(pid, popen)], timeout, [tag] if tag else [])


def stop_trees(
    roots: list[tuple[int, subprocess.Popen | None]], timeout: float = 10.0,
    tags: list[str] | None = None,
) -> None:
    """Stop several process trees at once (a SuperNode takes seconds to wind down).

    A SuperLink or SuperNode stops its own SuperExec on SIGTERM, but the processes of a
    run can outlive their parent (a stopped simulation's Ray workers), so everything
    below the roots, or carrying one of `tags`, gets its own SIGTERM and later SIGKILL.
    """
    tags = tags or []
    popens = [popen for _, popen in roots if popen is not None]
    tops = [proc for pid, _ in roots if (proc := _process(pid)) is not None]

    def family() -> set[psutil.Process]:
        # Found before the roots go: once a root has died, its children belong to init.
        below = {child for top in tops for child in _children(top.pid)} | set(_tagged(tags))
        return below - set(tops)

    known = family()
    _signal(tops, signal.SIGTERM)
    _wait_gone(tops, timeout, popens)
    stragglers = known | family()
    _signal(stragglers, signal.SIGTERM)
    _wait_gone(stragglers, timeout / 2, popens)
    left = _wait_gone([*tops, *stragglers, *family()], 0.0, popens)
    _signal(left, signal.SIGKILL)
    _wait_gone(left, 5.0, popens)


def kill_tree(pid: int, popen: subprocess.Popen | None = None) -> None:
    """SIGKILL `pid` and everything below it at once, as a machine losing power would (fault tests)."""
    root = _process(pid)
    family = [root, *_children(pid)] if root is not None else []
    _signal(family, signal.SIGKILL)
    if popen is not None:
        popen.wait(timeout=10)


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _tagged(tags: list[str]) -> list[psutil.Process]:
    if not tags:
        return []
    found = []
    # An environment we may not read (another user's process, a zombie) is None here.
    for proc in psutil.process_iter(["environ"]):
        environ = proc.info["environ"] or {}
        if environ.get(TAG_VAR) in tags and proc.pid != os.getpid() and process_alive(proc):
            found.append(proc)
    return found


def _signal(procs: Iterable[psutil.Process], sig: signal.Signals) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):  # gone, or its pid taken by another process
            proc.send_signal(sig)


def _wait_gone(procs: Iterable[psutil.Process], timeout: float,
               popens: list[subprocess.Popen]) -> list[psutil.Process]:
    """Wait up to `timeout` s for `procs` to end; return those still running.

    psutil reaps our own children as they end, and their exit status goes to their Popen. A
    zombie that is not ours has ended too (psutil would wait on it until its parent reaps it).
    """
    ours = {popen.pid: popen for popen in popens}

    def reaped(proc: psutil.Process) -> None:
        popen = ours.get(proc.pid)
        if popen is not None and popen.returncode is None and proc.returncode is not None:
            popen.returncode = proc.returncode

    deadline = time.monotonic() + timeout
    alive = list(procs)
    while True:
        _, alive = psutil.wait_procs(alive, timeout=min(0.2, max(0.0, deadline - time.monotonic())),
                                     callback=reaped)
        alive = [proc for proc in alive if process_alive(proc)]
        if not alive or time.monotonic() >= deadline:
            return alive


@dataclass
class FlowerProcess:
    """A SuperLink or SuperNode that we started: its pid, ports, log and home."""

    kind: str
    pid: int
    port: int
    flwr_home: Path
    log_path: Path
    tag: str = ""
    popen: subprocess.Popen | None = field(default=None, repr=False, compare=False)

    @property
    def address(self) -> str:
        """`host:port` of its HTTP API (the Fleet/Control/Runtime APIs for a SuperLink)."""
        return f"{LOOPBACK}:{self.port}"

    def alive(self) -> bool:
        """True while the process runs."""
        if self.popen is not None and self.popen.poll() is not None:
            return False
        return pid_alive(self.pid)

    def log_tail(self, chars: int = 3000) -> str:
        """The end of its output, for error messages."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """Stop it and everything it spawned (idempotent)."""
        stop_tree(self.pid, timeout, self.popen, self.tag or None)


def spawn(
    kind: str, argv: list[str], flwr_home: Path, port: int, cwd: Path, env: dict[str, str] | None = None,
) -> FlowerProcess:
    """Start `argv` detached in its own session, its output appended to a log in `cwd`.

    `env` adds to the environment of every Flower process (`flower_env`).

    Its environment carries a fresh random tag (`FEDEM_FLOWER_TAG`) that every process
    it spawns inherits: stopping it finds and ends exactly those, and nothing else.
    """
    cwd.mkdir(parents=True, exist_ok=True)
    log_path = cwd / f"{kind}.out"
    tag = uuid.uuid4().hex
    with log_path.open("ab") as log:
        popen = subprocess.Popen(  # noqa: S603 (argv built here, no shell)
            argv, cwd=cwd, env=flower_env(flwr_home, {**(env or {}), TAG_VAR: tag}),
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    return FlowerProcess(kind, popen.pid, port, flwr_home, log_path, tag, popen)


def start_superlink(
    flwr_home: Path, *, simulation: bool, port: int | None = None,
    isolation: str = "subprocess", start_timeout: float = 30.0,
    tls: ServerCredentials | None = None, supernode_auth: bool = False,
) -> FlowerProcess:
    """Start `flower-superlink` on loopback and wait until it answers.

    Without `tls` it runs `--insecure`; with it, HTTPS on its one port, and `supernode_auth`
    then admits only SuperNodes whose public key was registered (`register_supernode`).
    Its state database and logs live in `flwr_home/superlink-<port>/`, which is also its
    working directory: the ServerApp runs there, never in the caller's directory. Started
    again with the same `port`, it reopens that database (nodes, registered keys, runs).
    """
    if supernode_auth and tls is None:
        raise FlowerProcessError("SuperNode authentication needs TLS: pass `tls` credentials")
    port = port or free_ports(1)[0]
    workdir = flwr_home / f"superlink-{port}"
    argv = [
        flower_bin("flower-superlink"), *(tls.superlink_args() if tls else ["--insecure"]),
        "--isolation", isolation, "--host", LOOPBACK, "--port", str(port),
        "--database", str(workdir / "state.db"),
        "--log-file", str(workdir / "superlink.log"),
    ]
    if supernode_auth:
        argv.append("--enable-supernode-auth")
    if simulation:
        argv.append("--simulation")
    proc = spawn("superlink", argv, flwr_home, port, workdir)
    scheme = "https" if tls else "http"
    _wait_ready(proc, f"{scheme}://{proc.address}/health", start_timeout, tls.ca_cert if tls else None)
    return proc


def start_supernode(
    flwr_home: Path, superlink_address: str, node_config: str, *, port: int | None = None,
    isolation: str = "subprocess", root_certificates: Path | None = None,
    private_key: Path | None = None, home: Path | None = None,
) -> FlowerProcess:
    """Start `flower-supernode` against a SuperLink's Fleet API.

    `root_certificates` (the hub's CA certificate) makes it connect over TLS, else it runs
    `--insecure`; `private_key` is its OpenSSH key for SuperNode authentication. `port` is the
    SuperNode's own Runtime API port (its ClientApp connects there), so each SuperNode on one
    host needs a different one. Each gets its own `FLWR_HOME` (`home`, by default
    `flwr_home/supernode-<port>`, also its working directory): SuperNodes install every app
    they run there. Returns once the process runs; it registers a moment later.
    """
    if private_key is not None and root_certificates is None:
        raise FlowerProcessError("an authenticated SuperNode needs TLS: pass `root_certificates`")
    port = port or free_ports(1)[0]
    home = home or flwr_home / f"supernode-{port}"
    security = ["--root-certificates", str(root_certificates)] if root_certificates else ["--insecure"]
    if private_key is not None:
        security += ["--auth-supernode-private-key", str(private_key)]
    argv = [
        flower_bin("flower-supernode"), *security, "--superlink", superlink_address,
        "--isolation", isolation, "--host", LOOPBACK, "--port", str(port),
    ]
    if node_config:
        argv += ["--node-config", node_config]
    proc = spawn("supernode", argv, home, port, home)
    _wait_ready(proc, None, 0.5)
    return proc


def _wait_ready(proc: FlowerProcess, health_url: str | None, timeout: float, ca_cert: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if not proc.alive():
            raise FlowerProcessError(
                f"`{proc.kind}` exited at start (port {proc.port}); its output:\n{proc.log_tail()}"
            )
        if health_url is not None and http_ok(health_url, ca_cert=ca_cert):
            return
        if time.monotonic() >= deadline:
            if health_url is None:
                return
            proc.stop()
            raise FlowerProcessError(
                f"`{proc.kind}` did not answer {health_url} within {timeout:.0f} s; "
                f"its output:\n{proc.log_tail()}"
            )
        time.sleep(0.1)
