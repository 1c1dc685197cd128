"""`python -m fedem_flwr.launch`: run a Flower app on a local simulation, report its status.

Exit status: 0 when the run finished `completed`; 1 when it failed, was stopped or timed
out (Flower's own `flwr run --stream` exits 0 in all these cases); 2 for usage errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from fedem_flwr.errors import FedemError
from fedem_flwr.launch.local import (
    DEFAULT_FEDERATION_CONFIG,
    default_flwr_home,
    run_app,
    running_superlink,
    stop_superlink,
)

_HOME_HELP = "Flower's home for this run (config, state, logs, installed app). Default: APP_DIR/.flwr."


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Run Flower apps on a local simulation SuperLink that is started and stopped for you."""


@main.command("run")
@click.argument("app_dir", default=".", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--federation-config", default=DEFAULT_FEDERATION_CONFIG, show_default=True,
              help="Simulation size and resources, as for `flwr run --federation-config`.")
@click.option("--run-config", "run_config", multiple=True,
              help="Run-config overrides, e.g. 'hub=\"/abs/hub\" overrides=\"relay.ttl=60\"' "
                   "(repeatable), or one TOML file.")
@click.option("--flwr-home", type=click.Path(file_okay=False, path_type=Path), help=_HOME_HELP)
@click.option("--keep-superlink", is_flag=True,
              help="Leave the SuperLink running (for `flwr ls`/`flwr log`); the next run reuses it.")
@click.option("--timeout", type=float, default=None, help="Stop the run after this many seconds.")
def run_command(app_dir: Path, federation_config: str, run_config: tuple[str, ...],
                flwr_home: Path | None, keep_superlink: bool, timeout: float | None) -> None:
    """Run APP_DIR (default: .) and exit non-zero unless the run completed.

    Example: python -m fedem_flwr.launch run . --run-config 'hub="/srv/fedem-hub"'

    The ServerApp runs in the SuperLink's directory and environment, not this shell's:
    pass paths and settings through --run-config (absolute paths).
    """
    try:
        outcome = run_app(app_dir, flwr_home=flwr_home, federation_config=federation_config,
                          run_config_args=run_config, keep_superlink=keep_superlink,
                          timeout=timeout, echo=click.echo)
    except FedemError as err:
        raise click.ClickException(str(err)) from err
    click.echo(outcome.summary())
    click.echo(json.dumps({"run-id": str(outcome.run_id), "status": outcome.status.get("status"),
                           "status-details": outcome.status.get("status-details"),
                           "timed-out": outcome.timed_out}, sort_keys=True))
    home = (flwr_home or default_flwr_home(app_dir)).resolve()
    if outcome.superlink_kept:
        click.echo(f"SuperLink kept (pid {outcome.superlink_pid}). Inspect with "
                   f"`FLWR_HOME={home} flwr ls`; stop it with "
                   f"`python -m fedem_flwr.launch stop --flwr-home {home}`.")
    if not outcome.ok:
        click.echo(f"The run did not complete; SuperLink log under {home}/superlink-*/.", err=True)
        raise SystemExit(1)


@main.command("stop")
@click.argument("app_dir", default=".", type=click.Path(file_okay=False, path_type=Path))
@click.option("--flwr-home", type=click.Path(file_okay=False, path_type=Path), help=_HOME_HELP)
def stop_command(app_dir: Path, flwr_home: Path | None) -> None:
    """Stop the SuperLink left running for APP_DIR (default: .): one kept by
    `run --keep-superlink`, or one a plain `flwr run` started with that FLWR_HOME.

    Example: python -m fedem_flwr.launch stop --flwr-home ~/.flwr
    """
    home = (flwr_home or default_flwr_home(app_dir)).expanduser().resolve()
    pids = stop_superlink(home)
    for pid in pids:
        click.echo(f"Stopped SuperLink pid {pid}.")
    if not pids:
        click.echo(f"No SuperLink runs for FLWR_HOME={home}.")


@main.command("status")
@click.argument("app_dir", default=".", type=click.Path(file_okay=False, path_type=Path))
@click.option("--flwr-home", type=click.Path(file_okay=False, path_type=Path), help=_HOME_HELP)
def status_command(app_dir: Path, flwr_home: Path | None) -> None:
    """Say whether a kept SuperLink runs for APP_DIR, as JSON (`null` when none).

    Example: python -m fedem_flwr.launch status
    """
    proc = running_superlink((flwr_home or default_flwr_home(app_dir)).resolve())
    click.echo(json.dumps(None if proc is None else {"pid": proc.pid, "address": proc.address}))
