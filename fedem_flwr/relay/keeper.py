"""Between relay turns the hub improves its base: it merges accepted adapters (``merge.*``) and keeps
pretraining (``cpt.*``), and publishes a new base version only through the base gate.

One lineage (DESIGN decision 16): every new base has one parent, the newest base. A merge absorbs the
adapters that are not under lease and beat the bare base on their own languages (``merge.select_absorbed``),
adds their deltas exactly (``merge.merge_adapters``) and is published when the merged model beats the
base over all held-out languages by ``merge.margin`` with no language worse than ``merge.tolerance``
(``gate.acceptance.decide_base``). CPT runs a slice of whole optimizer steps bounded by ``cpt.slice_s``
only on turns that handled no reply, and every ``cpt.checkpoint_every`` steps its weights pass the same
gate. What is not published is recorded as a base attempt with its reason.

After a publication the hub adopts the new base: the workbench judges on it; every adapter's current
version is evaluated on it before its next push is judged (a zero-delta version scores the base itself;
a trained one is evaluated when next judged or merged, so adopting a base costs the relay nothing); each absorbed adapter continues from a zero
delta (a ``rebase`` version, PEFT's own initialisation ``B = 0``), so its accepted work is never applied
twice; CPT continues from it with its optimizer state; and new leases carry it. A failure in a merge or a
CPT slice is recorded and the relay goes on; only faults of the hub itself stop the run. A merge is
carried into the CPT run as the change it made (merged minus parent weights), so CPT keeps its own
steps since its last checkpoint and continues from the newest base.
"""

from __future__ import annotations

import copy
import logging
import math
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import torch

from fedem_flwr.config.loader import config_to_dict
from fedem_flwr.data.blocks import tokenize_blocks
from fedem_flwr.errors import is_hub_fault, one_line
from fedem_flwr.gate.acceptance import decide_base
from fedem_flwr.gate.loss import evaluate
from fedem_flwr.hub.lineage import publish_base, record_attempt, store_adapter_version
from fedem_flwr.hub.merge_request import take_merge_request
from fedem_flwr.hub.paths import cpt_state_path
from fedem_flwr.hub.records import Checkpoint
from fedem_flwr.hub.store import ArtifactRef
from fedem_flwr.lineage.merge import WeightedAdapter, merge_adapters
from fedem_flwr.lineage.policy import Candidate, merge_due, select_absorbed
from fedem_flwr.model.factory import load_base, save_base
from fedem_flwr.model.lora import read_adapter_state
from fedem_flwr.relay.bootstrap import Hub, build_workbench
from fedem_flwr.training.cpt import ContinuousPretrainer

log = logging.getLogger(__name__)

Losses = dict[str, float]
CPT_RETRY_S, CPT_RETRY_MAX_S = 60.0, 3600.0  # the wait after a failed CPT slice, doubling, bounded


