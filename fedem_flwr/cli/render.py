"""Readable tables of the views (rich); ``--json`` bypasses this module entirely.

Every table fits the terminal it is printed on, 80 columns included, with no heading cut: short
columns stay on one line; times, names, paths and reasons wrap within their column, each down to a
floor (a time to its date, a pseudonym whole, a path or reason 20 wide); when that is not enough,
the table leaves out its least useful columns, in a set order, and its caption names them.
"""

from __future__ import annotations

import datetime as dt
import json
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions
from rich.table import Table
from rich.text import Text

from fedem_flwr.hub.views import UNKNOWN

GAP = 3  # characters between two columns: padding, rule, padding


def console() -> Console:
    # Created per command so it writes to the current stdout (CliRunner swaps it).
    return Console(highlight=False, soft_wrap=False)


def dumps(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False)


@dataclass(frozen=True)
class Col:
    """A column. ``wrap``: its values may take several lines, down to ``floor`` characters wide (0:
    its heading's longest word). ``drop``: left out, lowest first, when the table does not fit."""

    heading: str
    wrap: bool = False
    floor: int = 0
    drop: int = 0


def fixed(heading: str, drop: int = 0) -> Col:
    """Short values that stay on one line (ids, versions, states)."""
    return Col(heading, drop=drop)


def stamp(heading: str, drop: int = 0) -> Col:
    """``2024-01-31 12:00:00``, its time under its date when narrow."""
    return Col(heading, True, 10, drop)


def who(heading: str) -> Col:
    """A holder or contributor: a pseudonym (``c-`` and 12 hex) stays whole; identities may wrap."""
    return Col(heading, True, 14)


def free(heading: str, floor: int = 20) -> Col:
    """A path, a reason, a list: as wide as the table allows, ``floor`` at least."""
    return Col(heading, True, floor)


ADAPTER = Col("adapter", wrap=True)  # names are short; a long one wraps rather than push others out


class Listing:
    """A table laid out for the width it is printed at (see the module's docstring)."""

    def __init__(self, title: str, columns: Sequence[Col], rows: Sequence[Sequence[Any]], empty: str) -> None:
        self.title, self.columns, self.empty = title, list(columns), empty
        self.rows = [["-" if cell is None else str(cell) for cell in row] for row in rows]

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Iterator[Table]:
        yield self.table(options.max_width)

    def table(self, width: int) -> Table:
        shown, widths = self.layout(width)
        out = Table(title=Text(self.title), title_justify="left", show_edge=False, pad_edge=False)
        for i, w in zip(shown, widths or [None] * len(shown)):
            col = self.columns[i]
            out.add_column(col.heading, width=w, no_wrap=not col.wrap, overflow="fold" if col.wrap else "ellipsis")
        for row in self.rows:
            out.add_row(*(Text(row[i]) for i in shown))  # Text: a reason's "[...]" is not rich markup
        left_out = [self.columns[i].heading for i in range(len(self.columns)) if i not in shown]
        notes = ([] if self.rows else [self.empty]) + (
            [f"left out at {width} columns: {', '.join(left_out)} (--json has every field)"] if left_out else [])
        out.caption = "; ".join(notes) or None
        return out

    def layout(self, width: int) -> tuple[list[int], Optional[list[int]]]:
        """The columns shown and their widths: every column if they fit at their floors, else fewer; at
        the fewest, columns may wrap down to their headings' width. None for widths when even that does
        not fit (rich then squeezes the columns as it can)."""
        natural = [max([cell_len(c.heading)] + [cell_len(row[i]) for row in self.rows]) for i, c in
                   enumerate(self.columns)]
        bare = [min(n, max(map(cell_len, c.heading.split()))) if c.wrap else n for n, c in zip(natural, self.columns)]
        floors = [min(n, max(c.floor, b)) for n, b, c in zip(natural, bare, self.columns)]
        order = [i for _, i in sorted((c.drop, i) for i, c in enumerate(self.columns) if c.drop)]
        shown = list(range(len(self.columns)))
        for k, least in [(k, floors) for k in range(len(order) + 1)] + [(len(order), bare)]:
            shown = [i for i in range(len(self.columns)) if i not in order[:k]]
            widths = squeeze([natural[i] for i in shown], [least[i] for i in shown], width - GAP * (len(shown) - 1))
            if widths is not None:
                return shown, self.tighten(shown, widths, [natural[i] for i in shown], [least[i] for i in shown])
        return shown, None

    def tighten(self, shown: list[int], widths: list[int], natural: list[int], floors: list[int]) -> list[int]:
        """A column that wraps gives up what its longest wrapped line leaves unused (a time wrapped at
        14 needs 10) to the widest column that wraps, so long texts take fewer lines."""
        widths, total = list(widths), sum(widths)
        wrapped = [k for k, w in enumerate(widths) if w < natural[k]]
        for k in wrapped:
            lines = [line for row in self.rows for line in textwrap.wrap(row[shown[k]], widths[k],
                                                                         break_on_hyphens=False)]
            widths[k] = max([floors[k], *map(cell_len, lines)])
        if wrapped:
            widest = max(wrapped, key=lambda k: natural[k])
            widths[widest] = min(natural[widest], widths[widest] + total - sum(widths))
        return widths


