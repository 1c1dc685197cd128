"""Snapshots (``hub.backup``, ``fedem backup``): the secret's encryption, what a snapshot holds, every kind
of bad snapshot refused before anything is written, and the running hub taking a requested snapshot."""

from __future__ import annotations

import io
import json
import os
import sqlite3
import tarfile
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from fedem_flwr.cli import cli
from fedem_flwr.config.schema import BackupConfig
from fedem_flwr.errors import HubError
from fedem_flwr.hub import backup_request
from fedem_flwr.hub.backup import (
    FORMAT,
    MANIFEST,
    SECRET_MEMBER,
    SnapshotKey,
    decrypt_secret,
    encrypt_secret,
    hub_id_of,
    open_snapshot,
    snapshots_in,
    write_snapshot,
)
from fedem_flwr.hub.backup_request import (
    backup_result,
    pending_backup_requests,
    request_backup,
    run_backups,
    take_backup_requests,
)
from fedem_flwr.hub.merge_request import request_merge
from fedem_flwr.hub.paths import HubWriterLock, optimizer_state_path
from fedem_flwr.hub.records import Lease
from fedem_flwr.hub.registry import Registry
from fedem_flwr.hub.restore import restore_hub
from fedem_flwr.hub.schema import SCHEMA_VERSION

T0 = 1_700_000_000.0
PASS = b"correct horse battery staple"
FAST_N = 2 ** 12  # scrypt cost for keys made here (snapshots record theirs; reading bounds it)


def make_hub(path: Path) -> Path:
    """A hub with base v0, adapter hi v0..v2, two leases, one contribution, CPT and optimizer state and a
    waiting merge request."""
    with Registry.open(path) as registry:
        registry.add_checkpoint(None, "init", "fedem/base", "v0", "d0", {"heldout": {"hi": 5.0}}, T0)
        registry.add_adapter("hi", ["hi"], "causal-lm", {"r": 8}, T0)
        for n in range(3):
            registry.add_adapter_version("hi", 0, n - 1 if n else None, "fedem/adapter-hi", f"v{n}", f"d{n}", {},
                                         T0 + n)
        registry.save_lease(Lease(4, "hi", "sim:0", 0, 1, T0, T0 + 100, "released", T0 + 5, "accepted"))
        registry.save_lease(Lease(7, "hi", "sim:1", 0, 2, T0 + 6, T0 + 106))
        registry.add_contribution(registry.pseudonym("sim:0"), "hi", 4, T0 + 5, "s", {}, {}, "accepted", "ok", 2)
        registry.put_setting("store", {"kind": "local", "repo_prefix": "fedem"}, T0)
    (path / "cpt").mkdir()
    (path / "cpt" / "state.json").write_text('{"step": 12}')
    state = optimizer_state_path(path, "hi", 2)
    state.parent.mkdir(parents=True)
    state.write_bytes(b"optimizer moments of hi v2")
    request_merge(path, T0)
    return path


@pytest.fixture
def hub(tmp_path) -> Path:
    return make_hub(tmp_path / "hub")


@pytest.fixture
def key() -> SnapshotKey:
    return SnapshotKey.new(PASS, n=FAST_N)


def members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {info.name: tar.extractfile(info).read() for info in tar.getmembers()}


def rewrite(path: Path, out: Path, change) -> Path:
    """Copy the snapshot at ``path`` to ``out`` with ``change(name, data) -> data`` applied to each member."""
    with tarfile.open(out, "w") as tar:
        for name, data in members(path).items():
            data = change(name, data)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out


# -- the secret ---------------------------------------------------------------------------------


def test_the_secret_round_trips_through_its_encryption_and_nothing_else_opens_it(key):
    secret_file = b"ab" * 32 + b"\n"

    sealed = encrypt_secret(key, secret_file, "0123456789abcdef")

    assert decrypt_secret(key, sealed, "0123456789abcdef") == secret_file
    assert b"abab" not in sealed and len(sealed) == 12 + len(secret_file) + 16  # nonce, ciphertext, tag
    again = SnapshotKey.derive(PASS, key.kdf())  # the passphrase and the manifest's record derive it again
    assert again.master == key.master and decrypt_secret(again, sealed, "0123456789abcdef") == secret_file
    with pytest.raises(HubError, match="does not decrypt with this passphrase"):
        decrypt_secret(SnapshotKey.derive(b"wrong", key.kdf()), sealed, "0123456789abcdef")
    with pytest.raises(HubError, match="does not decrypt"):  # bound to its hub: another hub id fails
        decrypt_secret(key, sealed, "fedcba9876543210")
    assert SnapshotKey.new(PASS, n=FAST_N).salt != key.salt  # every key has its own salt


