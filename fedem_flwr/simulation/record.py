"""What a simulation leaves in its hub folder for the sweep and the report to read: ``sim/trace.csv``
(one row per event worth plotting) and ``sim/result.json`` (the cell's final numbers).

Every method writes the same two files, so a relay, a FedAvg run and a centralized baseline are
read back, tabulated and plotted by the same code. A trace row carries the held-out losses the run
sees (``losses``) and, with a study's test split, the test losses (``test_losses``); a result's
``losses`` are the final numbers, on the split its ``final_split`` names
(``simulation.evaluation.study_fields`` lists what a study adds). On the virtual clock a row also
carries the useful lease seconds and contributor online seconds so far (``lease_s``, ``online_s``:
``simulation.utilisation``), whose ratio is the lease utilisation up to that row.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from fedem_flwr.durable import atomic_write

SIM_DIR = "sim"
TRACE_FILE = "trace.csv"
RESULT_FILE = "result.json"

# ``losses``: held-out losses as the run sees them; ``test_losses``: on the study's test split (when the
# hub keeps one), which nothing in the run reads. A row may carry either, both or neither.
TRACE_COLUMNS = ("sim_s", "wall_s", "tokens", "tokens_wasted", "bytes_moved", "leases_active", "online",
                 "lease_s", "online_s", "accepted", "rejected", "loss_mean", "losses", "test_loss_mean", "test_losses")
LOSS_COLUMNS = ("losses", "test_losses")


def sim_dir(hub: Path) -> Path:
    return Path(hub) / SIM_DIR


def mean_loss(losses: Mapping[str, float]) -> float:
    """The plain mean over languages (each language counts once, whatever its size)."""
    values = [float(v) for v in losses.values() if math.isfinite(float(v))]
    return sum(values) / len(values) if values else math.nan


@dataclass
class Counters:
    """What a simulated federation spent so far. ``tokens`` counts every token trained, wasted
    ones included; ``tokens_wasted`` those whose work never reached the hub in time (vanished,
    expired, late) -- rejected work was judged, so it is spent, not wasted. ``peer_evals`` counts the
    peer evaluations asked (``gate.peers``) and ``peer_eval_s`` the contributor seconds they took, apart
    from training; ``harmful_pushes`` the pushes of harmful contributors (``sim.harmful_share``)."""

    tokens: int = 0
    tokens_wasted: int = 0
    bytes_moved: int = 0
    accepted: int = 0
    rejected: int = 0
    leases: int = 0
    expired: int = 0
    peer_evals: int = 0
    peer_eval_s: float = 0.0
    harmful_pushes: int = 0


@dataclass
class TraceRow:
    sim_s: float
    wall_s: float
    counters: Counters
    leases_active: int = 0
    online: int = 0
    losses: dict[str, float] = field(default_factory=dict)
    test_losses: dict[str, float] = field(default_factory=dict)
    lease_s: Optional[float] = None
    online_s: Optional[float] = None

    def as_csv(self) -> dict[str, Any]:
        return {
            "sim_s": f"{self.sim_s:.1f}", "wall_s": f"{self.wall_s:.2f}", "tokens": self.counters.tokens,
            "tokens_wasted": self.counters.tokens_wasted, "bytes_moved": self.counters.bytes_moved,
            "leases_active": self.leases_active, "online": self.online,
            "lease_s": "" if self.lease_s is None else f"{self.lease_s:.3f}",
            "online_s": "" if self.online_s is None else f"{self.online_s:.3f}", "accepted": self.counters.accepted,
            "rejected": self.counters.rejected,
            "loss_mean": f"{mean_loss(self.losses):.6f}" if self.losses else "",
            "losses": _losses_json(self.losses),
            "test_loss_mean": f"{mean_loss(self.test_losses):.6f}" if self.test_losses else "",
            "test_losses": _losses_json(self.test_losses),
        }


def _losses_json(losses: Mapping[str, float]) -> str:
    return json.dumps({k: round(float(v), 6) for k, v in sorted(losses.items())}) if losses else ""


class Trace:
    """Appends rows to ``<hub>/sim/trace.csv`` (a new file per run), flushed row by row so a
    crashed run still leaves its curve."""

    def __init__(self, hub: Path) -> None:
        path = sim_dir(hub) / TRACE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = open(path, "w", newline="", encoding="utf-8")
        self._writer = csv.DictWriter(self._file, fieldnames=TRACE_COLUMNS)
        self._writer.writeheader()
        self.started = time.monotonic()

    def row(self, sim_s: float, counters: Counters, *, leases_active: int = 0, online: int = 0,
            losses: Optional[Mapping[str, float]] = None, test_losses: Optional[Mapping[str, float]] = None,
            lease_s: Optional[float] = None, online_s: Optional[float] = None) -> None:
        row = TraceRow(sim_s, time.monotonic() - self.started, counters, leases_active, online, dict(losses or {}),
                       dict(test_losses or {}), lease_s, online_s)
        self._writer.writerow(row.as_csv())
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_trace(hub: Path) -> list[dict[str, Any]]:
    """The rows of a trace with numbers as numbers and ``losses`` / ``test_losses`` as dicts (a trace
    written before test splits, or before lease time was measured, lacks those columns: they read as
    nan and empty)."""
    path = sim_dir(hub) / TRACE_FILE
    rows = []
    with open(path, newline="", encoding="utf-8") as handle:
        for raw in csv.DictReader(handle):
            row: dict[str, Any] = {k: (float(v) if v not in ("", None) else math.nan)
                                   for k, v in raw.items() if k not in LOSS_COLUMNS}
            for name in ("test_loss_mean", "lease_s", "online_s"):
                row.setdefault(name, math.nan)
            for name in LOSS_COLUMNS:
                row[name] = json.loads(raw[name]) if raw.get(name) else {}
            rows.append(row)
    return rows


def write_result(hub: Path, *, method: str, losses: Mapping[str, float], counters: Counters,
                 sim_seconds: Optional[float], wall_seconds: float, extra: Optional[Mapping[str, Any]] = None) -> Path:
    """``<hub>/sim/result.json``, written whole then renamed, so a reader never sees half of it."""
    result = {
        "method": method,
        "losses": {k: float(v) for k, v in sorted(losses.items())},
        "loss_mean": mean_loss(losses),
        **asdict(counters),
        "sim_seconds": sim_seconds,
        "wall_seconds": wall_seconds,
        **dict(extra or {}),
    }
    path = sim_dir(hub) / RESULT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w") as out:
        out.write(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return path


def read_result(hub: Path) -> dict[str, Any]:
    return json.loads((sim_dir(hub) / RESULT_FILE).read_text(encoding="utf-8"))
