"""The hub side of the relay, without Flower: leases, policy, blind evaluation, registry and store.

The relay Strategy translates Grid messages into calls on a ``RelayCoordinator``; everything that
decides or persists lives here, so the whole relay can be driven by tests without a Flower runtime.
Every state change is persisted in one registry transaction together with the lease it touches.

The coordinator owns the registry, the store, the lease book and the workbench: others ask it
(``train_payload``, ``pseudonym``, ``lease``, ``leased_adapters``, ``adopt_base``) and never reach
into them. What a node sent arrives checked (``protocol.messages`` parses every reply, claims and
metrics included): a push names only the hub's own lease token, and is trusted as parsed.

With ``train.carry`` the optimizer state belongs to the adapter (DESIGN 19): each accepted version's
state is kept as private hub state (``hub.optimizer_states``), written before the version's registry
row commits, sent with the next lease of that version, and replaced by the push's. A push's state
arrives checked by the strategy; one that failed the check never costs an otherwise good adapter:
the version keeps a fresh state at the leased state's step (zero moments), and the contribution
records why.

A push lands as an update (DESIGN decision 20): when the adapter's current version is no longer the one
its lease started from (another lane's push was accepted, or a merge rebased the adapter while the push
was out), the push is judged and kept as the change it made, added to the current version in weight
space and factored back to the adapter's rank (``lineage.merge.update_state``). With s other lanes'
pushes accepted since its lease began, it gets weight ``w = (1 + s) ** -relay.staleness_power`` (FedAsync's polynomial staleness)
and ``relay.lane_update`` says how it lands: ``mix`` (FedAsync's mixing: current + w * (pushed -
current), so what the lanes trained in common counts once) or ``add`` (current + w * (pushed - start)).
A merge's rebase in between is kept whole either way; with one lane s is 0 and the push lands in
full. The contribution and the version record the rule, staleness, weight and truncation
(``update``). When nothing moved the push is kept bit for bit.

Lanes (``relay.lanes`` = k): up to k nodes hold one adapter at once, each on its own fenced lease from
the adapter's latest accepted version (``relay.leases``). The pool offers an adapter while it has a free
lane; each policy round gives an adapter at most one more holder, and with k > 1 rounds repeat while
they place nodes. The version an update produces carries the optimizer state of the version it was
applied to, advanced by the steps the push trained (``_combined_optimizer``): the schedule counts
every step trained into the adapter, whichever lane trained it; the moments start at zero (they
describe factors the truncation replaced); and the warmup starts again only when a merge rebased the
adapter meanwhile (the base changed under it), as it did before lanes.

Adapters are what the catalog declares (``conf/catalog``, ``data.tasks.AdapterTerms``): a language
adapter is matched to nodes by its language and judged on its language's held-out text, as before
catalogs existed; a task adapter (``sft-chat``) is matched by its data (``en:chat``: a node that
declared conversations in English), leased to no other node whatever the policy chose, and judged on
its own held-out set (response tokens of held-out conversations) with its entry's margin and
tolerance where it sets them.

Judged by peers (``gate.peers`` > 0; ``relay.peer_review``, docs/peers.md): a push the hub
has judged on its own held-out text waits for peers instead of being concluded. Its lease ends at once
(outcome ``peer-review``; the node is free), and with one lane its adapter is offered to no node until
the push is decided; with lanes the adapter relays on from its latest accepted version and the push,
when decided, lands as an update of whatever version is current then (judged again by the hub if the
adapter or the base moved meanwhile). The strategy asks idle nodes (``peer_requests``) and hands their
answers in (``peer_answered`` / ``peer_failed``); ``conclude_due`` decides the pushes whose peers all
answered or whose ``gate.peer_wait_s`` is over (``gate.peers.combine``), records the hub's numbers and
the peers' (by pseudonym) with the contribution, each question in ``peer_reports``, and each peer's
standing. A push still waiting when the hub stops is lost with the process (a train in flight is too);
the next start records it as rejected (``hub-restart``) so its lease is accounted for.
"""

from __future__ import annotations

import hashlib
import logging
import math
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Protocol

from fedem_flwr.config.schema import CatalogConfig, GateConfig, TrainConfig
from fedem_flwr.data.tasks import TEXT, AdapterTerms, adapter_terms
from fedem_flwr.errors import ConfigError, HubFault, InvalidAdapter, StoreError, is_hub_fault, one_line
from fedem_flwr.gate.acceptance import Decision, decide
from fedem_flwr.gate.novelty import no_work
from fedem_flwr.gate.peers import Judgement, PeerResult, PeerVerdict, aggregate, combine, judged_reports
from fedem_flwr.hub.optimizer_states import OptimizerStates
from fedem_flwr.hub.records import Lease, PeerReport, revision_name
from fedem_flwr.hub.store import ArtifactRef, ArtifactStore
from fedem_flwr.node.fetch import HfLocation, hf_location
from fedem_flwr.relay.leases import LeaseBook, PushRejected, SweepSchedule
from fedem_flwr.relay.peer_review import Awaiting, PeerReview
from fedem_flwr.relay.peers import Candidate
from fedem_flwr.relay.policies import AdapterInfo, NodeProfile, Policy, token_shares
from fedem_flwr.relay.pool import AdapterPool

if TYPE_CHECKING:
    from fedem_flwr.training.optimizer_state import OptimizerState

log = logging.getLogger(__name__)

HeldoutLosses = dict[str, float]
PEER_REVIEW = "peer-review"  # the outcome of a lease whose push went to its peers (its contribution says the rest)
PENDING = "pending"


class AdapterWorkbench(Protocol):
    """What the hub does with adapter weights; implemented with torch in ``gate.evaluator``.

    It sees weights only, never who trained them: evaluation is blind by construction.
    """

    weights: Optional[Mapping[str, float]]
    """Held-out tokens per language (token-weighted gate), or None for a plain mean."""

    heldout: Mapping[str, Any]
    """The languages it holds out (keys); their held-out data (values) stays inside the workbench."""

    def evaluate(self, state: Mapping[str, Any], languages: Optional[Sequence[str]] = None) -> HeldoutLosses:
        """Held-out mean loss per language of the base with this adapter (all, or ``languages``)."""

    def save(self, state: Mapping[str, Any], folder: Path, base: ArtifactRef) -> None:
        """Write a standard PEFT adapter folder naming ``base`` as its base model."""


@dataclass(frozen=True)
class Assignment:
    """A lease just issued, with everything the train message must carry."""

    lease: Lease
    adapter: AdapterInfo
    adapter_ref: ArtifactRef
    base_ref: ArtifactRef
    terms: AdapterTerms  # what the node trains: its languages, the task and the domain

    @property
    def languages(self) -> tuple[str, ...]:
        return self.terms.languages

    @property
    def task(self) -> str:
        return self.terms.task

    @property
    def domain(self) -> str:
        return self.terms.domain


