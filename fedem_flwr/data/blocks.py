"""Token blocks for training and evaluation, and the hub's held-out split.

Blocks follow nanoGPT: documents are tokenized, each followed by ``eos``, concatenated and cut into
rows of ``block_size``; only the last row is padded, and ``labels_for`` sets its padding to -100 so
padding never counts in a loss. Conversations pack the same way (``data.chat.chat_blocks``), their
context tokens stored as ``~id`` (``data.labels``).

The held-out split is decided per language by a keyed lottery: each row draws a ticket,
HMAC-SHA256(key, language, text), and rows are held out in ticket order until their text reaches
``fraction`` of the language's text. The share held out is thus the same whatever the key (a small
language keeps its held-out data on every hub); only which rows make it up depends on the key. The key derives from the hub's secret, so
only the hub can tell which rows it holds out: a node that holds the whole corpus cannot rebuild the
held-out set and train on it. The hub hands each simulated node its training rows instead (its
partition minus ``HeldoutSplit.withheld``, see :func:`without`). Tickets depend on nothing but the
row and the key, so any row order gives the same split, and exact duplicates share one ticket and
one fate (a duplicated conversation never sits on both sides). A language whose held-out rows give fewer than
``min_blocks`` full blocks is training-only: its held-out rows go back to training and it gets no
held-out entry, unless it is named in ``heldout_languages``, whose held-out rows are withheld from
training whatever their size.

A study may also keep a *test* split (``test_fraction`` > 0): the same lottery draws rows into the
test set first, until their text reaches ``test_fraction`` of the language's, then into the held-out
set, in the same ticket order. With ``test_fraction`` 0 the held-out set is exactly the one drawn
without a test split, bit for bit. Test rows are withheld like held-out rows (no node, CPT or
baseline trains on them) and follow the same ``min_blocks`` rule; nothing in a run reads them: the
gate, merges and CPT judge on the held-out set, and a study's final numbers use the test set.

Task adapters are judged on held-out sets of their own (``extra_keys``: ``en:chat``, ``en@health``,
see ``data.tasks``), cut from the rows the language's lottery already withheld: the same rows stay
out of training, no language's split moves, and a task never sees a row its language trains on. A
key keeps its language's rows of its domain (when it names one); ``chat`` keeps the conversations
among them, rendered with the chat template and scored on the assistant's tokens, ``text`` their
flat text. A key whose rows give fewer than ``min_blocks`` full blocks gets no entry.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field

import datasets
import numpy as np
import torch

from fedem_flwr.data.chat import chat_blocks, parse_messages
from fedem_flwr.data.corpus import CHAT, DOMAIN, LANGUAGE, TEXT, column
from fedem_flwr.data.labels import check_block_size, pack_blocks, special_ids
from fedem_flwr.data.tasks import CHAT as CHAT_FORMAT
from fedem_flwr.data.tasks import FORMATS, DataKey, parse_key
from fedem_flwr.errors import ConfigError

log = logging.getLogger(__name__)


def tokenize_blocks(texts: Iterable[str], tokenizer, block_size: int) -> torch.Tensor:
    """int64 ``[n, block_size]``: documents each followed by eos, cut in blocks, the tail padded."""
    check_block_size(block_size)
    eos, pad = special_ids(tokenizer)
    if isinstance(texts, datasets.arrow_dataset.Column) and isinstance(texts.source, datasets.Dataset):
        texts = column(texts.source, texts.column_name)  # ds["text"]: read through Arrow, 30x faster
    texts = [t for t in texts if t]
    if not texts:
        return torch.empty((0, block_size), dtype=torch.long)
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return pack_blocks([np.asarray([*doc, eos], dtype=np.int64) for doc in ids], pad, block_size)


MIN_KEY_BYTES = 16


@dataclass(frozen=True)
class HeldoutSplit:
    """What the keyed split decided: rows that train, held-out blocks, and the rows kept out."""

    train: datasets.Dataset
    heldout: dict[str, torch.Tensor]
    """Held-out blocks per held-out key: each language's, and each task key's (``en:chat``)."""
    withheld: frozenset[tuple[str, str]]
    """(language, text) of every row kept out of training, test rows included: drop them from any node's rows."""
    test: dict[str, torch.Tensor] = field(default_factory=dict)
    """Test blocks per held-out key (empty without ``test_fraction``): read only after a run, for its final numbers."""


