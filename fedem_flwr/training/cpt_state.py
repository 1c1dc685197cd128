"""Continuous pretraining's private state on disk: safetensors for tensors, JSON for scalars, no pickle.

Layout of the state folder (the hub's ``cpt/``, see ``hub.paths.cpt_state_path``)::

    state.json                                 the commit record: scalars, and the name, size and
                                               sha256 of the tensors file it goes with
    tensors-<step>-<sha256 prefix>.safetensors optimizer moments and steps by parameter name, RNG states

A save writes the tensors file under a temporary name, hashes it, fsyncs it and renames it into place
(``durable.rename_into_place``), then writes ``state.json`` with ``durable.atomic_write``.
``state.json`` changes in one rename, so a kill at any moment leaves the previous state or the new
one, never a mix: until the rename it names the previous tensors file, which is still there. Files
the current ``state.json`` does not name (an older save, a save killed before its commit) are
removed by the next save. Reading checks the tensors file's size and sha256 against the record
before using it.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from fedem_flwr.durable import TMP_SUFFIX, atomic_write, rename_into_place
from fedem_flwr.errors import TrainingError

FORMAT = 1
STATE_FILE = "state.json"
TENSORS_PREFIX = "tensors-"


class CptStateError(TrainingError):
    """The saved CPT state is unreadable, fails its digest, or does not fit the model it is loaded into."""


@dataclass(frozen=True)
class SavedState:
    """What :func:`read_state` found: the JSON record and the tensors it names."""

    record: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def write_state(folder: Path, scalars: dict[str, Any], tensors: dict[str, torch.Tensor]) -> int:
    """Commit ``scalars`` (JSON-able, with an int ``step``) and ``tensors`` to ``folder``; returns bytes written."""
    folder = Path(folder)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    # save_file writes straight to the file: serializing to bytes first took 4x longer at 130M parameters.
    # Its final name holds its digest, known only once written: hence a temporary name, then rename_into_place.
    tmp = folder / f".{TENSORS_PREFIX}{uuid.uuid4().hex[:8]}{TMP_SUFFIX}"
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp))
        digest, size = _sha256(tmp), tmp.stat().st_size
        name = f"{TENSORS_PREFIX}{int(scalars['step']):09d}-{digest[:16]}.safetensors"
        rename_into_place(tmp, folder / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    record = {**scalars, "format": FORMAT, "tensors_file": name, "tensors_sha256": digest, "tensors_bytes": size}
    text = (json.dumps(record, sort_keys=True, indent=1) + "\n").encode("utf-8")
    with atomic_write(folder / STATE_FILE) as handle:  # the commit point
        handle.write(text)
    _remove_stale(folder, keep=name)
    return size + len(text)


def read_state(folder: Path) -> Optional[SavedState]:
    """The committed state in ``folder``, or None when nothing was ever committed there."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise CptStateError(f"the CPT state record {str(path)!r} is not JSON ({err}); delete the folder to start over.")
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise CptStateError(f"the CPT state record {str(path)!r} has format {found!r}; this version reads {FORMAT}.")
    name = record.get("tensors_file")
    if not isinstance(name, str) or "/" in name or not name.startswith(TENSORS_PREFIX):
        raise CptStateError(
            f"the CPT state record {str(path)!r} has `tensors_file` {name!r}; expected {TENSORS_PREFIX}*."
        )
    tensors_path = Path(folder) / name
    try:
        size, digest = tensors_path.stat().st_size, _sha256(tensors_path)
    except OSError as err:
        raise CptStateError(f"the CPT state names {name!r}, which cannot be read ({err}).") from err
    if size != record.get("tensors_bytes") or digest != record.get("tensors_sha256"):
        raise CptStateError(
            f"the CPT tensors file {name!r} has {size} bytes and sha256 {digest}; its record says "
            f"{record.get('tensors_bytes')} bytes and {record.get('tensors_sha256')}."
        )
    return SavedState(record, load_file(str(tensors_path)))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _remove_stale(folder: Path, keep: str) -> None:
    for entry in folder.iterdir():
        stale_tensors = entry.name.startswith(TENSORS_PREFIX) and entry.name != keep
        if stale_tensors or (entry.name.startswith(".") and entry.name.endswith(TMP_SUFFIX)):
            entry.unlink(missing_ok=True)
