"""Snapshots of what a hub cannot rebuild (``fedem backup``), and reading them back verified.

A snapshot holds the registry (copied with SQLite's online backup API: one consistent read that never
blocks the writer; the recorded settings are in it), the pseudonym secret (encrypted), continuous
pretraining's private state, every kept optimizer state and a waiting merge request. Not the store:
artifacts are rebuilt from a copy of it or from the Hugging Face Hub (``hub.restore``).

Format ``fedem-snapshot-1``: one uncompressed tar file, ``fedem-snapshot-<hub id>-<UTC time>.tar``::

    manifest.json       {"manifest": {...}, "hmac": hex}: format, hub id, time, schema version, the
                        counters' maxima, the key derivation, and the sha256 and size of every member
    registry.sqlite     the registry (rollback journal, so the file stands alone)
    secret.enc          the secret file, AES-256-GCM (12-byte nonce, then ciphertext; bound to the hub id)
    cpt/..., optimizer/..., merge-request.json

Keys: scrypt(passphrase, a random salt; n, r, p in the manifest) gives a master key, and
HMAC-SHA256(master, purpose) the secret's key, the manifest's HMAC key and an 8-byte key check, so a
wrong passphrase is told apart from a tampered manifest. :func:`open_snapshot` checks the key, the HMAC,
every member's size and digest and the secret's decryption before anything is written anywhere.

The hub id is HMAC-SHA256(secret, ``"hub-id"``) (``Registry.derived_key("hub-id")``), 16 hex digits:
stable, not secret, the same for every snapshot of one hub, so snapshots of two hubs are told apart.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import io
import json
import os
import re
import secrets
import shutil
import sqlite3
import tarfile
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Optional, Union
from urllib.parse import quote

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from fedem_flwr.durable import atomic_write
from fedem_flwr.errors import HubError
from fedem_flwr.hub.merge_request import MERGE_REQUEST_FILE, merge_request_path
from fedem_flwr.hub.paths import (
    CPT_DIR,
    OPTIMIZER_DIR,
    REGISTRY_FILE,
    cpt_state_path,
    optimizer_states_path,
    registry_path,
    secret_path,
)
from fedem_flwr.hub.pseudonym import load_or_create_secret

FORMAT = "fedem-snapshot-1"
MANIFEST = "manifest.json"
SECRET_MEMBER = "secret.enc"
MERGE_REQUEST_MEMBER = MERGE_REQUEST_FILE
PREFIX = "fedem-snapshot-"
SUFFIX = ".tar"
_NAME = re.compile(r"^fedem-snapshot-([0-9a-f]{16})-(\d{8}T\d{6}\.\d{3}Z)\.tar$")
_TIME = "%Y%m%dT%H%M%S"
KDF_N, KDF_R, KDF_P = 2 ** 15, 8, 1  # scrypt: about 32 MiB and a tenth of a second per derivation
_KDF_BOUNDS = {"n": (2 ** 10, 2 ** 22), "r": (1, 32), "p": (1, 16)}  # a crafted manifest cannot ask for more
_MAX_MANIFEST = 1 << 20
_CHUNK = 1 << 20

PathLike = Union[str, os.PathLike]


# -- names and ids ------------------------------------------------------------------------------
def hub_id_of(secret: bytes) -> str:
    """The hub id: HMAC-SHA256(secret, "hub-id"), 16 hex digits (``Registry.derived_key("hub-id")``)."""
    return hmac.new(secret, b"hub-id", hashlib.sha256).hexdigest()[:16]


def snapshot_name(hub_id: str, at: float) -> str:
    """``fedem-snapshot-<hub id>-<UTC time to the millisecond>.tar``: names sort by time."""
    when = dt.datetime.fromtimestamp(at, dt.timezone.utc)
    return f"{PREFIX}{hub_id}-{when.strftime(_TIME)}.{when.microsecond // 1000:03d}Z{SUFFIX}"


def parse_snapshot_name(name: str) -> Optional[tuple[str, str]]:
    """(hub id, UTC time text) of a snapshot's file name; None for any other name."""
    match = _NAME.match(name)
    return (match.group(1), match.group(2)) if match else None


def snapshots_in(folder: PathLike) -> dict[str, list[Path]]:
    """hub id -> its snapshots in ``folder``, oldest first (an absent folder holds none)."""
    found: dict[str, list[Path]] = {}
    folder = Path(folder)
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        parsed = parse_snapshot_name(path.name)
        if parsed is not None and path.is_file():
            found.setdefault(parsed[0], []).append(path)
    return found