def heldout_split(
    ds: datasets.Dataset,
    fraction: float,
    min_blocks: int,
    block_size: int,
    tokenizer,
    key: bytes,
    *,
    heldout_languages: Collection[str] | None = None,
    test_fraction: float = 0.0,
    extra_keys: Collection[str] = (),
) -> HeldoutSplit:
    """Training rows of ``ds``, held-out (and test) token blocks per language and per task key of
    ``extra_keys``, and the withheld rows (module doc)."""
    if min_blocks < 2:
        raise ConfigError(f"`data.min_heldout_blocks` is {min_blocks}; held-out data needs at least 2 blocks.")
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"`data.heldout_fraction` is {fraction!r}; it must be in [0, 1).")
    if not 0.0 <= test_fraction < 1.0 or fraction + test_fraction >= 1.0:
        raise ConfigError(f"`data.test_fraction` is {test_fraction!r}; it must be in [0, 1) and leave text to "
                          f"train on with `data.heldout_fraction` {fraction!r} (their sum below 1).")
    _check_key(key)
    task_keys = _task_keys(extra_keys)
    withheld_languages = set(heldout_languages or ())
    _, pad = special_ids(tokenizer)
    tickets: dict[str, list[tuple[float, str, int]]] = {}
    texts, langs = column(ds, TEXT), column(ds, LANGUAGE)
    for index, (text, lang) in enumerate(zip(texts, langs)):
        tickets.setdefault(lang, []).append((row_key(key, lang, text), text, index))
    # Test rows first, then held-out rows, in one ticket order: without a test split the held-out
    # rows are exactly those drawn before test splits existed.
    drawn = {lang: _draw(rows, (test_fraction, fraction)) for lang, rows in tickets.items()}

    sets: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] = ({}, {})  # test, held-out
    dropped: set[int] = set()
    training_only = []
    for lang in sorted(set(langs)):
        for part, (blocks_by_language, rows) in enumerate(zip(sets, drawn.get(lang, ([], [])))):
            if part == 0 and not rows:
                continue  # no test split: nothing to say
            blocks = tokenize_blocks((text for _, text, _ in rows), tokenizer, block_size)
            full = int((blocks != pad).all(dim=1).sum())
            if full >= min_blocks:
                blocks_by_language[lang] = blocks
            elif lang not in withheld_languages:
                training_only.append(f"{lang}{' test' if part == 0 else ''} ({full} of {min_blocks} blocks)")
                continue
            dropped.update(index for _, _, index in rows)
    if training_only:
        log.info("too little held-out text, training-only: %s", ", ".join(training_only))
    if task_keys:
        _task_sets(task_keys, ds, drawn, dropped, sets, tokenizer, block_size, min_blocks, test_fraction > 0)
    train = ds.select([i for i in range(len(ds)) if i not in dropped]) if dropped else ds
    withheld = frozenset((langs[i], texts[i]) for i in dropped)
    test, heldout = sets
    return HeldoutSplit(train, heldout, withheld, test)


def _task_keys(extra_keys: Collection[str]) -> dict[str, DataKey]:
    """The task keys among ``extra_keys`` (a bare language has its set already), checked."""
    keys = {}
    for name in sorted(set(extra_keys)):
        data_key = parse_key(name)
        if data_key.data_format not in FORMATS:
            raise ConfigError(f"held-out key {name!r} names format {data_key.data_format!r}; formats: {FORMATS}.")
        if data_key != DataKey(data_key.language):
            keys[name] = data_key
    return keys


