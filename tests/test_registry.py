"""The registry: integer versions, one active lease per adapter and per node (enforced by SQLite
itself), pseudonymous contributions, nested transactions, read-only readers, schema versions, and a
writer killed with SIGKILL mid-run."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap

import pytest

from fedem_flwr.errors import HubError, HubNotFound, RegistryConflict, SchemaTooNew
from fedem_flwr.hub.pseudonym import pseudonym_of
from fedem_flwr.hub.records import Lease
from fedem_flwr.hub.registry import Registry
from fedem_flwr.hub.schema import SCHEMA_VERSION

T0 = 1_700_000_000.0


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "hub" / "registry.sqlite"


def seeded(registry: Registry, adapters=("hi", "te")) -> Registry:
    registry.add_checkpoint(None, "init", "fedem/base", None, "d-base0", {}, T0)
    for name in adapters:
        registry.add_adapter(name, [name], "lm", {"r": 8}, T0)
        registry.add_adapter_version(name, 0, None, f"fedem/adapter-{name}", None, f"d-{name}0", {}, T0)
    return registry


def lease(token, adapter="hi", holder="node:1", **kw) -> Lease:
    return Lease(token, adapter, holder, 0, 0, T0 + token, T0 + token + 10800, **kw)


def test_checkpoint_versions_start_at_zero_and_increase(fresh_db):
    # Execute
    seed = fresh_db.add_checkpoint(None, "init", "fedem/base", None, "d0", {"loss": 5.5}, T0)
    merged = fresh_db.add_checkpoint(0, "merge", "fedem/base", None, "d1", {}, T0 + 1)
    cpt = fresh_db.add_checkpoint(1, "cpt", "fedem/base", "v2", "d2", {}, T0 + 2, version=2)
    # Assert
    assert (seed.version, merged.version, cpt.version) == (0, 1, 2)
    assert [c.revision for c in fresh_db.checkpoints()] == ["v0", "v1", "v2"]
    assert fresh_db.latest_checkpoint() == cpt
    assert fresh_db.checkpoint(0).metrics == {"loss": 5.5}


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"parent": 7}, "`parent` is 7"),
        ({"version": 5}, "`version` is 5, but the next version of checkpoint is 1"),
    ],
)
def test_checkpoint_conflicts_name_the_key(fresh_db, kwargs, named):
    fresh_db.add_checkpoint(None, "init", "fedem/base", None, "d0", {}, T0)
    args = {"parent": 0, "source": "merge", "repo": "fedem/base", "revision": None, "digest": "d1",
            "metrics": {}, "created": T0} | kwargs
    with pytest.raises(RegistryConflict, match=re.escape(named)):
        fresh_db.add_checkpoint(**args)
    assert len(fresh_db.checkpoints()) == 1


def test_bad_values_are_refused_before_writing(fresh_db):
    with pytest.raises(ValueError, match="`source` is 'magic'"):
        fresh_db.add_checkpoint(None, "magic", "r", None, "d", {}, T0)
    with pytest.raises(ValueError, match="`metrics` cannot be stored as JSON"):
        fresh_db.add_checkpoint(None, "init", "r", None, "d", {"loss": float("nan")}, T0)
    with pytest.raises(ValueError, match="`created` is inf"):
        fresh_db.add_checkpoint(None, "init", "r", None, "d", {}, float("inf"))
    assert fresh_db.checkpoints() == []


def test_adapter_versions_count_per_adapter(fresh_db):
    # Prepare
    seeded(fresh_db)
    # Execute
    hi1 = fresh_db.add_adapter_version("hi", 0, 0, "fedem/adapter-hi", None, "d-hi1", {"loss": 2.0}, T0 + 5)
    hi2 = fresh_db.add_adapter_version("hi", 0, 1, "fedem/adapter-hi", None, "d-hi2", {}, T0 + 6)
    # Assert
    assert (hi1.version, hi2.version, hi2.revision) == (1, 2, "v2")
    assert fresh_db.latest_adapter_version("te").version == 0
    assert {k: v.version for k, v in fresh_db.latest_adapter_versions().items()} == {"hi": 2, "te": 0}
    assert [v.version for v in fresh_db.adapter_versions("hi")] == [0, 1, 2]
    assert len(fresh_db.adapter_versions()) == 4
    assert fresh_db.adapter("hi").languages == ["hi"] and fresh_db.adapter("hi").lora_spec == {"r": 8}


def test_adapter_conflicts(fresh_db):
    seeded(fresh_db)
    with pytest.raises(RegistryConflict, match="an adapter named 'hi' already exists"):
        fresh_db.add_adapter("hi", ["hi"], "lm", {}, T0)
    with pytest.raises(RegistryConflict, match="`adapter` is 'xx'"):
        fresh_db.add_adapter_version("xx", 0, None, "r", None, "d", {}, T0)
    with pytest.raises(RegistryConflict, match="`base_version` is 3"):
        fresh_db.add_adapter_version("hi", 3, 0, "r", None, "d", {}, T0)
    with pytest.raises(RegistryConflict, match="`parent_version` is 1"):
        fresh_db.add_adapter_version("hi", 0, 1, "r", None, "d", {}, T0)


def test_lease_upsert_and_listing(fresh_db):
    # Prepare
    seeded(fresh_db)
    first = lease(1)
    # Execute
    fresh_db.save_lease(first)
    fresh_db.save_lease(lease(2, adapter="te", holder="sim:3"))
    ended = lease(1, state="released", ended=T0 + 60, outcome="accepted")
    fresh_db.save_lease(ended)
    # Assert
    assert fresh_db.lease(1) == ended
    assert [l.token for l in fresh_db.leases(active_only=True)] == [2]
    assert [l.token for l in fresh_db.leases()] == [1, 2]
    assert fresh_db.max_lease_token() == 2
    assert set(fresh_db.identities().values()) == {"node:1", "sim:3"}  # holders get pseudonyms


def test_max_lease_token_is_zero_before_any_lease(fresh_db):
    assert fresh_db.max_lease_token() == 0


@pytest.mark.parametrize(
    ("second", "named"),
    [
        (lease(2, adapter="hi", holder="node:2"), "lane 0 of adapter 'hi' already has active lease 1"),
        (lease(2, adapter="te", holder="node:1"), "holder 'node:1' already has active lease 1"),
    ],
)
def test_one_active_lease_per_adapter_and_per_holder(fresh_db, second, named):
    seeded(fresh_db)
    fresh_db.save_lease(lease(1))
    with pytest.raises(RegistryConflict, match=re.escape(named)):
        fresh_db.save_lease(second)
    assert fresh_db.lease(2) is None


def test_the_database_itself_refuses_a_second_active_lease(fresh_db):
    # Prepare: bypass the Python checks and write SQL directly
    seeded(fresh_db)
    fresh_db.save_lease(lease(1))
    sql = "INSERT INTO leases VALUES (?, ?, ?, 0, 0, ?, ?, 'active', NULL, NULL, ?)"
    # Execute / Assert
    with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):  # the same lane of one adapter
        fresh_db._conn.execute(sql, (2, "hi", "node:9", T0, T0 + 1, 0))
    with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):  # one node, two adapters
        fresh_db._conn.execute(sql, (3, "te", "node:1", T0, T0 + 1, 0))
    with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):  # one node, two lanes of one adapter
        fresh_db._conn.execute(sql, (5, "hi", "node:1", T0, T0 + 1, 1))
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
        fresh_db._conn.execute(sql, (6, "hi", "node:9", T0, T0 + 1, -1))
    fresh_db._conn.execute(sql, (7, "hi", "node:8", T0, T0 + 1, 1))  # another lane of the same adapter
    fresh_db.save_lease(lease(1, state="expired", ended=T0 + 10800, outcome="expired"))
    fresh_db._conn.execute(sql, (4, "hi", "node:9", T0, T0 + 1, 0))  # a new lease after the old one ended


def test_ended_lease_never_changes_and_issue_fields_are_fixed(fresh_db):
    seeded(fresh_db)
    fresh_db.save_lease(lease(1))
    with pytest.raises(RegistryConflict, match="issued with other holder"):
        fresh_db.save_lease(lease(1, holder="node:2"))
    fresh_db.save_lease(lease(1, state="expired", ended=T0 + 5, outcome="expired"))
    fresh_db.save_lease(lease(1, state="expired", ended=T0 + 5, outcome="expired"))  # idempotent
    with pytest.raises(RegistryConflict, match="lease 1 already ended"):
        fresh_db.save_lease(lease(1))
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):  # released without an end time
        fresh_db._conn.execute("UPDATE leases SET state = 'released', ended = NULL WHERE token = 1")


def test_pseudonyms_are_keyed_stable_and_registered(fresh_db):
    # Execute
    alias = fresh_db.pseudonym("pk:ab12")
    # Assert
    assert re.fullmatch(r"c-[0-9a-f]{12}", alias)
    assert fresh_db.pseudonym("pk:ab12") == alias == pseudonym_of("pk:ab12", b"k" * 32)
    assert pseudonym_of("pk:ab12", b"j" * 32) != alias
    assert fresh_db.identities() == {alias: "pk:ab12"}
    with pytest.raises(ValueError, match="`identity`"):
        fresh_db.pseudonym("")


def test_contributions_carry_only_the_pseudonym(fresh_db):
    # Prepare
    seeded(fresh_db)
    fresh_db.save_lease(lease(1, holder="node:77"))
    alias = fresh_db.pseudonym("node:77")
    # Execute
    with fresh_db.atomic():
        version = fresh_db.add_adapter_version("hi", 0, 0, "fedem/adapter-hi", None, "d-hi1", {}, T0 + 9)
        fresh_db.save_lease(lease(1, holder="node:77", state="released", ended=T0 + 9, outcome="accepted"))
        accepted = fresh_db.add_contribution(alias, "hi", 1, T0 + 9, "d-hi1", {"ok": True}, {"own": -0.1},
                                             "accepted", "own languages improved", version.version)
    rejected = fresh_db.add_contribution(alias, "hi", None, T0 + 10, "d-x", {"ok": False}, {}, "rejected",
                                         "non-finite values")
    # Assert
    assert [c.id for c in fresh_db.contributions()] == [rejected, accepted]  # newest first
    assert [c.id for c in fresh_db.contributions(limit=1)] == [rejected]
    assert fresh_db.contributions(adapter="te") == []
    assert fresh_db.contribution_counts() == {"accepted": 1, "rejected": 1}
    rows = fresh_db._conn.execute("SELECT * FROM contributions").fetchall()
    assert not any("node:77" in str(value) for row in rows for value in tuple(row))


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"pseudonym": "c-000000000000"}, "`pseudonym` is 'c-000000000000'"),
        ({"adapter": "xx"}, "`adapter` is 'xx'"),
        ({"lease_token": 42}, "`lease_token` is 42"),
        ({"adapter_version": 9}, "`adapter_version` is 9"),
    ],
)
def test_contribution_references_must_exist(fresh_db, change, named):
    seeded(fresh_db)
    args = {"pseudonym": fresh_db.pseudonym("node:1"), "adapter": "hi", "lease_token": None, "received": T0,
            "digest": "d", "validation": {}, "evaluation": {}, "decision": "rejected", "reason": "x"} | change
    with pytest.raises(RegistryConflict, match=re.escape(named)):
        fresh_db.add_contribution(**args)
    with pytest.raises(ValueError, match="`decision` is 'maybe'"):
        fresh_db.add_contribution(**(args | {"decision": "maybe"}))
    assert fresh_db.contribution_counts() == {"accepted": 0, "rejected": 0}


def test_nested_atomic_rolls_back_only_the_savepoint(fresh_db):
    # Execute
    with fresh_db.atomic():
        fresh_db.add_checkpoint(None, "init", "fedem/base", None, "d0", {}, T0)
        with pytest.raises(RuntimeError):
            with fresh_db.atomic():
                fresh_db.add_adapter("hi", ["hi"], "lm", {}, T0)
                raise RuntimeError("boom")
        fresh_db.add_adapter("te", ["te"], "lm", {}, T0)
    with pytest.raises(RuntimeError):
        with fresh_db.atomic():
            fresh_db.add_adapter("ta", ["ta"], "lm", {}, T0)
            raise RuntimeError("boom")
    # Assert
    assert [c.version for c in fresh_db.checkpoints()] == [0]
    assert [a.name for a in fresh_db.adapters()] == ["te"]


def test_file_registry_persists_in_wal_mode_with_a_private_secret(db_path):
    # Prepare
    with Registry.open(db_path) as registry:
        seeded(registry)
        alias = registry.pseudonym("sim:4")
        mode = registry._conn.execute("PRAGMA journal_mode").fetchone()[0]
    # Execute
    with Registry.open(db_path.parent) as again:  # a hub folder works too
        # Assert
        assert mode == "wal"
        assert again.pseudonym("sim:4") == alias
        assert [a.name for a in again.adapters()] == ["hi", "te"]
        migrations = [tuple(r) for r in again._conn.execute("SELECT version, name FROM migrations")]
        assert migrations == [(1, "initial"), (2, "settings"), (3, "lineage"), (4, "lanes"), (5, "retention"),
                              (6, "peers")]
    assert stat.S_IMODE(os.stat(db_path.parent / "secret").st_mode) == 0o600
    secret = bytes.fromhex((db_path.parent / "secret").read_text().strip())
    assert pseudonym_of("sim:4", secret) == alias


def test_reader_never_blocks_and_sees_the_last_commit(db_path):
    # Prepare
    writer = seeded(Registry.open(db_path))
    reader = Registry.open(db_path, readonly=True)
    # Execute: the writer holds an open write transaction
    with writer.atomic():
        writer.add_adapter("ta", ["ta"], "lm", {}, T0)
        seen_during = [a.name for a in reader.adapters()]
    seen_after = [a.name for a in reader.adapters()]
    # Assert
    assert seen_during == ["hi", "te"]
    assert seen_after == ["hi", "ta", "te"]
    with pytest.raises(HubError, match="read-only"):
        reader.add_adapter("xx", [], "", {}, T0)
    reader.close()
    writer.close()


def test_readonly_open_of_a_missing_registry(tmp_path):
    with pytest.raises(HubNotFound, match="no registry at"):
        Registry.open(tmp_path / "nothing" / "registry.sqlite", readonly=True)


@pytest.mark.parametrize("readonly", [False, True])
def test_newer_schema_is_refused_naming_both_versions(db_path, readonly):
    # Prepare
    Registry.open(db_path).close()
    with sqlite3.connect(db_path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    # Execute / Assert
    with pytest.raises(SchemaTooNew, match=f"schema version {SCHEMA_VERSION + 5}.*up to {SCHEMA_VERSION}"):
        Registry.open(db_path, readonly=readonly)


def test_not_a_database_is_a_clear_error(db_path):
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(HubError, match="cannot open the registry"):
        Registry.open(db_path)


WRITER = textwrap.dedent("""
    import sys, time
    from fedem_flwr.hub.registry import Registry
    from fedem_flwr.hub.records import Lease
    reg = Registry.open(sys.argv[1])
    reg.add_checkpoint(None, "init", "fedem/base", None, "d0", {}, 0.0)
    for name in ("a", "b"):
        reg.add_adapter(name, [name], "lm", {}, 0.0)
        reg.add_adapter_version(name, 0, None, "fedem/adapter-" + name, None, "d", {}, 0.0)
    alias = reg.pseudonym("node:1")
    token = 0
    while True:
        token += 1
        name = "ab"[token % 2]
        with reg.atomic():
            issued = Lease(token, name, "node:1", 0, 0, float(token), token + 10.0)
            reg.save_lease(issued)
            if token == 60:  # stop inside a transaction: the kill lands there
                print("inside", flush=True)
                time.sleep(30)
            version = reg.add_adapter_version(name, 0, None, "fedem/adapter-" + name, None, "d", {}, 1.0)
            reg.save_lease(Lease(token, name, "node:1", 0, 0, float(token), token + 10.0, "released",
                                 token + 1.0, "accepted"))
            reg.add_contribution(alias, name, token, 1.0, "d" * 64, {"ok": True}, {"x": [0.5] * 50},
                                 "accepted", "ok", version.version)
        print(token, flush=True)
