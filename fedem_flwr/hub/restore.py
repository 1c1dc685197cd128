"""Rebuild a hub folder from a snapshot and its store (``fedem restore``), then reconcile the two.

Nothing is written before the checks pass, and a refusal leaves the target as it was:

1. The target must be absent or an empty folder (never a hub: a registry, a secret, anything).
2. The snapshot is verified (``backup.open_snapshot``: key check, HMAC, every member, the secret).
3. The store: a local hub's comes from a copy of its old ``store/`` (``store=``), refused when a revision
   the snapshot's registry records holds other content there (another hub's store, or an altered one);
   a hub whose recorded ``store`` setting is ``hf`` reads the Hugging Face Hub it names.
4. Everything is written into a staging folder beside the target (registry, secret 0600, ``cpt/``,
   ``optimizer/``, a waiting merge request; the store hard-linked, or copied), reconciled there, and
   renamed into place.

Reconcile. Every revision in the store that the registry lacks was written after the snapshot (or is an
orphan of a crash). Its own card (``hub.model_card``: the ``fedem`` block, the held-out losses, the
``fedem_record``) rebuilds its row: checkpoints and adapter versions in lineage order, each only once its
parent, its base and what a merge absorbed are registered and its number is the next one; a push's
contribution too when its contributor is known here (the lease row is not rebuilt: its token is kept
in the contribution's ``validation["restored"]``). Anything else stays an orphan, which ``fedem verify``
reports and which never blocks its adapter. Rows rebuilt from cards lack what cards do not hold (a
push's train metrics, the full merge record); their ``metrics["restored"]`` says where they came from.

Counters. The floors (``Registry.raise_floor``) move the next checkpoint version, each adapter's next
version, the next lease token and the next contribution id past every number the registry, the store
(orphans included) and their cards hold, so no published or leased number is used again. Leases and
rejected contributions after the snapshot leave no artifact: lease tokens and contribution ids also skip
``skip`` numbers (default 1000) past the highest found.
"""

from __future__ import annotations

import calendar
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from huggingface_hub import metadata_load

from fedem_flwr.errors import FedemError, HubError, one_line
from fedem_flwr.hub.backup import Snapshot, open_snapshot
from fedem_flwr.hub.manifest import digest
from fedem_flwr.hub.model_card import CARD_FILE
from fedem_flwr.hub.paths import STORE_DIR, registry_path, store_path
from fedem_flwr.hub.records import CHECKPOINT_SOURCES, VERSION_KINDS
from fedem_flwr.hub.registry import (
    CHECKPOINT_COUNTER,
    CONTRIBUTION_COUNTER,
    LEASE_COUNTER,
    Registry,
    adapter_counter,
)
from fedem_flwr.hub.store import REFS_FILE, TMP_DIR, ArtifactStore, LocalStore, version_of
from fedem_flwr.hub.stores import open_store
from fedem_flwr.hub.terms import LANGUAGE_TASK

DEFAULT_SKIP = 1000
PathLike = Union[str, os.PathLike]


