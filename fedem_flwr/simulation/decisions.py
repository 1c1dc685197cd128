"""Were the gate's decisions right? Every concluded push judged afterwards on the study's test split.

``sim.score_decisions``: while a relay simulation runs, ``scoring_decisions`` wraps the coordinator's
``_finish`` (where a judged push is accepted or rejected, by the hub alone or with its peers) and
evaluates the judged candidate and its parent on the *test* split, for the push's own languages, on
the base it was judged on. Nothing in the run reads these numbers: the test split stays measurement
only. A decision is right when ``(test loss of candidate <= parent's) == accepted``; a wrong one is
``accepted_worse`` or ``rejected_better``. A push of several languages compares the mean of its
languages' losses. It costs two evaluations a push, hence the flag.

A language is ``thin`` when the hub's held-out tokens on it are below ``gate.hub_min_tokens`` (the
threshold under which peers decide, ``gate.peers``), so a study can tell the decisions the hub could
hardly judge from the others. ``decision_summary`` counts them per language; ``peer_waiting`` sums how
long pushes waited for their peers (the contributions' ``peers.waited_s``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedem_flwr.relay.bootstrap import Hub
from fedem_flwr.simulation.evaluation import evaluator_on
from fedem_flwr.simulation.record import mean_loss
from fedem_flwr.simulation.shadow import shadowing

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoredDecision:
    """One concluded push as the test split judges it afterwards."""

    adapter: str
    languages: tuple[str, ...]
    accepted: bool
    candidate: dict[str, float]
    parent: dict[str, float]
    role: str = ""  # the peers' role ("veto" or "decide"), "" when the hub decided alone

    @property
    def better(self) -> bool:
        """Whether the candidate is no worse than its parent on the test split."""
        return mean_loss(self.candidate) <= mean_loss(self.parent)

    @property
    def right(self) -> bool:
        return self.better == self.accepted

    def as_json(self) -> dict[str, Any]:
        return {"adapter": self.adapter, "languages": list(self.languages), "accepted": self.accepted,
                "candidate": self.candidate, "parent": self.parent, "role": self.role, "right": self.right}


def decision_summary(decisions: Sequence[ScoredDecision], hub_tokens: Mapping[str, float],
                     hub_min_tokens: int) -> dict[str, Any]:
    """``scored``, ``wrong``, ``accepted_worse`` and ``rejected_better`` over all decisions, then the same
    per language (``by_language``, with its ``hub_tokens`` and whether it is ``thin``) and over the thin
    languages and the others (``thin``, ``other``). A push of several languages counts in each."""

    def counts(rows: Sequence[ScoredDecision]) -> dict[str, int]:
        return {"scored": len(rows), "wrong": sum(not d.right for d in rows),
                "accepted_worse": sum(d.accepted and not d.better for d in rows),
                "rejected_better": sum(not d.accepted and d.better for d in rows)}

    languages = sorted({lang for d in decisions for lang in d.languages} | set(hub_tokens))
    thin = {lang: float(hub_tokens.get(lang, 0.0)) < hub_min_tokens for lang in languages}
    by_language = {}
    for lang in languages:
        rows = [d for d in decisions if lang in d.languages]
        by_language[lang] = {**counts(rows), "hub_tokens": float(hub_tokens.get(lang, 0.0)), "thin": thin[lang]}
    return {
        **counts(decisions), "hub_min_tokens": hub_min_tokens, "by_language": by_language,
        "thin": counts([d for d in decisions if any(thin.get(lang, False) for lang in d.languages)]),
        "other": counts([d for d in decisions if not any(thin.get(lang, False) for lang in d.languages)]),
    }


def score(hub: Hub, adapter: str, verdict: Any, accepted: bool, role: str = "") -> ScoredDecision | None:
    """``verdict`` (the coordinator's ``_HubVerdict``: ``state``, ``parent_state``, ``base``) on the test
    split for ``adapter``'s own languages, on the base it was judged on; None without test blocks for them."""
    terms = hub.coordinator.terms[adapter]
    evaluator = evaluator_on(hub, Path(hub.store.get(verdict.base.ref)), "test")
    wanted = [key for key in terms.heldout_keys if key in evaluator.heldout]
    if not wanted:
        return None
    candidate = evaluator.evaluate(verdict.state, languages=wanted)
    parent = evaluator.evaluate(verdict.parent_state, languages=wanted)  # read once by the coordinator
    return ScoredDecision(adapter, tuple(wanted), bool(accepted), {k: float(candidate[k]) for k in wanted},
                          {k: float(parent[k]) for k in wanted}, role)


@contextmanager
def scoring_decisions(hub: Hub, decisions: list[ScoredDecision]) -> Iterator[None]:
    """While the block runs, every push the coordinator concludes with a decision is scored into
    ``decisions`` (module doc); the coordinator's own ``_finish`` runs first and unchanged, and a push
    that cannot be scored is logged and left out: a measurement never changes the run."""

    def scored(finish: Callable[..., Any]) -> Callable[..., Any]:
        def scored_finish(lease: Any, received: Any, verdict: Any, accepted: bool, reason: str,
                          **conclude: Any) -> Any:
            outcome = finish(lease, received, verdict, accepted, reason, **conclude)
            role = str(((conclude.get("peers") or {}).get("peers") or {}).get("role", ""))
            try:
                found = score(hub, lease.adapter, verdict, accepted, role)
            except Exception:
                log.warning("A decision on %r could not be scored on the test split", lease.adapter, exc_info=True)
                return outcome
            if found is not None:
                decisions.append(found)
            return outcome

        return scored_finish

    with shadowing(hub.coordinator, "_finish", scored):
        yield


def peer_waiting(registry: Any) -> dict[str, Any]:
    """How long pushes waited for their peers: ``adapter_waiting_s`` (the sum of the contributions'
    ``peers.waited_s``) over ``pushes_waited`` of them."""
    waited = []
    for contribution in registry.contributions():
        peers = contribution.evaluation.get("peers")
        if isinstance(peers, Mapping) and isinstance(peers.get("waited_s"), (int, float)):
            waited.append(float(peers["waited_s"]))
    return {"adapter_waiting_s": sum(waited), "pushes_waited": len(waited)}


def contributor_time(training_s: float, peer_eval_s: float) -> dict[str, float]:
    """Contributor seconds spent training and judging peers, and judging's share of the two."""
    total = training_s + peer_eval_s
    return {"training_s": training_s, "peer_eval_s": peer_eval_s,
            "peer_eval_share": peer_eval_s / total if total > 0 else 0.0}