""")


@pytest.mark.slow  # starts a process
def test_sigkill_mid_run_leaves_whole_transactions_only(db_path):
    # Prepare
    db_path.parent.mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(db_path)], stdout=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:  # 59 transactions commit, then the 60th waits half-written
            if line.strip() == "inside":
                break
        # Execute
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    # Assert: every transaction is whole (lease ended + version + contribution), or absent
    with Registry.open(db_path) as registry:
        assert registry.integrity_problems() == []
        leases = registry.leases()
        contributions = registry.contributions()
        versions = [v for v in registry.adapter_versions() if v.version > 0]
        assert len(leases) == 59
        assert len(leases) == len(contributions) == len(versions)
        assert registry.leases(active_only=True) == []
        assert all(l.state == "released" and l.ended is not None for l in leases)
        assert sorted(c.lease_token for c in contributions) == [l.token for l in leases]
        assert json.loads(json.dumps(contributions[0].evaluation)) == {"x": [0.5] * 50}


def test_last_leased_is_the_latest_issue_time_per_adapter(fresh_db):
    fresh_db.add_checkpoint(None, "init", "o/base", None, "d", {}, 1.0)
    for name in ("hi", "ta"):
        fresh_db.add_adapter(name, [name], "causal-lm", {}, 1.0)
    assert fresh_db.last_leased() == {}
    fresh_db.save_lease(Lease(1, "hi", "sim:0", 0, 0, 10.0, 20.0, "released", 12.0, "accepted"))
    fresh_db.save_lease(Lease(2, "hi", "sim:1", 0, 1, 30.0, 40.0))
    fresh_db.save_lease(Lease(3, "ta", "sim:0", 0, 0, 15.0, 25.0))
    assert fresh_db.last_leased() == {"hi": 30.0, "ta": 15.0}


def test_settings_are_recorded_replaced_and_survive_reopening(db_path):
    with Registry.open(db_path) as registry:
        assert registry.setting("store") is None
        registry.put_setting("store", {"kind": "local", "repo_prefix": "fedem"}, updated=T0)
        registry.put_setting("store", {"kind": "hf", "repo_prefix": "org/seshu"}, updated=T0 + 1)
    with Registry.open(db_path, readonly=True) as registry:
        assert registry.setting("store") == {"kind": "hf", "repo_prefix": "org/seshu"}
        assert registry.settings() == {"store": {"kind": "hf", "repo_prefix": "org/seshu"}}


def test_a_setting_that_is_not_json_is_refused(fresh_db):
    with pytest.raises(ValueError, match="setting split"):
        fresh_db.put_setting("split", {"fraction": float("nan")})
    assert fresh_db.settings() == {}
