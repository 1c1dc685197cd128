"""A simulated month of the relay: does the hub stay flat while it keeps publishing?

The app's own relay simulation on the virtual clock (``run_simulation``, as the ServerApp runs
``sim.clock=virtual``: the real hub, relay Strategy, blind gate, merges, CPT and ClientApps truly
fine-tuning seshu-tiny) on an in-process Grid, for ``--days`` simulated days: ``--contributors``
virtual contributors online part of each day (``sim.availability=daily``), 5% of leases vanishing,
merges every ``--merge-every`` accepted contributions, CPT at ``--cpt-speed`` steps a simulated
second, and the local store's retention (``hub.retention.bases`` / ``adapter_versions``).

At the end of every simulated day (counted from the hub's start) the script reads, in the hub's own
process: the bytes in the artifact store and in the private state (``optimizer/``, ``cpt/``), the
registry's size (its pages in use as a reader sees them, the WAL's committed pages included; its file
and WAL on disk are shown too) and its bytes per lease so far, the process's resident memory (the
hub and, in-process, the ClientApps: bounded caches), the scheduler's time per lease (time in
``RelayCoordinator.assign`` over the leases it issued that day), the judging time per push (time in
``RelayCoordinator.receive_push`` over its calls that day), the day's accepted and rejected
contributions, published merges and CPT bases, and the versions retention has pruned so far. It
observes through a subclass of the base keeper (its ``turn`` runs between relay loop turns) and
timers on the coordinator's two methods; the simulation code itself is unchanged.

Goals (the first week is days 1-7, the last week the last 7 days; with fewer than 14 days, the first
and second halves):
- after retention starts, store + private state and RSS stay within 10% of their first-week level
  (the first week's highest), every day after the first week;
- the registry grows by at most 2 KB per lease (from the end of day 1 to the end);
- the scheduler's CPU time per lease and the judging CPU time per push do not grow: the last week's
  median within 25% of the first week's (CPU time: on a shared machine wall time mostly measures the
  neighbours).
The workload is checked too: at least one published merge a simulated day and 50 accepted
contributions every full day, more base versions and adapter versions than retention keeps.

    python benchmarks/soak.py                              # 30 simulated days (about 22 minutes here)
    python benchmarks/soak.py --days 2 --out /tmp/soak     # shorter, keep the hub
    python benchmarks/soak.py --save benchmarks/soak_baseline.json
    python benchmarks/soak.py --compare benchmarks/soak_baseline.json   # exit 1 on a regression

Compare runs of one setup: a shorter run's sizes and medians are not a month's (the script says so when
the baseline's setup differs). Should the simulation's own final study (after the last sample) fail, the
script reports it: the days were sampled before. (The month in the baseline failed there reading a
merge's parent base that retention had pruned; merge events now leave such merges out.)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: simulations, tests.support

import psutil
import torch
from baseline import print_aligned, regressions

from fedem_flwr.client_app import app as client_app
from fedem_flwr.config.loader import load_run_config
from fedem_flwr.hub.paths import CPT_DIR, OPTIMIZER_DIR, REGISTRY_FILE, STORE_DIR
from fedem_flwr.relay import keeper as keeper_module
from fedem_flwr.simulation import run as run_module
from simulations.cells import fresh_hub
from tests.support.fake_grid import InProcessGrid

DAY_S = 86400.0
FLAT = 0.10  # store + private state and RSS: within 10% of the first week's level
REGISTRY_BYTES_PER_LEASE = 2048
GROWTH = 0.25  # per-lease and per-push CPU time: the last week's median within 25% of the first week's
MIN_ACCEPTED_A_DAY = 50
MIN_MERGES_A_DAY = 1.0
# Compared with --compare: (unit, higher is better).
METRICS = {
    "store_private_mb_last": ("MB", False), "rss_mb_last": ("MB", False),
    "registry_bytes_per_lease": ("B", False), "assign_cpu_us_per_lease": ("us", False),
    "judge_cpu_ms_per_push": ("ms", False), "wall_s_per_day": ("s", False),
}


@dataclass
class Day:
    """One simulated day's numbers (sizes at its end, times and counts within it)."""

    day: int
    sim_days: float  # simulated days at the sample (a partial last day: less than ``day``)
    wall_s: float
    leases: int
    pushes: int
    accepted: int
    rejected: int
    merges: int
    cpt_bases: int
    bases_kept: int
    pruned: int
    store_mb: float
    private_mb: float
    registry_kb: float  # the database's pages in use (committed, WAL included), without free pages
    registry_files_kb: float  # its file and its WAL on disk (the WAL keeps its size between checkpoints)
    registry_b_per_lease: float
    rss_mb: float
    assign_us: float
    assign_cpu_us: float
    judge_ms: float
    judge_cpu_ms: float
    keeper_s: float

    @property
    def kept_mb(self) -> float:
        return self.store_mb + self.private_mb


