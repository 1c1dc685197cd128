"""The registry's lineage records (migration 3): evaluations per (adapter version, base version), version
kinds, merges and the adapters they absorbed, attempts that were not published, the base versions of a
contribution, and a schema-2 registry migrated with its rows back-filled."""

from __future__ import annotations

import re
import sqlite3

import pytest

from fedem_flwr.errors import RegistryConflict
from fedem_flwr.hub import schema
from fedem_flwr.hub.records import Absorbed, BaseAttempt, Evaluation, Lease
from fedem_flwr.hub.registry import Registry

T0 = 1_700_000_000.0


def seeded(registry: Registry, adapters=("hi", "te")) -> Registry:
    registry.add_checkpoint(None, "init", "fedem/base", None, "d-base0", {}, T0)
    for name in adapters:
        registry.add_adapter(name, [name], "lm", {"r": 8}, T0)
        registry.add_adapter_version(name, 0, None, f"fedem/adapter-{name}", None, f"d-{name}0",
                                     {"heldout": {"hi": 5.0, "te": 5.5}}, T0)
    return registry


def accept(registry: Registry, adapter: str, identity: str, at: float, base: int = 0, judged: int = 0,
           kind: str = "push") -> int:
    """An accepted push: a new version of ``adapter`` trained on ``base`` and its contribution."""
    parent = registry.latest_adapter_version(adapter)
    version = registry.add_adapter_version(adapter, judged, parent.version, parent.repo, None, f"d-{at}",
                                           {"heldout": {adapter: 4.0}}, at, kind=kind)
    if kind == "push":
        registry.add_contribution(registry.pseudonym(identity), adapter, None, at, "d", {}, {}, "accepted", "ok",
                                  version.version, base_version=base, judged_base_version=judged)
    return version.version


# -- migrating a schema-2 registry -------------------------------------------------------------
def schema2_registry(path, monkeypatch) -> None:
    """A registry as the previous fedem-flwr left it: migrations 1-2 and rows written with their SQL."""
    monkeypatch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:2])
    monkeypatch.setattr(schema, "SCHEMA_VERSION", 2)
    conn = sqlite3.connect(path, isolation_level=None)
    schema.migrate(conn, "old", now=T0)
    conn.executescript(f"""
        INSERT INTO checkpoints VALUES (0, NULL, {T0}, 'init', 'fedem/base', 'v0', 'd0', '{{}}');
        INSERT INTO adapters VALUES ('hi', '["hi"]', 'lm', '{{}}', {T0});
        INSERT INTO adapter_versions VALUES ('hi', 0, 0, NULL, 'd', 'fedem/adapter-hi', 'v0',
            '{{"heldout": {{"hi": 5.0, "ta": 5.5}}}}', {T0});
        INSERT INTO adapter_versions VALUES ('hi', 1, 0, 0, 'd', 'fedem/adapter-hi', 'v1',
            '{{"heldout": {{"hi": 4.5, "ta": 5.4}}, "train": {{"loss": 4.0}}}}', {T0 + 60});
        INSERT INTO adapter_versions VALUES ('hi', 2, 0, 1, 'd', 'fedem/adapter-hi', 'v2', '{{}}', {T0 + 90});
        INSERT INTO contributors VALUES ('sim:1', 'c-1', {T0});
        INSERT INTO leases VALUES (1, 'hi', 'sim:1', 0, 0, {T0}, {T0 + 100}, 'released', {T0 + 60}, 'accepted');
        INSERT INTO contributions (pseudonym, adapter, lease_token, received, digest, decision, reason,
            adapter_version) VALUES ('c-1', 'hi', 1, {T0 + 60}, 'd', 'accepted', 'ok', 1);
        INSERT INTO contributions (pseudonym, adapter, lease_token, received, digest, decision, reason)
            VALUES ('c-1', 'hi', NULL, {T0 + 70}, 'd', 'rejected', 'stale-token: lease 9 unknown');
    """)
    conn.close()
    monkeypatch.undo()


def test_a_schema_2_registry_is_migrated_and_back_filled(tmp_path, monkeypatch):
    # Prepare
    path = tmp_path / "registry.sqlite"
    schema2_registry(path, monkeypatch)
    # Execute
    with Registry.open(path) as registry:
        # Assert: each version's held-out losses became its evaluation on its own base
        assert registry.evaluations() == [
            Evaluation("hi", 0, 0, {"hi": 5.0, "ta": 5.5}, T0),
            Evaluation("hi", 1, 0, {"hi": 4.5, "ta": 5.4}, T0 + 60),
        ]
        assert registry.parent_losses("hi", 1, 0) == {"hi": 4.5, "ta": 5.4}
        assert registry.parent_losses("hi", 2, 0) is None  # nothing was measured for v2
        assert [v.kind for v in registry.adapter_versions("hi")] == ["fresh", "push", "push"]
        # a push with a lease was trained and judged on its lease's base; one without stays unknown
        assert [(c.base_version, c.judged_base_version) for c in registry.contributions()] == [(None, None), (0, 0)]
        assert registry.accepted_since(0) == 1
        assert registry.absorbed_by_base() == {} and registry.base_attempts() == []
        assert registry.integrity_problems() == []
        assert schema.schema_version(registry._conn) == schema.SCHEMA_VERSION == 6
        assert registry.lease(1).lane == 0  # every lease before lanes held the one lane there was
        assert registry.latest_lease_tokens() == {("hi", 0): 1}


