"""The artifact store: one interface, a local folder backend here and the Hugging Face Hub in `hf_store`.

Repos are named like Hugging Face repos (`base_repo`, `adapter_repo`): `{prefix}/base` holds the
base checkpoints, `{prefix}/adapter-{name}` the versions of one adapter. A version's revision is
`v{n}` and is never overwritten; `main` names the latest (design decision 12).

`LocalStore(root)` lays them out as

    <root>/<org>/<name>/<revision>/...   the artifact, exactly as saved (config.json, *.safetensors)
    <root>/<org>/<name>/refs.json        {"main": rev, "revisions": {rev: {digest, manifest, ...}}}
    <root>/.tmp/                         revisions being written; anything left here is a crash's debris

so `transformers.AutoModelForCausalLM.from_pretrained(store.local_path(repo, "v3"))` and
`peft.PeftModel.from_pretrained(base, store.local_path(repo, "v1"))` load a revision folder directly.
`put` copies into `.tmp/`, hashes the copy, fsyncs it and renames it into place (atomic on one file
system), then records it in `refs.json` (written by `durable.atomic_write`): a crash leaves a
temporary folder, or a revision folder `refs.json` does not list, never half a revision. One writer
at a time (the hub's writer lock); readers need no lock.

Orphans. The hub writes an artifact, then commits its registry row; a crash (or an error) between
the two leaves a revision the registry does not know. The store never reads the registry, so the
caller says what it knows: `put(..., replace_orphan=True)` means "the registry has no row for this
revision", and whatever is stored under it is an orphan and is replaced (the old copy is moved into
`.tmp/` first, so a crash midway leaves debris, never a mix). `verify_all(known)` reports orphans,
and `repair(problems)` removes them and the debris (`fedem verify --repair`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol, runtime_checkable

from fedem_flwr.durable import atomic_write, rename_into_place
from fedem_flwr.errors import ConfigError, RevisionExists, RevisionNotFound
from fedem_flwr.faults import kill_point
from fedem_flwr.hub.manifest import Entry, diff, digest_of, manifest, verify_folder

_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_VERSION = re.compile(r"^v(\d+)$")
REFS_FILE = "refs.json"
TMP_DIR = ".tmp"
# Kinds of `Problem`: content vs. digest recorded at put time, recorded digest vs. the registry's,
# stored but unknown to the registry, known to the registry but not stored, a revision folder that
# refs.json does not list (a crash after the rename), a temporary folder left by a crash.
PROBLEM_KINDS = ("mismatch", "registry-mismatch", "orphan", "missing", "unrecorded", "leftover")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArtifactRef:
    """Where an artifact lives and what it must hash to."""

    repo: str
    revision: str
    digest: str


@dataclass(frozen=True)
class Problem:
    """One finding of `verify_all`; `kind` is one of `PROBLEM_KINDS`."""

    kind: str
    repo: str
    revision: str
    detail: str


def base_repo(prefix: str) -> str:
    """The repo of the base checkpoints: `{prefix}/base`."""
    return f"{prefix}/base"


def adapter_repo(prefix: str, name: str) -> str:
    """The repo of one adapter's versions: `{prefix}/adapter-{name}`."""
    return f"{prefix}/adapter-{name}"


def version_of(revision: str) -> Optional[int]:
    """`v{n}` -> n; None for other revision names."""
    m = _VERSION.match(revision)
    return int(m.group(1)) if m else None


def check_repo(repo: str) -> str:
    """A repo id is `org/name`, each part letters, digits, `.`, `_`, `-`, not starting with `.`."""
    parts = repo.split("/")
    if len(parts) != 2 or not all(_PART.match(p) for p in parts):
        raise ConfigError(f"repo {repo!r} must be `org/name` (letters, digits, `.`, `_`, `-`)")
    return repo


def check_revision(revision: str) -> str:
    if revision == "main" or not _PART.match(revision):
        raise ConfigError(f"revision {revision!r} must be a name like `v3` (not `main`, no `/`)")
    return revision


