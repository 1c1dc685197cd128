"""The hub's durable memory: checkpoints, adapters and their versions, leases, contributions, peer reports.

One lineage of base versions (DESIGN decision 16): each checkpoint names its parent and source, a
merge names the adapter versions it absorbed (:meth:`Registry.add_checkpoint` ``absorbed=``), and
attempts that were not published are :meth:`Registry.add_base_attempt` rows. Held-out losses belong
to an (adapter version, base version) pair (:meth:`Registry.put_evaluation`); the gate reads a
parent's losses on the base it judges on with :meth:`Registry.parent_losses`.

SQLite through the standard library, in WAL mode so readers (``fedem``) never block the writer (the
ServerApp, which also holds the hub's :class:`~fedem_flwr.hub.paths.HubWriterLock`). Every method
that changes state is one transaction; group several with :meth:`Registry.atomic` (nested calls
become savepoints), e.g. accepting a contribution = new adapter version + contribution + lease end.
A crash, SIGKILL included, leaves each transaction either whole or absent.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Optional, Union

from fedem_flwr.errors import RegistryConflict
from fedem_flwr.hub import records as rec
from fedem_flwr.hub.database import Database
from fedem_flwr.hub.pseudonym import pseudonym_of
from fedem_flwr.hub.records import (
    Absorbed,
    Adapter,
    AdapterVersion,
    BaseAttempt,
    Checkpoint,
    Contribution,
    Evaluation,
    Lease,
    PeerReport,
    PeerStanding,
)

_LEASE_KEYS = ("adapter", "lane", "holder", "base_version", "adapter_version", "issued")
# Counters a restore may move past numbers the store or the Hub already hold (``floors``).
CHECKPOINT_COUNTER = "checkpoint"
LEASE_COUNTER = "lease"
CONTRIBUTION_COUNTER = "contribution"


def adapter_counter(adapter: str) -> str:
    return f"adapter:{adapter}"


class Registry(Database):
    """The hub's registry: what was published, leased, contributed and decided."""

    # -- checkpoints ----------------------------------------------------------------------------
    def next_checkpoint_version(self) -> int:
        row = self._one("SELECT MAX(version) FROM checkpoints")
        return max(0 if row[0] is None else row[0] + 1, self.floor(CHECKPOINT_COUNTER))

    def add_checkpoint(self, parent: Optional[int], source: str, repo: str, revision: Optional[str],
                       digest: str, metrics: Optional[dict], created: float,
                       version: Optional[int] = None, absorbed: Sequence[Union[Absorbed, tuple]] = ()) -> Checkpoint:
        """Record a published base checkpoint as version max+1 (0 for the seed).

        Pass ``version`` when the artifact was already written under it: a mismatch is a conflict.
        ``revision=None`` names it ``v{version}``. A merge names what it ``absorbed``:
        ``(adapter, adapter_version, weight, method, seed)`` tuples or :class:`Absorbed` rows, recorded
        in the same transaction as the checkpoint (both or neither).
        """
        if source not in rec.CHECKPOINT_SOURCES:
            raise ValueError(f"`source` is {source!r}; allowed: {', '.join(rec.CHECKPOINT_SOURCES)}.")
        created = rec.finite("created", created)
        metrics_json = rec.dumps("metrics", metrics)
        rows = [_absorbed(item) for item in absorbed]
        if rows and source != "merge":
            raise ValueError(f"`absorbed` names {len(rows)} adapter(s), but `source` is {source!r}; only a "
                             "merge absorbs adapters.")
        twice = sorted({r.adapter for r in rows if sum(o.adapter == r.adapter for o in rows) > 1})
        if twice:
            raise ValueError(f"`absorbed` names adapter(s) {twice} more than once; a merge absorbs one version each.")
        with self.atomic():
            number = self._claim(self.next_checkpoint_version(), version, "checkpoint")
            if parent is not None and self.checkpoint(parent) is None:
                raise RegistryConflict(f"`parent` is {parent}, but no base checkpoint has that version.")
            revision = revision or rec.revision_name(number)
            self._conn.execute("INSERT INTO checkpoints (version, parent, created, source, repo, revision, digest, "
                               "metrics) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                               (number, parent, created, source, repo, revision, digest, metrics_json))
            for row in rows:
                if self._one("SELECT 1 FROM adapter_versions WHERE adapter = ? AND version = ?",
                             (row.adapter, row.adapter_version)) is None:
                    raise RegistryConflict(f"`absorbed` names adapter {row.adapter!r} v{row.adapter_version}, "
                                           "which the registry does not know.")
                self._conn.execute("INSERT INTO merge_absorbed VALUES (?, ?, ?, ?, ?, ?)",
                                   (number, row.adapter, row.adapter_version, row.weight, row.method, row.seed))
        return Checkpoint(number, parent, created, source, repo, revision, digest, dict(metrics or {}))

    def absorbed(self, base_version: int) -> list[Absorbed]:
        """The adapter versions the merge that made ``base_version`` absorbed (empty for init/cpt)."""
        rows = self._all("SELECT * FROM merge_absorbed WHERE base_version = ? ORDER BY adapter", (base_version,))
        return [rec.absorbed_from(r) for r in rows]

    def absorbed_by_base(self) -> dict[int, list[Absorbed]]:
        """base version -> the adapter versions its merge absorbed, for every merge."""
        out: dict[int, list[Absorbed]] = {}
        for row in self._all("SELECT * FROM merge_absorbed ORDER BY base_version, adapter"):
            out.setdefault(row["base_version"], []).append(rec.absorbed_from(row))
        return out

    def absorbing_base(self, adapter: str, adapter_version: int) -> Optional[int]:
        """The base version whose merge took in the work of ``adapter`` v``adapter_version`` (None: not yet).

        An absorbed adapter continues from a zero delta or from its residual (what the merged delta
        left of its own), so the first merge that absorbed this version or a later one is the merge
        that carried its work into the base.
        """
        row = self._one("SELECT base_version FROM merge_absorbed WHERE adapter = ? AND adapter_version >= ? "
                        "ORDER BY adapter_version LIMIT 1", (adapter, adapter_version))
        return None if row is None else int(row[0])

    # -- attempts at a new base that were not published -----------------------------------------
    def add_base_attempt(self, source: str, parent: Optional[int], reason: str, details: Optional[dict],
                         created: float) -> BaseAttempt:
        """Record a merge or CPT checkpoint tried on base ``parent`` and not published, with why."""
        if source not in rec.ATTEMPT_SOURCES:
            raise ValueError(f"`source` is {source!r}; allowed: {', '.join(rec.ATTEMPT_SOURCES)}.")
        if not isinstance(reason, str) or not reason:
            raise ValueError(f"`reason` is {reason!r}; an attempt that was not published says why.")
        created = rec.finite("created", created)
        details_json = rec.dumps("details", details)
        with self.atomic():
            if parent is not None and self.checkpoint(parent) is None:
                raise RegistryConflict(f"`parent` is {parent}, but no base checkpoint has that version.")
            cur = self._conn.execute("INSERT INTO base_attempts (created, source, parent, reason, details) "
                                     "VALUES (?, ?, ?, ?, ?)", (created, source, parent, reason, details_json))
        return BaseAttempt(int(cur.lastrowid), created, source, parent, reason, dict(details or {}))

    def base_attempts(self, source: Optional[str] = None) -> list[BaseAttempt]:
        """Attempts that were not published, oldest first (all, or of one ``source``)."""
        sql, params = "SELECT * FROM base_attempts", ()
        if source is not None:
            sql, params = sql + " WHERE source = ?", (source,)
        return [rec.base_attempt_from(r) for r in self._all(sql + " ORDER BY id", params)]

    def checkpoint(self, version: int) -> Optional[Checkpoint]:
        row = self._one("SELECT * FROM checkpoints WHERE version = ?", (version,))
        return rec.checkpoint_from(row) if row else None

    def latest_checkpoint(self) -> Optional[Checkpoint]:
        row = self._one("SELECT * FROM checkpoints ORDER BY version DESC LIMIT 1")
        return rec.checkpoint_from(row) if row else None

    def checkpoints(self) -> list[Checkpoint]:
        return [rec.checkpoint_from(r) for r in self._all("SELECT * FROM checkpoints ORDER BY version")]

    # -- adapters and their versions ------------------------------------------------------------
    def add_adapter(self, name: str, languages: list[str], task: str, lora_spec: Optional[dict],
                    created: float) -> Adapter:
        """Register a named adapter of the relay pool (its version 0 is added separately)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"`name` is {name!r}; it must be a non-empty string.")
        created = rec.finite("created", created)
        langs = list(languages or [])
        with self.atomic():
            if self.adapter(name) is not None:
                raise RegistryConflict(f"an adapter named {name!r} already exists.")
            self._conn.execute("INSERT INTO adapters VALUES (?, ?, ?, ?, ?)",
                               (name, rec.dumps("languages", langs), task or "",
                                rec.dumps("lora_spec", lora_spec), created))
        return Adapter(name, langs, task or "", dict(lora_spec or {}), created)

    def adapter(self, name: str) -> Optional[Adapter]:
        row = self._one("SELECT * FROM adapters WHERE name = ?", (name,))
        return rec.adapter_from(row) if row else None

    def adapters(self) -> list[Adapter]:
        return [rec.adapter_from(r) for r in self._all("SELECT * FROM adapters ORDER BY name")]

    def next_adapter_version(self, adapter: str) -> int:
        row = self._one("SELECT MAX(version) FROM adapter_versions WHERE adapter = ?", (adapter,))
        return max(0 if row[0] is None else row[0] + 1, self.floor(adapter_counter(adapter)))

    def add_adapter_version(self, adapter: str, base_version: int, parent_version: Optional[int],
                            repo: str, revision: Optional[str], digest: str, metrics: Optional[dict],
                            created: float, version: Optional[int] = None, kind: Optional[str] = None) -> AdapterVersion:
        """Record a stored adapter state as version max+1 of ``adapter`` (0 is the fresh LoRA).

        ``kind`` is ``fresh`` (version 0, the default there), ``push`` (an accepted contribution, the
        default after 0) or ``rebase`` (continuing on a new base after a merge: from a zero delta, or
        from its residual). Held-out losses
        in ``metrics["heldout"]`` are also recorded as the version's evaluation on ``base_version``.
        """
        created = rec.finite("created", created)
        metrics_json = rec.dumps("metrics", metrics)
        if kind is not None and kind not in rec.VERSION_KINDS:
            raise ValueError(f"`kind` is {kind!r}; allowed: {', '.join(rec.VERSION_KINDS)}.")
        with self.atomic():
            if self.adapter(adapter) is None:
                raise RegistryConflict(f"`adapter` is {adapter!r}, but no adapter has that name.")
            if self.checkpoint(base_version) is None:
                raise RegistryConflict(f"`base_version` is {base_version}, but no base checkpoint has it.")
            number = self._claim(self.next_adapter_version(adapter), version, f"adapter {adapter!r}")
            if parent_version is not None and not 0 <= parent_version < number:
                raise RegistryConflict(
                    f"`parent_version` is {parent_version}; adapter {adapter!r} has versions 0..{number - 1}.")
            kind = kind or ("fresh" if number == 0 else "push")
            if (kind == "fresh") != (number == 0):
                raise RegistryConflict(f"`kind` is {kind!r} for version {number} of adapter {adapter!r}; "
                                       "version 0 is `fresh` and only version 0 is.")
            revision = revision or rec.revision_name(number)
            self._conn.execute("INSERT INTO adapter_versions (adapter, version, base_version, parent_version, "
                               "digest, repo, revision, metrics, created, kind) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                               (adapter, number, base_version, parent_version, digest, repo, revision,
                                metrics_json, created, kind))
            heldout = (metrics or {}).get("heldout")
            if isinstance(heldout, dict):
                self.put_evaluation(adapter, number, base_version, heldout, created)
        return AdapterVersion(adapter, number, base_version, parent_version, digest, repo, revision,
                              dict(metrics or {}), created, kind)

    def adapter_version(self, name: str, version: int) -> Optional[AdapterVersion]:
        row = self._one("SELECT * FROM adapter_versions WHERE adapter = ? AND version = ?", (name, version))
        return rec.adapter_version_from(row) if row else None

    def latest_adapter_version(self, name: str) -> Optional[AdapterVersion]:
        row = self._one("SELECT * FROM adapter_versions WHERE adapter = ? ORDER BY version DESC LIMIT 1",
                        (name,))
        return rec.adapter_version_from(row) if row else None

    def latest_adapter_versions(self) -> dict[str, AdapterVersion]:
        """The newest version of every adapter that has one, in one query."""
        rows = self._all("SELECT v.* FROM adapter_versions v JOIN (SELECT adapter, MAX(version) AS m "
                         "FROM adapter_versions GROUP BY adapter) l ON v.adapter = l.adapter AND "
                         "v.version = l.m ORDER BY v.adapter")
        return {r["adapter"]: rec.adapter_version_from(r) for r in rows}

    def adapter_versions(self, name: Optional[str] = None) -> list[AdapterVersion]:
        if name is None:
            rows = self._all("SELECT * FROM adapter_versions ORDER BY adapter, version")
        else:
            rows = self._all("SELECT * FROM adapter_versions WHERE adapter = ? ORDER BY version", (name,))
        return [rec.adapter_version_from(r) for r in rows]

    def update_version_heldout(self, adapter: str, version: int, heldout: dict[str, float], split: str,
                               updated: float, replaced_split: Optional[str] = None,
                               base_version: Optional[int] = None) -> AdapterVersion:
        """Replace a version's held-out losses after the held-out set changed (split id ``split``).

        The gate compares pushes with the parent's losses (:meth:`parent_losses`), so those losses
        must come from the held-out set the hub evaluates on now: they become the version's
        evaluation on ``base_version`` (default: the version's own base; pass the base the losses
        were measured on). The replaced losses stay in ``metrics["heldout-replaced"]`` with the split
        they were measured on (their recorded ``heldout-split``, else ``replaced_split``).
        """
        updated = rec.finite("updated", updated)
        with self.atomic():
            row = self._one("SELECT * FROM adapter_versions WHERE adapter = ? AND version = ?", (adapter, version))
            if row is None:
                raise RegistryConflict(f"adapter {adapter!r} has no version {version}.")
            old = rec.adapter_version_from(row)
            metrics = dict(old.metrics)
            replaced = list(metrics.get("heldout-replaced", []))
            replaced.append({"heldout": metrics.get("heldout", {}),
                             "split": metrics.get("heldout-split", replaced_split), "until": updated})
            metrics.update({"heldout": dict(heldout), "heldout-split": split, "heldout-replaced": replaced})
            self._conn.execute("UPDATE adapter_versions SET metrics = ? WHERE adapter = ? AND version = ?",
                               (rec.dumps("metrics", metrics), adapter, version))
            self.put_evaluation(adapter, version, old.base_version if base_version is None else base_version,
                                heldout, updated)
        return replace(old, metrics=metrics)

    # -- evaluations: held-out losses of an adapter version on a base version --------------------
    def put_evaluation(self, adapter: str, version: int, base_version: int, heldout: dict[str, float],
                       created: float) -> Evaluation:
        """Record (or replace, after a re-evaluation) ``adapter`` v``version``'s held-out loss per
        language on base ``base_version``."""
        created = rec.finite("created", created)
        losses = _losses(heldout)
        with self.atomic():
            if self._one("SELECT 1 FROM adapter_versions WHERE adapter = ? AND version = ?", (adapter, version)) is None:
                raise RegistryConflict(f"adapter {adapter!r} has no version {version}.")
            if self.checkpoint(base_version) is None:
                raise RegistryConflict(f"`base_version` is {base_version}, but no base checkpoint has it.")
            self._conn.execute(
                "INSERT INTO evaluations VALUES (?, ?, ?, ?, ?) ON CONFLICT(adapter, adapter_version, base_version) "
                "DO UPDATE SET heldout = excluded.heldout, created = excluded.created",
                (adapter, version, base_version, rec.dumps("heldout", losses), created))
        return Evaluation(adapter, version, base_version, losses, created)

    def evaluation(self, adapter: str, version: int, base_version: int) -> Optional[dict[str, float]]:
        """Held-out loss per language of ``adapter`` v``version`` on base ``base_version``; None if never measured."""
        row = self._one("SELECT heldout FROM evaluations WHERE adapter = ? AND adapter_version = ? AND base_version = ?",
                        (adapter, version, base_version))
        return None if row is None else json.loads(row[0])

    def evaluations(self, base_version: Optional[int] = None) -> list[Evaluation]:
        """Every evaluation (or those on one base), by adapter, version and base."""
        sql, params = "SELECT * FROM evaluations", ()
        if base_version is not None:
            sql, params = sql + " WHERE base_version = ?", (base_version,)
        return [rec.evaluation_from(r) for r in
                self._all(sql + " ORDER BY adapter, adapter_version, base_version", params)]

    def parent_losses(self, adapter: str, version: int, base_version: int) -> Optional[dict[str, float]]:
        """What the gate compares a push with: the parent version's held-out losses on the base the
        push is judged on. None when the parent was never evaluated on that base: evaluate it there
        (and :meth:`put_evaluation`) before judging, never compare losses across bases."""
        return self.evaluation(adapter, version, base_version)

    def _claim(self, next_number: int, wanted: Optional[int], what: str) -> int:
        if wanted is not None and wanted != next_number:
            raise RegistryConflict(f"`version` is {wanted}, but the next version of {what} is {next_number}.")
        return next_number

    # -- retention: what the local store no longer holds, and where it went ---------------------------
    def mark_checkpoint_pruned(self, version: int, at: float) -> None:
        """Base ``version``'s files left the local store; its row, lineage and losses stay."""
        self._mark_pruned("checkpoints", "version = ?", (version,), at, f"base version {version}")

    def mark_version_pruned(self, adapter: str, version: int, at: float) -> None:
        """Adapter ``adapter`` v``version``'s files (and private state) left the local store; its row stays."""
        self._mark_pruned("adapter_versions", "adapter = ? AND version = ?", (adapter, version), at,
                          f"adapter {adapter!r} v{version}")

    def _mark_pruned(self, table: str, where: str, key: tuple, at: float, what: str) -> None:
        with self.atomic():
            cur = self._conn.execute(f"UPDATE {table} SET pruned = ? WHERE {where} AND pruned IS NULL",
                                     (rec.finite("at", at), *key))
            if cur.rowcount == 0 and self._one(f"SELECT 1 FROM {table} WHERE {where}", key) is None:
                raise RegistryConflict(f"{what} is not in the registry; nothing to mark pruned.")

    def record_publication(self, repo: str, revision: str, digest: str, target: str, at: float) -> None:
        """``repo``@``revision`` (``digest``) is on ``target`` (e.g. ``hf:<endpoint>``), so retention may
        remove the local copy. Publishing the same revision again with other content is a conflict."""
        with self.atomic():
            row = self._one("SELECT digest FROM publications WHERE repo = ? AND revision = ? AND target = ?",
                            (repo, revision, target))
            if row is not None and row[0] != digest:
                raise RegistryConflict(f"{repo}@{revision} was published to {target} with digest {row[0][:12]}, "
                                       f"not {digest[:12]}: a published tag never changes content.")
            if row is None:
                self._conn.execute("INSERT INTO publications VALUES (?, ?, ?, ?, ?)",
                                   (repo, revision, digest, target, rec.finite("at", at)))

    def publications(self, target: Optional[str] = None) -> dict[tuple[str, str], dict[str, Any]]:
        """(repo, revision) -> {digest, target, published} of every recorded publication (of ``target``)."""
        sql, args = "SELECT * FROM publications", ()
        if target is not None:
            sql, args = sql + " WHERE target = ?", (target,)
        return {(r["repo"], r["revision"]): {"digest": r["digest"], "target": r["target"], "published": r["published"]}
                for r in self._all(sql + " ORDER BY published", args)}

    # -- counters a restore moves on ----------------------------------------------------------
    def floor(self, counter: str) -> int:
        """The least next value of ``counter`` (0 when none was set): numbers below it may exist elsewhere."""
        row = self._one("SELECT next FROM floors WHERE counter = ?", (counter,))
        return 0 if row is None else int(row[0])

    def raise_floor(self, counter: str, at_least: int, at: float) -> int:
        """Make ``counter``'s next value at least ``at_least`` (never lowers it); returns the floor."""
        if not counter or at_least < 0:
            raise ValueError(f"a floor needs a counter name and a value >= 0; got {counter!r}, {at_least}.")
        with self.atomic():
            current = self.floor(counter)
            if at_least > current:
                self._conn.execute("INSERT INTO floors VALUES (?, ?, ?) ON CONFLICT(counter) DO UPDATE SET "
                                   "next = excluded.next, updated = excluded.updated",
                                   (counter, int(at_least), rec.finite("at", at)))
            return max(current, at_least)

    def floors(self) -> dict[str, int]:
        return {r[0]: int(r[1]) for r in self._all("SELECT counter, next FROM floors ORDER BY counter")}

    # -- leases ---------------------------------------------------------------------------------
    def save_lease(self, lease: Lease) -> None:
        """Insert or update a lease (its token is the key); its holder gets a pseudonym on the way.

        Fields fixed at issue (adapter, holder, versions, issued) never change, and an ended lease
        never changes again. The database refuses a second active lease on one lane of an adapter, or on one holder.
        """
        if lease.state not in ("active", "released", "expired"):
            raise ValueError(f"`state` is {lease.state!r}; allowed: active, released, expired.")
        with self.atomic():
            old = self._one("SELECT * FROM leases WHERE token = ?", (lease.token,))
            if old is not None:
                self._check_lease_update(_lease_from(old), lease)
            else:
                self.pseudonym(lease.holder, seen=lease.issued)
            try:
                self._conn.execute(
                    "INSERT INTO leases (token, adapter, holder, base_version, adapter_version, issued, deadline, "
                    "state, ended, outcome, lane) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT(token) DO UPDATE SET deadline = excluded.deadline, state = excluded.state, "
                    "ended = excluded.ended, outcome = excluded.outcome",
                    (lease.token, lease.adapter, lease.holder, lease.base_version, lease.adapter_version,
                     rec.finite("issued", lease.issued), rec.finite("deadline", lease.deadline),
                     lease.state, lease.ended, lease.outcome, lease.lane))
            except sqlite3.IntegrityError as err:
                raise self._lease_conflict(lease, err) from err

    def _check_lease_update(self, old: Lease, new: Lease) -> None:
        changed = [k for k in _LEASE_KEYS if getattr(old, k) != getattr(new, k)]
        if changed:
            raise RegistryConflict(f"lease {new.token} was issued with other {', '.join(changed)}: "
                                   f"recorded {old}, got {new}.")
        if old.state != "active" and old != new:
            raise RegistryConflict(f"lease {new.token} already ended ({old.state}, outcome {old.outcome!r}); "
                                   f"it cannot become {new.state!r}.")

    def _lease_conflict(self, lease: Lease, err: sqlite3.IntegrityError) -> Exception:
        if lease.state == "active":
            row = self._one("SELECT token FROM leases WHERE state = 'active' AND adapter = ? AND lane = ? "
                            "AND token <> ?", (lease.adapter, lease.lane, lease.token))
            if row is not None:
                return RegistryConflict(f"lease {lease.token}: lane {lease.lane} of adapter {lease.adapter!r} already "
                                        f"has active lease {row[0]}; one active lease per lane.")
            row = self._one("SELECT token FROM leases WHERE state = 'active' AND holder = ? AND token <> ?",
                            (lease.holder, lease.token))
            if row is not None:
                return RegistryConflict(f"lease {lease.token}: holder {lease.holder!r} already has active lease "
                                        f"{row[0]}; one active lease per holder.")
        if self.adapter(lease.adapter) is None:
            return RegistryConflict(f"lease {lease.token}: `adapter` {lease.adapter!r} is not registered.")
        return RegistryConflict(f"lease {lease.token} cannot be stored: {err}")

    def lease(self, token: int) -> Optional[Lease]:
        row = self._one("SELECT * FROM leases WHERE token = ?", (token,))
        return _lease_from(row) if row else None

    def leases(self, active_only: bool = False) -> list[Lease]:
        where = " WHERE state = 'active'" if active_only else ""
        return [_lease_from(r) for r in self._all(f"SELECT * FROM leases{where} ORDER BY token")]

    def last_leased(self) -> dict[str, float]:
        """adapter -> when it was last leased (epoch seconds), for least-recently-served policies."""
        return {r[0]: float(r[1]) for r in self._all("SELECT adapter, MAX(issued) FROM leases GROUP BY adapter")}

    def latest_lease_tokens(self) -> dict[tuple[str, int], int]:
        """(adapter, lane) -> the newest fencing token issued on that lane: what fencing needs of ended leases."""
        return {(r[0], int(r[1])): int(r[2])
                for r in self._all("SELECT adapter, lane, MAX(token) FROM leases GROUP BY adapter, lane")}

    def max_lease_token(self) -> int:
        """The largest fencing token ever issued (0 before the first lease), or below the ``lease``
        floor a restore set: the next is above it."""
        row = self._one("SELECT MAX(token) FROM leases")
        return max(0 if row[0] is None else int(row[0]), self.floor(LEASE_COUNTER) - 1)

    # -- contributors and contributions ---------------------------------------------------------
    def pseudonym(self, identity: str, seen: Optional[float] = None) -> str:
        """The pseudonym of a contributor identity (``pk:``/``sim:``/``node:``), registering it once.

        A read-only registry only looks it up (or computes it when it may read the secret).
        """
        row = self._one("SELECT pseudonym FROM contributors WHERE identity = ?", (identity,))
        if row is not None:
            return row[0]
        alias = pseudonym_of(identity, self._load_secret())
        if self.readonly:
            return alias
        with self.atomic():
            clash = self._one("SELECT identity FROM contributors WHERE pseudonym = ?", (alias,))
            if clash is not None:
                raise RegistryConflict(f"pseudonym {alias} of {identity!r} collides with a recorded one.")
            self._conn.execute("INSERT INTO contributors VALUES (?, ?, ?)",
                               (identity, alias, time.time() if seen is None else rec.finite("seen", seen)))
        return alias

    def derived_key(self, purpose: str) -> bytes:
        """A 32-byte key for ``purpose`` (e.g. ``"heldout-split"``): HMAC-SHA256(secret, purpose).

        Each use gets its own key, so none reveals the secret or another use's key.
        """
        if not purpose:
            raise ValueError("`purpose` of a derived key must not be empty.")
        return hmac.new(self._load_secret(), purpose.encode("utf-8"), hashlib.sha256).digest()

    def identities(self) -> dict[str, str]:
        """pseudonym -> identity, for ``--reveal`` only; evaluation code never needs it."""
        return {r[0]: r[1] for r in self._all("SELECT pseudonym, identity FROM contributors")}

    def add_contribution(self, pseudonym: str, adapter: str, lease_token: Optional[int], received: float,
                         digest: str, validation: Optional[dict], evaluation: Optional[dict],
                         decision: str, reason: str = "", adapter_version: Optional[int] = None, *,
                         base_version: Optional[int] = None, judged_base_version: Optional[int] = None) -> int:
        """Record one returned adapter and the decision on it; returns its id. Never deleted.

        ``base_version`` is the base the push was trained on (its lease's), ``judged_base_version``
        the base it was judged on (the newest when it arrived); both null when not known.
        """
        if decision not in rec.DECISIONS:
            raise ValueError(f"`decision` is {decision!r}; allowed: {', '.join(rec.DECISIONS)}.")
        params = (pseudonym, adapter, lease_token, rec.finite("received", received), digest,
                  rec.dumps("validation", validation), rec.dumps("evaluation", evaluation), decision,
                  reason or "", adapter_version, base_version, judged_base_version)
        with self.atomic():
            number = self.next_contribution_id()
            try:
                cur = self._conn.execute(
                    "INSERT INTO contributions (id, pseudonym, adapter, lease_token, received, digest, validation, "
                    "evaluation, decision, reason, adapter_version, base_version, judged_base_version) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", (number, *params))
            except sqlite3.IntegrityError as err:
                raise self._contribution_conflict(params, err) from err
            return int(cur.lastrowid)

    def next_contribution_id(self) -> int:
        """The id the next contribution gets: past every recorded one and the ``contribution`` floor."""
        row = self._one("SELECT MAX(id) FROM contributions")
        return max(1 if row[0] is None else int(row[0]) + 1, self.floor(CONTRIBUTION_COUNTER))

    def _contribution_conflict(self, params: tuple, err: sqlite3.IntegrityError) -> Exception:
        pseudonym, adapter, token, *_, version, base, judged = params
        checks = [
            ("pseudonym", pseudonym, "SELECT 1 FROM contributors WHERE pseudonym = ?", (pseudonym,)),
            ("adapter", adapter, "SELECT 1 FROM adapters WHERE name = ?", (adapter,)),
            ("lease_token", token, "SELECT 1 FROM leases WHERE token = ?", (token,)),
            ("adapter_version", version, "SELECT 1 FROM adapter_versions WHERE adapter = ? AND version = ?",
             (adapter, version)),
            ("base_version", base, "SELECT 1 FROM checkpoints WHERE version = ?", (base,)),
            ("judged_base_version", judged, "SELECT 1 FROM checkpoints WHERE version = ?", (judged,)),
        ]
        for key, value, sql, args in checks:
            if value is not None and self._one(sql, args) is None:
                return RegistryConflict(f"contribution: `{key}` is {value!r}, which the registry does not know.")
        return RegistryConflict(f"contribution cannot be stored: {err}")

    def contributions(self, limit: Optional[int] = None, adapter: Optional[str] = None) -> list[Contribution]:
        """Contributions, newest first (all, or the last ``limit``), optionally of one adapter."""
        sql, params = "SELECT * FROM contributions", ()
        if adapter is not None:
            sql, params = sql + " WHERE adapter = ?", (adapter,)
        sql += " ORDER BY id DESC"
        if limit is not None:
            sql, params = sql + " LIMIT ?", params + (int(limit),)
        return [rec.contribution_from(r) for r in self._all(sql, params)]

    def accepted_contribution(self, adapter: str, version: int) -> Optional[Contribution]:
        """The (newest) accepted contribution that made ``adapter`` v``version``; None for a version no
        recorded push made (a fresh start, a rebase, a push a restore re-registered without its contributor)."""
        row = self._one("SELECT * FROM contributions WHERE adapter = ? AND adapter_version = ? AND "
                        "decision = 'accepted' ORDER BY id DESC LIMIT 1", (adapter, version))
        return None if row is None else rec.contribution_from(row)

    def accepted_since(self, base_version: int, since: Optional[float] = None) -> int:
        """Accepted contributions judged on ``base_version`` (received after ``since`` when given):
        what the ``merge.every_accepted`` trigger counts."""
        sql = "SELECT COUNT(*) FROM contributions WHERE decision = 'accepted' AND judged_base_version = ?"
        params: tuple = (base_version,)
        if since is not None:
            sql, params = sql + " AND received > ?", params + (rec.finite("since", since),)
        return int(self._one(sql, params)[0])

    def contributors_of(self, adapter: str, version: int) -> list[str]:
        """Pseudonyms of the accepted contributions whose work ``adapter`` v``version`` carries: those
        since its last fresh start (v0, or a rebase after a merge absorbed the earlier work)."""
        rows = self._all(
            "SELECT DISTINCT pseudonym FROM contributions WHERE adapter = ? AND decision = 'accepted' "
            "AND adapter_version <= ? AND adapter_version > COALESCE((SELECT MAX(version) FROM adapter_versions "
            "WHERE adapter = ? AND version <= ? AND kind IN ('fresh', 'rebase')), -1) ORDER BY pseudonym",
            (adapter, version, adapter, version))
        return [r[0] for r in rows]

    def tokens_since_restart(self, adapter: str, version: int, most: Optional[float] = None) -> float:
        """Training tokens ``adapter`` v``version`` carries: the node-reported ``metrics["train"]["tokens"]``
        of its accepted (``push``) versions since its last fresh start (v0, or a rebase after a merge),
        up to ``version``; a count that is missing, negative or not finite counts as 0, and each counts at
        most ``most`` (what one lease can train) when given."""
        rows = self._all(
            "SELECT metrics FROM adapter_versions WHERE adapter = ? AND kind = 'push' AND version <= ? "
            "AND version > COALESCE((SELECT MAX(version) FROM adapter_versions WHERE adapter = ? AND version <= ? "
            "AND kind IN ('fresh', 'rebase')), -1)", (adapter, version, adapter, version))
        total = 0.0
        for (metrics,) in rows:
            train = json.loads(metrics or "{}").get("train")
            count = train.get("tokens") if isinstance(train, dict) else None
            if isinstance(count, (int, float)) and not isinstance(count, bool):
                count = float(min(count, 1e300 if most is None else most))  # a huge int is clamped, not raised on
                total += count if math.isfinite(count) and count > 0 else 0.0
        return total

    def contribution_counts(self) -> dict[str, int]:
        """``{"accepted": n, "rejected": m}`` (both keys always present)."""
        counts = dict.fromkeys(rec.DECISIONS, 0)
        for row in self._all("SELECT decision, COUNT(*) FROM contributions GROUP BY decision"):
            counts[row[0]] = row[1]
        return counts

    def tokens_by_adapter(self, most: Optional[int] = None) -> dict[str, int]:
        """adapter -> tokens trained into it: the ``tokens`` its judged pushes (accepted or rejected; a
        judged base recorded) reported in their train metrics, each clamped to at least 0 and at most
        ``most`` (what one lease can train) when given. Every registered adapter is listed (0: none)."""
        totals = {name: 0 for (name,) in self._all("SELECT name FROM adapters ORDER BY name")}
        rows = self._all("SELECT adapter, json_extract(evaluation, '$.train.tokens') FROM contributions "
                         "WHERE judged_base_version IS NOT NULL")
        for adapter, tokens in rows:
            if isinstance(tokens, (int, float)) and not isinstance(tokens, bool) and math.isfinite(tokens):
                counted = max(0, int(tokens))
                totals[adapter] = totals.get(adapter, 0) + (counted if most is None else min(counted, most))
        return totals

    # -- peer judging: who was asked to judge which push, and how far each peer is trusted ----------
    def add_peer_reports(self, reports: Sequence[PeerReport]) -> None:
        """Record the asks of one or more pushes and what came of each, all or none.

        A non-finite number inside a ``report`` (a peer's loss that diverged) is stored as null.
        """
        rows = [_peer_report_row(r) for r in reports]  # every row checked before the first is written
        with self.atomic():
            self._conn.executemany("INSERT INTO peer_reports (lease_token, peer, pusher, asked, answered, outcome, "
                                   "report) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

    def peer_reports(self, lease_token: Optional[int] = None, limit: Optional[int] = None) -> list[PeerReport]:
        """Peer reports in the order they were recorded (of one push: its lease token); with ``limit``, the
        newest ``limit``, newest first."""
        sql, params = "SELECT * FROM peer_reports", ()
        if lease_token is not None:
            sql, params = sql + " WHERE lease_token = ?", (int(lease_token),)
        if limit is None:
            sql += " ORDER BY id"
        else:
            sql, params = sql + " ORDER BY id DESC LIMIT ?", params + (int(limit),)
        return [rec.peer_report_from(r) for r in self._all(sql, params)]

    def peer_pair_counts(self) -> dict[tuple[str, str], int]:
        """(peer, pusher) -> how many times that peer was asked to judge that pusher: what rotating the
        judges by pair reads, so no pusher is judged by the same few peers every time."""
        return {(r[0], r[1]): int(r[2])
                for r in self._all("SELECT peer, pusher, COUNT(*) FROM peer_reports GROUP BY peer, pusher")}

    def peer_outcome_counts(self) -> dict[str, dict[str, int]]:
        """peer -> {outcome kind (``counted``, ``failed``, ``late``, ``unanswered``, ``ignored``): how many of
        its asks ended so}, counted in the database (a hub that ran for months holds many reports)."""
        out: dict[str, dict[str, int]] = {}
        for peer, kind, count in self._all(
                "SELECT peer, CASE WHEN instr(outcome, ':') > 0 THEN substr(outcome, 1, instr(outcome, ':') - 1) "
                "ELSE outcome END AS kind, COUNT(*) FROM peer_reports GROUP BY peer, kind ORDER BY peer, kind"):
            out.setdefault(peer, {})[kind] = int(count)
        return out

    def peer_standing(self) -> dict[str, PeerStanding]:
        """peer -> its standing, for every peer whose reports were checked against a decision."""
        return {r["peer"]: rec.peer_standing_from(r) for r in self._all("SELECT * FROM peer_standing ORDER BY peer")}

    def update_peer_standing(self, peer: str, agreed: int, disagreed: int, at: float) -> None:
        """Add ``agreed`` and ``disagreed`` checked reports to ``peer``'s standing (a new peer starts at 0, 0)."""
        if not _is_pseudonym(peer):
            raise ValueError(f"`peer` is {peer!r}; it must be a pseudonym.")
        for key, value in (("agreed", agreed), ("disagreed", disagreed)):
            if not _is_count(value):
                raise ValueError(f"`{key}` of peer {peer!r} is {value!r}; it must be a count (an integer >= 0).")
        with self.atomic():
            self._conn.execute(
                "INSERT INTO peer_standing VALUES (?, ?, ?, ?) ON CONFLICT(peer) DO UPDATE SET "
                "agreed = agreed + excluded.agreed, disagreed = disagreed + excluded.disagreed, "
                "updated = excluded.updated", (peer, agreed, disagreed, rec.finite("at", at)))

    # -- settings the hub was set up with -------------------------------------------------------
    def setting(self, name: str) -> Optional[dict]:
        """A recorded hub setting (store, LoRA spec, data split, ...), or None when never recorded."""
        row = self._one("SELECT value FROM settings WHERE name = ?", (name,))
        return None if row is None else json.loads(row[0])

    def settings(self) -> dict[str, dict]:
        return {r[0]: json.loads(r[1]) for r in self._all("SELECT name, value FROM settings ORDER BY name")}

    def put_setting(self, name: str, value: dict, updated: Optional[float] = None) -> None:
        """Record (or replace) one setting; ``value`` is stored as sorted JSON."""
        if not name:
            raise ValueError("`name` of a setting must not be empty.")
        stamp = time.time() if updated is None else rec.finite("updated", updated)
        with self.atomic():
            self._conn.execute(
                "INSERT INTO settings VALUES (?, ?, ?) ON CONFLICT(name) DO UPDATE "
                "SET value = excluded.value, updated = excluded.updated",
                (name, rec.dumps(f"setting {name}", value), stamp))


def _absorbed(item: Union[Absorbed, tuple]) -> Absorbed:
    row = item if isinstance(item, Absorbed) else Absorbed(*item)
    if not isinstance(row.adapter, str) or not row.adapter:
        raise ValueError(f"`absorbed` adapter is {row.adapter!r}; it must be an adapter name.")
    if isinstance(row.weight, bool) or not isinstance(row.weight, (int, float)) or not math.isfinite(row.weight):
        raise ValueError(f"`absorbed` weight of {row.adapter!r} is {row.weight!r}; it must be a finite number.")
    if not isinstance(row.method, str) or not row.method:
        raise ValueError(f"`absorbed` method of {row.adapter!r} is {row.method!r}; name the merge method.")
    if row.seed is not None and (isinstance(row.seed, bool) or not isinstance(row.seed, int)):
        raise ValueError(f"`absorbed` seed of {row.adapter!r} is {row.seed!r}; it must be an integer or None.")
    return replace(row, weight=float(row.weight))


def _peer_report_row(report: PeerReport) -> tuple:
    """A :class:`PeerReport` as its ``peer_reports`` row, or a ValueError naming the field that is wrong."""
    token = report.lease_token
    if not _is_count(token):
        raise ValueError(f"`lease_token` of a peer report is {token!r}; it must be a lease token (an integer >= 0).")
    for key in ("peer", "pusher"):
        value = getattr(report, key)
        if not _is_pseudonym(value):
            raise ValueError(f"`{key}` of the peer report on lease {token} is {value!r}; it must be a pseudonym.")
    if report.report is not None and not isinstance(report.report, dict):
        raise ValueError(f"`report` of peer {report.peer!r} on lease {token} is {report.report!r}; it must be a "
                         "dict (or None when the peer did not answer).")
    answered = None if report.answered is None else rec.finite("answered", report.answered)
    body = None if report.report is None else rec.dumps(f"report of peer {report.peer!r}", rec.nulled(report.report))
    return (token, report.peer, report.pusher, rec.finite("asked", report.asked), answered,
            rec.peer_outcome(report.outcome), body)


def _is_count(value: Any) -> bool:
    """An integer >= 0 (a bool is none): a lease token, a tally."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_pseudonym(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def _losses(heldout: Any) -> dict[str, float]:
    """Held-out losses as {language: finite float}; anything else is refused, naming the language."""
    if not isinstance(heldout, dict):
        raise ValueError(f"`heldout` is {heldout!r}; it must map languages to losses.")
    out = {}
    for lang, loss in heldout.items():
        if isinstance(loss, bool) or not isinstance(loss, (int, float)) or not math.isfinite(loss):
            raise ValueError(f"`heldout` loss of language {lang!r} is {loss!r}; it must be a finite number.")
        out[str(lang)] = float(loss)
    return out


def _lease_from(row: sqlite3.Row) -> Lease:
    return Lease(token=row["token"], adapter=row["adapter"], holder=row["holder"],
                 base_version=row["base_version"], adapter_version=row["adapter_version"],
                 issued=row["issued"], deadline=row["deadline"], state=row["state"], ended=row["ended"],
                 outcome=row["outcome"], lane=row["lane"])


__all__ = ["Registry", "Absorbed", "Adapter", "AdapterVersion", "BaseAttempt", "Checkpoint", "Contribution",
           "Evaluation", "Lease", "PeerReport", "PeerStanding"]

