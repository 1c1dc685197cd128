"""Run a grid of simulated federations and baselines, several cells at once, resumably.

    python -m simulations.sweep --method relay,fedavg-language,centralized --seed 0,1,2 \\
        --contributors 20 --max-tokens 200000 --overrides "train.max_steps=10" --out runs/sweep
    python -m simulations.sweep --grid grid.yaml --out runs/sweep --jobs 2
    python -m simulations.sweep --grid grid.yaml --out runs/sweep --ray-address HEAD_IP:6379

The grid is the cartesian product of its dimensions (a list is a dimension, a scalar a fixed
setting; options on the command line replace the grid file's). Each cell runs in
``<out>/cells/<key>/``, keyed by the hash of its settings; a cell that already has its result is
not run again, so rerunning the same command resumes a sweep. ``<out>/results.csv`` holds one row
per cell of ``<out>`` (settings, status, result, ``loss.<lang>`` columns) and ``<out>/report.md``
with its plots summarises it (``python -m simulations.report``).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Optional

import yaml
from tqdm import tqdm

from simulations.cells import (
    CELL_FILE,
    DIMENSIONS,
    HUB_DIR,
    STATUS_FILE,
    CellError,
    Runner,
    cell_key,
    has_result,
    normalize,
    run_cell,
    write_status,
)
from fedem_flwr.simulation.record import read_result

RESULTS_FILE = "results.csv"
CELLS_DIR = "cells"
STATUS_COLUMNS = ("key", "status", "reason", "cell_wall_s")
RESULT_COLUMNS = ("loss_mean", "tokens", "tokens_wasted", "bytes_moved", "accepted", "rejected", "leases",
                  "expired", "sim_seconds", "wall_seconds")


def expand(grid: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The normalized cells of ``grid`` (a mapping, or a list of mappings whose cells are joined),
    without duplicates, in grid order."""
    grids = [grid] if isinstance(grid, Mapping) else list(grid)
    cells: dict[str, dict[str, Any]] = {}
    for one in grids:
        if not isinstance(one, Mapping):
            raise CellError(f"a grid is a mapping of dimensions, not {one!r}.")
        names = list(one)
        axes = [v if isinstance(v, list) else [v] for v in one.values()]
        for values in itertools.product(*axes):
            cell = normalize(dict(zip(names, values)))
            cells.setdefault(cell_key(cell), cell)
    return list(cells.values())


def load_grid(path: Path) -> Any:
    """A grid file: YAML or JSON, a mapping of dimensions or a list of them."""
    grid = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    if not isinstance(grid, (dict, list)):
        raise CellError(f"grid file {str(path)!r} holds {type(grid).__name__}; it must hold a mapping of dimensions.")
    return grid


def _values(text: str, kind: type = str) -> list[Any]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; ``null`` / ``none`` -> ``None``; ``on``/``off`` for booleans."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if part.lower() in ("null", "none"):
            out.append(None)
        elif kind is bool:
            if part.lower() not in ("on", "off", "true", "false"):
                raise CellError(f"{part!r} is not on/off.")
            out.append(part.lower() in ("on", "true"))
        else:
            out.append(yaml.safe_load(part) if kind is Any else kind(part))
    return out


def cell_dir(out: Path, cell: Mapping[str, Any]) -> Path:
    return Path(out) / CELLS_DIR / cell_key(cell)


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def results_rows(out: Path) -> list[dict[str, Any]]:
    """One row per cell folder of ``out``: settings, status, and the result of a finished cell."""
    rows = []
    for cell_file in sorted((Path(out) / CELLS_DIR).glob(f"*/{CELL_FILE}")):
        folder = cell_file.parent
        cell = _read_json(cell_file)
        if cell is None:
            continue
        status = _read_json(folder / STATUS_FILE) or {"status": "interrupted", "reason": "no status.json: cut short"}
        row: dict[str, Any] = {**cell, **{k: status.get(k, "") for k in STATUS_COLUMNS[1:]}}
        if has_result(folder):
            result = read_result(folder / HUB_DIR)
            for name, value in result.items():
                if name == "losses":
                    row.update({f"loss.{lang}": loss for lang, loss in value.items()})
                elif name != "method":
                    # a result named like a setting (a baseline's own `contributors`) keeps its own column
                    column = f"result_{name}" if name in row else name
                    row[column] = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value
        rows.append(row)
    return rows


