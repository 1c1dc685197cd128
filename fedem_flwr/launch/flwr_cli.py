"""Drive Flower's `flwr` command (run, log, ls, stop) against a SuperLink we started.

In flwr 1.42, `flwr run APP SUPERLINK` names a *SuperLink connection* from
`$FLWR_HOME/config.toml`, not an address. A `[tool.flwr.federations]` table in the app's
pyproject is migrated into that file and commented out of the pyproject (the file is
rewritten), so apps here keep no such table; instead each SuperLink gets a connection
with its explicit loopback address. An explicit address also stops `flwr` from
auto-starting its own detached local SuperLink on the fixed ports 39091/39093 (that
happens only for the magic address `:local:`; `FLWR_LOCAL_SUPERLINK_HTTP_API_PORT` /
`FLWR_LOCAL_CONTROL_API_PORT` move those ports, but `flwr` records no pid for it).
The simulation's size travels per run with `--federation-config`.
"""

from __future__ import annotations

import json
import math
import queue
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

import tomli_w

from fedem_flwr.errors import FlowerProcessError, RunFailed
from fedem_flwr.launch.processes import flower_bin, flower_env

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10; tomli comes with flwr
    import tomli as tomllib

ScalarConfig = Mapping[str, "bool | int | float | str"]
COMPLETED = "finished:completed"
CLI_TIMEOUT = 60.0


