"""The site's pages as HTML strings, from ``data.site_data`` (pure: writing files lives in ``build``).

Every page is plain HTML with one stylesheet and one small script (``assets/``): tables sort
without the script too, and every figure is an inline SVG with a title, a description and the
table of its numbers beside it. Text from the registry is always escaped.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterable, Sequence
from typing import Any, Optional

from fedem_flwr.site import charts
from fedem_flwr.site.data import LEDGER_COLUMNS, as_dict

SITE = "FedEm public ledger"
NAV = (("index.html", "Overview"), ("progress.html", "Progress"), ("ledger.html", "Ledger"),
       ("contributors.html", "Contributors"))
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


# -- formats shared with the ledger script (site.js) ---------------------------------------------
def loss(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"


def losses(heldout: dict[str, Optional[float]]) -> str:
    """``de 5.057, hi 4.433``: held-out loss per language, languages in order."""
    return ", ".join(f"{lang} {loss(heldout[lang])}" for lang in sorted(heldout)) or "-"


def tokens(value: Optional[float]) -> str:
    return "-" if value is None else f"{round(value):,}"


def rate(value: float) -> str:
    return f"{value:.0%}"


def when(iso: Optional[str]) -> str:
    """``2024-01-31T12:00:00+00:00`` -> ``2024-01-31 12:00:00`` (headings say UTC)."""
    return "-" if iso is None else iso.replace("T", " ").removesuffix("+00:00")


def left(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    return "due" if s <= 0 else (f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s")


def slug(pseudonym: str) -> str:
    """A contributor page's file name (pseudonyms are ``c-`` and hex; anything else is made safe)."""
    return _SAFE.sub("_", pseudonym) + ".html"


def script_data(name: str, value: Any) -> str:
    """A data file for ``<script src>`` (browsers refuse fetch() of file:// pages): ``window[name] = value``."""
    return f"window.{name} = {json.dumps(value, ensure_ascii=True, separators=(',', ':'))};\n"


def chunk_data(index: int, rows: Sequence[Any]) -> str:
    """One ledger data file: rows ``index * PAGE_ROWS`` onwards, registered under their chunk index."""
    body = json.dumps(list(rows), ensure_ascii=True, separators=(",", ":"))
    return f"(window.FEDEM_LEDGER = window.FEDEM_LEDGER || {{}})[{index}] = {body};\n"


# -- building blocks ------------------------------------------------------------------------------
def esc(value: Any) -> str:
    return html.escape("-" if value is None else str(value))


def page(title: str, current: str, body: str, built: str, root: str = "", scripts: Iterable[str] = ()) -> str:
    mark = ' aria-current="page"'
    nav = "".join(f'<li><a href="{root}{href}"{mark if href == current else ""}>{label}</a></li>' for href, label in NAV)
    extra = "".join(f'<script src="{root}{src}"></script>' for src in scripts)
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{esc(title)} · {SITE}</title><link rel="icon" href="data:,">'
            f'<link rel="stylesheet" href="{root}assets/site.css"></head><body>'
            f'<header><p class="brand"><a href="{root}index.html">{SITE}</a></p>'
            f'<nav aria-label="Pages"><ul>{nav}</ul></nav></header>'
            f'<main id="main">{body}</main>'
            f'<footer><p>Built {esc(when(built))} UTC from the hub\'s registry. Contributors appear only as '
            f'pseudonyms (a keyed hash the hub alone can compute); tokens are as the nodes reported them.</p></footer>'
            f'{extra}<script src="{root}assets/site.js"></script></body></html>\n')