@dataclass(frozen=True)
class TrainPayload:
    """What a train message carries beside the lease's terms: the adapter version leased, where a
    node may fetch the base itself (None unless the store is on a Hugging Face Hub), and the
    adapter's optimizer state to continue (None with ``train.carry=none``: nothing is sent)."""

    state: dict[str, Any]
    base_hf: Optional[HfLocation]
    optimizer: Optional["OptimizerState"] = None


@dataclass(frozen=True)
class PushOutcome:
    """What became of a push: ``accepted`` ones produced ``version``."""

    decision: str
    reason: str
    adapter: str
    lease_token: int
    version: Optional[int] = None
    losses: HeldoutLosses = field(default_factory=dict)

    @property
    def accepted(self) -> bool:
        return self.decision == "accepted"

    @property
    def pending(self) -> bool:
        """Judged by the hub, waiting for peers: decided later by ``conclude_due``."""
        return self.decision == PENDING


@dataclass(frozen=True)
class PeerRequest:
    """An evaluation to send to one idle node: the candidate and its parent on a base it holds. Nothing
    in it says who pushed the candidate or under which lease."""

    evaluation: int
    identity: str
    base_ref: ArtifactRef
    base_version: int
    terms: AdapterTerms
    candidate: Mapping[str, Any]
    parent: Mapping[str, Any]
    deadline: float
    max_blocks: int  # held-out blocks per language the peer scores at most
    max_tokens: Optional[int] = None  # the most tokens a report may claim per language (None: not known here)
    base_hf: Optional[HfLocation] = None  # where a node may fetch the base itself (a store on a Hugging Face Hub)


@dataclass(frozen=True)
class _HubVerdict:
    """The hub's own judgement of a push: on which base and parent, the state judged (the push, or the
    push applied as an update), its losses against the parent's, and the decision (None when the push
    was settled before any comparison: no work, or a loss that is not finite; ``reason`` says which)."""

    base: Any
    parent: Any
    parent_state: Mapping[str, Any]  # the parent's weights, read once: peers are sent them with the candidate
    state: Mapping[str, Any]
    update: Optional[dict[str, Any]]
    losses: HeldoutLosses
    decision: Optional[Decision]
    reason: str = ""


@dataclass(frozen=True)
class _Judged:
    """What a push waiting for its peers needs to be decided later."""

    lease: Lease
    received: "_Received"
    pushed: Mapping[str, Any]  # as it came, to land as an update again if the adapter moves meanwhile
    hub: _HubVerdict
    terms: AdapterTerms


