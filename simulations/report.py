"""The report of a sweep: Markdown tables per method (and arm, or every other setting that varies),
mean ± standard deviation over seeds, and plots of its traces.

    fedem sim report runs/sweep --reference fedavg-language

Reads ``<out>/results.csv`` and the traces of its cells (``cells/<key>/hub/sim/trace.csv``) and
writes ``<out>/report.md`` with its plots beside it. The losses are the cells' final numbers: on the
study's test split when the cells kept one (``data.test_fraction``), else on the held-out split; the
report says which. It gives, per group:

- the final mean loss, the base alone at the end (the relay's last base; v0 for the others), tokens
  trained and wasted, MB moved, accepted and rejected work, lease utilisation (useful lease time over
  contributor online time), the ceiling the relay's lanes allow it and the utilisation's share of
  that ceiling (``simulation.utilisation``), merge attempts and publications, simulated hours, and
  the simulated hours to a mean loss of ``target`` (3.5: the first trace row at or below it; seeds
  that never get there are counted apart);
- the final loss per language, and its paired difference from a ``reference`` group (the same
  seed's cell of that group: e.g. relay minus FedAvg per language);
- each adapter's share of the tokens, and per merge the absorbed languages' loss just after minus
  just before (``merge_jumps.png`` draws each of them);
- plots of the mean loss against tokens and simulated time, and of the lease utilisation so far
  against simulated time, each group's ceiling dashed.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedem_flwr.simulation.record import read_trace  # noqa: E402
from simulations.cells import CELLS_DIR, DIMENSIONS, HUB_DIR, RESULTS_FILE  # noqa: E402

REPORT_FILE = "report.md"
TARGET = 3.5  # the mean loss whose simulated time to reach the report gives
DEFAULT_REFERENCE = "fedavg-language"  # the group paired differences are taken from, when present
# (column, heading, digits) of the main table; {split} and {target} are filled in
METRICS = (("loss_mean", "{split} loss (mean)", 3), ("base_loss_mean", "base alone (mean)", 3),
           ("tokens", "tokens trained", 0), ("tokens_wasted", "tokens wasted", 0), ("bytes_moved", "MB moved", 1),
           ("accepted", "accepted", 1), ("rejected", "rejected", 1), ("lease_utilisation", "lease utilisation", 3),
           ("utilisation_ceiling", "utilisation ceiling", 3), ("utilisation_of_ceiling", "utilisation / ceiling", 2),
           ("merge_attempts", "merge attempts", 1),
           ("merge_published", "merges published", 1), ("sim_seconds", "simulated h", 2),
           ("time_to_target", "h to {split} loss {target}", 2), ("wall_seconds", "wall s", 0))
SCALE = {"bytes_moved": 1e-6, "sim_seconds": 1 / 3600, "time_to_target": 1 / 3600}
GRID_POINTS = 50


def _number(text: Any) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def _json(text: Any, default: Any) -> Any:
    try:
        return json.loads(text) if text else default
    except (TypeError, ValueError):
        return default


def read_rows(out: Path) -> list[dict[str, str]]:
    with open(Path(out) / RESULTS_FILE, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def setting_columns(rows: Sequence[Mapping[str, str]]) -> list[str]:
    """Columns that describe a cell: named dimensions and Hydra keys (not its key, status or losses)."""
    names = rows[0].keys() if rows else []
    return [n for n in names if n in DIMENSIONS or ("." in n and not n.startswith("loss."))]


def group_by(rows: Sequence[Mapping[str, str]]) -> tuple[list[str], dict[tuple, list[Mapping[str, str]]]]:
    """Group the rows by method and arm, seeds pooled. Cells without an arm are grouped by every
    other setting that takes two values or more within one method (unset, the config's default,
    counts as a value there; a setting only some methods have does not split the others). Keys are
    ``(method, arm, *values of the varying settings)``."""
    settings = [n for n in setting_columns(rows) if n not in ("method", "seed", "arm")]
    plain = [row for row in rows if not row.get("arm")]
    methods = {row["method"] for row in plain}
    varying = [n for n in settings
               if any(len({row.get(n, "") for row in plain if row["method"] == method}) > 1 for method in methods)]
    groups: dict[tuple, list[Mapping[str, str]]] = {}
    for row in rows:
        arm = row.get("arm", "")
        values = ("",) * len(varying) if arm else tuple(row.get(n, "") for n in varying)
        groups.setdefault((row["method"], arm, *values), []).append(row)
    return varying, groups


def label(varying: Sequence[str], key: tuple) -> str:
    """An arm's name, else the method and the varying settings it has."""
    if key[1]:
        return str(key[1])
    parts = [key[0]] + [f"{name}={value}" for name, value in zip(varying, key[2:]) if value != ""]
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