def squeeze(widths: list[int], floors: list[int], room: int) -> Optional[list[int]]:
    """Narrow the widest columns first, one character at a time, none below its floor, until the
    widths fit ``room``; None when the floors do not fit."""
    widths = list(widths)
    while sum(widths) > room:
        wide = [i for i, w in enumerate(widths) if w > floors[i]]
        if not wide:
            return None
        widths[max(wide, key=lambda i: widths[i])] -= 1
    return widths


def utc(iso: Optional[str]) -> Optional[str]:
    """``2024-01-31T12:00:00+00:00`` -> ``2024-01-31 12:00:00`` (table titles say UTC)."""
    return None if iso is None else iso.replace("T", " ").removesuffix("+00:00")


def time_left(deadline: Optional[str], now: float) -> str:
    if deadline is None:
        return "-"
    seconds = int(dt.datetime.fromisoformat(deadline).timestamp() - now)
    if seconds <= 0:
        return "due"
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def short(reason: Optional[str], width: int = 160) -> Optional[str]:
    """A reason cut to ``width`` (a listing stays compact; ``--json`` has it whole)."""
    if reason is None or len(reason) <= width:
        return reason
    return reason[: width - 1] + "…"


def holders(rows: list[dict[str, Any]]) -> Optional[str]:
    """``c-e40f8bdc8c88 (lane 0), c-0a1b2c3d4e5f (lane 1)``: an adapter's holders, or None when it has none."""
    return ", ".join(f"{h['holder']} (lane {h['lane']})" for h in rows) or None


def task(row: dict[str, Any]) -> str:
    """``sft-chat`` or, for an adapter limited to one domain, ``sft-chat@health`` (a view without a task: a
    language adapter, as hubs before catalogs had)."""
    name = row.get("task") or "causal-lm"
    return f"{name}@{row['domain']}" if row.get("domain") else name


def held(count: int, lanes: Any) -> str:
    """``2/3 lanes`` held of the hub's ``relay.lanes``; ``2 holders`` when the hub has not recorded them."""
    if not isinstance(lanes, int) or isinstance(lanes, bool):
        return f"{count} holder{'' if count == 1 else 's'}"
    return f"{count}/{lanes} lanes"