class RelayCoordinator:
    """Leases adapters to free nodes and judges what comes back."""

    def __init__(
        self,
        registry: Any,
        store: ArtifactStore,
        policy: Policy,
        workbench: AdapterWorkbench,
        *,
        lease_ttl_s: float,
        sweep_interval_s: float,
        gate: Optional[GateConfig] = None,
        clock: Callable[[], float],
        train: Optional[TrainConfig] = None,
        optimizer_states: Optional[OptimizerStates] = None,
        max_push_tokens: Optional[int] = None,
        lanes: int = 1,
        lane_update: str = "add",
        staleness_power: float = 1.0,
        catalog: Optional[CatalogConfig] = None,
        block_size: Optional[int] = None,
    ) -> None:
        self._registry = registry
        self._store = store
        self._workbench = workbench
        self.policy = policy
        self.lease_ttl_s = lease_ttl_s
        self.gate = gate or GateConfig()
        self.clock = clock
        self._train = train or TrainConfig(carry="none")  # not told how nodes train: nothing to carry
        if self._train.carry != "none" and optimizer_states is None:
            raise ConfigError(f"`train.carry` is {self._train.carry!r}: the coordinator needs `optimizer_states` "
                              "(the hub's folder of them) to keep each version's state in")
        self._optimizer_states = optimizer_states
        if lane_update not in ("mix", "add"):
            raise ConfigError(f"`relay.lane_update` is {lane_update!r}; allowed: 'mix', 'add'.")
        self.lane_update = lane_update
        self.staleness_power = staleness_power
        self.block_size = block_size  # tokens per block: bounds what a peer's report may claim
        self._pseudonyms: dict[str, str] = {}
        self._book = LeaseBook(registry.leases(active_only=True), next_token=registry.max_lease_token() + 1,
                               lookup=registry.lease, latest=registry.latest_lease_tokens(), lanes=lanes)
        self.schedule = SweepSchedule(sweep_interval_s)
        self.last_served = registry.last_leased()
        # What each adapter is trained and judged on: its catalog entry, else a language adapter.
        self.terms = {a.name: adapter_terms(a.name, a.languages, a.task, catalog) for a in registry.adapters()}
        # Tokens trained into each adapter (judged pushes), what the `fair` policy balances. A push counts
        # what it reported, at least 0 and at most `max_push_tokens` (max_steps * batch_size * grad_accum
        # * block_size: what one lease can train), so no node can push an adapter out of turn.
        self.max_push_tokens = max_push_tokens
        self._tokens = registry.tokens_by_adapter(max_push_tokens)
        latest = registry.latest_adapter_versions()
        self.pool = AdapterPool(
            self._info(name, latest[name].version) for name in self.terms
            if name in latest and self._book.is_free(name)
        )
        self.review: Optional[PeerReview] = None
        if self.gate.peers > 0:
            self.review = PeerReview(
                self.gate.peers, self.gate.peer_wait_s, min_standing=self.gate.peer_min_weight,
                pairs=registry.peer_pair_counts(),
                standings={peer: (s.agreed, s.disagreed) for peer, s in registry.peer_standing().items()},
            )

    # -- what others ask -------------------------------------------------------------------------

    @property
    def workbench(self) -> AdapterWorkbench:
        """The blind evaluator on the base pushes are judged on now (``adopt_base`` replaces it)."""
        return self._workbench

    def adopt_base(self, workbench: AdapterWorkbench) -> None:
        """Judge on a newly published base from now on: ``workbench`` holds it."""
        self._workbench = workbench

    def pseudonym(self, identity: str) -> str:
        """The pseudonym the registry gives a node identity: how logs and records name a node. It never
        changes, so it is looked up once per identity (peer choice asks it for every idle node, every turn)."""
        if identity not in self._pseudonyms:
            self._pseudonyms[identity] = self._registry.pseudonym(identity)
        return self._pseudonyms[identity]

    def lease(self, token: int) -> Optional[Lease]:
        """The lease of ``token`` as the book knows it (active or ended), or None if never issued."""
        return self._book.get(token)

    def adapter_tokens(self) -> dict[str, int]:
        """Tokens trained into each adapter so far (its judged pushes, as counted for the `fair` policy)."""
        return dict(sorted(self._tokens.items()))

    def token_shares(self) -> dict[str, float]:
        """Each adapter's tokens over the mean over the adapters: 1.0 is its equal share (``fair``'s target)."""
        return token_shares(self._tokens)

    def leased_adapters(self) -> set[str]:
        """The adapters under an active lease now (on any lane)."""
        return {lease.adapter for lease in self._book.active()}

    @property
    def lanes(self) -> int:
        """How many nodes may hold one adapter at once (``relay.lanes``)."""
        return self._book.lanes

    @property
    def carry(self) -> str:
        """What of the optimizer travels with an adapter (``train.carry``): a push's state is checked by it."""
        return self._train.carry

    def train_payload(self, assignment: Assignment) -> TrainPayload:
        """The adapter weights a new lease starts from, where a node may fetch its base itself, and
        the optimizer state the lease continues (``train.carry``)."""
        # torch is imported only once a lease is issued: leases and fencing run without it.
        from fedem_flwr.model.lora import read_adapter_state

        lease = assignment.lease
        state = read_adapter_state(self._store.get(assignment.adapter_ref))
        return TrainPayload(state, hf_location(self._store, assignment.base_ref),
                            self._lease_optimizer(lease.adapter, lease.adapter_version, state))

    # -- optimizer states (train.carry) ----------------------------------------------------------

    def _lease_optimizer(self, adapter: str, version: int, weights: Mapping[str, Any]) -> Optional["OptimizerState"]:
        """The optimizer state a lease of ``adapter`` ``version`` (whose weights are ``weights``) starts
        from: the one kept for that version; for a rebased version without one, its parent's with the
        moments reset or pruned (``train.rebase_moments``) and the warmup started again there; else a
        fresh one. None with ``carry=none``."""
        if self.carry == "none":
            return None
        from fedem_flwr.model.adapter_spec import AdapterSpec
        from fedem_flwr.training.optimizer_state import fresh, reset_moments

        spec = AdapterSpec.from_state(weights)
        kept = self._kept_optimizer(adapter, version, spec)
        if kept is not None:
            return kept
        row = self._registry.adapter_version(adapter, version)
        if row is not None and row.kind == "rebase" and row.parent_version is not None:
            parent = self._kept_optimizer(adapter, row.parent_version, spec)
            if parent is not None:
                return reset_moments(parent, self._train.rebase_moments)
        return fresh(spec, self.carry)

    def _kept_optimizer(self, adapter: str, version: int, spec: Any) -> Optional["OptimizerState"]:
        """The state kept for ``adapter`` ``version``, fitted to ``carry`` and ``spec`` (moments that do
        not fit are zeroed, the schedule position kept), or None when none is kept or it cannot be read."""
        from fedem_flwr.training.optimizer_state import (
            InvalidOptimizerState,
            OptimizerState,
            fresh,
            load_optimizer_state,
            validate_optimizer_state,
        )

        path = self._optimizer_states.get(adapter, version)
        if path is None:
            return None
        try:
            kept = load_optimizer_state(path)
        except InvalidOptimizerState as err:
            log.error("The kept optimizer state of %r v%d cannot be read (%s): its lease starts afresh", adapter,
                      version, err)
            return None
        if self.carry == "schedule":
            return OptimizerState(kept.step, kept.warmup_from, {})
        if kept.moments:
            try:
                return validate_optimizer_state(kept, spec, carry="moments")
            except InvalidOptimizerState as err:
                log.warning("The kept optimizer moments of %r v%d do not fit it (%s): zeroed", adapter, version, err)
        return fresh(spec, "moments", step=kept.step, warmup_from=kept.warmup_from)

    def _keep_optimizer(self, lease: Lease, version: int, received: "_Received", weights: Mapping[str, Any],
                        onto: Optional[int] = None) -> None:
        """Keep the push's optimizer state as ``version``'s, before the version's registry row commits;
        a state that failed its check is replaced by a fresh one at the leased state's step. A push
        applied as an update ``onto`` another version carries that version's state, combined
        (``_combined_optimizer``)."""
        if self.carry == "none":
            return
        from fedem_flwr.model.adapter_spec import AdapterSpec
        from fedem_flwr.training.optimizer_state import fresh, optimizer_state_bytes

        kept = received.optimizer
        if kept is None:
            sent = self._lease_optimizer(lease.adapter, lease.adapter_version, weights)
            kept = fresh(AdapterSpec.from_state(weights), self.carry, step=sent.step, warmup_from=sent.warmup_from)
        if onto is not None:
            kept = self._combined_optimizer(lease, kept, onto, weights)
        try:
            self._optimizer_states.put(lease.adapter, version, optimizer_state_bytes(kept))
        except OSError as err:
            raise HubFault(f"cannot keep the optimizer state of {lease.adapter!r} v{version}: {one_line(err)}") from err

    def _combined_optimizer(self, lease: Lease, pushed: "OptimizerState", onto: int,
                            weights: Mapping[str, Any]) -> "OptimizerState":
        """The state of a push applied as an update onto version ``onto`` (weights ``weights``): the
        steps the push trained (its step minus the step its lease was sent) added to ``onto``'s own
        step, so the schedule counts every step in the adapter whichever lane trained it; zero moments,
        since the truncation re-factored the weights they describe; and ``onto``'s warmup, started
        again here only when a merge rebased the adapter since the lease began (a new base)."""
        from fedem_flwr.training.optimizer_state import reset_moments

        sent = self._lease_optimizer(lease.adapter, lease.adapter_version, weights)
        current = self._lease_optimizer(lease.adapter, onto, weights)
        combined = reset_moments(replace(pushed, step=current.step + max(0, pushed.step - sent.step)), "reset")
        rebased = any(row.kind == "rebase" for row in self._registry.adapter_versions(lease.adapter)
                      if lease.adapter_version < row.version <= onto)
        return combined if rebased else replace(combined, warmup_from=current.warmup_from)

    def base_folder(self, base: ArtifactRef) -> Path:
        """The stored files of a base, to send in-band to a node that lacks them."""
        return self._store.get(base)

    # -- lifecycle -------------------------------------------------------------------------------

    def recover(self) -> list[Lease]:
        """Expire leases left active by an earlier run: their holders are gone with it."""
        now = self.clock()
        ended = self._book.expire_all(now, reason="hub-restart")
        self._flush()
        self._record_lost_reviews(now)
        self.schedule.mark(now)
        if ended:
            log.info("Expired %d lease(s) left active by an earlier run", len(ended))
        return ended

    def _record_lost_reviews(self, now: float) -> None:
        """Pushes that waited for peers when an earlier run stopped: their weights went with it. Each is
        recorded as rejected, so every lease that ended in a push has its contribution."""
        reviewed = [lease for lease in self._registry.leases() if lease.outcome == PEER_REVIEW]
        if not reviewed:
            return
        recorded = {c.lease_token for c in self._registry.contributions()}
        for lease in [lease for lease in reviewed if lease.token not in recorded]:
            received = _Received(self._registry.pseudonym(lease.holder), now, "-", {}, ())
            with self._registry.atomic():
                self._record(received, lease.adapter, lease.token, "rejected",
                             "hub-restart: the hub stopped while peers judged this push; its weights were not kept",
                             None, {})

    def tick(self) -> list[Lease]:
        """Sweep due leases when the sweep interval has passed."""
        now = self.clock()
        if not self.schedule.due(now):
            return []
        self.schedule.mark(now)
        return self.sweep(now)

    def sweep(self, now: Optional[float] = None) -> list[Lease]:
        now = self.clock() if now is None else now
        expired = self._book.sweep(now)
        self._flush()
        for lease in expired:
            log.info("Lease %d on %r expired (holder %s)", lease.token, lease.adapter, self.pseudonym(lease.holder))
        return expired

    # -- leasing ---------------------------------------------------------------------------------

    def _info(self, name: str, version: int) -> AdapterInfo:
        # A policy matches adapters to nodes by what they serve: a language, or a task's data in a language.
        return AdapterInfo(name, self.terms[name].serving, version, self.last_served.get(name),
                           self._tokens.get(name, 0))

    def _can_train(self, node: NodeProfile, name: str) -> bool:
        """A language adapter may go to any node (one without its language answers ``no-data``, as ever);
        a task adapter only to a node that declared data of its format in one of its languages."""
        terms = self.terms[name]
        return terms.data_format == TEXT or not set(terms.serving).isdisjoint(node.languages)

    def _count_tokens(self, adapter: str, metrics: Mapping[str, float]) -> None:
        """Add a judged push's reported ``tokens`` to its adapter, clamped to [0, ``max_push_tokens``] as
        ``Registry.tokens_by_adapter`` clamps them; a free adapter is offered with the new count at once."""
        pushed = max(0, int(metrics.get("tokens", 0.0)))  # parsed metrics are finite numbers
        self._tokens[adapter] = self._tokens.get(adapter, 0) + (
            pushed if self.max_push_tokens is None else min(pushed, self.max_push_tokens))
        info = self.pool.get(adapter)
        if info is not None:
            self.pool.put(replace(info, tokens=self._tokens[adapter]))

    def assign(self, free_nodes: Sequence[NodeProfile]) -> list[Assignment]:
        """Lease adapters to the free nodes the policy picks; nodes holding a lease are skipped.

        A policy round gives each adapter at most one node; with lanes, rounds repeat while nodes are
        left and the round placed some (at most ``lanes`` rounds: each fills one more lane)."""
        now = self.clock()
        self.sweep(now)  # any access after a deadline expires the lease first
        nodes = [n for n in free_nodes if self._book.node_free(n.node)]
        if not nodes:
            return []
        base = self._registry.latest_checkpoint()
        if base is None:
            raise RuntimeError("the hub has no base checkpoint; seed it before relaying")
        assignments: list[Assignment] = []
        while nodes:
            placed = self._assign_round(nodes, base, now)
            assignments += placed
            if not placed or self.lanes == 1:
                break
            taken = {a.lease.holder for a in placed}
            nodes = [n for n in nodes if n.node not in taken]
        return assignments

    def _assign_round(self, nodes: Sequence[NodeProfile], base: Any, now: float) -> list[Assignment]:
        """One policy round: each adapter with a free lane to at most one of ``nodes``."""
        placed = []
        self.policy.observe([self._info(lease.adapter, lease.adapter_version) for lease in self._book.active()])
        for node, info in self.policy.assign(nodes, self.pool.free()):
            if not self._can_train(node, info.name):
                continue  # a task adapter goes only to a node that declared its data
            self.pool.take(info.name)
            version = self._registry.latest_adapter_version(info.name)
            lease = self._book.acquire(info.name, node.node, base.version, version.version, now, self.lease_ttl_s)
            self._flush()
            self.last_served[info.name] = now
            if self._book.is_free(info.name):  # another lane is open: offered again, from the next round
                self.pool.put(self._info(info.name, version.version))
            placed.append(Assignment(lease, info, version.ref, base.ref, self.terms[info.name]))
            lane = f" lane {lease.lane}" if self.lanes > 1 else ""
            log.info(
                "Leased %r v%d%s to %s (token %d, %.0f s)",
                info.name, version.version, lane, self.pseudonym(node.node), lease.token, self.lease_ttl_s,
            )
        return placed

    # -- pushes ----------------------------------------------------------------------------------

    def receive_push(
        self,
        token: int,
        state: Optional[Mapping[str, Any]],
        *,
        invalid_reason: Optional[str] = None,
        metrics: Optional[Mapping[str, float]] = None,
        dropped_metrics: Sequence[str] = (),
        optimizer_state: Optional["OptimizerState"] = None,
        optimizer_invalid: Optional[str] = None,
    ) -> PushOutcome:
        """Fence, check for work, evaluate blind, decide, and persist the outcome of one push.

        ``token`` is the hub's own lease of the message the push answers (its holder, adapter and base
        are the lease's): what the reply claimed was checked against it when it was parsed. The fence
        is the lease's state: still active and before its deadline, else ``expired``, ``superseded``,
        ``duplicate`` or ``unknown-token``. ``state`` is None when the wire checks failed
        (``invalid_reason`` says why): a valid lease still ends, and the push is recorded as rejected.
        ``metrics`` are the reply's as parsed (finite numbers) and ``dropped_metrics`` names those the
        parse dropped; both are recorded with the contribution as they are.

        With ``train.carry``, ``optimizer_state`` is the push's optimizer state as the strategy checked
        it, or None with ``optimizer_invalid`` saying why it failed (or was missing): an accepted push
        keeps it (or, invalid, a fresh one at the leased step) as its new version's, and the
        contribution's ``validation["optimizer"]`` says which; it never decides the push.

        Nothing a node sends ends the run: an unexpected error while judging one push ends its lease
        (outcome ``hub-error``) and is recorded as a rejection. Only a fault of the hub itself (the
        registry cannot be written, the store cannot be read or written) raises ``HubFault``.
        """
        try:
            return self._receive(token, state, invalid_reason, dict(metrics or {}), tuple(dropped_metrics),
                                 optimizer=(optimizer_state, optimizer_invalid))
        except Exception as err:
            if is_hub_fault(err) and not isinstance(err, HubFault):
                leased = self._book.get(token)
                push = f"push for {leased.adapter!r}, lease {token}" if leased else f"push under lease {token}"
                raise HubFault(f"the hub cannot go on ({push}): {one_line(err)}") from err
            raise

    def _receive(self, token: int, state: Optional[Mapping[str, Any]], invalid_reason: Optional[str],
                 metrics: dict[str, float], dropped: tuple[str, ...],
                 optimizer: tuple[Any, Optional[str]] = (None, None)) -> PushOutcome:
        now = self.clock()
        digest = state_digest(state) if state is not None else "-"
        try:
            lease = self._fence(token, now)
        except PushRejected as rejected:
            return self._reject_unfenced(rejected, token, now, digest, metrics, dropped)
        received = _Received(self._registry.pseudonym(lease.holder), now, digest, metrics, dropped)
        if self.carry != "none":  # what the push's optimizer state was, recorded with it
            pushed, invalid = optimizer
            received = replace(received, optimizer=pushed, optimizer_invalid="" if pushed is not None else
                               (invalid or "the push carried no optimizer state"))

        if state is None:
            return self._conclude(lease, received, "rejected", f"invalid-adapter: {invalid_reason}", {})
        try:
            return self._judge(lease, received, state)
        except Exception as err:  # one push's trouble is recorded, never the end of the run
            if is_hub_fault(err):
                raise
            return self._contain(lease, received, err)

    def _fence(self, token: int, now: float) -> Lease:
        """The active lease of ``token`` if a push may still end it, else a ``PushRejected``.

        Only the lease's state and deadline are checked here: the reply's claims were checked when it
        was parsed."""
        return self._book.check_push(token, now)

    def _judge(self, lease: Lease, received: "_Received", pushed: Mapping[str, Any]) -> PushOutcome:
        """No credit without work (before evaluation), then blind evaluation and the gate; with peers, the
        push then waits for them (``_await_peers``)."""
        hub = self._hub_verdict(lease, pushed, self._registry.latest_adapter_version(lease.adapter),
                                self._registry.latest_checkpoint())
        if hub.decision is None:
            return self._conclude(lease, received, "rejected", hub.reason, hub.losses, judged=hub.base.version,
                                  update=hub.update)
        if self.review is not None:
            return self._await_peers(lease, received, pushed, hub)
        return self._finish(lease, received, hub, hub.decision.accepted, hub.decision.reason)

    def _hub_verdict(self, lease: Lease, pushed: Mapping[str, Any], parent: Any, base: Any) -> _HubVerdict:
        """The hub's own judgement of ``pushed`` as the next version after ``parent``, on ``base``.

        A push is judged on the current base, whatever base its lease started on: the workbench holds
        the newest base, and the parent's losses come from that same base (evaluations belong to a
        pair of adapter version and base version), so like is compared with like."""
        terms = self.terms[lease.adapter]
        languages = terms.heldout_keys  # its own held-out sets: a language's text, or its task's data
        parent_state = self._parent_weights(parent)
        state, update = pushed, None
        if parent.version == lease.adapter_version:  # nothing moved: the push is judged and kept as it is
            idle = no_work(state, parent_state, self.gate.min_change, revision_name(parent.version))
        else:  # another lane's push or a merge moved the adapter while the push was out: it lands as its change
            start = self._parent_weights(self._registry.adapter_version(lease.adapter, lease.adapter_version))
            idle = no_work(state, start, self.gate.min_change, revision_name(lease.adapter_version))
            if not idle:
                state, update, idle = self._as_update(lease, parent, state, start, parent_state)
        if idle:
            return _HubVerdict(base, parent, parent_state, state, update, {}, None, idle)

        scope = None if self.gate.check_others else languages
        reference = self._parent_losses(parent, base.version, parent_state, scope)
        losses = self._workbench.evaluate(state, scope)
        bad = [lang for lang in sorted(losses) if not math.isfinite(losses[lang])]
        if bad:  # huge weights: nothing to compare, and nothing to keep
            reason = "non-finite-loss: held-out loss " + ", ".join(f"{lang}={losses[lang]}" for lang in bad)
            return _HubVerdict(base, parent, parent_state, state, update, losses, None, reason)
        return _HubVerdict(base, parent, parent_state, state, update, losses, self._decide(losses, reference, terms))

    def _finish(self, lease: Lease, received: "_Received", hub: _HubVerdict, accepted: bool, reason: str,
                **conclude: Any) -> PushOutcome:
        """Keep an accepted push as the next version (artifact and optimizer state first), then conclude."""
        ref = (self._write_artifact(hub.state, hub.parent, lease, hub.losses, received.pseudonym, hub.base)
               if accepted else None)
        if ref is not None:  # before the version's row commits
            self._keep_optimizer(lease, hub.parent.version + 1, received, hub.state,
                                 onto=hub.parent.version if hub.update is not None else None)
        return self._conclude(lease, received, "accepted" if accepted else "rejected", reason, hub.losses,
                              parent=hub.parent, ref=ref, judged=hub.base.version, update=hub.update, **conclude)

    # -- judged by peers -------------------------------------------------------------------------

    def _await_peers(self, lease: Lease, received: "_Received", pushed: Mapping[str, Any],
                     hub: _HubVerdict) -> PushOutcome:
        """End the lease now and keep the push waiting for its peers (module doc)."""
        terms = self.terms[lease.adapter]
        with self._registry.atomic():
            self._book.release(lease.token, received.at, outcome=PEER_REVIEW)
            self.review.add(lease.token, lease.adapter, received.pseudonym, terms.serving, hub.base.digest,
                            received.at, _Judged(lease, received, pushed, hub, terms))
            self._flush()
        log.info("Push for %r (lease %d) waits up to %.0f s for %d peer(s); the hub's own held-out: %s",
                 lease.adapter, lease.token, self.gate.peer_wait_s, self.gate.peers, hub.decision.reason)
        return PushOutcome(PENDING, f"awaiting peers; hub: {hub.decision.reason}", lease.adapter, lease.token,
                           losses=dict(hub.losses))

    def waiting_for_peers(self) -> int:
        """How many pushes wait for their peers now."""
        return 0 if self.review is None else len(self.review)

    def peer_requests(self, idle: Sequence[tuple[NodeProfile, frozenset[str]]]) -> list[PeerRequest]:
        """Evaluations for idle nodes (each with the digests of the bases it holds), for the pushes that
        wait for peers, oldest first; each node gets at most one (``relay.peer_review``)."""
        if self.review is None or not len(self.review):
            return []
        now = self.clock()
        candidates = [(Candidate(self.pseudonym(node.node), tuple(node.languages), bases), node.node)
                      for node, bases in idle if self._book.node_free(node.node)]
        requests = []
        for awaiting, question in self.review.ask(now, candidates):
            judged: _Judged = awaiting.judged
            base = judged.hub.base
            blocks = self.gate.max_eval_blocks
            requests.append(PeerRequest(question.evaluation, question.identity, base.ref, base.version, judged.terms,
                                        judged.hub.state, judged.hub.parent_state, awaiting.deadline,
                                        blocks, None if self.block_size is None else blocks * self.block_size,
                                        hf_location(self._store, base.ref)))
            log.info("Push for %r (lease %d): peer %s asked to judge it (evaluation %d)", awaiting.adapter,
                     awaiting.token, question.peer, question.evaluation)
        return requests

    def peer_answered(self, evaluation: int, tokens: Mapping[str, int], candidate: Mapping[str, float],
                      parent: Mapping[str, float]) -> None:
        """A peer's checked report (``protocol.messages.parse_peer_reply``) for ``evaluation``."""
        found = None if self.review is None else self.review.question(evaluation)
        if found is None:
            log.info("A peer's report for evaluation %d came after its push was decided; dropped", evaluation)
            return
        awaiting, question = found
        result = PeerResult(question.peer, dict(tokens), dict(candidate), dict(parent),
                            self.review.standing(question.peer))
        self.review.answer(evaluation, result, self.clock())
        log.info("Peer %s judged the push for %r (lease %d): %+.3f on %d tokens of %s", question.peer,
                 awaiting.adapter, awaiting.token, result.delta, result.total_tokens, ",".join(sorted(tokens)))

    def peer_failed(self, evaluation: int, why: str) -> None:
        """No usable report for ``evaluation``: an error reply, a reply that failed its checks, no data."""
        found = None if self.review is None else self.review.question(evaluation)
        if found is None:
            return
        awaiting, question = found
        self.review.fail(evaluation, why, self.clock())
        log.info("Peer %s gave no report on the push for %r (lease %d): %s", question.peer, awaiting.adapter,
                 awaiting.token, why)

    def conclude_due(self, force: bool = False) -> list[PushOutcome]:
        """Decide the pushes whose peers all answered or whose wait is over (``force``: every one, as the
        relay stops)."""
        if self.review is None:
            return []
        return [self._conclude_reviewed(awaiting) for awaiting in self.review.due(self.clock(), force)]

    def _conclude_reviewed(self, awaiting: Awaiting) -> PushOutcome:
        judged: _Judged = awaiting.judged
        lease, received = judged.lease, judged.received
        try:
            hub = judged.hub
            base = self._registry.latest_checkpoint()
            parent = self._registry.latest_adapter_version(lease.adapter)
            if base.version != hub.base.version or parent.version != hub.parent.version:
                log.info("Push for %r (lease %d): the adapter or the base moved while peers judged it; the hub "
                         "judges it again on v%d, base v%d", lease.adapter, lease.token, parent.version, base.version)
                hub = self._hub_verdict(lease, judged.pushed, parent, base)
            results = awaiting.results()
            verdict = aggregate(results, method=self.gate.peer_aggregate, trim=self.gate.peer_trim,
                                min_peers=self.gate.peer_min, min_tokens=self.gate.peer_min_tokens)
            hub_tokens = self._hub_tokens(judged.terms)
            if hub.decision is None:
                record = self._peer_record(awaiting, verdict, None, hub, hub_tokens)
                return self._conclude(lease, received, "rejected", hub.reason, hub.losses, judged=hub.base.version,
                                      update=hub.update, reviewed=awaiting, peers=record)
            margin = self.gate.margin if judged.terms.margin is None else judged.terms.margin
            judgement = combine(hub.decision, hub_tokens, verdict, hub_min_tokens=self.gate.hub_min_tokens,
                                margin=margin, tolerance=self.gate.peer_tolerance,
                                pool=self.gate.peer_decide == "pooled")
            agreed = judged_reports(results, verdict, hub.decision, judgement.role, margin)
            record = self._peer_record(awaiting, verdict, judgement, hub, hub_tokens)
            return self._finish(lease, received, hub, judgement.accepted, judgement.reason, reviewed=awaiting,
                                peers=record, agreed=agreed)
        except Exception as err:
            if is_hub_fault(err):
                raise
            outcome = self._contain(lease, received, err)
            self._offer(lease.adapter)
            return outcome

    def _held(self, adapter: str) -> bool:
        """Whether ``adapter`` must not be offered: with one lane, while a push of it waits for peers."""
        return self.review is not None and self.lanes == 1 and self.review.holds(adapter)

    def _offer(self, adapter: str) -> None:
        """Offer ``adapter`` again from its latest version, when it has a free lane and nothing holds it."""
        if self._book.is_free(adapter) and not self._held(adapter):
            self.pool.put(self._info(adapter, self._registry.latest_adapter_version(adapter).version))

    def _hub_tokens(self, terms: AdapterTerms) -> float:
        """Held-out tokens the hub has on an adapter's own sets (0 when its workbench does not count them)."""
        weights = self._workbench.weights or {}
        return float(sum(weights.get(key, 0.0) for key in terms.heldout_keys))

    def _peer_record(self, awaiting: Awaiting, verdict: PeerVerdict, judgement: Optional[Judgement],
                     hub: _HubVerdict, hub_tokens: float) -> dict[str, Any]:
        """The hub's numbers and the peers' (by pseudonym), as the contribution records them."""
        delta = None if hub.decision is None or not math.isfinite(hub.decision.delta) else hub.decision.delta
        reports = []
        for question in awaiting.questions.values():
            result = question.result
            reports.append({"peer": question.peer, "tokens": result.total_tokens if result else 0,
                            "delta": verdict.deltas.get(question.peer), "weight": verdict.weights.get(question.peer),
                            "outcome": question.outcome})
        return {
            "hub": {"tokens": hub_tokens, "delta": delta, "accepted": bool(hub.decision and hub.decision.accepted)},
            "peers": {"role": judgement.role if judgement else "", "asked": len(awaiting.questions),
                      "counted": verdict.counted, "delta": verdict.delta, "tokens": verdict.tokens,
                      "effect": judgement.effect if judgement else "", "waited_s": self.clock() - awaiting.arrived,
                      "reports": reports},
        }

    def _peer_rows(self, token: int, awaiting: Awaiting) -> list[PeerReport]:
        """Each question about a push as ``peer_reports`` keeps it (the pair counts that rotate peers)."""
        rows = []
        for question in awaiting.questions.values():
            result = question.result
            report = None if result is None else {
                "tokens": dict(result.tokens), "candidate": dict(result.candidate), "parent": dict(result.parent),
                "delta": result.delta, "weight": result.standing,
            }
            rows.append(PeerReport(token, question.peer, awaiting.pusher, question.at, question.answered,
                                   question.outcome, report))
        return rows

    def _as_update(self, lease: Lease, parent: Any, pushed: Mapping[str, Any], start: Mapping[str, Any],
                   current: Mapping[str, Any]) -> tuple[Mapping[str, Any], Optional[dict[str, Any]], str]:
        """``pushed`` as an update of ``parent`` (the current version, weights ``current``): its change
        from ``start`` (the version its lease started from) added in weight space and factored back to
        the adapter's rank with its own ``alpha``. Returns the state to judge, the record of the update
        and "" (or, when the sum cannot be factored, the push, None and why it is rejected)."""
        from fedem_flwr.config.schema import LoraConfig
        from fedem_flwr.lineage.merge import MergeError, update_state

        spec = dict(self._registry.adapter(lease.adapter).lora_spec or {})
        if "r" not in spec or "alpha" not in spec:
            raise ConfigError(f"adapter {lease.adapter!r} records no LoRA `r` and `alpha` (`lora_spec` is {spec}): "
                              "a push on a moved version cannot be factored back to its rank")
        # staleness: the other lanes' pushes accepted since the lease began (a rebase is no lane's change)
        since = [row for row in self._registry.adapter_versions(lease.adapter)
                 if lease.adapter_version < row.version <= parent.version]
        lanes = [row for row in since if row.kind == "push"]
        weight = (1.0 + len(lanes)) ** -self.staleness_power
        overlap = ([(self._parent_weights(self._registry.adapter_version(lease.adapter, row.parent_version)),
                     self._parent_weights(row)) for row in lanes] if self.lane_update == "mix" else [])
        try:  # only the rank and alpha enter the arithmetic
            converted = update_state(current, pushed, start, LoraConfig(r=int(spec["r"]), alpha=spec["alpha"]),
                                     weight=weight, overlap=overlap)
        except MergeError as err:
            return pushed, None, f"invalid-update: {err}"
        record = {"from_version": lease.adapter_version, "onto_version": parent.version, "staleness": len(lanes),
                  "weight": weight, "rule": self.lane_update if lanes else "add", **converted.record()}
        log.info("Push for %r (lease %d) started from v%d; applied to v%d as an update (%s, staleness %d, weight "
                 "%.3g, truncation %.3g)", lease.adapter, lease.token, lease.adapter_version, parent.version,
                 record["rule"], len(lanes), weight, converted.relative)
        return converted.state, record, ""

    def _parent_losses(self, parent: Any, base_version: int, parent_state: Mapping[str, Any],
                       languages: Optional[Sequence[str]]) -> HeldoutLosses:
        """The parent's held-out losses on ``base_version``, evaluated there first when missing (or
        missing a language the gate now compares)."""
        recorded = self._registry.parent_losses(parent.adapter, parent.version, base_version) or {}
        wanted = set(self._workbench.heldout if languages is None else languages) & set(self._workbench.heldout)
        if wanted <= set(recorded):
            return recorded
        losses = {**recorded, **self._workbench.evaluate(parent_state, languages)}
        finite = {lang: loss for lang, loss in losses.items() if math.isfinite(loss)}
        self._registry.put_evaluation(parent.adapter, parent.version, base_version, finite, self.clock())
        return finite

    def _contain(self, lease: Lease, received: "_Received", err: Exception) -> PushOutcome:
        """End the lease of a push the hub failed to judge, record why, and let the relay go on."""
        reason = f"hub-error: {one_line(err)}"
        log.error("Push for %r (lease %d) could not be judged; its lease ends and the relay goes on",
                  lease.adapter, lease.token, exc_info=err)
        current = self._book.get(lease.token)
        with self._registry.atomic():
            self._record(received, lease.adapter, lease.token, "rejected", reason, None, {})
            if current is not None and current.active:
                self._book.release(lease.token, received.at, outcome="hub-error")
            self._flush()
        return PushOutcome("rejected", reason, lease.adapter, lease.token)

    def fail(self, token: int, reason: str) -> Optional[Lease]:
        """End a lease whose train message failed (client error, expired message)."""
        lease = self._book.get(token)
        if lease is None or not lease.active:
            return None
        ended = self._book.expire(token, self.clock(), reason=reason)
        self._flush()
        log.info("Lease %d on %r ended: %s", token, lease.adapter, reason)
        return ended

    def reject_lease(
        self, token: int, reason: str, *, metrics: Optional[Mapping[str, float]] = None,
        dropped_metrics: Sequence[str] = (),
    ) -> Optional[PushOutcome]:
        """End an active lease at once because its reply cannot be judged (its claims contradict the
        lease, or handling it failed); record a rejected contribution with ``reason`` and the reply's
        parsed ``metrics``. The lease's outcome is the reason's code (the part before the first colon)."""
        lease = self._book.get(token)
        if lease is None or not lease.active:
            return None
        received = _Received(self._registry.pseudonym(lease.holder), self.clock(), "-", dict(metrics or {}),
                             tuple(dropped_metrics))
        with self._registry.atomic():
            self._record(received, lease.adapter, token, "rejected", reason, None, {})
            self._book.expire(token, received.at, reason=reason.split(":", 1)[0])
            self._flush()
        log.info("Lease %d on %r ended: %s", token, lease.adapter, reason)
        return PushOutcome("rejected", reason, lease.adapter, token)

    def refresh_adapter(self, name: str) -> None:
        """A new version was recorded outside a push (a rebase after a merge): a free adapter is offered
        with it from now on."""
        self._offer(name)

    def node_gone(self, holder: str) -> list[Lease]:
        ended = self._book.expire_holder(holder, self.clock(), reason="node-gone")
        self._flush()
        return ended

    # -- internals -------------------------------------------------------------------------------

    def _reject_unfenced(self, rejected: PushRejected, token: int, now: float, digest: str,
                         metrics: dict[str, float], dropped: tuple[str, ...]) -> PushOutcome:
        """A push that fails the fence is recorded against the adapter its token leased (a token never
        issued names none: dropped with a warning); nothing of it is evaluated or kept."""
        self._flush()  # a late push expired its lease just now: persist that
        known = rejected.lease
        reason = str(rejected)  # "<reason code>: <details>"
        if known is None:
            log.warning("Push under unknown lease token %d dropped: %s", token, reason)
            return PushOutcome("rejected", reason, "", token)
        received = _Received(self._registry.pseudonym(known.holder), now, digest, metrics, dropped)
        with self._registry.atomic():
            self._record(received, known.adapter, token, "rejected", reason, None, {})
        return PushOutcome("rejected", reason, known.adapter, token)

    def _decide(self, losses: HeldoutLosses, parent: HeldoutLosses, terms: AdapterTerms) -> Decision:
        """Better on its own held-out sets by the margin; with ``check_others``, no worse than the
        tolerance on every other set the hub holds out. A catalog entry may set its own margin and tolerance."""
        own = terms.heldout_keys
        weights = self._workbench.weights if self.gate.weighting == "tokens" else None
        others = [lang for lang in losses if lang not in own] if self.gate.check_others else None
        margin = self.gate.margin if terms.margin is None else terms.margin
        tolerance = self.gate.tolerance if terms.tolerance is None else terms.tolerance
        return decide(losses, parent, own, margin, weights=weights, others=others, tolerance=tolerance)

    def _parent_weights(self, parent: Any) -> dict[str, Any]:
        """The parent version's weights from the store (digest-verified); a store that cannot give them
        back is a fault of the hub, not of the push."""
        # torch is imported only once a push is judged: leases and fencing run without it.
        from fedem_flwr.model.lora import read_adapter_state

        try:
            return read_adapter_state(self._store.get(parent.ref))
        except (StoreError, OSError, InvalidAdapter) as err:
            raise HubFault(f"cannot read {parent.repo}@{parent.revision}, the parent version of a push: "
                           f"{one_line(err)}") from err

    def _write_artifact(self, state, parent, lease: Lease, losses: HeldoutLosses, contributor: str,
                        base: Any) -> ArtifactRef:
        """The artifact, with its filled model card, is renamed into place before its registry row
        commits: a crash between the two leaves an orphan revision that ``fedem verify`` reports and
        this write replaces, never a row without files.

        The workbench's own errors are the push's (contained); a store that cannot write is the hub's.
        """
        base_ref = ArtifactRef(self._store.repo_id(base.repo), base.revision, base.digest)
        version = parent.version + 1
        from fedem_flwr.hub.lineage import write_adapter_card  # huggingface_hub's cards: only once a version is written

        with tempfile.TemporaryDirectory(prefix="fedem-adapter-") as tmp:
            self._workbench.save(state, Path(tmp), base_ref)
            write_adapter_card(Path(tmp), self._registry, self._store, repo=parent.repo, adapter=lease.adapter,
                               version=version, base_version=base.version, parent_version=parent.version,
                               kind="push", heldout=losses, contributor=contributor)
            try:
                return self._store.put(
                    parent.repo, revision_name(version), Path(tmp),
                    message=f"{lease.adapter} v{version} (lease {lease.token})",
                    replace_orphan=True,  # `version` is past the registry's latest: what is stored there is an orphan
                )
            except (StoreError, OSError) as err:
                raise HubFault(f"cannot write {parent.repo}@{revision_name(version)}: {one_line(err)}") from err

    def _conclude(
        self, lease: Lease, received: "_Received", decision: str, reason: str, losses: Mapping[str, float], *,
        parent: Any = None, ref: Optional[ArtifactRef] = None, judged: Optional[int] = None,
        update: Optional[Mapping[str, Any]] = None, reviewed: Optional[Awaiting] = None,
        peers: Optional[Mapping[str, Any]] = None, agreed: Optional[Mapping[str, bool]] = None,
    ) -> PushOutcome:
        """Release the lease, add the version (if any) and record the contribution in one transaction.

        ``judged`` is the base the push was judged on; a new version belongs to that base. ``update`` is
        the record of a push applied as an update (``_as_update``), kept with both. A push ``reviewed`` by
        peers ended its lease when it arrived: the contribution also records ``peers`` (the hub's numbers
        and the peers'), ``peer_reports`` each question, and each peer ``agreed`` with its standing."""
        version = None
        extra = {"update": dict(update)} if update is not None else {}
        with self._registry.atomic():
            if ref is not None:
                row = self._registry.add_adapter_version(
                    adapter=lease.adapter, base_version=judged, parent_version=parent.version,
                    repo=ref.repo, revision=ref.revision, digest=ref.digest,
                    metrics={"heldout": dict(losses), "train": dict(received.metrics), **extra}, created=received.at,
                )
                version = row.version
            self._record(received, lease.adapter, lease.token, decision, reason, version, losses,
                         trained_on=lease.base_version, judged_on=judged, extra={**extra, **(peers or {})})
            if judged is not None:
                self._count_tokens(lease.adapter, received.metrics)
            if reviewed is None:
                self._book.release(lease.token, received.at, outcome=decision)
            else:
                self._registry.add_peer_reports(self._peer_rows(lease.token, reviewed))
                for peer, (yes, no) in self.review.settle(agreed or {}).items():
                    self._registry.update_peer_standing(peer, yes, no, self.clock())
            self._flush()
        if reviewed is not None:
            self._offer(lease.adapter)
        return PushOutcome(decision, reason, lease.adapter, lease.token, version, dict(losses))

    def _record(self, received: "_Received", adapter: str, token: Optional[int], decision: str, reason: str,
                version: Optional[int], losses: Mapping[str, float], *, trained_on: Optional[int] = None,
                judged_on: Optional[int] = None, extra: Optional[Mapping[str, Any]] = None) -> None:
        """One contribution row (it carries the pseudonym only); the caller holds the transaction.

        The registry holds no NaN: a non-finite loss is stored as null and named in ``non_finite``.
        """
        validation: dict[str, Any] = {"ok": not reason.startswith("invalid-adapter")}
        if received.dropped:
            validation["dropped_metrics"] = list(received.dropped)
        if received.optimizer is not None:
            validation["optimizer"] = "ok"
        elif received.optimizer_invalid:  # never the push's decision: an accepted one keeps a fresh state
            validation["optimizer"] = f"{'replaced' if version is not None else 'invalid'}: {received.optimizer_invalid}"
        heldout = {lang: (float(loss) if math.isfinite(loss) else None) for lang, loss in losses.items()}
        evaluation: dict[str, Any] = {"heldout": heldout, "train": dict(received.metrics), **(extra or {})}
        non_finite = sorted(lang for lang, loss in heldout.items() if loss is None)
        if non_finite:
            evaluation["non_finite"] = non_finite
        self._registry.add_contribution(
            pseudonym=received.pseudonym,
            adapter=adapter,
            lease_token=token,
            received=received.at,
            digest=received.digest,
            validation=validation,
            evaluation=evaluation,
            decision=decision,
            reason=reason,
            adapter_version=version,
            base_version=trained_on,
            judged_base_version=judged_on,
        )
        log.info("Push for %r (lease %s) %s: %s", adapter, token, decision, reason)

    def _flush(self) -> None:
        """Persist every lease the book created or changed, in one transaction."""
        changes = self._book.pop_changes()
        if not changes:
            return
        with self._registry.atomic():
            for lease in changes:
                self._registry.save_lease(lease)
        for lease in changes:
            if not lease.active:
                self._offer(lease.adapter)


@dataclass(frozen=True)
class _Received:
    """What came with one push, as recorded with its contribution (the sender only by pseudonym)."""

    pseudonym: str
    at: float
    digest: str
    metrics: dict[str, float]  # finite numbers, as the protocol parsed them
    dropped: tuple[str, ...]  # metric names the protocol dropped as invalid
    optimizer: Any = None  # the push's optimizer state as the strategy checked it (train.carry)
    optimizer_invalid: str = ""  # why it failed its check or was missing (train.carry)


def state_digest(state: Mapping[str, Any]) -> str:
    """sha256 over sorted (key, dtype, shape, bytes): the same weights always give the same digest."""
    h = hashlib.sha256()
    for key in sorted(state):
        array = state[key].detach().cpu().contiguous().numpy()
        h.update(f"{key}|{array.dtype}|{list(array.shape)}|".encode())
        h.update(array.tobytes())
    return h.hexdigest()
