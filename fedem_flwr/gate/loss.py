"""Held-out loss and perplexity per language: what the blind gate compares before and after an adapter.

The loss of a language is the mean over its target tokens (every token after a block's first, padding
excluded), not a mean of batch means, so it does not depend on the batch size or on how the last
block is padded. Logits are reduced in fp32 whatever precision the model runs in. Blocks may carry
context tokens (``data.labels``: a conversation's user turns): the model reads them, the loss skips
them, and ``tokens`` counts targets only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Optional

import torch

from fedem_flwr.data.labels import inputs_of, labels_for, loss_sum, target_count


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    heldout: Mapping[str, torch.Tensor],
    *,
    pad_id: int,
    batch_size: int = 16,
) -> dict[str, dict[str, float]]:
    """Per held-out key: ``loss`` (target-weighted mean cross-entropy), ``perplexity`` and ``tokens`` (targets)."""
    if batch_size < 1:
        raise ValueError(f"batch_size is {batch_size}; it must be >= 1.")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    results: dict[str, dict[str, float]] = {}
    try:
        for lang in sorted(heldout):
            blocks = heldout[lang]
            total = torch.zeros((), dtype=torch.float64, device=device)
            count = 0
            for x in blocks.split(batch_size):
                y = labels_for(x, pad_id)
                count += target_count(y)  # counted on the CPU: no sync
                x, y = inputs_of(x).to(device), y.to(device)
                total += loss_sum(model(input_ids=x, use_cache=False).logits, y)
            loss = total.item() / count if count else math.nan  # one sync per language
            results[lang] = {"loss": loss, "perplexity": _perplexity(loss), "tokens": float(count)}
    finally:
        model.train(was_training)
    return results


def mean_loss(
    results: Mapping[str, Mapping[str, float]],
    languages: Optional[Iterable[str]] = None,
    *,
    weighting: str = "tokens",
) -> float:
    """Mean loss over ``languages`` (default: all) of an ``evaluate`` result.

    ``weighting="tokens"`` weighs each language by its held-out tokens (the loss over all of them);
    ``"language"`` gives every language the same weight, so a large language cannot hide a small one.
    """
    if weighting not in ("tokens", "language"):
        raise ValueError(f"weighting is {weighting!r}; allowed: 'tokens', 'language'.")
    names = sorted(results) if languages is None else sorted(set(languages))
    missing = [lang for lang in names if lang not in results]
    if missing:
        raise KeyError(f"no held-out result for language(s) {missing}; have {sorted(results)}.")
    weights = [results[lang]["tokens"] if weighting == "tokens" else 1.0 for lang in names]
    if not sum(weights):
        return math.nan
    return sum(results[lang]["loss"] * w for lang, w in zip(names, weights)) / sum(weights)


def _perplexity(loss: float) -> float:
    if math.isnan(loss):
        return math.nan
    return math.exp(loss) if loss < 700 else math.inf  # exp overflows a float beyond ~709
