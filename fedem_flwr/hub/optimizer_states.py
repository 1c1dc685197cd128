"""The hub's private optimizer states: one safetensors file per accepted adapter version.

With ``train.carry`` an adapter's optimizer state (its total steps, warmup start and AdamW moments,
``training.optimizer_state``) belongs to the adapter, not to the hop (DESIGN 19): the hub keeps the
state each accepted version was pushed with, sends it with the next lease of that version, and
never publishes it. It lives beside the artifact store (``hub.paths.optimizer_state_path``), so
artifact digests, revisions and publishing are untouched, and versions from before ``carry`` (or
with ``carry=none``) simply have none.

A state is written before its version's registry row commits, atomically (``durable.atomic_write``):
a crash between the two leaves an orphan state that ``fedem verify`` reports and the next write of
that version replaces, as an orphan artifact is. This module handles files only, without torch
(``hub`` imports none): the state's bytes come from, and are read by, ``training.optimizer_state``;
``verify`` reads the safetensors headers (and the values, with NumPy) itself.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from fedem_flwr.durable import atomic_write
from fedem_flwr.hub.paths import optimizer_state_path, optimizer_states_path

FORMAT = "fedem-optimizer-1"  # as ``training.optimizer_state`` writes it
MOMENTS = ("exp_avg", "exp_avg_sq")
SEPARATOR = "::"
MAX_HEADER_BYTES = 100_000_000  # as safetensors itself bounds it


class OptimizerStates:
    """The optimizer state files of one hub folder."""

    def __init__(self, hub: Path) -> None:
        self.hub = Path(hub)

    def path(self, adapter: str, version: int) -> Path:
        return optimizer_state_path(self.hub, adapter, version)

    def put(self, adapter: str, version: int, data: bytes) -> Path:
        """Keep ``data`` (a safetensors file's bytes) as the state of ``adapter`` ``version``, replacing
        any file there (an orphan of a crash: the version has no registry row yet)."""
        path = self.path(adapter, version)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with atomic_write(path, permissions=0o600) as handle:
            handle.write(data)
        return path

    def get(self, adapter: str, version: int) -> Optional[Path]:
        """The state file of ``adapter`` ``version``, or None when the hub keeps none for it."""
        path = self.path(adapter, version)
        return path if path.is_file() else None

    def listing(self) -> list[tuple[str, int, Path]]:
        """Every state file kept, as (adapter, version, path), sorted; other files are ignored."""
        root = optimizer_states_path(self.hub)
        if not root.is_dir():
            return []
        found = []
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            for file in sorted(folder.glob("v*.safetensors")):
                number = file.name[1:-len(".safetensors")]
                if number.isdigit():
                    found.append((folder.name, int(number), file))
        return sorted(found)

    def remove(self, adapter: str, version: int) -> None:
        self.path(adapter, version).unlink(missing_ok=True)


@dataclass(frozen=True)
class KeptVersion:
    """A registry version whose state may be kept: its adapter and version, its artifact's repo and
    revision, and its weights file (None when the store cannot give it: ``fedem verify`` names that)."""

    adapter: str
    version: int
    repo: str
    revision: str
    weights: Optional[Path]


def verify(states: OptimizerStates, versions: Iterable[KeptVersion]) -> list[dict[str, str]]:
    """Every kept state that does not load or does not match its version's adapter
    (``optimizer-state``), and every state of a version the registry does not have
    (``optimizer-orphan``). A version without a state is fine (before ``carry``, or ``carry=none``)."""
    known = {(v.adapter, v.version): v for v in versions}
    problems = []
    for adapter, version, path in states.listing():
        kept = known.get((adapter, version))
        if kept is None:
            problems.append(_problem("optimizer-orphan", "", f"{adapter}/v{version}",
                                     f"{path}: an optimizer state of a version the registry does not have "
                                     "(a crash before its row committed); the next write of it replaces it"))
            continue
        detail = check_state_file(path, kept.weights)
        if detail:
            problems.append(_problem("optimizer-state", kept.repo, kept.revision, f"{path}: {detail}"))
    return problems


def check_state_file(path: Path, weights: Optional[Path]) -> str:
    """Why the state file at ``path`` does not load or does not fit the adapter weights file
    ``weights`` (its keys, shapes, dtype), or "" when it does; values must be finite and second
    moments non-negative."""
    try:
        header, data = _read(path)
    except (OSError, ValueError) as err:
        return f"does not load: {err}"
    metadata = header.pop("__metadata__", None) or {}
    if metadata.get("format") != FORMAT:
        return f"has format {metadata.get('format')!r}; expected {FORMAT!r}"
    numbers = {name: metadata.get(name, "") for name in ("step", "warmup_from")}
    if not all(isinstance(v, str) and v.isdigit() for v in numbers.values()):
        return f"has step {numbers['step']!r} and warmup_from {numbers['warmup_from']!r}; expected integers"
    if int(numbers["warmup_from"]) > int(numbers["step"]):
        return f"has warmup_from {numbers['warmup_from']} past its step {numbers['step']}"
    if not header:
        return ""  # carry=schedule: no moments
    if weights is None:
        return "its adapter's weights cannot be read to check it against"
    try:
        adapter_header, _ = _read(weights, header_only=True)
    except (OSError, ValueError) as err:
        return f"its adapter's weights {str(weights)!r} do not load: {err}"
    adapter_header.pop("__metadata__", None)
    expected = {f"{key}{SEPARATOR}{m}": list(entry.get("shape", [])) for key, entry in adapter_header.items()
                for m in MOMENTS}
    missing, extra = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
    if missing or extra:
        return (f"does not match its adapter (another adapter's state?): {len(missing)} moment(s) missing "
                f"{missing[:3]}, {len(extra)} unexpected {extra[:3]}")
    for key in sorted(header):
        entry = header[key]
        if entry.get("dtype") != "F32" or list(entry.get("shape", [])) != expected[key]:
            return (f"moment {key!r} is {entry.get('dtype')}{entry.get('shape')}; its adapter's is "
                    f"F32{expected[key]}")
    return _check_values(header, data)


def _check_values(header: Mapping[str, Any], data: bytes) -> str:
    import numpy as np

    for key in sorted(header):
        start, end = header[key]["data_offsets"]
        values = np.frombuffer(data[start:end], dtype="<f4")
        if not np.isfinite(values).all():
            return f"moment {key!r} has {int((~np.isfinite(values)).sum())} non-finite value(s)"
        if key.endswith(SEPARATOR + "exp_avg_sq") and (values < 0).any():
            return f"moment {key!r} has {int((values < 0).sum())} negative value(s)"
    return ""


def _read(path: Path, header_only: bool = False) -> tuple[dict[str, Any], bytes]:
    """A safetensors file's header (JSON) and data section, with its layout checked: every tensor's
    byte range inside the data and of the size its dtype and shape imply."""
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise ValueError("shorter than a safetensors header")
        (size,) = struct.unpack("<Q", prefix)
        if size > MAX_HEADER_BYTES:
            raise ValueError(f"its header claims {size} bytes")
        raw = handle.read(size)
        if len(raw) != size:
            raise ValueError("truncated in its header")
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"its header is not JSON ({err})") from err
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")  # noqa: TRY004 (a malformed file, not a caller's type)
        if header_only:
            return header, b""
        data = handle.read()
    sizes = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "U8": 1}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            start, end = (int(x) for x in entry["data_offsets"])
            expected = math.prod(int(d) for d in entry["shape"]) * sizes[entry["dtype"]]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"tensor {key!r} has a malformed header entry ({err})") from err
        if not 0 <= start <= end <= len(data) or end - start != expected:
            raise ValueError(f"tensor {key!r} lies at bytes {start}-{end} of {len(data)}; truncated or corrupt")
    return header, data


def _problem(kind: str, repo: str, revision: str, detail: str) -> dict[str, str]:
    return {"kind": kind, "repo": repo, "revision": revision, "detail": detail}