def status(view: dict[str, Any], now: float) -> list[Any]:
    base = view["base"]
    writer = view["writer"]
    counts = view["contributions"]
    lines = [
        f"hub        {view['hub']}",
        "writer     " + (f"pid {writer.get('pid')} on {writer.get('host')} since {writer.get('since')}"
                         if writer else "none running"),
        "base       " + (f"v{base['version']} ({base['source']}, {utc(base['created'])} UTC)  "
                         f"{base['path'] or 'MISSING (run fedem verify)'}" if base else "no checkpoint yet"),
        f"decisions  {counts['accepted']} accepted, {counts['rejected']} rejected",
        "lanes      " + (f"{view['lanes']} per adapter (relay.lanes)" if isinstance(view["lanes"], int)
                         else "unknown (relay settings not recorded): holders are counted only"),
        *lineage(view["lineage"], now),
        "",
    ]
    adapters = Listing("Adapters", (ADAPTER, fixed("version"), free("languages", 9), fixed("task", drop=1),
                                    fixed("held"), who("holders")),
                       [(a["name"], a["version"], ",".join(a["languages"]), task(a),
                         held(len(a["holders"]), view["lanes"]), holders(a["holders"])) for a in view["adapters"]],
                       "no adapters yet")
    leases = Listing("Active leases (UTC)", (fixed("token"), ADAPTER, fixed("lane"), who("holder"), stamp("deadline"),
                                             fixed("left")),
                     [(lease["token"], lease["adapter"], lease["lane"], lease["holder"], utc(lease["deadline"]),
                       time_left(lease["deadline"], now)) for lease in view["leases"]], "no active lease")
    recent = Listing("Recent contributions (UTC)", (fixed("id"), stamp("received"), ADAPTER, who("contributor"),
                                                    fixed("decision"), free("reason")),
                     [(c["id"], utc(c["received"]), c["adapter"], c["contributor"], c["decision"], short(c["reason"]))
                      for c in view["recent"]], "no contribution yet")
    return ["\n".join(lines), adapters, "", leases, "", recent]


def lineage(view: dict[str, Any], now: float) -> list[str]:
    """Status lines: merges and CPT so far, and when the next of each is due."""
    refused = view["refused"]
    merge, cpt = view["next_merge"], view["next_cpt"]
    lines = [f"lineage    {view['merges']} merge(s), {view['cpt']} CPT; refused {refused['merge']} merge(s), "
             f"{refused['cpt']} CPT"]
    if merge["base_version"] is None:
        return lines
    accepted = f"{merge['accepted_since']} accepted since v{merge['base_version']}"
    if merge["every_accepted"] == UNKNOWN:
        due = "due: unknown (merge settings not recorded)"
    else:
        count = "count trigger off" if merge["every_accepted"] is None else f"merge at {merge['every_accepted']}"
        at = merge["due_at"]
        when = ("time trigger off" if at is None
                else "due now by time" if dt.datetime.fromisoformat(at).timestamp() <= now else f"by time at {utc(at)} UTC")
        due = f"{count}; {when}"
    asked = f"; requested at {utc(merge['requested_at'])} UTC" if merge["requested_at"] else ""
    lines.append(f"next merge {accepted}; {due}{asked}")
    if cpt["enabled"] is False:
        lines.append("next CPT   off")
    elif cpt["checkpoint_every"] == UNKNOWN:
        lines.append("next CPT   unknown (cpt settings not recorded)")
    elif cpt["next_at_step"] is None:
        lines.append(f"next CPT   no checkpoint interval recorded ({cpt['steps'] or 0} steps so far)")
    else:
        lines.append(f"next CPT   checkpoint at step {cpt['next_at_step']} (every {cpt['checkpoint_every']} steps, "
                     f"{cpt['steps'] or 0} so far)")
    return lines


def heldout_summary(metrics: dict[str, Any]) -> Optional[str]:
    """``3.412 (5)``: a base's mean held-out loss over its (5) languages, or None when none was measured."""
    losses = [v for v in (metrics.get("heldout") or {}).values() if isinstance(v, (int, float))]
    return f"{sum(losses) / len(losses):.3f} ({len(losses)})" if losses else None


def adapters(rows: list[dict[str, Any]]) -> Listing:
    return Listing("Adapters", (ADAPTER, fixed("version"), fixed("base"), free("languages", 9), fixed("task", drop=1),
                                who("holders"), free("path")),
                   [(r["name"], r["version"], r["base_version"], ",".join(r["languages"]), task(r),
                     holders(r["holders"]), r["path"]) for r in rows], "no adapters yet")


