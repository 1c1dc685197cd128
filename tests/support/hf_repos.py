"""Content-addressed repositories behind the local Hub endpoint (`hf_server`).

The state a Hub keeps, reduced to what `huggingface_hub` reads back: repos of a type (model, dataset,
space), blobs stored once by sha256 in a folder, immutable commits (a flat tree `path -> blob`, a
parent, a title and a message) and refs (branches, tags). A commit id is the sha1 of the canonical
JSON of its parent, tree (path -> git blob id), title and message, so the same commit made twice
gets the same id and nothing depends on the clock. A blob id is git's (`sha1("blob {size}\\0" +
data)`), which is what the Hub reports for files stored as regular git blobs.

Every method holds one lock: the HTTP server is threaded, the state is small.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO_TYPES = ("model", "dataset", "space")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_SHA1 = re.compile(r"^[0-9a-f]{40}$")
# What the Hub commits into every new repo.
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.parquet filter=lfs diff=lfs merge=lfs -text\n"


class HubError(Exception):
    """An error the endpoint answers with an HTTP status and the Hub's `X-Error-Code` header."""

    def __init__(
        self, status: int, message: str, code: str | None = None, commit: str | None = None, **extra: str
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.commit, self.extra = status, message, code, commit, extra


@dataclass(frozen=True)
class Blob:
    sha256: str
    size: int
    oid: str  # git blob id


@dataclass(frozen=True)
class Commit:
    id: str
    parent: str | None
    tree: dict[str, Blob]
    title: str
    message: str
    date: str


@dataclass
class Repo:
    type: str
    id: str
    private: bool
    created: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


def git_blob_id(data: bytes) -> str:
    """The id git gives a blob, which the Hub reports as `oid`/`blobId` of regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


class RepoStore:
    """Repos, commits and refs in memory; blob contents in `root/blobs/<sha256>`."""

    def __init__(self, root: Path):
        self.root = Path(root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self._repos: dict[tuple[str, str], Repo] = {}
        self._lock = threading.RLock()

    # -- repos ---------------------------------------------------------------------------------
    def create(self, repo_type: str, repo_id: str, private: bool = False) -> Repo:
        """Create a repo with the Hub's initial commit (a `.gitattributes`); 409 if it exists."""
        if repo_type not in REPO_TYPES:
            raise HubError(400, f"Invalid repo type {repo_type!r}")
        parts = repo_id.split("/")
        if len(parts) != 2 or not all(_NAME.match(p) for p in parts):
            raise HubError(400, f"Invalid repo id {repo_id!r}: expected `namespace/name`")
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                raise HubError(409, f"You already created this {repo_type} repo: {repo_id}")
            repo = Repo(repo_type, repo_id, private, _now())
            self._repos[(repo_type, repo_id)] = repo
            self.commit(repo, "main", {".gitattributes": self.put_blob(GITATTRIBUTES)}, [], "initial commit", "")
            return repo

    def delete(self, repo_type: str, repo_id: str) -> None:
        with self._lock:
            if self._repos.pop((repo_type, repo_id), None) is None:
                raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")

    def get(self, repo_type: str, repo_id: str) -> Repo:
        with self._lock:
            repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def list(self, repo_type: str) -> list[Repo]:
        with self._lock:
            return sorted((r for (t, _), r in self._repos.items() if t == repo_type), key=lambda r: r.id)

    # -- revisions -----------------------------------------------------------------------------
    def resolve(self, repo: Repo, revision: str) -> Commit:
        """A branch, a tag or a full commit id to its commit; 404 `RevisionNotFound` otherwise."""
        with self._lock:
            cid = repo.branches.get(revision) or repo.tags.get(revision)
            if cid is None and _SHA1.match(revision) and revision in repo.commits:
                cid = revision
            if cid is None:
                raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            return repo.commits[cid]

    def history(self, repo: Repo, revision: str) -> list[Commit]:
        """Commits reachable from `revision`, newest first."""
        commit: Commit | None = self.resolve(repo, revision)
        out = []
        while commit is not None:
            out.append(commit)
            commit = repo.commits.get(commit.parent) if commit.parent else None
        return out

    # -- blobs ---------------------------------------------------------------------------------
    def put_blob(self, data: bytes) -> Blob:
        blob = Blob(hashlib.sha256(data).hexdigest(), len(data), git_blob_id(data))
        path = self.blob_path(blob)
        if not path.exists():
            tmp = path.with_suffix(f".{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
        return blob

    def blob_path(self, blob: Blob) -> Path:
        return self.root / "blobs" / blob.sha256

    # -- writes --------------------------------------------------------------------------------
    def commit(
        self,
        repo: Repo,
        branch: str,
        added: dict[str, Blob],
        deleted: list[str],
        title: str,
        message: str,
        parent: str | None = None,
    ) -> Commit:
        """Apply additions then deletions (a path, or a folder ending in `/`) on top of `branch`."""
        with self._lock:
            head = repo.branches.get(branch)
            if head is None and repo.branches:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            if parent is not None and not (head or "").startswith(parent):
                raise HubError(412, f"Parent commit {parent} is not the head of {branch} ({head})")
            tree = dict(repo.commits[head].tree) if head else {}
            for path in deleted:
                if path.endswith("/"):
                    doomed = [p for p in tree if p.startswith(path)]
                else:
                    doomed = [path] if path in tree else []
                if not doomed:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                for p in doomed:
                    del tree[p]
            tree.update(added)
            body = {
                "parent": head,
                "tree": {p: b.oid for p, b in sorted(tree.items())},
                "title": title,
                "message": message,
            }
            cid = hashlib.sha1(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
            commit = repo.commits.get(cid) or Commit(cid, head, tree, title, message, _now())
            repo.commits[cid] = commit
            repo.branches[branch] = cid
            return commit

    def tag(self, repo: Repo, tag: str, revision: str) -> None:
        with self._lock:
            commit = self.resolve(repo, revision)
            if tag in repo.tags or tag in repo.branches:
                raise HubError(409, f"Tag {tag} already exists in {repo.id}")
            repo.tags[tag] = commit.id

    def delete_tag(self, repo: Repo, tag: str) -> None:
        with self._lock:
            if repo.tags.pop(tag, None) is None:
                raise HubError(404, f"Invalid rev id: {tag}", "RevisionNotFound")
