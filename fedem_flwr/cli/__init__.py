"""``fedem``: look into a hub's state (read-only, never blocks the running hub), publish it, or leave
the running hub a merge request (a file in the hub folder, no lock); run the app on a local simulation
(``fedem run``, ``fedem superlink``) and study simulated federations (``fedem sim``).

The hub folder is ``--hub DIR``, else ``$FEDEM_HUB``, else ``$XDG_DATA_HOME/fedem/hub``
(``~/.local/share/fedem/hub``). Every listing takes ``--json``; holders and contributors are shown
as pseudonyms unless ``--reveal`` is given.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import click

from fedem_flwr import __version__
from fedem_flwr.cli import render
from fedem_flwr.errors import FedemError
from fedem_flwr.hub import views
from fedem_flwr.hub.merge_request import request_merge, take_merge_request
from fedem_flwr.hub.paths import HubWriterLock, describe_holder, read_lock_holder, require_hub, resolve_hub_path
from fedem_flwr.hub.registry import Registry

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class FedemGroup(click.Group):
    """Turns the package's typed errors into one-line ``Error: ...`` messages with exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FedemError as err:
            raise click.ClickException(str(err)) from err


class HubContext:
    """The chosen hub folder; opens its registry read-only on first use, closes it at exit."""

    def __init__(self, ctx: click.Context, path: Path) -> None:
        self.ctx = ctx
        self.path = path
        self._registry: Optional[Registry] = None

    def registry(self) -> Registry:
        if self._registry is None:
            self._registry = Registry.open(require_hub(self.path), readonly=True)
            self.ctx.call_on_close(self._registry.close)
        return self._registry

    def store(self) -> views.StoreView:
        """The store the hub was set up with (its `store` setting; a local folder if none is recorded)."""
        return views.StoreView(self.path, self.registry().setting("store"))


pass_hub = click.make_pass_decorator(HubContext)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
reveal_option = click.option("--reveal", is_flag=True,
                             help="Show contributor identities (pk:/sim:/node:) instead of pseudonyms.")


def emit(data: Any, as_json: bool, *tables: Any) -> None:
    if as_json:
        click.echo(render.dumps(data))
        return
    out = render.console()
    for item in tables:
        out.print(item)


@click.group(cls=FedemGroup, context_settings=CONTEXT)
@click.version_option(__version__, "--version", prog_name="fedem")
@click.option("--hub", "hub", type=click.Path(file_okay=False, path_type=Path), envvar="FEDEM_HUB",
              help="Hub state folder [env FEDEM_HUB; default $XDG_DATA_HOME/fedem/hub or ~/.local/share/fedem/hub].")
@click.pass_context
def cli(ctx: click.Context, hub: Optional[Path]) -> None:
    """Inspect the state of a fedem-flwr hub: base checkpoints, adapters, leases, contributions;
    ask it for a merge. Run the app on a local simulation (run, superlink) and study simulated
    federations (sim).

    Example: fedem --hub /srv/fedem status
    """
    ctx.obj = HubContext(ctx, resolve_hub_path(hub))


@cli.command()
@json_option
@reveal_option
@pass_hub
def status(hub: HubContext, as_json: bool, reveal: bool) -> None:
    """The hub at a glance: base checkpoint, adapters and their holders (one a lane, up to `relay.lanes`),
    active leases, recent decisions.

    Example: fedem status --json
    """
    registry = hub.registry()
    view = views.status_view(registry, hub.path, hub.store(), views.Names(registry, reveal))
    emit(view, as_json, *render.status(view, time.time()))