@runtime_checkable
class ArtifactStore(Protocol):
    """What the hub needs from a place that keeps artifact folders by repo and revision."""

    def put(self, repo: str, revision: str, folder: Path, message: str, *,
            replace_orphan: bool = False) -> ArtifactRef: ...

    def get(self, ref: ArtifactRef) -> Path: ...

    def local_path(self, repo: str, revision: str) -> Path: ...

    def repo_id(self, repo: str) -> str:
        """The id under which Hugging Face clients resolve ``repo`` (what adapters name as base)."""
        ...

    def revisions(self, repo: str) -> list[str]: ...

    def repos(self) -> list[str]: ...

    def verify_all(self, known: Optional[set[tuple[str, str, str]]] = None) -> list[Problem]: ...

    def repair(self, problems: list[Problem]) -> list[Problem]:
        """Remove the orphans and debris among ``problems`` (from ``verify_all(known)``); return those removed."""
        ...


def copy_tree(src: Path, dst: Path) -> None:
    """Copy the files under `src` (links followed) into the new folder `dst`; `rename_into_place`
    makes a copy durable when it is put in place, a staging copy never pays for it."""
    dst.mkdir(parents=True)
    for dirpath, _dirs, files in os.walk(src, followlinks=True):
        out = dst / Path(dirpath).relative_to(src)
        out.mkdir(exist_ok=True)
        for name in files:
            shutil.copyfile(Path(dirpath) / name, out / name)


