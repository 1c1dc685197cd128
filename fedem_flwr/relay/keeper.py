"""Between relay turns the hub improves its base: it merges accepted adapters (``merge.*``) and keeps
pretraining (``cpt.*``), and publishes a new base version only through the base gate.

One lineage (DESIGN decision 16): every new base has one parent, the newest base. A merge absorbs the
adapters that beat the bare base on their own languages (``merge.select_absorbed``; with ``rebase: zero``
only those not under lease),
adds their deltas exactly (``merge.merge_adapters``: ``sum``, or ``mean`` weighted by the tokens each
adapter trained since its last fresh start, ``lineage.policy.mean_weights``) and is published only
through the base gate (``gate.acceptance``):

- ``merge.rebase: zero``: each absorbed adapter restarts from a zero delta (a ``rebase`` version, PEFT's
  own initialisation ``B = 0``), so its accepted work is never applied twice; the merged base alone must
  beat the base over all held-out languages by ``merge.margin`` with no language worse than
  ``merge.tolerance`` (``decide_base``).
- ``merge.rebase: residual`` (DESIGN decisions 20, 21): every adapter whose current version carries
  trained work (a ``push``, or a residual ``rebase``), absorbed or not, leased or not, continues from its
  residual (its delta minus the merged one, truncated to its rank: ``merge.rebase_residual``; one not
  absorbed subtracts the merged delta whole, so new base + it serves as old base + it did), evaluated
  for real on the merged base; adapters with no trained work (a zero delta) keep it and gain the new
  base. A push in flight on a re-projected adapter lands as an update of its rebase version (the
  coordinator). The base alone must beat the base by ``merge.margin`` overall, and each re-projected
  adapter's languages served by new base + its rebase version must be within ``merge.tolerance`` of old
  base + its version just before the merge (``decide_adapted``).

The merge's record (checkpoint metrics, or the attempt's details when refused) holds per rebased adapter
its tokens, truncation error and its languages' adapted losses just before and after (with residual
rebases, whether it was ``absorbed``; an absorbed one also its weight), the base-alone losses and both
gates' reasons. A re-projection that absorbed nothing carries the adapter's token count over
(``carried_tokens`` in its rebase record), so its next ``mean`` weight still counts the work not yet in
a base.

CPT runs a slice of whole optimizer steps bounded by ``cpt.slice_s`` only on turns that handled no
reply, and every ``cpt.checkpoint_every`` steps its weights pass the base gate. What is not published is
recorded as a base attempt with its reason.

After a publication the hub adopts the new base: the workbench judges on it; every adapter's current
version is evaluated on it before its next push is judged (a zero-delta version scores the base itself;
a trained or residual one is evaluated when next judged or merged, so adopting a base costs the relay
nothing); each rebased adapter gets its ``rebase`` version; CPT continues from it with its optimizer
state; and new leases carry it. A failure in a merge or a CPT slice is recorded and the relay goes on;
only faults of the hub itself stop the run. A merge is carried into the CPT run as the change it made
(merged minus parent weights), so CPT keeps its own steps since its last checkpoint and continues from
the newest base.
"""

from __future__ import annotations

import copy
import logging
import math
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from fedem_flwr.config.loader import config_to_dict
from fedem_flwr.data.blocks import tokenize_blocks
from fedem_flwr.errors import is_hub_fault, one_line
from fedem_flwr.gate.acceptance import decide, decide_adapted, decide_base
from fedem_flwr.gate.loss import evaluate
from fedem_flwr.hub.backup_request import run_backups
from fedem_flwr.hub.lineage import publish_base, record_attempt, store_adapter_version
from fedem_flwr.hub.merge_request import take_merge_request
from fedem_flwr.hub.paths import cpt_state_path
from fedem_flwr.hub.prune import prune
from fedem_flwr.hub.records import AdapterVersion, Checkpoint
from fedem_flwr.hub.store import ArtifactRef
from fedem_flwr.lineage.merge import (
    MergeResult,
    WeightedAdapter,
    merge_adapters,
    rebase_residual,
    weight_change,
)
from fedem_flwr.lineage.policy import (
    Candidate,
    mean_weights,
    merge_due,
    select_absorbed,
)
from fedem_flwr.model.factory import load_base, save_base
from fedem_flwr.model.lora import read_adapter_state
from fedem_flwr.relay.bootstrap import Hub, build_workbench, max_push_tokens
from fedem_flwr.training.cpt import ContinuousPretrainer

