"""What each ``fedem`` command shows, as plain JSON-ready data (rendering lives in ``render``).

Holders and contributors appear as pseudonyms unless ``reveal`` is set, so joining the outputs of
several commands gives no identity away. Times are ISO 8601 UTC strings. The artifact store is
reached only through :class:`StoreView`.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, Optional

from fedem_flwr.errors import FedemError
from fedem_flwr.hub.merge_request import pending_merge_request
from fedem_flwr.hub.optimizer_states import KeptVersion, OptimizerStates
from fedem_flwr.hub.optimizer_states import verify as verify_optimizer_states
from fedem_flwr.hub.paths import read_lock_holder, registry_path
from fedem_flwr.hub.records import Absorbed, AdapterVersion, Checkpoint, Contribution, Lease
from fedem_flwr.hub.registry import Registry
from fedem_flwr.hub.stores import open_store
from fedem_flwr.hub.terms import adapter_terms_of

RECENT = 5
UNKNOWN = "unknown"  # a threshold the hub has not recorded (its `merge` / `cpt` setting is absent)
PRUNED_PRESENT = "pruned-present"  # a row marked pruned whose files are still here (a prune cut short)


def iso(t: Optional[float]) -> Optional[str]:
    """Epoch seconds -> ``2024-01-31T12:00:00+00:00`` (None stays None)."""
    if t is None:
        return None
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="seconds")


class StoreView:
    """The CLI's one door to the artifact store: folder paths, verification and repair.

    ``setting`` is the hub's recorded `store` setting (kind, repo_prefix, endpoint): a hub whose
    store is a Hugging Face Hub is read there, with its download cache under the hub folder, and
    the access token from ``HF_TOKEN`` or the saved login. Without one, the local folder.

    ``published`` maps (repo, revision) to where ``fedem publish`` pushed it (``Registry.publications``);
    when not given it is read from the hub's registry on first use.
    """

    def __init__(self, hub: Path, setting: Optional[dict[str, Any]] = None,
                 published: Optional[dict[tuple[str, str], dict[str, Any]]] = None) -> None:
        self.hub = Path(hub)
        self.setting = dict(setting or {"kind": "local"})
        self._store: Any = None
        self._published = published

    @property
    def local(self) -> bool:
        """A local folder store: the one retention prunes, so the one where ``pruned`` means gone."""
        return self.setting.get("kind", "local") == "local"

    @property
    def published(self) -> dict[tuple[str, str], dict[str, Any]]:
        if self._published is None:
            path = registry_path(self.hub)
            if path.is_file():
                with Registry.open(path, readonly=True) as registry:
                    self._published = registry.publications()
            else:
                self._published = {}
        return self._published

    def where(self, repo: str, revision: str, pruned: Optional[float]) -> list[str]:
        """Where an artifact is: ``local`` (or ``pruned``: retention removed it here) or, on a Hugging
        Face Hub store, ``hf:<endpoint>@vN``; then each ``hf:<endpoint>@vN`` that ``fedem publish`` pushed."""
        if self.local:
            places = ["pruned" if pruned is not None else "local"]
        else:
            places = [f"hf:{getattr(self.store, 'endpoint', None) or self.setting.get('endpoint')}@{revision}"]
        publication = self.published.get((repo, revision))
        if publication is not None and f"{publication['target']}@{revision}" not in places:
            places.append(f"{publication['target']}@{revision}")
        return places

    @property
    def store(self) -> Any:
        if self._store is None:
            kind = self.setting.get("kind", "local")
            options = {}
            if kind != "local":
                from huggingface_hub.utils import disable_progress_bars

                disable_progress_bars()  # downloads of a listing are not news on the terminal
                options = {"repo_prefix": self.setting.get("repo_prefix"), "endpoint": self.setting.get("endpoint")}
            self._store = open_store(self.hub, kind, **options)
        return self._store

    def path(self, repo: str, revision: str) -> Optional[str]:
        """The folder transformers/PEFT load, or None when the store lacks it (``fedem verify`` says why)."""
        try:
            return str(self.store.local_path(repo, revision))
        except FedemError:
            return None

    def verify(self, known: set[tuple[str, str, str]],
               pruned: frozenset[tuple[str, str]] = frozenset()) -> list[dict[str, str]]:
        """The store's problems against the registry's rows present (``known``); revisions of rows marked
        ``pruned`` that are still here are one ``pruned-present`` each, not orphans."""
        return _relabel(self.store.verify_all(known), pruned)

    def repair(self, known: set[tuple[str, str, str]],
               pruned: frozenset[tuple[str, str]] = frozenset()) -> list[dict[str, str]]:
        """Remove what the registry (``known``) does not list: orphans, crash debris, and what is left of
        revisions marked ``pruned`` (a prune cut short; a listing without a folder is unlisted)."""
        problems = self.store.verify_all(known)
        removed = self.store.repair(problems)
        for p in problems:
            if p.kind == "missing" and (p.repo, p.revision) in pruned:
                self.store.remove(p.repo, p.revision)
                removed.append(p)
        return _relabel(removed, pruned)


def _problem(p: Any) -> dict[str, str]:
    return {"kind": p.kind, "repo": p.repo, "revision": p.revision, "detail": p.detail}


def _relabel(problems: list[Any], pruned: frozenset[tuple[str, str]]) -> list[dict[str, str]]:
    """Problems as dicts; all those of one pruned revision become a single ``pruned-present``."""
    out, seen = [], set()
    for p in problems:
        key = (p.repo, p.revision)
        if key not in pruned:
            out.append(_problem(p))
        elif key not in seen:
            seen.add(key)
            out.append({"kind": PRUNED_PRESENT, "repo": p.repo, "revision": p.revision,
                        "detail": f"marked pruned, but the store still holds it ({p.kind}: {p.detail}); a prune "
                                  "was cut short: `fedem verify --repair` or the next prune removes it"})
    return out


class Names:
    """Shows an identity as its pseudonym, or as itself with ``reveal``."""

    def __init__(self, registry: Registry, reveal: bool) -> None:
        self.registry = registry
        self.reveal = reveal
        self._identities = registry.identities() if reveal else {}

    def holder(self, identity: Optional[str]) -> Optional[str]:
        if identity is None or self.reveal:
            return identity
        return self.registry.pseudonym(identity)

    def contributor(self, pseudonym: str) -> str:
        return self._identities.get(pseudonym, pseudonym) if self.reveal else pseudonym


def checkpoint_view(c: Checkpoint, store: StoreView, absorbed: list[dict[str, Any]] = ()) -> dict[str, Any]:
    """One base version: its lineage (parent, source, what a merge absorbed), metrics, folder and where
    its artifact is (``StoreView.where``; ``pruned``: when retention removed it here)."""
    return {"version": c.version, "parent": c.parent, "source": c.source, "path": _path(c, store),
            "repo": c.repo, "revision": c.revision, "digest": c.digest, "created": iso(c.created),
            "metrics": c.metrics, "absorbed": list(absorbed), "where": _where(c, store), "pruned": iso(c.pruned)}


def _path(row: Any, store: StoreView) -> Optional[str]:
    """The folder of a row's artifact; None once pruned from a local store (its leftovers are debris)."""
    return None if row.pruned is not None and getattr(store, "local", True) else store.path(row.repo, row.revision)


