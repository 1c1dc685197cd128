"""The hub's configured artifact store: a local folder (``hub.store=local``) or the Hugging Face Hub
(``hf``). The one place that knows both backends: ``hf_store`` builds on ``store``, never the reverse.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedem_flwr.errors import ConfigError
from fedem_flwr.hub.paths import hf_cache_path, store_path
from fedem_flwr.hub.store import ArtifactStore, LocalStore


def open_store(hub_path: Path, kind: str = "local", **kw: Any) -> ArtifactStore:
    """The hub's store: `local` under `hub_path/store`, or `hf` (`HfStore(**kw)`: repo_prefix, endpoint, token)."""
    if kind == "local":
        return LocalStore(store_path(hub_path))
    if kind == "hf":
        from fedem_flwr.hub.hf_store import HfStore  # a lazy import: huggingface_hub only when asked for

        kw.setdefault("cache_dir", hf_cache_path(hub_path))
        return HfStore(**kw)
    raise ConfigError(f"`hub.store` is {kind!r}; expected `local` or `hf`")
