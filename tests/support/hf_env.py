"""Point the Hugging Face libraries of this process at another Hub endpoint and cache, and back.

transformers, PEFT and datasets read `HF_ENDPOINT`, `HF_HOME`, `HF_HUB_OFFLINE` once, at import, into
module constants (and `huggingface_hub` builds one module-level `HfApi` whose bound methods, e.g.
`huggingface_hub.file_exists` used by PEFT, keep the endpoint of that moment). `hub_environment`
sets the variables for modules imported later AND patches those constants for modules already
imported, then restores both. See `hf_server` for the endpoint itself.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator


# Values read from the environment at import time: (module, attribute path, value).
def _patches(endpoint: str, home: Path, offline: bool) -> list[tuple[str, str, object]]:
    hub, hub_cache = "huggingface_hub.constants", str(home / "hub")
    out: list[tuple[str, str, object]] = [
        (hub, "ENDPOINT", endpoint),
        (hub, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}"),
        (hub, "HF_HOME", str(home)),
        (hub, "HF_HUB_CACHE", hub_cache),
        (hub, "HUGGINGFACE_HUB_CACHE", hub_cache),
        (hub, "HF_TOKEN_PATH", str(home / "token")),
        (hub, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens")),
        (hub, "HF_HUB_OFFLINE", offline),
        (hub, "HF_HUB_DISABLE_TELEMETRY", True),
        # `huggingface_hub.file_exists`, `model_info`, ... are methods of one HfApi made at import.
        ("huggingface_hub.hf_api", "api.endpoint", endpoint),
        ("huggingface_hub.hf_file_system", "hffs.endpoint", endpoint),
        ("huggingface_hub.hf_file_system", "hffs._api.endpoint", endpoint),
    ]
    ds, ds_cache = "datasets.config", home / "datasets"
    out += [
        (ds, "HF_ENDPOINT", endpoint),
        (ds, "HUB_DATASETS_URL", endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}"),
        (ds, "HF_CACHE_HOME", str(home)),
        (ds, "HF_DATASETS_CACHE", ds_cache),
        (ds, "DOWNLOADED_DATASETS_PATH", ds_cache / "downloads"),
        (ds, "EXTRACTED_DATASETS_PATH", ds_cache / "downloads" / "extracted"),
        (ds, "HF_MODULES_CACHE", home / "modules"),
        (ds, "HF_HUB_OFFLINE", offline),
        (ds, "HF_DATASETS_OFFLINE", offline),
    ]
    # transformers keeps one HfApi, made with the endpoint current at its first use: drop it, so the
    # next use makes one for `endpoint` (the saved one comes back afterwards).
    out.append(("transformers.utils.hub", "_hf_api", None))
    return out


@contextlib.contextmanager
def hub_environment(endpoint: str, home: Path, offline: bool = False) -> Iterator[None]:
    """Point every Hugging Face library in this process at `endpoint`, with its caches under `home`."""
    # Import now, before the environment changes, so what they read at import is what gets restored.
    import huggingface_hub.hf_api  # noqa: F401
    import huggingface_hub.hf_file_system  # noqa: F401

    with contextlib.suppress(ImportError):
        import datasets.config  # noqa: F401

    env = {"HF_ENDPOINT": endpoint, "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
           "HF_DATASETS_CACHE": str(home / "datasets"), "HF_HUB_DISABLE_TELEMETRY": "1",
           "HF_HUB_OFFLINE": "1" if offline else "0"}
    saved_env = {k: os.environ.get(k) for k in env}
    saved: list[tuple[object, str, object]] = []
    try:
        os.environ.update(env)
        for module, path, value in _patches(endpoint, Path(home), offline):
            if module not in sys.modules:  # imported later, it reads the environment set above
                continue
            *parents, name = path.split(".")
            obj = sys.modules[module]
            for parent in parents:
                obj = getattr(obj, parent)
            if hasattr(obj, name):
                saved.append((obj, name, getattr(obj, name)))
                setattr(obj, name, value)
        yield
    finally:
        for mod, name, value in reversed(saved):
            setattr(mod, name, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
