"""Split a corpus across nodes with flwr-datasets partitioners: by language, IID, or Dirichlet.

``language`` (natural non-IID) gives each node whole languages, any number of languages over any
number of nodes. ``GroupedNaturalIdPartitioner`` alone cannot do that: it makes
``languages // group_size`` groups, so 10 languages never become 7 groups, and never more groups than
languages. So the language column is first mapped to a node-key column, then that column is
partitioned with ``GroupedNaturalIdPartitioner`` (one key a group, keys sorted, so partition ``i`` is
node ``i``):

* nodes <= languages: languages, largest first, each go whole to the node holding the fewest bytes
  so far (longest-processing-time order), so every node gets at least one language and the big ones
  land on different nodes;
* nodes > languages: every language gets one node, and the spare nodes go one at a time to the
  language with the most bytes per node (D'Hondt), whose rows are then dealt in seeded random order
  over its nodes. A language is never split over more nodes than it has rows.

``iid`` shuffles with the seed and cuts equal contiguous shards (``IidPartitioner``); ``dirichlet``
draws each language's share per node from Dirichlet(alpha) (``DirichletPartitioner``, seeded).
Every node computes the same partitioning from the same corpus and seed.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict

import datasets
import numpy as np
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    GroupedNaturalIdPartitioner,
    IidPartitioner,
    Partitioner,
)

from fedem_flwr.data.corpus import LANGUAGE, column, language_sizes
from fedem_flwr.errors import DataError

SCHEMES = ("language", "iid", "dirichlet")
_NODE = "__node"


def partition(
    ds: datasets.Dataset,
    scheme: str,
    num_partitions: int,
    partition_id: int,
    seed: int,
    alpha: float = 0.5,
) -> datasets.Dataset:
    """Partition ``partition_id`` of ``num_partitions`` of ``ds`` under ``scheme``."""
    if not 0 <= partition_id < max(num_partitions, 1):
        raise DataError(f"partition_id is {partition_id}; it must be in [0, {num_partitions}).")
    return _load(_cached_partitioner(ds, scheme, num_partitions, seed, alpha), partition_id, alpha)


def partitions(
    ds: datasets.Dataset, scheme: str, num_partitions: int, seed: int, alpha: float = 0.5
) -> list[datasets.Dataset]:
    """Every partition, in node order, from one partitioner (for simulations, tables and tests)."""
    partitioner = _partitioner(ds, scheme, num_partitions, seed, alpha)
    return [_load(partitioner, pid, alpha) for pid in range(num_partitions)]


def language_nodes(ds: datasets.Dataset, num_partitions: int, seed: int) -> list[int]:
    """The node index of every row of ``ds`` under the ``language`` scheme (see the module doc)."""
    sizes = language_sizes(ds)
    langs = column(ds, LANGUAGE)
    if num_partitions <= len(sizes):
        node_of = _deal_languages(sizes, num_partitions)
        return [node_of[lang] for lang in langs]
    rows_of: dict[str, list[int]] = {}
    for index, lang in enumerate(langs):
        rows_of.setdefault(lang, []).append(index)
    counts = _nodes_per_language(sizes, {lang: len(rows) for lang, rows in rows_of.items()}, num_partitions)
    nodes = [0] * len(langs)
    first = 0
    rng = np.random.default_rng(seed)
    for lang in sorted(sizes):  # fixed order: node numbers do not depend on row order
        rows = np.asarray(rows_of[lang])
        for offset, chunk in enumerate(np.array_split(rng.permutation(rows), counts[lang])):
            for row in chunk:
                nodes[int(row)] = first + offset
        first += counts[lang]
    return nodes


def _deal_languages(sizes: dict[str, int], num_nodes: int) -> dict[str, int]:
    heap = [(0, node) for node in range(num_nodes)]  # (bytes so far, node): lightest first
    node_of = {}
    for lang, size in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0])):
        load, node = heapq.heappop(heap)
        node_of[lang] = node
        heapq.heappush(heap, (load + size, node))
    return node_of


def _nodes_per_language(sizes: dict[str, int], rows: dict[str, int], num_nodes: int) -> dict[str, int]:
    counts = {lang: 1 for lang in sizes}
    for _ in range(num_nodes - len(sizes)):
        open_langs = [lang for lang in sizes if counts[lang] < rows[lang]]
        # _check guarantees rows >= nodes, so some language can always take one more node.
        best = max(open_langs, key=lambda lang: (sizes[lang] / counts[lang], lang))
        counts[best] += 1
    return counts


_PARTITIONERS: "OrderedDict[tuple, Partitioner]" = OrderedDict()
_PARTITIONERS_KEPT = 4


def _cached_partitioner(ds: datasets.Dataset, scheme: str, num_partitions: int, seed: int, alpha: float) -> Partitioner:
    """One partitioner per corpus and scheme in a process: a simulation asks for each of its nodes'
    partitions (the hub once per node, each node for its profile), and building the partitioner is
    most of the cost (about a second for the demo corpus)."""
    key = (ds._fingerprint, scheme, num_partitions, seed, alpha)
    if key in _PARTITIONERS:
        _PARTITIONERS.move_to_end(key)
        return _PARTITIONERS[key]
    partitioner = _PARTITIONERS[key] = _partitioner(ds, scheme, num_partitions, seed, alpha)
    while len(_PARTITIONERS) > _PARTITIONERS_KEPT:
        _PARTITIONERS.popitem(last=False)
    return partitioner


def _partitioner(ds: datasets.Dataset, scheme: str, num_partitions: int, seed: int, alpha: float) -> Partitioner:
    _check(ds, scheme, num_partitions)
    if scheme == "language":
        partitioner = GroupedNaturalIdPartitioner(partition_by=_NODE, group_size=1, sort_unique_ids=True)
        partitioner.dataset = ds.add_column(_NODE, language_nodes(ds, num_partitions, seed))
    elif scheme == "iid":
        # IidPartitioner cuts contiguous shards: shuffle first, or a language-sorted corpus stays sorted.
        partitioner = IidPartitioner(num_partitions=num_partitions)
        partitioner.dataset = ds.shuffle(seed=seed)
    else:
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions, partition_by=LANGUAGE, alpha=alpha,
            min_partition_size=1, self_balancing=False, shuffle=True, seed=seed,
        )
        partitioner.dataset = ds
    return partitioner


def _load(partitioner: Partitioner, partition_id: int, alpha: float) -> datasets.Dataset:
    try:
        part = partitioner.load_partition(partition_id)
    except ValueError as err:  # DirichletPartitioner: ten draws each left some node empty
        raise DataError(
            f"Dirichlet partitioning over {partitioner.num_partitions} nodes with "
            f"`data.dirichlet_alpha`={alpha} left a node without data ({err}); raise the alpha or "
            "use fewer nodes."
        ) from err
    return part.remove_columns(_NODE) if _NODE in part.column_names else part


def _check(ds: datasets.Dataset, scheme: str, num_partitions: int) -> None:
    if scheme not in SCHEMES:
        raise DataError(f"`data.partitioner` is {scheme!r}; allowed: {', '.join(map(repr, SCHEMES))}.")
    if num_partitions < 1:
        raise DataError(f"num_partitions is {num_partitions}; it must be >= 1.")
    if num_partitions > len(ds):
        raise DataError(
            f"{num_partitions} partitions of a corpus of {len(ds)} rows: some node would get no data; "
            "use fewer nodes or more data."
        )
    if LANGUAGE not in ds.column_names:
        raise DataError(f"the dataset has no {LANGUAGE!r} column; columns found: {ds.column_names}.")


