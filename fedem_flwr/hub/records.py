"""Rows of the registry as plain frozen dataclasses (times are epoch seconds from the hub's clock)."""

from __future__ import annotations

import json
import math
import sqlite3
from dataclasses import dataclass, field
from typing import Any, Optional

CHECKPOINT_SOURCES = ("init", "merge", "cpt")
DECISIONS = ("accepted", "rejected")


def revision_name(version: int) -> str:
    """The revision of a version: ``v{n}`` (a store folder, a Hub tag), DESIGN decision 12."""
    return f"v{int(version)}"


@dataclass(frozen=True)
class Checkpoint:
    """A published base model: version 0 is the seed, each next one is max+1."""

    version: int
    parent: Optional[int]
    created: float
    source: str
    repo: str
    revision: str
    digest: str
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Adapter:
    """A named LoRA adapter of the relay pool, with the languages and task it trains for."""

    name: str
    languages: list[str]
    task: str
    lora_spec: dict[str, Any]
    created: float


@dataclass(frozen=True)
class AdapterVersion:
    """One stored state of an adapter: 0 is the fresh LoRA, each accepted contribution is max+1."""

    adapter: str
    version: int
    base_version: int
    parent_version: Optional[int]
    digest: str
    repo: str
    revision: str
    metrics: dict[str, Any]
    created: float


@dataclass(frozen=True)
class Contribution:
    """A returned adapter and what the hub decided; it names its contributor only by pseudonym."""

    id: int
    pseudonym: str
    adapter: str
    lease_token: Optional[int]
    received: float
    digest: str
    validation: dict[str, Any]
    evaluation: dict[str, Any]
    decision: str
    reason: str
    adapter_version: Optional[int]


def dumps(name: str, value: Any) -> str:
    """Sorted JSON for a column; non-finite floats are refused (SQLite's ``json_valid`` does too).

    It stays strict so the registry never holds a NaN: whatever arrives from a node is made finite
    where it enters the hub (the relay coordinator drops non-finite metrics and stores a non-finite
    loss as null, naming each in the contribution).
    """
    try:
        return json.dumps({} if value is None else value, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"`{name}` cannot be stored as JSON ({err}): {value!r}") from err


def finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"`{name}` is {value!r}; it must be a finite number of epoch seconds.")
    return float(value)


def checkpoint_from(row: sqlite3.Row) -> Checkpoint:
    return Checkpoint(row["version"], row["parent"], row["created"], row["source"], row["repo"],
                      row["revision"], row["digest"], json.loads(row["metrics"]))


def adapter_from(row: sqlite3.Row) -> Adapter:
    return Adapter(row["name"], json.loads(row["languages"]), row["task"], json.loads(row["lora_spec"]),
                   row["created"])


def adapter_version_from(row: sqlite3.Row) -> AdapterVersion:
    return AdapterVersion(row["adapter"], row["version"], row["base_version"], row["parent_version"],
                          row["digest"], row["repo"], row["revision"], json.loads(row["metrics"]),
                          row["created"])


def contribution_from(row: sqlite3.Row) -> Contribution:
    return Contribution(row["id"], row["pseudonym"], row["adapter"], row["lease_token"], row["received"],
                        row["digest"], json.loads(row["validation"]), json.loads(row["evaluation"]),
                        row["decision"], row["reason"], row["adapter_version"])