# -- evaluations -------------------------------------------------------------------------------
def test_evaluations_belong_to_an_adapter_version_and_a_base_version(fresh_db):
    # Prepare
    seeded(fresh_db)
    fresh_db.add_checkpoint(0, "cpt", "fedem/base", None, "d-base1", {}, T0 + 10)
    # Execute: hi v0 re-evaluated on base v1, then once more (a changed held-out set)
    fresh_db.put_evaluation("hi", 0, 1, {"hi": 4.9, "te": 5.4}, T0 + 11)
    fresh_db.put_evaluation("hi", 0, 1, {"hi": 4.8, "te": 5.3}, T0 + 12)
    # Assert
    assert fresh_db.parent_losses("hi", 0, 0) == {"hi": 5.0, "te": 5.5}  # from add_adapter_version's metrics
    assert fresh_db.parent_losses("hi", 0, 1) == {"hi": 4.8, "te": 5.3}
    assert fresh_db.evaluation("te", 0, 1) is None
    assert [(e.adapter, e.base_version, e.created) for e in fresh_db.evaluations(base_version=1)] == [("hi", 1, T0 + 12)]
    assert len(fresh_db.evaluations()) == 3


@pytest.mark.parametrize(
    ("args", "error", "named"),
    [
        (("xx", 0, 0, {"hi": 1.0}), RegistryConflict, "adapter 'xx' has no version 0"),
        (("hi", 0, 4, {"hi": 1.0}), RegistryConflict, "`base_version` is 4"),
        (("hi", 0, 0, {"hi": float("nan")}), ValueError, "`heldout` loss of language 'hi' is nan"),
        (("hi", 0, 0, {"hi": None}), ValueError, "`heldout` loss of language 'hi' is None"),
    ],
)
def test_an_evaluation_names_what_is_wrong(fresh_db, args, error, named):
    seeded(fresh_db)
    with pytest.raises(error, match=re.escape(named)):
        fresh_db.put_evaluation(*args, created=T0)


def test_a_re_evaluation_after_a_split_change_is_the_evaluation_the_gate_reads(fresh_db):
    seeded(fresh_db)
    fresh_db.add_checkpoint(0, "merge", "fedem/base", None, "d-base1", {}, T0 + 10)

    fresh_db.update_version_heldout("hi", 0, {"hi": 4.0}, split="s2", updated=T0 + 20)
    fresh_db.update_version_heldout("te", 0, {"te": 4.4}, split="s2", updated=T0 + 20, base_version=1)

    assert fresh_db.parent_losses("hi", 0, 0) == {"hi": 4.0}
    assert fresh_db.parent_losses("te", 0, 0) == {"hi": 5.0, "te": 5.5}
    assert fresh_db.parent_losses("te", 0, 1) == {"te": 4.4}


# -- version kinds -----------------------------------------------------------------------------
def test_version_kinds_fresh_push_rebase(fresh_db):
    seeded(fresh_db, adapters=("hi",))
    fresh_db.add_checkpoint(0, "merge", "fedem/base", None, "d-base1", {}, T0 + 10)

    pushed = fresh_db.add_adapter_version("hi", 0, 0, "fedem/adapter-hi", None, "d1", {}, T0 + 1)
    rebased = fresh_db.add_adapter_version("hi", 1, 1, "fedem/adapter-hi", None, "d2", {}, T0 + 11, kind="rebase")

    assert [v.kind for v in fresh_db.adapter_versions("hi")] == ["fresh", "push", "rebase"]
    assert (pushed.kind, rebased.kind) == ("push", "rebase")
    with pytest.raises(ValueError, match="`kind` is 'merged'"):
        fresh_db.add_adapter_version("hi", 1, 2, "r", None, "d", {}, T0, kind="merged")
    with pytest.raises(RegistryConflict, match="`kind` is 'fresh' for version 3"):
        fresh_db.add_adapter_version("hi", 1, 2, "r", None, "d", {}, T0, kind="fresh")
    fresh_db.add_adapter("ta", ["ta"], "lm", {}, T0)
    with pytest.raises(RegistryConflict, match="`kind` is 'push' for version 0"):
        fresh_db.add_adapter_version("ta", 0, None, "r", None, "d", {}, T0, kind="push")
    assert len(fresh_db.adapter_versions()) == 3