def test_a_crafted_manifest_cannot_ask_for_an_unbounded_key_derivation(key):
    with pytest.raises(HubError, match="scrypt `n` is 4194304000"):
        SnapshotKey.derive(PASS, {**key.kdf(), "n": 4_194_304_000})


# -- what a snapshot holds ----------------------------------------------------------------------


def test_a_snapshot_holds_what_the_hub_cannot_rebuild_under_a_signed_manifest(hub, tmp_path, key):
    # Execute
    info = write_snapshot(hub, tmp_path / "backups", key, T0 + 60)

    # Assert: the file, its name and mode
    with Registry.open(hub, readonly=True) as registry:
        hub_id = registry.derived_key("hub-id").hex()[:16]
        secret = registry.derived_key("heldout-split")
    assert info.hub_id == hub_id == hub_id_of(bytes.fromhex((hub / "secret").read_text()))
    assert info.path.name == f"fedem-snapshot-{hub_id}-20231114T221420.000Z.tar"
    assert oct(info.path.stat().st_mode & 0o777) == "0o600"
    # the members: the registry, the secret (encrypted), CPT and optimizer states, the merge request; no store
    stored = members(info.path)
    assert list(stored) == [MANIFEST, "cpt/state.json", "merge-request.json", "optimizer/hi/v2.safetensors",
                            "registry.sqlite", SECRET_MEMBER]
    assert (hub / "secret").read_bytes().strip() not in b"".join(stored.values())
    assert stored["optimizer/hi/v2.safetensors"] == b"optimizer moments of hi v2"
    # the manifest: format, hub, schema version, counters' maxima, every member's digest, signed
    signed = json.loads(stored[MANIFEST])
    manifest = signed["manifest"]
    assert (manifest["format"], manifest["hub_id"], manifest["schema_version"]) == (FORMAT, hub_id, SCHEMA_VERSION)
    assert manifest["created"] == "2023-11-14T22:14:20.000+00:00"
    assert manifest["counters"] == {"checkpoint": 0, "lease": 7, "contribution": 1, "adapters": {"hi": 2}}
    assert manifest["kdf"]["name"] == "scrypt" and manifest["kdf"]["n"] == FAST_N and len(signed["hmac"]) == 64
    assert {name: facts["size"] for name, facts in manifest["members"].items()} == {
        name: len(data) for name, data in stored.items() if name != MANIFEST}
    # the registry copy is a whole database on its own, with every row and the settings
    copy = tmp_path / "copy.sqlite"
    copy.write_bytes(stored["registry.sqlite"])
    conn = sqlite3.connect(copy)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert conn.execute("SELECT COUNT(*) FROM adapter_versions").fetchone()[0] == 3
    assert json.loads(conn.execute("SELECT value FROM settings WHERE name = 'store'").fetchone()[0])["kind"] == "local"
    conn.close()
    # read back: verified, and the secret decrypts to the hub's own (the same pseudonyms, the same split)
    opened = open_snapshot(info.path, PASS)
    assert opened.secret_file == (hub / "secret").read_bytes()
    out = tmp_path / "out"
    assert sorted(opened.extract(out)) == ["cpt/state.json", "merge-request.json", "optimizer/hi/v2.safetensors",
                                           "registry.sqlite", "secret"]
    assert oct((out / "secret").stat().st_mode & 0o777) == "0o600"
    with Registry.open(out, readonly=True) as restored:
        assert restored.derived_key("heldout-split") == secret
        assert restored.pseudonym("sim:0") == Registry.open(hub, readonly=True).pseudonym("sim:0")


def test_the_registry_copy_does_not_wait_for_a_writer_in_the_middle_of_a_transaction(hub, tmp_path, key):
    # Prepare: the hub's writer holds an open write transaction (a row not yet committed)
    with Registry.open(hub) as writer:
        with writer.atomic():
            writer.add_adapter("ta", ["ta"], "causal-lm", {}, T0)

            # Execute: the online backup reads the last commit, without the row in flight
            info = write_snapshot(hub, tmp_path / "backups", key, T0 + 60)

    # Assert
    assert info.manifest["counters"]["adapters"] == {"hi": 2}
    out = tmp_path / "out"
    open_snapshot(info.path, PASS).extract(out)
    with Registry.open(out, readonly=True) as copy:
        assert [a.name for a in copy.adapters()] == ["hi"]


# -- bad snapshots: refused with a clear error, nothing written ----------------------------------


@pytest.fixture
def snapshot(hub, tmp_path, key) -> Path:
    return write_snapshot(hub, tmp_path / "backups", key, T0 + 60).path


def refused_restore(tmp_path: Path, path: Path, passphrase: bytes = PASS) -> str:
    """Restore ``path`` into a new folder; return the error and check nothing was written."""
    target = tmp_path / "restored"
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(HubError) as err:
        restore_hub(path, target, passphrase, tmp_path / "hub" / "store")
    assert not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no staging folder left either
    return str(err.value)


