"""A node's private held-out rows: the share of its rows it never trains on, kept to judge peers' pushes.

With ``gate.peers`` on, the hub asks idle nodes to score a pushed adapter on rows it has never seen
(``fedem_flwr.node.peer_eval``). Each node keeps its own: a row is held out when its keyed ticket,
HMAC-SHA256(secret, language, text, chat) read as a number in [0, 1), falls below the share
``gate.peer_holdout`` sets (``GateConfig.holdout_share``). The ticket depends on the row and the
node's secret only, so the split is stable as rows are added, differs from node to node, and the
hub cannot tell which rows a node holds out (so it cannot steer a contributor to train on them).
With a share of 0 nothing is held out and nothing is hashed: a node trains on all its rows,
exactly as before peers existed.

The secret (node config key ``peer-secret``, a string) never leaves the node. Unset, a simulated
node derives it from ``seed`` and its ``partition-id`` (a simulation has no adversary, and a study
must reproduce); any other node draws 32 random bytes once, kept in ``peer-secret`` under its
cache dir (``cache-dir``, as ``fedem_flwr.node.cache``), readable by its owner only.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

import datasets

from fedem_flwr.config.schema import FedemConfig
from fedem_flwr.data.corpus import CHAT, LANGUAGE, TEXT, column
from fedem_flwr.durable import atomic_write
from fedem_flwr.errors import ConfigError, DataError
from fedem_flwr.node.cache import BaseCache, NodeConfig
from fedem_flwr.node.contributor import NodeData

SECRET_KEY = "peer-secret"  # the node config key, and the file's name in the cache dir
SECRET_BYTES = 32


def peer_secret(cfg: FedemConfig, node_config: NodeConfig) -> bytes:
    """The node's held-out secret: ``peer-secret`` from the node config, else a simulated node's derived
    one, else the one kept in its cache dir (drawn on first use)."""
    if SECRET_KEY in node_config and node_config[SECRET_KEY] != "":
        value = node_config[SECRET_KEY]
        if not isinstance(value, str):
            raise ConfigError(f"node config `{SECRET_KEY}` is {value!r} ({type(value).__name__}); it must be a "
                              f"string, e.g. --node-config '{SECRET_KEY}=\"a long random phrase\"'")
        return value.encode("utf-8")
    if "partition-id" in node_config:
        seed = f"fedem-peer-secret\0{cfg.seed}\0{node_config['partition-id']}"
        return hashlib.sha256(seed.encode("utf-8")).digest()
    return _kept_secret(BaseCache.for_node(node_config).root / SECRET_KEY)


def _kept_secret(path: Path) -> bytes:
    """The secret in ``path``, written once (0600, atomically) if absent; the first of two writers wins."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with atomic_write(path, "wb", permissions=0o600, overwrite=False) as handle:
                handle.write(secrets.token_bytes(SECRET_BYTES))
        except FileExistsError:
            pass  # another process of this node drew it first: use theirs
    return path.read_bytes()


def split_rows(rows: datasets.Dataset, secret: bytes, share: float) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(training rows, held-out rows) of ``rows``, each in ``rows``' order; a share of 0 holds nothing out."""
    if share <= 0.0:
        return rows, rows.select([])
    keyed = hmac.new(secret, digestmod=hashlib.sha256)
    chats = column(rows, CHAT) if CHAT in rows.column_names else [""] * len(rows)
    train, held = [], []
    for index, (language, text, chat) in enumerate(zip(column(rows, LANGUAGE), column(rows, TEXT), chats)):
        ticket = keyed.copy()
        ticket.update(f"{language}\0{text}\0{chat or ''}".encode("utf-8"))
        (held if int.from_bytes(ticket.digest()[:8], "big") / 2.0**64 < share else train).append(index)
    return rows.select(train), rows.select(held)


def training_side(cfg: FedemConfig, node_config: NodeConfig, data: NodeData) -> NodeData:
    """What the node may train on: ``data`` less its held-out rows (``data`` itself when it holds none out).

    Its languages are read from the rows left, so a language held out entirely answers ``no-data``."""
    share = cfg.gate.holdout_share
    if share == 0.0:
        return data
    train, _ = split_rows(data.rows, peer_secret(cfg, node_config), share)
    return NodeData.of(train, data.partition_id, data.num_partitions)


def held_out_side(cfg: FedemConfig, node_config: NodeConfig, data: NodeData) -> datasets.Dataset:
    """The rows the node judges peers on; ``DataError`` when it holds none out (a share of 0)."""
    share = cfg.gate.holdout_share
    if share == 0.0:
        raise DataError("this node holds no rows out to judge peers on (`gate.peer_holdout` leaves a share of 0)")
    _, held = split_rows(data.rows, peer_secret(cfg, node_config), share)
    return held