@cli.command()
@click.argument("name", required=False)
@json_option
@reveal_option
@pass_hub
def adapters(hub: HubContext, name: Optional[str], as_json: bool, reveal: bool) -> None:
    """Adapters with their latest version and holder; with NAME, every version of that adapter.

    Example: fedem adapters hi --json
    """
    registry = hub.registry()
    if name is None:
        rows = views.adapters_view(registry, hub.store(), views.Names(registry, reveal))
        emit(rows, as_json, render.adapters(rows))
        return
    if registry.adapter(name) is None:
        known = ", ".join(a.name for a in registry.adapters()) or "none"
        raise click.ClickException(f"no adapter named {name!r} (adapters: {known}).")
    store = hub.store()
    rows = [views.version_view(v, store) for v in registry.adapter_versions(name)]
    emit(rows, as_json, render.versions(name, rows))


@cli.command()
@click.option("--all", "everything", is_flag=True, help="Every lease ever issued, not only the active ones.")
@json_option
@reveal_option
@pass_hub
def leases(hub: HubContext, everything: bool, as_json: bool, reveal: bool) -> None:
    """Active leases with their lane and time left (--all: every lease ever issued, ended ones too).

    Example: fedem leases --all --json
    """
    registry = hub.registry()
    names = views.Names(registry, reveal)
    rows = [views.lease_view(lease, names) for lease in registry.leases(active_only=not everything)]
    emit(rows, as_json, render.leases(rows, time.time(), everything))


@cli.command()
@json_option
@reveal_option
@pass_hub
def checkpoints(hub: HubContext, as_json: bool, reveal: bool) -> None:
    """The lineage of base versions, oldest first: parent, source, held-out loss, what each merge
    absorbed (adapter versions, weights, contributors) and the folder transformers loads (`path`).

    Example: fedem checkpoints --json
    """
    registry = hub.registry()
    rows = views.checkpoints_view(registry, hub.store(), views.Names(registry, reveal))
    emit(rows, as_json, render.checkpoints(rows))


@cli.command()
@click.option("--now", "at_once", is_flag=True,
              help="When no hub is running, merge here and now (with the hub's config) instead of queueing.")
@click.option("--config-name", default="config", show_default=True, help="With --now: the hub's config in conf/.")
@click.option("--overrides", default="", help="With --now: the Hydra overrides the hub runs with.")
@json_option
@pass_hub
def merge(hub: HubContext, at_once: bool, config_name: str, overrides: str, as_json: bool) -> None:
    """Ask the hub to merge the accepted adapters into a new base version now.

    Leaves a request in the hub folder (no lock, never blocks the hub): the running hub takes it at
    its next loop turn, or at its next start when none is running. With --now and no hub running, the
    merge runs here under the hub's writer lock. The merge is published only if it passes its gate;
    `fedem checkpoints` shows the result, `fedem status` a request still waiting.

    Example: fedem --hub /srv/fedem merge --now --config-name demo
    """
    path = require_hub(hub.path)
    if at_once and read_lock_holder(path) is None:
        click.echo(_merge_now(path, config_name, overrides))
        return
    request, new = request_merge(path, time.time())
    writer = read_lock_holder(path)
    data = {"requested_at": views.iso(request["requested_at"]), "new": new,
            "writer": None if writer is None else {**writer, "since": views.iso(writer.get("since"))}}
    if as_json:
        click.echo(render.dumps(data))
        return
    when = render.utc(data["requested_at"]) or "an unknown time"
    click.echo(f"merge requested at {when} UTC" if new else f"a merge request is already queued (since {when} UTC)")
    click.echo(f"queued: the running hub ({describe_holder(writer)}) takes it at its next loop turn" if writer
               else "queued: no hub is running; the hub takes it at its next start")


def _merge_now(path: Path, config_name: str, overrides: str) -> str:
    """Merge under the writer lock with the hub's own config (a changed setup is refused as at start)."""
    from fedem_flwr.config.loader import load_config, parse_overrides
    from fedem_flwr.relay.bootstrap import open_hub
    from fedem_flwr.relay.keeper import BaseKeeper  # torch and the models only for a merge here

    with HubWriterLock(path):
        take_merge_request(path)  # this merge answers any request left earlier
        new = BaseKeeper(open_hub(load_config(parse_overrides(overrides), config_name), path)).merge("requested")
    if new is None:
        return "merge refused or nothing to absorb: see `fedem status` (refused attempts) for the reason"
    return f"published base v{new.version} (merge from v{new.parent})"


