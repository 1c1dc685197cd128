"""Corpora through `datasets`, partitioning through flwr-datasets, token blocks and the held-out split.

Names resolve lazily (PEP 562): ``fedem_flwr.data.labels`` (torch only) serves training on a machine
without `datasets` or flwr-datasets, which only reading and partitioning corpora needs.
"""

from fedem_flwr.lazy import export_lazily

export_lazily(__name__, {
    "HeldoutSplit": "blocks", "heldout_split": "blocks", "tokenize_blocks": "blocks", "without": "blocks",
    "corpus_digest": "corpus", "language_sizes": "corpus", "load_corpus": "corpus",
    "IGNORE_INDEX": "labels", "labels_for": "labels",
    "partition": "partition", "partitions": "partition",
})
