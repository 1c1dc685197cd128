"""A local Hugging Face Hub endpoint, so tests and benchmarks run the real `huggingface_hub` offline.

`serve_hub()` starts a `ThreadingHTTPServer` on 127.0.0.1 (a free port) that answers the part of
the Hub HTTP API that `huggingface_hub` 1.x, transformers, PEFT and datasets call:

- `POST /api/repos/create`, `DELETE /api/repos/delete`, `POST /api/validate-yaml`, `GET /api/whoami-v2`
- `GET /api/{models,datasets}` (list, `author=`/`search=`), `GET /api/{type}s/{repo}` and
  `.../revision/{rev}` (sha, siblings), `.../refs`, `.../commits/{rev}`, `.../tree/{rev}[/{path}]`,
  `POST .../paths-info/{rev}`, `POST .../preupload/{rev}` (every file is "regular": contents travel
  base64 in the commit, so no LFS or Xet transfer is needed), `POST .../commit/{rev}` (NDJSON
  `header`, `file`, `deletedFile`, `deletedFolder`), `POST .../tag/{rev}`, `DELETE .../tag/{tag}`
- `HEAD`/`GET /{repo}/resolve/{rev}/{path}` and `/datasets/{repo}/resolve/...` with `X-Repo-Commit`,
  `ETag` (the git blob id), `Content-Length` and byte ranges; 404s carry the Hub's `X-Error-Code`
  (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`), which the client maps to its typed errors.

Pointing clients at it. `HfApi(endpoint=...)`, `snapshot_download(endpoint=...)` and
`hf_hub_download(endpoint=...)` take the endpoint per call. transformers, PEFT and datasets do not:
they read `HF_ENDPOINT` once, at import, into `huggingface_hub.constants.ENDPOINT` /
`HUGGINGFACE_CO_URL_TEMPLATE` and `datasets.config.HF_ENDPOINT` / `HUB_DATASETS_URL` (cache folders
likewise), and PEFT calls `huggingface_hub.file_exists`, a method of one `HfApi` built at import.
Setting the variable after those imports changes nothing, so `hub_environment()` (in `hf_env`) sets
the environment variables AND patches those module constants for the duration of a `with` block,
and restores both afterwards; it is what tests use (fixtures `local_hub`, `hf_env`). A fresh process
started with `HF_ENDPOINT` set needs neither.

Private repos. With `LocalHub.tokens` empty (the default) every repo is open to every client. Once
it holds tokens, a request on a private repo without `Authorization: Bearer <one of them>` is
answered as the Hub answers it: 401 with `X-Error-Code: RepoNotFound`.

Faults. `LocalHub.fail(method, path_part, status, times)` answers matching requests with an error,
e.g. to test retries. `upload_folder` retries a failed commit itself (5 times, 1-8 s apart), so
fault tests go through `create_commit`, which does not. Uploads travel base64 inside the commit
(about 8 s for 64 MiB on a loaded 2-core machine): fine for tiny test models.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import shutil
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator
from urllib.parse import parse_qs, unquote, urlsplit

from tests.support.hf_env import hub_environment
from tests.support.hf_repos import Commit, HubError, Repo, RepoStore

__all__ = ["LocalHub", "hub_environment", "serve_hub"]

_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}


def _tree_entries(commit: Commit, path: str, recursive: bool) -> list[dict]:
    """The Hub's tree listing of `path` (a folder, "" for the root) at `commit`."""
    base = f"{path.strip('/')}/" if path.strip("/") else ""
    files, folders = [], set()
    for p, blob in sorted(commit.tree.items()):
        if not p.startswith(base):
            continue
        rest = p[len(base) :].split("/")
        for i in range(1, len(rest)):  # every folder on the way to the file
            if recursive or i == 1:
                folders.add(base + "/".join(rest[:i]))
        if recursive or len(rest) == 1:
            files.append({"type": "file", "oid": blob.oid, "size": blob.size, "path": p})
    if base and not files and not folders:
        raise HubError(404, f"{path} does not exist on {commit.id}", "EntryNotFound", commit.id)
    dirs = [{"type": "directory", "oid": "0" * 40, "size": 0, "path": f} for f in sorted(folders)]
    return dirs + files


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - quiet unless asked
        if self.server.verbose:
            sys.stderr.write("hf_server: " + format % args + "\n")

    # -- plumbing ------------------------------------------------------------------------------
    def _body(self) -> bytes:
        return self._raw

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, ctype="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, status: int = 200) -> None:
        self._send(status, json.dumps(obj).encode())

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        segs = [unquote(s) for s in url.path.strip("/").split("/")]
        query = parse_qs(url.query)
        # Read the whole body first, even for an error reply: on a kept-alive connection, unread
        # bytes would be parsed as the next request.
        self._raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            self.server.hub.take_fault(self.command, url.path)
            self._route(segs, query)
        except HubError as e:
            headers = {"X-Error-Message": e.message.replace("\n", " ")}
            if e.code:
                headers["X-Error-Code"] = e.code
            if e.commit:
                headers["X-Repo-Commit"] = e.commit
            self._send(e.status, json.dumps({"error": e.message, **e.extra}).encode(), headers)

    do_GET = do_HEAD = do_POST = do_DELETE = do_PUT = _dispatch

    # -- routes --------------------------------------------------------------------------------
    def _route(self, segs: list[str], query: dict) -> None:
        store, method = self.server.store, self.command
        if segs[:1] == ["api"]:
            rest = segs[1:]
            if rest == ["repos", "create"] and method == "POST":
                return self._create(json.loads(self._body() or b"{}"))
            if rest == ["repos", "delete"] and method == "DELETE":
                p = json.loads(self._body() or b"{}")
                store.delete(p.get("type") or "model", f"{p.get('organization')}/{p['name']}")
                return self._json({})
            if rest == ["validate-yaml"]:
                return self._json({"errors": [], "warnings": []})
            if rest == ["whoami-v2"]:
                return self._json({"type": "user", "name": "local", "orgs": [], "auth": {}})
            if len(rest) == 1 and rest[0] in _TYPES and method == "GET":
                return self._list(_TYPES[rest[0]], query)
            if len(rest) >= 3 and rest[0] in _TYPES:
                repo = store.get(_TYPES[rest[0]], f"{rest[1]}/{rest[2]}")
                return self._repo_api(repo, rest[3:], query)
        elif len(segs) >= 5 and segs[0] in ("datasets", "spaces") and segs[3] == "resolve":
            return self._resolve(store.get(_TYPES[segs[0]], f"{segs[1]}/{segs[2]}"), segs[4], segs[5:])
        elif len(segs) >= 4 and segs[2] == "resolve":
            return self._resolve(store.get("model", f"{segs[0]}/{segs[1]}"), segs[3], segs[4:])
        raise HubError(404, f"No route for {method} {self.path}")

    def _create(self, payload: dict) -> None:
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or 'local'}/{payload['name']}"
        private = bool(payload.get("private")) or payload.get("visibility") == "private"
        url = f"{self.server.endpoint}/{_PREFIX[repo_type]}{repo_id}"
        try:
            self.server.store.create(repo_type, repo_id, private)
        except HubError as e:  # the Hub names the existing repo in a 409, and clients read it
            e.extra["url"] = url
            raise
        self._json({"url": url, "name": repo_id})

    def _list(self, repo_type: str, query: dict) -> None:
        author = (query.get("author") or [None])[0]
        search = (query.get("search") or [""])[0]
        repos = [
            r
            for r in self.server.store.list(repo_type)
            if (author is None or r.id.split("/")[0] == author) and search in r.id
        ]
        self._json([self._info(r, self.server.store.resolve(r, "main")) for r in repos])

    def _info(self, repo: Repo, commit: Commit) -> dict:
        siblings = [{"rfilename": p, "size": b.size, "blobId": b.oid} for p, b in sorted(commit.tree.items())]
        return {
            "id": repo.id,
            "_id": repo.id,
            "author": repo.id.split("/")[0],
            "sha": commit.id,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "createdAt": repo.created,
            "lastModified": commit.date,
            "tags": [],
            "downloads": 0,
            "likes": 0,
            "siblings": siblings,
            "cardData": {},
        }

    def _check_access(self, repo: Repo) -> None:
        tokens = self.server.hub.tokens
        sent = (self.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
        if repo.private and tokens and sent not in tokens:
            raise HubError(401, f"Repository Not Found for {repo.id}: it is private and no valid token was sent",
                           "RepoNotFound")

    def _repo_api(self, repo: Repo, rest: list[str], query: dict) -> None:
        store, method = self.server.store, self.command
        self._check_access(repo)
        action, rev = (rest + ["", ""])[:2]
        if not rest and method == "GET":
            return self._json(self._info(repo, store.resolve(repo, "main")))
        if action == "revision" and method == "GET":
            return self._json(self._info(repo, store.resolve(repo, rev)))
        if action == "refs" and method == "GET":
            refs = lambda kind, d: [  # noqa: E731
                {"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": c} for n, c in sorted(d.items())
            ]
            return self._json(
                {"branches": refs("heads", repo.branches), "tags": refs("tags", repo.tags), "converts": [],
                 "pullRequests": []}
            )
        if action == "commits" and method == "GET":
            return self._json(
                [
                    {"id": c.id, "title": c.title, "message": c.message, "date": c.date,
                     "authors": [{"user": "local"}]}
                    for c in store.history(repo, rev)
                ]
            )
        if action == "tree" and method == "GET":
            recursive = (query.get("recursive") or ["false"])[0].lower() in ("1", "true")
            return self._json(_tree_entries(store.resolve(repo, rev), "/".join(rest[2:]), recursive))
        if action == "paths-info" and method == "POST":
            commit = store.resolve(repo, rev)
            form = parse_qs(self._body().decode())
            out = []
            for path in form.get("paths", []):
                if path in commit.tree:
                    b = commit.tree[path]
                    out.append({"type": "file", "oid": b.oid, "size": b.size, "path": path})
                elif any(p.startswith(path.rstrip("/") + "/") for p in commit.tree):
                    out.append({"type": "directory", "oid": "0" * 40, "size": 0, "path": path})
            return self._json(out)
        if action == "preupload" and method == "POST":
            files = json.loads(self._body())["files"]
            head = repo.branches.get(rev)
            tree = repo.commits[head].tree if head else {}
            return self._json(
                {
                    "files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                         "oid": tree[f["path"]].oid if f["path"] in tree else None}
                        for f in files
                    ],
                    "commitOid": head,
                }
            )
        if action == "commit" and method == "POST":
            return self._commit(repo, rev, self._body())
        if action == "tag" and method == "POST":
            store.tag(repo, json.loads(self._body())["tag"], rev)
            return self._json({})
        if action == "tag" and method == "DELETE":
            store.delete_tag(repo, rev)
            return self._json({})
        raise HubError(404, f"No route for {method} {self.path}")

    def _commit(self, repo: Repo, branch: str, body: bytes) -> None:
        store = self.server.store
        header, added, deleted = {}, {}, []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, f"Unsupported encoding {value.get('encoding')!r}")
                added[value["path"]] = store.put_blob(base64.b64decode(value["content"]))
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"].rstrip("/") + ("/" if key == "deletedFolder" else ""))
            else:
                raise HubError(400, f"Unsupported commit operation {key!r}: this endpoint stores regular files")
        commit = store.commit(
            repo, branch, added, deleted, header.get("summary", ""), header.get("description", ""),
            header.get("parentCommit"),
        )
        url = f"{self.server.endpoint}/{_PREFIX[repo.type]}{repo.id}/commit/{commit.id}"
        self._json({"success": True, "commitOid": commit.id, "commitUrl": url, "pullRequestUrl": None})

    def _resolve(self, repo: Repo, rev: str, path_segs: list[str]) -> None:
        self._check_access(repo)
        commit = self.server.store.resolve(repo, rev)
        path = "/".join(path_segs)
        blob = commit.tree.get(path)
        if blob is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", commit.id)
        headers = {"X-Repo-Commit": commit.id, "ETag": f'"{blob.oid}"', "Accept-Ranges": "bytes"}
        data = b"" if self.command == "HEAD" else self.server.store.blob_path(blob).read_bytes()
        match = re.match(r"bytes=(\d*)-(\d*)$", self.headers.get("Range") or "")
        if match and self.command == "GET":
            start = int(match[1]) if match[1] else max(blob.size - int(match[2] or 0), 0)
            end = int(match[2]) if match[1] and match[2] else blob.size - 1
            end = min(end, blob.size - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{blob.size}"
            return self._send(206, data[start : end + 1], headers, "application/octet-stream")
        headers["Content-Length"] = blob.size
        self._send(200, data, headers, "application/octet-stream")


@dataclass
class LocalHub:
    """A running endpoint: `endpoint` is its base URL, `store` its repos (for direct inspection)."""

    endpoint: str
    store: RepoStore
    faults: list[list] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    tokens: set[str] = field(default_factory=set)  # when set, the only keys to private repos

    def fail(self, method: str, path_part: str, status: int = 503, times: int = 1) -> None:
        """Answer the next `times` requests `method` whose path contains `path_part` with `status`."""
        self.faults.append([method, path_part, status, times])

    def take_fault(self, method: str, path: str) -> None:
        self.requests.append(f"{method} {path}")
        for fault in self.faults:
            if fault[0] == method and fault[1] in path and fault[3] > 0:
                fault[3] -= 1
                raise HubError(fault[2], f"injected failure of {method} {path}")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    store: RepoStore
    endpoint: str
    verbose: bool
    hub: LocalHub


@contextlib.contextmanager
def serve_hub(root: Path | None = None, verbose: bool = False) -> Iterator[LocalHub]:
    """Serve a Hub on 127.0.0.1:<free port> until the block ends; blobs live under `root` (else a temp dir)."""
    tmp = None if root is not None else tempfile.mkdtemp(prefix="local-hub-")
    store = RepoStore(Path(root if root is not None else tmp))
    server = _Server(("127.0.0.1", 0), _Handler)
    server.store, server.verbose = store, verbose
    server.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    server.hub = LocalHub(server.endpoint, store)
    thread = threading.Thread(target=server.serve_forever, name="local-hub", daemon=True)
    thread.start()
    try:
        yield server.hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