@cli.command()
@click.option("--limit", default=50, show_default=True, type=click.IntRange(min=0),
              help="Show the newest N contributions; 0 shows all.")
@click.option("--adapter", default=None, help="Only contributions to this adapter.")
@json_option
@reveal_option
@pass_hub
def contributions(hub: HubContext, limit: int, adapter: Optional[str], as_json: bool, reveal: bool) -> None:
    """Returned adapters and the hub's decision on each, newest first.

    Example: fedem contributions --limit 10 --json
    """
    registry = hub.registry()
    names = views.Names(registry, reveal)
    rows = [views.contribution_view(c, names) for c in registry.contributions(limit=limit or None, adapter=adapter)]
    emit(rows, as_json, render.contributions(rows))


@cli.command()
@click.option("--repair", is_flag=True,
              help="First remove orphans and leftover temporary folders (takes the writer lock: stop the hub first).")
@json_option
@click.pass_context
def verify(ctx: click.Context, repair: bool, as_json: bool) -> None:
    """Re-hash every stored artifact and check it against the registry; exit 1 naming each problem.

    Reports digest mismatches, missing revisions, orphans (stored, not in the registry: a crash
    between the two), registry corruption, and kept optimizer states (`train.carry`) that do not
    load, do not fit their adapter version, or belong to a version the registry lacks. While the
    hub is writing, the artifact it is storing can show as a leftover or an orphan for a moment:
    run it again before acting. With --repair, orphan revisions (tags on a Hugging Face Hub
    store), orphan optimizer states and leftover temporary folders are removed and listed, under
    the hub's writer lock, then everything is checked again. The hub replaces an orphan by itself
    when it writes that revision again, so repairing is never required.

    Example: fedem verify --repair
    """
    hub: HubContext = ctx.obj
    if repair:
        with HubWriterLock(require_hub(hub.path)):
            view = views.verify_view(hub.registry(), hub.store(), repair=True)
    else:
        view = views.verify_view(hub.registry(), hub.store())
    if as_json:
        click.echo(render.dumps(view))
    else:
        for p in view.get("removed", []):
            where = f"{p['repo']}@{p['revision']}" if p["repo"] else p["revision"]
            click.echo(f"removed {p['kind']}: {where}")
        for p in view["problems"]:
            where = f"{p['repo']}@{p['revision']}" if p["repo"] else (p["revision"] or "registry")
            click.echo(f"{p['kind']}: {where}: {p['detail']}")
        checked = view["checked"]
        summary = f"{checked['checkpoints']} checkpoint(s), {checked['adapter_versions']} adapter version(s)"
        click.echo(f"ok: {summary} verified" if view["ok"] else f"{len(view['problems'])} problem(s) in {summary}")
    if not view["ok"]:
        ctx.exit(1)


@cli.command()
@click.option("--to", "target", type=click.Choice(["hf"]), required=True, help="Where to publish.")
@click.option("--repo-prefix", required=True, help="ORG/NAME under which the base and adapter repos are created.")
@click.option("--site", "site_only", is_flag=True,
              help="Publish the public ledger (`fedem site`) as the static Space ORG/NAME-site instead.")
@click.option("--endpoint", default=None, help="Hub endpoint URL [default: HF_ENDPOINT, else huggingface.co].")
@click.option("--token", default=None, help="Access token [default: HF_TOKEN or the saved login].")
@click.option("--private/--public", default=None,
              help="Visibility of repos created [default: the hub's `hub.private`, else public].")
