"""Run a grid of simulated federations and baselines, several cells at once, resumably.

    fedem sim sweep --method relay,fedavg-language,centralized --seed 0,1,2 \\
        --contributors 20 --max-tokens 200000 --overrides "train.max_steps=10" --out runs/sweep
    fedem sim sweep --grid grid.yaml --out runs/sweep --jobs 2
    fedem sim sweep --grid grid.yaml --out runs/sweep --ray-address HEAD_IP:6379

The grid is the cartesian product of its dimensions (a list is a dimension, a scalar a fixed
setting; options on the command line replace the grid file's). Each cell runs in
``<out>/cells/<key>/``, keyed by the hash of its settings; a cell that already has its result is
not run again, so rerunning the same command resumes a sweep. ``<out>/results.csv`` holds one row
per cell of ``<out>`` (settings, status, result, ``loss.<lang>`` columns) and ``<out>/report.md``
with its plots summarises it (``fedem sim report``).
"""

from __future__ import annotations

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

from fedem_flwr.simulation.record import read_result
from simulations.cells import (
    CELL_FILE,
    CELLS_DIR,
    DIMENSIONS,
    HUB_DIR,
    RESULTS_FILE,
    STATUS_FILE,
    CellError,
    Runner,
    cell_key,
    has_result,
    normalize,
    run_cell,
    write_status,
)

STATUS_COLUMNS = ("key", "status", "reason", "cell_wall_s")
RESULT_COLUMNS = ("final_split", "loss_mean", "base_loss_mean", "heldout_loss_mean", "tokens", "tokens_wasted",
                  "bytes_moved", "accepted", "rejected", "merge_attempts", "merge_published", "leases", "expired",
                  "sim_seconds", "wall_seconds")


# The named dimensions the command line takes, and how each parses its comma-separated values.
OPTION_KINDS: dict[str, Any] = {"method": str, "seed": int, "contributors": int, "max_tokens": int, "clock": str,
                                "policy": str, "lease_ttl_s": float, "vanish_prob": float, "merge": bool, "cpt": bool}


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
    """A grid file: YAML or JSON, a mapping of dimensions or a list of them; or a mapping whose
    ``grids`` holds that list beside ``x-...`` keys, which only hold YAML anchors (shared settings
    defined once, merged into the grids with ``<<: *name``) and are otherwise ignored."""
    try:
        grid = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise CellError(f"grid file {str(path)!r} is not valid YAML: {err}") from err
    if isinstance(grid, dict) and "grids" in grid:
        other = sorted(k for k in grid if k != "grids" and not str(k).startswith("x-"))
        if other or not isinstance(grid["grids"], list):
            raise CellError(f"grid file {str(path)!r} has `grids`: it must be a list of grids, beside only `x-...` "
                            f"keys (anchors){'; found ' + ', '.join(map(str, other)) if other else ''}.")
        grid = grid["grids"]
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


def grid_from_options(grid_file: Optional[Path], dimensions: Mapping[str, Optional[str]],
                      settings: Sequence[str] = (), overrides: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The grid file's mapping(s) with the command line's dimensions laid over each.

    ``dimensions`` maps a named dimension to its comma-separated values (None: not given);
    ``settings`` are ``KEY=V1,V2`` with a Hydra key; one ``overrides`` string applies to every cell,
    several are alternatives (a dimension).
    """
    grid = load_grid(grid_file) if grid_file else {}
    given: dict[str, Any] = {}
    for name, text in dimensions.items():
        if name not in OPTION_KINDS:
            raise CellError(f"unknown dimension `{name}`; the command line takes {sorted(OPTION_KINDS)}.")
        try:
            if text:
                given[name] = _values(text, OPTION_KINDS[name])
        except ValueError as err:
            raise CellError(f"`--{name.replace('_', '-')} {text}`: {err}") from err
    if overrides:
        given["overrides"] = overrides[0] if len(overrides) == 1 else list(overrides)
    for item in settings:
        key, sep, text = item.partition("=")
        if not sep or "." not in key:
            raise CellError(f"`--set {item}` must read KEY=V1,V2 with a Hydra key such as train.max_steps.")
        given[key] = _values(text, Any)
    grids = grid if isinstance(grid, list) else [grid]
    merged = [{**g, **given} for g in grids]
    if not all("method" in g for g in merged):
        raise CellError("no `method`: give --method or a `method` in the grid file.")
    return merged


def describe(cells: Sequence[Mapping[str, Any]], out: Path) -> list[dict[str, Any]]:
    """Each cell's key, whether ``out`` already holds its result, and its settings (a dry run)."""
    return [{"key": cell_key(cell), "done": has_result(cell_dir(out, cell)), "cell": dict(cell)} for cell in cells]
