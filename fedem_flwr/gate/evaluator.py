"""Blind evaluation on the hub: held-out loss per language of the base with a pushed adapter.

The workbench receives adapter weights and nothing else, so no evaluation can depend on who
trained them; the registry maps contributions to pseudonyms elsewhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from fedem_flwr.config.schema import LoraConfig
from fedem_flwr.gate.loss import evaluate
from fedem_flwr.model.adapter_spec import AdapterSpec
from fedem_flwr.model.lora import adapter_state, attach_lora, load_adapter_state, save_adapter


class HubWorkbench:
    """One LoRA-wrapped copy of the base: load weights, measure held-out loss, save PEFT folders."""

    def __init__(
        self,
        base_model: torch.nn.Module,
        lora: LoraConfig,
        heldout: Mapping[str, torch.Tensor],
        *,
        pad_id: int,
        batch_size: int = 16,
        max_blocks: Optional[int] = None,
        seed: Optional[int] = None,
        resolved_config: Optional[dict[str, Any]] = None,
    ) -> None:
        self.model = attach_lora(base_model, lora, seed=seed)
        # The first blocks of each language: the held-out split is already a random sample.
        self.heldout = {lang: blocks[:max_blocks] for lang, blocks in heldout.items()}
        self.weights = {lang: float((blocks != pad_id).sum()) for lang, blocks in self.heldout.items()}
        self.pad_id = pad_id
        self.batch_size = batch_size
        self.resolved_config = resolved_config
        self.initial_state = adapter_state(self.model)
        self.spec = AdapterSpec.from_state(self.initial_state)

    def evaluate(self, state: Mapping[str, torch.Tensor], languages: Optional[Sequence[str]] = None) -> dict[str, float]:
        """Held-out loss per language; only ``languages`` when given (the gate needs no more)."""
        load_adapter_state(self.model, state)
        heldout = self.heldout if languages is None else {k: v for k, v in self.heldout.items() if k in languages}
        results = evaluate(self.model, heldout, pad_id=self.pad_id, batch_size=self.batch_size)
        return {language: float(r["loss"]) for language, r in results.items()}

    def save(self, state: Mapping[str, torch.Tensor], folder: Path, base: Any) -> None:
        load_adapter_state(self.model, state)
        save_adapter(self.model, folder, base.repo, base.revision, self.resolved_config)
