"""Token blocks, their labels and loss: torch and numpy only, so training and evaluation load without `datasets`.

A GPU machine trains and evaluates blocks it is handed; it need not carry `datasets` or
flwr-datasets, which only reading and partitioning corpora needs.

One int64 tensor carries both a block's inputs and which of its tokens are targets. A *target* is
stored as its id; a *context* token (read by the model, never scored: the user's and system's turns
of a conversation) as its bitwise complement ``~id``, which is negative. So every path that slices,
batches, shuffles, moves or caps blocks keeps the mask with no change, and blocks of plain text (no
negative entry) are exactly what they were before masks existed. Whatever feeds blocks to a model
feeds :func:`inputs_of` them; :func:`labels_for` turns them into labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fedem_flwr.errors import ConfigError, DataError

IGNORE_INDEX = -100  # the label value torch's cross-entropy and transformers' losses skip


def labels_for(blocks: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Labels for causal-LM ``blocks``: the targets' ids, -100 at padding and at context tokens."""
    return blocks.masked_fill((blocks == pad_id) | (blocks < 0), IGNORE_INDEX)


def inputs_of(blocks: torch.Tensor) -> torch.Tensor:
    """The token ids a model reads from ``blocks``: context tokens (``~id``) turned back into ids."""
    return torch.where(blocks < 0, ~blocks, blocks)


def target_count(labels: torch.Tensor) -> int:
    """Tokens a causal LM is scored on: every label after a block's first, padding excluded."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the targets of ``labels``, computed in fp32.

    fp32 whatever the model ran in: a bf16 log-softmax over the vocabulary loses the small
    differences training needs.
    """
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="sum",
    )


def special_ids(tokenizer) -> tuple[int, int]:
    """(eos, pad) ids; a tokenizer without pad pads with eos (then eos labels are masked too)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(f"tokenizer {type(tokenizer).__name__} has no eos token; blocks need one between documents.")
    pad = tokenizer.pad_token_id
    return eos, (eos if pad is None else pad)


def check_block_size(block_size: int) -> None:
    """Refuse a block too short to hold one input and its next-token target."""
    if block_size < 2:
        raise ConfigError(f"`data.block_size` is {block_size}; a block needs at least 2 tokens.")


def pack_blocks(documents: Sequence[np.ndarray], pad: int, block_size: int) -> torch.Tensor:
    """int64 ``[n, block_size]``: ``documents`` (each already ending in its eos) concatenated, cut in
    rows of ``block_size``, only the last row padded (nanoGPT's packing: no token is wasted)."""
    if not documents:
        return torch.empty((0, block_size), dtype=torch.long)
    flat = torch.from_numpy(np.concatenate([np.asarray(doc, dtype=np.int64) for doc in documents]))
    n_blocks = -(-flat.numel() // block_size)  # ceiling division
    blocks = torch.full((n_blocks * block_size,), pad, dtype=torch.long)
    blocks[: flat.numel()] = flat
    return blocks.view(n_blocks, block_size)
