"""Registry schema as versioned migrations, recorded in a ``migrations`` table and ``user_version``.

Times are epoch seconds (REAL, from the caller's clock); versions are integers; JSON columns are
TEXT checked with ``json_valid``. Partial unique indexes make the database itself refuse a second
active lease on one lane of an adapter, or on one node. Contributions carry only a pseudonym; identities stay
in ``contributors``. Migration 3 records the lineage of base versions: held-out losses per
(adapter version, base version) in ``evaluations``, each adapter version's ``kind``, the adapters a
merge absorbed (``merge_absorbed``), attempts that were not published (``base_attempts``), and the
bases a contribution was trained and judged on. Migration 4 gives each lease its lane (``relay.lanes``).
Migration 5 records retention (a version's ``pruned`` time: its row stays, its local files went),
``publications`` (what ``fedem publish`` pushed, to which target) and ``floors`` (the least next value
of a counter: ``checkpoint``, ``lease``, ``contribution``, ``adapter:<name>``; a restore raises them).
Migration 6 records peer judging: each peer asked to judge a push (``peer_reports``) and each peer's
standing (``peer_standing``: how many of its checked reports agreed).

A migration is appended, never edited: a registry records which ones it has applied, and a
registry from a newer fedem-flwr is refused rather than guessed at.
"""

from __future__ import annotations

import sqlite3
from typing import NamedTuple

from fedem_flwr.errors import HubError, SchemaTooNew


