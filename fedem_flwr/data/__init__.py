"""Corpora through `datasets`, partitioning through flwr-datasets, token blocks and the held-out split."""

from fedem_flwr.data.blocks import heldout_split, labels_for, tokenize_blocks
from fedem_flwr.data.corpus import language_sizes, load_corpus
from fedem_flwr.data.partition import partition, partition_languages, partitions, spread

__all__ = [
    "heldout_split", "labels_for", "language_sizes", "load_corpus", "partition",
    "partition_languages", "partitions", "spread", "tokenize_blocks",
]