def test_a_tampered_member_is_refused(tmp_path, snapshot):
    def flip(name, data):
        return data.replace(b'{"step": 12}', b'{"step": 99}') if name == "cpt/state.json" else data

    tampered = rewrite(snapshot, tmp_path / "tampered.tar", flip)

    message = refused_restore(tmp_path, tampered)
    assert "member cpt/state.json does not match its manifest" in message and "nothing was written" in message


def test_a_tampered_manifest_is_refused(tmp_path, snapshot):
    def edit(name, data):
        if name != MANIFEST:
            return data
        signed = json.loads(data)
        signed["manifest"]["counters"]["lease"] = 1
        return json.dumps(signed).encode()

    message = refused_restore(tmp_path, rewrite(snapshot, tmp_path / "edited.tar", edit))
    assert "was altered (its HMAC does not match)" in message


def test_a_manifest_whose_key_derivation_is_no_integer_is_refused(tmp_path, snapshot):
    def edit(name, data):
        if name != MANIFEST:
            return data
        signed = json.loads(data)
        signed["manifest"]["kdf"]["n"] = float("inf")  # read before the HMAC can be checked
        return json.dumps(signed).encode()

    message = refused_restore(tmp_path, rewrite(snapshot, tmp_path / "edited.tar", edit))
    assert "the snapshot's key derivation record is malformed" in message


