"""Corpora through `datasets`, partitioning through flwr-datasets, token blocks and the held-out
split. ``data.labels`` needs torch alone, so a machine that only trains carries no `datasets`."""
