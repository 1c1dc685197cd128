"""The final numbers of a simulated method, and what a study reads of a relay run once it is over.

**Which split.** A study keeps a *test* split (``data.test_fraction`` > 0, ``fedem_flwr.data.blocks``):
rows that nothing in a run sees -- no node, CPT or baseline trains on them, and the gate, merges and
FedAvg's own rounds judge on the held-out split. The final numbers are measured on the test split
when the hub keeps one, else on the held-out split as before; ``final_split`` says which, and every
result records it. Every method (relay, FedAvg, the centralized and local-only baselines) reports
through ``final_losses``: each language's adapter on that language's blocks (the first
``gate.max_eval_blocks`` of them, as the gate reads the held-out split), with the hub's evaluator on
a given base checkpoint.

**What a relay run leaves to read.** ``TestCurve`` keeps each language's test loss as the run
stands (its adapter's latest version on the latest base), evaluating again only the adapters whose
version or base changed since the last call: one adapter's languages per accepted push, so the curve
over simulated time costs about one more evaluation a push. ``merge_events`` reads every published
merge back from the registry and the store: the merged base alone, and each absorbed language's
adapted loss just before (the absorbed version on the parent base) and just after (the adapter's
first version on the merged base). ``merge_counts`` and ``token_shares`` count attempts,
publications and each adapter's share of the tokens the hub received.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch

from fedem_flwr.gate.evaluator import HubWorkbench
from fedem_flwr.hub.records import AdapterVersion
from fedem_flwr.hub.registry import Registry
from fedem_flwr.model.factory import load_base
from fedem_flwr.model.lora import read_adapter_state
from fedem_flwr.relay.bootstrap import Hub, build_workbench
from fedem_flwr.simulation.record import mean_loss

SPLITS = ("test", "heldout")
CACHED_WORKBENCHES = 4  # evaluators on other bases kept (a model each): a merge's parent and child, and some

_workbenches: OrderedDict[tuple[int, str, str, str], HubWorkbench] = OrderedDict()


def final_split(hub: Hub) -> str:
    """``test`` when the hub keeps a test split (``data.test_fraction`` > 0), else ``heldout``."""
    return "test" if hub.split.test else "heldout"


def base_folder_of(hub: Hub, version: int) -> Path:
    """The stored folder of base checkpoint ``version``."""
    checkpoint = hub.registry.checkpoint(version)
    if checkpoint is None:
        raise KeyError(f"the hub has no base checkpoint v{version}")
    return Path(hub.store.get(checkpoint.ref))


def workbench_on(hub: Hub, base_folder: Optional[Path] = None) -> HubWorkbench:
    """The hub's held-out evaluator on ``base_folder`` (the hub's own when None or its current base's folder).

    Same held-out blocks, batch size, block cap and LoRA spec as the hub's; built once per folder."""
    latest = hub.registry.latest_checkpoint()
    if base_folder is None or (latest is not None and Path(base_folder) == Path(hub.store.get(latest.ref))):
        return hub.workbench
    return _cached(hub, "heldout", Path(base_folder), hub.split.heldout)


def evaluator_on(hub: Hub, base_folder: Optional[Path] = None, split: Optional[str] = None) -> HubWorkbench:
    """An evaluator of ``split`` (default: ``final_split``) on ``base_folder`` (default: the latest
    base). The held-out one is the hub's own workbench where it can be; a test one is never the
    hub's, so nothing the run judges with ever holds test blocks."""
    split = split or final_split(hub)
    if split not in SPLITS:
        raise ValueError(f"`split` is {split!r}; allowed: {', '.join(SPLITS)}")
    if split == "heldout":
        return workbench_on(hub, base_folder)
    if base_folder is None:
        base_folder = base_folder_of(hub, hub.registry.latest_checkpoint().version)
    return _cached(hub, "test", Path(base_folder), hub.split.test)


def _cached(hub: Hub, split: str, base_folder: Path, blocks: Mapping[str, torch.Tensor]) -> HubWorkbench:
    key = (id(hub), str(hub.path), split, str(base_folder.resolve()))
    if key in _workbenches:
        _workbenches.move_to_end(key)
    else:
        model, tokenizer = load_base(str(base_folder))
        _workbenches[key] = build_workbench(hub.cfg, model, tokenizer.pad_token_id, blocks)
        while len(_workbenches) > CACHED_WORKBENCHES:
            _workbenches.popitem(last=False)
    return _workbenches[key]


def final_losses(
    hub: Hub, states_by_language: Mapping[str, Mapping[str, torch.Tensor]], base_folder: Optional[Path] = None,
    *, split: Optional[str] = None,
) -> dict[str, float]:
    """Loss of each language's adapter state on that language alone, on ``split`` (default:
    ``final_split``); languages without blocks there are left out."""
    workbench = evaluator_on(hub, base_folder, split)
    losses: dict[str, float] = {}
    for language in sorted(states_by_language):
        if language in workbench.heldout:
            losses.update(workbench.evaluate(states_by_language[language], languages=[language]))
    return losses


def base_alone(hub: Hub, base_folder: Optional[Path] = None, split: Optional[str] = None) -> dict[str, float]:
    """The base itself (a fresh LoRA: ``B = 0``) on every language of ``split``."""
    workbench = evaluator_on(hub, base_folder, split)
    return workbench.evaluate(workbench.initial_state)


