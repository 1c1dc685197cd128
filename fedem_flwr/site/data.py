"""What the public ledger shows, as plain JSON-ready data read from the registry (HTML lives in ``render``).

Everything here goes on a public page, so contributors appear only as pseudonyms: the views are
built with ``Names(reveal=False)`` and no identity (``pk:``, ``sim:``, ``node:``) is read. Folder
paths of the hub's machine are left out too. Times are ISO 8601 UTC strings; held-out losses are
per held-out set (a language, or a task's data such as ``en:chat``), as the hub measured them blind.
Adapters are listed by task (``hub.terms``: language adapters first), and each adapter's progress is
drawn on its own held-out sets, so a chat adapter's curve is its conversations' loss, not English text.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Optional

from fedem_flwr.data.tasks import AdapterTerms
from fedem_flwr.hub.registry import Registry
from fedem_flwr.hub.terms import adapter_terms_of, own_losses, task_order, task_title
from fedem_flwr.hub.views import (
    Names,
    active_leases,
    adapters_view,
    checkpoints_view,
    contribution_view,
    holder_view,
    iso,
    lanes_view,
)

PAGE_ROWS = 1000  # ledger rows per data file the ledger page loads
SHOWN_ROWS = 100  # ledger rows the page shows at a time
CHART_POINTS = 400  # points per line a figure draws at most (tables and the ledger keep every row)
# A ledger row is a list in this column order (the data files stay small at 100,000 rows). ``judges`` (the
# hub's and the peers' judgement, None when no peer judged) is shown within the held-out loss cell.
LEDGER_COLUMNS = ("id", "received", "contributor", "adapter", "lease", "decision", "version", "trained_on",
                  "judged_on", "tokens", "heldout", "judges", "reason")
# What of a peer-judged push's evaluation the ledger shows (peers by pseudonym only, as the hub wrote them).
HUB_KEYS = ("tokens", "delta", "accepted")
PEERS_KEYS = ("role", "asked", "counted", "delta", "tokens", "effect")
REPORT_KEYS = ("peer", "tokens", "delta", "weight", "outcome")
NUMBER_KEYS = frozenset({"tokens", "delta", "weight"})  # shown as numbers: anything else in them shows as "-"


class NoPaths:
    """A store view that names no folder: the site shows no path of the hub's machine."""

    def path(self, repo: str, revision: str) -> None:
        return None


def tokens_of(evaluation: dict[str, Any]) -> Optional[float]:
    """Tokens trained, as the node reported them (``evaluation.train.tokens``); None when absent."""
    return _number((evaluation.get("train") or {}).get("tokens"))


def _number(value: Any) -> Optional[float]:
    """``value`` as a float when it is a number (never a bool), else None: what the page formats as one."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def judges_of(evaluation: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The hub's own held-out result (``hub``) and the peers' (``peers``, each report by pseudonym) of a push
    that peers judged, with only the keys the ledger shows; None for a push no peer judged."""
    peers = evaluation.get("peers")
    if not isinstance(peers, dict):
        return None
    hub, reports = evaluation.get("hub"), peers.get("reports")
    reports = [r for r in reports if isinstance(r, dict)] if isinstance(reports, list) else []
    return {"hub": _shown(hub, HUB_KEYS) if isinstance(hub, dict) else None,
            "peers": {**_shown(peers, PEERS_KEYS), "reports": [_shown(r, REPORT_KEYS) for r in reports]}}


