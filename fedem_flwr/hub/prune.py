"""Carry out retention (``hub.retention``, ``hub.retention.plan``) on the hub's local store.

Only a :class:`~fedem_flwr.hub.store.LocalStore` (``hub.store=local``) is pruned: on a Hugging Face
Hub store every version is a published tag that adapters and users name, and tags are never removed
(the report says so and removes nothing).

Order. The plan's rows are first marked ``pruned`` in one registry transaction; then each item's
store revision is removed (``LocalStore.remove``: unlisted, then its folder moved aside and
deleted), then its private optimizer state. A crash anywhere leaves at worst a row marked pruned
whose files are still there: ``fedem verify`` reports it as ``pruned-present`` (never as a loss),
``fedem verify --repair`` removes it, and so does the next prune (``finished``). The other order,
files first, would let a crash leave a row not pruned whose files are gone: exactly what a lost
artifact looks like, so ``fedem verify`` would cry ``missing`` and the hub would believe it holds
something it does not. Nothing the plan removes is needed, so marking it first takes nothing away
from a reader either.

One writer at a time: the running hub (``relay.keeper`` after each new base) or ``fedem prune``
under the hub's writer lock. ``dry_run`` only reads.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Union

from fedem_flwr.hub.optimizer_states import OptimizerStates
from fedem_flwr.hub.records import AdapterVersion, Checkpoint
from fedem_flwr.hub.registry import Registry
from fedem_flwr.hub.retention import (
    BaseRow,
    History,
    LeaseRow,
    Plan,
    RetentionSettings,
    Settings,
    VersionRow,
    plan,
)
from fedem_flwr.hub.store import LocalStore

BASE, ADAPTER_VERSION = "base", "adapter-version"
HUB_STORE = ("the hub's store is a Hugging Face Hub: its versions are published tags, which are never "
             "removed; nothing was pruned")


@dataclass(frozen=True)
class Item:
    """A base or adapter version in a report: where it is, its bytes here, and why it stays (if it does)."""

    kind: str  # BASE or ADAPTER_VERSION
    adapter: Optional[str]
    version: int
    repo: str
    revision: str
    bytes: int = 0
    reasons: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"base v{self.version}" if self.kind == BASE else f"{self.adapter} v{self.version}"

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "adapter": self.adapter, "version": self.version, "repo": self.repo,
                "revision": self.revision, "bytes": self.bytes, "reasons": list(self.reasons)}


@dataclass(frozen=True)
class PruneReport:
    """What a prune removed (or, with ``dry_run``, would remove), what it finished of an interrupted
    one, and what stays with its reasons (``hub.retention``'s names)."""

    dry_run: bool
    settings: Settings
    removed: list[Item] = field(default_factory=list)
    finished: list[Item] = field(default_factory=list)  # rows already pruned whose files were still here
    kept: list[Item] = field(default_factory=list)
    skipped: str = ""  # why nothing was considered (a Hugging Face Hub store)

    @property
    def bytes_freed(self) -> int:
        return sum(item.bytes for item in self.removed + self.finished)

    def kept_by_reason(self) -> dict[str, int]:
        """How many items each reason keeps (an item with two reasons counts under both)."""
        return dict(sorted(Counter(reason for item in self.kept for reason in item.reasons).items()))

    def summary(self) -> str:
        """One line: what went (or would go) and the bytes freed."""
        if self.skipped:
            return self.skipped
        gone = [item.name for item in self.removed]
        verb = "would remove" if self.dry_run else "removed"
        line = f"{verb} {len(gone)} ({', '.join(gone) or 'nothing'}), {human_bytes(self.bytes_freed)}"
        line += f"; kept {len(self.kept)} ({human_bytes(sum(item.bytes for item in self.kept))})"
        if self.finished:
            line += f"; finished {len(self.finished)} interrupted ({', '.join(i.name for i in self.finished)})"
        return line

    def as_dict(self) -> dict[str, Any]:
        return {"dry_run": self.dry_run, "skipped": self.skipped or None,
                "settings": {"bases": self.settings.bases, "adapter_versions": self.settings.adapter_versions,
                             "publish_first": self.settings.publish_first},
                "removed": [i.as_dict() for i in self.removed], "finished": [i.as_dict() for i in self.finished],
                "kept": [i.as_dict() for i in self.kept], "kept_by_reason": self.kept_by_reason(),
                "bytes_freed": self.bytes_freed}


def human_bytes(count: int) -> str:
    """``1536`` -> ``1.5 KiB``: what a log line or a table shows."""
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{count} B"  # not reached


def history_of(registry: Registry) -> History:
    """The registry's rows, active leases and publications, as retention's plain snapshot."""
    with registry.snapshot():
        return _history(registry, registry.checkpoints(), registry.adapter_versions())


def _history(registry: Registry, checkpoints: list[Checkpoint], versions: list[AdapterVersion]) -> History:
    """:func:`history_of` with the rows already read (the caller holds the snapshot)."""
    bases = tuple(BaseRow(c.version, c.repo, c.revision, c.pruned is not None) for c in checkpoints)
    rows = tuple(VersionRow(v.adapter, v.version, v.base_version, v.repo, v.revision, v.pruned is not None,
                            v.kind, v.parent_version) for v in versions)
    leases = tuple(LeaseRow(lease.adapter, lease.adapter_version, lease.base_version)
                   for lease in registry.leases(active_only=True))
    return History(bases, rows, leases, frozenset(registry.publications()))


def prune(registry: Registry, store: Any, hub_path: Path, retention: RetentionSettings, now: float,
          dry_run: bool = False) -> PruneReport:
    """Remove from the local store what ``retention`` lets go of (``hub.retention.plan``); mark each
    row pruned first (module docstring). ``store`` is the hub's artifact store; only a ``LocalStore``
    is pruned."""
    settings = Settings.of(retention)
    if not isinstance(store, LocalStore):
        return PruneReport(dry_run, settings, skipped=HUB_STORE)
    states = OptimizerStates(hub_path)
    with registry.snapshot():  # the rows are read once: the plan's snapshot and the items' rows
        base_rows, version_rows = registry.checkpoints(), registry.adapter_versions()
        decided = plan(_history(registry, base_rows, version_rows), settings)
    checkpoints = {c.version: c for c in base_rows}
    versions = {(v.adapter, v.version): v for v in version_rows}
    removed = [_item(checkpoints[n], store, states) for n in decided.bases]
    removed += [_item(versions[key], store, states) for key in decided.versions]
    listed: dict[str, set[str]] = {}  # each repo's refs.json read once
    finished = [item for item in (_item(row, store, states) for row in [*checkpoints.values(), *versions.values()]
                                  if row.pruned is not None) if item.bytes or _present(item, store, states, listed)]
    kept = _kept(decided, checkpoints, versions, store, states)
    report = PruneReport(dry_run, settings, removed, finished, kept)
    if dry_run:
        return report
    with registry.atomic():  # first: a crash from here on leaves pruned-present debris, never a loss
        for item in removed:
            if item.kind == BASE:
                registry.mark_checkpoint_pruned(item.version, now)
            else:
                registry.mark_version_pruned(item.adapter, item.version, now)
    for item in removed + finished:
        store.remove(item.repo, item.revision)
        if item.kind == ADAPTER_VERSION:
            states.remove(item.adapter, item.version)
    return report


def _item(row: Union[Checkpoint, AdapterVersion], store: LocalStore, states: OptimizerStates) -> Item:
    """A row as an item, with the bytes its files take here (its optimizer state included)."""
    if isinstance(row, Checkpoint):
        return Item(BASE, None, row.version, row.repo, row.revision, store.footprint(row.repo, row.revision) or 0)
    state = states.get(row.adapter, row.version)
    size = (store.footprint(row.repo, row.revision) or 0) + (state.stat().st_size if state is not None else 0)
    return Item(ADAPTER_VERSION, row.adapter, row.version, row.repo, row.revision, size)


def _present(item: Item, store: LocalStore, states: OptimizerStates, listed: dict[str, set[str]]) -> bool:
    """Whether anything of ``item`` is still here (an empty folder, a listing without a folder)."""
    if item.repo not in listed:
        listed[item.repo] = set(store.revisions(item.repo))
    if store.footprint(item.repo, item.revision) is not None or item.revision in listed[item.repo]:
        return True
    return item.kind == ADAPTER_VERSION and states.get(item.adapter, item.version) is not None


def _kept(decided: Plan, checkpoints: dict[int, Checkpoint], versions: dict[tuple[str, int], AdapterVersion],
          store: LocalStore, states: OptimizerStates) -> list[Item]:
    """What stays, with the bytes it holds here and why."""
    rows = [(checkpoints[n], reasons) for n, reasons in sorted(decided.kept_bases.items())]
    rows += [(versions[key], reasons) for key, reasons in sorted(decided.kept_versions.items())]
    return [replace(_item(row, store, states), reasons=reasons) for row, reasons in rows]