def test_a_truncated_snapshot_is_refused(tmp_path, snapshot):
    data = snapshot.read_bytes()
    for cut in (len(data) // 2, 3000, len(data) - 2048):
        truncated = tmp_path / f"truncated-{cut}.tar"
        truncated.write_bytes(data[:cut])
        assert "truncated" in refused_restore(tmp_path, truncated)
        truncated.unlink()


def test_a_file_that_is_no_snapshot_is_refused(tmp_path):
    other = tmp_path / "notes.tar"
    with tarfile.open(other, "w") as tar:
        tar.add(__file__, arcname="notes.txt")
    assert "is not a fedem snapshot" in refused_restore(tmp_path, other)


def test_a_wrong_passphrase_is_refused(tmp_path, snapshot):
    message = refused_restore(tmp_path, snapshot, b"not the passphrase")
    assert message.startswith("wrong passphrase for the snapshot")


def test_snapshots_of_two_hubs_never_share_a_folder(tmp_path, snapshot, key):
    other = make_hub(tmp_path / "other")
    folder = snapshot.parent
    before = sorted(folder.iterdir())

    with pytest.raises(HubError, match=r"holds snapshots of another hub \(hub id [0-9a-f]{16}\)"):
        write_snapshot(other, folder, key, T0 + 120)

    assert sorted(folder.iterdir()) == before
    assert len(snapshots_in(folder)) == 1


# -- fedem backup -------------------------------------------------------------------------------


def test_fedem_backup_with_no_hub_running_writes_the_snapshot_itself(hub, tmp_path):
    result = CliRunner().invoke(cli, ["--hub", str(hub), "backup", str(tmp_path / "backups"), "--passphrase-env",
                                      "FEDEM_TEST_PASS", "--json"], env={"FEDEM_TEST_PASS": PASS.decode()})

    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["by"] == "fedem backup" and Path(data["path"]).parent == tmp_path / "backups"
    assert open_snapshot(data["path"], PASS).hub_id == data["hub_id"]
    assert not (hub / "writer.lock").read_text()  # the lock it took is released


def test_fedem_backup_needs_exactly_one_source_of_the_passphrase(hub, tmp_path):
    result = CliRunner().invoke(cli, ["--hub", str(hub), "backup", str(tmp_path / "backups")])

    assert result.exit_code == 1
    assert "give exactly one of --key-file FILE" in result.output
    assert not (tmp_path / "backups").exists()


def test_fedem_backup_while_the_hub_runs_leaves_a_request_that_the_hub_takes_between_turns(hub, tmp_path,
                                                                                           monkeypatch):
    # Prepare: a writer holds the lock; a stand-in for its relay loop calls the keeper's hook every 50 ms,
    # and what the hook takes from the hub folder is recorded (the requests that waited there)
    key_file = tmp_path / "passphrase"
    key_file.write_bytes(PASS + b"\n")
    stop = threading.Event()
    seen: list[list[str]] = []

    def take(path):
        taken = take_backup_requests(path)
        seen.append([request["id"] for request in taken])
        return taken

    monkeypatch.setattr(backup_request, "take_backup_requests", take)

    def relay_turns():
        while not stop.is_set():
            run_backups(hub, BackupConfig())
            stop.wait(0.05)  # the next turn, or the end as soon as it is asked for

    with HubWriterLock(hub):
        turns = threading.Thread(target=relay_turns)
        turns.start()
        try:
            # Execute
            result = CliRunner().invoke(cli, ["--hub", str(hub), "backup", str(tmp_path / "backups"),
                                              "--key-file", str(key_file), "--timeout", "20"])
        finally:
            stop.set()
            turns.join(timeout=30)

    # Assert: the request waited in the hub folder, the running hub wrote the snapshot and answered
    assert not turns.is_alive()
    assert result.exit_code == 0, result.output
    assert "snapshot written by the running hub (pid" in result.output
    assert any(waiting for waiting in seen) and sum(map(len, seen)) == 1  # taken once, by the hook
    (path,) = snapshots_in(tmp_path / "backups").values()
    assert str(path[0]) in result.output and open_snapshot(path[0], PASS).manifest["counters"]["lease"] == 7
    assert not pending_backup_requests(hub) and not list((hub / "backup-requests").glob("*.result.json"))


def test_a_request_the_hub_cannot_serve_is_answered_with_why_and_the_relay_goes_on(hub, tmp_path, key):
    # Prepare: the requested folder holds another hub's snapshots
    other = make_hub(tmp_path / "other")
    write_snapshot(other, tmp_path / "shared", key, T0)
    request_id = request_backup(hub, tmp_path / "shared", key, T0 + 1)

    # Execute: the hook never raises for a snapshot
    written = run_backups(hub, BackupConfig())

    # Assert
    assert written == [] and not pending_backup_requests(hub)
    answer = backup_result(hub, request_id)
    assert answer["path"] is None and "holds snapshots of another hub" in answer["error"]


def test_an_idle_turn_lists_no_folder_and_a_request_is_taken_at_the_next_turn(hub, tmp_path, key, monkeypatch):
    # Prepare: a request answered earlier (its folder holds the answer), then every listing counted
    run_backups(hub, BackupConfig())  # no request folder yet
    first = request_backup(hub, tmp_path / "backups", key, T0)
    run_backups(hub, BackupConfig())
    listings: list[str] = []

    def counted(path):
        listings.append(str(path))
        return pending_backup_requests(path)

    monkeypatch.setattr(backup_request, "pending_backup_requests", counted)

    # Execute: idle turns, a request, idle turns again
    for _ in range(3):
        run_backups(hub, BackupConfig())
    idle = len(listings)
    second = request_backup(hub, tmp_path / "backups", key, T0 + 1)
    written = run_backups(hub, BackupConfig())
    for _ in range(3):
        run_backups(hub, BackupConfig())

    # Assert: the folder is listed once, on the turn after the request
    assert backup_result(hub, first)["path"] and idle == 0
    assert len(listings) == 1 and len(written) == 1 and backup_result(hub, second)["path"] == str(written[0])


def test_a_request_file_carries_a_derived_key_never_the_passphrase(hub, tmp_path, key):
    request_id = request_backup(hub, tmp_path / "backups", key, T0)
    path = hub / "backup-requests" / f"{request_id}.json"

    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert PASS not in path.read_bytes()
    (taken,) = take_backup_requests(hub)
    assert SnapshotKey.from_json(taken["key"]) == key and taken["dest"] == str(tmp_path / "backups")
    assert not path.exists()


def test_the_running_hub_takes_a_snapshot_every_interval_and_keeps_the_newest(hub, tmp_path):
    # Prepare
    key_file = tmp_path / "passphrase"
    key_file.write_bytes(PASS)
    config = BackupConfig(dir=str(tmp_path / "auto"), every_s=60.0, key_file=str(key_file), keep=2)
    now = [T0]

    # Execute: turns at 0 s (none there yet: one now), 10 s, 61 s, 122 s, 130 s, 183 s
    taken = []
    for at in (0, 10, 61, 122, 130, 183):
        now[0] = T0 + at
        taken.append(len(run_backups(hub, config, clock=lambda: now[0])))

    # Assert
    assert taken == [1, 0, 1, 1, 0, 1]
    (kept,) = snapshots_in(tmp_path / "auto").values()
    assert [p.name[-24:] for p in kept] == ["20231114T221522.000Z.tar", "20231114T221623.000Z.tar"]


def test_the_keeper_turn_runs_the_backup_hook_first(hub, tmp_path, key):
    from fedem_flwr.relay.keeper import BaseKeeper

    request_id = request_backup(hub, tmp_path / "backups", key, T0)
    stub = SimpleNamespace(hub=SimpleNamespace(path=hub), cfg=SimpleNamespace(hub=SimpleNamespace(
        backup=BackupConfig()), cpt=SimpleNamespace(enabled=False)), _merge_reason=lambda busy: None)

    BaseKeeper.turn(stub, False)

    assert backup_result(hub, request_id)["path"].startswith(str(tmp_path / "backups"))
    assert os.path.isfile(backup_result(hub, request_id)["path"])
