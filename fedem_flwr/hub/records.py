"""Rows of the registry as plain frozen dataclasses (times are epoch seconds from the hub's clock)."""

from __future__ import annotations

import json
import math
import sqlite3
from dataclasses import dataclass, field
from typing import Any, Optional

from fedem_flwr.hub.store import ArtifactRef

CHECKPOINT_SOURCES = ("init", "merge", "cpt")
DECISIONS = ("accepted", "rejected")
# An adapter version is `fresh` (v0), an accepted `push`, or a `rebase`: an absorbed adapter restarting
# from a zero delta on a new base (no contribution row).
VERSION_KINDS = ("fresh", "push", "rebase")
# Base versions that were tried and not published: a merge or a CPT checkpoint refused by its gate.
ATTEMPT_SOURCES = ("merge", "cpt")


def revision_name(version: int) -> str:
    """The revision of a version: ``v{n}`` (a store folder, a Hub tag), DESIGN decision 12."""
    return f"v{int(version)}"


@dataclass(frozen=True)
class Checkpoint:
    """A published base model: version 0 is the seed, each next one is max+1.

    ``metrics`` keys (each optional): ``heldout`` {language: mean held-out loss of this base},
    ``cpt`` {``steps``, ``tokens``: optimizer steps and training tokens of the CPT run so far},
    ``merge`` {``method``, ``seed``}. The adapters a merge absorbed are :class:`Absorbed` rows.
    """

    version: int
    parent: Optional[int]
    created: float
    source: str
    repo: str
    revision: str
    digest: str
    metrics: dict[str, Any] = field(default_factory=dict)
    pruned: Optional[float] = None  # when retention removed its files from the local store (the row stays)

    @property
    def ref(self) -> ArtifactRef:
        """Where its files are stored, and what they must hash to."""
        return ArtifactRef(self.repo, self.revision, self.digest)


@dataclass(frozen=True)
class Adapter:
    """A named LoRA adapter of the relay pool, with the languages and task it trains for."""

    name: str
    languages: list[str]
    task: str
    lora_spec: dict[str, Any]
    created: float


@dataclass(frozen=True)
class AdapterVersion:
    """One stored state of an adapter: 0 is the fresh LoRA, each accepted contribution is max+1."""

    adapter: str
    version: int
    base_version: int
    parent_version: Optional[int]
    digest: str
    repo: str
    revision: str
    metrics: dict[str, Any]
    created: float
    kind: str = "push"
    pruned: Optional[float] = None  # when retention removed its files from the local store (the row stays)

    @property
    def ref(self) -> ArtifactRef:
        """Where its files are stored, and what they must hash to."""
        return ArtifactRef(self.repo, self.revision, self.digest)


@dataclass(frozen=True)
class Contribution:
    """A returned adapter and what the hub decided; it names its contributor only by pseudonym."""

    id: int
    pseudonym: str
    adapter: str
    lease_token: Optional[int]
    received: float
    digest: str
    validation: dict[str, Any]
    evaluation: dict[str, Any]
    decision: str
    reason: str
    adapter_version: Optional[int]
    base_version: Optional[int] = None  # the base the push was trained on (null before lineage records)
    judged_base_version: Optional[int] = None  # the base it was judged on


@dataclass(frozen=True)
class Evaluation:
    """Held-out loss per language of one adapter version on one base version."""

    adapter: str
    adapter_version: int
    base_version: int
    heldout: dict[str, float]
    created: float


@dataclass(frozen=True)
class Absorbed:
    """One adapter version a merge absorbed into base ``base_version``, with its weight and method."""

    adapter: str
    adapter_version: int
    weight: float = 1.0
    method: str = "sum"
    seed: Optional[int] = None


@dataclass(frozen=True)
class BaseAttempt:
    """A merge or CPT checkpoint that was tried on base ``parent`` and not published, and why."""

    id: int
    created: float
    source: str
    parent: Optional[int]
    reason: str
    details: dict[str, Any]


# What came of asking a peer to judge a push: its report was ``counted``, it ``failed: <why>`` (an error,
# a report that failed its checks), came ``late``, never came (``unanswered``), or was ``ignored: <why>``.
PEER_OUTCOMES = ("counted", "failed", "late", "unanswered", "ignored")
_PEER_OUTCOMES_WITH_WHY = ("failed", "ignored")


@dataclass(frozen=True)
class PeerReport:
    """One peer asked to judge a push (named by its lease token) blind on its own held-out rows.

    Both sides appear only by pseudonym. ``report`` (when the peer answered) holds
    ``{"tokens": {lang: n}, "candidate": {lang: loss}, "parent": {lang: loss}, "delta": x, "weight": w}``:
    ``delta`` is candidate minus parent loss (negative: the push helped), ``weight`` the peer's standing.
    """

    lease_token: int
    peer: str
    pusher: str
    asked: float
    answered: Optional[float]
    outcome: str
    report: Optional[dict[str, Any]] = None