def toml_value(key: str, value: object) -> str:
    """One flat run-config value as TOML (bool, int, float or str; Flower allows no other)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string
    raise FlowerProcessError(
        f"run-config key `{key}` has value {value!r} of type {type(value).__name__}; "
        "Flower's run config holds only bool, int, finite float or str"
    )


def config_args(config: ScalarConfig) -> str:
    """`{"num-supernodes": 4, "languages": "hi,te"}` -> `num-supernodes=4 languages="hi,te"`.

    The form of `--federation-config`, `--run-config` and `--node-config`; Flower splits it
    with a regex that allows no quote inside a quoted value, so such strings are refused
    (pass them in a TOML file: `write_run_config`).
    """
    parts = []
    for key, value in config.items():
        text = toml_value(key, value)
        if isinstance(value, str) and '"' in value or "\\" in text or " " in key:
            raise FlowerProcessError(
                f"config key `{key}`: value {value!r} cannot travel as `key=value`; "
                "use no quotes or backslashes (or a TOML file for the run config)"
            )
        parts.append(f"{key}={text}")
    return " ".join(parts)


def write_run_config(flwr_home: Path, run_config: ScalarConfig) -> Path:
    """Write run-config overrides as a TOML file (any string survives, unlike `k=v` args)."""
    for key, value in run_config.items():
        toml_value(key, value)  # the same checks as on the command line
    folder = flwr_home / "run-configs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{uuid.uuid4().hex}.toml"
    path.write_text(tomli_w.dumps(dict(run_config)), encoding="utf-8")
    return path


def write_connection(flwr_home: Path, name: str, address: str, root_certificates: Path | None = None) -> None:
    """Add (or replace) a SuperLink connection in `$FLWR_HOME/config.toml`, as default.

    With `root_certificates` (the hub's CA certificate) `flwr` talks TLS and verifies the
    SuperLink; without, the connection is insecure. Everything else in the file (other
    connections, their options) is kept.
    """
    path = flwr_home / "config.toml"
    config = tomllib.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    superlink = config.setdefault("superlink", {})
    superlink[name] = ({"address": address, "root-certificates": str(Path(root_certificates).resolve())}
                       if root_certificates else {"address": address, "insecure": True})
    superlink["default"] = name
    flwr_home.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(config), encoding="utf-8")


def flwr(
    args: list[str], flwr_home: Path, *, timeout: float | None = CLI_TIMEOUT, output=subprocess.PIPE,
) -> subprocess.CompletedProcess:
    """Run `flwr ARGS` in the isolated home; output captured (PIPE), inherited (None) or to a file."""
    argv = [flower_bin("flwr"), *args]
    try:
        return subprocess.run(  # noqa: S603 (argv built here, no shell)
            argv, env=flower_env(flwr_home), stdin=subprocess.DEVNULL, timeout=timeout,
            stdout=output, stderr=output, text=True,
        )
    except subprocess.TimeoutExpired as err:
        raise FlowerProcessError(f"`flwr {' '.join(args)}` did not finish in {err.timeout:.0f} s") from err


def json_output(proc: subprocess.CompletedProcess, what: str) -> dict:
    """The JSON a `flwr ... --format json` printed; FlowerProcessError with its message when it failed."""
    out = proc.stdout or ""
    start, end = out.find("{"), out.rfind("}")
    try:
        payload = json.loads(out[start : end + 1]) if start >= 0 else None
    except json.JSONDecodeError:
        payload = None
    if not isinstance(payload, dict) or not payload.get("success", False):
        message = (payload or {}).get("error-message") or (out + (proc.stderr or ""))[-2000:]
        raise FlowerProcessError(f"`flwr {what}` failed (exit {proc.returncode}): {message}")
    return payload


def _run_args(
    app_dir: Path, flwr_home: Path, connection: str, run_config: ScalarConfig | None,
    run_config_args: list[str] | None, federation_config: ScalarConfig | str | None,
) -> list[str]:
    if run_config and run_config_args:
        raise FlowerProcessError("pass the run config as a dict or as `key=value` strings, not both")
    args = ["run", str(Path(app_dir).resolve()), connection]
    if run_config:
        args += ["--run-config", str(write_run_config(flwr_home, run_config))]
    for item in run_config_args or []:
        args += ["--run-config", item]
    if federation_config:
        fed = federation_config if isinstance(federation_config, str) else config_args(federation_config)
        args += ["--federation-config", fed]
    return args


def submit_run(
    app_dir: Path, flwr_home: Path, connection: str, *,
    run_config: ScalarConfig | None = None, run_config_args: list[str] | None = None,
    federation_config: ScalarConfig | str | None = None,
) -> int:
    """`flwr run APP CONNECTION`: start a run and return its id (does not wait for it).

    `run_config` (a dict) travels as a TOML file; `run_config_args` are passed as given
    (`key="value" other=3`). Everything the ServerApp needs must be in the run config:
    it runs in the SuperLink's directory and environment, not the caller's.
    """
    args = _run_args(app_dir, flwr_home, connection, run_config, run_config_args, federation_config)
    payload = json_output(flwr([*args, "--format", "json"], flwr_home), "run")
    return int(payload["run-id"])


def run_streaming(
    app_dir: Path, flwr_home: Path, connection: str, *,
    run_config: ScalarConfig | None = None, run_config_args: list[str] | None = None,
    federation_config: ScalarConfig | str | None = None, timeout: float | None = None,
    output: TextIO | None = None,
) -> tuple[int, bool]:
    """`flwr run APP CONNECTION --stream`, its output copied to `output` (default stdout).

    Returns (run id, finished); finished is False when `timeout` cut the stream (the run
    itself then still runs: stop it with `stop_run`). Its exit status says nothing about
    the run (0 even when the ServerApp crashed): ask `run_status`.
    """
    args = _run_args(app_dir, flwr_home, connection, run_config, run_config_args, federation_config)
    out = output if output is not None else sys.stdout
    popen = subprocess.Popen(  # noqa: S603 (argv built here, no shell)
        [flower_bin("flwr"), *args, "--stream"], env=flower_env(flwr_home),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()
    reader = threading.Thread(target=_pump, args=(popen.stdout, lines), daemon=True)
    reader.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    run_id, tail, finished = None, [], True
    try:
        while True:
            wait = 1.0 if deadline is None else deadline - time.monotonic()
            if wait <= 0:
                finished = False
                break
            try:
                line = lines.get(timeout=min(wait, 1.0))
            except queue.Empty:
                continue
            if line is None:
                break
            out.write(line)
            out.flush()
            tail = [*tail[-40:], line]
            if run_id is None and (match := _STARTED.search(line)):
                run_id = int(match.group(1))
    except KeyboardInterrupt:
        if run_id is not None:  # Ctrl-C ends the stream, not the run: stop the run too
            stop_run(flwr_home, connection, run_id)
        raise
    finally:
        if popen.poll() is None:
            popen.terminate()
        try:
            popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()
    if run_id is None:
        why = f"within {timeout:.0f} s" if not finished else f"(exit {popen.returncode})"
        raise FlowerProcessError(f"`flwr run` started no run {why}:\n{''.join(tail)}")
    return run_id, finished


_STARTED = re.compile(r"Successfully started run (\d+)")


def _pump(stream: TextIO, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def run_status(flwr_home: Path, connection: str, run_id: int) -> dict:
    """The run's row from `flwr ls --run-id ID --format json` (`status` e.g. `finished:failed`)."""
    proc = flwr(["ls", connection, "--run-id", str(run_id), "--format", "json"], flwr_home)
    runs = json_output(proc, "ls").get("runs", [])
    if not runs:
        raise FlowerProcessError(f"`flwr ls` knows no run {run_id}")
    return runs[0]


def stream_logs(
    flwr_home: Path, connection: str, run_id: int, timeout: float | None, output=None,
) -> bool:
    """Stream the run's logs until it ends (`flwr log ID --stream`); False on timeout.

    `output`: None prints them on this process's stdout, or a file / `subprocess.DEVNULL`.
    """
    try:
        flwr(["log", str(run_id), connection, "--stream"], flwr_home, timeout=timeout, output=output)
    except FlowerProcessError:
        return False
    return True


def register_supernode(flwr_home: Path, connection: str, public_key: Path, name: str = "") -> int:
    """`flwr supernode register KEY CONNECTION`: admit a contributor's key; the node id it will have.

    The id is the node's for good: it comes back after every restart of that SuperNode.
    """
    args = ["supernode", "register", str(public_key), connection, "--format", "json"]
    if name:
        args += ["--name", name]
    payload = json_output(flwr(args, flwr_home), "supernode register")
    return int(payload["node-id"])


def stop_run(flwr_home: Path, connection: str, run_id: int) -> None:
    """Ask the SuperLink to stop a run (`flwr stop ID`); a finished run is left as is."""
    flwr(["stop", str(run_id), connection, "--format", "json"], flwr_home)


def wait_for_run(
    flwr_home: Path, connection: str, run_id: int, timeout: float, *,
    poll: float = 2.0, output=subprocess.DEVNULL,
) -> dict:
    """Block until the run finishes and return its status row; RunFailed after `timeout`.

    Waits on the log stream first (one `flwr` process instead of a polling loop), then
    polls `flwr ls`, since the status can lag the end of the logs by a moment.
    """
    deadline = time.monotonic() + timeout
    stream_logs(flwr_home, connection, run_id, timeout, output)
    status = settled_status(flwr_home, connection, run_id, deadline - time.monotonic(), poll=poll)
    if not _finished(status):
        raise RunFailed(
            f"run {run_id} did not finish within {timeout:.0f} s; "
            f"last status `{status.get('status')}`"
        )
    return status


def settled_status(flwr_home: Path, connection: str, run_id: int, timeout: float, *,
                   poll: float = 1.0) -> dict:
    """The run's status row once it reads `finished:*`, else the last one read after `timeout`.

    The status can lag the end of the run's logs (and of `flwr run --stream`) by a moment.
    """
    deadline = time.monotonic() + timeout
    while True:
        status = run_status(flwr_home, connection, run_id)
        if _finished(status) or time.monotonic() >= deadline:
            return status
        time.sleep(poll)


def _finished(status: dict) -> bool:
    return str(status.get("status", "")).startswith("finished")
