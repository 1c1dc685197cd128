"""The report of a sweep: a Markdown table per method (and every other setting that varies), mean
± standard deviation over seeds, and plots of its traces.

    fedem sim report runs/sweep

Reads ``<out>/results.csv`` and the traces of its cells (``cells/<key>/hub/sim/trace.csv``) and
writes ``<out>/report.md`` with ``loss_vs_tokens.png``, ``loss_vs_sim_time.png`` and
``lease_utilisation.png`` beside it.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedem_flwr.simulation.record import read_trace  # noqa: E402
from simulations.cells import CELLS_DIR, DIMENSIONS, HUB_DIR, RESULTS_FILE  # noqa: E402

REPORT_FILE = "report.md"
# (column, heading, digits) of the main table
METRICS = (("loss_mean", "held-out loss (mean)", 3), ("tokens", "tokens trained", 0),
           ("tokens_wasted", "tokens wasted", 0), ("bytes_moved", "MB moved", 1), ("accepted", "accepted", 1),
           ("rejected", "rejected", 1), ("sim_seconds", "simulated h", 2), ("wall_seconds", "wall s", 0))
SCALE = {"bytes_moved": 1e-6, "sim_seconds": 1 / 3600}
GRID_POINTS = 50


def _number(text: Any) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def read_rows(out: Path) -> list[dict[str, str]]:
    with open(Path(out) / RESULTS_FILE, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def setting_columns(rows: Sequence[Mapping[str, str]]) -> list[str]:
    """Columns that describe a cell: named dimensions and Hydra keys (not its key, status or losses)."""
    names = rows[0].keys() if rows else []
    return [n for n in names if n in DIMENSIONS or ("." in n and not n.startswith("loss."))]


def group_by(rows: Sequence[Mapping[str, str]]) -> tuple[list[str], dict[tuple, list[Mapping[str, str]]]]:
    """Group the rows by method and every other setting that takes two values or more within one
    method (unset, the config's default, counts as a value there; a setting only some methods have
    does not split the others), seeds pooled."""
    settings = [n for n in setting_columns(rows) if n not in ("method", "seed")]
    methods = {row["method"] for row in rows}
    varying = [n for n in settings
               if any(len({row.get(n, "") for row in rows if row["method"] == method}) > 1 for method in methods)]
    groups: dict[tuple, list[Mapping[str, str]]] = {}
    for row in rows:
        groups.setdefault((row["method"], *(row.get(n, "") for n in varying)), []).append(row)
    return varying, groups


def label(varying: Sequence[str], key: tuple) -> str:
    parts = [key[0]] + [f"{name}={value}" for name, value in zip(varying, key[1:]) if value != ""]
    return ", ".join(parts)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def cell_text(values: Sequence[float], digits: int) -> str:
    mean, std = mean_std(values)
    if not math.isfinite(mean):
        return "-"
    return f"{mean:,.{digits}f} ± {std:,.{digits}f}" if len(values) > 1 else f"{mean:,.{digits}f}"


def tables(rows: Sequence[Mapping[str, str]]) -> str:
    """The Markdown tables: totals per group, then the held-out loss per language per group."""
    ok = [r for r in rows if r.get("status") == "ok"]
    varying, groups = group_by(ok)
    lines = ["| method | seeds | " + " | ".join(h for _, h, _ in METRICS) + " |",
             "| --- | ---: |" + " ---: |" * len(METRICS)]
    for key, members in groups.items():
        cells = [cell_text([_number(m.get(c)) * SCALE.get(c, 1.0) for m in members], d) for c, _, d in METRICS]
        lines.append(f"| {label(varying, key)} | {len(members)} | " + " | ".join(cells) + " |")
    languages = sorted({n[len("loss."):] for r in ok for n in r if n.startswith("loss.") and r[n] != ""})
    if languages:
        lines += ["", "Held-out loss per language (nats per token):", "",
                  "| method | " + " | ".join(languages) + " |", "| --- |" + " ---: |" * len(languages)]
        for key, members in groups.items():
            cells = [cell_text([_number(m.get(f"loss.{lang}")) for m in members], 3) for lang in languages]
            lines.append(f"| {label(varying, key)} | " + " | ".join(cells) + " |")
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        lines += ["", f"{len(failed)} cell(s) without a result:", ""]
        lines += [f"- `{r['key']}` {r['method']} seed {r.get('seed', '')}: {r.get('status')} {r.get('reason', '')}"
                  for r in failed]
    return "\n".join(lines) + "\n"


Curve = tuple[list[float], list[float]]


def curves(out: Path, members: Sequence[Mapping[str, str]], x: str, y: str,
           ratio_of: Optional[str] = None) -> list[Curve]:
    """(x, y) of each member's trace (y divided by ``ratio_of`` if given), rows where both are
    finite, sorted by x."""
    found = []
    for member in members:
        try:
            trace = read_trace(Path(out) / CELLS_DIR / member["key"] / HUB_DIR)
        except (OSError, ValueError, KeyError):
            continue
        points = []
        for row in trace:
            value = row[y] / row[ratio_of] if ratio_of and row[ratio_of] else (math.nan if ratio_of else row[y])
            if math.isfinite(row[x]) and math.isfinite(value):
                points.append((row[x], value))
        points.sort()
        if points:
            found.append(([p[0] for p in points], [p[1] for p in points]))
    return found


def _interp(xs: Sequence[float], ys: Sequence[float], at: float) -> float:
    """Piecewise-linear value at ``at``; nan outside the curve."""
    if at < xs[0] or at > xs[-1]:
        return math.nan
    for i in range(1, len(xs)):
        if at <= xs[i]:
            span = xs[i] - xs[i - 1]
            return ys[i] if span <= 0 else ys[i - 1] + (ys[i] - ys[i - 1]) * (at - xs[i - 1]) / span
    return ys[-1]


def band(found: Sequence[Curve]) -> Optional[tuple[list[float], list[float], list[float], list[float]]]:
    """Mean, min and max over seeds on a common x grid (up to the longest curve; a seed counts where
    its curve reaches); None without points."""
    if not found:
        return None
    lo, hi = min(xs[0] for xs, _ in found), max(xs[-1] for xs, _ in found)
    grid = [lo + (hi - lo) * i / (GRID_POINTS - 1) for i in range(GRID_POINTS)] if hi > lo else [lo]
    xs_out, mean, low, high = [], [], [], []
    for at in grid:
        values = [v for xs, ys in found if math.isfinite(v := _interp(xs, ys, at))]
        if values:
            xs_out.append(at)
            mean.append(statistics.fmean(values))
            low.append(min(values))
            high.append(max(values))
    return xs_out, mean, low, high


def plot(out: Path, groups: Mapping[str, Sequence[Mapping[str, str]]], x: str, y: str, *, path: Path,
         xlabel: str, ylabel: str, title: str, xscale: float = 1.0, ratio_of: Optional[str] = None) -> Optional[Path]:
    """One line per group (mean over seeds) with the seeds' spread as a band; None if nothing to draw."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = 0
    for name, members in groups.items():
        found = curves(out, members, x, y, ratio_of)
        drawn_band = band(found)
        if drawn_band is None:
            continue
        xs, mean, low, high = drawn_band
        xs = [v * xscale for v in xs]
        line, = ax.plot(xs, mean, label=f"{name} (n={len(found)})")
        ax.fill_between(xs, low, high, alpha=0.2, color=line.get_color())
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out: Path) -> Path:
    """``<out>/report.md`` and its plots, from ``<out>/results.csv`` and the cells' traces."""
    out = Path(out)
    rows = read_rows(out)
    ok = [r for r in rows if r.get("status") == "ok"]
    varying, grouped = group_by(ok)
    groups = {label(varying, key): members for key, members in grouped.items()}
    with_time = {k: m for k, m in groups.items() if any(math.isfinite(_number(r.get("sim_seconds"))) for r in m)}
    relay = {k: m for k, m in groups.items() if m[0]["method"] == "relay"}
    plots = [
        ("held-out loss against tokens trained", plot(
            out, groups, "tokens", "loss_mean", path=out / "loss_vs_tokens.png", xlabel="tokens trained",
            ylabel="mean held-out loss", title="held-out loss against tokens (band: spread over seeds)")),
        ("held-out loss against simulated time", plot(
            out, with_time, "sim_s", "loss_mean", path=out / "loss_vs_sim_time.png", xlabel="simulated hours",
            ylabel="mean held-out loss", title="held-out loss against simulated time", xscale=1 / 3600)),
        ("lease utilisation (leases held / contributors online)", plot(
            out, relay, "sim_s", "leases_active", ratio_of="online", path=out / "lease_utilisation.png",
            xlabel="simulated hours", ylabel="leases held / online", title="lease utilisation",
            xscale=1 / 3600)),
    ]
    seeds = sorted({r.get("seed", "") for r in ok})
    text = [f"# Sweep report: {len(rows)} cells, {len(ok)} with a result", "",
            f"Mean ± standard deviation over seeds ({', '.join(seeds) or 'none'}); "
            + (f"groups differ in {', '.join(['method', *varying])}." if varying else "groups are methods."),
            "", tables(rows)]
    for title, path in plots:
        if path is not None:
            text += [f"![{title}]({path.name})", ""]
    report = out / REPORT_FILE
    report.write_text("\n".join(text), encoding="utf-8")
    return report
