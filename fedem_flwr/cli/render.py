"""Readable tables of the views (rich); ``--json`` bypasses this module entirely."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from typing import Any, Optional

from rich.console import Console
from rich.table import Table

from fedem_flwr.cli.views import UNKNOWN


def console() -> Console:
    # Created per command so it writes to the current stdout (CliRunner swaps it).
    return Console(highlight=False, soft_wrap=False)


def dumps(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False)


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], empty: str) -> Table:
    """Every column but the last stays on one line; the last (a path or a reason) folds."""
    out = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    for i, name in enumerate(columns):
        last = i == len(columns) - 1
        out.add_column(name, no_wrap=not last, overflow="fold" if last else "ellipsis")
    for row in rows:
        out.add_row(*("-" if cell is None else str(cell) for cell in row))
    if not rows:
        out.caption = empty
    return out


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


def short(text: Optional[str], width: int = 60) -> Optional[str]:
    if text is None or len(text) <= width:
        return text
    return text[: width - 1] + "…"


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
        *lineage(view["lineage"], now),
        "",
    ]
    adapters = table("Adapters", ("adapter", "version", "languages", "holder"),
                     [(a["name"], a["version"], ",".join(a["languages"]), a["holder"]) for a in view["adapters"]],
                     "no adapters yet")
    leases = table("Active leases (UTC)", ("token", "adapter", "holder", "deadline", "left"),
                   [(lease["token"], lease["adapter"], lease["holder"], utc(lease["deadline"]),
                     time_left(lease["deadline"], now)) for lease in view["leases"]], "no active lease")
    recent = table("Recent contributions (UTC)", ("id", "received", "adapter", "contributor", "decision", "reason"),
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


def adapters(rows: list[dict[str, Any]]) -> Table:
    return table("Adapters", ("adapter", "version", "base", "languages", "task", "holder", "path"),
                 [(r["name"], r["version"], r["base_version"], ",".join(r["languages"]), r["task"], r["holder"],
                   r["path"]) for r in rows], "no adapters yet")


def versions(name: str, rows: list[dict[str, Any]]) -> Table:
    return table(f"Versions of {name} (UTC)", ("version", "kind", "parent", "base", "created", "digest", "path"),
                 [(r["version"], r["kind"], r["parent_version"], r["base_version"], utc(r["created"]),
                   r["digest"][:12], r["path"]) for r in rows], "no versions")


def leases(rows: list[dict[str, Any]], now: float, everything: bool) -> Table:
    if everything:
        return table("Leases (UTC)", ("token", "adapter", "holder", "state", "issued", "ended", "outcome"),
                     [(r["token"], r["adapter"], r["holder"], r["state"], utc(r["issued"]), utc(r["ended"]),
                       r["outcome"]) for r in rows], "no lease issued yet")
    return table("Active leases (UTC)", ("token", "adapter", "holder", "issued", "deadline", "left"),
                 [(r["token"], r["adapter"], r["holder"], utc(r["issued"]), utc(r["deadline"]),
                   time_left(r["deadline"], now)) for r in rows], "no active lease")


def checkpoints(rows: list[dict[str, Any]]) -> Table:
    return table("Base checkpoints (UTC)", ("version", "parent", "source", "created", "held-out", "absorbed",
                                            "path"),
                 [(r["version"], r["parent"], r["source"], utc(r["created"]), heldout_summary(r["metrics"]),
                   ", ".join(f"{a['adapter']} v{a['adapter_version']}" for a in r["absorbed"]) or None, r["path"])
                  for r in rows], "no checkpoint yet")


def heldout_table(bases: list[dict[str, Any]]) -> Table:
    """Held-out loss per language (rows) across base versions (columns)."""
    languages = sorted({lang for b in bases for lang in b["heldout"]})
    out = Table(title="Held-out loss per base version", title_justify="left", show_edge=False,
                pad_edge=False)
    for name in ("language", *(f"v{b['version']} {b['source']}" for b in bases)):
        out.add_column(name, no_wrap=True)
    for lang in languages:
        out.add_row(lang, *(f"{b['heldout'][lang]:.3f}" if lang in b["heldout"] else "-" for b in bases))
    if not languages:
        out.caption = "no held-out loss recorded for any base version"
    return out


def contributions(rows: list[dict[str, Any]]) -> Table:
    return table("Contributions, newest first (UTC)",
                 ("id", "received", "adapter", "contributor", "lease", "decision", "version", "reason"),
                 [(r["id"], utc(r["received"]), r["adapter"], r["contributor"], r["lease_token"], r["decision"],
                   r["adapter_version"], short(r["reason"])) for r in rows], "no contribution yet")
