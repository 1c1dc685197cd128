"""Publish the public ledger as a static Hugging Face Space (`fedem publish --site`).

The site is built afresh into a temporary folder, given the Space card a static Space needs
(``sdk: static``, ``app_file: index.html``) and uploaded as one commit that also deletes files an
earlier site had and this one has not, so the Space is always exactly the current site.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

from fedem_flwr.hub.hf_store import hf_repo_id
from fedem_flwr.hub.registry import Registry
from fedem_flwr.site.build import build_site

SPACE_NAME = "site"  # ORG/NAME -> the Space ORG/NAME-site


def space_card(title: str) -> str:
    """The README.md front matter of a static Space serving ``index.html``."""
    return (f"---\ntitle: {title}\nsdk: static\napp_file: index.html\npinned: false\n---\n\n"
            "The public ledger of a fedem-flwr hub: its base model lineage, progress, every contribution "
            "and how it was judged. Contributors appear only by pseudonym.\n")


def publish_site(registry: Registry, repo_prefix: str, now: float, endpoint: Optional[str] = None,
                 token: Optional[str] = None, *, private: bool = False) -> str:
    """Build the site of ``registry`` and upload it to the Space under ``repo_prefix``; return its id."""
    from huggingface_hub import HfApi

    repo_id = hf_repo_id(SPACE_NAME, repo_prefix)
    api = HfApi(endpoint=endpoint, token=token)
    with tempfile.TemporaryDirectory(prefix="fedem-site-") as tmp:
        folder = Path(tmp)
        data = build_site(registry, folder, now)
        (folder / "README.md").write_text(space_card(repo_id.split("/")[1]), encoding="utf-8")
        api.create_repo(repo_id, repo_type="space", space_sdk="static", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, repo_type="space", folder_path=folder, delete_patterns=["*"],
                          commit_message=f"public ledger built {data['built']} ({data['contributions']} contributions)")
    return repo_id
