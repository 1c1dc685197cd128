"""The registry's connection: opening (WAL, migrations, read-only URIs) and transactions.

Readers open with a ``mode=ro`` URI and never take a write lock; in WAL mode they see the last commit
while the writer works. ``atomic()`` is ``BEGIN IMMEDIATE`` (the write lock is taken up front, so a
transaction never fails halfway on a busy upgrade) and becomes a savepoint when nested.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, TypeVar, Union
from urllib.parse import quote

from fedem_flwr.errors import HubError, HubNotFound
from fedem_flwr.hub.paths import registry_path, secret_path
from fedem_flwr.hub.pseudonym import load_or_create_secret
from fedem_flwr.hub.schema import check_version, migrate

D = TypeVar("D", bound="Database")


class Database:
    """One SQLite connection; use :meth:`open` or :meth:`memory`, not the constructor."""

    def __init__(self, conn: sqlite3.Connection, where: str, readonly: bool,
                 secret_file: Optional[Path] = None, secret: Optional[bytes] = None) -> None:
        conn.row_factory = sqlite3.Row
        self._conn = conn
        self.where = where
        self.readonly = readonly
        self._secret_file = secret_file
        self._secret = secret
        self._lock = threading.RLock()  # one connection, shared by the app's threads
        self._depth = 0

    # -- opening --------------------------------------------------------------------------------
    @classmethod
    def open(cls: type[D], path: Union[str, os.PathLike], readonly: bool = False, durable: bool = True,
             secret: Optional[bytes] = None) -> D:
        """Open (a writer creates and migrates) ``path``: the sqlite file, or a hub folder holding it
        (a folder, or a path without a file suffix).

        ``readonly`` opens with a ``mode=ro`` URI and never takes a write lock. ``durable=False``
        trades the fsync of each commit (``synchronous=NORMAL``) for speed: still crash-consistent,
        but the last commits can be lost on power failure.
        """
        path = Path(path)
        if path.is_dir() or (not path.exists() and not path.suffix):  # a hub folder, existing or to be
            path = registry_path(path)
        where = repr(str(path))
        if readonly:
            if not path.is_file():
                raise HubNotFound(f"no registry at {where}; pass --hub DIR or set FEDEM_HUB.")
            conn = sqlite3.connect(f"file:{quote(str(path.absolute()))}?mode=ro", uri=True,
                                   isolation_level=None, check_same_thread=False, timeout=10.0)
        else:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=10.0)
        try:
            conn.execute("PRAGMA busy_timeout = 10000")
            if readonly:
                check_version(conn, where, readonly=True)
            else:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
                conn.execute("PRAGMA foreign_keys = ON")
                migrate(conn, where, now=time.time())
        except sqlite3.DatabaseError as err:
            conn.close()
            raise HubError(f"cannot open the registry {where}: {err}") from err
        except BaseException:
            conn.close()
            raise
        return cls(conn, where, readonly, secret_file=secret_path(path.parent), secret=secret)

    @classmethod
    def memory(cls: type[D], secret: Optional[bytes] = None) -> D:
        """A fresh in-memory registry (tests, simulations that keep no state)."""
        conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA foreign_keys = ON")
        migrate(conn, "':memory:'", now=time.time())
        return cls(conn, "':memory:'", readonly=False, secret=secret or os.urandom(32))

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self: D) -> D:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions ---------------------------------------------------------------------------
    @contextmanager
    def atomic(self) -> Iterator["Database"]:
        """One transaction (``BEGIN IMMEDIATE``); nested, a savepoint that rolls back alone."""
        if self.readonly:
            raise HubError(f"the registry {self.where} is open read-only; only the hub's writer changes it.")
        with self._lock:
            depth = self._depth
            self._conn.execute("BEGIN IMMEDIATE" if depth == 0 else f"SAVEPOINT sp{depth}")
            self._depth += 1
            try:
                yield self
            except BaseException:
                self._depth = depth
                if depth == 0:
                    self._conn.execute("ROLLBACK")
                else:
                    self._conn.execute(f"ROLLBACK TO sp{depth}")
                    self._conn.execute(f"RELEASE sp{depth}")
                raise
            self._depth = depth
            try:
                self._conn.execute("COMMIT" if depth == 0 else f"RELEASE sp{depth}")
            except BaseException:
                if depth == 0 and self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise

    @contextmanager
    def snapshot(self) -> Iterator["Database"]:
        """Reads inside see one consistent state (a deferred read transaction)."""
        with self._lock:
            if self._depth or self._conn.in_transaction:
                yield self
                return
            self._conn.execute("BEGIN")
            self._depth += 1
            try:
                yield self
            finally:
                self._depth -= 1
                self._conn.execute("COMMIT")

    def _all(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def _one(self, sql: str, params: tuple = ()) -> Optional[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchone()

    def integrity_problems(self) -> list[str]:
        """``PRAGMA integrity_check`` and ``foreign_key_check`` findings; empty when sound."""
        found = [row[0] for row in self._all("PRAGMA integrity_check") if row[0] != "ok"]
        found += [f"{row[0]} row {row[1]} references a missing {row[2]} row"
                  for row in self._all("PRAGMA foreign_key_check")]
        return found

    def _load_secret(self) -> bytes:
        if self._secret is None:
            if self._secret_file is None:
                raise HubError("this registry has no pseudonym secret.")
            if self.readonly and not self._secret_file.exists():
                raise HubError(f"no pseudonym secret at {str(self._secret_file)!r}.")
            self._secret = load_or_create_secret(self._secret_file)
        return self._secret