def split_name(rows: Sequence[Mapping[str, str]]) -> str:
    """The split the final losses were measured on: ``test``, ``held-out``, or ``mixed`` (a table
    over cells with and without a test split)."""
    splits = {row.get("final_split") or "heldout" for row in rows}
    return "mixed" if len(splits) > 1 else ("test" if splits == {"test"} else "held-out")


def _languages(rows: Sequence[Mapping[str, str]]) -> list[str]:
    return sorted({n[len("loss."):] for r in rows for n in r if n.startswith("loss.") and r[n] != ""})


# -- what the traces say ---------------------------------------------------------------------------

def trace_of(out: Path, row: Mapping[str, str]) -> list[dict[str, Any]]:
    try:
        return read_trace(Path(out) / CELLS_DIR / row["key"] / HUB_DIR)
    except (OSError, ValueError, KeyError):
        return []


def loss_column(trace: Sequence[Mapping[str, Any]]) -> str:
    """``test_loss_mean`` when the trace follows a test split, else ``loss_mean``: the curve of the
    loss the final numbers are measured on."""
    return "test_loss_mean" if any(math.isfinite(r.get("test_loss_mean", math.nan)) for r in trace) else "loss_mean"


def time_to(trace: Sequence[Mapping[str, Any]], target: float) -> float:
    """Simulated seconds of the first trace row whose mean loss is at or below ``target``; nan if
    none is (or the trace has no simulated time)."""
    column = loss_column(trace)
    for row in sorted(trace, key=lambda r: r["sim_s"]):
        if math.isfinite(row["sim_s"]) and math.isfinite(row.get(column, math.nan)) and row[column] <= target:
            return float(row["sim_s"])
    return math.nan


def with_traces(out: Path, rows: Sequence[Mapping[str, str]], target: float = TARGET) -> list[dict[str, Any]]:
    """The rows with ``time_to_target`` (simulated seconds to a mean loss of ``target``) added."""
    return [{**row, "time_to_target": time_to(trace_of(out, row), target)} for row in rows]


# -- tables ----------------------------------------------------------------------------------------

def _time_text(members: Sequence[Mapping[str, Any]], digits: int) -> str:
    """Mean ± std over the seeds that reached the target, with how many did when not all."""
    timed = [m for m in members if math.isfinite(_number(m.get("sim_seconds")))]
    if not timed:
        return "-"
    reached = [_number(m.get("time_to_target")) * SCALE["time_to_target"] for m in timed]
    got = [v for v in reached if math.isfinite(v)]
    text = cell_text(got, digits) if got else "never"
    return text if len(got) == len(timed) else f"{text} ({len(got)}/{len(timed)})"


def main_table(rows: Sequence[Mapping[str, Any]], varying: Sequence[str], groups: Mapping[tuple, Sequence],
               split: str, target: float) -> list[str]:
    headings = [h.format(split=split, target=target) for _, h, _ in METRICS]
    lines = ["| method | seeds | " + " | ".join(headings) + " |", "| --- | ---: |" + " ---: |" * len(METRICS)]
    for key, members in groups.items():
        cells = [_time_text(members, d) if c == "time_to_target" else
                 cell_text([_number(m.get(c)) * SCALE.get(c, 1.0) for m in members], d) for c, _, d in METRICS]
        lines.append(f"| {label(varying, key)} | {len(members)} | " + " | ".join(cells) + " |")
    return lines


def language_table(varying: Sequence[str], groups: Mapping[tuple, Sequence], languages: Sequence[str],
                   split: str) -> list[str]:
    lines = ["", f"Final {split} loss per language (nats per token):", "",
             "| method | " + " | ".join(languages) + " |", "| --- |" + " ---: |" * len(languages)]
    for key, members in groups.items():
        cells = [cell_text([_number(m.get(f"loss.{lang}")) for m in members], 3) for lang in languages]
        lines.append(f"| {label(varying, key)} | " + " | ".join(cells) + " |")
    return lines