class BaseKeeper:
    """Merges and CPT for one ServerApp run; ``turn`` is called once per relay loop turn."""

    def __init__(self, hub: Hub, clock: Callable[[], float] = time.time, *,
                 cpt_steps_per_s: Optional[float] = None) -> None:
        self.hub = hub
        self.cfg = hub.cfg
        self.clock = clock
        # On a virtual clock CPT trains at this pace of simulated time instead of for `cpt.slice_s` real
        # seconds: each slice catches up on the simulated time since the last one.
        self.cpt_steps_per_s = cpt_steps_per_s
        self._cpt_caught_up_at = clock()
        self.cpt_tokens = 0  # tokens CPT trained in this run (a simulation's token budget counts them)
        self._last_merge_at = self._base().created
        self._bare: dict[int, Losses] = {}  # held-out losses of each bare base version, by version
        self._pretrainer: Optional[ContinuousPretrainer] = None
        self._next_slice_at = 0.0  # `cpt.pause_s` after the end of the last slice
        self._checkpointed_at = 0  # the CPT step of the last checkpoint (published or refused)
        self._cpt_failures = 0  # failed slices in a row
        self._tokenizer: Any = None
        # What `fedem status` shows as "next merge / next CPT checkpoint".
        hub.registry.put_setting("merge", asdict(self.cfg.merge), updated=clock())
        hub.registry.put_setting("cpt", asdict(self.cfg.cpt), updated=clock())

    # -- the relay loop's hook ------------------------------------------------------------------------

    def turn(self, busy: bool) -> None:
        """Merge when one is due; else, on a turn that handled no reply and ``cpt.pause_s`` after the
        last slice, run one CPT slice."""
        source = "merge"
        try:
            reason = self._merge_reason(busy)
            if reason:
                self.merge(reason)
            elif self.cfg.cpt.enabled and not busy and self.clock() >= self._next_slice_at:
                source = "cpt"
                self.pretrain()
                self._cpt_failures = 0
                self._next_slice_at = self.clock() + self.cfg.cpt.pause_s
        except Exception as err:  # a failed merge or slice is recorded; the relay goes on
            if is_hub_fault(err):
                raise
            log.exception("The %s step failed; it is recorded and the relay goes on", source)
            record_attempt(self.hub.registry, source=source, parent=self._base().version,
                           reason=f"error: {one_line(err)}", details={}, created=self.clock())
            if source == "cpt":
                # The next slice resumes from the last saved state, after a wait that doubles with each
                # failure in a row: a lasting fault (a damaged state file) is not retried every turn.
                self._pretrainer = None
                self._cpt_failures += 1
                wait = min(CPT_RETRY_MAX_S, CPT_RETRY_S * 2 ** (self._cpt_failures - 1))
                self._next_slice_at = self.clock() + max(self.cfg.cpt.pause_s, wait)

    # -- merging --------------------------------------------------------------------------------------

    def _merge_reason(self, busy: bool) -> Optional[str]:
        """Why a merge is due now, if it is. The registry is asked only when something may have
        changed (replies handled, a request, the interval passed), not on every idle turn."""
        requested = take_merge_request(self.hub.path) is not None
        every_s = self.cfg.merge.every_s
        now = self.clock()
        if not (busy or requested or (every_s is not None and now - self._last_merge_at >= every_s)):
            return None
        base = self._base()
        since = max(base.created, self._last_merge_at)
        accepted = self.hub.registry.accepted_since(base.version, since=since)
        return merge_due(accepted, self._last_merge_at, now, self.cfg.merge, requested)

    def merge(self, why: str) -> Optional[Checkpoint]:
        """Absorb what beats the bare base into a new base, published only through the base gate."""
        registry, merge_cfg = self.hub.registry, self.cfg.merge
        now = self._last_merge_at = self.clock()
        base = self._base()
        bare = self.bare_losses(base)
        leased = self.hub.coordinator.leased_adapters()
        candidates = [self._candidate(name, base) for name in sorted(a.name for a in registry.adapters())]
        selection = select_absorbed([c for c in candidates if c is not None], leased, bare,
                                    token_weights=self._weights())
        skipped = [list(pair) for pair in selection.skipped]
        if not selection.absorbed:
            log.info("Merge (%s): no adapter beats base v%d yet", why, base.version)
            record_attempt(registry, source="merge", parent=base.version, reason=f"{why}: no adapter to absorb",
                           details={"skipped": skipped}, created=now)
            return None
        adapters = [WeightedAdapter(c.name, c.version, self._adapter_state(c.name, c.version),
                                    float(merge_cfg.weights.get(c.name, 1.0))) for c in selection.absorbed]
        model, tokenizer = self._load(base)
        result = merge_adapters(model, adapters, self.cfg.lora, merge_cfg.method, seed=merge_cfg.seed,
                                density=merge_cfg.density)
        losses = self._evaluate(result.model)
        decision = decide_base(losses, bare, merge_cfg.margin, merge_cfg.tolerance, weights=self._weights())
        names = ", ".join(f"{a.name} v{a.version}" for a in result.absorbed)
        if not decision.accepted:
            log.info("Merge of %s into base v%d refused: %s", names, base.version, decision.reason)
            record_attempt(registry, source="merge", parent=base.version, reason=f"{why}: {decision.reason}",
                           details={"merge": result.record(), "heldout": losses, "skipped": skipped}, created=now)
            return None
        absorbed = [(a.name, a.version, a.weight, a.method, result.seed) for a in result.absorbed]
        metrics = {"heldout": losses, "merge": {"method": result.method, "seed": result.seed}}
        new = self._publish(result.model, tokenizer, base, "merge", metrics, absorbed)
        log.info("Published base v%d: merged %s into v%d (%s)", new.version, names, base.version, decision.reason)
        self._adopt(new, result.model, losses, absorbed={a.name for a in result.absorbed}, parent=model)
        return new

    def _candidate(self, name: str, base: Checkpoint) -> Optional[Candidate]:
        version = self.hub.registry.latest_adapter_version(name)
        if version is None or version.kind != "push":  # a fresh or rebased version carries no work
            return None
        losses = self.hub.registry.parent_losses(name, version.version, base.version)
        if losses is None:  # not yet evaluated on this base (the split changed, or an older hub)
            losses = self._finite(self.hub.workbench.evaluate(self._adapter_state(name, version.version)))
            self.hub.registry.put_evaluation(name, version.version, base.version, losses, self.clock())
        languages = tuple(self.hub.registry.adapter(name).languages)
        return Candidate(name, version.version, languages, losses)

    # -- continuous pretraining -----------------------------------------------------------------------

    def pretrain(self) -> None:
        """One slice of CPT; at a checkpoint, gate the weights and publish them as a base version."""
        cpt = self._pretrainer or self._start_pretrainer()
        tokens_before = cpt.tokens
        if self.cpt_steps_per_s is None:
            cpt.run_slice(self.cfg.cpt.slice_s, clock=time.monotonic)
        else:
            due = int((self.clock() - self._cpt_caught_up_at) * self.cpt_steps_per_s)
            if due > 0:
                cpt.run_slice(math.inf, clock=time.monotonic, max_steps=due)
                self._cpt_caught_up_at += due / self.cpt_steps_per_s
        self.cpt_tokens += cpt.tokens - tokens_before
        if cpt.checkpoint_due():
            self._checkpoint(cpt)

    def finish(self) -> None:
        """At the end of a run, gate (and publish) the CPT steps since the last checkpoint: the CPT
        state persists, its weights live only in published bases, so a restart would lose them."""
        cpt = self._pretrainer
        if cpt is None or cpt.step <= self._checkpointed_at:
            return
        try:
            self._checkpoint(cpt)
        except Exception as err:
            if is_hub_fault(err):
                raise
            log.exception("The final CPT checkpoint failed; it is recorded")
            record_attempt(self.hub.registry, source="cpt", parent=self._base().version,
                           reason=f"error: {one_line(err)}", details={}, created=self.clock())

    def _checkpoint(self, cpt: ContinuousPretrainer) -> None:
        base = self._base()
        bare = self.bare_losses(base)
        losses = self._evaluate(cpt.model)
        decision = decide_base(losses, bare, self.cfg.cpt.margin, self.cfg.cpt.tolerance, weights=self._weights())
        now = self.clock()
        if decision.accepted:
            metrics = {"heldout": losses, "cpt": {"steps": cpt.step, "tokens": cpt.tokens}}
            weights = copy.deepcopy(cpt.model).to("cpu")
            new = self._publish(weights, self._tokenizer, base, "cpt", metrics, ())
            log.info("Published base v%d: CPT step %d on v%d (%s)", new.version, cpt.step, base.version,
                     decision.reason)
            self._adopt(new, weights, losses, absorbed=set())
        else:
            log.info("CPT checkpoint at step %d refused: %s", cpt.step, decision.reason)
            record_attempt(self.hub.registry, source="cpt", parent=base.version, reason=decision.reason,
                           details={"heldout": losses, "cpt": {"steps": cpt.step, "tokens": cpt.tokens}},
                           created=now)
        cpt.mark_checkpoint()
        self._checkpointed_at = cpt.step
        cpt.save(info={"base_version": self._base().version})  # a kill now loses at most one interval

    def _start_pretrainer(self) -> ContinuousPretrainer:
        """CPT trains its own copy of the newest base on the training side of the hub's split."""
        model, self._tokenizer = self._load(self._base())
        blocks = tokenize_blocks(self.hub.split.train["text"], self._tokenizer, self.cfg.data.block_size)
        self._pretrainer = ContinuousPretrainer(
            model, blocks, self.cfg.cpt, cpt_state_path(self.hub.path), pad_id=self._tokenizer.pad_token_id,
            seed=self.cfg.seed,
        )
        self._checkpointed_at = self._pretrainer.step
        if self._pretrainer.resumed:
            log.info("CPT resumes at step %d (%d tokens so far)", self._pretrainer.step, self._pretrainer.tokens)
        return self._pretrainer

    # -- publishing and adopting a base ---------------------------------------------------------------

    def _publish(self, model: torch.nn.Module, tokenizer: Any, parent: Checkpoint, source: str,
                 metrics: dict[str, Any], absorbed: Any) -> Checkpoint:
        with tempfile.TemporaryDirectory(prefix="fedem-base-") as tmp:
            save_base(model, tokenizer, Path(tmp), config_to_dict(self.cfg))
            return publish_base(self.hub.registry, self.hub.store, Path(tmp), parent=parent.version, source=source,
                                metrics=metrics, created=self.clock(), absorbed=absorbed)

    def _adopt(self, base: Checkpoint, model: torch.nn.Module, losses: Losses, absorbed: set[str],
               parent: Optional[torch.nn.Module] = None) -> None:
        """Judge on ``base`` from now on: re-evaluate every adapter there, restart the absorbed ones, and
        carry a merge (``model`` minus its ``parent``) into the CPT run's weights."""
        hub, registry = self.hub, self.hub.registry
        if self._pretrainer is not None and parent is not None:
            self._carry_merge(model, parent)
        self._bare[base.version] = dict(losses)
        workbench = build_workbench(self.cfg, model, self._pad_id(), hub.split.heldout)
        hub.coordinator.adopt_base(workbench)
        base_ref = ArtifactRef(hub.store.repo_id(base.repo), base.revision, base.digest)
        now = self.clock()
        carried = 0
        for adapter in registry.adapters():
            current = registry.latest_adapter_version(adapter.name)
            if adapter.name in absorbed:
                with tempfile.TemporaryDirectory(prefix="fedem-adapter-") as tmp:
                    workbench.save(workbench.initial_state, Path(tmp), base_ref)
                    store_adapter_version(registry, hub.store, Path(tmp), adapter=adapter.name,
                                          base_version=base.version, parent_version=current.version, kind="rebase",
                                          metrics={"heldout": dict(losses)}, created=now)
                hub.coordinator.refresh_adapter(adapter.name)
            elif current.kind != "push":
                # A fresh or rebased version is a zero delta (B = 0): on the new base it scores the base itself.
                registry.put_evaluation(adapter.name, current.version, base.version, dict(losses), now)
            else:
                carried += 1  # evaluated on the new base when it is next judged or merged (see the coordinator)
        log.info("Base v%d adopted: %d adapter(s) rebased, %d carried over (evaluated on it before their next "
                 "judgement)", base.version, len(absorbed), carried)

    def _carry_merge(self, merged: torch.nn.Module, parent: torch.nn.Module) -> None:
        """CPT continues from the newest base, its own steps since its last checkpoint kept: the merge's
        change (merged minus parent) is added to the CPT weights, optimizer state and all."""
        before = parent.state_dict()
        current = self._pretrainer.model.state_dict()
        moved = {key: current[key] + (value - before[key]).to(current[key].device, current[key].dtype)
                 for key, value in merged.state_dict().items()}
        self._pretrainer.load_weights(moved)

    # -- helpers --------------------------------------------------------------------------------------

    def bare_losses(self, base: Checkpoint) -> Losses:
        """Held-out loss per language of ``base`` itself (the workbench's fresh LoRA has ``B = 0``): as
        recorded with it, unless they were measured on another held-out split than the one in use."""
        if base.version not in self._bare:
            recorded = base.metrics.get("heldout") or {}
            here = base.metrics.get("heldout-split", self.hub.split_id) == self.hub.split_id
            if here and set(self.hub.workbench.heldout) <= set(recorded):
                self._bare[base.version] = dict(recorded)
            else:
                self._bare[base.version] = self._finite(self.hub.workbench.evaluate(self.hub.workbench.initial_state))
        return self._bare[base.version]

    def _evaluate(self, model: torch.nn.Module) -> Losses:
        wb = self.hub.workbench
        results = evaluate(model.to(next(wb.model.parameters()).device), wb.heldout, pad_id=wb.pad_id,
                           batch_size=wb.batch_size)
        return {lang: float(r["loss"]) for lang, r in results.items()}

    def _weights(self) -> Optional[Mapping[str, float]]:
        return self.hub.workbench.weights if self.cfg.gate.weighting == "tokens" else None

    def _adapter_state(self, name: str, version: int) -> dict[str, torch.Tensor]:
        return read_adapter_state(self.hub.store.get(self.hub.registry.adapter_version(name, version).ref))

    def _load(self, base: Checkpoint) -> tuple[torch.nn.Module, Any]:
        return load_base(str(self.hub.store.get(base.ref)))

    def _pad_id(self) -> int:
        return self.hub.workbench.pad_id

    def _base(self) -> Checkpoint:
        return self.hub.registry.latest_checkpoint()

    @staticmethod
    def _finite(losses: Mapping[str, float]) -> Losses:
        return {lang: float(loss) for lang, loss in losses.items() if math.isfinite(loss)}
