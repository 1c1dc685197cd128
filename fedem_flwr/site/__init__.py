"""The public ledger: a static site of the hub's state (``fedem site``), readable offline.

``data`` reads the registry into plain data (pseudonyms only), ``render`` turns it into pages,
``build_site`` writes them with the stylesheet, the script and the ledger's data files.
"""

from __future__ import annotations

from fedem_flwr.site.build import build_site

__all__ = ["build_site"]
