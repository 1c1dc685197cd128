"""One cell of a sweep: a method on one configuration and seed, run in its own folder.

A cell is a flat dict of its dimensions (see ``DIMENSIONS``); keys with a dot are Hydra keys
(``train.max_steps: 10``). ``arm`` sets nothing: it names the cell's setting, and the report groups
cells by method and arm instead of by every setting that varies (a study's arms differ in long
override strings). Its key is a short hash of its canonical JSON, so the same settings
always land in the same folder ``<out>/cells/<key>/``::

    cell.json      the cell's settings (its key included)
    status.json    how its last run ended: ok, or failed with the reason
    hub/           the hub folder of the run; hub/sim/result.json and hub/sim/trace.csv are its numbers
    flwr.log       Flower's output (federated methods)

Every cell of a seed gets the same hub secret, derived from the seed, so every method of that seed
holds out the same rows. A cell is started from an empty hub, so a run cut short reruns cleanly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import shutil
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Optional

from fedem_flwr.errors import FedemError, one_line
from fedem_flwr.hub.paths import secret_path
from fedem_flwr.hub.pseudonym import load_or_create_secret
from fedem_flwr.simulation.record import RESULT_FILE, read_result, sim_dir

APP_DIR = Path(__file__).resolve().parent.parent

BASELINES = ("centralized", "local-only")
FEDERATED = ("relay", "fedavg-language", "fedavg-global")
METHODS = BASELINES + FEDERATED

# A sweep's folder: <out>/results.csv and one <out>/cells/<key>/ folder a cell, laid out as below.
RESULTS_FILE = "results.csv"
CELLS_DIR = "cells"
CELL_FILE = "cell.json"
STATUS_FILE = "status.json"
LOG_FILE = "flwr.log"
HUB_DIR = "hub"

# The named dimensions, their Hydra keys, and the methods they apply to. A dimension that does not
# apply to a method is dropped from its cells, so a grid over relay policies runs each baseline once.
DIMENSIONS: dict[str, tuple[Optional[str], tuple[str, ...]]] = {
    "method": ("sim.method", METHODS),
    "seed": ("seed", METHODS),
    "contributors": (None, METHODS),  # num-supernodes, or the baselines' num_contributors
    "max_tokens": ("sim.max_tokens", METHODS),
    "clock": ("sim.clock", FEDERATED),
    "vanish_prob": ("sim.vanish_prob", FEDERATED),
    "policy": ("relay.policy", ("relay",)),
    "lease_ttl_s": ("relay.lease_ttl_s", ("relay",)),
    "merge": (None, ("relay",)),  # off: merge.every_accepted=null merge.every_s=null
    "cpt": ("cpt.enabled", ("relay",)),
    "overrides": (None, METHODS),  # more Hydra overrides, one shell-style string
    "arm": (None, METHODS),  # a name for the cell's setting in the report (sets nothing)
}
# Hydra groups that only some methods read; other dotted keys apply to every method.
GROUP_METHODS = {"relay": ("relay",), "merge": ("relay",), "cpt": ("relay",), "sim": FEDERATED}
DEFAULTS = {"seed": 0, "contributors": 20, "clock": "virtual"}


class CellError(FedemError, ValueError):
    """A cell's settings are not a runnable cell."""


class CellFailed(FedemError):
    """A cell ran but left no result."""


def normalize(cell: Mapping[str, Any]) -> dict[str, Any]:
    """The canonical form of a cell: defaults filled in, dimensions that do not apply to its
    method dropped, ``None`` values of named dimensions dropped (they mean the config's default)."""
    method = cell.get("method")
    if method not in METHODS:
        raise CellError(f"`method` is {method!r}; it must be one of {list(METHODS)}.")
    out: dict[str, Any] = {}
    for name, value in {**DEFAULTS, **cell}.items():
        if "." in name:
            if method in GROUP_METHODS.get(name.split(".", 1)[0], METHODS):
                out[name] = value
            continue
        if name not in DIMENSIONS:
            raise CellError(f"unknown dimension `{name}`; use one of {sorted(DIMENSIONS)} or a Hydra key such "
                            "as `train.max_steps`.")
        if value is None or value == "" or method not in DIMENSIONS[name][1]:
            continue
        out[name] = value
    if not isinstance(out.get("contributors"), int) or out["contributors"] < 1:
        raise CellError(f"`contributors` is {out.get('contributors')!r}; it must be an integer >= 1.")
    return out