def _where(row: Any, store: StoreView) -> Optional[list[str]]:
    """``StoreView.where`` of a row; None from a view that names no place (the public site's ``NoPaths``)."""
    where = getattr(store, "where", None)
    return None if where is None else where(row.repo, row.revision, row.pruned)


def absorbed_view(registry: Registry, a: Absorbed, names: Names) -> dict[str, Any]:
    return {"adapter": a.adapter, "adapter_version": a.adapter_version, "weight": a.weight, "method": a.method,
            "seed": a.seed, "contributors": [names.contributor(p) for p in registry.contributors_of(a.adapter,
                                                                                                   a.adapter_version)]}


def checkpoints_view(registry: Registry, store: StoreView, names: Names) -> list[dict[str, Any]]:
    """``fedem checkpoints --json``: the lineage of base versions, oldest first."""
    with registry.snapshot():
        absorbed = registry.absorbed_by_base()
        return [checkpoint_view(c, store, [absorbed_view(registry, a, names) for a in absorbed.get(c.version, [])])
                for c in registry.checkpoints()]


def lineage_view(registry: Registry, hub: Path) -> dict[str, Any]:
    """Merges and CPT checkpoints so far, and when the next of each is due.

    Thresholds come from the hub's recorded `merge` and `cpt` settings (``unknown`` when absent).
    The merge counters restart at the current base, or at the last merge refused on it: the
    accepted contributions judged on the base since then, and the time since then.
    """
    base = registry.latest_checkpoint()
    checkpoints = registry.checkpoints()
    attempts = registry.base_attempts()
    refused = [a for a in attempts if base is not None and a.source == "merge" and a.parent == base.version]
    since = max([a.created for a in refused], default=None)
    merge = registry.setting("merge")
    cpt = registry.setting("cpt")
    request = pending_merge_request(hub)
    every_s = merge.get("every_s") if merge is not None else UNKNOWN
    start = since if since is not None else (base.created if base is not None else None)
    due_at = UNKNOWN if every_s == UNKNOWN else (iso(start + every_s) if every_s and start is not None else None)
    cpt_rows = [c for c in checkpoints if c.source == "cpt"]
    steps = (cpt_rows[-1].metrics.get("cpt") or {}).get("steps") if cpt_rows else None
    every = cpt.get("checkpoint_every") if cpt is not None else UNKNOWN
    return {
        "merges": sum(c.source == "merge" for c in checkpoints),
        "cpt": len(cpt_rows),
        "refused": {source: sum(a.source == source for a in attempts) for source in ("merge", "cpt")},
        "next_merge": {
            "base_version": None if base is None else base.version,
            "since": iso(start),
            "accepted_since": 0 if base is None else registry.accepted_since(base.version, since),
            "every_accepted": merge.get("every_accepted") if merge is not None else UNKNOWN,
            "every_s": every_s,
            "due_at": due_at,
            "requested_at": None if request is None else (iso(request["requested_at"]) or UNKNOWN),
        },
        "next_cpt": {
            "enabled": cpt.get("enabled", UNKNOWN) if cpt is not None else UNKNOWN,
            "steps": steps,
            "checkpoint_every": every,
            "next_at_step": (steps or 0) + every if isinstance(every, int) and not isinstance(every, bool) else None,
        },
    }


