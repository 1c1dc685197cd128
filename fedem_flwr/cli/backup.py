"""``fedem backup`` and ``fedem restore``: snapshot what a hub cannot rebuild (``hub.backup``), and
rebuild a hub folder from a snapshot and a copy of its store (``hub.restore``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import click

from fedem_flwr.cli import render
from fedem_flwr.errors import HubError, HubLocked
from fedem_flwr.hub.backup import SnapshotInfo, SnapshotKey, read_passphrase, write_snapshot
from fedem_flwr.hub.backup_request import request_backup, wait_for_backup, withdraw_backup_request
from fedem_flwr.hub.paths import HubWriterLock, describe_holder, read_lock_holder, require_hub
from fedem_flwr.hub.restore import DEFAULT_SKIP, RestoreReport, restore_hub

folder_type = click.Path(file_okay=False, path_type=Path)


def key_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--key-file / --passphrase-env: where the passphrase that encrypts the hub's secret comes from."""
    command = click.option("--passphrase-env", default=None, metavar="VAR",
                           help="An environment variable holding the passphrase.")(command)
    return click.option("--key-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                        help="A file whose content is the passphrase (keep it apart from the snapshots).")(command)


@click.command()
@click.argument("dest", type=folder_type)
@key_options
@click.option("--timeout", "timeout_s", default=120.0, show_default=True, type=click.FloatRange(min=0),
              help="With the hub running: seconds to wait for it to write the snapshot.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.pass_obj
def backup(hub: Any, dest: Path, key_file: Optional[Path], passphrase_env: Optional[str], timeout_s: float,
           as_json: bool) -> None:
    """Write a snapshot of what the hub cannot rebuild into the folder DEST: registry, settings,
    secret (encrypted), CPT state, optimizer states, a waiting merge request. Not the store: keep a
    copy of HUB/store (or publish to a Hugging Face Hub) beside it.

    With no hub running, the snapshot is written here under the hub's writer lock. With the hub
    running, a request is left in the hub folder and the hub writes the snapshot itself between two
    relay turns; this command waits for it. DEST never mixes snapshots of two hubs.

    Example: fedem --hub /srv/fedem backup /backups/fedem --key-file ~/.fedem/backup-passphrase
    """
    path = require_hub(hub.path)
    key = SnapshotKey.new(read_passphrase(key_file, passphrase_env))
    dest = dest.expanduser().absolute()
    info, by = None, "fedem backup"
    if read_lock_holder(path) is None:
        try:
            with HubWriterLock(path):
                info = write_snapshot(path, dest, key, time.time())
        except HubLocked:
            info = None  # the hub started meanwhile: ask it
    if info is None:
        writer = read_lock_holder(path)
        by = f"the running hub ({describe_holder(writer)})"
        data = _asked(path, dest, key, timeout_s, by)
    else:
        data = _described(info)
    data["by"] = by
    if as_json:
        click.echo(render.dumps(data))
        return
    click.echo(f"snapshot written by {by}: {data['path']}")
    click.echo(f"  hub id {data['hub_id']}, {data['size']:,} bytes; restore it with `fedem restore {data['path']} "
               "--hub NEW --store COPY-OF-STORE` and the same passphrase")


def _asked(path: Path, dest: Path, key: SnapshotKey, timeout_s: float, by: str) -> dict[str, Any]:
    """Leave a request for the running hub and wait for its answer."""
    request_id = request_backup(path, dest, key, time.time())
    result = wait_for_backup(path, request_id, timeout_s)
    if result is None:
        withdrawn = withdraw_backup_request(path, request_id)
        then = ("the request was withdrawn" if withdrawn else
                f"it has taken the request, so the snapshot should still appear in {str(dest)!r}")
        raise HubError(f"{by} did not write the snapshot within {timeout_s:g} s (it writes one between relay turns; "
                       f"a long CPT slice or merge delays it); {then}. Try again with a longer --timeout.")
    if result.get("error"):
        raise HubError(f"{by} could not write the snapshot: {result['error']}")
    return {"path": result["path"], "hub_id": result.get("hub_id"), "size": result.get("size") or 0}


def _described(info: SnapshotInfo) -> dict[str, Any]:
    return {"path": str(info.path), "hub_id": info.hub_id, "size": info.size}


@click.command()
@click.argument("snapshot", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--hub", "target", type=folder_type, default=None,
              help="The new hub folder: absent or empty [default: fedem's --hub, or FEDEM_HUB].")
@click.option("--store", "store", type=folder_type, default=None,
              help="A copy of the old hub's store/ folder (for a hub whose store is local).")
@key_options
@click.option("--copy", "copy_files", is_flag=True, help="Copy the store's files instead of hard-linking them.")
@click.option("--skip", default=DEFAULT_SKIP, show_default=True, type=click.IntRange(min=0),
              help="Lease tokens and contribution ids skipped past the highest found (those issued after the "
                   "snapshot left no trace).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.pass_obj
def restore(hub: Any, snapshot: Path, target: Optional[Path], store: Optional[Path], key_file: Optional[Path],
            passphrase_env: Optional[str], copy_files: bool, skip: int, as_json: bool) -> None:
    """Rebuild a hub folder from SNAPSHOT (`fedem backup`) and a copy of its store.

    The snapshot is verified (passphrase, HMAC, every member) and the store checked against its
    registry before anything is written; the target must be absent or empty. Revisions in the store
    that the snapshot's registry lacks (written after it) are re-registered from their model cards, or
    left as orphans (`fedem verify` lists them); every counter moves past every number found.

    Example: fedem restore /backups/fedem/fedem-snapshot-....tar --hub /srv/fedem-new --store /copy/store
    --key-file ~/.fedem/backup-passphrase
    """
    passphrase = read_passphrase(key_file, passphrase_env)
    report = restore_hub(snapshot, target or hub.path, passphrase, store, skip=skip, link=not copy_files)
    if as_json:
        click.echo(render.dumps(report.to_json()))
        return
    for line in report_lines(report):
        click.echo(line)


def report_lines(report: RestoreReport) -> list[str]:
    """The restore's report as text: what was restored, re-registered, left as orphans, and the floors."""
    store = report.store
    where = store.get("source") or store.get("endpoint") or ""
    lines = [f"restored hub {report.hub_id} into {report.hub} from {report.snapshot} (taken {report.snapshot_created})",
             f"  written: {', '.join(report.restored)}",
             f"  store ({store.get('kind')}, {where}): {store.get('revisions', 0)} revision(s)"]
    lines += [f"  re-registered {r['revision']}: " + (f"base v{r['version']} ({r['source']})" if r["kind"] == "base"
              else f"{r['adapter']} v{r['version']} ({r['version_kind']})") for r in report.reregistered]
    lines += [f"  contribution {c['id']} restored for {c['revision']}" if c["id"] is not None else
              f"  contribution of {c['revision']} not restored: {c['skipped']}" for c in report.contributions]
    lines += [f"  orphan {o['revision']}: {o['reason']}" for o in report.orphans]
    lines += [f"  missing {m} (in the registry, not in the store)" for m in report.missing]
    lines.append("  next numbers: " + ", ".join(f"{name} {value}" for name, value in sorted(report.floors.items())))
    return lines