def canonical_json(cell: Mapping[str, Any]) -> str:
    return json.dumps(cell, sort_keys=True, separators=(",", ":"))


def cell_key(cell: Mapping[str, Any]) -> str:
    """12 hex digits of the sha256 of the normalized cell's canonical JSON."""
    return hashlib.sha256(canonical_json(normalize(cell)).encode("utf-8")).hexdigest()[:12]


def _hydra_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def hydra_overrides(cell: Mapping[str, Any]) -> list[str]:
    """The Hydra overrides that make the config of ``cell`` (its ``overrides`` string last)."""
    cell = normalize(cell)
    out = []
    for name, value in cell.items():
        if "." in name:
            out.append(f"{name}={_hydra_value(value)}")
        elif name == "method":
            if value in FEDERATED:
                out.append(f"sim.method={value}")
        elif name == "merge":
            if not value:
                out += ["merge.every_accepted=null", "merge.every_s=null"]
        elif DIMENSIONS[name][0] is not None:
            out.append(f"{DIMENSIONS[name][0]}={_hydra_value(value)}")
    return out + shlex.split(str(cell.get("overrides", "")))


def study_secret(seed: int) -> bytes:
    """The hub secret of every cell of ``seed``: it keys the held-out split, so the cells of one
    seed are judged on the same rows."""
    return hashlib.sha256(f"fedem-study:{int(seed)}".encode("utf-8")).digest()


def fresh_hub(cell_dir: Path, seed: int) -> Path:
    """An empty hub folder holding only the study secret of ``seed``."""
    hub = (Path(cell_dir) / HUB_DIR).resolve()
    if hub.exists():
        shutil.rmtree(hub)
    hub.mkdir(parents=True)
    expected = study_secret(seed)
    if load_or_create_secret(secret_path(hub), secret=expected) != expected:
        raise CellFailed(f"the hub secret at {str(secret_path(hub))!r} is not the study's for seed {seed}.")
    return hub


def effective_ray_address(ray_address: Optional[str]) -> Optional[str]:
    """The Ray cluster cells join: ``--ray-address``, else ``$RAY_ADDRESS`` (as ``ray.init`` reads it)."""
    return ray_address or os.environ.get("RAY_ADDRESS") or None


@contextlib.contextmanager
def ray_environment(address: Optional[str]) -> Iterator[None]:
    """``RAY_ADDRESS`` set while a SuperLink starts: the simulation process it starts inherits it,
    and its ``ray.init()`` joins that cluster. Restored afterwards."""
    before = os.environ.get("RAY_ADDRESS")
    if address:
        os.environ["RAY_ADDRESS"] = address
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = before


def federation_config(cell: Mapping[str, Any], cell_cpus: int = 1, ray_address: Optional[str] = None) -> str:
    """Flower's simulation size for ``cell``. Without a cluster each cell's own Ray gets
    ``cell_cpus`` CPUs (one actor each); on a cluster Ray refuses ``num_cpus``, so none is passed."""
    parts = [f"num-supernodes={normalize(cell)['contributors']}", "client-resources-num-cpus=1"]
    if not effective_ray_address(ray_address):
        parts.append(f"init-args-num-cpus={int(cell_cpus)}")
    return " ".join(parts)