@json_option
@pass_hub
def publish(hub: HubContext, target: str, repo_prefix: str, site_only: bool, endpoint: Optional[str],
            token: Optional[str], private: Optional[bool], as_json: bool) -> None:
    """Push the hub's local artifacts (every version, as tags) to a Hugging Face Hub endpoint; with
    --site, the public ledger as a static Space instead.

    Example: fedem publish --to hf --repo-prefix my-org/seshu --private
    """
    registry = hub.registry()
    if private is None:
        private = bool((registry.setting("store") or {}).get("private", False))
    if site_only:
        from fedem_flwr.site.publish import publish_site  # huggingface_hub only when publishing

        repos = [publish_site(registry, repo_prefix, time.time(), endpoint=endpoint, token=token, private=private)]
    else:
        from fedem_flwr.hub.publish import publish_hub  # huggingface_hub only when publishing

        repos = publish_hub(hub.path, registry, repo_prefix, endpoint=endpoint, token=token, private=private)
    if as_json:
        click.echo(render.dumps({"target": target, "repos": repos}))
    else:
        click.echo(f"published {len(repos)} repo(s) to {target}:")
        for repo in repos:
            click.echo(f"  {repo}")


@cli.command()
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder to write the site into (its pages, data files and assets are replaced).")
@reveal_option
@json_option
@pass_hub
def site(hub: HubContext, out: Path, reveal: bool, as_json: bool) -> None:
    """Write the public ledger: a static site of the lineage, progress, every contribution and a
    page per contributor pseudonym, readable offline (open index.html) or from any static host.

    Example: fedem site --out public/
    """
    if reveal:
        raise click.UsageError("--reveal is refused for `fedem site`: the site is public and shows "
                               "contributors only by pseudonym.")
    from fedem_flwr.site.build import build_site

    data = build_site(hub.registry(), out, time.time())
    if as_json:
        click.echo(render.dumps(data))
    else:
        click.echo(f"site of {data['contributions']} contribution(s) by {data['contributors']} contributor(s) "
                   f"written to {out} (open {out / 'index.html'})")


@cli.command()
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for relay.png and summary.json [default: HUB/report].")
@json_option
@pass_hub
def report(hub: HubContext, out: Optional[Path], as_json: bool) -> None:
    """Plot held-out loss per adapter version, the relay's progress, and held-out loss per language
    across base versions (bases.png); summarise the decisions and the lineage (summary.json).

    Example: fedem report --out runs/policy-language
    """
    from fedem_flwr.cli.report import plot_bases, plot_hub, summary  # matplotlib only when plotting

    registry = hub.registry()
    out = out or hub.path / "report"
    data = summary(registry)
    data["figure"] = str(plot_hub(registry, out / "relay.png"))
    data["bases_figure"] = str(plot_bases(data["bases"], out / "bases.png"))
    (out / "summary.json").write_text(render.dumps(data) + "\n")
    if as_json:
        click.echo(render.dumps(data))
    else:
        click.echo(f"{data['accepted']} accepted, {data['rejected']} rejected, {data['leases']} leases, "
                   f"{data['contributions_per_minute']:.1f} contributions/min")
        render.console().print(render.heldout_table(data["bases"]))
        click.echo(f"figures: {data['figure']}, {data['bases_figure']}")


# Commands of their own modules: credentials, local Flower runs, simulations, peer judging.
from fedem_flwr.cli.backup import backup, restore  # noqa: E402
from fedem_flwr.cli.deploy import certs, connection, node_key_command  # noqa: E402
from fedem_flwr.cli.peers import peers_command  # noqa: E402
from fedem_flwr.cli.retention import prune_command  # noqa: E402
from fedem_flwr.cli.run import run_command, superlink  # noqa: E402
from fedem_flwr.cli.sim import sim  # noqa: E402

for command in (certs, node_key_command, connection, run_command, superlink, sim, prune_command, backup,
                restore, peers_command):
    cli.add_command(command)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="fedem")
