"""Snapshots the running hub takes of itself: asked for (``fedem backup`` while it runs), or on its own
every ``hub.backup.every_s``. The hub takes them between relay turns, so they are consistent with its
own writes.

A request is ``<hub>/backup-requests/<id>.json`` (mode 0600): where to write the snapshot and the key
``fedem backup`` derived from the passphrase (scrypt, a fresh salt). The passphrase never reaches the
hub folder, and the derived key reveals no more than the ``secret`` file beside it. Leaving one needs
no lock and never blocks the hub (the file appears whole, as a merge request does). The hub takes each
request at its next turn (:func:`run_backups`: renamed away, then read), writes the snapshot and leaves
``<id>.result.json`` (the snapshot's path, or why it failed), which the command waits for.

The hook runs on every relay turn, so an idle turn costs one system call: a request rings a bell
(``.bell``, touched after the request is in place) and the hook lists the folder only when it removes one
(a request left meanwhile rings again, so none waits for longer than a turn), and once per process.

A snapshot never ends the relay: a failure is logged (and, for a request, written into its result).
"""

from __future__ import annotations

import calendar
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, Union

from fedem_flwr.config.schema import BackupConfig
from fedem_flwr.durable import atomic_write
from fedem_flwr.errors import one_line
from fedem_flwr.hub.backup import (
    SnapshotKey,
    parse_snapshot_name,
    prune_snapshots,
    read_passphrase,
    snapshots_in,
    write_snapshot,
)

REQUESTS_DIR = "backup-requests"
RESULT_SUFFIX = ".result.json"
BELL = ".bell"  # touched after each request: the hook lists the folder only when it removes one
RESULT_KEEP_S = 86_400.0  # results nobody collected are removed after a day

log = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]
# Next interval snapshot per (hub, folder), in wall-clock seconds: read from the folder once per process.
_due: dict[tuple[str, str], float] = {}
_looked: set[str] = set()  # hubs whose request folder this process has listed once


def requests_path(hub: PathLike) -> Path:
    return Path(hub) / REQUESTS_DIR


def request_backup(hub: PathLike, dest: PathLike, key: SnapshotKey, now: float) -> str:
    """Leave a request for a snapshot into the folder ``dest`` (absolute) under ``key``; returns its id."""
    folder = requests_path(hub)
    folder.mkdir(mode=0o700, exist_ok=True)
    request_id = f"{int(now * 1000):013d}-{uuid.uuid4().hex[:8]}"
    request = {"id": request_id, "requested_at": float(now), "dest": str(Path(dest).absolute()),
               "key": key.to_json()}
    with atomic_write(folder / f"{request_id}.json", "w", permissions=0o600, overwrite=False) as out:
        out.write(json.dumps(request, sort_keys=True) + "\n")
    try:
        (folder / BELL).touch(mode=0o600)  # after the request: the hook that removes the bell finds it
    except OSError:
        withdraw_backup_request(hub, request_id)
        raise
    return request_id


def withdraw_backup_request(hub: PathLike, request_id: str) -> bool:
    """Remove a request the hub has not taken yet; False when it was taken (its result will come)."""
    try:
        (requests_path(hub) / f"{request_id}.json").unlink()
    except FileNotFoundError:
        return False
    return True


def pending_backup_requests(hub: PathLike) -> list[str]:
    """Ids of the requests waiting for the hub, oldest first."""
    folder = requests_path(hub)
    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    return [name[:-5] for name in names if name.endswith(".json") and not name.endswith(RESULT_SUFFIX)
            and not name.startswith(".")]


