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
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from fedem_flwr.errors import RevisionNotFound
from fedem_flwr.hub.hf_store import HfStore
from fedem_flwr.hub.lineage import base_chat_template, checkpoint_card, version_card
from fedem_flwr.hub.paths import hf_cache_path, store_path
from fedem_flwr.hub.registry import Registry
from fedem_flwr.hub.store import ArtifactRef, LocalStore, copy_tree

ADAPTER_CONFIG = "adapter_config.json"


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
    """
    local = LocalStore(store_path(hub_path))
    hf = HfStore(repo_prefix=repo_prefix, endpoint=endpoint, token=token, private=private,
                 cache_dir=hf_cache_path(hub_path), tries=tries, sleep=sleep)
    pushed: list[str] = []

    def push(repo: str, revision: str, folder: Path, message: str, card) -> None:
        _ref, uploaded = hf.push(repo, revision, folder, message, card)
        if uploaded:
            pushed.append(f"{hf.repo_id(repo)}@{revision}")

    bases: dict[int, tuple[str, str]] = {}
    templates: dict[int, Optional[str]] = {}
    for cp in sorted(registry.checkpoints(), key=lambda c: c.version):
        rid = hf.repo_id(cp.repo)
        folder = local.get(ArtifactRef(cp.repo, cp.revision, cp.digest))
        card = checkpoint_card(registry, rid, cp.version, cp.parent, cp.source, cp.metrics, registry.absorbed(cp.version))
        push(cp.repo, cp.revision, folder, f"base checkpoint v{cp.version} ({cp.source})", card)
        bases[cp.version] = (rid, cp.revision)
        templates[cp.version] = base_chat_template(local, cp.repo, cp.revision)  # a chat adapter's card shows it

    for av in sorted(registry.adapter_versions(), key=lambda a: (a.adapter, a.version)):
        if av.base_version not in bases:
            raise RevisionNotFound(f"adapter {av.adapter!r} v{av.version} was trained on base version "
                                   f"{av.base_version}, which the registry does not list")
        base_rid, base_rev = bases[av.base_version]
        rid = hf.repo_id(av.repo)
        source = local.get(ArtifactRef(av.repo, av.revision, av.digest))
        with tempfile.TemporaryDirectory(prefix="fedem-publish-") as tmp:
            stage = Path(tmp) / "adapter"
            copy_tree(source, stage)
            rewrite_adapter_config(stage, base_rid, base_rev)
            card = version_card(registry, av, rid, base_rid, base_rev, chat_template=templates[av.base_version])
            push(av.repo, av.revision, stage, f"adapter {av.adapter} v{av.version} on {base_rid}@{base_rev}", card)
    return pushed