def _shown(block: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """``block``'s ``keys``, a number key's value None when it holds no number (the page and site.js format
    those as numbers; the hub writes them, but a row is shown whatever it holds)."""
    shown = {k: block.get(k) for k in keys}
    for k in NUMBER_KEYS.intersection(shown):
        if _number(shown[k]) is None:
            shown[k] = None
    return shown


def ledger_row(view: dict[str, Any]) -> list[Any]:
    """One contribution view (``views.contribution_view``) as a ledger row in ``LEDGER_COLUMNS`` order."""
    evaluation = view["evaluation"] or {}
    return [view["id"], view["received"], view["contributor"], view["adapter"], view["lease_token"],
            view["decision"], view["adapter_version"], view["base_version"], view["judged_base_version"],
            tokens_of(evaluation), dict(evaluation.get("heldout") or {}), judges_of(evaluation), view["reason"]]


def as_dict(row: Sequence[Any]) -> dict[str, Any]:
    return dict(zip(LEDGER_COLUMNS, row))


def ledger(registry: Registry, names: Names) -> list[list[Any]]:
    """Every contribution, oldest first, as ledger rows."""
    return [ledger_row(contribution_view(c, names)) for c in reversed(registry.contributions())]


def pages(rows: Sequence[Any], size: int = PAGE_ROWS) -> list[Sequence[Any]]:
    """``rows`` cut into consecutive pages of at most ``size`` (one empty page when there are none)."""
    if size < 1:
        raise ValueError(f"`size` is {size!r}; a page holds at least one row.")
    return [rows[i:i + size] for i in range(0, len(rows), size)] or [rows[:0]]


def totals(rows: Iterable[Sequence[Any]]) -> dict[str, Any]:
    """Contributors, contributions, accepted, rejected and node-reported tokens over ledger rows."""
    people: set[str] = set()
    out = {"contributors": 0, "contributions": 0, "accepted": 0, "rejected": 0, "tokens": 0.0}
    for row in rows:
        r = as_dict(row)
        people.add(r["contributor"])
        out["contributions"] += 1
        out[r["decision"]] = out.get(r["decision"], 0) + 1
        out["tokens"] += r["tokens"] or 0.0
    out["contributors"] = len(people)
    return out


def contributors(rows: Iterable[Sequence[Any]], absorbing: dict[tuple[str, int], Optional[int]]) -> dict[str, Any]:
    """pseudonym -> their ledger rows, counts, acceptance rate, tokens and the base versions that
    absorbed their accepted work (``absorbing``: (adapter, version) -> base version or None)."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        r = as_dict(row)
        c = out.setdefault(r["contributor"], {"pseudonym": r["contributor"], "rows": [], "contributions": 0,
                                              "accepted": 0, "tokens": 0.0, "absorbed_by": set()})
        c["rows"].append(row)
        c["contributions"] += 1
        c["tokens"] += r["tokens"] or 0.0
        if r["decision"] == "accepted":
            c["accepted"] += 1
            base = absorbing.get((r["adapter"], r["version"]))
            if base is not None:
                c["absorbed_by"].add(base)
    for c in out.values():
        c["acceptance"] = c["accepted"] / c["contributions"]
        c["absorbed_by"] = sorted(c["absorbed_by"])
    return dict(sorted(out.items()))


def absorbing_bases(registry: Registry, rows: Iterable[Sequence[Any]]) -> dict[tuple[str, int], Optional[int]]:
    """(adapter, version) of each accepted row -> the base version whose merge carried it (None: not yet)."""
    keys = {(r["adapter"], r["version"]) for r in map(as_dict, rows) if r["decision"] == "accepted"
            and r["version"] is not None}
    return {key: registry.absorbing_base(*key) for key in sorted(keys)}


def thin(points: Sequence[Any], most: int = CHART_POINTS) -> list[Any]:
    """At most ``most`` of ``points``, evenly spaced, always keeping the first and the last."""
    if len(points) <= most:
        return list(points)
    step = (len(points) - 1) / (most - 1)
    return [points[round(i * step)] for i in range(most)]


def by_task(adapters: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Adapter views (each with a ``task``) under one heading per task: language adapters first, then
    the other tasks; by name within a task. Tasks without an adapter are left out."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for a in adapters:
        groups.setdefault(a["task"], []).append(a)
    return [{"task": task, "title": task_title(task), "adapters": sorted(groups[task], key=lambda a: a["name"])}
            for task in sorted(groups, key=task_order)]


def overview(registry: Registry, names: Names, rows: Sequence[Sequence[Any]], now: float) -> dict[str, Any]:
    """The lineage of base versions, the adapters now (version, task, languages, domain; each holder with its
    lane and lease time left; ``lanes``: how many holders one adapter may have, ``unknown`` when not recorded;
    ``groups``: the same adapters by task) and the totals."""
    bases = [{k: v for k, v in b.items() if k != "path"} for b in checkpoints_view(registry, NoPaths(), names)]
    held = active_leases(registry)
    adapters = []
    for a in adapters_view(registry, NoPaths(), names):
        holders = [{**holder_view(lease, names), "deadline": iso(lease.deadline),
                    "left_s": max(0.0, lease.deadline - now)} for lease in held.get(a["name"], [])]
        adapters.append({"name": a["name"], "version": a["version"], "languages": a["languages"], "task": a["task"],
                         "domain": a["domain"], "base_version": a["base_version"], "holders": holders})
    refused = [{"source": a.source, "parent": a.parent, "reason": a.reason, "created": iso(a.created)}
               for a in registry.base_attempts()]
    return {"bases": bases, "lanes": lanes_view(registry), "adapters": adapters, "groups": by_task(adapters),
            "refused": refused, "totals": totals(rows)}


def adapter_progress(registry: Registry, terms: AdapterTerms) -> dict[str, Any]:
    """One adapter's versions in time with their losses on its own held-out sets (``keys``), one line each."""
    versions = [{"version": v.version, "kind": v.kind, "base_version": v.base_version, "created": iso(v.created),
                 "t": v.created, "heldout": own_losses(v.metrics.get("heldout"), terms)}
                for v in registry.adapter_versions(terms.name)]
    shown = thin(versions)
    keys = [key for key in terms.heldout_keys if any(key in v["heldout"] for v in shown)]
    series = {key: [(v["t"], v["heldout"][key]) for v in shown if key in v["heldout"]] for key in keys}
    return {"languages": list(terms.languages), "task": terms.task, "domain": terms.domain,
            "keys": list(terms.heldout_keys), "versions": shown, "count": len(versions), "series": series}


def progress(registry: Registry, bases: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Held-out loss per held-out set across base versions, and per adapter across its versions in time
    (on its own held-out sets)."""
    by_base: dict[str, list[tuple[int, float]]] = {}
    for b in bases:
        for lang, loss in sorted((b["metrics"].get("heldout") or {}).items()):
            by_base.setdefault(lang, []).append((b["version"], loss))
    adapters = {name: adapter_progress(registry, terms) for name, terms in adapter_terms_of(registry).items()}
    return {"bases": by_base, "adapters": adapters}


def site_data(registry: Registry, now: float) -> dict[str, Any]:
    """Everything the site shows, read in one snapshot of the registry."""
    names = Names(registry, reveal=False)
    with registry.snapshot():
        rows = ledger(registry, names)
        view = overview(registry, names, rows, now)
        return {"built": iso(now), "overview": view, "progress": progress(registry, view["bases"]), "ledger": rows,
                "contributors": contributors(rows, absorbing_bases(registry, rows))}
