"""Causal-LM labels and loss for token blocks: torch only, so training and evaluation load without `datasets`.

A GPU machine trains and evaluates blocks it is handed; it need not carry `datasets` or
flwr-datasets, which only reading and partitioning corpora needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # the label value torch's cross-entropy and transformers' losses skip


def labels_for(blocks: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Labels for causal-LM ``blocks``: the tokens themselves, -100 at padding."""
    return blocks.masked_fill(blocks == pad_id, IGNORE_INDEX)


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
