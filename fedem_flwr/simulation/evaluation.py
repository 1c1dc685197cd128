"""The final numbers of a simulated method: each language's adapter on that language's held-out
blocks, with the hub's blind evaluator, on a given base checkpoint.

Every method (relay, FedAvg, the centralized and local-only baselines) reports through
``final_losses``, so their tables compare the same measurement.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import torch

from fedem_flwr.gate.evaluator import HubWorkbench
from fedem_flwr.model.factory import load_base
from fedem_flwr.relay.bootstrap import Hub, build_workbench

_workbenches: dict[tuple[int, str], HubWorkbench] = {}


def base_folder_of(hub: Hub, version: int) -> Path:
    """The stored folder of base checkpoint ``version``."""
    checkpoint = hub.registry.checkpoint(version)
    if checkpoint is None:
        raise KeyError(f"the hub has no base checkpoint v{version}")
    return Path(hub.store.get(checkpoint.ref))


def workbench_on(hub: Hub, base_folder: Optional[Path] = None) -> HubWorkbench:
    """The hub's evaluator on ``base_folder`` (the hub's own when None or its current base's folder).

    Same held-out blocks, batch size, block cap and LoRA spec as the hub's; built once per folder."""
    latest = hub.registry.latest_checkpoint()
    if base_folder is None or (latest is not None and Path(base_folder) == Path(hub.store.get(latest.ref))):
        return hub.workbench
    key = (id(hub), str(Path(base_folder).resolve()))
    if key not in _workbenches:
        model, tokenizer = load_base(str(base_folder))
        _workbenches[key] = build_workbench(hub.cfg, model, tokenizer.pad_token_id, hub.split.heldout)
    return _workbenches[key]


def final_losses(
    hub: Hub, states_by_language: Mapping[str, Mapping[str, torch.Tensor]], base_folder: Optional[Path] = None
) -> dict[str, float]:
    """Held-out loss of each language's adapter state on that language alone; languages without
    held-out blocks are left out."""
    workbench = workbench_on(hub, base_folder)
    losses: dict[str, float] = {}
    for language in sorted(states_by_language):
        if language in workbench.heldout:
            losses.update(workbench.evaluate(states_by_language[language], languages=[language]))
    return losses