# -- merges and what they absorbed -------------------------------------------------------------
def test_a_merge_records_its_absorbed_adapters_with_the_checkpoint(fresh_db):
    # Prepare
    seeded(fresh_db)
    accept(fresh_db, "hi", "sim:1", T0 + 1)
    # Execute
    merged = fresh_db.add_checkpoint(0, "merge", "fedem/base", None, "d-base1",
                                     {"merge": {"method": "ties_svd", "seed": 7}}, T0 + 5,
                                     absorbed=[("hi", 1, 1.0, "ties_svd", 7), Absorbed("te", 0, 0.5, "ties_svd", 7)])
    # Assert
    assert merged.version == 1
    assert fresh_db.absorbed(1) == [Absorbed("hi", 1, 1.0, "ties_svd", 7), Absorbed("te", 0, 0.5, "ties_svd", 7)]
    assert fresh_db.absorbed(0) == []
    assert fresh_db.absorbed_by_base() == {1: fresh_db.absorbed(1)}
    assert fresh_db.absorbing_base("hi", 1) == 1 and fresh_db.absorbing_base("hi", 0) == 1


@pytest.mark.parametrize(
    ("absorbed", "error", "named"),
    [
        ([("hi", 5, 1.0, "sum", None)], RegistryConflict, "adapter 'hi' v5, which the registry does not know"),
        ([("hi", 0, float("inf"), "sum", None)], ValueError, "weight of 'hi' is inf"),
        ([("hi", 0, 1.0, "", None)], ValueError, "method of 'hi' is ''"),
        ([("hi", 0, 1.0, "sum", 1.5)], ValueError, "seed of 'hi' is 1.5"),
        ([("hi", 0, 1.0, "sum", None), ("hi", 0, 2.0, "sum", None)], ValueError, "adapter(s) ['hi'] more than once"),
    ],
)
def test_a_merge_that_cannot_be_recorded_leaves_neither_checkpoint_nor_absorbed_rows(fresh_db, absorbed, error, named):
    seeded(fresh_db)
    with pytest.raises(error, match=re.escape(named)):
        fresh_db.add_checkpoint(0, "merge", "fedem/base", None, "d1", {}, T0, absorbed=absorbed)
    assert [c.version for c in fresh_db.checkpoints()] == [0]
    assert fresh_db._all("SELECT COUNT(*) FROM merge_absorbed")[0][0] == 0


def test_a_failure_after_the_absorbed_rows_rolls_them_back_too(fresh_db):
    # Prepare: one absorbed row is written before the second one fails inside the transaction
    seeded(fresh_db)
    # Execute
    with pytest.raises(RegistryConflict):
        fresh_db.add_checkpoint(0, "merge", "fedem/base", None, "d1", {}, T0,
                                absorbed=[("hi", 0, 1.0, "sum", None), ("te", 3, 1.0, "sum", None)])
    # Assert
    assert [c.version for c in fresh_db.checkpoints()] == [0]
    assert fresh_db.absorbed(1) == [] and fresh_db.next_checkpoint_version() == 1


def test_only_a_merge_absorbs(fresh_db):
    seeded(fresh_db)
    with pytest.raises(ValueError, match="`source` is 'cpt'; only a merge absorbs"):
        fresh_db.add_checkpoint(0, "cpt", "fedem/base", None, "d1", {}, T0, absorbed=[("hi", 0, 1.0, "sum", None)])


def test_contributors_of_a_version_start_at_its_last_fresh_start(fresh_db):
    # Prepare: hi v1 (sim:1), v2 (sim:2) absorbed by merge v1; rebase v3; v4 (sim:3)
    seeded(fresh_db)
    accept(fresh_db, "hi", "sim:1", T0 + 1)
    accept(fresh_db, "hi", "sim:2", T0 + 2)
    fresh_db.add_checkpoint(0, "merge", "fedem/base", None, "d1", {}, T0 + 3, absorbed=[("hi", 2, 1.0, "sum", None)])
    accept(fresh_db, "hi", "", T0 + 4, judged=1, kind="rebase")
    accept(fresh_db, "hi", "sim:3", T0 + 5, base=1, judged=1)
    alias = {i: fresh_db.pseudonym(f"sim:{i}") for i in (1, 2, 3)}
    # Execute / Assert
    assert fresh_db.contributors_of("hi", 2) == sorted([alias[1], alias[2]])
    assert fresh_db.contributors_of("hi", 1) == [alias[1]]
    assert fresh_db.contributors_of("hi", 3) == []
    assert fresh_db.contributors_of("hi", 4) == [alias[3]]
    assert fresh_db.absorbing_base("hi", 1) == 1 and fresh_db.absorbing_base("hi", 4) is None


