"""The relay's wire protocol: what train and profile messages carry, in Flower records.

Record keys follow Flower's (``"arrays"``, ``"metrics"``, ``"config"``); message kinds are named
actions (``train.relay``, ``query.profile``). Base checkpoints travel, when a node lacks them, as
their stored files byte for byte (``uint8`` arrays keyed by relative path), so the node can check
the manifest digest exactly as the hub computed it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedem_flwr.errors import InvalidAdapter
from fedem_flwr.hub.store import ArtifactRef

TRAIN = "train.relay"
PROFILE = "query.profile"

BASE_FILES = "base-files"
MAX_FILE_COUNT = 64


@dataclass(frozen=True)
class TrainInstruction:
    """What a node is asked to do under one lease (parsed on the node)."""

    adapter: str
    adapter_version: int
    languages: tuple[str, ...]
    token: int
    base: ArtifactRef
    base_version: int
    budget_s: float
    max_steps: int


@dataclass(frozen=True)
class TrainReply:
    """What a node sent back for one lease (parsed on the hub, before any check)."""

    token: int
    adapter: str
    base_version: int
    arrays: ArrayRecord
    metrics: dict[str, float]


# -- hub -> node -------------------------------------------------------------------------------


def profile_message(node_id: int, ttl: float) -> Message:
    return Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node_id, message_type=PROFILE, ttl=ttl)


def train_message(
    node_id: int,
    instruction: TrainInstruction,
    adapter: ArrayRecord,
    ttl: float,
    base_folder: Optional[Path] = None,
) -> Message:
    """``ttl`` is the lease's remaining time, so the SuperLink itself refuses a late reply."""
    config = ConfigRecord(
        {
            "adapter": instruction.adapter,
            "adapter-version": instruction.adapter_version,
            "languages": ",".join(instruction.languages),
            "lease-token": instruction.token,
            "base-repo": instruction.base.repo,
            "base-revision": instruction.base.revision,
            "base-digest": instruction.base.digest,
            "base-version": instruction.base_version,
            "budget-s": float(instruction.budget_s),
            "max-steps": int(instruction.max_steps),
        }
    )
    content = RecordDict({"arrays": adapter, "config": config})
    if base_folder is not None:
        content[BASE_FILES] = folder_to_arrays(base_folder)
    return Message(content, dst_node_id=node_id, message_type=TRAIN, ttl=ttl)


def parse_train_instruction(message: Message) -> TrainInstruction:
    config = message.content["config"]
    languages = tuple(lang for lang in str(config["languages"]).split(",") if lang)
    return TrainInstruction(
        adapter=str(config["adapter"]),
        adapter_version=int(config["adapter-version"]),
        languages=languages,
        token=int(config["lease-token"]),
        base=ArtifactRef(str(config["base-repo"]), str(config["base-revision"]), str(config["base-digest"])),
        base_version=int(config["base-version"]),
        budget_s=float(config["budget-s"]),
        max_steps=int(config["max-steps"]),
    )


# -- node -> hub -------------------------------------------------------------------------------


def train_reply(
    message: Message, instruction: TrainInstruction, adapter: ArrayRecord, metrics: Mapping[str, float]
) -> Message:
    config = ConfigRecord(
        {
            "lease-token": instruction.token,
            "adapter": instruction.adapter,
            "base-version": instruction.base_version,
        }
    )
    record = MetricRecord({k: float(v) for k, v in metrics.items()})
    return Message(RecordDict({"arrays": adapter, "metrics": record, "config": config}), reply_to=message)


def parse_train_reply(message: Message) -> TrainReply:
    """Read a reply's envelope; a reply missing any part is an invalid adapter push."""
    try:
        config = message.content["config"]
        arrays = message.content["arrays"]
        metrics = message.content.get("metrics", MetricRecord({}))
        return TrainReply(
            token=int(config["lease-token"]),
            adapter=str(config["adapter"]),
            base_version=int(config["base-version"]),
            arrays=arrays,
            metrics={k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
        )
    except (KeyError, TypeError, ValueError) as err:
        raise InvalidAdapter(f"malformed train reply: missing or mistyped {err}") from err


def profile_reply(message: Message, profile: Mapping[str, Any]) -> Message:
    """``profile`` holds ``languages`` (list), ``device``, ``data-bytes``, ``base-digests`` (list)."""
    return Message(RecordDict({"config": ConfigRecord(dict(profile))}), reply_to=message)


# -- files as arrays ---------------------------------------------------------------------------


def folder_to_arrays(folder: Path) -> ArrayRecord:
    """Every file of a checkpoint folder, byte for byte, as a uint8 array keyed by its path."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if len(files) > MAX_FILE_COUNT:
        raise ValueError(f"{folder} holds {len(files)} files; a base checkpoint may hold {MAX_FILE_COUNT}")
    return ArrayRecord(
        {p.relative_to(folder).as_posix(): Array(np.frombuffer(p.read_bytes(), dtype=np.uint8)) for p in files}
    )


def arrays_to_folder(record: ArrayRecord, folder: Path) -> None:
    """Write the files back; paths that would escape ``folder`` are refused."""
    if len(record) > MAX_FILE_COUNT:
        raise InvalidAdapter(f"base checkpoint message holds {len(record)} files; at most {MAX_FILE_COUNT}")
    root = folder.resolve()
    for name, array in record.items():
        target = (root / name).resolve()
        if root not in target.parents or name.startswith("/"):
            raise InvalidAdapter(f"base checkpoint file name {name!r} escapes its folder")
        data = array.numpy()
        if data.dtype != np.uint8 or data.ndim != 1:
            raise InvalidAdapter(f"base checkpoint file {name!r} is {data.dtype}{list(data.shape)}, not uint8 bytes")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data.tobytes())