def _task_sets(
    task_keys: dict[str, DataKey],
    ds: datasets.Dataset,
    drawn: dict[str, list[list[tuple[float, str, int]]]],
    dropped: set[int],
    sets: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]],
    tokenizer,
    block_size: int,
    min_blocks: int,
    with_test: bool,
) -> None:
    """Add each task key's test and held-out blocks to ``sets``, from its language's withheld rows."""
    _, pad = special_ids(tokenizer)
    tags = _row_tags(ds, sorted(dropped))
    too_small = []
    for name, data_key in task_keys.items():
        for part, blocks_by_key in enumerate(sets):
            if part == 0 and not with_test:
                continue
            rows = [row for row in drawn.get(data_key.language, ([], []))[part] if row[2] in dropped]
            blocks = _task_blocks(data_key, rows, tags, tokenizer, block_size)
            full = int((blocks != pad).all(dim=1).sum())
            if full >= min_blocks:
                blocks_by_key[name] = blocks
            else:
                too_small.append(f"{name}{' test' if part == 0 else ''} ({full} of {min_blocks} blocks)")
    if too_small:
        log.info("too little held-out data for a task key, no held-out set: %s", ", ".join(too_small))


def _row_tags(ds: datasets.Dataset, indices: list[int]) -> dict[int, tuple[str, str]]:
    """(chat, domain) of the rows at ``indices`` (the withheld ones: the training rows' conversations are
    never read here); "" where ``ds`` has no such column (rows from before tasks)."""
    rows = ds.select(indices)
    chats = column(rows, CHAT) if CHAT in ds.column_names else [""] * len(indices)
    domains = column(rows, DOMAIN) if DOMAIN in ds.column_names else [""] * len(indices)
    return {index: (chat or "", domain or "") for index, chat, domain in zip(indices, chats, domains)}


def _task_blocks(
    data_key: DataKey, rows: list[tuple[float, str, int]], tags: dict[int, tuple[str, str]], tokenizer,
    block_size: int,
) -> torch.Tensor:
    """Blocks of ``rows`` (one language's withheld rows) that ``data_key`` keeps, in ticket order."""
    kept = sorted(
        (ticket, text, *tags[index]) for ticket, text, index in rows
        if not data_key.domain or tags[index][1] == data_key.domain
    )  # by ticket, then content: duplicates in any corpus order give the same blocks
    if data_key.data_format == CHAT_FORMAT:
        conversations = [parse_messages(chat, where=f"held-out row of {data_key}") for _, _, chat, _ in kept if chat]
        return chat_blocks(conversations, tokenizer, block_size)
    return tokenize_blocks([text for _, text, _, _ in kept], tokenizer, block_size)


def _draw(rows: list[tuple[float, str, int]], fractions: Sequence[float]) -> list[list[tuple[float, str, int]]]:
    """Consecutive parts of ``rows`` in ticket order, each until its text reaches its fraction of the
    language's (in UTF-8 bytes); rows sharing a part's last ticket (exact duplicates) go along with it."""
    ordered = sorted(rows)
    total = sum(len(text.encode("utf-8")) for _, text, _ in ordered)
    parts, start = [], 0
    for fraction in fractions:
        target = fraction * total
        taken, size = start, 0
        while taken < len(ordered) and size < target:
            size += len(ordered[taken][1].encode("utf-8"))
            taken += 1
        while start < taken < len(ordered) and ordered[taken][0] == ordered[taken - 1][0]:
            taken += 1
        parts.append(ordered[start:taken])  # ticket order, not corpus order: the same blocks for any order
        start = taken
    return parts


def without(ds: datasets.Dataset, withheld: Collection[tuple[str, str]]) -> datasets.Dataset:
    """``ds`` less the rows whose (language, text) is in ``withheld``: a node's share of training rows."""
    if not withheld:
        return ds
    pairs = zip(column(ds, LANGUAGE), column(ds, TEXT))
    keep = [i for i, pair in enumerate(pairs) if pair not in withheld]
    return ds if len(keep) == len(ds) else ds.select(keep)


def row_key(key: bytes, language: str, text: str) -> float:
    """A uniform number in [0, 1) fixed by (key, language, text): the row's held-out lottery ticket.

    Keyed (HMAC-SHA256): without ``key`` nobody can compute a row's ticket.
    """
    digest = hmac.new(key, f"{language}\x00{text}".encode("utf-8"), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _check_key(key: object) -> None:
    if not isinstance(key, bytes) or len(key) < MIN_KEY_BYTES:
        got = f"{len(key)} bytes" if isinstance(key, bytes) else type(key).__name__
        raise ConfigError(
            f"the held-out split key is {got}; it must be at least {MIN_KEY_BYTES} secret bytes derived from "
            "the hub's secret (`Registry.derived_key`), so that no node can rebuild the split."
        )
