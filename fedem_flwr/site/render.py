"""The site's pages as HTML strings, from ``data.site_data`` (pure: writing files lives in ``build``).

The pages are Jinja2 templates (``templates/``) rendered with autoescape, so every text from the
registry (an adapter, a language, a reason: names an operator's catalog chose) is escaped by the
template engine. This module picks what each page shows; the templates say how it looks. Every
page is plain HTML with one stylesheet and one small script (``assets/``): tables sort without the
script too, and every figure is an inline SVG with a title, a description and the table of its
numbers beside it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any, Optional

from jinja2 import Environment, PackageLoader, StrictUndefined

from fedem_flwr.site import charts
from fedem_flwr.site.data import LEDGER_COLUMNS, as_dict, by_task

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


def signed(value: Optional[float]) -> str:
    """``-0.041``, ``+0.120``: a delta (candidate minus parent loss) with its sign (``+ 0.0``: never ``-0.000``)."""
    return "-" if value is None else f"{value + 0.0:+.3f}"


def weight(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def judged(judges: dict[str, Any]) -> str:
    """``hub -0.021 on 480 tokens (accept); peers 3/3 -0.041 on 1,536 tokens (veto: agreed)``: how the hub
    and the peers judged a push (``data.judges_of``)."""
    parts = []
    hub = judges.get("hub")
    if hub:
        verdict = "" if hub["accepted"] is None else f" ({'accept' if hub['accepted'] else 'reject'})"
        parts.append(f"hub {signed(hub['delta'])} on {tokens(hub['tokens'])} tokens{verdict}")
    p = judges["peers"]
    effect = ": ".join(str(word) for word in (p["role"], p["effect"]) if word)  # empty when the peers had no say
    parts.append(f"peers {dash(p['counted'])}/{dash(p['asked'])} {signed(p['delta'])} on {tokens(p['tokens'])} "
                 f"tokens" + (f" ({effect})" if effect else ""))
    return "; ".join(parts)


def peer_report(report: dict[str, Any]) -> str:
    """``c-1a2b3c4d5e6f -0.030 on 512 tokens, weight 1.00, counted``: one peer's part in a judgement."""
    return (f"{dash(report['peer'])} {signed(report['delta'])} on {tokens(report['tokens'])} tokens, "
            f"weight {weight(report['weight'])}, {dash(report['outcome'])}")


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


def held(count: int, lanes: Any) -> str:
    """``2/3 lanes`` held of the hub's ``relay.lanes``; ``2 holders`` when the hub has not recorded them."""
    if not isinstance(lanes, int) or isinstance(lanes, bool):
        return f"{count} holder{'' if count == 1 else 's'}"
    return f"{count}/{lanes} lanes"


def slug(pseudonym: str) -> str:
    """A contributor page's file name (pseudonyms are ``c-`` and hex; anything else is made safe)."""
    return anchor(pseudonym) + ".html"


def anchor(name: str) -> str:
    """``name`` as an element id or file name: anything but letters, digits and ``_.-`` becomes ``_``."""
    return _SAFE.sub("_", name)


def version(number: Optional[int]) -> str:
    return "-" if number is None else f"v{number}"


def dash(value: Any) -> Any:
    return "-" if value is None else value


def number(value: int) -> str:
    return f"{value:,}"


def script_data(name: str, value: Any) -> str:
    """A data file for ``<script src>`` (browsers refuse fetch() of file:// pages): ``window[name] = value``."""
    return f"window.{name} = {json.dumps(value, ensure_ascii=True, separators=(',', ':'))};\n"


def chunk_data(index: int, rows: Sequence[Any]) -> str:
    """One ledger data file: rows ``index * PAGE_ROWS`` onwards, registered under their chunk index."""
    body = json.dumps(list(rows), ensure_ascii=True, separators=(",", ":"))
    return f"(window.FEDEM_LEDGER = window.FEDEM_LEDGER || {{}})[{index}] = {body};\n"