def versions(adapter: str, rows: list[dict[str, Any]]) -> Listing:
    return Listing(f"Versions of {adapter} (UTC)", (fixed("version"), fixed("kind"), fixed("parent"), fixed("base"),
                                                    stamp("created"), fixed("digest", drop=1), free("path")),
                   [(r["version"], r["kind"], r["parent_version"], r["base_version"], utc(r["created"]),
                     r["digest"][:12], r["path"]) for r in rows], "no versions")


def leases(rows: list[dict[str, Any]], now: float, everything: bool) -> Listing:
    if everything:
        return Listing("Leases (UTC)", (fixed("token"), ADAPTER, fixed("lane"), who("holder"), fixed("state"),
                                        stamp("issued", drop=1), stamp("ended"), free("outcome", 8)),
                       [(r["token"], r["adapter"], r["lane"], r["holder"], r["state"], utc(r["issued"]),
                         utc(r["ended"]), r["outcome"]) for r in rows], "no lease issued yet")
    return Listing("Active leases (UTC)", (fixed("token"), ADAPTER, fixed("lane"), who("holder"), stamp("issued"),
                                           stamp("deadline"), fixed("left")),
                   [(r["token"], r["adapter"], r["lane"], r["holder"], utc(r["issued"]), utc(r["deadline"]),
                     time_left(r["deadline"], now)) for r in rows], "no active lease")


def checkpoints(rows: list[dict[str, Any]]) -> Listing:
    return Listing("Base checkpoints (UTC)", (fixed("version"), fixed("parent", drop=1), fixed("source"),
                                              stamp("created"), fixed("held-out"), free("absorbed", 8), free("path")),
                   [(r["version"], r["parent"], r["source"], utc(r["created"]), heldout_summary(r["metrics"]),
                     ", ".join(f"{a['adapter']} v{a['adapter_version']}" for a in r["absorbed"]) or None, r["path"])
                    for r in rows], "no checkpoint yet")


def heldout_table(bases: list[dict[str, Any]]) -> Listing:
    """Held-out loss per language (rows) across base versions (columns; the oldest go first when narrow)."""
    languages = sorted({lang for b in bases for lang in b["heldout"]})
    newest = len(bases) - 1
    columns = [fixed("language")] + [Col(f"v{b['version']} {b['source']}", wrap=True, drop=0 if i == newest else i + 1)
                                     for i, b in enumerate(bases)]
    return Listing("Held-out loss per base version", columns,
                   [(lang, *(f"{b['heldout'][lang]:.3f}" if lang in b["heldout"] else "-" for b in bases))
                    for lang in languages], "no held-out loss recorded for any base version")


def judged(evaluation: Optional[dict[str, Any]]) -> Optional[str]:
    """``3/3 -0.041 veto:agreed``: of the peers asked, how many reports counted, their combined delta
    (candidate minus parent loss; negative helped) and what it did in its role (``1/3 too-few`` when too
    few counted to say); None when no peer judged the push (every push before `gate.peers`)."""
    peers = (evaluation or {}).get("peers")
    if not isinstance(peers, dict):
        return None
    delta, role, effect = peers.get("delta"), peers.get("role"), peers.get("effect")
    parts = [f"{peers.get('counted', '-')}/{peers.get('asked', '-')}"]
    if isinstance(delta, (int, float)) and not isinstance(delta, bool):
        parts.append(f"{delta:+.3f}")
    if effect:
        parts.append(f"{role}:{effect}" if role and effect != "too-few" else str(effect))
    return " ".join(parts)


def contributions(rows: list[dict[str, Any]]) -> Listing:
    return Listing("Contributions, newest first (UTC)",
                   (fixed("id"), stamp("received"), ADAPTER, who("contributor"), fixed("lease", drop=1),
                    fixed("decision"), Col("peers", True, 14, drop=3), fixed("version", drop=2), free("reason")),
                   [(r["id"], utc(r["received"]), r["adapter"], r["contributor"], r["lease_token"], r["decision"],
                     judged(r.get("evaluation")), r["adapter_version"], short(r["reason"])) for r in rows],
                   "no contribution yet")
