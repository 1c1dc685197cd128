"""The artifact store on a Hugging Face Hub, through the real `huggingface_hub` client.

Repo ids. The Hub allows exactly one slash (`namespace/name`), so a store repo is mapped by its last
part: with `repo_prefix="ORG/NAME"`, `fedem/base` -> `ORG/NAME-base` and `fedem/adapter-hi` ->
`ORG/NAME-adapter-hi`; with `repo_prefix="ORG"`, -> `ORG/base`, `ORG/adapter-hi`; without a prefix
the repo id is used as it is. `repos()`, `revisions()` and `verify_all()` report Hub ids.

Revisions. `put` uploads the folder as one commit on `main` (files the folder lacks are deleted, so
the commit is exactly the artifact) and then tags that commit `v{n}`: a failed upload leaves no
tag, and `main` is the latest version as long as versions are put in order (`publish_hub` does).
The commit description records `fedem-digest: <sha256>`, the digest of what was uploaded, which
`put` (idempotence, `RevisionExists`) and `verify_all` read back. A `.gitattributes` (the Hub adds
one to every repo) is never part of an artifact: it is neither uploaded nor downloaded.

Orphans. A tag the registry does not know (a crash between the upload and the registry commit) is
an orphan: `put(..., replace_orphan=True)` commits the new content and moves the tag onto it, and
`repair` deletes orphan tags (their commits stay in `main`'s history, and `main` holds an orphan's
files until the next version is put).

Failures. Connection errors, timeouts and 408, 429, 500, 502, 503 and 504 answers (the set
huggingface_hub's own `http_backoff` retries) are tried `tries` times in all, waiting `backoff_s` and
then twice as long each time (tenacity; `sleep` is injectable, so tests take milliseconds), then raise
`HubUnreachable` naming the endpoint. Other answers (401, 403, 404, a missing revision) are final at
once. `http_backoff` itself retries one HTTP request and most `HfApi` calls do not use it, so the
retries wrap each whole call here. With `HF_HUB_OFFLINE=1` nothing is sent: `get` serves the local
cache (`cache_dir`) and names the revision that is not cached; `put` refuses.
"""

from __future__ import annotations

import logging
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import httpx
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    ModelCard,
    constants,
    snapshot_download,
)
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id
from tenacity import RetryCallState, RetryError, Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from fedem_flwr.errors import ConfigError, DigestMismatch, HubUnreachable, RevisionExists, RevisionNotFound
from fedem_flwr.faults import kill_point
from fedem_flwr.hub.manifest import digest_of, manifest, verify_folder
from fedem_flwr.hub.store import ArtifactRef, Problem, against_registry, check_revision, copy_tree, revision_sort_key

T = TypeVar("T")
DIGEST_LINE = "fedem-digest: "
_DIGEST = re.compile(r"^fedem-digest: ([0-9a-f]{64})$", re.MULTILINE)
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})  # as huggingface_hub's http_backoff retries
_NOT_ARTIFACT = [".gitattributes"]

log = logging.getLogger(__name__)


def hf_repo_id(repo: str, repo_prefix: Optional[str]) -> str:
    """The Hub id of a store repo under `repo_prefix` (module docstring); `ConfigError` if invalid."""
    if repo_prefix:
        name = repo.rsplit("/", 1)[-1]
        rid = f"{repo_prefix}-{name}" if "/" in repo_prefix else f"{repo_prefix}/{name}"
    else:
        rid = repo
    try:
        validate_repo_id(rid)
        if rid.count("/") != 1:
            raise HFValidationError("expected `namespace/name`")
    except HFValidationError as err:
        raise ConfigError(f"`hub.repo_prefix` {repo_prefix!r} maps repo {repo!r} to {rid!r}, which is not a "
                          f"valid Hugging Face repo id: {err}") from None
    return rid


