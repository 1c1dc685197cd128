"""``fedem prune``: let the hub's local store go of old versions nothing needs any more (``hub.prune``).

The CLI has no Hydra config of the running hub, so the counts are options; the running hub prunes
by its own ``hub.retention`` after each new base. Without ``--dry-run`` it takes the hub's writer
lock (a running hub is refused); ``--dry-run`` only reads, so it never blocks the hub.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import click

from fedem_flwr.cli import render
from fedem_flwr.errors import HubLocked
from fedem_flwr.hub.paths import HubWriterLock, registry_path, require_hub
from fedem_flwr.hub.prune import PruneReport, human_bytes, prune
from fedem_flwr.hub.registry import Registry
from fedem_flwr.hub.retention import Settings
from fedem_flwr.hub.stores import open_store


@click.command("prune")
@click.option("--bases", type=click.IntRange(min=1), default=None,
              help="Keep the newest N base versions (and every one still needed).")
@click.option("--adapter-versions", type=click.IntRange(min=1), default=None,
              help="Keep the newest N versions of each adapter (and every one still needed).")
@click.option("--publish-first", is_flag=True, help="Never remove a version `fedem publish` has not pushed.")
@click.option("--dry-run", is_flag=True, help="Only list what would be removed and why the rest stays.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def prune_command(ctx: click.Context, bases: Optional[int], adapter_versions: Optional[int], publish_first: bool,
                  dry_run: bool, as_json: bool) -> None:
    """Remove old base and adapter versions from the hub's local store; their registry rows stay.

    Never removed: the newest base, every base an adapter's latest version or an active lease refers
    to, each adapter's latest version, every version an active lease may still read, and (with
    --publish-first) whatever is not published. A Hugging Face Hub store is never pruned.

    Example: fedem prune --bases 3 --adapter-versions 5 --dry-run
    """
    if bases is None and adapter_versions is None:
        raise click.UsageError("give --bases N, --adapter-versions N or both: what the local store keeps.")
    path = require_hub(ctx.obj.path)
    settings = Settings(bases, adapter_versions, publish_first)
    if dry_run:
        report = _prune(path, settings, dry_run=True)
    else:
        try:
            with HubWriterLock(path):
                report = _prune(path, settings, dry_run=False)
        except HubLocked as err:
            raise click.ClickException(f"cannot prune while the hub is running: {err} The running hub "
                                       "prunes by its own `hub.retention` after each new base; `fedem prune "
                                       "--dry-run` shows what would go.") from err
    if as_json:
        click.echo(render.dumps(report.as_dict()))
        return
    render.console().print(table(report))
    click.echo(report.summary())


def _prune(path: Path, settings: Settings, dry_run: bool) -> PruneReport:
    with Registry.open(registry_path(path), readonly=dry_run) as registry:
        kind = (registry.setting("store") or {}).get("kind", "local")
        store = open_store(path, "local") if kind == "local" else None  # only a local store is pruned
        return prune(registry, store, path, settings, now=time.time(), dry_run=dry_run)


def table(report: PruneReport) -> render.Listing:
    """One row per version: removed (or would be), finished (an interrupted prune's) or kept, and why."""
    went = "would remove" if report.dry_run else "removed"
    rows = [(went, item.name, item.revision, human_bytes(item.bytes), "-") for item in report.removed]
    rows += [("would finish" if report.dry_run else "finished", item.name, item.revision, human_bytes(item.bytes),
              "-") for item in report.finished]  # pruned before, files left by a prune cut short
    rows += [("kept", item.name, item.revision, human_bytes(item.bytes), ", ".join(item.reasons))
             for item in report.kept]
    title = "Retention (dry run)" if report.dry_run else "Retention"
    return render.Listing(title, (render.fixed("action"), render.free("version", 8), render.fixed("revision"),
                                  render.fixed("bytes"), render.free("why kept")),
                          rows, report.skipped or "nothing stored")
