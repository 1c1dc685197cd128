"""Causal-LM labels for token blocks: torch only, so training and evaluation load without `datasets`.

A GPU machine trains and evaluates blocks it is handed; it need not carry `datasets` or
flwr-datasets, which only reading and partitioning corpora needs.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # the label value torch's cross-entropy and transformers' losses skip


def labels_for(blocks: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Labels for causal-LM ``blocks``: the tokens themselves, -100 at padding."""
    return blocks.masked_fill(blocks == pad_id, IGNORE_INDEX)
