"""What the hub's local store may let go of (``hub.retention``): a pure plan over plain snapshots.

A hub writes a base version per merge or CPT checkpoint and an adapter version per accepted push,
forever (DESIGN decision 12); retention keeps its local store bounded. Registry rows are never
removed (the lineage, losses and contributions stay); only an artifact's files go, and its row is
marked ``pruned``. What a running hub or a user may still read is never planned for removal:

- **the newest base**: the workbench judges on it, CPT trains it and every new lease carries it.
- **every base an adapter's latest version refers to** (``base_version``): the stored adapter's
  ``adapter_config.json`` names that base, so the adapter loads only on it.
- **every base an active lease refers to**: the node was sent it (or fetches it by digest from the
  store) and may ask for it until the lease ends.
- **each adapter's latest version**: the next lease starts from it and the next push is judged
  against it (``relay.coordinator._judge``); a merge reads it.
- **for each active lease, every version of its adapter from the one it started from up to the
  latest**: a push on a moved adapter lands as an update (``relay.coordinator._as_update``), which
  reads the start version, each lane's push since and its parent (``lane_update=mix``), and the
  start version's optimizer state.
- **the parent of a needed ``rebase`` version**: a rebase keeps no optimizer state of its own; its
  next lease continues from its parent's (``RelayCoordinator._lease_optimizer``).
- **with ``publish_first``, anything ``fedem publish`` has not pushed**: the local copy is then the
  only one.
- **anything already pruned is not planned again**: its files are gone; removing twice would count
  bytes twice and move its ``pruned`` time.

Beyond those, the newest ``bases`` base versions and the newest ``adapter_versions`` versions of
each adapter are kept (by version number; null keeps all), and the rest is planned for removal.
Version 0 of an adapter (its fresh start) is not special: once a later version exists nothing reads
it. The counts never lower what is needed, so a needed item may sit outside them.

Pure: no I/O, no torch; ``hub.prune`` reads the snapshots from the registry and carries a plan out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

# Why an item stays (a plan's ``kept_*``). The first six are needs; the last two are the settings.
NEWEST = "newest"  # the newest base
ADAPTER_BASE = "adapter-base"  # a base some adapter's latest version refers to
LEASED = "leased"  # a base or version an active lease may still read
LATEST = "latest"  # an adapter's latest version
REBASE_PARENT = "rebase-parent"  # the parent of a needed rebase version (its optimizer state)
UNPUBLISHED = "unpublished"  # not yet pushed by `fedem publish` (publish_first)
RECENT = "recent"  # among the newest `bases` / `adapter_versions`
KEEP_ALL = "keep-all"  # its count is null: everything of its kind is kept
NEEDS = (NEWEST, ADAPTER_BASE, LEASED, LATEST, REBASE_PARENT, UNPUBLISHED)

VersionKey = tuple[str, int]


class RetentionSettings(Protocol):
    """What ``hub.retention`` (``config.schema.RetentionConfig``) and :class:`Settings` both carry."""

    bases: Optional[int]
    adapter_versions: Optional[int]
    publish_first: bool


@dataclass(frozen=True)
class Settings:
    """How many of each kind the local store keeps (None: all), and whether publishing comes first."""

    bases: Optional[int] = None
    adapter_versions: Optional[int] = None
    publish_first: bool = False

    def __post_init__(self) -> None:
        for key in ("bases", "adapter_versions"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"retention `{key}` is {value!r}; it must be an integer >= 1 or None (keep all).")

    @classmethod
    def of(cls, settings: RetentionSettings) -> "Settings":
        return cls(settings.bases, settings.adapter_versions, bool(settings.publish_first))

    @property
    def keeps_all(self) -> bool:
        """Both counts null: nothing is ever removed."""
        return self.bases is None and self.adapter_versions is None


@dataclass(frozen=True)
class BaseRow:
    """A base checkpoint as retention sees it."""

    version: int
    repo: str = ""
    revision: str = ""
    pruned: bool = False


@dataclass(frozen=True)
class VersionRow:
    """An adapter version as retention sees it (``kind``/``parent_version``: for a rebase's parent)."""

    adapter: str
    version: int
    base_version: int
    repo: str = ""
    revision: str = ""
    pruned: bool = False
    kind: str = "push"
    parent_version: Optional[int] = None

    @property
    def key(self) -> VersionKey:
        return (self.adapter, self.version)


@dataclass(frozen=True)
class LeaseRow:
    """An active lease: the adapter version it started from, and the base it carries."""

    adapter: str
    adapter_version: int
    base_version: int


@dataclass(frozen=True)
class History:
    """Everything retention decides on: registry rows, active leases and what was published."""

    bases: tuple[BaseRow, ...] = ()
    versions: tuple[VersionRow, ...] = ()
    leases: tuple[LeaseRow, ...] = ()
    published: frozenset[tuple[str, str]] = frozenset()  # (repo, revision) pushed by `fedem publish`


@dataclass(frozen=True)
class Plan:
    """What to remove (oldest first), and why each present item that stays is kept."""

    bases: list[int] = field(default_factory=list)
    versions: list[VersionKey] = field(default_factory=list)
    kept_bases: dict[int, tuple[str, ...]] = field(default_factory=dict)
    kept_versions: dict[VersionKey, tuple[str, ...]] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.bases and not self.versions


@dataclass(frozen=True)
class Needs:
    """The items the rules call needed, each with its reasons (the settings' counts not included)."""

    bases: dict[int, tuple[str, ...]]
    versions: dict[VersionKey, tuple[str, ...]]


def _add(table: dict, key: object, reason: str) -> None:
    table.setdefault(key, [])
    if reason not in table[key]:
        table[key].append(reason)


def needs(history: History, settings: Settings) -> Needs:
    """What must stay, whatever the counts say (module docstring: one rule per reason)."""
    bases: dict[int, list[str]] = {}
    versions: dict[VersionKey, list[str]] = {}
    by_key = {v.key: v for v in history.versions}
    latest = _latest_versions(history.versions)
    if history.bases:
        _add(bases, max(b.version for b in history.bases), NEWEST)
    for row in latest.values():
        _add(versions, row.key, LATEST)
        _add(bases, row.base_version, ADAPTER_BASE)
    for lease in history.leases:
        _add(bases, lease.base_version, LEASED)
        top = latest[lease.adapter].version if lease.adapter in latest else lease.adapter_version
        for number in range(lease.adapter_version, top + 1):
            if (lease.adapter, number) in by_key:
                _add(versions, (lease.adapter, number), LEASED)
    for key in list(versions):
        row = by_key.get(key)
        if row is not None and row.kind == "rebase" and row.parent_version is not None:
            _add(versions, (row.adapter, row.parent_version), REBASE_PARENT)
    if settings.publish_first:
        for b in history.bases:
            if not b.pruned and (b.repo, b.revision) not in history.published:
                _add(bases, b.version, UNPUBLISHED)
        for v in history.versions:
            if not v.pruned and (v.repo, v.revision) not in history.published:
                _add(versions, v.key, UNPUBLISHED)
    return Needs({k: tuple(r) for k, r in bases.items()}, {k: tuple(r) for k, r in versions.items()})


def plan(history: History, settings: Settings) -> Plan:
    """What to remove from the local store now: every present item that is neither needed nor among
    the newest the settings keep. Items already pruned are neither removed nor listed as kept."""
    need = needs(history, settings)
    recent_bases = _newest((b.version for b in history.bases), settings.bases)
    remove_bases, kept_bases = _sort_out(sorted(history.bases, key=lambda row: row.version), lambda b: b.version,
                                         recent_bases, settings.bases, need.bases)
    remove_versions: list[VersionKey] = []
    kept_versions: dict[VersionKey, tuple[str, ...]] = {}
    by_adapter: dict[str, list[VersionRow]] = {}
    for v in history.versions:
        by_adapter.setdefault(v.adapter, []).append(v)
    for adapter in sorted(by_adapter):
        rows = sorted(by_adapter[adapter], key=lambda row: row.version)
        recent = _newest((v.version for v in rows), settings.adapter_versions)
        removed, kept = _sort_out(rows, lambda v: v.key, recent, settings.adapter_versions, need.versions)
        remove_versions += removed
        kept_versions.update(kept)
    return Plan(remove_bases, remove_versions, kept_bases, kept_versions)


def _count_reason(recent: bool, count: Optional[int]) -> tuple[str, ...]:
    if count is None:
        return (KEEP_ALL,)
    return (RECENT,) if recent else ()


def _sort_out(rows: Iterable[Any], key: Callable[[Any], Any], recent: set[int], count: Optional[int],
              needed: Mapping[Any, tuple[str, ...]]) -> tuple[list[Any], dict[Any, tuple[str, ...]]]:
    """``rows`` (in order) split into those to remove and those kept with their reasons; pruned ones skipped."""
    remove, kept = [], {}
    for row in rows:
        if row.pruned:
            continue
        reasons = needed.get(key(row), ()) + _count_reason(row.version in recent, count)
        if reasons:
            kept[key(row)] = reasons
        else:
            remove.append(key(row))
    return remove, kept


def _newest(numbers: Iterable[int], count: Optional[int]) -> set[int]:
    ordered = sorted(set(numbers), reverse=True)
    return set(ordered if count is None else ordered[:count])


def _latest_versions(rows: Iterable[VersionRow]) -> dict[str, VersionRow]:
    latest: dict[str, VersionRow] = {}
    for row in rows:
        if row.adapter not in latest or row.version > latest[row.adapter].version:
            latest[row.adapter] = row
    return latest