@dataclass(frozen=True)
class PeerStanding:
    """How often a peer's checked reports agreed with the decision taken, and when that last changed."""

    peer: str
    agreed: int
    disagreed: int
    updated: float

    @property
    def weight(self) -> float:
        """``(agreed + 1) / (agreed + disagreed + 1)``: the share of its checked reports that agreed, one
        agreement assumed, so a new peer weighs 1 and no disagreement silences a peer outright."""
        return (self.agreed + 1) / (self.agreed + self.disagreed + 1)


def peer_outcome(outcome: Any) -> str:
    """``outcome`` if it is one of :data:`PEER_OUTCOMES` (``failed``/``ignored`` with ``: <why>``), else refused."""
    kind, _, why = outcome.partition(":") if isinstance(outcome, str) else ("", "", "")
    if kind not in PEER_OUTCOMES or (kind in _PEER_OUTCOMES_WITH_WHY) != bool(why.strip()):
        raise ValueError(f"`outcome` is {outcome!r}; allowed: counted, late, unanswered, 'failed: <why>', "
                         "'ignored: <why>'.")
    return outcome


def nulled(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, inf) inside dicts and lists replaced by None: a peer's
    loss that diverged is stored as null, as a contribution's is, never as NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: nulled(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [nulled(v) for v in value]
    return value


def dumps(name: str, value: Any) -> str:
    """Sorted JSON for a column; non-finite floats are refused (SQLite's ``json_valid`` does too).

    It stays strict so the registry never holds a NaN: whatever arrives from a node is made finite
    where it enters the hub (the relay coordinator drops non-finite metrics and stores a non-finite
    loss as null, naming each in the contribution).
    """
    try:
        return json.dumps({} if value is None else value, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"`{name}` cannot be stored as JSON ({err}): {value!r}") from err


def finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"`{name}` is {value!r}; it must be a finite number of epoch seconds.")
    return float(value)


def checkpoint_from(row: sqlite3.Row) -> Checkpoint:
    return Checkpoint(row["version"], row["parent"], row["created"], row["source"], row["repo"],
                      row["revision"], row["digest"], json.loads(row["metrics"]), _pruned(row))


def adapter_from(row: sqlite3.Row) -> Adapter:
    return Adapter(row["name"], json.loads(row["languages"]), row["task"], json.loads(row["lora_spec"]),
                   row["created"])


def adapter_version_from(row: sqlite3.Row) -> AdapterVersion:
    return AdapterVersion(row["adapter"], row["version"], row["base_version"], row["parent_version"],
                          row["digest"], row["repo"], row["revision"], json.loads(row["metrics"]),
                          row["created"], row["kind"], _pruned(row))


def _pruned(row: sqlite3.Row) -> Optional[float]:
    return row["pruned"] if "pruned" in row.keys() else None  # a row read before migration 5


def contribution_from(row: sqlite3.Row) -> Contribution:
    return Contribution(row["id"], row["pseudonym"], row["adapter"], row["lease_token"], row["received"],
                        row["digest"], json.loads(row["validation"]), json.loads(row["evaluation"]),
                        row["decision"], row["reason"], row["adapter_version"], row["base_version"],
                        row["judged_base_version"])


def evaluation_from(row: sqlite3.Row) -> Evaluation:
    return Evaluation(row["adapter"], row["adapter_version"], row["base_version"], json.loads(row["heldout"]),
                      row["created"])


def absorbed_from(row: sqlite3.Row) -> Absorbed:
    return Absorbed(row["adapter"], row["adapter_version"], row["weight"], row["method"], row["seed"])


def base_attempt_from(row: sqlite3.Row) -> BaseAttempt:
    return BaseAttempt(row["id"], row["created"], row["source"], row["parent"], row["reason"],
                       json.loads(row["details"]))


def peer_report_from(row: sqlite3.Row) -> PeerReport:
    return PeerReport(row["lease_token"], row["peer"], row["pusher"], row["asked"], row["answered"], row["outcome"],
                      None if row["report"] is None else json.loads(row["report"]))


def peer_standing_from(row: sqlite3.Row) -> PeerStanding:
    return PeerStanding(row["peer"], row["agreed"], row["disagreed"], row["updated"])


@dataclass(frozen=True)
class Lease:
    """One adapter handed to one node until ``deadline`` (epoch seconds from the injected clock), on
    one of the adapter's ``relay.lanes`` lanes (0 with one lane: the FedEm rule)."""

    token: int
    adapter: str
    holder: str
    base_version: int
    adapter_version: int
    issued: float
    deadline: float
    state: str = "active"
    ended: Optional[float] = None
    outcome: Optional[str] = None
    lane: int = 0

    @property
    def active(self) -> bool:
        return self.state == "active"

    def remaining(self, now: float) -> float:
        """Seconds left before the deadline (0 once due or ended); a train message's ``ttl``."""
        return max(0.0, self.deadline - now) if self.active else 0.0

    def is_due(self, now: float) -> bool:
        """An active lease expires exactly at its deadline: ``now >= deadline``."""
        return self.active and now >= self.deadline