class LocalStore:
    """Artifacts in a local folder laid out like Hugging Face repos (module docstring)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    # -- reading -------------------------------------------------------------------------------
    def _refs(self, repo: str) -> dict[str, Any]:
        path = self.root / check_repo(repo) / REFS_FILE
        if not path.exists():
            return {"main": None, "revisions": {}}
        return json.loads(path.read_text(encoding="utf-8"))

    def repo_id(self, repo: str) -> str:
        """A local store publishes nothing: its repo names are the ids `fedem publish` keeps."""
        return repo

    def local_path(self, repo: str, revision: str) -> Path:
        """The folder of a stored revision (`main`: the latest); `RevisionNotFound` if absent."""
        return self._locate(repo, revision, self._refs(repo))

    def _locate(self, repo: str, revision: str, refs: dict[str, Any]) -> Path:
        name = refs["main"] if revision == "main" else revision
        if name is None or name not in refs["revisions"]:
            have = ", ".join(sorted(refs["revisions"], key=revision_sort_key)) or "none"
            raise RevisionNotFound(f"revision {revision!r} of repo {repo!r} is not in the store {self.root} "
                                   f"(stored revisions: {have})")
        return self.root / repo / name

    def get(self, ref: ArtifactRef) -> Path:
        """The verified folder of `ref`: `DigestMismatch` names the files that differ."""
        refs = self._refs(ref.repo)  # read once: it holds the manifest of every revision
        path = self._locate(ref.repo, ref.revision, refs)
        verify_folder(path, ref.digest, _entries(refs["revisions"][path.name]))
        return path

    def revisions(self, repo: str) -> list[str]:
        """Recorded revisions, `v{n}` in version order first."""
        return sorted(self._refs(repo)["revisions"], key=revision_sort_key)

    def repos(self) -> list[str]:
        """Repos with at least one recorded revision."""
        return self._repo_folders(recorded_only=True)

    # -- writing -------------------------------------------------------------------------------
    def put(self, repo: str, revision: str, folder: Path, message: str, *,
            replace_orphan: bool = False) -> ArtifactRef:
        """Store `folder` as `revision` of `repo`; the same content again is a no-op.

        Other content under a stored revision is a `RevisionExists`, unless the caller knows the
        registry has no row for `revision` (``replace_orphan=True``): then it is replaced.
        """
        check_repo(repo)
        check_revision(revision)
        refs = self._refs(repo)
        final = self.root / repo / revision
        if revision in refs["revisions"] or final.exists():
            try:
                ref = self._existing(repo, revision, folder, refs)
            except RevisionExists as err:
                if not replace_orphan:
                    raise
                log.warning("Replacing orphan revision %s@%s (stored, unknown to the registry): %s",
                            repo, revision, err)
            else:
                if ref is not None:
                    return ref
        tmp = self._scratch(repo, revision, "put")
        try:
            copy_tree(Path(folder), tmp)
            entries = manifest(tmp)
            final.parent.mkdir(parents=True, exist_ok=True)
            orphan = self._discard(repo, revision)
            rename_into_place(tmp, final)  # atomic: the revision appears whole or not at all
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        ref = self._record(repo, revision, entries, message, refs)
        if orphan is not None:
            shutil.rmtree(orphan, ignore_errors=True)
        kill_point("after-artifact-write", f"{repo}@{revision}")
        return ref

    def _scratch(self, repo: str, revision: str, why: str) -> Path:
        """A fresh path under `.tmp/` (created) for something of `repo@revision`."""
        (self.root / TMP_DIR).mkdir(parents=True, exist_ok=True)
        return self.root / TMP_DIR / f"{repo.replace('/', '--')}--{revision}--{why}-{uuid.uuid4().hex[:8]}"

    def _discard(self, repo: str, revision: str) -> Optional[Path]:
        """Move a revision folder out of the way into `.tmp/` (atomic); its new path, None if absent."""
        final = self.root / repo / revision
        if not final.exists():
            return None
        aside = self._scratch(repo, revision, "orphan")
        os.rename(final, aside)
        return aside

    def _existing(self, repo: str, revision: str, folder: Path, refs: dict) -> Optional[ArtifactRef]:
        """The ref of a stored revision holding `folder`'s content; None if only its listing is left."""
        entries = manifest(Path(folder))
        new = digest_of(entries)
        recorded = refs["revisions"].get(revision)
        final = self.root / repo / revision
        if recorded is None:  # renamed into place, then a crash before refs.json: adopt if identical
            stored = manifest(final)
            if digest_of(stored) != new:
                raise RevisionExists(f"{repo}@{revision} exists (unrecorded) with other content: "
                                     + "; ".join(diff(stored, entries)))
            return self._record(repo, revision, stored, message="recovered after an interrupted put", refs=refs)
        if recorded["digest"] != new:
            raise RevisionExists(
                f"{repo}@{revision} is stored with digest {recorded['digest']}, not {new}; revisions are "
                f"never overwritten (store the new content as the next version): "
                + "; ".join(diff(_entries(recorded), entries))
            )
        return ArtifactRef(repo, revision, new) if final.exists() else None

    def _record(self, repo: str, revision: str, entries: list[Entry], message: str, refs: dict) -> ArtifactRef:
        digest = digest_of(entries)
        refs["revisions"][revision] = {
            "digest": digest,
            "message": message,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "manifest": [list(e) for e in entries],
        }
        self._write_refs(repo, refs)
        return ArtifactRef(repo, revision, digest)

    def _write_refs(self, repo: str, refs: dict) -> None:
        refs["main"] = max(refs["revisions"], key=revision_sort_key) if refs["revisions"] else None
        with atomic_write(self.root / repo / REFS_FILE, "w") as f:
            json.dump(refs, f, indent=1, sort_keys=True)

    def remove(self, repo: str, revision: str) -> None:
        """Delete a stored revision: unlisted first, then its folder moved into `.tmp/` and deleted,
        so a crash midway leaves an unrecorded folder or debris, both of which `repair` removes."""
        refs = self._refs(repo)
        if refs["revisions"].pop(revision, None) is not None:
            self._write_refs(repo, refs)
        aside = self._discard(check_repo(repo), check_revision(revision))
        if aside is not None:
            shutil.rmtree(aside)

    def footprint(self, repo: str, revision: str) -> Optional[int]:
        """Bytes in the folder of ``repo@revision``, listed or not (a crash midway through `remove`
        leaves an unlisted one); None when there is no such folder. What retention frees by removing it."""
        folder = self.root / check_repo(repo) / check_revision(revision)
        if not folder.is_dir():
            return None
        return sum(os.path.getsize(os.path.join(top, name)) for top, _dirs, files in os.walk(folder) for name in files)

    def repair(self, problems: list[Problem]) -> list[Problem]:
        """Remove orphan and unrecorded revisions and leftover temporary folders among ``problems``
        (found by ``verify_all(known)``, the registry's rows); return the problems removed.

        An unrecorded folder that the registry does list (it is also `missing`) is kept: it is not
        debris, and ``fedem verify`` keeps reporting it.
        """
        listed = {(p.repo, p.revision) for p in problems if p.kind == "missing"}
        removed = []
        for p in problems:
            if p.kind in ("orphan", "unrecorded") and (p.repo, p.revision) not in listed:
                self.remove(p.repo, p.revision)
            elif p.kind == "leftover":
                shutil.rmtree(self.root / TMP_DIR / p.revision)
            else:
                continue
            log.info("Removed %s %s", p.kind, f"{p.repo}@{p.revision}" if p.repo else p.revision)
            removed.append(p)
        return removed

    # -- checking ------------------------------------------------------------------------------
    def verify_all(self, known: Optional[set[tuple[str, str, str]]] = None) -> list[Problem]:
        """Re-hash every stored revision; compare with put-time digests and, if given, the registry's."""
        problems: list[Problem] = []
        stored: dict[tuple[str, str], str] = {}
        for repo in self._repo_folders():
            refs = self._refs(repo)
            folders = sorted(p for p in (self.root / repo).iterdir() if p.is_dir() and not p.name.startswith("."))
            for rev_dir in folders:
                rev, recorded = rev_dir.name, refs["revisions"].get(rev_dir.name)
                actual = manifest(rev_dir)
                if recorded is None:
                    detail = f"folder {rev_dir} is not in {REFS_FILE} (digest {digest_of(actual)})"
                    problems.append(Problem("unrecorded", repo, rev, detail))
                    continue
                stored[(repo, rev)] = recorded["digest"]
                if digest_of(actual) != recorded["digest"]:
                    problems.append(Problem("mismatch", repo, rev, "; ".join(diff(_entries(recorded), actual))))
            for rev in sorted(set(refs["revisions"]) - {p.name for p in folders}):
                detail = f"listed in {REFS_FILE} but {self.root / repo / rev} does not exist"
                problems.append(Problem("missing", repo, rev, detail))
        if known is not None:
            problems += against_registry(stored, known)
        tmp = self.root / TMP_DIR
        for leftover in sorted(tmp.iterdir()) if tmp.is_dir() else []:
            problems.append(Problem("leftover", "", leftover.name, f"temporary folder {leftover} from an "
                                                                   "interrupted put; safe to delete"))
        return problems

    def _repo_folders(self, recorded_only: bool = False) -> list[str]:
        """`org/name` of every repo folder (with ``recorded_only``: those with a refs file)."""
        if not self.root.is_dir():
            return []
        return sorted(
            f"{org.name}/{name.name}"
            for org in self.root.iterdir()
            if org.is_dir() and not org.name.startswith(".")
            for name in org.iterdir()
            if (name / REFS_FILE).is_file() or (not recorded_only and name.is_dir())
        )