log = logging.getLogger(__name__)

Losses = dict[str, float]
CPT_RETRY_S, CPT_RETRY_MAX_S = 60.0, 3600.0  # the wait after a failed CPT slice, doubling, bounded


@dataclass(frozen=True)
class Rebase:
    """What an absorbed adapter continues from on a merged base: ``state`` (None: the fresh LoRA, a zero
    delta), its held-out losses there (None: the bare base's) and what its ``rebase`` version records."""

    state: Optional[dict[str, torch.Tensor]] = None
    heldout: Optional[Losses] = None
    record: Mapping[str, Any] = field(default_factory=lambda: {"mode": "zero"})


def zero_delta(version: AdapterVersion) -> bool:
    """Whether ``version`` is a zero delta (B = 0): fresh, or rebased from zero (older hubs: every rebase)."""
    mode = (version.metrics.get("rebase") or {}).get("mode", "zero") if version.kind == "rebase" else None
    return version.kind == "fresh" or mode == "zero"


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
        hub.registry.put_setting("relay", asdict(self.cfg.relay), updated=clock())  # lanes, for `fedem status`

    # -- the relay loop's hook ------------------------------------------------------------------------

    def turn(self, busy: bool) -> None:
        """Write the snapshots asked for or due (``hub.backup``); merge when one is due; else, on a turn that
        handled no reply and ``cpt.pause_s`` after the last slice, run one CPT slice."""
        try:  # snapshots asked for (`fedem backup`) or due (hub.backup)
            run_backups(self.hub.path, self.cfg.hub.backup)
        except Exception as err:  # e.g. an unreadable request: a snapshot never ends the relay
            if is_hub_fault(err):
                raise
            log.exception("Taking the hub's snapshots failed; the relay goes on")
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
        terms = self.hub.coordinator.terms
        # Only what the catalog lets merges absorb (task adapters serve their task on top of the base).
        candidates = [self._candidate(name, base) for name in sorted(a.name for a in registry.adapters())
                      if terms[name].mergeable]
        selection = select_absorbed([c for c in candidates if c is not None], leased, bare,
                                    token_weights=self._weights(), rebase=merge_cfg.rebase)
        skipped = [list(pair) for pair in selection.skipped]
        if not selection.absorbed:
            log.info("Merge (%s): no adapter beats base v%d yet", why, base.version)
            record_attempt(registry, source="merge", parent=base.version, reason=f"{why}: no adapter to absorb",
                           details={"skipped": skipped}, created=now)
            return None
        most = max_push_tokens(self.cfg)  # a push counts at most what one lease can train: no node sets its weight
        tokens = {c.name: self._tokens_since_restart(c.name, c.version, most) for c in selection.absorbed}
        weights = (mean_weights(tokens, merge_cfg.weights) if merge_cfg.method == "mean"
                   else {c.name: merge_cfg.weight(c.name) for c in selection.absorbed})
        adapters = [WeightedAdapter(c.name, c.version, self._adapter_state(c.name, c.version), weights[c.name])
                    for c in selection.absorbed]
        model, tokenizer = self._load(base)
        result = merge_adapters(model, adapters, self.cfg.lora, merge_cfg.method, seed=merge_cfg.seed,
                                density=merge_cfg.density, scale=merge_cfg.scale)
        losses = self._evaluate(result.model)
        residual = merge_cfg.rebase == "residual"
        # With residual rebases the base alone is judged overall only: each absorbed language is served by
        # the base with its adapter, and those are judged one by one below.
        decision = decide_base(losses, bare, merge_cfg.margin, None if residual else merge_cfg.tolerance,
                               weights=self._weights())
        workbench, rebased, report = self._rebase(result, model, adapters, selection.absorbed, losses, tokens, base)
        gates = {"base": decision.reason}
        refusals = [] if decision.accepted else [decision.reason]
        if residual:  # every re-projected adapter's languages, absorbed or not
            checked = {name: r for name, r in report.items() if r["adapted_before"]}
            adapted = decide_adapted({name: r["adapted_after"] for name, r in checked.items()},
                                     {name: r["adapted_before"] for name, r in checked.items()}, merge_cfg.tolerance)
            gates["adapted"] = adapted.reason
            refusals += [] if adapted.accepted else [f"adapted languages: {adapted.reason}"]
        record = {**result.record(), "rebase": merge_cfg.rebase, "adapters": report, "gate": gates}
        names = ", ".join(f"{a.name} v{a.version}" for a in result.absorbed)
        if refusals:
            reason = "; ".join(refusals)
            log.info("Merge of %s into base v%d refused: %s", names, base.version, reason)
            record_attempt(registry, source="merge", parent=base.version, reason=f"{why}: {reason}",
                           details={"merge": record, "heldout": losses, "skipped": skipped}, created=now)
            return None
        absorbed = [(a.name, a.version, a.weight, a.method, result.seed) for a in result.absorbed]
        metrics = {"heldout": losses, "merge": {k: v for k, v in record.items() if k != "absorbed"}}
        new = self._publish(result.model, tokenizer, base, "merge", metrics, absorbed)
        log.info("Published base v%d: merged %s into v%d (%s)", new.version, names, base.version,
                 "; ".join(gates.values()))
        self._adopt(new, result.model, losses, rebased, parent=model, workbench=workbench)
        return new

    def _rebase(self, result: MergeResult, parent: torch.nn.Module, adapters: Sequence[WeightedAdapter],
                absorbed: Sequence[Candidate], losses: Losses, tokens: Mapping[str, float], base: Checkpoint,
                ) -> tuple[Any, dict[str, Rebase], dict[str, dict[str, Any]]]:
        """What each rebased adapter continues from on the merged base (``merge.rebase``) and the merge's
        record of it: tokens, truncation error, its languages' adapted losses just before (old base + its
        version: the registry's) and after (new base + its rebased version); an absorbed one's weight.

        ``zero``: the absorbed adapters restart from a zero delta. ``residual``: the absorbed adapters and
        every other adapter whose current version carries trained work continue from their residuals
        (module doc), each evaluated for real, on a workbench holding the merged base (returned, to
        judge on once it is published)."""
        residual = self.cfg.merge.rebase == "residual"
        workbench, change = None, None
        if residual:
            change = weight_change(result.model, parent, result.targets)
            workbench = build_workbench(self.cfg, copy.deepcopy(result.model), self._pad_id(), self.hub.split.heldout)
        rebased, report = {}, {}
        for adapter, candidate, row in zip(adapters, absorbed, result.absorbed):
            languages = [lang for lang in candidate.languages if lang in candidate.losses]
            entry: dict[str, Any] = {"version": row.version, "weight": row.weight, "tokens": tokens[row.name],
                                     "adapted_before": {lang: candidate.losses[lang] for lang in languages}}
            if residual:
                rest = rebase_residual(adapter.state, change, self.cfg.lora)
                heldout = self._finite(workbench.evaluate(rest.state))
                rebased[row.name] = Rebase(rest.state, heldout, {"mode": "residual", "absorbed": True,
                                                                 "truncation": rest.record()})
                entry["absorbed"], entry["truncation"] = True, rest.record()
            else:
                heldout = losses  # a zero delta on the merged base: the base alone
                rebased[row.name] = Rebase()
            entry["adapted_after"] = {lang: heldout[lang] for lang in languages if lang in heldout}
            report[row.name] = entry
        if residual:
            for name, version in self._trained_adapters(skip=set(report)):
                rebase, report[name] = self._carry(name, version, base, change, workbench)
                if rebase is not None:
                    rebased[name] = rebase
        return workbench, rebased, report

    def _trained_adapters(self, skip: set[str]) -> list[tuple[str, int]]:
        """``(name, current version)`` of every adapter not in ``skip`` whose current version carries
        trained work (a push, or a residual rebase): not a zero delta."""
        registry = self.hub.registry
        latest = registry.latest_adapter_versions()
        return [(name, row.version) for name, row in sorted(latest.items())
                if name not in skip and not zero_delta(row)]

    def _carry(self, name: str, version: int, base: Checkpoint, change: Mapping[str, torch.Tensor],
               workbench: Any) -> tuple[Optional[Rebase], dict[str, Any]]:
        """An adapter the merge did not absorb, on the merged base: re-projected (its delta less the
        whole merged change, truncated to its rank, so new base + it serves as old base + it did), or
        kept as it is when that scores no worse on its own languages (the merged change helps it: a
        related language's work). Returns its rebase (None: kept) and its entry in the merge's record
        (adapted losses before and after, as the absorbed)."""
        before = self._losses_on(name, version, base)
        languages = [key for key in self.hub.coordinator.terms[name].heldout_keys if key in before]
        state = self._adapter_state(name, version)
        rest = rebase_residual(state, change, self.cfg.lora)
        heldout = self._finite(workbench.evaluate(rest.state))
        kept = self._finite(workbench.evaluate(state))
        tokens = self._tokens_since_restart(name, version, max_push_tokens(self.cfg))
        entry: dict[str, Any] = {"version": version, "absorbed": False, "tokens": tokens,
                                 "adapted_before": {lang: before[lang] for lang in languages}}
        if decide(kept, heldout, languages, weights=self._weights()).accepted:  # kept scores no worse
            entry.update(kept=True, adapted_after={lang: kept[lang] for lang in languages if lang in kept})
            return None, entry
        record = {"mode": "residual", "absorbed": False, "carried_tokens": tokens, "truncation": rest.record()}
        entry.update(kept=False, truncation=rest.record(),
                     adapted_after={lang: heldout[lang] for lang in languages if lang in heldout})
        return Rebase(rest.state, heldout, record), entry

    def _tokens_since_restart(self, name: str, version: int, most: int) -> float:
        """Tokens trained into ``name`` up to ``version`` and not yet in a base: the registry's count since
        its last fresh start or rebase, plus the count a rebase that absorbed nothing carried over."""
        registry = self.hub.registry
        tokens = registry.tokens_since_restart(name, version, most)
        restarts = [v for v in registry.adapter_versions(name) if v.version <= version and v.kind != "push"]
        last = max(restarts, key=lambda v: v.version, default=None)
        carried = (last.metrics.get("rebase") or {}).get("carried_tokens", 0.0) if last is not None else 0.0
        return tokens + float(carried)

    def _candidate(self, name: str, base: Checkpoint) -> Optional[Candidate]:
        version = self.hub.registry.latest_adapter_version(name)
        if version is None or version.kind != "push":  # a fresh or rebased version carries no new work
            return None
        losses = self._losses_on(name, version.version, base)
        return Candidate(name, version.version, self.hub.coordinator.terms[name].heldout_keys, losses)

    def _losses_on(self, name: str, version: int, base: Checkpoint) -> Losses:
        """``name`` v``version``'s held-out losses on ``base`` (the current one): the registry's, evaluated
        and recorded first when it has none (the split changed, or an older hub)."""
        losses = self.hub.registry.parent_losses(name, version, base.version)
        if losses is None:
            losses = self._finite(self.hub.workbench.evaluate(self._adapter_state(name, version)))
            self.hub.registry.put_evaluation(name, version, base.version, losses, self.clock())
        return losses

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
            self._adopt(new, weights, losses, rebased={})
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

    def _adopt(self, base: Checkpoint, model: torch.nn.Module, losses: Losses, rebased: Mapping[str, Rebase],
               parent: Optional[torch.nn.Module] = None, workbench: Any = None) -> None:
        """Judge on ``base`` from now on (on ``workbench`` when the merge built one on it): re-evaluate every
        adapter there, give each ``rebased`` adapter its ``rebase`` version, and carry a merge (``model``
        minus its ``parent``) into the CPT run's weights."""
        hub, registry = self.hub, self.hub.registry
        if self._pretrainer is not None and parent is not None:
            self._carry_merge(model, parent)
        self._bare[base.version] = dict(losses)
        if workbench is None:
            workbench = build_workbench(self.cfg, model, self._pad_id(), hub.split.heldout)
        hub.coordinator.adopt_base(workbench)
        base_ref = ArtifactRef(hub.store.repo_id(base.repo), base.revision, base.digest)
        now = self.clock()
        carried = 0
        for adapter in registry.adapters():
            current = registry.latest_adapter_version(adapter.name)
            if adapter.name in rebased:
                # Its optimizer state follows when it is next leased (``RelayCoordinator._lease_optimizer``).
                self._store_rebase(workbench, base, base_ref, current, rebased[adapter.name], losses, now)
                hub.coordinator.refresh_adapter(adapter.name)
            elif zero_delta(current):
                # A fresh or zero-rebased version is a zero delta (B = 0): on the new base it scores the base itself.
                registry.put_evaluation(adapter.name, current.version, base.version, dict(losses), now)
            else:
                carried += 1  # evaluated on the new base when it is next judged or merged (see the coordinator)
        log.info("Base v%d adopted: %d adapter(s) rebased, %d carried over (evaluated on it before their next "
                 "judgement)", base.version, len(rebased), carried)
        self.retain(base)

    def retain(self, base: Checkpoint) -> None:
        """After ``base`` is adopted (its rebase versions stored), prune the local store by
        ``hub.retention`` (a no-op when both counts are null) and log what went. A failure is logged and
        tried again after the next base; only a fault of the hub itself stops the run."""
        retention = self.cfg.hub.retention
        if retention.bases is None and retention.adapter_versions is None:
            return
        try:
            report = prune(self.hub.registry, self.hub.store, self.hub.path, retention, self.clock())
        except Exception as err:
            if is_hub_fault(err):
                raise
            log.exception("Retention after base v%d failed; it is tried again after the next base", base.version)
            return
        log.info("Retention after base v%d: %s", base.version, report.summary())

    def _store_rebase(self, workbench: Any, base: Checkpoint, base_ref: ArtifactRef, current: AdapterVersion,
                      rebase: Rebase, losses: Losses, now: float) -> AdapterVersion:
        """Store ``current``'s successor on ``base``: a ``rebase`` version holding ``rebase.state`` (the
        fresh LoRA when None) with its held-out losses there (the bare base's when None)."""
        state = workbench.initial_state if rebase.state is None else rebase.state
        heldout = dict(losses if rebase.heldout is None else rebase.heldout)
        with tempfile.TemporaryDirectory(prefix="fedem-adapter-") as tmp:
            workbench.save(state, Path(tmp), base_ref)
            return store_adapter_version(self.hub.registry, self.hub.store, Path(tmp), adapter=current.adapter,
                                         base_version=base.version, parent_version=current.version, kind="rebase",
                                         metrics={"heldout": heldout, "rebase": dict(rebase.record)}, created=now)

    def _carry_merge(self, merged: torch.nn.Module, parent: torch.nn.Module) -> None:
        """CPT continues from the newest base, its own steps since its last checkpoint kept: the merge's
        change (merged minus parent) is added to the CPT weights, optimizer state and all."""
        before = parent.state_dict()
        current = self._pretrainer.model.state_dict()
        moved = {key: current[key] + (value - before[key].to(value.device)).to(current[key].device,
                                                                                 current[key].dtype)
                 for key, value in merged.state_dict().items()}  # the merged model may sit on the hub's GPU
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