def backup_result(hub: PathLike, request_id: str) -> Optional[dict[str, Any]]:
    """The hub's answer to a request (``path`` or ``error``), or None while it has not answered."""
    try:
        return json.loads((requests_path(hub) / f"{request_id}{RESULT_SUFFIX}").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


def wait_for_backup(hub: PathLike, request_id: str, timeout_s: float, clock: Callable[[], float] = time.monotonic,
                    sleep: Callable[[float], None] = time.sleep, poll_s: float = 0.2) -> Optional[dict[str, Any]]:
    """Wait up to ``timeout_s`` for the hub's answer to a request; the answer (its file removed) or None."""
    end = clock() + timeout_s
    while True:
        result = backup_result(hub, request_id)
        if result is not None:
            (requests_path(hub) / f"{request_id}{RESULT_SUFFIX}").unlink(missing_ok=True)
            return result
        if clock() >= end:
            return None
        sleep(poll_s)


def take_backup_requests(hub: PathLike) -> list[dict[str, Any]]:
    """The hub's side: remove each waiting request and return them, oldest first (one unreadable is
    returned with an ``error``, so its command learns why)."""
    taken = []
    folder = requests_path(hub)
    for request_id in pending_backup_requests(hub):
        final = folder / f"{request_id}.json"
        aside = folder / f".{request_id}.taken-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(final, aside)
        except FileNotFoundError:  # withdrawn meanwhile
            continue
        try:
            request = json.loads(aside.read_text(encoding="utf-8"))
            if not isinstance(request, dict):
                raise ValueError("not a JSON object")
        except ValueError as err:
            request = {"error": f"the request is unreadable ({err})"}
        finally:
            aside.unlink(missing_ok=True)
        taken.append({**request, "id": request_id})
    return taken


def run_backups(hub: PathLike, config: BackupConfig, clock: Callable[[], float] = time.time) -> list[Path]:
    """The running hub's hook between relay turns: write each requested snapshot (answering its request),
    and one into ``config.dir`` when ``config.every_s`` has passed since the newest there (keeping the
    ``config.keep`` newest). Returns the snapshots written; never raises for a failed snapshot."""
    written = []
    requests = take_backup_requests(hub) if _rung(hub) else []
    for request in requests:
        result = _answer(hub, request, clock())
        _write_result(hub, request["id"], result)
        if result.get("path"):
            written.append(Path(result["path"]))
    if requests:
        _tidy(hub, clock())
    if config.every_s is not None and config.dir and config.key_file:
        path = _interval_backup(hub, config, clock())
        if path is not None:
            written.append(path)
    return written


def _rung(hub: PathLike) -> bool:
    """Whether a request rang since the last turn (its bell removed): one system call when none did. The
    first turn of a process looks anyway (a request left without a bell: by hand, or before bells)."""
    first = os.fspath(hub) not in _looked
    _looked.add(os.fspath(hub))
    try:
        os.unlink(requests_path(hub) / BELL)
    except (FileNotFoundError, NotADirectoryError):  # no request, or no request folder yet
        return first
    return True


def _answer(hub: PathLike, request: dict[str, Any], now: float) -> dict[str, Any]:
    if request.get("error"):
        return {"id": request["id"], "path": None, "error": request["error"], "at": now}
    try:
        info = write_snapshot(hub, request["dest"], SnapshotKey.from_json(request["key"]), now)
    except Exception as err:  # a snapshot is never the end of the relay: its command learns why
        log.error("The snapshot asked for (request %s) failed: %s", request["id"], one_line(err))
        return {"id": request["id"], "path": None, "error": str(err), "at": now}
    log.info("Wrote the snapshot asked for: %s (%d bytes)", info.path, info.size)
    return {"id": request["id"], "path": str(info.path), "hub_id": info.hub_id, "size": info.size,
            "error": None, "at": now}


def _write_result(hub: PathLike, request_id: str, result: dict[str, Any]) -> None:
    try:
        with atomic_write(requests_path(hub) / f"{request_id}{RESULT_SUFFIX}", "w", permissions=0o600) as out:
            out.write(json.dumps(result, sort_keys=True) + "\n")
    except OSError as err:
        log.error("Cannot answer backup request %s: %s", request_id, one_line(err))


def _interval_backup(hub: PathLike, config: BackupConfig, now: float) -> Optional[Path]:
    slot = (str(Path(hub).absolute()), str(config.dir))
    if slot not in _due:
        _due[slot] = _newest(config.dir, now) + config.every_s
    if now < _due[slot]:
        return None
    _due[slot] = now + config.every_s  # a failure waits for the next interval, not the next turn
    try:
        info = write_snapshot(hub, config.dir, SnapshotKey.new(read_passphrase(key_file=config.key_file)), now)
        removed = prune_snapshots(config.dir, info.hub_id, config.keep)
    except Exception as err:  # a snapshot is never the end of the relay
        log.error("The hub's snapshot into %s failed (it tries again in %.0f s): %s", config.dir, config.every_s,
                  one_line(err))
        return None
    log.info("Wrote the hub's snapshot %s (%d bytes; %d older removed)", info.path, info.size, len(removed))
    return info.path


def _newest(folder: str, now: float) -> float:
    """When the newest snapshot in ``folder`` was taken (its name says), or long ago when none is there."""
    times = []
    for paths in snapshots_in(folder).values():
        for path in paths:
            stamp = parse_snapshot_name(path.name)[1]
            times.append(calendar.timegm(time.strptime(stamp[:15], "%Y%m%dT%H%M%S")))
    return max(times, default=now - 1e12)


def _tidy(hub: PathLike, now: float) -> None:
    """Remove answers nobody collected within a day."""
    folder = requests_path(hub)
    for path in folder.glob(f"*{RESULT_SUFFIX}") if folder.is_dir() else []:
        try:
            if now - path.stat().st_mtime > RESULT_KEEP_S:
                path.unlink(missing_ok=True)
        except OSError:
            pass
