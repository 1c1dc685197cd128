"""Publish the hub's local artifacts to a Hugging Face Hub (`fedem publish --to hf`).

Every base checkpoint and adapter version the registry lists is read from the local store (verified
against the registry's digest), given a model card, and pushed with `HfStore` under `repo_prefix`
(`ORG/NAME` -> `ORG/NAME-base`, `ORG/NAME-adapter-{name}`; see `hf_store.hf_repo_id`) as a commit
tagged `v{n}`, in version order so `main` ends on the latest. An adapter's `adapter_config.json` is
rewritten on the way: `base_model_name_or_path` becomes the published base repo id and `revision`
the base version it was trained on, so `peft.AutoPeftModelForCausalLM.from_pretrained(repo_id)`
loads exactly that base from the same Hub. The published bytes therefore differ from the local
ones (README.md, adapter_config.json): each tag's own digest is in its commit description.

Idempotent: a tag that already holds the same bytes is skipped, one with other bytes is a
`RevisionExists`, and a run interrupted halfway resumes where it stopped.

Each revision pushed (or found already there) is recorded with `Registry.record_publication` under
the target `hf:<endpoint>` and the registry's digest of the local artifact, so retention
(`hub.retention.publish_first`) knows the local copy is no longer the only one. A version retention
pruned has no local files: it is skipped (a warning names it when it was never published there), and
so is a version recorded as published there whose base was pruned (its card would lose the base's
chat template, and its tag already holds it).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Union

from fedem_flwr.errors import RevisionNotFound
from fedem_flwr.hub.hf_store import HfStore
from fedem_flwr.hub.lineage import base_chat_template, checkpoint_card, version_card
from fedem_flwr.hub.paths import hf_cache_path, registry_path, store_path
from fedem_flwr.hub.records import AdapterVersion, Checkpoint
from fedem_flwr.hub.registry import Registry
from fedem_flwr.hub.store import ArtifactRef, LocalStore, copy_tree

ADAPTER_CONFIG = "adapter_config.json"
Row = Union[Checkpoint, AdapterVersion]

log = logging.getLogger(__name__)


def hf_target(endpoint: str) -> str:
    """The publication target of a Hugging Face Hub endpoint: ``hf:<endpoint>``."""
    return f"hf:{endpoint.rstrip('/')}"


def rewrite_adapter_config(folder: Path, base_repo_id: str, base_revision: str) -> None:
    """Point a PEFT adapter folder at its published base (`base_model_name_or_path`, `revision`)."""
    path = Path(folder) / ADAPTER_CONFIG
    config = json.loads(path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base_repo_id
    config["revision"] = base_revision
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def publish_hub(
    hub_path: Path,
    registry: Registry,
    repo_prefix: str,
    endpoint: Optional[str] = None,
    token: Optional[str] = None,
    *,
    private: bool = False,
    tries: int = 3,
    sleep: Callable[[float], None] = time.sleep,
) -> list[str]:
    """Push every registered base checkpoint and adapter version; return the `repo_id@tag`s pushed.

    Each gets its card (`hub.lineage`) naming the published repo ids: a base's parent, source, merge
    and absorbed adapters, CPT steps and held-out losses; an adapter's base, kind and contributors.
    Each is recorded as published to `hf:<endpoint>` (a read-only ``registry`` is reopened to write).
    """
    local = LocalStore(store_path(hub_path))
    hf = HfStore(repo_prefix=repo_prefix, endpoint=endpoint, token=token, private=private,
                 cache_dir=hf_cache_path(hub_path), tries=tries, sleep=sleep)
    target = hf_target(hf.endpoint)
    writer = Registry.open(registry_path(hub_path)) if registry.readonly else registry
    try:
        return _publish_all(registry, writer, local, hf, target)
    finally:
        if writer is not registry:
            writer.close()


def _publish_all(registry: Registry, writer: Registry, local: LocalStore, hf: HfStore, target: str) -> list[str]:
    pushed: list[str] = []
    done = registry.publications(target)

    def push(row: Row, folder: Path, message: str, card: Any) -> None:
        _ref, uploaded = hf.push(row.repo, row.revision, folder, message, card)
        if uploaded:
            pushed.append(f"{hf.repo_id(row.repo)}@{row.revision}")
        writer.record_publication(row.repo, row.revision, row.digest, target, at=time.time())

    def skipped(row: Row, what: str, base_pruned: bool = False) -> bool:
        """Whether ``row`` cannot or need not be pushed again (module docstring)."""
        if row.pruned is None and not (base_pruned and (row.repo, row.revision) in done):
            return False
        if (row.repo, row.revision) not in done:
            log.warning("%s was pruned from the local store before it was published to %s; it cannot be "
                        "published now", what, target)
        return True

    bases: dict[int, tuple[str, str]] = {}
    templates: dict[int, Optional[str]] = {}
    checkpoints = sorted(registry.checkpoints(), key=lambda c: c.version)
    pruned_bases = {cp.version for cp in checkpoints if cp.pruned is not None}
    for cp in checkpoints:
        rid = hf.repo_id(cp.repo)
        bases[cp.version] = (rid, cp.revision)
        if skipped(cp, f"base v{cp.version}"):
            templates[cp.version] = None
            continue
        folder = local.get(ArtifactRef(cp.repo, cp.revision, cp.digest))
        card = checkpoint_card(registry, rid, cp.version, cp.parent, cp.source, cp.metrics,
                               registry.absorbed(cp.version))
        push(cp, folder, f"base checkpoint v{cp.version} ({cp.source})", card)
        templates[cp.version] = base_chat_template(local, cp.repo, cp.revision)  # a chat adapter's card shows it

    for av in sorted(registry.adapter_versions(), key=lambda a: (a.adapter, a.version)):
        if av.base_version not in bases:
            raise RevisionNotFound(f"adapter {av.adapter!r} v{av.version} was trained on base version "
                                   f"{av.base_version}, which the registry does not list")
        if skipped(av, f"adapter {av.adapter!r} v{av.version}", av.base_version in pruned_bases):
            continue
        base_rid, base_rev = bases[av.base_version]
        rid = hf.repo_id(av.repo)
        source = local.get(ArtifactRef(av.repo, av.revision, av.digest))
        with tempfile.TemporaryDirectory(prefix="fedem-publish-") as tmp:
            stage = Path(tmp) / "adapter"
            copy_tree(source, stage)
            rewrite_adapter_config(stage, base_rid, base_rev)
            card = version_card(registry, av, rid, base_rid, base_rev, chat_template=templates[av.base_version])
            push(av, stage, f"adapter {av.adapter} v{av.version} on {base_rid}@{base_rev}", card)
    return pushed