class Migration(NamedTuple):
    version: int
    name: str
    sql: str


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "initial", """
CREATE TABLE checkpoints (
    version   INTEGER PRIMARY KEY CHECK (version >= 0),
    parent    INTEGER REFERENCES checkpoints(version),
    created   REAL NOT NULL,
    source    TEXT NOT NULL CHECK (source IN ('init', 'merge', 'cpt')),
    repo      TEXT NOT NULL,
    revision  TEXT NOT NULL,
    digest    TEXT NOT NULL,
    metrics   TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(metrics))
);
CREATE TABLE adapters (
    name       TEXT PRIMARY KEY CHECK (name <> ''),
    languages  TEXT NOT NULL DEFAULT '[]' CHECK (json_valid(languages)),
    task       TEXT NOT NULL DEFAULT '',
    lora_spec  TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(lora_spec)),
    created    REAL NOT NULL
);
CREATE TABLE adapter_versions (
    adapter         TEXT NOT NULL REFERENCES adapters(name),
    version         INTEGER NOT NULL CHECK (version >= 0),
    base_version    INTEGER NOT NULL REFERENCES checkpoints(version),
    parent_version  INTEGER,
    digest          TEXT NOT NULL,
    repo            TEXT NOT NULL,
    revision        TEXT NOT NULL,
    metrics         TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(metrics)),
    created         REAL NOT NULL,
    PRIMARY KEY (adapter, version),
    CHECK (parent_version IS NULL OR parent_version < version)
);
CREATE TABLE leases (
    token            INTEGER PRIMARY KEY CHECK (token >= 0),
    adapter          TEXT NOT NULL REFERENCES adapters(name),
    holder           TEXT NOT NULL CHECK (holder <> ''),
    base_version     INTEGER NOT NULL,
    adapter_version  INTEGER NOT NULL,
    issued           REAL NOT NULL,
    deadline         REAL NOT NULL,
    state            TEXT NOT NULL CHECK (state IN ('active', 'released', 'expired')),
    ended            REAL,
    outcome          TEXT,
    CHECK ((state = 'active') = (ended IS NULL))
);
CREATE UNIQUE INDEX leases_one_active_per_adapter ON leases(adapter) WHERE state = 'active';
CREATE UNIQUE INDEX leases_one_active_per_holder ON leases(holder) WHERE state = 'active';
CREATE TABLE contributors (
    identity    TEXT PRIMARY KEY CHECK (identity <> ''),
    pseudonym   TEXT NOT NULL UNIQUE,
    first_seen  REAL NOT NULL
);
CREATE TABLE contributions (
    id               INTEGER PRIMARY KEY,
    pseudonym        TEXT NOT NULL REFERENCES contributors(pseudonym),
    adapter          TEXT NOT NULL REFERENCES adapters(name),
    lease_token      INTEGER REFERENCES leases(token),
    received         REAL NOT NULL,
    digest           TEXT NOT NULL,
    validation       TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(validation)),
    evaluation       TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(evaluation)),
    decision         TEXT NOT NULL CHECK (decision IN ('accepted', 'rejected')),
    reason           TEXT NOT NULL DEFAULT '',
    adapter_version  INTEGER,
    FOREIGN KEY (adapter, adapter_version) REFERENCES adapter_versions(adapter, version)
);
CREATE INDEX contributions_adapter ON contributions(adapter);
CREATE INDEX contributions_pseudonym ON contributions(pseudonym);
CREATE INDEX contributions_decision ON contributions(decision);
CREATE INDEX leases_state ON leases(state);
"""),
    Migration(2, "settings", """
CREATE TABLE settings (
    name     TEXT PRIMARY KEY CHECK (name <> ''),
    value    TEXT NOT NULL CHECK (json_valid(value)),
    updated  REAL NOT NULL
);
"""),
    # One lineage of base versions (DESIGN decisions 12, 16, 17). Before it, the base never moved
    # past v0, so every push was trained and judged on the base its lease named, and every held-out
    # loss recorded with a version was measured on that version's own base: the back-fills say so.
    Migration(3, "lineage", """
CREATE TABLE evaluations (
    adapter          TEXT NOT NULL,
    adapter_version  INTEGER NOT NULL,
    base_version     INTEGER NOT NULL REFERENCES checkpoints(version),
    heldout          TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(heldout)),
    created          REAL NOT NULL,
    PRIMARY KEY (adapter, adapter_version, base_version),
    FOREIGN KEY (adapter, adapter_version) REFERENCES adapter_versions(adapter, version)
);
CREATE INDEX evaluations_base ON evaluations(base_version);
INSERT INTO evaluations (adapter, adapter_version, base_version, heldout, created)
    SELECT adapter, version, base_version, json_extract(metrics, '$.heldout'), created FROM adapter_versions
    WHERE json_type(metrics, '$.heldout') = 'object';
ALTER TABLE adapter_versions ADD COLUMN kind TEXT NOT NULL DEFAULT 'push'
    CHECK (kind IN ('fresh', 'push', 'rebase'));
UPDATE adapter_versions SET kind = 'fresh' WHERE version = 0;
CREATE TABLE merge_absorbed (
    base_version     INTEGER NOT NULL REFERENCES checkpoints(version),
    adapter          TEXT NOT NULL,
    adapter_version  INTEGER NOT NULL,
    weight           REAL NOT NULL,
    method           TEXT NOT NULL CHECK (method <> ''),
    seed             INTEGER,
    PRIMARY KEY (base_version, adapter),
    FOREIGN KEY (adapter, adapter_version) REFERENCES adapter_versions(adapter, version)
);
CREATE INDEX merge_absorbed_adapter ON merge_absorbed(adapter, adapter_version);
CREATE TABLE base_attempts (
    id       INTEGER PRIMARY KEY,
    created  REAL NOT NULL,
    source   TEXT NOT NULL CHECK (source IN ('merge', 'cpt')),
    parent   INTEGER REFERENCES checkpoints(version),
    reason   TEXT NOT NULL CHECK (reason <> ''),
    details  TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(details))
);
ALTER TABLE contributions ADD COLUMN base_version INTEGER REFERENCES checkpoints(version);
ALTER TABLE contributions ADD COLUMN judged_base_version INTEGER REFERENCES checkpoints(version);
UPDATE contributions SET
    base_version = (SELECT l.base_version FROM leases l WHERE l.token = contributions.lease_token),
    judged_base_version = (SELECT l.base_version FROM leases l WHERE l.token = contributions.lease_token)
    WHERE lease_token IS NOT NULL;
CREATE INDEX contributions_judged_base ON contributions(judged_base_version, decision);
"""),
    # Lanes (DESIGN decision 20): up to `relay.lanes` active leases per adapter, one per lane. Every
    # lease issued before held lane 0, the only one there was.
    Migration(4, "lanes", """
ALTER TABLE leases ADD COLUMN lane INTEGER NOT NULL DEFAULT 0 CHECK (lane >= 0);
DROP INDEX leases_one_active_per_adapter;
CREATE UNIQUE INDEX leases_one_active_per_lane ON leases(adapter, lane) WHERE state = 'active';
"""),
    # A hub that runs for months: retention removes artifacts from the local store but keeps their
    # rows (``pruned``: when), the hub records what it published where (``publications``), and a
    # restored hub keeps its counters past every number the store and the Hub already hold (``floors``).
    Migration(5, "retention", """
ALTER TABLE checkpoints ADD COLUMN pruned REAL;
ALTER TABLE adapter_versions ADD COLUMN pruned REAL;
CREATE TABLE publications (
    repo       TEXT NOT NULL,
    revision   TEXT NOT NULL,
    digest     TEXT NOT NULL,
    target     TEXT NOT NULL CHECK (target <> ''),
    published  REAL NOT NULL,
    PRIMARY KEY (repo, revision, target)
);
CREATE TABLE floors (
    counter  TEXT PRIMARY KEY CHECK (counter <> ''),
    next     INTEGER NOT NULL CHECK (next >= 0),
    updated  REAL NOT NULL
);
"""),
    # Peer judging (`gate.peers`): other contributors evaluate a push blind on their own held-out rows.
    # Each ask is a ``peer_reports`` row, keyed by the push's lease token (its contribution carries the
    # same), with both pseudonyms so asks rotate by (peer, pusher) pair; ``outcome`` is ``counted``,
    # ``failed: <why>``, ``late``, ``unanswered`` or ``ignored: <why>``; ``report`` holds the peer's
    # tokens and losses per language, its delta (candidate minus parent) and weight. ``peer_standing``
    # counts how often each peer's checked reports agreed with the decision, which weighs the next ones.
    Migration(6, "peers", """
CREATE TABLE peer_reports (
    id           INTEGER PRIMARY KEY,
    lease_token  INTEGER NOT NULL,
    peer         TEXT NOT NULL CHECK (peer <> ''),
    pusher       TEXT NOT NULL CHECK (pusher <> ''),
    asked        REAL NOT NULL,
    answered     REAL,
    outcome      TEXT NOT NULL CHECK (outcome <> ''),
    report       TEXT CHECK (report IS NULL OR json_valid(report))
);
CREATE INDEX peer_reports_lease ON peer_reports(lease_token);
CREATE INDEX peer_reports_pair ON peer_reports(peer, pusher);
CREATE TABLE peer_standing (
    peer       TEXT PRIMARY KEY CHECK (peer <> ''),
    agreed     INTEGER NOT NULL DEFAULT 0 CHECK (agreed >= 0),
    disagreed  INTEGER NOT NULL DEFAULT 0 CHECK (disagreed >= 0),
    updated    REAL NOT NULL
);
"""),
)