def paired_differences(groups: Mapping[str, Sequence[Mapping[str, Any]]], reference: str,
                       languages: Sequence[str]) -> dict[str, dict[str, list[float]]]:
    """Per group other than ``reference``: per language (and ``mean``), its final loss minus the
    reference's on the same seed, one value per seed both have."""
    by_seed = {m.get("seed", ""): m for m in groups[reference]}
    out: dict[str, dict[str, list[float]]] = {}
    for name, members in groups.items():
        if name == reference:
            continue
        diffs: dict[str, list[float]] = {column: [] for column in ["mean", *languages]}
        for member in members:
            other = by_seed.get(member.get("seed", ""))
            if other is None:
                continue
            for column, values in diffs.items():
                field = "loss_mean" if column == "mean" else f"loss.{column}"
                value = _number(member.get(field)) - _number(other.get(field))
                if math.isfinite(value):
                    values.append(value)
        out[name] = diffs
    return out


def paired_table(groups: Mapping[str, Sequence[Mapping[str, Any]]], reference: Optional[str],
                 languages: Sequence[str], split: str) -> list[str]:
    if reference is None or reference not in groups:
        return []
    diffs = paired_differences(groups, reference, languages)
    if not diffs:
        return []
    lines = ["", (f"Paired difference from `{reference}` (this group's final {split} loss minus the reference's, "
                  "same seed; negative: better than the reference; n: seeds paired):"), "",
             "| method | n | mean | " + " | ".join(languages) + " |", "| --- | ---: | ---: |" + " ---: |" * len(languages)]
    for name, by_column in diffs.items():
        n = max((len(v) for v in by_column.values()), default=0)
        cells = [cell_text(by_column[c], 3) for c in ["mean", *languages]]
        lines.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
    return lines