@dataclass
class RestoreReport:
    """What a restore did: JSON-ready (``fedem restore --json``)."""

    hub: str
    snapshot: str
    hub_id: str
    snapshot_created: str
    restored: list[str] = field(default_factory=list)
    store: dict[str, Any] = field(default_factory=dict)
    reregistered: list[dict[str, Any]] = field(default_factory=list)
    contributions: list[dict[str, Any]] = field(default_factory=list)
    orphans: list[dict[str, Any]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    floors: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Leftover:
    """A revision the restored registry lacks, with what its card says (``meta``: the card's metadata)."""

    repo: str
    revision: str
    digest: str
    created: float
    meta: dict[str, Any]
    problem: str = ""  # why it cannot be re-registered, when known before trying

    @property
    def where(self) -> str:
        return f"{self.repo}@{self.revision}"

    @property
    def lineage(self) -> dict[str, Any]:
        block = self.meta.get("fedem")
        return block if isinstance(block, dict) else {}

    @property
    def record(self) -> dict[str, Any]:
        block = self.meta.get("fedem_record")
        return block if isinstance(block, dict) else {}


# -- the command --------------------------------------------------------------------------------
def restore_hub(snapshot: PathLike, target: PathLike, passphrase: bytes, store: Optional[PathLike] = None, *,
                skip: int = DEFAULT_SKIP, link: bool = True, now: Optional[float] = None) -> RestoreReport:
    """Rebuild a hub in ``target`` from ``snapshot`` and a copy of its store (module docstring)."""
    target = Path(target).absolute()
    if skip < 0:
        raise HubError(f"`skip` is {skip}; it must be 0 or more.")
    check_target(target)
    snap = open_snapshot(snapshot, passphrase)
    now = time.time() if now is None else now
    stage = target.parent / f".{target.name}.restore-{uuid.uuid4().hex[:8]}"
    stage.mkdir(mode=0o700, parents=True)
    try:
        report = _restore_into(stage, snap, store, skip, link, now)
        report.hub = str(target)
        _move_into_place(stage, target)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return report


def check_target(target: Path) -> None:
    """Refuse a target that exists and is not an empty folder (naming what it holds)."""
    if not target.exists():
        return
    if not target.is_dir():
        raise HubError(f"cannot restore into {str(target)!r}: it is a file; name a new or empty folder.")
    held = sorted(p.name for p in target.iterdir())
    if held:
        what = "a hub" if {"registry.sqlite", "secret"} & set(held) else "files"
        raise HubError(f"cannot restore into {str(target)!r}: it holds {what} ({', '.join(held[:5])}"
                       f"{', ...' if len(held) > 5 else ''}); a restore writes only into a new or empty folder, "
                       "and overwrites nothing.")


def _move_into_place(stage: Path, target: Path) -> None:
    check_target(target)  # again: something may have appeared while restoring
    if target.exists():
        target.rmdir()
    os.rename(stage, target)


def _restore_into(stage: Path, snap: Snapshot, store: Optional[PathLike], skip: int, link: bool,
                  now: float) -> RestoreReport:
    manifest = snap.manifest
    report = RestoreReport(str(stage), str(snap.path), snap.hub_id, str(manifest.get("created")))
    report.restored = snap.extract(stage)
    with Registry.open(registry_path(stage)) as registry:  # a writer: migrates an older schema
        setting = registry.setting("store") or {"kind": "local"}
        found = _open_artifacts(stage, registry, setting, store, link, report)
        known = _known(registry)
        leftovers = [_leftover(found.store, repo, rev, found.created.get((repo, rev), now))
                     for repo, rev in found.usable if (repo, rev) not in known]
        reconcile(registry, leftovers, report, now)
        report.floors = raise_floors(registry, [*found.usable, *found.damaged], leftovers, skip, now)
    return report


# -- the store ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Found:
    """The restored hub's store and what it holds: revisions to reconcile (``usable``), unrecorded or
    damaged ones (counted for the floors only), and when each was stored (where known)."""

    store: ArtifactStore
    usable: list[tuple[str, str]]
    damaged: list[tuple[str, str]]
    created: dict[tuple[str, str], float]


def _open_artifacts(stage: Path, registry: Registry, setting: dict[str, Any], source: Optional[PathLike],
                    link: bool, report: RestoreReport) -> Found:
    kind = setting.get("kind", "local")
    if kind == "hf":
        if source is not None:
            raise HubError(f"the hub's store is the Hugging Face Hub ({setting.get('endpoint') or 'default'} endpoint, "
                           f"prefix {setting.get('repo_prefix')!r}); --store is for a hub whose store is local.")
        hf = open_store(stage, "hf", repo_prefix=setting.get("repo_prefix"), endpoint=setting.get("endpoint"),
                        private=bool(setting.get("private", False)))
        present = hf_revisions(hf, setting.get("repo_prefix") or "")
        report.store = {"kind": "hf", "endpoint": getattr(hf, "endpoint", None), "revisions": len(present)}
        tags = set(present)
        report.missing = sorted(f"{r}@{v}" for r, v, _ in _expected(registry) if (r, v) not in tags)
        return Found(hf, present, [], {})
    if source is None:
        raise HubError("the hub's store is a local folder: pass --store PATH, a copy of the old hub's `store/` "
                       "folder (its artifacts are not in the snapshot).")
    source = Path(source).absolute()
    missing, damaged = check_store(source, registry)
    copied = copy_store(source, store_path(stage), link)
    local = LocalStore(store_path(stage))
    bad = {(repo, rev) for repo, rev, _ in damaged}
    usable = [(repo, rev) for repo in local.repos() for rev in local.revisions(repo) if (repo, rev) not in bad]
    report.store = {"kind": "local", "source": str(source), "revisions": len(usable), "files": copied,
                    "linked": link}
    report.missing = missing
    report.orphans += [{"revision": f"{repo}@{rev}", "reason": why} for repo, rev, why in damaged]
    return Found(local, usable, sorted(bad), stored_times(store_path(stage)))


def check_store(source: Path, registry: Registry) -> tuple[list[str], list[tuple[str, str, str]]]:
    """Refuse a store copy whose revisions contradict the registry's rows (another hub's store, or one
    altered since); return the registry's revisions it lacks and its unrecorded or damaged revisions."""
    if not source.is_dir():
        raise HubError(f"--store {str(source)!r} is not a folder; pass a copy of the old hub's `{STORE_DIR}/` folder.")
    expected = _expected(registry)
    rows = {(repo, rev) for repo, rev, _ in expected}
    problems = LocalStore(source).verify_all(set(expected))
    conflicts = [p for p in problems if p.kind == "registry-mismatch"
                 or (p.kind == "mismatch" and (p.repo, p.revision) in rows)]
    if conflicts:
        shown = "; ".join(f"{p.repo}@{p.revision}: {p.detail}" for p in conflicts[:3])
        raise HubError(f"the store {str(source)!r} does not hold this hub's artifacts ({len(conflicts)} revision(s) "
                       f"differ from the snapshot's registry: {shown}); is it another hub's store? Nothing was "
                       "written.")
    missing = sorted(f"{p.repo}@{p.revision}" for p in problems if p.kind == "missing")
    if expected and len(missing) == len(expected):
        raise HubError(f"the store {str(source)!r} holds none of the {len(expected)} revision(s) the snapshot's "
                       "registry records; pass a copy of this hub's `store/` folder. Nothing was written.")
    damaged = [(p.repo, p.revision, f"{p.kind}: {p.detail}") for p in problems if p.kind in ("mismatch", "unrecorded")]
    return missing, damaged


def _expected(registry: Registry) -> list[tuple[str, str, str]]:
    """(repo, revision, digest) of every row whose files the store should hold (pruned ones are gone)."""
    rows = [*registry.checkpoints(), *registry.adapter_versions()]
    return [(row.repo, row.revision, row.digest) for row in rows if row.pruned is None]


def _known(registry: Registry) -> set[tuple[str, str]]:
    rows = [*registry.checkpoints(), *registry.adapter_versions()]
    return {(row.repo, row.revision) for row in rows}


def copy_store(source: Path, target: Path, link: bool = True) -> int:
    """Copy the store folder ``source`` to ``target`` (files hard-linked when ``link`` and the file system
    allows: the store never changes a file in place), without its ``.tmp`` debris; returns the file count."""
    count = 0
    for folder, dirs, files in os.walk(source):
        rel = Path(folder).relative_to(source)
        if rel == Path("."):
            dirs[:] = [d for d in dirs if d != TMP_DIR]
        (target / rel).mkdir(mode=0o700, parents=True, exist_ok=True)
        for name in files:
            src, dst = Path(folder) / name, target / rel / name
            try:
                if not link:
                    raise OSError("copy asked for")
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
            count += 1
    return count


def stored_times(root: Path) -> dict[tuple[str, str], float]:
    """When each revision of a local store was stored, from its repo's ``refs.json`` (``created``, UTC)."""
    out = {}
    for refs in Path(root).glob(f"*/*/{REFS_FILE}"):
        repo = f"{refs.parent.parent.name}/{refs.parent.name}"
        try:
            revisions = json.loads(refs.read_text(encoding="utf-8")).get("revisions", {})
            for rev, entry in revisions.items():
                out[(repo, rev)] = float(calendar.timegm(time.strptime(entry["created"], "%Y-%m-%dT%H:%M:%SZ")))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    return out


def hf_revisions(store: Any, repo_prefix: str) -> list[tuple[str, str]]:
    """(store repo, tag) of every tag under ``repo_prefix`` on a Hugging Face Hub store: Hub ids
    (``ORG/NAME-base``) map back to the store's repo names (``ORG/NAME/base``), as ``hf_repo_id`` maps them."""
    namespace, _, name = repo_prefix.partition("/")
    start = f"{repo_prefix}-" if name else f"{namespace}/"
    out = []
    for rid in store.repos():
        repo = f"{repo_prefix}/{rid[len(start):]}"
        out += [(repo, tag) for tag in store.revisions(repo)]
    return out


# -- reading leftovers --------------------------------------------------------------------------
def _leftover(store: ArtifactStore, repo: str, revision: str, created: float) -> Leftover:
    """A revision the registry lacks, with its digest and its card's metadata (or why they cannot be read)."""
    try:
        folder = Path(store.local_path(repo, revision))
        found = digest(folder)
        meta = metadata_load(folder / CARD_FILE) if (folder / CARD_FILE).is_file() else None
    except (FedemError, OSError, ValueError, yaml.YAMLError) as err:
        return Leftover(repo, revision, "", created, {}, f"unreadable: {one_line(err)}")
    if not isinstance(meta, dict) or not isinstance(meta.get("fedem"), dict):
        return Leftover(repo, revision, found, created, {}, "its model card has no `fedem` block to rebuild it from")
    item = Leftover(repo, revision, found, created, meta)
    malformed = _malformed(item)
    if malformed:
        item.problem = f"its card's `fedem` block is malformed ({malformed})"
    elif item.lineage.get("version") != version_of(revision):
        item.problem = f"its card says version {item.lineage.get('version')!r}, its revision is {revision}"
    return item


def _malformed(item: Leftover) -> str:
    """What in a card's blocks has a type no hub writes (a card is anyone's file), or "" when none does:
    what the rows are rebuilt from is then only ints, strings and mappings the registry takes."""
    block, record = item.lineage, item.record
    wrong = [key for key in ("version", "parent", "base_version", "parent_version")
             if block.get(key) is not None and _int(block[key]) is None]
    wrong += [key for key in ("kind", "adapter", "source", "version_kind", "task")
              if block.get(key) is not None and not isinstance(block[key], str)]
    wrong += [key for key in ("merge", "cpt") if block.get(key) is not None and not isinstance(block[key], dict)]
    absorbed = (block.get("merge") or {}).get("absorbed") if isinstance(block.get("merge"), dict) else None
    if absorbed is not None and not (isinstance(absorbed, list) and all(map(_absorbed_entry, absorbed))):
        wrong.append("merge.absorbed")
    if record.get("contributor") is not None and not isinstance(record["contributor"], str):
        wrong.append("fedem_record.contributor")
    if record.get("rebase") is not None and not isinstance(record["rebase"], dict):
        wrong.append("fedem_record.rebase")
    languages = item.meta.get("language")
    if languages is not None and not (isinstance(languages, list) and all(isinstance(x, str) for x in languages)):
        wrong.append("language")
    return ", ".join(f"`{key}`" for key in wrong)


def _absorbed_entry(entry: Any) -> bool:
    """One entry of a merge's ``absorbed``, as ``hub.model_card`` writes it."""
    return (isinstance(entry, dict) and isinstance(entry.get("adapter"), str) and _int(entry.get("version")) is not None
            and isinstance(entry.get("method"), str) and _number(entry.get("weight"))
            and (entry.get("seed") is None or _int(entry["seed"]) is not None))


def heldout_of(meta: dict[str, Any]) -> dict[str, float]:
    """The held-out losses a card lists (``model-index`` metrics ``heldout/<set>``)."""
    losses = {}
    for entry in _dicts(meta.get("model-index")):
        for result in _dicts(entry.get("results")):
            for metric in _dicts(result.get("metrics")):
                kind, value = str(metric.get("type", "")), metric.get("value")
                if kind.startswith("heldout/") and _number(value):
                    losses[kind.split("/", 1)[1]] = float(value)
    return losses


def _dicts(value: Any) -> list[dict[str, Any]]:
    """The mappings in a card's list (anything else in it, or a list that is not one, is left out)."""
    return [x for x in value if isinstance(x, dict)] if isinstance(value, list) else []


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# -- reconciling --------------------------------------------------------------------------------
def reconcile(registry: Registry, leftovers: list[Leftover], report: RestoreReport, now: float) -> None:
    """Re-register what the leftovers' cards describe, in lineage order; the rest become orphans."""
    pending = [item for item in leftovers if not item.problem]
    report.orphans += [{"revision": item.where, "reason": item.problem} for item in leftovers if item.problem]
    pending.sort(key=lambda i: (i.created, version_of(i.revision) or 0, i.repo))
    pushes = []
    while (item := next((i for i in pending if _blocker(registry, i) is None), None)) is not None:
        pending.remove(item)  # the first that can go, in time order: a lineage's order, whatever the clock says
        try:
            _register(registry, item)
        except (FedemError, ValueError, KeyError, TypeError) as err:
            report.orphans.append({"revision": item.where, "reason": f"not re-registered: {err}"})
            continue
        report.reregistered.append(_described(item))
        if item.lineage.get("version_kind") == "push":
            pushes.append(item)
    for item in pending:
        report.orphans.append({"revision": item.where, "reason": _blocker(registry, item)})
    report.contributions = _restore_contributions(registry, pushes, now)


def _blocker(registry: Registry, item: Leftover) -> Optional[str]:
    """Why ``item`` cannot be registered now (None: it can)."""
    try:
        return _waits_for(registry, item)
    except (AttributeError, TypeError, ValueError) as err:
        return f"its card's `fedem` block is malformed ({err})"


def _waits_for(registry: Registry, item: Leftover) -> Optional[str]:
    block, version = item.lineage, version_of(item.revision)
    if block.get("kind") == "base":
        if registry.next_checkpoint_version() != version:
            return f"base v{version} is not the next base version ({registry.next_checkpoint_version()})"
        parent = block.get("parent")
        if parent is not None and registry.checkpoint(parent) is None:
            return f"its parent base v{parent} is not registered"
        for entry in (block.get("merge") or {}).get("absorbed") or []:
            if registry.adapter_version(entry.get("adapter"), entry.get("version")) is None:
                return f"the version it absorbed ({entry.get('adapter')} v{entry.get('version')}) is not registered"
        return None
    if block.get("kind") != "adapter" or not block.get("adapter"):
        return f"its card's `fedem` block is of kind {block.get('kind')!r}"
    name = block["adapter"]
    if block.get("version_kind") not in VERSION_KINDS or block.get("base_version") is None:
        return "its card does not say its kind and base version"
    if registry.adapter(name) is None and version != 0:
        return f"adapter {name!r} is not registered"
    if registry.next_adapter_version(name) != version:
        return f"{name} v{version} is not its next version ({registry.next_adapter_version(name)})"
    if registry.checkpoint(block["base_version"]) is None:
        return f"its base v{block['base_version']} is not registered"
    parent = block.get("parent_version")
    if version and (parent is None or registry.adapter_version(name, parent) is None):
        return f"its parent version v{parent} is not registered"
    return None


def _register(registry: Registry, item: Leftover) -> None:
    block, heldout = item.lineage, heldout_of(item.meta)
    restored = f"from the model card of {item.where} (written after the snapshot)"
    if block["kind"] == "base":
        source = block.get("source")
        if source not in CHECKPOINT_SOURCES:
            raise ValueError(f"its card's source is {source!r}")
        merge = block.get("merge") or {}
        metrics: dict[str, Any] = {"heldout": heldout, "restored": restored}
        if source == "merge":
            metrics["merge"] = {"method": merge.get("method"), "seed": merge.get("seed")}
        if source == "cpt":
            metrics["cpt"] = dict(block.get("cpt") or {})
        absorbed = [(a["adapter"], int(a["version"]), float(a["weight"]), a["method"], a.get("seed"))
                    for a in merge.get("absorbed") or []]
        registry.add_checkpoint(block.get("parent"), source, item.repo, item.revision, item.digest, metrics,
                                item.created, version=version_of(item.revision), absorbed=absorbed)
        return
    name = block["adapter"]
    metrics = {"heldout": heldout, "restored": restored}
    if block["version_kind"] == "rebase" and isinstance(item.record.get("rebase"), dict):
        metrics["rebase"] = dict(item.record["rebase"])
    with registry.atomic():
        if registry.adapter(name) is None:
            languages = [str(x) for x in item.meta.get("language") or []]
            registry.add_adapter(name, languages, str(block.get("task") or LANGUAGE_TASK), _lora_spec(registry),
                                 item.created)
        registry.add_adapter_version(name, block["base_version"], block.get("parent_version"), item.repo,
                                     item.revision, item.digest, metrics, item.created,
                                     version=version_of(item.revision), kind=block["version_kind"])


def _lora_spec(registry: Registry) -> dict[str, Any]:
    """The LoRA spec of an adapter first seen in a card: the other adapters' (every adapter gets the hub's)."""
    for adapter in registry.adapters():
        if adapter.lora_spec:
            return dict(adapter.lora_spec)
    return dict(registry.setting("lora") or {})


def _described(item: Leftover) -> dict[str, Any]:
    block = item.lineage
    if block.get("kind") == "base":
        return {"revision": item.where, "kind": "base", "version": block.get("version"), "source": block.get("source")}
    return {"revision": item.where, "kind": "adapter", "adapter": block.get("adapter"), "version": block.get("version"),
            "version_kind": block.get("version_kind")}


def _restore_contributions(registry: Registry, pushes: list[Leftover], now: float) -> list[dict[str, Any]]:
    """The accepted contributions of re-registered pushes whose contributor the registry knows, in the
    order of their ids (each keeps its id when it is still free); the lease token goes in ``validation``."""
    known = set(registry.identities())
    out = []
    for item in sorted(pushes, key=lambda i: _int(i.record.get("contribution")) or 0):
        record, block = item.record, item.lineage
        pseudonym, wanted = record.get("contributor"), _int(record.get("contribution"))
        entry: dict[str, Any] = {"revision": item.where, "contributor": pseudonym, "id": None,
                                 "lease": _int(record.get("lease"))}
        if pseudonym not in known:
            entry["skipped"] = ("no contributor in its card" if not pseudonym else
                                f"contributor {pseudonym} was first seen after the snapshot")
            out.append(entry)
            continue
        if wanted is not None:
            registry.raise_floor(CONTRIBUTION_COUNTER, wanted, now)
        entry["id"] = registry.add_contribution(
            pseudonym, block["adapter"], None, item.created, "-",
            {"ok": True, "restored": {"from": item.where, "lease": entry["lease"]}},
            {"heldout": heldout_of(item.meta)}, "accepted", f"restored from the model card of {item.where}",
            adapter_version=block["version"], judged_base_version=block["base_version"])
        out.append(entry)
    return out


def _int(value: Any) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# -- counters -----------------------------------------------------------------------------------
def raise_floors(registry: Registry, present: Iterable[tuple[str, str]], leftovers: Iterable[Leftover], skip: int,
                 now: float) -> dict[str, int]:
    """Raise every counter's floor past each number the registry, the store and the leftovers' cards hold
    (lease tokens and contribution ids also ``skip`` numbers past it); return the floors."""
    counters = _repo_counters(registry, leftovers)
    top: dict[str, int] = {CHECKPOINT_COUNTER: _top(c.version for c in registry.checkpoints())}
    for v in registry.adapter_versions():
        top[adapter_counter(v.adapter)] = max(top.get(adapter_counter(v.adapter), -1), v.version)
    for repo, rev in present:
        counter, number = counters.get(repo) or _counter_by_name(repo), version_of(rev)
        if counter is not None and number is not None:
            top[counter] = max(top.get(counter, -1), number)
    leases = _top(lease.token for lease in registry.leases())
    contributions = _top(c.id for c in registry.contributions())
    for item in leftovers:
        number, counter = _int(item.lineage.get("version")), counters.get(item.repo)
        if counter is not None and number is not None:
            top[counter] = max(top.get(counter, -1), number)
        leases = max(leases, _int(item.record.get("lease")) or -1)
        contributions = max(contributions, _int(item.record.get("contribution")) or -1)
    for counter, number in top.items():
        if number >= 0:
            registry.raise_floor(counter, number + 1, now)
    registry.raise_floor(LEASE_COUNTER, max(leases, 0) + 1 + skip, now)
    registry.raise_floor(CONTRIBUTION_COUNTER, max(contributions, 0) + 1 + skip, now)
    return registry.floors()


def _top(numbers: Iterable[int]) -> int:
    return max(numbers, default=-1)


def _repo_counters(registry: Registry, leftovers: Iterable[Leftover]) -> dict[str, str]:
    """repo -> the counter its revision numbers belong to: the registry's rows, else what the cards say."""
    out = {c.repo: CHECKPOINT_COUNTER for c in registry.checkpoints()}
    out.update({v.repo: adapter_counter(v.adapter) for v in registry.adapter_versions()})
    for item in leftovers:
        block = item.lineage
        if item.repo not in out and block.get("kind") == "base":
            out[item.repo] = CHECKPOINT_COUNTER
        elif item.repo not in out and block.get("kind") == "adapter" and block.get("adapter"):
            out[item.repo] = adapter_counter(str(block["adapter"]))
    return out


def _counter_by_name(repo: str) -> Optional[str]:
    """The counter of a repo nothing else names, by the store's naming (``.../base``, ``.../adapter-<name>``)."""
    name = repo.rsplit("/", 1)[-1]
    if name == "base":
        return CHECKPOINT_COUNTER
    return adapter_counter(name[len("adapter-"):]) if name.startswith("adapter-") and len(name) > 8 else None