@dataclass
class _Spent:
    """Calls and seconds (wall, CPU) spent in one method since the last sample."""

    calls: int = 0
    items: int = 0
    wall: float = 0.0
    cpu: float = 0.0

    def take(self) -> _Spent:
        taken = _Spent(self.calls, self.items, self.wall, self.cpu)
        self.calls = self.items = 0
        self.wall = self.cpu = 0.0
        return taken


@dataclass
class Sampler:
    """Reads the hub at every simulated day's end; told by the keeper's turns."""

    hub: Any = None
    start: float = 0.0
    days: list[Day] = field(default_factory=list)
    assign: _Spent = field(default_factory=_Spent)
    judge: _Spent = field(default_factory=_Spent)
    keeper_s: float = 0.0
    leases: int = 0
    versions: int | None = None  # adapter versions in the registry at the last sample
    on_day: Callable[[Day], None] | None = None
    _wall: float = field(default_factory=time.monotonic)
    _counts: dict[str, int] = field(default_factory=dict)

    def attach(self, hub: Any, now: float) -> None:
        self.hub, self.start, self._wall = hub, now, time.monotonic()
        self._counts = self._registry_counts()
        coordinator = hub.coordinator
        coordinator.assign = self._timed(coordinator.assign, self.assign, count=len)
        coordinator.receive_push = self._timed(coordinator.receive_push, self.judge)

    @staticmethod
    def _timed(call: Callable[..., Any], spent: _Spent, count: Callable[[Any], int] | None = None
               ) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            wall, cpu = time.perf_counter(), time.process_time()
            result = call(*args, **kwargs)
            spent.wall += time.perf_counter() - wall
            spent.cpu += time.process_time() - cpu
            spent.calls += 1
            spent.items += count(result) if count is not None else 1
            return result

        return timed

    def due(self, now: float) -> bool:
        return now - self.start >= (len(self.days) + 1) * DAY_S

    def sample(self, now: float) -> Day:
        counts = self._registry_counts()
        delta = {key: counts[key] - self._counts.get(key, 0) for key in counts}
        self._counts, self.versions = counts, counts["versions"]
        assign, judge = self.assign.take(), self.judge.take()
        self.leases += assign.items
        path = Path(self.hub.path)
        reg_bytes = registry_bytes(path / REGISTRY_FILE)
        reg_files = sum(_size(path / f"{REGISTRY_FILE}{suffix}") for suffix in ("", "-wal"))
        wall = time.monotonic()
        day = Day(
            day=len(self.days) + 1, sim_days=round((now - self.start) / DAY_S, 3),
            wall_s=round(wall - self._wall, 1), leases=assign.items, pushes=judge.calls,
            accepted=delta["accepted"], rejected=delta["rejected"], merges=delta["merge"],
            cpt_bases=delta["cpt"], bases_kept=counts["bases_kept"], pruned=counts["pruned"],
            store_mb=_mb(_tree_bytes(path / STORE_DIR)),
            private_mb=_mb(_tree_bytes(path / OPTIMIZER_DIR) + _tree_bytes(path / CPT_DIR)),
            registry_kb=round(reg_bytes / 1024, 1), registry_files_kb=round(reg_files / 1024, 1),
            registry_b_per_lease=round(reg_bytes / self.leases, 1) if self.leases else math.nan,
            rss_mb=round(psutil.Process().memory_info().rss / 2**20, 1),
            assign_us=_per(assign.wall * 1e6, assign.items), assign_cpu_us=_per(assign.cpu * 1e6, assign.items),
            judge_ms=_per(judge.wall * 1e3, judge.calls), judge_cpu_ms=_per(judge.cpu * 1e3, judge.calls),
            keeper_s=round(self.keeper_s, 1),
        )
        self._wall, self.keeper_s = wall, 0.0
        self.days.append(day)
        if self.on_day is not None:
            self.on_day(day)
        return day

    def _registry_counts(self) -> dict[str, int]:
        registry = self.hub.registry
        decisions = registry.contribution_counts()
        checkpoints = registry.checkpoints()
        versions = registry.adapter_versions()
        return {
            "accepted": decisions.get("accepted", 0),
            "rejected": sum(n for decision, n in decisions.items() if decision != "accepted"),
            "merge": sum(c.source == "merge" for c in checkpoints),
            "cpt": sum(c.source == "cpt" for c in checkpoints),
            "bases_kept": sum(c.pruned is None for c in checkpoints),
            "pruned": sum(c.pruned is not None for c in checkpoints) + sum(v.pruned is not None for v in versions),
            "versions": len(versions),
        }


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def registry_bytes(path: Path) -> int:
    """The registry's size as SQLite sees it from a reader (committed pages, the WAL's included), less
    its free pages: what the data takes, whatever the WAL file's size between checkpoints."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        pages, free, size = (conn.execute(f"PRAGMA {name}").fetchone()[0]
                             for name in ("page_count", "freelist_count", "page_size"))
    finally:
        conn.close()
    return (pages - free) * size


def _tree_bytes(root: Path) -> int:
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            total += _size(Path(folder) / name)
    return total


def _mb(n: int) -> float:
    return round(n / 2**20, 2)


def _per(total: float, n: int) -> float:
    return round(total / n, 3) if n else math.nan


def keeper_class(sampler: Sampler) -> type:
    """The base keeper, sampling the hub at each simulated day's end (its ``turn`` runs between relay
    loop turns, on the virtual clock) and once more at the end of the run for a partial last day."""

    class SoakKeeper(keeper_module.BaseKeeper):
        def __init__(self, hub: Any, clock: Callable[[], float] = time.time, **kwargs: Any) -> None:
            super().__init__(hub, clock, **kwargs)
            sampler.attach(hub, clock())

        def turn(self, busy: bool) -> None:
            started = time.monotonic()
            super().turn(busy)
            sampler.keeper_s += time.monotonic() - started
            now = self.clock()
            if sampler.due(now):
                sampler.sample(now)

        def finish(self) -> None:
            super().finish()
            now = self.clock()
            if not sampler.days or (now - sampler.start) / DAY_S - sampler.days[-1].sim_days > 0.01:
                sampler.sample(now)

    return SoakKeeper


@contextlib.contextmanager
def observed(sampler: Sampler) -> Iterator[None]:
    """``run_simulation`` with the sampling keeper, for the block."""
    original = run_module.BaseKeeper
    run_module.BaseKeeper = keeper_class(sampler)
    try:
        yield
    finally:
        run_module.BaseKeeper = original


def overrides_of(args: argparse.Namespace) -> str:
    retention = (f"hub.retention.bases={_null(args.retention_bases)} "
                 f"hub.retention.adapter_versions={_null(args.retention_versions)}")
    return " ".join(f"""
        seed={args.seed} data.languages=[{args.languages}] sim.clock=virtual train.progress=false
        sim.availability=daily sim.vanish_prob={args.vanish} sim.speed={args.speed}
        train.max_steps={args.steps} train.batch_size={args.batch} train.lr={args.lr}
        gate.max_eval_blocks={args.eval_blocks}
        merge.every_accepted={args.merge_every} cpt.enabled=true sim.hub_cpt_speed={args.cpt_speed}
        cpt.checkpoint_every={args.cpt_every} relay.max_wall_s={args.days * DAY_S:.0f} {retention}
        {args.overrides}""".split())


def _null(value: int | None) -> str:
    return "null" if value is None else str(value)


def _int_or_null(text: str) -> int | None:
    return None if text.lower() in ("null", "none", "") else int(text)


def simulate(args: argparse.Namespace, folder: Path) -> tuple[Sampler, dict[str, Any], float]:
    hub = fresh_hub(folder, args.seed)
    run_config = {"overrides": overrides_of(args), "hub": str(hub)}
    n = args.contributors
    grid = InProcessGrid(client_app, {100 + i: {"partition-id": i, "num-partitions": n,
                                                "cache-dir": str(folder / "caches" / f"node-{i}")} for i in range(n)},
                         run_config)
    grid.delivered = _Dropped()  # the test Grid keeps every message it delivered; not the hub's memory
    sampler = Sampler(on_day=lambda day: print_day(day, header=day is sampler.days[0]))
    started = time.monotonic()
    with observed(sampler):
        try:
            result = run_module.run_simulation(grid, load_run_config(run_config), hub)
        except Exception as err:  # after the relay: the days were sampled, the run's final study failed
            if not sampler.days or sampler.days[-1].sim_days < args.days - 0.01:
                raise
            logging.getLogger(__name__).exception("The simulation's final study failed")
            result = {"stopped_by": "the relay's time limit", "final_study_error": f"{type(err).__name__}: {err}"}
    return sampler, result, time.monotonic() - started


class _Dropped(list):
    """A list that keeps nothing appended to it."""

    def append(self, item: Any) -> None:
        pass


def print_day(d: Day, header: bool) -> None:
    if header:
        print(f"{'day':>5} {'wall s':>6} {'leases':>6} {'acc':>4} {'rej':>4} {'mrg':>3} {'cpt':>3} {'bases':>5} "
              f"{'pruned':>6} {'store MB':>8} {'priv MB':>7} {'reg KB':>7} {'file KB':>7} {'B/lease':>7} {'RSS MB':>7} "
              f"{'assign us':>9} {'cpu us':>7} {'judge ms':>8} {'cpu ms':>7} {'keeper s':>8}")
    print(f"{d.sim_days:>5.4g} {d.wall_s:>6.0f} {d.leases:>6} {d.accepted:>4} {d.rejected:>4} {d.merges:>3} "
          f"{d.cpt_bases:>3} {d.bases_kept:>5} {d.pruned:>6} {d.store_mb:>8.2f} {d.private_mb:>7.2f} "
          f"{d.registry_kb:>7.0f} {d.registry_files_kb:>7.0f} {d.registry_b_per_lease:>7.0f} {d.rss_mb:>7.1f} "
          f"{d.assign_us:>9.0f} {d.assign_cpu_us:>7.0f} {d.judge_ms:>8.1f} {d.judge_cpu_ms:>7.1f} {d.keeper_s:>8.1f}",
          flush=True)


def weeks(days: list[Day]) -> tuple[list[Day], list[Day]]:
    """The first and the last week (or halves, with fewer than 14 days)."""
    n = 7 if len(days) >= 14 else max(1, len(days) // 2)
    return days[:n], days[-n:]


def goals(days: list[Day], args: argparse.Namespace, versions: int | None = None) -> dict[str, Any]:
    """Each goal's verdict and its numbers (``versions``: the adapter versions the registry holds at the end)."""
    full = [d for d in days if d.sim_days >= d.day]  # whole days; a partial last one only for sizes
    first, last = weeks(full or days)
    later = [d for d in days if d.day > first[-1].day]
    started = next((d.day for d in days if d.pruned), None)
    out: dict[str, Any] = {"retention_started_day": started}
    for name, value in (("store_private_mb", Day.kept_mb.fget), ("rss_mb", lambda d: d.rss_mb)):
        level = max(value(d) for d in first)
        worst = max(later, key=value, default=None)
        ratio = value(worst) / level if worst is not None and level else None
        out[name] = {"first_week_level": round(level, 2), "worst_after": round(value(worst), 2) if worst else None,
                     "worst_day": worst.day if worst else None, "last": round(value(days[-1]), 2),
                     "ratio": round(ratio, 3) if ratio is not None else None,
                     "pass": ratio is not None and started is not None and ratio <= 1 + FLAT}
    one = days[0]
    leases = sum(d.leases for d in days[1:])
    grown = (days[-1].registry_kb - one.registry_kb) * 1024
    per = grown / leases if leases else None
    out["registry"] = {"bytes_day_1": round(one.registry_kb * 1024), "bytes_last": round(days[-1].registry_kb * 1024),
                       "leases_after_day_1": leases, "bytes_per_lease": round(per, 1) if per is not None else None,
                       "pass": per is not None and per <= REGISTRY_BYTES_PER_LEASE}
    for name, key in (("assign_cpu_us_per_lease", "assign_cpu_us"), ("judge_cpu_ms_per_push", "judge_cpu_ms")):
        before = _median([getattr(d, key) for d in first])
        after = _median([getattr(d, key) for d in last])
        ratio = after / before if before else None
        out[name] = {"first_week_median": before, "last_week_median": after,
                     "ratio": round(ratio, 3) if ratio is not None else None,
                     "pass": ratio is not None and ratio <= 1 + GROWTH}
    merges = sum(d.merges for d in days)
    span = days[-1].sim_days
    bases = 1 + merges + sum(d.cpt_bases for d in days)
    per_adapter = versions / len(args.languages.split(",")) if versions is not None else None
    out["workload"] = {
        "merges": merges, "merges_needed": math.ceil(MIN_MERGES_A_DAY * span),
        "min_accepted_a_day": min((d.accepted for d in full), default=None),
        "accepted": sum(d.accepted for d in days), "rejected": sum(d.rejected for d in days),
        "leases": sum(d.leases for d in days), "bases_published": bases,
        "adapter_versions_per_adapter": round(per_adapter, 1) if per_adapter is not None else None,
        "pass": (merges >= MIN_MERGES_A_DAY * span and bool(full)
                 and min(d.accepted for d in full) >= MIN_ACCEPTED_A_DAY
                 and (args.retention_bases is None or bases > args.retention_bases)
                 and (args.retention_versions is None or (per_adapter or 0) > args.retention_versions)),
    }
    return out