def share_table(groups: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[str]:
    shares = {name: [_json(m.get("token_shares"), {}) for m in members] for name, members in groups.items()}
    adapters = sorted({a for rows in shares.values() for row in rows for a in row})
    if not adapters:
        return []
    lines = ["", ("Share of the tokens per adapter (relay: pushes the hub judged; FedAvg: replies aggregated; "
                  "baselines: trained):"), "",
             "| method | " + " | ".join(adapters) + " |", "| --- |" + " ---: |" * len(adapters)]
    for name, rows in shares.items():
        if not any(rows):
            continue
        cells = [cell_text([float(row.get(a, 0.0)) for row in rows if row], 3) for a in adapters]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def merge_jumps(members: Sequence[Mapping[str, Any]]) -> list[tuple[str, float, float]]:
    """(language, before, after) of every absorbed language of every published merge of ``members``."""
    out = []
    for member in members:
        for event in _json(member.get("merges"), []):
            for language, entry in sorted(event.get("absorbed", {}).items()):
                before, after = _number(entry.get("before")), _number(entry.get("after"))
                if math.isfinite(before) and math.isfinite(after):
                    out.append((language, before, after))
    return out


def merge_table(groups: Mapping[str, Sequence[Mapping[str, Any]]], split: str) -> list[str]:
    jumps = {name: merge_jumps(members) for name, members in groups.items()}
    if not any(jumps.values()):
        return []
    lines = ["", (f"At each published merge, each absorbed language's {split} loss just after minus just before "
                  "(its adapted model; n: absorbed languages over all merges and seeds):"), "",
             "| method | n | after - before | before | after | worst |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, found in jumps.items():
        if not found:
            continue
        change = [after - before for _, before, after in found]
        lines.append(f"| {name} | {len(found)} | {cell_text(change, 3)} | {cell_text([b for _, b, _ in found], 3)} | "
                     f"{cell_text([a for _, _, a in found], 3)} | {max(change):.3f} |")
    return lines


def tables(rows: Sequence[Mapping[str, Any]], reference: Optional[str] = None, target: float = TARGET) -> str:
    """The Markdown tables (module doc); ``rows`` may carry ``time_to_target`` (``with_traces``)."""
    ok = [r for r in rows if r.get("status") == "ok"]
    varying, grouped = group_by(ok)
    named = {label(varying, key): members for key, members in grouped.items()}
    split = split_name(ok)
    languages = _languages(ok)
    lines = main_table(ok, varying, grouped, split, target)
    if languages:
        lines += language_table(varying, grouped, languages, split)
    lines += paired_table(named, reference, languages, split)
    lines += merge_table(named, split)
    lines += share_table(named)
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        lines += ["", f"{len(failed)} cell(s) without a result:", ""]
        lines += [f"- `{r['key']}` {r['method']} seed {r.get('seed', '')}: {r.get('status')} {r.get('reason', '')}"
                  for r in failed]
    return "\n".join(lines) + "\n"


# -- plots -----------------------------------------------------------------------------------------

Curve = tuple[list[float], list[float]]


def curves(out: Path, members: Sequence[Mapping[str, str]], x: str, y: str,
           ratio_of: Optional[str] = None) -> list[Curve]:
    """(x, y) of each member's trace (y divided by ``ratio_of`` if given; ``loss`` for the mean loss
    the final numbers are on), rows where both are finite, sorted by x."""
    found = []
    for member in members:
        trace = trace_of(out, member)
        column = loss_column(trace) if y == "loss" else y
        points = []
        for row in trace:
            value = row[column] / row[ratio_of] if ratio_of and row[ratio_of] else (math.nan if ratio_of else row[column])
            if math.isfinite(row[x]) and math.isfinite(value):
                points.append((row[x], value))
        points.sort()
        if points:
            found.append(([p[0] for p in points], [p[1] for p in points]))
    return found


def utilisation_curves(out: Path, members: Sequence[Mapping[str, str]]) -> list[Curve]:
    """Each member's lease utilisation so far against simulated time: useful lease seconds over
    online seconds up to each trace row. A trace written before those were measured gives its rows'
    sampled leases held over nodes listed instead (``sampled_utilisation``)."""
    found = []
    for member in members:
        trace = trace_of(out, member)
        measured = any(math.isfinite(row.get("lease_s", math.nan)) for row in trace)
        y, of = ("lease_s", "online_s") if measured else ("leases_active", "online")
        points = sorted((row["sim_s"], row[y] / row[of]) for row in trace
                        if math.isfinite(row["sim_s"]) and math.isfinite(row.get(y, math.nan))
                        and math.isfinite(row.get(of, math.nan)) and row[of] > 0)
        if points:
            found.append(([p[0] for p in points], [p[1] for p in points]))
    return found


def sampled_utilisation(out: Path, members: Sequence[Mapping[str, str]]) -> bool:
    """Whether some member's trace predates the measured lease time (its curve is a sample)."""
    return any(trace and not any(math.isfinite(row.get("lease_s", math.nan)) for row in trace)
               for trace in (trace_of(out, member) for member in members))


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
         xlabel: str, ylabel: str, title: str, xscale: float = 1.0, ratio_of: Optional[str] = None,
         hline: Optional[float] = None, found_of: Optional[Callable[[Sequence[Mapping[str, str]]], list[Curve]]] = None,
         group_lines: Optional[Mapping[str, float]] = None, note_of: Optional[Callable[[str], str]] = None
         ) -> Optional[Path]:
    """One line per group (mean over seeds) with the seeds' spread as a band; None if nothing to draw.
    ``found_of`` gives a group's curves (default: ``curves`` of ``x`` and ``y``); ``group_lines`` a
    level per group, dashed in its colour; ``note_of`` a note for a group's legend entry."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = 0
    for name, members in groups.items():
        found = found_of(members) if found_of is not None else curves(out, members, x, y, ratio_of)
        drawn_band = band(found)
        if drawn_band is None:
            continue
        xs, mean, low, high = drawn_band
        xs = [v * xscale for v in xs]
        note = note_of(name) if note_of is not None else ""
        line, = ax.plot(xs, mean, label=f"{name} (n={len(found)}){note}")
        ax.fill_between(xs, low, high, alpha=0.2, color=line.get_color())
        level = (group_lines or {}).get(name)
        if level is not None and math.isfinite(level):
            ax.axhline(level, color=line.get_color(), linestyle="--", linewidth=1)
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_merges(groups: Mapping[str, Sequence[Mapping[str, Any]]], path: Path, split: str) -> Optional[Path]:
    """One panel per group with merges: each absorbed language's loss just before and just after
    each merge, one line each, coloured by language; None without merges."""
    jumps = {name: found for name, members in groups.items() if (found := merge_jumps(members))}
    if not jumps:
        return None
    languages = sorted({lang for found in jumps.values() for lang, _, _ in found})
    colours = {lang: plt.get_cmap("tab10")(i % 10) for i, lang in enumerate(languages)}
    fig, axes = plt.subplots(1, len(jumps), figsize=(max(6.0, 3.2 * len(jumps) + 1.5), 4.5), sharey=True,
                             squeeze=False)
    for ax, (name, found) in zip(axes[0], jumps.items()):
        for lang, before, after in found:
            ax.plot([0, 1], [before, after], marker="o", color=colours[lang], alpha=0.6)
        ax.set_xticks([0, 1], ["before", "after"])
        ax.set_xlim(-0.3, 1.3)
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{split} loss of the absorbed language")
    handles = [plt.Line2D([], [], color=colours[lang], marker="o", label=lang) for lang in languages]
    fig.legend(handles=handles, loc="center right", fontsize=8)
    fig.suptitle("each absorbed language, just before and just after each merge", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.85, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out: Path, reference: Optional[str] = None, target: float = TARGET) -> Path:
    """``<out>/report.md`` and its plots, from ``<out>/results.csv`` and the cells' traces.
    ``reference`` names the group paired differences are taken from (default: ``fedavg-language``
    when there is such a group)."""
    out = Path(out)
    rows = with_traces(out, read_rows(out), target)
    ok = [r for r in rows if r.get("status") == "ok"]
    varying, grouped = group_by(ok)
    groups = {label(varying, key): members for key, members in grouped.items()}
    reference = reference if reference is not None else (DEFAULT_REFERENCE if DEFAULT_REFERENCE in groups else None)
    split = split_name(ok)
    with_time = {k: m for k, m in groups.items() if any(math.isfinite(_number(r.get("sim_seconds"))) for r in m)}
    leased = {k: m for k, m in groups.items() if any(math.isfinite(_number(r.get("lease_utilisation"))) for r in m)
              or m[0]["method"] == "relay"}
    ceilings = {k: mean_std([_number(r.get("utilisation_ceiling")) for r in m])[0] for k, m in leased.items()}
    sampled = {k for k, m in leased.items() if sampled_utilisation(out, m)}
    plots = [
        (f"{split} loss against tokens trained", plot(
            out, groups, "tokens", "loss", path=out / "loss_vs_tokens.png", xlabel="tokens trained",
            ylabel=f"mean {split} loss", title=f"{split} loss against tokens (band: spread over seeds)")),
        (f"{split} loss against simulated time", plot(
            out, with_time, "sim_s", "loss", path=out / "loss_vs_sim_time.png", xlabel="simulated hours",
            ylabel=f"mean {split} loss", title=f"{split} loss against simulated time", xscale=1 / 3600,
            hline=target)),
        ("lease utilisation so far (useful lease time / contributor online time; dashed: ceiling)", plot(
            out, leased, "sim_s", "lease_s", path=out / "lease_utilisation.png", xlabel="simulated hours",
            ylabel="useful lease time / online time, so far",
            title="lease utilisation (dashed: the ceiling of each group's lanes)", xscale=1 / 3600,
            found_of=lambda members: utilisation_curves(out, members), group_lines=ceilings,
            note_of=lambda name: " (sampled: leases held / listed)" if name in sampled else "")),
        ("absorbed languages just before and just after each merge",
         plot_merges(groups, out / "merge_jumps.png", split)),
    ]
    seeds = sorted({r.get("seed", "") for r in ok})
    text = [f"# Sweep report: {len(rows)} cells, {len(ok)} with a result", "",
            f"Mean ± standard deviation over seeds ({', '.join(seeds) or 'none'}); "
            + (f"groups differ in {', '.join(['method', *varying])}" if varying else "groups are methods")
            + (" (and arms)." if any(r.get("arm") for r in ok) else ".")
            + f" Final losses on the {split} split; base alone: the last base without any adapter; "
            f"time to {target}: the first trace point at or below it (seeds that got there / all).",
            "", tables(rows, reference, target)]
    for title, path in plots:
        if path is not None:
            text += [f"![{title}]({path.name})", ""]
    report = out / REPORT_FILE
    report.write_text("\n".join(text), encoding="utf-8")
    return report