def against_registry(stored: dict[tuple[str, str], str], known: set[tuple[str, str, str]]) -> list[Problem]:
    """Stored `(repo, revision) -> digest` vs. registry rows: disagreements, orphans, missing artifacts."""
    problems = []
    by_key = {(r, v): d for r, v, d in known}
    for (repo, rev), digest in sorted(stored.items()):
        if (repo, rev) not in by_key:
            detail = "stored but not in the registry (a crash between the store and the registry commit?)"
            problems.append(Problem("orphan", repo, rev, detail))
        elif by_key[(repo, rev)] != digest:
            detail = f"registry digest {by_key[(repo, rev)]}, stored digest {digest}"
            problems.append(Problem("registry-mismatch", repo, rev, detail))
    for repo, rev in sorted(by_key.keys() - stored.keys()):
        problems.append(Problem("missing", repo, rev, "in the registry but not in the store"))
    return problems


def _entries(recorded: dict) -> list[Entry]:
    return [(p, h, int(s)) for p, h, s in recorded["manifest"]]


def revision_sort_key(revision: str) -> tuple[int, int, str]:
    """Sort key: other names first, then `v{n}` by n (so `v10` follows `v9`)."""
    n = version_of(revision)
    return (1, n, "") if n is not None else (0, 0, revision)