def _median(values: list[float]) -> float | None:
    values = [v for v in values if math.isfinite(v)]
    return round(statistics.median(values), 3) if values else None


def results_of(days: list[Day], checks: dict[str, Any], wall: float) -> dict[str, float]:
    """The numbers ``--compare`` compares."""
    _, last = weeks([d for d in days if d.sim_days >= d.day] or days)
    return {
        "store_private_mb_last": round(days[-1].kept_mb, 2), "rss_mb_last": days[-1].rss_mb,
        "registry_bytes_per_lease": checks["registry"]["bytes_per_lease"] or 0.0,
        "assign_cpu_us_per_lease": _median([d.assign_cpu_us for d in last]) or 0.0,
        "judge_cpu_ms_per_push": _median([d.judge_cpu_ms for d in last]) or 0.0,
        "wall_s_per_day": round(wall / max(days[-1].sim_days, 1e-9), 1),
    }


def print_goals(checks: dict[str, Any]) -> None:
    def verdict(ok: bool) -> str:
        return "pass" if ok else "FAIL"

    started = checks["retention_started_day"]
    print(f"\nretention started (first version pruned) on day {started}" if started is not None
          else "\nretention never pruned a version")
    for name, label in (("store_private_mb", "store + private state MB"), ("rss_mb", "RSS MB")):
        c = checks[name]
        print(f"{label}: first-week level {c['first_week_level']}, worst after it {c['worst_after']} (day "
              f"{c['worst_day']}, x{c['ratio']}), last {c['last']} (goal <= x{1 + FLAT:g}): {verdict(c['pass'])}")
    c = checks["registry"]
    print(f"registry: {c['bytes_day_1']} B after day 1 -> {c['bytes_last']} B, {c['leases_after_day_1']} leases: "
          f"{c['bytes_per_lease']} B a lease (goal <= {REGISTRY_BYTES_PER_LEASE}): {verdict(c['pass'])}")
    for name, label in (("assign_cpu_us_per_lease", "scheduler CPU us a lease"),
                        ("judge_cpu_ms_per_push", "judging CPU ms a push")):
        c = checks[name]
        print(f"{label}: first week median {c['first_week_median']}, last week {c['last_week_median']} "
              f"(x{c['ratio']}, goal <= x{1 + GROWTH:g}): {verdict(c['pass'])}")
    w = checks["workload"]
    print(f"workload: {w['merges']} merges published (needed {w['merges_needed']}), at least {w['min_accepted_a_day']} "
          f"accepted every full day (needed {MIN_ACCEPTED_A_DAY}), {w['bases_published']} bases published, "
          f"{w['adapter_versions_per_adapter']} versions an adapter, "
          f"{w['accepted']} accepted / {w['rejected']} rejected of {w['leases']} leases: {verdict(w['pass'])}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--days", type=float, default=30.0, help="simulated days")
    parser.add_argument("--contributors", type=int, default=100)
    parser.add_argument("--languages", default="en,fa,uk,ja,it,ko",
                        help="data.languages (default: the six largest corpora, enough text for a month of pushes)")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps a lease (train.max_steps)")
    parser.add_argument("--batch", type=int, default=4, help="train.batch_size")
    parser.add_argument("--lr", type=float, default=3e-4,
                        help="train.lr (3e-4: the relay keeps finding improvements for a month; at the default "
                             "1e-2 the adapters stall within 2 days, at 1e-3 within 2 weeks, and few pushes pass)")
    parser.add_argument("--speed", type=float, default=0.0006,
                        help="median steps a simulated second (0.0006: a 2-step lease takes about 55 min)")
    parser.add_argument("--vanish", type=float, default=0.05, help="chance a lease's contributor vanishes")
    parser.add_argument("--eval-blocks", type=int, default=16, help="gate.max_eval_blocks")
    parser.add_argument("--merge-every", type=int, default=20, help="merge.every_accepted")
    parser.add_argument("--cpt-speed", type=float, default=0.0002,
                        help="sim.hub_cpt_speed: CPT steps a simulated second (0.0002: 17 a day)")
    parser.add_argument("--cpt-every", type=int, default=20, help="cpt.checkpoint_every: steps between CPT gates")
    parser.add_argument("--retention-bases", type=_int_or_null, default=3, help="hub.retention.bases (null: all)")
    parser.add_argument("--retention-versions", type=_int_or_null, default=3,
                        help="hub.retention.adapter_versions (null: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overrides", default="", help="more Hydra overrides")
    parser.add_argument("--out", type=Path, help="the run's folder (hub, node caches); default: a temporary one")
    parser.add_argument("--save", type=Path, help="write the setup, days, goals and numbers as JSON")
    parser.add_argument("--compare", type=Path, help="compare with a saved JSON; exit 1 on a regression")
    parser.add_argument("--tolerance", type=float, default=0.3, help="allowed fraction worse than the baseline")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # reproducible and fair on a shared machine
    logging.getLogger("fedem_flwr").setLevel(logging.WARNING)
    print(f"overrides: {overrides_of(args)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="fedem-soak-") as tmp:
        folder = (args.out or Path(tmp)).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        sampler, result, wall = simulate(args, folder)
    days = sampler.days
    checks = goals(days, args, sampler.versions)
    results = results_of(days, checks, wall)
    print_goals(checks)
    print(f"\n{days[-1].sim_days:g} simulated days in {wall:.0f} s ({wall / 60:.1f} min); stopped by "
          f"{result.get('stopped_by')}; machine {platform.machine()}, {os.cpu_count()} cores")
    if result.get("final_study_error"):
        print(f"the simulation's final study (after the last sample) failed: {result['final_study_error']}")
    summary = {"goals": {name: c.get("pass") for name, c in checks.items() if isinstance(c, dict)},
               "results": results, "wall_s": round(wall, 1)}
    print(json.dumps(summary, indent=2, sort_keys=True))

    failed: list[str] = []
    if args.compare:
        baseline = json.loads(args.compare.read_text())
        setup = baseline.get("setup", {})
        if setup.get("days") != args.days or setup.get("overrides") != overrides_of(args):
            print(f"\nnote: the baseline ran another setup ({setup.get('days')} days; {setup.get('overrides')}): "
                  "sizes and medians compare like with like only on the same setup")
        rows = [["measure", "baseline", "now"]] + [[key, baseline["results"].get(key), value]
                                                   for key, value in results.items()]
        print()
        print_aligned(rows)
        failed = regressions(results, baseline, METRICS, args.tolerance, fmt=",.3f")
        for line in failed:
            print(f"REGRESSION {line}")
    if args.save:
        args.save.write_text(json.dumps({
            "setup": {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()
                      if key not in ("save", "compare", "out")} | {"overrides": overrides_of(args)},
            "days": [asdict(d) for d in days], "goals": checks, "results": results, "wall_s": round(wall, 1),
            "final_study_error": result.get("final_study_error"),
        }, indent=2, sort_keys=True) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
