"""``fedem run`` and ``fedem superlink``: run a Flower app on a local simulation SuperLink that is started
and stopped here, and look after one left running (see ``fedem_flwr.launch.local``).

``fedem run`` exits 0 when the run finished ``completed``; 1 when it failed, was stopped or timed out
(Flower's own ``flwr run --stream`` exits 0 in all these cases); 2 for usage errors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import click

from fedem_flwr.launch.local import (
    DEFAULT_FEDERATION_CONFIG,
    default_flwr_home,
    run_app,
    running_superlink,
    stop_superlink,
)

folder_type = click.Path(file_okay=False, path_type=Path)
flwr_home_option = click.option(
    "--flwr-home", type=folder_type,
    help="Flower's home for the run (config, state, logs, installed app) [default: APP_DIR/.flwr].")


def home_of(app_dir: Path, flwr_home: Optional[Path]) -> Path:
    return (flwr_home or default_flwr_home(app_dir)).expanduser().resolve()


@click.command("run")
@click.argument("app_dir", default=".", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--federation-config", default=DEFAULT_FEDERATION_CONFIG, show_default=True,
              help="Simulation size and resources, as for `flwr run --federation-config`.")
@click.option("--run-config", "run_config", multiple=True,
              help="Run-config overrides, e.g. 'hub=\"/abs/hub\" overrides=\"relay.ttl=60\"' "
                   "(repeatable), or one TOML file.")
@flwr_home_option
@click.option("--keep-superlink", is_flag=True,
              help="Leave the SuperLink running (for `flwr ls`/`flwr log`); the next run reuses it.")
@click.option("--timeout", type=float, default=None, help="Stop the run after this many seconds.")
@click.pass_context
def run_command(ctx: click.Context, app_dir: Path, federation_config: str, run_config: tuple[str, ...],
                flwr_home: Optional[Path], keep_superlink: bool, timeout: Optional[float]) -> None:
    """Run the Flower app in APP_DIR (default: .) on a local simulation SuperLink started for it, and
    exit 1 unless the run completed (`flwr run --stream` exits 0 even when the ServerApp failed).

    The ServerApp runs in the SuperLink's directory and environment, not this shell's: pass paths and
    settings through --run-config (absolute paths).

    Example: fedem run . --run-config 'config-name="demo" hub="/srv/fedem-hub"'
    """
    outcome = run_app(app_dir, flwr_home=flwr_home, federation_config=federation_config,
                      run_config_args=run_config, keep_superlink=keep_superlink, timeout=timeout, echo=click.echo)
    click.echo(outcome.summary())
    click.echo(json.dumps({"run-id": str(outcome.run_id), "status": outcome.status.get("status"),
                           "status-details": outcome.status.get("status-details"),
                           "timed-out": outcome.timed_out}, sort_keys=True))
    home = home_of(app_dir, flwr_home)
    if outcome.superlink_kept:
        click.echo(f"SuperLink kept (pid {outcome.superlink_pid}). Inspect with `FLWR_HOME={home} flwr ls`; "
                   f"stop it with `fedem superlink stop --flwr-home {home}`.")
    if not outcome.ok:
        click.echo(f"The run did not complete; SuperLink log under {home}/superlink-*/.", err=True)
        ctx.exit(1)


@click.group()
def superlink() -> None:
    """The local SuperLink that `fedem run --keep-superlink` (or a plain `flwr run`) left running.

    Example: fedem superlink stop --flwr-home ~/.flwr
    """


@superlink.command("status")
@click.argument("app_dir", default=".", type=folder_type)
@flwr_home_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON (`null` when none runs).")
def superlink_status(app_dir: Path, flwr_home: Optional[Path], as_json: bool) -> None:
    """Say whether a SuperLink kept by `fedem run --keep-superlink` runs for APP_DIR (default: .).

    Example: fedem superlink status --json
    """
    home = home_of(app_dir, flwr_home)
    proc = running_superlink(home)
    if as_json:
        click.echo(json.dumps(None if proc is None else {"pid": proc.pid, "address": proc.address}))
    elif proc is None:
        click.echo(f"No kept SuperLink runs for FLWR_HOME={home}.")
    else:
        click.echo(f"SuperLink pid {proc.pid} at {proc.address} (FLWR_HOME={home}).")


@superlink.command("stop")
@click.argument("app_dir", default=".", type=folder_type)
@flwr_home_option
def superlink_stop(app_dir: Path, flwr_home: Optional[Path]) -> None:
    """Stop the SuperLink left running for APP_DIR (default: .), with everything it spawned: one kept by
    `fedem run --keep-superlink`, or one a plain `flwr run` started with that FLWR_HOME.

    Example: fedem superlink stop --flwr-home ~/.flwr
    """
    home = home_of(app_dir, flwr_home)
    pids = stop_superlink(home)
    for pid in pids:
        click.echo(f"Stopped SuperLink pid {pid}.")
    if not pids:
        click.echo(f"No SuperLink runs for FLWR_HOME={home}.")