def run_federated(cell: Mapping[str, Any], cell_dir: Path, hub: Path, *, cell_cpus: int = 1,
                  ray_address: Optional[str] = None, timeout: Optional[float] = None) -> dict[str, Any]:
    """Run the app on Flower's simulation engine (its own SuperLink and FLWR_HOME in the cell)."""
    from fedem_flwr.launch.local import run_app, stop_superlink

    address = effective_ray_address(ray_address)
    flwr_home = Path(cell_dir).resolve() / "flwr"
    stop_superlink(flwr_home)  # one a killed sweep left behind
    shutil.rmtree(flwr_home, ignore_errors=True)
    overrides = " ".join(shlex.quote(o) for o in [*hydra_overrides(cell), "train.progress=false"])
    with open(Path(cell_dir) / LOG_FILE, "w", encoding="utf-8") as log_file, ray_environment(address):
        outcome = run_app(
            APP_DIR, flwr_home=flwr_home, federation_config=federation_config(cell, cell_cpus, address),
            run_config={"hub": str(hub), "overrides": overrides}, timeout=timeout,
            log_output=log_file, echo=lambda line: print(line, file=log_file, flush=True),
        )
    run = {"run_id": outcome.run_id, "status": outcome.status.get("status"),
           "details": outcome.status.get("status-details"), "seconds": round(outcome.seconds, 1),
           "timed_out": outcome.timed_out, "ray_address": address}
    (Path(cell_dir) / "run.json").write_text(json.dumps(run, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if not outcome.ok:
        raise CellFailed(f"{outcome.summary()} (see {LOG_FILE})")
    shutil.rmtree(flwr_home, ignore_errors=True)
    return read_result(hub)


def run_baseline_cell(cell: Mapping[str, Any], cell_dir: Path, hub: Path, *, cell_cpus: int = 1,
                      **_: Any) -> dict[str, Any]:
    """Run a baseline in this process on the config the cell's overrides compose."""
    import torch

    from fedem_flwr.config.loader import load_config
    from fedem_flwr.quiet import quiet_library_progress
    from fedem_flwr.simulation.baselines import run_baseline

    torch.set_num_threads(max(1, int(cell_cpus)))
    quiet_library_progress()  # the sweep's own bar is the one to watch
    cell = normalize(cell)
    cfg = load_config([*hydra_overrides(cell), f"hub.path={json.dumps(str(hub))}"])
    returned = run_baseline(cell["method"], cfg, hub, cell["contributors"])
    return read_result(hub) if (sim_dir(hub) / RESULT_FILE).is_file() else dict(returned)


Runner = Callable[..., dict]
RUNNERS: dict[str, Runner] = {**{m: run_baseline_cell for m in BASELINES}, **{m: run_federated for m in FEDERATED}}


def has_result(cell_dir: Path) -> bool:
    """A finished cell: its run ended well and left its result."""
    try:
        status = json.loads((Path(cell_dir) / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return status.get("status") == "ok" and (sim_dir(Path(cell_dir) / HUB_DIR) / RESULT_FILE).is_file()


def write_status(cell_dir: Path, status: Mapping[str, Any]) -> None:
    path = Path(cell_dir) / STATUS_FILE
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(dict(status), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def run_cell(cell: Mapping[str, Any], cell_dir: Path, *, runners: Optional[Mapping[str, Runner]] = None,
             cell_cpus: int = 1, ray_address: Optional[str] = None, timeout: Optional[float] = None) -> dict:
    """Run one cell from an empty hub; return its status (``ok`` or ``failed`` with the reason)
    merged with its result. Never raises for a failed run: the reason is recorded in status.json."""
    cell = normalize(cell)
    cell_dir = Path(cell_dir)
    cell_dir.mkdir(parents=True, exist_ok=True)
    (cell_dir / CELL_FILE).write_text(json.dumps({"key": cell_key(cell), **cell}, indent=2, sort_keys=True) + "\n",
                                      encoding="utf-8")
    (cell_dir / STATUS_FILE).unlink(missing_ok=True)
    started = time.monotonic()
    result: dict[str, Any] = {}
    try:
        hub = fresh_hub(cell_dir, cell["seed"])
        runner = (runners or RUNNERS)[cell["method"]]
        result = runner(cell, cell_dir, hub, cell_cpus=cell_cpus, ray_address=ray_address, timeout=timeout)
        if not (sim_dir(hub) / RESULT_FILE).is_file():
            raise CellFailed(f"the run left no {sim_dir(hub).name}/{RESULT_FILE} in its hub")
        status: dict[str, Any] = {"status": "ok", "reason": ""}
    except Exception as err:  # a failed cell is recorded and the sweep goes on
        result, status = {}, {"status": "failed", "reason": one_line(err)}
        (cell_dir / "error.txt").write_text(traceback.format_exc(), encoding="utf-8")
    status["cell_wall_s"] = round(time.monotonic() - started, 2)
    write_status(cell_dir, status)
    return {**result, **status}