# -- pages ----------------------------------------------------------------------------------------
ENV = Environment(loader=PackageLoader("fedem_flwr.site", "templates"), autoescape=True, undefined=StrictUndefined,
                  trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
ENV.filters.update(loss=loss, losses=losses, tokens=tokens, rate=rate, when=when, left=left, held=held, slug=slug,
                   anchor=anchor, version=version, dash=dash, number=number, judged=judged, peer_report=peer_report)
ENV.globals.update(SITE=SITE, NAV=NAV)
# The ledger's column headings, and which of them sort (the others hold lists or free text).
LEDGER_HEADERS = {"id": "#", "received": "received (UTC)", "contributor": "contributor", "adapter": "adapter",
                  "lease": "lease", "decision": "decision", "version": "version", "trained_on": "trained on",
                  "judged_on": "judged on", "tokens": "tokens", "heldout": "blind held-out loss", "reason": "reason"}
FOLDED = frozenset({"judges"})  # ledger columns shown within another's cell (the peers' judgement: held-out loss)
LEDGER_SORTABLE = frozenset({"id", "received", "contributor", "adapter", "decision", "version", "tokens"})


def page(template: str, title: str, current: str, built: str, root: str = "", scripts: Sequence[str] = (),
         **shown: Any) -> str:
    """One page: ``template`` fills the frame (``page.html``) with what ``shown`` holds."""
    return ENV.get_template(template).render(title=title, current=current, built=built, root=root,
                                             scripts=scripts, **shown)


def svg(chart: charts.Chart) -> str:
    """One chart as the inline SVG the pages hold (for a figure on its own)."""
    return str(ENV.get_template("chart.html").module.line_chart(chart))


def overview_page(site: dict[str, Any]) -> str:
    view = site["overview"]
    languages = sorted({lang for b in view["bases"] for lang in (b["metrics"].get("heldout") or {})})
    return page("overview.html", "Overview", "index.html", site["built"], totals=view["totals"],
                bases=view["bases"], languages=languages, refused=view["refused"], groups=view["groups"],
                lanes=view["lanes"], contributors=site["contributors"])


def progress_page(site: dict[str, Any]) -> str:
    prog = site["progress"]
    languages = sorted(prog["bases"])
    drawn = sorted({v for line in prog["bases"].values() for v, _ in line})
    span = (f"base versions v{drawn[0]} to v{drawn[-1]}" if len(drawn) > 1 else
            f"base version v{drawn[0]}" if drawn else "no base version yet")  # v0 only once the hub measured it
    by_base = charts.line_chart("chart-bases", "Held-out loss per language across base versions",
                                f"One line per language ({', '.join(languages) or 'none measured'}) over {span}; "
                                "the table below has every value.",
                                prog["bases"], "base version", "held-out loss")
    adapters = []
    for name, a in prog["adapters"].items():
        shown = len(a["versions"])
        note = "" if shown == a["count"] else f" ({shown} of {a['count']} versions shown, evenly spaced)"
        adapters.append({"name": name, "languages": a["languages"], "task": a["task"], "domain": a["domain"],
                         "measured": list(a["series"]), "versions": a["versions"], "note": note,
                         "chart": adapter_chart(name, a, note)})
    return page("progress.html", "Progress", "progress.html", site["built"], by_base=by_base,
                bases=site["overview"]["bases"], languages=languages, groups=by_task(adapters))


def adapter_chart(name: str, adapter: dict[str, Any], note: str) -> charts.Chart:
    """Held-out loss on each of an adapter's own held-out sets over its versions, by date (``data.progress``'s
    ``adapters``): a language adapter's languages, a chat adapter's conversations (``en:chat``)."""
    keys = list(adapter["series"])
    times = [t for line in adapter["series"].values() for t, _ in line]
    return charts.line_chart(
        f"chart-adapter-{anchor(name)}", f"Held-out loss of adapter {name} on its held-out sets over time",
        f"One line per held-out set it is judged on ({', '.join(keys) or 'none measured'}) over the adapter's "
        f"{adapter['count']} versions by date; the table below has the values{note}.", adapter["series"],
        "date (UTC)", "held-out loss", charts.time_labels(max(times) - min(times) if times else 0.0), integer_x=False)


def ledger_page(site: dict[str, Any]) -> str:
    columns = [(c, LEDGER_HEADERS[c], c in LEDGER_SORTABLE) for c in LEDGER_COLUMNS if c not in FOLDED]
    return page("ledger.html", "Ledger", "ledger.html", site["built"], scripts=["data/ledger-meta.js"],
                total=site["overview"]["totals"]["contributions"], adapters=site["overview"]["adapters"],
                contributors=list(site["contributors"]), columns=columns)


def ledger_meta(site: dict[str, Any], chunks: int, chunk_rows: int, shown_rows: int) -> dict[str, Any]:
    """What the ledger script needs before any data file: columns, the data files, the total."""
    return {"columns": list(LEDGER_COLUMNS), "chunk_rows": chunk_rows, "total": len(site["ledger"]),
            "files": [f"data/ledger-{i:05d}.js" for i in range(chunks)], "page_rows": shown_rows}


def contributors_page(site: dict[str, Any]) -> str:
    return page("contributors.html", "Contributors", "contributors.html", site["built"],
                people=list(site["contributors"].values()))


def contributor_page(site: dict[str, Any], pseudonym: str) -> str:
    c = site["contributors"][pseudonym]
    return page("contributor.html", f"Contributor {pseudonym}", "", site["built"], root="../", c=c,
                rows=[as_dict(row) for row in c["rows"]])