# -- attempts that were not published ----------------------------------------------------------
def test_base_attempts_are_recorded_with_their_reason(fresh_db):
    seeded(fresh_db)

    first = fresh_db.add_base_attempt("merge", 0, "merge-gate: te 5.500 -> 5.700 (+0.200) beyond tolerance 0.050",
                                      {"heldout": {"te": 5.7}, "absorbed": ["hi", "te"]}, T0 + 1)
    second = fresh_db.add_base_attempt("cpt", 0, "cpt-error: RuntimeError: out of memory", None, T0 + 2)

    assert first == BaseAttempt(1, T0 + 1, "merge", 0, first.reason, {"heldout": {"te": 5.7}, "absorbed": ["hi", "te"]})
    assert fresh_db.base_attempts() == [first, second]
    assert fresh_db.base_attempts(source="cpt") == [second]
    assert fresh_db.checkpoints()[-1].version == 0


@pytest.mark.parametrize(
    ("args", "error", "named"),
    [
        (("init", 0, "why", {}), ValueError, "`source` is 'init'; allowed: merge, cpt"),
        (("merge", 0, "", {}), ValueError, "`reason` is ''"),
        (("merge", 3, "why", {}), RegistryConflict, "`parent` is 3"),
        (("cpt", 0, "why", {"loss": float("nan")}), ValueError, "`details` cannot be stored as JSON"),
    ],
)
def test_a_bad_attempt_is_refused(fresh_db, args, error, named):
    seeded(fresh_db)
    with pytest.raises(error, match=re.escape(named)):
        fresh_db.add_base_attempt(*args, created=T0)
    assert fresh_db.base_attempts() == []


# -- contributions on a moving base ------------------------------------------------------------
def test_contributions_record_both_base_versions_and_accepted_since_counts_per_judged_base(fresh_db):
    # Prepare
    seeded(fresh_db)
    accept(fresh_db, "hi", "sim:1", T0 + 1)
    accept(fresh_db, "te", "sim:2", T0 + 2)
    fresh_db.add_checkpoint(0, "cpt", "fedem/base", None, "d1", {}, T0 + 3)
    accept(fresh_db, "hi", "sim:1", T0 + 4, base=0, judged=1)  # trained on v0, judged on v1
    fresh_db.add_contribution(fresh_db.pseudonym("sim:2"), "te", None, T0 + 5, "d", {}, {}, "rejected", "worse",
                              base_version=1, judged_base_version=1)
    # Execute / Assert
    assert [(c.base_version, c.judged_base_version) for c in fresh_db.contributions()] == [
        (1, 1), (0, 1), (0, 0), (0, 0)]
    assert (fresh_db.accepted_since(0), fresh_db.accepted_since(1)) == (2, 1)
    assert fresh_db.accepted_since(0, since=T0 + 1) == 1  # since the last merge attempt
    assert fresh_db.accepted_since(2) == 0
    with pytest.raises(RegistryConflict, match="`judged_base_version` is 9"):
        fresh_db.add_contribution(fresh_db.pseudonym("sim:2"), "te", None, T0, "d", {}, {}, "rejected", "x",
                                  judged_base_version=9)


def test_an_old_style_lease_push_still_records(fresh_db):
    """Callers that do not know the base versions yet keep working; the columns stay null."""
    seeded(fresh_db)
    fresh_db.save_lease(Lease(1, "hi", "sim:1", 0, 0, T0, T0 + 10))
    cid = fresh_db.add_contribution(fresh_db.pseudonym("sim:1"), "hi", 1, T0 + 1, "d", {}, {}, "rejected", "x")
    (row,) = fresh_db.contributions()
    assert (row.id, row.base_version, row.judged_base_version) == (cid, None, None)


def test_migrations_apply_all_or_none(tmp_path, monkeypatch):
    # Prepare: a newest migration that fails halfway, as a crash mid-upgrade would.
    broken = schema.Migration(schema.SCHEMA_VERSION + 1, "broken", "CREATE TABLE half (x INTEGER); SELECT nope")
    monkeypatch.setattr(schema, "MIGRATIONS", (*schema.MIGRATIONS, broken))
    monkeypatch.setattr(schema, "SCHEMA_VERSION", broken.version)
    conn = sqlite3.connect(tmp_path / "r.sqlite", isolation_level=None)

    # Execute
    with pytest.raises(sqlite3.OperationalError):
        schema.migrate(conn, "fresh", now=T0)

    # Assert: nothing of any migration is left, so a reader never sees a schema in between.
    assert schema.schema_version(conn) == 0
    assert conn.execute("SELECT name FROM sqlite_master").fetchall() == []
