"""Manifests and digests of artifact folders (design decision 12): what "the same artifact" means.

A folder's manifest is the sorted list of `(path, sha256, size)` of every file under it, `path`
relative and POSIX-style, symbolic links followed (a Hugging Face cache snapshot is a folder of
links into a blob store). Its digest is `sha256` of the canonical serialisation

    json.dumps([[path, sha256, size], ...], ensure_ascii=False, separators=(",", ":")).encode("utf-8")

e.g. `[["adapter_config.json","5f1d...",412],["adapter_model.safetensors","9a0c...",16544]]`: no
whitespace, entries sorted by path (Python's code-point order), hex digests in lower case. It
depends on names and bytes only, never on times, permissions or the order a file system lists.
Pure standard library: the registry, the CLI and the verifier use it without torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from fedem_flwr.errors import DigestMismatch

Entry = tuple[str, str, int]
_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    """Hex sha256 of one file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def manifest(folder: Path) -> list[Entry]:
    """Sorted `(relative posix path, sha256, size)` of every file under `folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Artifact folder {folder} does not exist")
    entries = []
    for dirpath, _dirs, files in os.walk(folder, followlinks=True):
        for name in files:
            path = Path(dirpath) / name
            rel = path.relative_to(folder).as_posix()
            entries.append((rel, file_sha256(path), path.stat().st_size))
    return sorted(entries)


def serialise(entries: list[Entry]) -> bytes:
    """The canonical bytes a digest hashes (see the module docstring)."""
    rows = [[p, h, int(s)] for p, h, s in sorted(entries)]
    return json.dumps(rows, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def digest_of(entries: list[Entry]) -> str:
    """Digest of a manifest: hex sha256 of its canonical serialisation."""
    return hashlib.sha256(serialise(entries)).hexdigest()


def digest(folder: Path) -> str:
    """Digest of a folder's current content."""
    return digest_of(manifest(folder))


def diff(expected: list[Entry], actual: list[Entry]) -> list[str]:
    """Human-readable differences between two manifests, one line per file."""
    want = {p: (h, s) for p, h, s in expected}
    have = {p: (h, s) for p, h, s in actual}
    out = [f"missing {p}" for p in sorted(want.keys() - have.keys())]
    out += [f"unexpected {p}" for p in sorted(have.keys() - want.keys())]
    for p in sorted(want.keys() & have.keys()):
        (wh, ws), (hh, hs) = want[p], have[p]
        if wh != hh:
            out.append(f"changed {p} (sha256 {hh[:12]}, expected {wh[:12]}; size {hs}, expected {ws})")
    return out


def verify_folder(folder: Path, expected_digest: str, expected: list[Entry] | None = None) -> list[Entry]:
    """Return the folder's manifest if it hashes to `expected_digest`, else raise `DigestMismatch`.

    With the manifest recorded when the artifact was written (`expected`), the error names each file
    that was changed, removed or added; without it, it can name only the two digests.
    """
    actual = manifest(folder)
    got = digest_of(actual)
    if got == expected_digest:
        return actual
    detail = diff(expected, actual) if expected is not None else []
    files = "; ".join(detail) if detail else "content differs (no recorded manifest to compare files)"
    raise DigestMismatch(f"Artifact {folder} has digest {got}, expected {expected_digest}: {files}")