def version_view(v: AdapterVersion, store: StoreView) -> dict[str, Any]:
    return {"adapter": v.adapter, "version": v.version, "base_version": v.base_version,
            "parent_version": v.parent_version, "kind": v.kind, "path": _path(v, store),
            "repo": v.repo, "revision": v.revision, "digest": v.digest, "created": iso(v.created),
            "metrics": v.metrics, "where": _where(v, store), "pruned": iso(v.pruned)}


def lease_view(lease: Lease, names: Names) -> dict[str, Any]:
    return {"token": lease.token, "adapter": lease.adapter, "lane": lease.lane, "holder": names.holder(lease.holder),
            "state": lease.state, "issued": iso(lease.issued), "deadline": iso(lease.deadline),
            "ended": iso(lease.ended), "outcome": lease.outcome, "base_version": lease.base_version,
            "adapter_version": lease.adapter_version}


def active_leases(registry: Registry) -> dict[str, list[Lease]]:
    """adapter -> its active leases in lane order: one per holder, up to ``relay.lanes`` of them."""
    held: dict[str, list[Lease]] = {}
    for lease in sorted(registry.leases(active_only=True), key=lambda row: (row.adapter, row.lane)):
        held.setdefault(lease.adapter, []).append(lease)
    return held


def holder_view(lease: Lease, names: Names) -> dict[str, Any]:
    """One holder of an adapter: its lane, who (a pseudonym unless revealed) and its lease's token."""
    return {"lane": lease.lane, "holder": names.holder(lease.holder), "token": lease.token}


def lanes_view(registry: Registry) -> Any:
    """How many holders an adapter may have at once (``relay.lanes``), from the hub's recorded `relay`
    setting; ``unknown`` when the hub has not recorded it."""
    relay = registry.setting("relay") or {}
    return relay.get("lanes", UNKNOWN)


def contribution_view(c: Contribution, names: Names) -> dict[str, Any]:
    return {"id": c.id, "contributor": names.contributor(c.pseudonym), "adapter": c.adapter,
            "lease_token": c.lease_token, "received": iso(c.received), "decision": c.decision,
            "reason": c.reason, "adapter_version": c.adapter_version, "digest": c.digest,
            "validation": c.validation, "evaluation": c.evaluation, "base_version": c.base_version,
            "judged_base_version": c.judged_base_version}


def adapters_view(registry: Registry, store: StoreView, names: Names) -> list[dict[str, Any]]:
    """``fedem adapters --json``; ``tokens`` are those trained into each adapter by its judged pushes and
    ``token_share`` their ratio to the mean over adapters (1.0: its equal share, what ``relay.policy=fair``
    aims at). ``holders`` are those of its active leases, one per lane (``holder_view``). ``task`` and
    ``domain`` (empty: every row) are its terms (``hub.terms``): a hub without a catalog has language adapters."""
    latest = registry.latest_adapter_versions()
    held = active_leases(registry)
    tokens = registry.tokens_by_adapter()
    terms = adapter_terms_of(registry)
    mean = sum(tokens.values()) / len(tokens) if tokens else 0.0
    rows = []
    for a in registry.adapters():
        v = latest.get(a.name)
        trained = tokens.get(a.name, 0)
        rows.append({"name": a.name, "version": v.version if v else None,
                     "path": store.path(v.repo, v.revision) if v else None,
                     "holders": [holder_view(lease, names) for lease in held.get(a.name, [])],
                     "languages": a.languages, "task": terms[a.name].task, "domain": terms[a.name].domain,
                     "base_version": v.base_version if v else None, "lora_spec": a.lora_spec,
                     "created": iso(a.created), "tokens": trained,
                     "token_share": round(trained / mean, 3) if mean > 0 else 1.0})
    return rows


