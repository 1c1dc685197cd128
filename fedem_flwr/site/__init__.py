"""The public ledger: a static site of the hub's state (``fedem site``), readable offline.

``data`` reads the registry into plain data (pseudonyms only), ``render`` turns it into pages through
the Jinja2 templates, ``build.build_site`` writes them with the stylesheet, the script and the
ledger's data files.
"""