class HfStore:
    """Artifacts as tagged commits of Hugging Face repos (module docstring)."""

    def __init__(
        self,
        repo_prefix: Optional[str] = None,
        endpoint: Optional[str] = None,
        token: Optional[str] = None,
        cache_dir: Optional[Path] = None,
        private: bool = False,
        tries: int = 3,
        backoff_s: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
        offline: Optional[bool] = None,
    ):
        if tries < 1:
            raise ConfigError(f"`tries` is {tries}; it must be at least 1")
        self.repo_prefix = repo_prefix
        self.endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
        self.token = token
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.private, self.tries, self.backoff_s, self.sleep = private, tries, backoff_s, sleep
        self.offline = constants.HF_HUB_OFFLINE if offline is None else offline
        self.api = HfApi(endpoint=self.endpoint, token=token)

    def repo_id(self, repo: str) -> str:
        return hf_repo_id(repo, self.repo_prefix)

    # -- network -------------------------------------------------------------------------------
    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run `fn`, retrying transient failures with exponential backoff, then `HubUnreachable`."""
        if self.offline:
            raise HubUnreachable(f"HF_HUB_OFFLINE is set: {what} on {self.endpoint} is not allowed")

        def say_retry(state: RetryCallState) -> None:
            log.warning("%s on %s failed (%s), try %d of %d; again in %.1f s", what, self.endpoint,
                        _summary(state.outcome.exception()), state.attempt_number, self.tries, state.upcoming_sleep)

        retrying = Retrying(stop=stop_after_attempt(self.tries), wait=wait_exponential(multiplier=self.backoff_s),
                            retry=retry_if_exception(_is_transient), sleep=self.sleep, before_sleep=say_retry)
        try:
            return retrying(fn)
        except OfflineModeIsEnabled as err:
            raise HubUnreachable(f"HF_HUB_OFFLINE is set: {what} on {self.endpoint} is not allowed") from err
        except RetryError as err:
            last = err.last_attempt.exception()
            raise HubUnreachable(f"Hugging Face Hub endpoint {self.endpoint} unreachable: {what} failed "
                                 f"{self.tries} times ({_summary(last)})") from last

    def _tags(self, rid: str) -> dict[str, str]:
        try:
            refs = self._call(f"listing refs of {rid}", lambda: self.api.list_repo_refs(rid))
        except RepositoryNotFoundError:
            return {}
        return {t.name: t.target_commit for t in refs.tags}

    def _recorded_digest(self, rid: str, revision: str) -> str:
        """The digest `put` wrote in the commit that tag `revision` names ("" if it wrote none)."""
        commits = self._call(f"reading {rid}@{revision}", lambda: self.api.list_repo_commits(rid, revision=revision))
        match = _DIGEST.search(commits[0].message or "") if commits else None
        return match.group(1) if match else ""

    def _download(self, rid: str, revision: str, force: bool = False) -> Path:
        def fetch() -> str:
            return snapshot_download(
                rid, revision=revision, endpoint=self.endpoint, token=self.token, cache_dir=self.cache_dir,
                ignore_patterns=_NOT_ARTIFACT, force_download=force, local_files_only=self.offline,
            )

        try:
            if self.offline:
                return Path(fetch())
            return Path(self._call(f"downloading {rid}@{revision}", fetch))
        except (RevisionNotFoundError, RepositoryNotFoundError) as err:
            raise RevisionNotFound(f"revision {revision!r} of repo {rid!r} is not on {self.endpoint}") from err
        except LocalEntryNotFoundError as err:
            cache = self.cache_dir or constants.HF_HUB_CACHE
            if self.offline:
                raise HubUnreachable(f"HF_HUB_OFFLINE is set and revision {revision!r} of repo {rid!r} is not in "
                                     f"the local cache {cache}; download it once online") from err
            raise HubUnreachable(f"revision {revision!r} of repo {rid!r} could not be fetched from "
                                 f"{self.endpoint} and is not in the local cache {cache}: {err}") from err

    # -- the ArtifactStore interface -----------------------------------------------------------
    def put(self, repo: str, revision: str, folder: Path, message: str,
            card: Optional[ModelCard] = None, *, replace_orphan: bool = False) -> ArtifactRef:
        """Upload `folder` (plus `card` as README.md) as `revision`; the same content again is a no-op.

        A tag holding other content is a `RevisionExists`, unless the caller knows the registry has
        no row for `revision` (``replace_orphan=True``): then the tag is moved to the new content.
        """
        return self.push(repo, revision, folder, message, card, replace_orphan=replace_orphan)[0]

    def push(self, repo: str, revision: str, folder: Path, message: str,
             card: Optional[ModelCard] = None, *, replace_orphan: bool = False) -> tuple[ArtifactRef, bool]:
        """`put`, also saying whether anything was uploaded (False: the tag already held this content)."""
        check_revision(revision)
        rid = self.repo_id(repo)
        if self.offline:
            raise HubUnreachable(f"HF_HUB_OFFLINE is set: cannot upload {rid}@{revision} to {self.endpoint}")
        with tempfile.TemporaryDirectory(prefix="fedem-upload-") as tmp:
            stage = Path(tmp) / "artifact"
            copy_tree(Path(folder), stage)
            for name in _NOT_ARTIFACT:
                (stage / name).unlink(missing_ok=True)
            if card is not None:
                (stage / "README.md").write_text(str(card), encoding="utf-8")
            digest = digest_of(manifest(stage))
            ref = ArtifactRef(repo, revision, digest)
            self._call(f"creating {rid}", lambda: self.api.create_repo(rid, exist_ok=True, private=self.private))
            recorded = self._recorded_digest(rid, revision) if revision in self._tags(rid) else None
            if recorded == digest:
                return ref, False
            if recorded is not None:
                clash = (f"{rid}@{revision} exists on {self.endpoint} with digest {recorded or 'unrecorded'}, "
                         f"not {digest}")
                if not replace_orphan:
                    raise RevisionExists(f"{clash}; tags are never moved")
                log.warning("Replacing orphan tag %s (unknown to the registry): %s", rid, clash)
            info = self._call(f"uploading {rid}@{revision}", lambda: self._commit(rid, stage, message, digest))
            if recorded is not None:
                self._delete_tag(rid, revision)
            self._call(f"tagging {rid}@{revision}", lambda: self.api.create_tag(
                rid, tag=revision, revision=info.oid, tag_message=message, exist_ok=True,
            ))
        kill_point("after-artifact-write", f"{repo}@{revision}")
        return ref, True

    def _delete_tag(self, rid: str, tag: str) -> None:
        """Delete a tag; one already gone (a retried delete that had succeeded) is fine."""
        try:
            self._call(f"deleting tag {rid}@{tag}", lambda: self.api.delete_tag(rid, tag=tag))
        except RevisionNotFoundError:
            pass

    def _commit(self, rid: str, stage: Path, message: str, digest: str) -> Any:
        """One commit on `main` whose tree is exactly `stage` (plus the Hub's `.gitattributes`).

        `create_commit` rather than `upload_folder`: the latter may split a folder into several
        commits and retries internally for tens of seconds; here the retry policy is ours.
        """
        files = sorted(p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file())
        try:
            remote = self.api.list_repo_files(rid, revision="main")
        except RevisionNotFoundError:  # a repo created without any commit
            remote = []
        operations: list[Any] = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(stage / f)) for f in files]
        operations += [CommitOperationDelete(path_in_repo=f) for f in remote
                       if f not in files and f not in _NOT_ARTIFACT]
        return self.api.create_commit(rid, operations, commit_message=message,
                                      commit_description=f"{DIGEST_LINE}{digest}", revision="main")

    def get(self, ref: ArtifactRef) -> Path:
        """The revision's files in the local cache, verified; a corrupted cache is downloaded again once."""
        rid = self.repo_id(ref.repo)
        path = self._download(rid, ref.revision)
        try:
            verify_folder(path, ref.digest)
        except DigestMismatch:
            if self.offline:
                raise
            path = self._download(rid, ref.revision, force=True)
            verify_folder(path, ref.digest)
        return path

    def local_path(self, repo: str, revision: str) -> Path:
        """The cached folder of a revision (downloaded if needed), not verified."""
        return self._download(self.repo_id(repo), revision)

    def revisions(self, repo: str) -> list[str]:
        """Tags of the repo, `v{n}` in version order."""
        return sorted(self._tags(self.repo_id(repo)), key=revision_sort_key)

    def repos(self) -> list[str]:
        """Hub ids of the model repos under `repo_prefix` (its namespace without one)."""
        if not self.repo_prefix:
            return []
        namespace, _, name = self.repo_prefix.partition("/")
        models = self._call(f"listing repos of {namespace}", lambda: list(self.api.list_models(author=namespace)))
        start = f"{self.repo_prefix}-" if name else f"{namespace}/"
        return sorted(m.id for m in models if m.id.startswith(start))

    def verify_all(self, known: Optional[set[tuple[str, str, str]]] = None) -> list[Problem]:
        """Download and re-hash every tag; compare with the digest its commit records and the registry's."""
        problems: list[Problem] = []
        stored: dict[tuple[str, str], str] = {}
        for rid in self.repos():
            for tag in sorted(self._tags(rid), key=revision_sort_key):
                recorded = self._recorded_digest(rid, tag)
                stored[(rid, tag)] = recorded
                actual = digest_of(manifest(self._download(rid, tag)))
                if actual != recorded:
                    problems.append(Problem("mismatch", rid, tag, f"content digest {actual}, recorded "
                                                                  f"{recorded or 'nothing'}"))
        if known is not None:
            problems += against_registry(stored, {(self.repo_id(r), v, d) for r, v, d in known})
        return problems

    def repair(self, problems: list[Problem]) -> list[Problem]:
        """Delete the orphan tags among ``problems`` (found by ``verify_all(known)``); return them."""
        removed = [p for p in problems if p.kind == "orphan"]
        for p in removed:
            self._delete_tag(p.repo, p.revision)
            log.info("Removed orphan tag %s@%s", p.repo, p.revision)
        return removed


def _is_transient(err: BaseException) -> bool:
    """Worth another try: no connection or a timeout, or a transient answer. `snapshot_download` reports
    those as `LocalEntryNotFoundError` when the revision is not cached, with the failure as its cause."""
    if isinstance(err, httpx.TransportError):
        return True
    if isinstance(err, HfHubHTTPError):
        return err.response is not None and err.response.status_code in _TRANSIENT_STATUS
    if isinstance(err, LocalEntryNotFoundError):
        return err.__cause__ is not None and _is_transient(err.__cause__)
    return False


def _summary(err: Optional[BaseException]) -> str:
    """`Type: first line of the message`, for a log line or an error message."""
    text = str(err).splitlines()[0] if err is not None and str(err) else ""
    return f"{type(err).__name__}: {text}"