# -- keys ---------------------------------------------------------------------------------------
def read_passphrase(key_file: Optional[PathLike] = None, passphrase_env: Optional[str] = None,
                    env: Mapping[str, str] = os.environ) -> bytes:
    """The passphrase from ``key_file`` (its content, outer whitespace stripped) or the environment
    variable ``passphrase_env``: exactly one of them."""
    if (key_file is None) == (passphrase_env is None):
        raise HubError("a snapshot's secret is encrypted: give exactly one of --key-file FILE (its content is the "
                       "passphrase) or --passphrase-env VAR (a variable holding it).")
    if key_file is not None:
        try:
            value = Path(key_file).read_bytes().strip()
        except OSError as err:
            raise HubError(f"cannot read the key file {os.fspath(key_file)!r}: {err.strerror or err}.") from err
        where = f"the key file {os.fspath(key_file)!r}"
    else:
        value = env.get(passphrase_env, "").strip().encode("utf-8")
        where = f"the environment variable {passphrase_env}"
    if not value:
        raise HubError(f"{where} is empty or unset; it must hold the passphrase that encrypts the hub's secret.")
    return value


@dataclass(frozen=True)
class SnapshotKey:
    """A master key derived from a passphrase by scrypt, with the salt and cost that derive it again."""

    master: bytes
    salt: bytes
    n: int = KDF_N
    r: int = KDF_R
    p: int = KDF_P

    @classmethod
    def new(cls, passphrase: bytes, n: int = KDF_N) -> "SnapshotKey":
        """A key under a fresh random salt (each snapshot gets its own)."""
        return cls.derive(passphrase, {"salt": secrets.token_hex(16), "n": n, "r": KDF_R, "p": KDF_P})

    @classmethod
    def derive(cls, passphrase: bytes, kdf: Mapping[str, Any]) -> "SnapshotKey":
        """The key a manifest's ``kdf`` (salt, n, r, p) derives from ``passphrase``."""
        try:
            salt = bytes.fromhex(kdf["salt"])
            cost = {name: int(kdf[name]) for name in _KDF_BOUNDS}
        except (KeyError, TypeError, ValueError, OverflowError) as err:  # JSON reads `Infinity` too
            raise HubError(f"the snapshot's key derivation record is malformed ({kdf!r}).") from err
        for name, (low, high) in _KDF_BOUNDS.items():
            if not low <= cost[name] <= high:
                raise HubError(f"the snapshot's scrypt `{name}` is {cost[name]}; it must be in {low}..{high}.")
        if len(salt) < 16 or cost["n"] & (cost["n"] - 1):
            raise HubError("the snapshot's scrypt salt is shorter than 16 bytes or its `n` is not a power of 2.")
        master = Scrypt(salt=salt, length=32, n=cost["n"], r=cost["r"], p=cost["p"]).derive(passphrase)
        return cls(master, salt, cost["n"], cost["r"], cost["p"])

    def subkey(self, purpose: str) -> bytes:
        return hmac.new(self.master, purpose.encode("utf-8"), hashlib.sha256).digest()

    @property
    def check(self) -> str:
        """8 bytes that tell a wrong passphrase from a tampered manifest (they reveal nothing the HMAC does not)."""
        return self.subkey("key-check")[:8].hex()

    def kdf(self) -> dict[str, Any]:
        return {"name": "scrypt", "salt": self.salt.hex(), "n": self.n, "r": self.r, "p": self.p, "length": 32}

    def to_json(self) -> dict[str, Any]:
        """What a backup request carries to the running hub: the derived key, never the passphrase."""
        return {**self.kdf(), "master": self.master.hex()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "SnapshotKey":
        try:
            return cls(bytes.fromhex(data["master"]), bytes.fromhex(data["salt"]), int(data["n"]), int(data["r"]),
                       int(data["p"]))
        except (KeyError, TypeError, ValueError) as err:
            raise HubError("the backup request's key is malformed; run `fedem backup` again.") from err


def encrypt_secret(key: SnapshotKey, secret_file: bytes, hub_id: str) -> bytes:
    nonce = secrets.token_bytes(12)
    return nonce + AESGCM(key.subkey("secret")).encrypt(nonce, secret_file, _aad(hub_id))


def decrypt_secret(key: SnapshotKey, sealed: bytes, hub_id: str) -> bytes:
    try:
        return AESGCM(key.subkey("secret")).decrypt(sealed[:12], sealed[12:], _aad(hub_id))
    except (InvalidTag, ValueError) as err:
        raise HubError("the snapshot's secret does not decrypt with this passphrase (or was altered); "
                       "nothing was written.") from err


def _aad(hub_id: str) -> bytes:
    return f"{FORMAT}:{hub_id}".encode("utf-8")


def sign(manifest: Mapping[str, Any], key: SnapshotKey) -> str:
    return hmac.new(key.subkey("manifest"), _canonical(manifest), hashlib.sha256).hexdigest()


def _canonical(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


# -- writing ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SnapshotInfo:
    """A snapshot written (or read back): its file, hub id and manifest."""

    path: Path
    hub_id: str
    manifest: dict[str, Any]

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def write_snapshot(hub: PathLike, dest: PathLike, key: SnapshotKey, now: float) -> SnapshotInfo:
    """Write a snapshot of ``hub`` into the folder ``dest`` and return it.

    The caller makes it consistent: it holds the hub's writer lock, or it is the running hub between
    two relay turns. The registry copy is one read transaction of its own. A ``dest`` holding snapshots
    of another hub is refused (snapshots of two hubs are never mixed in one folder).
    """
    hub, dest = Path(hub), Path(dest)
    if not registry_path(hub).is_file():
        raise HubError(f"no hub at {str(hub)!r} (no {REGISTRY_FILE}); nothing to back up.")
    if not secret_path(hub).is_file():
        raise HubError(f"the hub {str(hub)!r} has no secret yet (it is created at its first start); nothing to "
                       "back up.")
    secret_bytes = secret_path(hub).read_bytes()
    hub_id = hub_id_of(load_or_create_secret(secret_path(hub)))
    others = sorted(other for other in snapshots_in(dest) if other != hub_id)
    if others:
        raise HubError(f"the folder {str(dest)!r} holds snapshots of another hub (hub id {', '.join(others)}); "
                       f"this hub's id is {hub_id}: write its snapshots to a folder of their own.")
    dest.mkdir(mode=0o700, parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fedem-snapshot-", dir=dest) as tmp:
        stage = Path(tmp)
        facts = copy_registry(registry_path(hub), stage / REGISTRY_FILE)
        (stage / SECRET_MEMBER).write_bytes(encrypt_secret(key, secret_bytes, hub_id))
        for name, folder in ((CPT_DIR, cpt_state_path(hub)), (OPTIMIZER_DIR, optimizer_states_path(hub))):
            if folder.is_dir():
                shutil.copytree(folder, stage / name, ignore=shutil.ignore_patterns(".*"))
        if merge_request_path(hub).is_file():
            shutil.copyfile(merge_request_path(hub), stage / MERGE_REQUEST_MEMBER)
        members = {name: _file_facts(stage / name) for name in _members(stage)}
        manifest = {"format": FORMAT, "hub_id": hub_id, "created_at": now,
                    "created": dt.datetime.fromtimestamp(now, dt.timezone.utc).isoformat(timespec="milliseconds"),
                    **facts, "kdf": key.kdf(), "key_check": key.check,
                    "cipher": {"name": "AES-256-GCM", "member": SECRET_MEMBER}, "members": members}
        path = dest / snapshot_name(hub_id, now)
        with atomic_write(path, "wb", permissions=0o600, overwrite=False) as out:
            _write_tar(out, stage, {"manifest": manifest, "hmac": sign(manifest, key)}, members)
    return SnapshotInfo(path, hub_id, manifest)


def copy_registry(source: Path, target: Path) -> dict[str, Any]:
    """Copy the registry with SQLite's online backup API (a read-only connection: the writer is never
    blocked, and the copy is one consistent state); return its schema version, counters and floors."""
    src = sqlite3.connect(f"file:{quote(str(Path(source).absolute()))}?mode=ro", uri=True, timeout=30.0)
    dst = sqlite3.connect(str(target))
    try:
        src.backup(dst)
        dst.execute("PRAGMA journal_mode = DELETE")  # the copy stands alone: no -wal file beside it
        return registry_facts(dst)
    except sqlite3.DatabaseError as err:
        raise HubError(f"cannot copy the registry {str(source)!r}: {err}") from err
    finally:
        dst.close()
        src.close()


def registry_facts(conn: sqlite3.Connection) -> dict[str, Any]:
    """The schema version, each counter's maximum and the floors of a registry (a manifest records them)."""
    def one(sql: str) -> Optional[int]:
        row = conn.execute(sql).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    counters = {"checkpoint": one("SELECT MAX(version) FROM checkpoints"),
                "lease": one("SELECT MAX(token) FROM leases"),
                "contribution": one("SELECT MAX(id) FROM contributions"),
                "adapters": {name: int(top) for name, top in
                             conn.execute("SELECT adapter, MAX(version) FROM adapter_versions GROUP BY adapter")}}
    floors = ({name: int(value) for name, value in conn.execute("SELECT counter, next FROM floors")}
              if "floors" in tables else {})
    return {"schema_version": one("PRAGMA user_version"), "counters": counters, "floors": floors}


def _members(stage: Path) -> list[str]:
    """Every file under ``stage`` as a posix path, sorted: the tar's members besides the manifest."""
    return sorted(path.relative_to(stage).as_posix() for path in stage.rglob("*") if path.is_file())


def _file_facts(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return {"sha256": digest.hexdigest(), "size": path.stat().st_size}


def _write_tar(out: IO[bytes], stage: Path, signed: dict[str, Any], members: Mapping[str, Any]) -> None:
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        data = json.dumps(signed, indent=1, sort_keys=True).encode("utf-8")
        _add(tar, MANIFEST, io.BytesIO(data), len(data), signed["manifest"]["created_at"])
        for name in members:
            with open(stage / name, "rb") as handle:
                _add(tar, name, handle, members[name]["size"], signed["manifest"]["created_at"])


def _add(tar: tarfile.TarFile, name: str, handle: IO[bytes], size: int, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o600, int(mtime)
    tar.addfile(info, handle)


def prune_snapshots(dest: PathLike, hub_id: str, keep: int) -> list[Path]:
    """Remove all but the ``keep`` newest snapshots of ``hub_id`` in ``dest``; return those removed."""
    removed = snapshots_in(dest).get(hub_id, [])[:-keep] if keep > 0 else []
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


# -- reading ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Snapshot:
    """A snapshot whose key, manifest and members were verified (:func:`open_snapshot`)."""

    path: Path
    manifest: dict[str, Any]
    secret_file: bytes  # the decrypted content of the hub's `secret` file

    @property
    def hub_id(self) -> str:
        return self.manifest["hub_id"]

    def extract(self, folder: Path) -> list[str]:
        """Write the members (the secret decrypted, mode 0600) under ``folder``; each is checked again
        against its digest as it is written. Returns their paths, relative to ``folder``."""
        written = []
        with _open_tar(self.path) as tar:
            _next(tar, self.path)  # the manifest, verified when the snapshot was opened
            for info, data in _verified_members(tar, self.manifest, self.path):
                if info.name == SECRET_MEMBER:
                    continue
                target = folder / info.name
                target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                with open(target, "xb", opener=lambda name, flags: os.open(name, flags, 0o600)) as out:
                    for chunk in data:
                        out.write(chunk)
                written.append(info.name)
        secret = secret_path(folder)
        with open(secret, "xb", opener=lambda name, flags: os.open(name, flags, 0o600)) as out:
            out.write(self.secret_file)
        return [*written, secret.name]


def open_snapshot(path: PathLike, passphrase: bytes) -> Snapshot:
    """Read and verify the snapshot at ``path`` with ``passphrase``; a ``HubError`` says what is wrong
    (not a snapshot, truncated, tampered, wrong passphrase). Nothing is written."""
    path = Path(path)
    if not path.is_file():
        raise HubError(f"no snapshot at {str(path)!r}.")
    with _open_tar(path) as tar:
        first = _next(tar, path)
        if first is None or first.name != MANIFEST or not first.isfile() or first.size > _MAX_MANIFEST:
            raise HubError(f"{str(path)!r} is not a fedem snapshot: its first member is not {MANIFEST}.")
        signed = _read_json(tar, first, path)
        manifest = _checked_manifest(signed, path)
        key = SnapshotKey.derive(passphrase, manifest["kdf"])
        if not hmac.compare_digest(key.check, str(manifest.get("key_check", ""))):
            raise HubError(f"wrong passphrase for the snapshot {str(path)!r} (its key check does not match); "
                           "nothing was written.")
        if not hmac.compare_digest(sign(manifest, key), str(signed.get("hmac", ""))):
            raise HubError(f"the manifest of the snapshot {str(path)!r} was altered (its HMAC does not match); "
                           "nothing was written.")
        sealed = b""
        for info, data in _verified_members(tar, manifest, path):
            if info.name == SECRET_MEMBER:
                sealed = b"".join(data)
            else:
                for _chunk in data:  # read through: its size and digest are checked at its end
                    pass
    secret_file = decrypt_secret(key, sealed, manifest["hub_id"])
    try:
        secret = bytes.fromhex(secret_file.decode("utf-8").strip())
    except ValueError:
        secret = b""
    if not secret or hub_id_of(secret) != manifest["hub_id"]:
        raise HubError(f"the secret in {str(path)!r} is not that of hub {manifest['hub_id']}; nothing was written.")
    return Snapshot(path, manifest, secret_file)


def _open_tar(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, mode="r:")
    except (tarfile.TarError, OSError, EOFError) as err:
        raise HubError(f"{str(path)!r} is not a fedem snapshot, or it is truncated: {err}") from err


def _next(tar: tarfile.TarFile, path: Path) -> Optional[tarfile.TarInfo]:
    try:
        return tar.next()
    except (tarfile.TarError, OSError, EOFError) as err:
        raise HubError(f"the snapshot {str(path)!r} is truncated or damaged: {err}; nothing was written.") from err


def _read_json(tar: tarfile.TarFile, info: tarfile.TarInfo, path: Path) -> dict[str, Any]:
    try:
        handle = tar.extractfile(info)
        data = json.loads(handle.read()) if handle is not None else None
    except (tarfile.TarError, OSError, EOFError, ValueError) as err:
        raise HubError(f"the manifest of the snapshot {str(path)!r} is unreadable: {err}") from err
    if not isinstance(data, dict) or not isinstance(data.get("manifest"), dict):
        raise HubError(f"the manifest of the snapshot {str(path)!r} is malformed.")
    return data


def _checked_manifest(signed: dict[str, Any], path: Path) -> dict[str, Any]:
    manifest = signed["manifest"]
    if manifest.get("format") != FORMAT:
        raise HubError(f"the snapshot {str(path)!r} has format {manifest.get('format')!r}; this fedem-flwr reads "
                       f"{FORMAT!r}.")
    members = manifest.get("members")
    if (not isinstance(members, dict) or SECRET_MEMBER not in members or REGISTRY_FILE not in members
            or not all(isinstance(facts, dict) for facts in members.values())):
        raise HubError(f"the manifest of the snapshot {str(path)!r} does not list {REGISTRY_FILE} and {SECRET_MEMBER}.")
    if not isinstance(manifest.get("kdf"), dict) or not re.fullmatch(r"[0-9a-f]{16}", str(manifest.get("hub_id"))):
        raise HubError(f"the manifest of the snapshot {str(path)!r} lacks its key derivation or hub id.")
    for name in members:
        _safe_name(name, path)
    return manifest


def _safe_name(name: str, path: Path) -> None:
    parts = name.split("/")
    top_ok = name in (REGISTRY_FILE, SECRET_MEMBER, MERGE_REQUEST_MEMBER) or parts[0] in (CPT_DIR, OPTIMIZER_DIR)
    if not top_ok or name.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise HubError(f"the snapshot {str(path)!r} names a member {name!r} outside what a snapshot holds.")


def _verified_members(tar: tarfile.TarFile, manifest: Mapping[str, Any],
                      path: Path) -> Iterator[tuple[tarfile.TarInfo, Iterator[bytes]]]:
    """Each member after the manifest with an iterator of its bytes, checked against the manifest as it is
    read (the iterator raises at its end on a wrong size or digest); then, that none is missing."""
    listed = dict(manifest["members"])
    seen: set[str] = set()
    while (info := _next(tar, path)) is not None:
        if info.name not in listed or info.name in seen or not info.isfile():
            raise HubError(f"the snapshot {str(path)!r} holds a member {info.name!r} its manifest does not list "
                           "(or twice, or not as a file); nothing was written.")
        seen.add(info.name)
        yield info, _checked_bytes(tar, info, listed[info.name], path)
    missing = sorted(set(listed) - seen)
    if missing:
        raise HubError(f"the snapshot {str(path)!r} is truncated: it lacks {', '.join(missing)}; nothing was written.")


def _checked_bytes(tar: tarfile.TarFile, info: tarfile.TarInfo, facts: Mapping[str, Any],
                   path: Path) -> Iterator[bytes]:
    digest, size = hashlib.sha256(), 0
    try:
        handle = tar.extractfile(info)
        while handle is not None and (chunk := handle.read(_CHUNK)):
            digest.update(chunk)
            size += len(chunk)
            yield chunk
    except (tarfile.TarError, OSError, EOFError) as err:
        raise HubError(f"the snapshot {str(path)!r} is truncated or damaged in {info.name}: {err}; nothing was "
                       "written.") from err
    if size != facts.get("size") or digest.hexdigest() != facts.get("sha256"):
        raise HubError(f"the snapshot's member {info.name} does not match its manifest (size {size}, expected "
                       f"{facts.get('size')}; sha256 {digest.hexdigest()[:12]}, expected "
                       f"{str(facts.get('sha256'))[:12]}): the snapshot {str(path)!r} was altered or damaged; "
                       "nothing was written.")