class TestCurve:
    """Each language's test loss as a relay run stands: its adapter's latest version on the latest
    base. ``update`` evaluates again only what changed since its last call (an accepted push: that
    adapter's languages; a new base: every adapter). Empty without a test split."""

    __test__ = False  # not a pytest class

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.losses: dict[str, float] = {}
        self._seen: dict[str, tuple[int, int]] = {}

    def update(self) -> dict[str, float]:
        hub = self.hub
        if final_split(hub) != "test":
            return {}
        base = hub.registry.latest_checkpoint()
        terms = hub.coordinator.terms
        workbench = None
        for name, version in hub.registry.latest_adapter_versions().items():
            mark = (version.version, base.version)
            if self._seen.get(name) == mark:
                continue
            self._seen[name] = mark
            wanted = [key for key in (terms[name].heldout_keys if name in terms else ()) if key in hub.split.test]
            if wanted:
                workbench = workbench or evaluator_on(hub, base_folder_of(hub, base.version), "test")
                self.losses.update(workbench.evaluate(read_adapter_state(hub.store.get(version.ref)), languages=wanted))
        return dict(self.losses)


def merge_events(hub: Hub, split: Optional[str] = None, t0: float = 0.0) -> list[dict[str, Any]]:
    """Every published merge, oldest first: ``version``, ``parent``, ``sim_s`` (its creation time
    minus ``t0``), ``base_losses`` (the merged base alone on ``split``) and ``absorbed``: per absorbed
    language, the ``adapter`` and ``version`` merged, its loss ``before`` (that version on the parent
    base) and ``after`` (the adapter's first version on the merged base; nan if it has none).

    A merge whose base or parent retention pruned (``hub.retention``) cannot be evaluated again and
    is left out; so is an absorbed adapter whose merged or rebased version was pruned."""
    registry, events = hub.registry, []
    checkpoints = registry.checkpoints()
    pruned = {c.version for c in checkpoints if c.pruned is not None}
    for checkpoint in checkpoints:
        if checkpoint.source != "merge" or checkpoint.parent is None:
            continue
        if {checkpoint.version, checkpoint.parent} & pruned:  # its bases can no longer be evaluated
            continue
        before = evaluator_on(hub, base_folder_of(hub, checkpoint.parent), split)
        after = evaluator_on(hub, base_folder_of(hub, checkpoint.version), split)
        absorbed: dict[str, dict[str, Any]] = {}
        for row in registry.absorbed(checkpoint.version):
            wanted = [key for key in hub.coordinator.terms[row.adapter].heldout_keys if key in after.heldout]
            if not wanted:
                continue
            versions = registry.adapter_versions(row.adapter)  # oldest first
            merged_version = next(v for v in versions if v.version == row.adapter_version)
            successor = next((v for v in versions if v.base_version == checkpoint.version), None)
            if merged_version.pruned is not None or (successor is not None and successor.pruned is not None):
                continue
            merged = before.evaluate(_state(hub, merged_version), languages=wanted)
            rebased = after.evaluate(_state(hub, successor), languages=wanted) if successor is not None else {}
            for lang in wanted:
                absorbed[lang] = {"adapter": row.adapter, "version": row.adapter_version, "before": merged[lang],
                                  "after": rebased.get(lang, math.nan)}
        events.append({"version": checkpoint.version, "parent": checkpoint.parent,
                       "sim_s": checkpoint.created - t0, "base_losses": after.evaluate(after.initial_state),
                       "absorbed": absorbed})
    return events


def _state(hub: Hub, version: AdapterVersion) -> dict[str, torch.Tensor]:
    return read_adapter_state(hub.store.get(version.ref))


def merge_counts(registry: Registry) -> dict[str, int]:
    """``merge_attempts`` (published or not, "nothing to absorb" included) and ``merge_published``."""
    published = sum(checkpoint.source == "merge" for checkpoint in registry.checkpoints())
    return {"merge_attempts": published + len(registry.base_attempts("merge")), "merge_published": published}


def token_shares(tokens: Mapping[str, float]) -> dict[str, float]:
    """Each adapter's share of the tokens (0 to 1, summing to 1); empty when none were trained."""
    total = float(sum(tokens.values()))
    return {name: float(n) / total for name, n in sorted(tokens.items())} if total > 0 else {}


def relay_adapter_tokens(registry: Registry) -> dict[str, int]:
    """Tokens per adapter of every push the hub received and judged (accepted or not), from the
    contributions' reported training metrics; wasted work never reached the hub, so it is not here."""
    tokens = {adapter.name: 0 for adapter in registry.adapters()}
    for contribution in registry.contributions():
        train = contribution.evaluation.get("train", {})
        tokens[contribution.adapter] = tokens.get(contribution.adapter, 0) + int(train.get("tokens", 0) or 0)
    return tokens


def study_fields(hub: Hub, *, initial: Mapping[str, float], base: Mapping[str, float],
                 adapter_tokens: Mapping[str, float], heldout: Optional[Mapping[str, float]] = None) -> dict[str, Any]:
    """What every method's result adds for a study: ``final_split``; ``initial_losses`` (base v0
    alone) and ``base_losses`` / ``base_loss_mean`` (the method's last base alone), both on the final
    split; ``adapter_tokens`` and ``token_shares``; with a test split, the final ``heldout_losses``
    and ``heldout_loss_mean`` too (the numbers a study without one reported)."""
    fields: dict[str, Any] = {
        "final_split": final_split(hub), "initial_losses": dict(initial), "base_losses": dict(base),
        "base_loss_mean": mean_loss(base), "adapter_tokens": {k: int(v) for k, v in sorted(adapter_tokens.items())},
        "token_shares": token_shares(adapter_tokens),
    }
    if heldout is not None and fields["final_split"] == "test":
        fields["heldout_losses"] = dict(heldout)
        fields["heldout_loss_mean"] = mean_loss(heldout)
    return fields