def status_view(registry: Registry, hub: Path, store: StoreView, names: Names) -> dict[str, Any]:
    """``fedem status --json``: base, the lanes per adapter (``relay.lanes``, ``unknown`` when not recorded),
    adapters with their task and holders, active leases, contribution counts, the lineage (merges, CPT, what is due
    next), recent decisions."""
    with registry.snapshot():
        base = registry.latest_checkpoint()
        writer = read_lock_holder(hub)
        return {
            "hub": str(hub),
            "writer": None if writer is None else {**writer, "since": iso(writer.get("since"))},
            "base": None if base is None else {"version": base.version, "path": store.path(base.repo, base.revision),
                                               "source": base.source, "created": iso(base.created)},
            "lanes": lanes_view(registry),
            "adapters": [{k: row[k] for k in ("name", "version", "path", "holders", "languages", "task")}
                         for row in adapters_view(registry, store, names)],
            "leases": [{"adapter": lease.adapter, "lane": lease.lane, "holder": names.holder(lease.holder),
                        "token": lease.token, "deadline": iso(lease.deadline)}
                       for lease in registry.leases(active_only=True)],
            "contributions": registry.contribution_counts(),
            "lineage": lineage_view(registry, hub),
            "recent": [{k: row[k] for k in ("id", "adapter", "contributor", "decision", "reason", "received")}
                       for row in (contribution_view(c, names) for c in registry.contributions(limit=RECENT))],
        }


def _optimizer_problems(versions: list[AdapterVersion], store: StoreView,
                        removed: Optional[list[dict[str, str]]]) -> list[dict[str, str]]:
    """The hub's private optimizer states that do not load or do not fit their version's adapter, those
    of versions the registry lacks (orphans) and those of pruned versions (``pruned-present``): with
    ``removed``, a repair, the last two are removed and listed there."""
    states = OptimizerStates(store.hub)
    with_state = {(adapter, version) for adapter, version, _ in states.listing()}
    kept, leftovers, pruned = [], [], set()
    for v in versions:
        if (v.adapter, v.version) in with_state and v.pruned is not None and store.local:
            pruned.add(f"{v.adapter}/v{v.version}")
            leftovers.append({"kind": PRUNED_PRESENT, "repo": v.repo, "revision": v.revision,
                              "detail": f"marked pruned, but its optimizer state {states.path(v.adapter, v.version)} "
                                        "is still here (a prune cut short)"})
            if removed is not None:
                states.remove(v.adapter, v.version)
        elif (v.adapter, v.version) in with_state:  # only these are read: a store on a Hub downloads
            folder = store.path(v.repo, v.revision)
            kept.append(KeptVersion(v.adapter, v.version, v.repo, v.revision,
                                    None if folder is None else Path(folder) / "adapter_model.safetensors"))
    problems = [p for p in verify_optimizer_states(states, kept)  # a pruned version's state is no orphan
                if not (p["kind"] == "optimizer-orphan" and p["revision"] in pruned)]
    if removed is None:
        return leftovers + problems
    removed += leftovers
    for problem in [p for p in problems if p["kind"] == "optimizer-orphan"]:
        adapter, version = problem["revision"].rsplit("/v", 1)
        states.remove(adapter, int(version))
        removed.append(problem)
    return [p for p in problems if p["kind"] != "optimizer-orphan"]


def verify_view(registry: Registry, store: StoreView, repair: bool = False) -> dict[str, Any]:
    """``fedem verify --json``: every problem found in the registry and the store (with ``repair``,
    after removing orphans and debris, which are listed under ``removed``).

    Pruned from lost: on a local store a row marked ``pruned`` whose files are gone is fine (counted
    under ``checked.pruned``); a row not pruned whose files are gone is ``missing`` (lost); a pruned
    row whose files are still here is ``pruned-present`` (a prune cut short), which ``repair`` removes.
    A Hugging Face Hub store is never pruned: there every row's tag must be present."""
    with registry.snapshot():
        checkpoints = registry.checkpoints()
        versions = registry.adapter_versions()
        problems = [{"kind": "registry", "repo": "", "revision": "", "detail": p}
                    for p in registry.integrity_problems()]
    rows = [*checkpoints, *versions]
    pruned = frozenset((r.repo, r.revision) for r in rows if r.pruned is not None) if store.local else frozenset()
    known = {(r.repo, r.revision, r.digest) for r in rows if (r.repo, r.revision) not in pruned}
    removed = store.repair(known, pruned) if repair else []
    problems += store.verify(known, pruned)
    problems += _optimizer_problems(versions, store, removed if repair else None)
    present = {(p["repo"], p["revision"]) for p in problems if p["kind"] == PRUNED_PRESENT}
    checked = {"checkpoints": len(checkpoints), "adapter_versions": len(versions), "pruned": len(pruned - present)}
    view = {"ok": not problems, "checked": checked, "problems": problems}
    return {**view, "removed": removed} if repair else view
