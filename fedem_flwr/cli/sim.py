"""``fedem sim``: policy research on simulated federations.

Sweeps and their reports are research code kept in the repository's ``simulations/`` folder, which is
not installed with the package: ``fedem sim sweep`` and ``fedem sim report`` import it from the checkout
in the working directory. ``fedem sim baseline`` runs one of the package's non-federated baselines.
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

import click

from fedem_flwr.cli import render

# As fedem_flwr.simulation.baselines.METHODS, which is imported only to train (it loads torch).
BASELINES = ("centralized", "local-only")
# The sweep's named dimensions on the command line: each takes comma-separated values.
DIMENSION_OPTIONS = (
    ("method", "centralized, local-only, fedavg-language, fedavg-global, relay"),
    ("seed", "random seeds, e.g. 0,1,2"),
    ("contributors", "simulated contributors (num-supernodes, or a baseline's contributor count)"),
    ("max_tokens", "token budget (every token trained, wasted ones included)"),
    ("clock", "virtual (default) or real; federated methods only"),
    ("policy", "relay: random, round-robin, least-recent, language, fair"),
    ("lease_ttl_s", "relay: lease time to live, simulated seconds"),
    ("vanish_prob", "federated: chance a contributor vanishes mid-lease"),
    ("merge", "relay: on, off"),
    ("cpt", "relay: on, off"),
)


def checkout_module(name: str) -> ModuleType:
    """``simulations.<name>`` from the repository checkout in the working directory."""
    root = Path.cwd().resolve()
    folder = root / "simulations"
    if not (folder / f"{name}.py").is_file():
        raise click.ClickException(
            f"`fedem sim` runs from a checkout of the fedem-flwr repository: it uses the repository's "
            f"simulations/ folder, which is not installed, and {root} holds no simulations/{name}.py. "
            "Change to the checkout's top folder and run it again.")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))  # spawned cell processes inherit it
    module = importlib.import_module(f"simulations.{name}")
    if Path(module.__file__ or "").resolve().parent != folder:
        raise click.ClickException(f"`simulations` is already loaded from {Path(module.__file__ or '').parent}, "
                                   f"not from {folder}.")
    return module


def dimension_options(func: Callable[..., Any]) -> Callable[..., Any]:
    for name, help_text in reversed(DIMENSION_OPTIONS):
        func = click.option(f"--{name.replace('_', '-')}", name, metavar="V1,V2", help=help_text)(func)
    return func


@click.group()
def sim() -> None:
    """Simulated federations: sweeps of methods and settings with their report (run from a checkout of
    the repository), and the non-federated baselines.

    Example: fedem sim sweep --grid simulations/results/reference.yaml --out runs/reference
    """


@sim.command()
@click.option("--grid", "grid_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="YAML/JSON grid file: a mapping of dimensions, or a list of them.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/sweep"),
              show_default=True, help="The sweep's folder: cells/, results.csv, report.md.")
@dimension_options
@click.option("--overrides", multiple=True,
              help="Hydra overrides for every cell, e.g. 'train.max_steps=10'; repeat for alternatives.")
@click.option("--set", "settings", multiple=True, metavar="KEY=V1,V2",
              help="Any Hydra key as a dimension (a list value needs a grid file or --overrides).")
@click.option("--jobs", type=click.IntRange(min=1), help="Cells at once [default: cores / --cell-cpus].")
@click.option("--cell-cpus", type=click.IntRange(min=1), default=1, show_default=True,
              help="CPUs of each cell's own Ray.")
@click.option("--ray-address", help="Join this Ray cluster (HOST:PORT of `ray start --head`).")
@click.option("--timeout", type=float, help="Seconds a federated cell may run before it is stopped.")
@click.option("--dry-run", is_flag=True, help="List the cells and whether each is done; run nothing.")
@click.option("--no-report", is_flag=True, help="Skip report.md and its plots.")
@click.option("--reference", help="The report's reference group for paired differences [default: fedavg-language].")
@click.option("--json", "as_json", is_flag=True, help="With --dry-run: print the cells as JSON.")
@click.pass_context
def sweep(ctx: click.Context, grid_file: Optional[Path], out: Path, overrides: tuple[str, ...],
          settings: tuple[str, ...], jobs: Optional[int], cell_cpus: int, ray_address: Optional[str],
          timeout: Optional[float], dry_run: bool, no_report: bool, reference: Optional[str], as_json: bool,
          **dimensions: Optional[str]) -> None:
    """Run a grid of simulated federations and baselines, several cells at once, resumably.

    The grid is the cartesian product of its dimensions (comma-separated values; each option replaces
    the grid file's). Each cell runs in OUT/cells/KEY/; a cell that already has its result is not run
    again, so the same command resumes a sweep. OUT/results.csv holds a row per cell, OUT/report.md
    and its plots summarise them. Exits 1 when a cell failed.

    Example: fedem sim sweep --method relay,centralized --seed 0,1,2 --overrides 'train.max_steps=10'
    """
    sweeps = checkout_module("sweep")
    try:
        cells = sweeps.expand(sweeps.grid_from_options(grid_file, dimensions, settings, overrides))
    except (ValueError, OSError) as err:  # a CellError, a value that does not parse, an unreadable grid
        raise click.UsageError(str(err)) from err
    if dry_run:
        rows = sweeps.describe(cells, out)
        if as_json:
            click.echo(render.dumps(rows))
            return
        for row in rows:
            click.echo(f"{row['key']}  {'done' if row['done'] else 'todo'}  {json.dumps(row['cell'], sort_keys=True)}")
        return
    jobs = jobs or (1 if ray_address else sweeps.default_jobs(cell_cpus))
    counts = sweeps.run_sweep(cells, out, jobs=jobs, cell_cpus=cell_cpus, ray_address=ray_address, timeout=timeout)
    click.echo(f"{len(cells)} cells: {counts['ok']} ok, {counts['skipped']} already done, {counts['failed']} failed; "
               f"table: {out / sweeps.RESULTS_FILE}")
    if not no_report:
        click.echo(f"report: {checkout_module('report').write_report(out, reference=reference)}")
    if counts["failed"]:
        ctx.exit(1)


@sim.command()
@click.argument("out", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--reference", help="Group whose same-seed losses the others are compared with, per language "
                                  "[default: fedavg-language, when there is one].")
@click.option("--target", type=float, default=3.5, show_default=True,
              help="Mean loss whose simulated time to reach the report gives.")
def report(out: Path, reference: Optional[str], target: float) -> None:
    """Write OUT/report.md from a sweep's results.csv and its cells' traces: tables per method (and
    arm, or every other setting that varies), mean ± standard deviation over seeds -- final test
    loss (held-out without a test split), base alone, paired differences per language from a
    reference group, merges, token shares, time to a target loss -- and plots of the traces.

    Example: fedem sim report runs/study --reference fedavg-language
    """
    reports = checkout_module("report")
    if not (out / reports.RESULTS_FILE).is_file():
        raise click.ClickException(f"{out} holds no {reports.RESULTS_FILE}: run `fedem sim sweep --out {out}` first.")
    click.echo(reports.write_report(out, reference=reference, target=target))


@sim.command()
@click.option("--method", type=click.Choice(BASELINES), required=True)
@click.option("--contributors", type=click.IntRange(min=1), default=20, show_default=True,
              help="Simulated contributors (local-only).")
@click.option("--overrides", default="", help="Hydra overrides, e.g. 'sim.max_tokens=200000 data.languages=[hi,ta]'.")
@click.pass_context
def baseline(ctx: click.Context, method: str, contributors: int, overrides: str) -> None:
    """Train a non-federated baseline in this process on the hub folder given to fedem (--hub or
    FEDEM_HUB; seeded when empty) and print its final loss per language (on the test split with
    data.test_fraction > 0, else held-out): centralized (all data, the upper bound) or local-only (each
    contributor alone), at the token budget sim.max_tokens.

    Example: fedem --hub runs/centralized sim baseline --method centralized --overrides 'sim.max_tokens=200000'
    """
    given = ctx.find_root().params.get("hub")
    if given is None:
        raise click.UsageError("a baseline writes into its own hub folder: name it, as in "
                               "`fedem --hub DIR sim baseline ...` (or set FEDEM_HUB).")
    from fedem_flwr.config.loader import load_run_config
    from fedem_flwr.quiet import quiet_library_progress
    from fedem_flwr.simulation.baselines import run_baseline  # torch only to train

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    quiet_library_progress()
    hub = Path(given).expanduser().resolve()
    result = run_baseline(method, load_run_config({"overrides": overrides, "hub": str(hub)}), hub, contributors)
    click.echo(" ".join([*(f"{k}={v:.4f}" for k, v in sorted(result["losses"].items())), f"tokens={result['tokens']}"]))