def columns(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """Status, then settings (named dimensions first), then results, then ``loss.<lang>``."""
    seen = {name for row in rows for name in row}
    settings = [n for n in DIMENSIONS if n in seen] + sorted(n for n in seen if "." in n and not n.startswith("loss."))
    results = [n for n in RESULT_COLUMNS if n in seen]
    fixed = set(STATUS_COLUMNS) | set(settings) | set(results)
    losses = sorted(n for n in seen if n.startswith("loss.") and n not in fixed)
    extra = sorted(seen - fixed - set(losses))
    return [*STATUS_COLUMNS, *settings, *results, *extra, *losses]


def write_results(out: Path) -> Path:
    """``<out>/results.csv`` rebuilt from every cell folder of ``out`` (written whole, then renamed)."""
    rows = results_rows(out)
    path = Path(out) / RESULTS_FILE
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns(rows), restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    os.replace(tmp, path)
    return path


def default_jobs(cell_cpus: int = 1) -> int:
    """As many cells at once as the cores hold, each simulation's actors taking ``cell_cpus``."""
    return max(1, (os.cpu_count() or 1) // max(1, cell_cpus))


def run_sweep(cells: Sequence[Mapping[str, Any]], out: Path, *, jobs: int = 1, cell_cpus: int = 1,
              ray_address: Optional[str] = None, timeout: Optional[float] = None,
              runners: Optional[Mapping[str, Runner]] = None, progress: bool = True) -> dict[str, int]:
    """Run the cells of ``cells`` that have no result yet, ``jobs`` at a time, and keep
    ``<out>/results.csv`` up to date after each. Returns counts: ``skipped``, ``ok``, ``failed``."""
    out = Path(out)
    (out / CELLS_DIR).mkdir(parents=True, exist_ok=True)
    cells = list({cell_key(c): normalize(c) for c in cells}.values())  # one folder, one run
    todo = [c for c in cells if not has_result(cell_dir(out, c))]
    counts = {"skipped": len(cells) - len(todo), "ok": 0, "failed": 0}
    options = {"runners": runners, "cell_cpus": cell_cpus, "ray_address": ray_address, "timeout": timeout}
    bar = tqdm(total=len(cells), initial=counts["skipped"], desc="cells", unit="cell", disable=not progress)

    def done(cell: Mapping[str, Any], status: Mapping[str, Any]) -> None:
        counts["ok" if status.get("status") == "ok" else "failed"] += 1
        if status.get("status") != "ok":
            tqdm.write(f"cell {cell_key(cell)} ({cell['method']}) failed: {status.get('reason')}", file=sys.stderr)
        write_results(out)
        bar.set_postfix(failed=counts["failed"])
        bar.update(1)

    try:
        if jobs <= 1 or len(todo) <= 1:
            for cell in todo:
                done(cell, run_cell(cell, cell_dir(out, cell), **options))
        else:
            with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
                futures = {pool.submit(run_cell, cell, cell_dir(out, cell), **options): cell for cell in todo}
                pending = set(futures)
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in finished:
                        cell = futures[future]
                        try:
                            status = future.result()
                        except Exception as err:  # the worker process died: record it, go on
                            status = {"status": "failed", "reason": f"worker process died: {err!r}"}
                            write_status(cell_dir(out, cell), status)
                        done(cell, status)
    finally:
        bar.close()
        write_results(out)
    return counts


def grid_from_args(args: argparse.Namespace) -> Any:
    """The grid file's mapping(s) with the command line's dimensions laid over each."""
    grid = load_grid(args.grid) if args.grid else {}
    given = {
        "method": _values(args.method) if args.method else None,
        "seed": _values(args.seed, int) if args.seed else None,
        "contributors": _values(args.contributors, int) if args.contributors else None,
        "max_tokens": _values(args.max_tokens, int) if args.max_tokens else None,
        "clock": _values(args.clock) if args.clock else None,
        "policy": _values(args.policy) if args.policy else None,
        "lease_ttl_s": _values(args.lease_ttl_s, float) if args.lease_ttl_s else None,
        "vanish_prob": _values(args.vanish_prob, float) if args.vanish_prob else None,
        "merge": _values(args.merge, bool) if args.merge else None,
        "cpt": _values(args.cpt, bool) if args.cpt else None,
        "overrides": args.overrides or None,
    }
    for item in args.set or []:
        key, sep, text = item.partition("=")
        if not sep or "." not in key:
            raise CellError(f"`--set {item}` must read KEY=V1,V2 with a Hydra key such as train.max_steps.")
        given[key] = _values(text, Any)
    given = {k: v for k, v in given.items() if v is not None}
    grids = grid if isinstance(grid, list) else [grid]
    merged = [{**g, **given} for g in grids]
    if not all("method" in g for g in merged):
        raise CellError("no `method`: give --method or a `method` in the grid file.")
    return merged


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=Path, help="YAML/JSON grid file (a mapping of dimensions, or a list of them).")
    parser.add_argument("--out", type=Path, default=Path("runs/sweep"))
    dims = parser.add_argument_group("dimensions (comma-separated values; each replaces the grid file's)")
    dims.add_argument("--method", help="centralized, local-only, fedavg-language, fedavg-global, relay")
    dims.add_argument("--seed")
    dims.add_argument("--contributors")
    dims.add_argument("--max-tokens", help="token budget (every token trained, wasted ones included)")
    dims.add_argument("--clock", help="virtual (default) or real; federated methods only")
    dims.add_argument("--policy", help="relay: random, round-robin, least-recent, language")
    dims.add_argument("--lease-ttl-s", help="relay: lease time to live, simulated seconds")
    dims.add_argument("--vanish-prob", help="federated: chance a contributor vanishes mid-lease")
    dims.add_argument("--merge", help="relay: on, off")
    dims.add_argument("--cpt", help="relay: on, off")
    dims.add_argument("--overrides", action="append",
                      help="Hydra overrides for every cell, e.g. 'train.max_steps=10'; repeat for alternatives.")
    dims.add_argument("--set", action="append", metavar="KEY=V1,V2",
                      help="any Hydra key as a dimension (a list value needs a grid file or --overrides)")
    parser.add_argument("--jobs", type=int, help="cells at once (default: cores / --cell-cpus)")
    parser.add_argument("--cell-cpus", type=int, default=1, help="CPUs of each cell's own Ray (default 1)")
    parser.add_argument("--ray-address", help="join this Ray cluster (HOST:PORT of `ray start --head`)")
    parser.add_argument("--timeout", type=float, help="seconds a federated cell may run before it is stopped")
    parser.add_argument("--dry-run", action="store_true", help="list the cells and whether each is done")
    parser.add_argument("--no-report", action="store_true")
    args = parser.parse_args(argv)
    if args.overrides and len(args.overrides) == 1:
        args.overrides = args.overrides[0]

    try:
        cells = expand(grid_from_args(args))
    except (CellError, ValueError, OSError, yaml.YAMLError) as err:
        parser.error(str(err))
    if args.dry_run:
        for cell in cells:
            state = "done" if has_result(cell_dir(args.out, cell)) else "todo"
            print(f"{cell_key(cell)}  {state}  {json.dumps(cell, sort_keys=True)}")
        return 0
    jobs = args.jobs or (1 if args.ray_address else default_jobs(args.cell_cpus))
    counts = run_sweep(cells, args.out, jobs=jobs, cell_cpus=args.cell_cpus, ray_address=args.ray_address,
                       timeout=args.timeout)
    print(f"{len(cells)} cells: {counts['ok']} ok, {counts['skipped']} already done, {counts['failed']} failed; "
          f"table: {args.out / RESULTS_FILE}")
    if not args.no_report:
        from simulations.report import write_report

        print(f"report: {write_report(args.out)}")
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
