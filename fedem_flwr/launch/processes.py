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
from dataclasses import dataclass, field
from pathlib import Path

from fedem_flwr.deploy.credentials import ServerCredentials
from fedem_flwr.errors import FlowerProcessError
from fedem_flwr.pids import pid_alive

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
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def descendants(pid: int) -> list[int]:
    """All live descendants of `pid`, parents before children (read from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], list(children.get(pid, []))
    while queue:
        child = queue.pop(0)
        found.append(child)
        queue.extend(children.get(child, []))
    return found


def tagged(tags: list[str]) -> list[int]:
    """Live processes whose environment carries one of our spawn tags (see `spawn`).

    Descendants inherit the tag, so this finds what a process tree left behind after its
    parent died (e.g. Ray workers of a stopped simulation, re-parented to init).
    """
    if not tags:
        return []
    marks = {f"{TAG_VAR}={tag}".encode() for tag in tags}
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marks & set(environ.read_bytes().split(b"\0")):
                found.append(int(environ.parent.name))
        except (OSError, ValueError):
            continue
    return [pid for pid in found if pid != os.getpid() and pid_alive(pid)]


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
    pids = [pid for pid, _ in roots]
    popens = [popen for _, popen in roots if popen is not None]

    def family() -> list[int]:
        below = {p for pid in pids for p in descendants(pid)} | set(tagged(tags))
        return sorted(below - set(pids))

    known = family()
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    _wait_gone(pids, timeout, popens)
    stragglers = sorted(set(known + family()))
    for child in stragglers:
        _signal(child, signal.SIGTERM)
    _wait_gone(stragglers, timeout / 2, popens)
    left = [p for p in {*pids, *stragglers, *family()} if pid_alive(p)]
    for pid in left:
        _signal(pid, signal.SIGKILL)
    _wait_gone(left, 5.0, popens)


def kill_tree(pid: int, popen: subprocess.Popen | None = None) -> None:
    """SIGKILL `pid` and everything below it at once, as a machine losing power would (fault tests)."""
    for target in [pid, *descendants(pid)]:
        _signal(target, signal.SIGKILL)
    if popen is not None:
        popen.wait(timeout=10)


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _wait_gone(pids: list[int], timeout: float, popens: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for popen in popens:
            popen.poll()  # reap our own children so they do not linger as zombies
        if not any(pid_alive(p) for p in pids):
            return
        time.sleep(0.05)


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
