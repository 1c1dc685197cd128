"""One loader for apps, CLI, simulations and tests: compose ``conf/`` -> typed, validated dataclasses.

Flower owns the entry point, so Hydra is used without ``@hydra.main``: ``initialize_config_dir``
plus ``compose``. Flower's run config only selects the config name and carries Hydra overrides.

The config tree lives at the repository root (``conf/``, beside ``fedem_flwr/``), which is also
where a checkout, an editable install and an installed Flower app bundle (FAB) keep it; a plain
wheel maps it into the package (``fedem_flwr/conf``) at build time. ``config_dir`` finds either.
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path
from typing import Any, Union

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedem_flwr.config.schema import FedemConfig
from fedem_flwr.errors import ConfigError

SCHEMA_NAME = "fedem_schema"
CONFIG_DIR_ENV = "FEDEM_CONF_DIR"
_PACKAGE = Path(__file__).resolve().parent.parent

RunConfigValue = Union[bool, int, float, str]

# Hydra's global state is process-wide; compose under a lock so threads never interleave.
_compose_lock = threading.Lock()
ConfigStore.instance().store(name=SCHEMA_NAME, node=FedemConfig)


def load_config(overrides: Sequence[str] = (), config_name: str = "config") -> FedemConfig:
    """Compose ``conf/<config_name>.yaml`` with Hydra ``overrides`` (e.g. ``["lora.r=16"]``)."""
    try:
        with _compose_lock, initialize_config_dir(config_dir=str(config_dir()), version_base=None):
            composed = compose(config_name=config_name, overrides=list(overrides))
        config = OmegaConf.to_object(composed)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"invalid configuration ({_describe(err)}); overrides: {list(overrides)}") from err
    if not isinstance(config, FedemConfig):
        raise ConfigError(f"config `{config_name}` does not extend `{SCHEMA_NAME}` in its defaults list.")
    return config


def config_dir() -> Path:
    """The config tree: ``$FEDEM_CONF_DIR``, else the wheel's ``fedem_flwr/conf``, else ``conf/``
    beside the package (a checkout, an editable install, an installed FAB)."""
    return _find_config_dir(os.environ.get(CONFIG_DIR_ENV, ""))


@lru_cache(maxsize=8)
def _find_config_dir(explicit: str) -> Path:
    candidates = [Path(explicit).expanduser()] if explicit else [_PACKAGE / "conf", _PACKAGE.parent / "conf"]
    for folder in candidates:
        if (folder / "config.yaml").is_file():
            return folder.resolve()
    tried = ", ".join(str(c) for c in candidates)
    fix = f"point `{CONFIG_DIR_ENV}` at a folder with config.yaml" if explicit else "reinstall fedem-flwr"
    raise ConfigError(f"no fedem config tree (config.yaml) found; looked in {tried}: {fix}.")


def load_run_config(run_config: Mapping[str, RunConfigValue]) -> FedemConfig:
    """Build the config from a Flower run config: ``config-name`` and space-separated ``overrides``.

    Composed once per run config in a process (a Hydra compose takes most of a second, and a
    ClientApp reads the run config with every message); each caller gets its own copy."""
    key = (str(config_dir()), *sorted((str(k), repr(v)) for k, v in run_config.items()))
    with _compose_lock:
        cached = _run_configs.get(key)
    if cached is None:
        cached = _compose_run_config(run_config)
        with _compose_lock:
            _run_configs[key] = cached
    return copy.deepcopy(cached)


_run_configs: dict[tuple, FedemConfig] = {}


def _compose_run_config(run_config: Mapping[str, RunConfigValue]) -> FedemConfig:
    known = {"config-name", "overrides", "hub"}
    unknown = sorted(set(run_config) - known)
    if unknown:
        raise ConfigError(
            f"unknown run-config key(s) {unknown}; allowed: {sorted(known)}. "
            "Put model settings in `overrides`, e.g. --run-config \"overrides='lora.r=16'\"."
        )
    name = str(run_config.get("config-name", "config") or "config")
    overrides = parse_overrides(str(run_config.get("overrides", "") or ""))
    hub = str(run_config.get("hub", "") or "")
    if hub:
        overrides.append(f"hub.path={json.dumps(hub)}")
    return load_config(overrides, config_name=name)


def parse_overrides(text: str) -> list[str]:
    """Split ``"lora.r=16 data.languages=[hi,te]"`` shell-style into Hydra overrides."""
    try:
        return shlex.split(text)
    except ValueError as err:
        raise ConfigError(f"`overrides` cannot be parsed ({err}): {text!r}") from err


def config_to_dict(config: FedemConfig) -> dict[str, Any]:
    """The resolved config as plain data, for saving beside every artifact."""
    return asdict(config)


def _describe(err: Exception) -> str:
    # Hydra wraps the OmegaConf error that names the key and type; OmegaConf messages carry a
    # multi-line "full_key/object_type" trailer. Keep every level, on one line.
    parts = []
    while err is not None:
        text = " ".join(str(err).split())
        if text and text not in parts:
            parts.append(text)
        err = err.__cause__
    return ": ".join(parts)
