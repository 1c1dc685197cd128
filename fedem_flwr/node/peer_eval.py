"""A peer's judgement of a pushed adapter: its loss and its parent's on the node's own held-out rows.

The node scores both adapters on exactly the same blocks (the first ``max_blocks`` of each asked
language's held-out rows, selected and rendered as a lease of the same task and domain would be:
``contributor.lease_rows`` and ``contributor.task_blocks``), so the hub can compare them pair by pair;
it learns only token counts and two mean losses per language, never a row.

The loss is the hub's own (``gate.loss.evaluate``: token-weighted, context tokens and padding
skipped, fp32), handed in by the ClientApp as ``score``: ``node`` and ``gate`` are independent
layers (pyproject's import contracts), so a node module cannot import it, and a second copy of
the loss would drift from the hub's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import datasets
import torch

from fedem_flwr.config.schema import FedemConfig
from fedem_flwr.data.tasks import CAUSAL_LM
from fedem_flwr.errors import DataError
from fedem_flwr.model.factory import load_base
from fedem_flwr.model.lora import attach_lora, load_adapter_state
from fedem_flwr.node.contributor import NodeData, lease_rows, task_blocks
from fedem_flwr.training.device import pick_device

log = logging.getLogger(__name__)

# ``gate.loss.evaluate``'s shape: (model, blocks per language, pad_id=, batch_size=) -> per language
# {"loss": mean over target tokens, "tokens": target tokens, ...}.
Score = Callable[..., Mapping[str, Mapping[str, float]]]


def peer_blocks(
    rows: datasets.Dataset, languages: Sequence[str], tokenizer, block_size: int, *, task: str = CAUSAL_LM,
    domain: str = "", max_blocks: int,
) -> dict[str, torch.Tensor]:
    """The first ``max_blocks`` blocks of each asked language the node holds held-out ``rows`` in; a
    language without any is left out, and none at all raises ``DataError`` (the node answers ``no-data``)."""
    data = NodeData.of(rows)
    blocks: dict[str, torch.Tensor] = {}
    for language in dict.fromkeys(languages):
        try:
            mine = lease_rows(data, (language,), task, domain)
        except DataError:
            continue  # no held-out rows of it (of that domain, or conversations): nothing to judge on
        picked = task_blocks(mine, tokenizer, block_size, task)[:max_blocks]  # the first: rows are a keyed sample
        if len(picked):
            blocks[language] = picked
    if not blocks:
        where = f" of domain {domain!r}" if domain else ""
        raise DataError(f"this node holds no held-out rows{where} in {','.join(languages)} for task {task!r}")
    return blocks


def peer_evaluate(
    cfg: FedemConfig,
    base_folder: Path,
    candidate_state: Mapping[str, torch.Tensor],
    parent_state: Mapping[str, torch.Tensor],
    rows: datasets.Dataset,
    languages: Sequence[str],
    *,
    task: str = CAUSAL_LM,
    domain: str = "",
    max_blocks: int,
    score: Score,
) -> dict[str, tuple[int, float, float]]:
    """Per judged language: (scored target tokens, mean loss of base+candidate, of base+parent) on the
    same blocks of the node's held-out ``rows`` (``peer_blocks``). ``score`` is ``gate.loss.evaluate``."""
    model, tokenizer = load_base(str(base_folder))
    blocks = peer_blocks(rows, languages, tokenizer, cfg.data.block_size, task=task, domain=domain,
                         max_blocks=max_blocks)
    model = attach_lora(model.to(pick_device(cfg.train.device)), cfg.lora)
    losses = []
    for state in (candidate_state, parent_state):
        load_adapter_state(model, state)  # validated against the model's own adapter spec
        losses.append(score(model, blocks, pad_id=tokenizer.pad_token_id, batch_size=cfg.train.eval_batch_size))
    candidate, parent = losses
    log.info("Peer judgement (%s%s): %s", task, f", domain {domain}" if domain else "",
             ", ".join(f"{language} {len(b)} blocks" for language, b in blocks.items()))
    results = {
        language: (int(candidate[language]["tokens"]), float(candidate[language]["loss"]),
                   float(parent[language]["loss"]))
        for language in blocks
        if candidate[language]["tokens"] > 0  # blocks of context only score nothing: nothing to report
    }
    if not results:
        raise DataError(f"this node's held-out blocks in {','.join(blocks)} hold no scored tokens")
    return results
