"""Where the hub's state lives, and the one lock that makes its writer exclusive.

The hub folder is chosen by an explicit path (``fedem --hub DIR``, or the run config key ``hub``),
else ``$FEDEM_HUB``, else the per-user default ``$XDG_DATA_HOME/fedem/hub`` (``~/.local/share/fedem/hub``
when ``XDG_DATA_HOME`` is unset). Under ``flwr run`` the ServerApp runs with the SuperLink's working
directory and environment, not the caller's, so a path from the run config must be absolute.

Layout::

    <hub>/registry.sqlite   the registry (WAL mode; readers never block the writer)
    <hub>/store/            the artifact store, laid out like Hugging Face repos
    <hub>/hf-cache/         downloads of a Hugging Face Hub store (``hub.store = "hf"``, ``fedem publish``)
    <hub>/secret            the key of contributor pseudonyms, created once with mode 0600
    <hub>/cpt/              continuous pretraining's private state (optimizer moments, step, data
                            cursor, RNG); never published
    <hub>/optimizer/        each accepted adapter version's optimizer state (``train.carry``),
                            ``<adapter>/v<n>.safetensors``; private, never published
    <hub>/writer.lock       flock'd by the one writer; holds its pid, host and start time
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

from fedem_flwr.errors import ConfigError, HubError, HubLocked, HubNotFound
from fedem_flwr.pids import pid_alive

HUB_ENV = "FEDEM_HUB"
REGISTRY_FILE = "registry.sqlite"
STORE_DIR = "store"
HF_CACHE_DIR = "hf-cache"
SECRET_FILE = "secret"
CPT_DIR = "cpt"
OPTIMIZER_DIR = "optimizer"
LOCK_FILE = "writer.lock"


def default_hub_path(env: Mapping[str, str] = os.environ) -> Path:
    """The per-user default: ``$XDG_DATA_HOME/fedem/hub``, else ``~/.local/share/fedem/hub``."""
    data_home = env.get("XDG_DATA_HOME")
    if data_home and os.path.isabs(data_home):  # the XDG spec says to ignore a relative value
        return Path(data_home) / "fedem" / "hub"
    home = env.get("HOME")
    base = Path(home) if home else Path.home()
    return base / ".local" / "share" / "fedem" / "hub"


def resolve_hub_path(
    explicit: Optional[Union[str, os.PathLike]] = None,
    env: Mapping[str, str] = os.environ,
    require_absolute: bool = False,
) -> Path:
    """Pick the hub folder: ``explicit``, else ``$FEDEM_HUB``, else :func:`default_hub_path`.

    ``require_absolute=True`` is for the ServerApp's run config key ``hub``: a relative path there
    would resolve against the SuperLink's working directory, so it is an error, not a guess.
    """
    if explicit is not None and str(explicit) != "":
        if require_absolute and not os.path.isabs(os.fspath(explicit)):
            raise ConfigError(
                f"`hub` is {os.fspath(explicit)!r}; it must be an absolute path (the ServerApp runs in "
                "the SuperLink's working directory, not the caller's)."
            )
        return Path(explicit).expanduser().absolute()
    from_env = env.get(HUB_ENV)
    if from_env:
        return Path(from_env).expanduser().absolute()
    return default_hub_path(env)


def registry_path(hub: Path) -> Path:
    return Path(hub) / REGISTRY_FILE


def store_path(hub: Path) -> Path:
    return Path(hub) / STORE_DIR


def hf_cache_path(hub: Path) -> Path:
    return Path(hub) / HF_CACHE_DIR


def secret_path(hub: Path) -> Path:
    return Path(hub) / SECRET_FILE


def cpt_state_path(hub: Path) -> Path:
    return Path(hub) / CPT_DIR


def optimizer_states_path(hub: Path) -> Path:
    return Path(hub) / OPTIMIZER_DIR


def optimizer_state_path(hub: Path, adapter: str, version: int) -> Path:
    """Where the optimizer state of ``adapter`` version ``version`` is kept (beside, never inside, the store)."""
    if not adapter or adapter in (".", "..") or "/" in adapter or "\\" in adapter or "\0" in adapter:
        raise HubError(f"adapter name {adapter!r} cannot name a folder of the hub's optimizer states.")
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise HubError(f"adapter version {version!r} is not a non-negative integer.")
    return optimizer_states_path(hub) / adapter / f"v{version}.safetensors"


def lock_path(hub: Path) -> Path:
    return Path(hub) / LOCK_FILE


def ensure_hub(hub: Union[str, os.PathLike]) -> Path:
    """Create the hub folder (private to this user) if needed; return it."""
    path = Path(hub)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def require_hub(hub: Union[str, os.PathLike]) -> Path:
    """The hub folder of a reader: it must hold a registry, else :class:`HubNotFound`."""
    path = Path(hub)
    if not registry_path(path).is_file():
        what = "does not exist" if not path.exists() else f"has no {REGISTRY_FILE}"
        raise HubNotFound(
            f"no hub state at {str(path)!r} (the folder {what}); pass --hub DIR or set {HUB_ENV} "
            "to the folder the hub's ServerApp writes to."
        )
    return path


class HubWriterLock:
    """Exclusive, non-blocking writer lock on a hub folder (``flock`` on ``writer.lock``).

    The kernel drops an ``flock`` when its holder's last descriptor closes, so the lock is released
    even when the writer is killed with SIGKILL; the holder's details left in the file are then
    stale and the next writer overwrites them. Readers never take this lock.
    """

    def __init__(self, hub: Union[str, os.PathLike]) -> None:
        self.hub = Path(hub)
        self.path = lock_path(self.hub)
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, now: Optional[float] = None) -> "HubWriterLock":
        """Take the lock or raise :class:`HubLocked` naming the holder."""
        if self._fd is not None:
            return self
        ensure_hub(self.hub)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise HubLocked(
                f"the hub {str(self.hub)!r} is locked by another writer ({describe_holder(holder)}); "
                "stop it first, or use another --hub / run config `hub`."
            ) from None
        except BaseException:
            os.close(fd)
            raise
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time() if now is None else now}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info, sort_keys=True) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # while still locked: no one reads a stale holder after a clean exit
        finally:
            os.close(fd)  # closing the last descriptor drops the flock

    def __enter__(self) -> "HubWriterLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:  # a forgotten lock still ends with the object
        try:
            self.release()
        except Exception:
            pass


def read_lock_holder(hub: Union[str, os.PathLike]) -> Optional[dict[str, Any]]:
    """The writer's pid/host/since as written in ``writer.lock``, or None when no writer is recorded.

    Reading takes no lock. After a SIGKILL the file keeps the dead writer's details; on this host a
    dead pid is detected and reported as None.
    """
    try:
        fd = os.open(lock_path(Path(hub)), os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        holder = _read_holder(fd)
    finally:
        os.close(fd)
    if not holder:
        return None
    if holder.get("host") == socket.gethostname() and not pid_alive(holder.get("pid")):
        return None
    return holder


def describe_holder(holder: Optional[dict[str, Any]]) -> str:
    if not holder:
        return "holder unknown"
    since = holder.get("since")
    when = ""
    if isinstance(since, (int, float)):
        when = " since " + time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(since))
    return f"pid {holder.get('pid')} on host {holder.get('host')}{when}"


def _read_holder(fd: int) -> Optional[dict[str, Any]]:
    raw = os.pread(fd, 4096, 0)
    try:
        data = json.loads(raw.decode()) if raw.strip() else None
    except (UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None