SCHEMA_VERSION = MIGRATIONS[-1].version


def schema_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def check_version(conn: sqlite3.Connection, where: str, readonly: bool) -> int:
    """Refuse a newer schema; a reader also refuses an older one (it cannot migrate)."""
    found = schema_version(conn)
    if found > SCHEMA_VERSION:
        raise SchemaTooNew(
            f"the registry {where} has schema version {found}, but this fedem-flwr knows versions up "
            f"to {SCHEMA_VERSION}; upgrade fedem-flwr to open it."
        )
    if readonly and found < SCHEMA_VERSION:
        raise HubError(
            f"the registry {where} has schema version {found} and this fedem-flwr needs "
            f"{SCHEMA_VERSION}; start the hub's writer once to migrate it, then read it."
        )
    return found


def migrate(conn: sqlite3.Connection, where: str, now: float) -> list[int]:
    """Apply the pending migrations in one transaction; return the versions applied.

    All or none: a reader (``fedem status`` while the hub starts) sees the old schema or the newest,
    never one in between, and a crash mid-upgrade leaves the old one. ``conn`` must be in autocommit
    mode (``isolation_level=None``). ``BEGIN IMMEDIATE`` takes the write lock before the version is
    read again, so two processes cannot apply one migration twice.
    """
    if check_version(conn, where, readonly=False) >= SCHEMA_VERSION:
        return []
    applied = []
    conn.execute("BEGIN IMMEDIATE")
    try:
        current = check_version(conn, where, readonly=False)
        for migration in MIGRATIONS:
            if migration.version <= current:
                continue
            if migration.version != current + 1:
                raise HubError(f"registry {where}: migration {migration.version} follows {current}.")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS migrations "
                "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied REAL NOT NULL)"
            )
            for statement in _statements(migration.sql):
                conn.execute(statement)
            conn.execute("INSERT INTO migrations VALUES (?, ?, ?)", (migration.version, migration.name, now))
            conn.execute(f"PRAGMA user_version = {int(migration.version)}")
            applied.append(migration.version)
            current = migration.version
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return applied


def _statements(sql: str) -> list[str]:
    # executescript() would COMMIT first; run statement by statement inside our transaction.
    return [s.strip() for s in sql.split(";") if s.strip()]
