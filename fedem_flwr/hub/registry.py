"""The hub's durable memory: checkpoints, adapters and their versions, leases, contributions.

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
import sqlite3
import time
from dataclasses import replace
from typing import Optional

from fedem_flwr.errors import RegistryConflict
from fedem_flwr.hub import records as rec
from fedem_flwr.hub.database import Database
from fedem_flwr.hub.pseudonym import pseudonym_of
from fedem_flwr.hub.records import Adapter, AdapterVersion, Checkpoint, Contribution
from fedem_flwr.relay.leases import Lease

_LEASE_KEYS = ("adapter", "holder", "base_version", "adapter_version", "issued")


class Registry(Database):
    """The hub's registry: what was published, leased, contributed and decided."""

    # -- checkpoints ----------------------------------------------------------------------------
    def next_checkpoint_version(self) -> int:
        row = self._one("SELECT MAX(version) FROM checkpoints")
        return 0 if row[0] is None else row[0] + 1

    def add_checkpoint(self, parent: Optional[int], source: str, repo: str, revision: Optional[str],
                       digest: str, metrics: Optional[dict], created: float,
                       version: Optional[int] = None) -> Checkpoint:
        """Record a published base checkpoint as version max+1 (0 for the seed).

        Pass ``version`` when the artifact was already written under it: a mismatch is a conflict.
        ``revision=None`` names it ``v{version}``.
        """
        if source not in rec.CHECKPOINT_SOURCES:
            raise ValueError(f"`source` is {source!r}; allowed: {', '.join(rec.CHECKPOINT_SOURCES)}.")
        created = rec.finite("created", created)
        metrics_json = rec.dumps("metrics", metrics)
        with self.atomic():
            number = self._claim(self.next_checkpoint_version(), version, "checkpoint")
            if parent is not None and self.checkpoint(parent) is None:
                raise RegistryConflict(f"`parent` is {parent}, but no base checkpoint has that version.")
            revision = revision or rec.revision_name(number)
            self._conn.execute("INSERT INTO checkpoints VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                               (number, parent, created, source, repo, revision, digest, metrics_json))
        return Checkpoint(number, parent, created, source, repo, revision, digest, dict(metrics or {}))

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
        return 0 if row[0] is None else row[0] + 1

    def add_adapter_version(self, adapter: str, base_version: int, parent_version: Optional[int],
                            repo: str, revision: Optional[str], digest: str, metrics: Optional[dict],
                            created: float, version: Optional[int] = None) -> AdapterVersion:
        """Record a stored adapter state as version max+1 of ``adapter`` (0 is the fresh LoRA)."""
        created = rec.finite("created", created)
        metrics_json = rec.dumps("metrics", metrics)
        with self.atomic():
            if self.adapter(adapter) is None:
                raise RegistryConflict(f"`adapter` is {adapter!r}, but no adapter has that name.")
            if self.checkpoint(base_version) is None:
                raise RegistryConflict(f"`base_version` is {base_version}, but no base checkpoint has it.")
            number = self._claim(self.next_adapter_version(adapter), version, f"adapter {adapter!r}")
            if parent_version is not None and not 0 <= parent_version < number:
                raise RegistryConflict(
                    f"`parent_version` is {parent_version}; adapter {adapter!r} has versions 0..{number - 1}.")
            revision = revision or rec.revision_name(number)
            self._conn.execute("INSERT INTO adapter_versions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                               (adapter, number, base_version, parent_version, digest, repo, revision,
                                metrics_json, created))
        return AdapterVersion(adapter, number, base_version, parent_version, digest, repo, revision,
                              dict(metrics or {}), created)

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
                               updated: float, replaced_split: Optional[str] = None) -> AdapterVersion:
        """Replace a version's held-out losses after the held-out set changed (split id ``split``).

        The gate compares pushes with the latest version's ``metrics["heldout"]``, so those losses
        must come from the held-out set the hub evaluates on now. The replaced losses stay in
        ``metrics["heldout-replaced"]`` with the split they were measured on (their recorded
        ``heldout-split``, else ``replaced_split``): nothing is lost.
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
        return replace(old, metrics=metrics)

    def _claim(self, next_number: int, wanted: Optional[int], what: str) -> int:
        if wanted is not None and wanted != next_number:
            raise RegistryConflict(f"`version` is {wanted}, but the next version of {what} is {next_number}.")
        return next_number

    # -- leases ---------------------------------------------------------------------------------
    def save_lease(self, lease: Lease) -> None:
        """Insert or update a lease (its token is the key); its holder gets a pseudonym on the way.

        Fields fixed at issue (adapter, holder, versions, issued) never change, and an ended lease
        never changes again. The database refuses a second active lease on one adapter or one holder.
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
                    "INSERT INTO leases VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(token) DO UPDATE "
                    "SET deadline = excluded.deadline, state = excluded.state, ended = excluded.ended, "
                    "outcome = excluded.outcome",
                    (lease.token, lease.adapter, lease.holder, lease.base_version, lease.adapter_version,
                     rec.finite("issued", lease.issued), rec.finite("deadline", lease.deadline),
                     lease.state, lease.ended, lease.outcome))
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
        for column in ("adapter", "holder"):
            row = self._one(f"SELECT token FROM leases WHERE state = 'active' AND {column} = ? AND token <> ?",
                            (getattr(lease, column), lease.token))
            if row is not None and lease.state == "active":
                return RegistryConflict(f"lease {lease.token}: {column} {getattr(lease, column)!r} already has "
                                        f"active lease {row[0]}; one active lease per {column}.")
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

    def latest_lease_tokens(self) -> dict[str, int]:
        """adapter -> the newest fencing token issued for it: what fencing needs of ended leases."""
        return {r[0]: int(r[1]) for r in self._all("SELECT adapter, MAX(token) FROM leases GROUP BY adapter")}

    def max_lease_token(self) -> int:
        """The largest fencing token ever issued (0 before the first lease): the next is above it."""
        row = self._one("SELECT MAX(token) FROM leases")
        return 0 if row[0] is None else int(row[0])

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
                         decision: str, reason: str = "", adapter_version: Optional[int] = None) -> int:
        """Record one returned adapter and the decision on it; returns its id. Never deleted."""
        if decision not in rec.DECISIONS:
            raise ValueError(f"`decision` is {decision!r}; allowed: {', '.join(rec.DECISIONS)}.")
        params = (pseudonym, adapter, lease_token, rec.finite("received", received), digest,
                  rec.dumps("validation", validation), rec.dumps("evaluation", evaluation), decision,
                  reason or "", adapter_version)
        with self.atomic():
            try:
                cur = self._conn.execute(
                    "INSERT INTO contributions (pseudonym, adapter, lease_token, received, digest, validation, "
                    "evaluation, decision, reason, adapter_version) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", params)
            except sqlite3.IntegrityError as err:
                raise self._contribution_conflict(params, err) from err
            return int(cur.lastrowid)

    def _contribution_conflict(self, params: tuple, err: sqlite3.IntegrityError) -> Exception:
        pseudonym, adapter, token, *_, version = params
        checks = [
            ("pseudonym", pseudonym, "SELECT 1 FROM contributors WHERE pseudonym = ?", (pseudonym,)),
            ("adapter", adapter, "SELECT 1 FROM adapters WHERE name = ?", (adapter,)),
            ("lease_token", token, "SELECT 1 FROM leases WHERE token = ?", (token,)),
            ("adapter_version", version, "SELECT 1 FROM adapter_versions WHERE adapter = ? AND version = ?",
             (adapter, version)),
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

    def contribution_counts(self) -> dict[str, int]:
        """``{"accepted": n, "rejected": m}`` (both keys always present)."""
        counts = dict.fromkeys(rec.DECISIONS, 0)
        for row in self._all("SELECT decision, COUNT(*) FROM contributions GROUP BY decision"):
            counts[row[0]] = row[1]
        return counts

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


def _lease_from(row: sqlite3.Row) -> Lease:
    return Lease(token=row["token"], adapter=row["adapter"], holder=row["holder"],
                 base_version=row["base_version"], adapter_version=row["adapter_version"],
                 issued=row["issued"], deadline=row["deadline"], state=row["state"], ended=row["ended"],
                 outcome=row["outcome"])


__all__ = ["Registry", "Adapter", "AdapterVersion", "Checkpoint", "Contribution", "Lease"]