def table(caption: str, columns: Sequence[str], rows: Iterable[Sequence[str]], table_id: str = "",
          numeric: Sequence[str] = (), empty: str = "none yet") -> str:
    """A sortable table; cells are HTML already escaped by the caller. ``numeric`` columns sort as numbers."""
    number = ' data-type="number"'
    head = "".join(f'<th scope="col"{number if c in numeric else ""}>{esc(c)}</th>' for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    if not body:
        return f'<p class="empty">{esc(caption)}: {esc(empty)}.</p>'
    ident = f' id="{table_id}"' if table_id else ""
    return (f'<div class="scroll"><table{ident} class="sortable"><caption>{esc(caption)}</caption>'
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>")


def contributor_link(pseudonym: Optional[str], root: str = "") -> str:
    if pseudonym is None:
        return "-"
    return f'<a href="{root}contributors/{slug(pseudonym)}">{esc(pseudonym)}</a>'


def stats(items: Sequence[tuple[str, str, str]]) -> str:
    """A list of (key, label, value) figures; ``data-stat`` names each for readers and tests."""
    return '<ul class="stats">' + "".join(f'<li><span>{esc(label)}</span> <strong data-stat="{key}">{esc(value)}</strong></li>'
                                          for key, label, value in items) + "</ul>"


# -- pages ----------------------------------------------------------------------------------------
def overview_page(site: dict[str, Any]) -> str:
    view = site["overview"]
    t = view["totals"]
    bases = view["bases"]
    languages = sorted({lang for b in bases for lang in (b["metrics"].get("heldout") or {})})
    base_rows = []
    for b in bases:
        heldout = b["metrics"].get("heldout") or {}
        absorbed = "; ".join(f"{esc(a['adapter'])} v{a['adapter_version']} ("
                             + (", ".join(contributor_link(p) for p in a["contributors"]) or "no contributor") + ")"
                             for a in b["absorbed"]) or "-"
        base_rows.append([f'<span id="base-v{b["version"]}">v{b["version"]}</span>',
                          "-" if b["parent"] is None else f"v{b['parent']}", esc(b["source"]), esc(when(b["created"])),
                          *(loss(heldout.get(lang)) for lang in languages), absorbed])
    adapter_rows = [[esc(a["name"]), f"v{a['version']}" if a["version"] is not None else "-",
                     esc(", ".join(a["languages"])), "-" if a["base_version"] is None else f"v{a['base_version']}",
                     contributor_link(a["holder"]) if a["holder"] in site["contributors"] else esc(a["holder"]),
                     (f'<time datetime="{esc(a["deadline"])}" data-deadline="{esc(a["deadline"])}">'
                      f'{esc(left(a["left_s"]))}</time>') if a["deadline"] else "-"]
                    for a in view["adapters"]]
    refused = [[esc(r["source"]), "-" if r["parent"] is None else f"v{r['parent']}", esc(when(r["created"])),
                esc(r["reason"])] for r in view["refused"]]
    body = (
        "<h1>What the community is building</h1>"
        "<p>Every contribution to this model is judged blind, on held-out text the contributor never sees, "
        "and recorded here with its reason. Accepted work is merged into new versions of the base model.</p>"
        '<section aria-labelledby="h-totals"><h2 id="h-totals">Totals</h2>'
        + stats([("contributors", "Contributors", f"{t['contributors']:,}"),
                 ("contributions", "Contributions", f"{t['contributions']:,}"),
                 ("accepted", "Accepted", f"{t['accepted']:,}"), ("rejected", "Rejected", f"{t['rejected']:,}"),
                 ("tokens", "Tokens trained (as reported by nodes)", tokens(t["tokens"]))])
        + '</section><section aria-labelledby="h-lineage"><h2 id="h-lineage">The base model\'s lineage</h2>'
        + table("Base versions, oldest first (UTC; held-out loss per language)",
                ["version", "parent", "source", "date", *languages, "absorbed (contributors)"], base_rows,
                "bases", numeric=languages)
        + table("Attempts at a new base that were refused", ["source", "on base", "date", "reason"], refused,
                "refused", empty="none")
        + '</section><section aria-labelledby="h-adapters"><h2 id="h-adapters">The adapters now</h2>'
        + table("Adapters, their latest version and who holds them", ["adapter", "version", "languages", "base",
                                                                     "holder", "lease time left"], adapter_rows,
                "adapters")
        + "</section>")
    return page("Overview", "index.html", body, site["built"])


def progress_page(site: dict[str, Any]) -> str:
    prog = site["progress"]
    bases = site["overview"]["bases"]
    languages = sorted(prog["bases"])
    parts = ["<h1>Progress</h1><p>Held-out loss is the model's loss on text kept aside for judging: lower is "
             "better.</p>", '<section aria-labelledby="by-base"><h2 id="by-base">Held-out loss per language across '
             "base versions</h2><figure>",
             charts.line_chart("chart-bases", "Held-out loss per language across base versions",
                               f"One line per language ({', '.join(languages) or 'none measured'}) over base versions "
                               f"v0 to v{bases[-1]['version'] if bases else 0}; the table below has every value.",
                               prog["bases"], "base version", "held-out loss"),
             "<figcaption>Each base version's loss per language, measured by the hub.</figcaption></figure>",
             table("Held-out loss per language and base version",
                   ["version", "source", *languages],
                   [[f"v{b['version']}", esc(b["source"]),
                     *(loss((b["metrics"].get("heldout") or {}).get(lang)) for lang in languages)] for b in bases],
                   "progress-bases", numeric=languages),
             '</section><section aria-labelledby="by-adapter"><h2 id="by-adapter">Adapters across their versions'
             "</h2>"]
    for name, a in prog["adapters"].items():
        langs = sorted(a["series"])
        shown = len(a["versions"])
        times = [t for line in a["series"].values() for t, _ in line]
        span = max(times) - min(times) if times else 0.0
        note = "" if shown == a["count"] else f" ({shown} of {a['count']} versions shown, evenly spaced)"
        parts += [f'<h3 id="adapter-{esc(name)}">Adapter {esc(name)}</h3><figure>',
                  charts.line_chart(f"chart-adapter-{_SAFE.sub('_', name)}",
                                    f"Held-out loss of adapter {name} per language over time",
                                    f"One line per language ({', '.join(langs) or 'none measured'}) over the "
                                    f"adapter's {a['count']} versions by date; the table below has the values{note}.",
                                    a["series"], "date (UTC)", "held-out loss", charts.time_labels(span),
                                    integer_x=False),
                  f"<figcaption>Adapter {esc(name)} trains {esc(', '.join(a['languages']))}{esc(note)}."
                  "</figcaption></figure>",
                  table(f"Versions of adapter {name}{note}", ["version", "kind", "base", "date", *langs],
                        [[f"v{v['version']}", esc(v["kind"]), f"v{v['base_version']}", esc(when(v["created"])),
                          *(loss(v["heldout"].get(lang)) for lang in langs)] for v in a["versions"]],
                        f"progress-{_SAFE.sub('_', name)}", numeric=langs)]
    parts.append("</section>")
    return page("Progress", "progress.html", "".join(parts), site["built"])


def ledger_page(site: dict[str, Any]) -> str:
    headers = {"id": "#", "received": "received (UTC)", "contributor": "contributor", "adapter": "adapter",
               "lease": "lease", "decision": "decision", "version": "version", "trained_on": "trained on",
               "judged_on": "judged on", "tokens": "tokens", "heldout": "blind held-out loss", "reason": "reason"}
    sortable = {"id", "received", "contributor", "adapter", "decision", "version", "tokens"}
    head = "".join(
        f'<th scope="col" data-key="{c}">'
        + (f'<button type="button" data-sort="{c}">{esc(headers[c])}</button>' if c in sortable else esc(headers[c]))
        + "</th>" for c in LEDGER_COLUMNS)
    total = site["overview"]["totals"]["contributions"]
    body = (
        "<h1>The ledger</h1>"
        f"<p>Every contribution in order ({total:,} in all): who (by pseudonym) returned which adapter under "
        "which lease, its blind held-out loss per language, and the hub's decision with its full reason.</p>"
        '<form id="ledger-filters" class="filters" role="search" aria-label="Filter the ledger">'
        '<label for="f-adapter">Adapter</label><select id="f-adapter" name="adapter"><option value="">all</option>'
        + "".join(f'<option value="{esc(a["name"])}">{esc(a["name"])}</option>' for a in site["overview"]["adapters"])
        + '</select><label for="f-decision">Decision</label><select id="f-decision" name="decision">'
        '<option value="">all</option><option value="accepted">accepted</option>'
        '<option value="rejected">rejected</option></select>'
        '<label for="f-contributor">Contributor</label><input id="f-contributor" name="contributor" '
        'list="contributor-names" autocomplete="off" placeholder="c-…" spellcheck="false">'
        '<datalist id="contributor-names">'
        + "".join(f'<option value="{esc(p)}"></option>' for p in site["contributors"])
        + '</datalist><button type="submit">Filter</button><button type="reset">Clear</button></form>'
        '<p id="ledger-status" role="status" aria-live="polite">Loading the ledger…</p>'
        '<noscript><p>The ledger needs JavaScript to page and filter; each contributor\'s page lists their '
        'contributions without it.</p></noscript>'
        '<div class="scroll"><table id="ledger" class="ledger"><caption>Contributions, oldest first (click a '
        f"column to sort)</caption><thead><tr>{head}</tr></thead><tbody></tbody></table></div>"
        '<nav class="pager" aria-label="Ledger pages"><button type="button" id="prev">Previous page</button>'
        '<span id="page-label"></span><button type="button" id="next">Next page</button></nav>')
    return page("Ledger", "ledger.html", body, site["built"], scripts=["data/ledger-meta.js"])


def ledger_meta(site: dict[str, Any], chunks: int, chunk_rows: int, shown_rows: int) -> dict[str, Any]:
    """What the ledger script needs before any data file: columns, the data files, the total."""
    return {"columns": list(LEDGER_COLUMNS), "chunk_rows": chunk_rows, "total": len(site["ledger"]),
            "files": [f"data/ledger-{i:05d}.js" for i in range(chunks)], "page_rows": shown_rows}


def contributors_page(site: dict[str, Any]) -> str:
    rows = [[contributor_link(p), f"{c['contributions']:,}", f"{c['accepted']:,}", rate(c["acceptance"]),
             tokens(c["tokens"]), ", ".join(f"v{v}" for v in c["absorbed_by"]) or "-"]
            for p, c in site["contributors"].items()]
    body = ("<h1>Contributors</h1><p>Everyone who returned an adapter, by pseudonym: how much they contributed, "
            "how much was accepted, and which base versions carry their work.</p>"
            + table("Contributors by pseudonym", ["contributor", "contributions", "accepted", "acceptance rate",
                                                  "tokens trained", "absorbed into base"], rows, "contributors",
                    numeric=["contributions", "accepted", "acceptance rate", "tokens trained"]))
    return page("Contributors", "contributors.html", body, site["built"])


def contributor_page(site: dict[str, Any], pseudonym: str) -> str:
    c = site["contributors"][pseudonym]
    absorbed = ", ".join(f'<a href="../index.html#base-v{v}">v{v}</a>' for v in c["absorbed_by"])
    rows = []
    for row in c["rows"]:
        r = as_dict(row)
        rows.append([str(r["id"]), esc(when(r["received"])), esc(r["adapter"]), esc(r["lease"]),
                     f'<span class="{esc(r["decision"])}">{esc(r["decision"])}</span>',
                     "-" if r["version"] is None else f"v{r['version']}", tokens(r["tokens"]), esc(losses(r["heldout"])),
                     esc(r["reason"])])
    body = (f"<h1>Contributor {esc(pseudonym)}</h1>"
            + stats([("contributions", "Contributions", f"{c['contributions']:,}"),
                     ("accepted", "Accepted", f"{c['accepted']:,}"), ("acceptance", "Acceptance rate",
                                                                      rate(c["acceptance"])),
                     ("tokens", "Tokens trained (as reported)", tokens(c["tokens"]))])
            + f'<p>Base versions that absorbed this work: <span data-stat="absorbed">{absorbed or "none yet"}</span>. '
            f'<a href="../ledger.html#contributor={esc(pseudonym)}">See these contributions in the ledger</a>.</p>'
            + table(f"Contributions of {pseudonym}, oldest first (UTC)",
                    ["#", "received", "adapter", "lease", "decision", "version", "tokens", "blind held-out loss",
                     "reason"], rows, "contributions", numeric=["#", "tokens"]))
    return page(f"Contributor {pseudonym}", "", body, site["built"], root="../")
