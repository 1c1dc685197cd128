"""Token blocks for training and evaluation, and the hub's held-out split.

Blocks follow nanoGPT: documents are tokenized, each followed by ``eos``, concatenated and cut into
rows of ``block_size``; only the last row is padded, and ``labels_for`` sets its padding to -100 so
padding never counts in a loss.

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

from fedem_flwr.data.corpus import LANGUAGE, TEXT, column
from fedem_flwr.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def tokenize_blocks(texts: Iterable[str], tokenizer, block_size: int) -> torch.Tensor:
    """int64 ``[n, block_size]``: documents each followed by eos, cut in blocks, the tail padded."""
    if block_size < 2:
        raise ConfigError(f"`data.block_size` is {block_size}; a block needs at least 2 tokens.")
    eos, pad = special_ids(tokenizer)
    if isinstance(texts, datasets.arrow_dataset.Column) and isinstance(texts.source, datasets.Dataset):
        texts = column(texts.source, texts.column_name)  # ds["text"]: read through Arrow, 30x faster
    texts = [t for t in texts if t]
    if not texts:
        return torch.empty((0, block_size), dtype=torch.long)
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    flat = torch.from_numpy(np.concatenate([np.asarray([*doc, eos], dtype=np.int64) for doc in ids]))
    n_blocks = -(-flat.numel() // block_size)  # ceiling division
    blocks = torch.full((n_blocks * block_size,), pad, dtype=torch.long)
    blocks[: flat.numel()] = flat
    return blocks.view(n_blocks, block_size)


def special_ids(tokenizer) -> tuple[int, int]:
    """(eos, pad) ids; a tokenizer without pad pads with eos (then eos labels are masked too)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(f"tokenizer {type(tokenizer).__name__} has no eos token; blocks need one between documents.")
    pad = tokenizer.pad_token_id
    return eos, (eos if pad is None else pad)


MIN_KEY_BYTES = 16


@dataclass(frozen=True)
class HeldoutSplit:
    """What the keyed split decided: rows that train, held-out blocks, and the rows kept out."""

    train: datasets.Dataset
    heldout: dict[str, torch.Tensor]
    withheld: frozenset[tuple[str, str]]
    """(language, text) of every row kept out of training, test rows included: drop them from any node's rows."""
    test: dict[str, torch.Tensor] = field(default_factory=dict)
    """Test blocks per language (empty without ``test_fraction``): read only after a run, for its final numbers."""


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
) -> HeldoutSplit:
    """Training rows of ``ds``, held-out (and test) token blocks per language and the withheld rows
    (module doc)."""
    if min_blocks < 2:
        raise ConfigError(f"`data.min_heldout_blocks` is {min_blocks}; held-out data needs at least 2 blocks.")
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"`data.heldout_fraction` is {fraction!r}; it must be in [0, 1).")
    if not 0.0 <= test_fraction < 1.0 or fraction + test_fraction >= 1.0:
        raise ConfigError(f"`data.test_fraction` is {test_fraction!r}; it must be in [0, 1) and leave text to "
                          f"train on with `data.heldout_fraction` {fraction!r} (their sum below 1).")
    _check_key(key)
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
    train = ds.select([i for i in range(len(ds)) if i not in dropped]) if dropped else ds
    withheld = frozenset((langs[i], texts[i]) for i in dropped)
    test, heldout = sets
    return HeldoutSplit(train, heldout, withheld, test)


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
