"""Write the site to a folder: pages, assets, and the ledger as data files the ledger page includes."""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path
from typing import Any

from fedem_flwr.errors import FedemError
from fedem_flwr.hub.registry import Registry
from fedem_flwr.site import render
from fedem_flwr.site.data import PAGE_ROWS, SHOWN_ROWS, pages, site_data

ASSETS = ("site.css", "site.js")
MARKER = ".fedem-site"  # marks a folder as a site this module wrote, so a rebuild may replace its files


class NotASiteFolder(FedemError, ValueError):
    """``--out`` names a folder that holds other files: a build would replace some of them."""


def build_site(registry: Registry, out: Path, now: float, chunk_rows: int = PAGE_ROWS,
               shown_rows: int = SHOWN_ROWS) -> dict[str, Any]:
    """Write the site of ``registry`` as of ``now`` into ``out``; returns what was written.

    The ledger's rows go in data files of ``chunk_rows``; its page shows ``shown_rows`` at a time.

    Data files and contributor pages of an earlier build in ``out`` are replaced, so none is stale.
    """
    out = Path(out)
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).exists():
        raise NotASiteFolder(
            f"{out} is not empty and holds no site written by `fedem site`; a build replaces its data/ and "
            "contributors/ folders, so choose an empty or new folder"
        )
    site = site_data(registry, now)
    for stale in ("data", "contributors"):
        shutil.rmtree(out / stale, ignore_errors=True)
    for folder in ("assets", "data", "contributors"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by `fedem site`; a rebuild replaces this folder's pages\n")
    for name in ASSETS:
        (out / "assets" / name).write_bytes(resources.files("fedem_flwr.site").joinpath("assets", name).read_bytes())
    chunks = pages(site["ledger"], chunk_rows)
    for i, rows in enumerate(chunks):
        _write(out / "data" / f"ledger-{i:05d}.js", render.chunk_data(i, rows))
    _write(out / "data" / "ledger-meta.js",
           render.script_data("FEDEM_LEDGER_META", render.ledger_meta(site, len(chunks), chunk_rows, shown_rows)))
    _write(out / "index.html", render.overview_page(site))
    _write(out / "progress.html", render.progress_page(site))
    _write(out / "ledger.html", render.ledger_page(site))
    _write(out / "contributors.html", render.contributors_page(site))
    for pseudonym in site["contributors"]:
        _write(out / "contributors" / render.slug(pseudonym), render.contributor_page(site, pseudonym))
    totals = site["overview"]["totals"]
    return {"out": str(out), "built": site["built"], "contributions": totals["contributions"],
            "contributors": totals["contributors"], "ledger_files": len(chunks),
            "pages": 4 + len(site["contributors"])}


def _write(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")
