"""The relay's wire protocol: what train and profile messages carry, in Flower records.

Record keys follow Flower's (``"arrays"``, ``"metrics"``, ``"config"``); message kinds are named
actions (``train.relay``, ``query.profile``). Base checkpoints travel, when a node lacks them, as
their stored files byte for byte (``uint8`` arrays keyed by relative path), so the node can check
the manifest digest exactly as the hub computed it. When the hub's store is on a Hugging Face Hub,
a train message also names the base's Hub repo (``base-hf-repo``, and ``base-hf-endpoint`` when it
is not the default Hub) and carries no files the first time: the node fetches the base itself
(``fedem_flwr.node.fetch``), and gets the in-band copy only after it answered ``missing-base``.

With ``train.carry`` set, a train message also carries the adapter's optimizer state and a train
reply the updated one: the packed moments as the ``optimizer`` record (absent when no moments
travel) and ``optimizer-step`` / ``optimizer-warmup-from`` in the config record
(``protocol.wire.OptimizerRecord``). They are unpacked and checked only against an adapter's spec:
the node's own, the hub's in its strategy. A malformed state in a reply never fails the reply: it is
named in ``TrainReply.optimizer_problem`` and the hub replaces the state, keeping the adapter.

A train message names the lease's task (``task``: a key of ``TASK_FORMATS``) and the domain its rows
must be tagged with (``domain``); each is omitted at its default (``causal-lm``, any domain), so a
language adapter's message reads as it did before tasks existed. A profile declares, beside the
languages a node holds rows in, those it holds conversations in (``chat-languages``, a subset).

Peer judging (``gate.peers``): an ``evaluate.peer`` message asks an idle node to score a pushed
adapter (``candidate``) and its parent (``parent``, both ``arrays`` as a train message's) blind on its
own held-out rows; its config names only the hub's opaque ``evaluation`` id, the base, the languages
and ``max-blocks``, never the pusher or the lease. The reply holds, per language, the scored tokens
and both mean losses (``tokens.<lang>``, ``candidate.<lang>``, ``parent.<lang>``). A peer is a
stranger: ``parse_peer_reply`` checks every number, and a reply for another evaluation is a
``ClaimMismatch``.

What the hub sends is read on the node through ``parse_train_instruction``: a field of the wrong
type or shape raises ``InvalidInstruction`` naming the field and the value.

Everything a node sends is read through ``parse_profile_reply``, ``parse_train_reply`` and
``parse_peer_reply``, the one place a reply is checked: types, ranges and sizes, the metrics kept
(finite numbers under plain keys), and a reply's claims against the instruction it answers. What fails raises
``InvalidReply`` (``ClaimMismatch`` for claims) naming the field and the value, so the hub records a
reason and goes on; what passes is trusted inside the hub. A node that cannot train a lease answers a
typed status (``no-data``, ``missing-base``) instead of raising.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedem_flwr.config.schema import TASK_FORMATS
from fedem_flwr.data.tasks import CAUSAL_LM  # the default task: a language adapter, trained on plain text
from fedem_flwr.errors import FedemError, InvalidAdapter
from fedem_flwr.hub.store import ArtifactRef
from fedem_flwr.node.cache import BaseCache
from fedem_flwr.node.fetch import BASE_REVISION, ENDPOINT, HF_REPO_ID, MAX_ENDPOINT_CHARS, HfLocation
from fedem_flwr.protocol.wire import OptimizerRecord

TRAIN = "train.relay"
PROFILE = "query.profile"
PEER = "evaluate.peer"  # the Flower message type of ``@app.evaluate("peer")``

BASE_FILES = "base-files"
NODE_ROWS = "node-rows"
OPTIMIZER = "optimizer"  # the record of an optimizer state's packed moments
OPTIMIZER_STEP = "optimizer-step"
OPTIMIZER_WARMUP_FROM = "optimizer-warmup-from"
MAX_FILE_COUNT = 64

# Row lists a train message may carry in simulation: always text and language; chat (a conversation
# as JSON, "" for plain text) and domain ("" when unknown) only when some row has one.
ROW_COLUMNS = ("text", "language")
OPTIONAL_ROW_COLUMNS = ("chat", "domain")

# Reply statuses: ``ok`` carries the trained adapter (a peer's: its numbers); the others say why there is none.
OK = "ok"
NO_DATA = "no-data"
MISSING_BASE = "missing-base"
STATUSES = (OK, NO_DATA, MISSING_BASE)
PEER_NUMBERS = ("tokens", "candidate", "parent")  # what a peer reports per language, as `<name>.<language>`

# Bounds on what a node may send.
MAX_LANGUAGES = 64
MAX_BASE_DIGESTS = 64
MAX_DEVICE_CHARS = 32
MAX_METRICS = 32
MAX_METRIC_KEY_CHARS = 64
MAX_DETAIL_CHARS = 200
LANGUAGE_CODE = re.compile(r"^[A-Za-z]{2,3}([_-][A-Za-z0-9]{2,8})?$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
METRIC_KEY = re.compile(r"^[A-Za-z0-9_.:-]+$")
DOMAIN_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class InvalidReply(FedemError, ValueError):
    """A node's reply breaks the wire format; the message names the field and the value."""


class ClaimMismatch(InvalidReply):
    """A reply claims another lease token, adapter or base version (a peer's: evaluation) than it was sent."""

    def __init__(self, message: str, metrics: Mapping[str, float], dropped_metrics: tuple[str, ...]) -> None:
        super().__init__(message)
        self.metrics = dict(metrics)  # what the reply reported, as parsed: recorded with the rejection
        self.dropped_metrics = dropped_metrics


class InvalidInstruction(FedemError, ValueError):
    """A message from the hub breaks the wire format; the message names the field and the value."""


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
    base_hf: Optional[HfLocation] = None  # where the node may fetch the base itself
    optimizer: Optional[OptimizerRecord] = None  # the adapter's optimizer state (``train.carry``), packed
    task: str = CAUSAL_LM  # what the rows are rendered as and the loss scored on (``TASK_FORMATS``)
    domain: str = ""  # train only on rows tagged with this domain; "" = any row


@dataclass(frozen=True)
class TrainReply:
    """What a node sent back for one lease, checked: its claims (token, adapter, base version) are the
    instruction's, a status, and with ``ok`` the adapter; ``metrics`` are finite numbers under plain
    keys, and those that were not (or over the bound) are named in ``dropped_metrics``."""

    token: int
    adapter: str
    base_version: int
    status: str
    arrays: Optional[ArrayRecord]
    metrics: dict[str, float]
    dropped_metrics: tuple[str, ...] = ()
    detail: str = ""
    optimizer: Optional[OptimizerRecord] = None  # the updated optimizer state, packed and not yet checked
    optimizer_problem: str = ""  # why the reply's optimizer fields could not even be read


@dataclass(frozen=True)
class ProfileReply:
    """What a node declared about itself, checked; ``partition-id`` counts only in simulation."""

    languages: tuple[str, ...]
    device: str
    data_bytes: int
    base_digests: frozenset[str]
    partition_id: Optional[int] = None
    num_partitions: Optional[int] = None
    chat_languages: tuple[str, ...] = ()  # of ``languages``, those it holds conversations in


@dataclass(frozen=True)
class PeerInstruction:
    """What a peer is asked to judge (parsed on the node); it names no contributor and no lease."""

    evaluation: int  # the hub's opaque id of this evaluation
    base_digest: str  # the base both adapters apply to: cached, sent along (``base-files``) or fetched
    base_version: int
    languages: tuple[str, ...]
    max_blocks: int  # at most this many held-out blocks per language are scored
    task: str = CAUSAL_LM
    domain: str = ""
    base_hf: Optional[HfLocation] = None  # where the node may fetch the base itself, as a train message names it


@dataclass(frozen=True)
class PeerReply:
    """A peer's judgement, checked: per language the scored tokens and the mean losses of base+candidate
    and base+parent on the same tokens; empty unless ``status`` is ``ok``."""

    evaluation: int
    status: str
    detail: str
    tokens: dict[str, int]
    candidate: dict[str, float]
    parent: dict[str, float]


# -- hub -> node -------------------------------------------------------------------------------


def profile_message(node_id: int, ttl: float) -> Message:
    return Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node_id, message_type=PROFILE, ttl=ttl)


def train_message(
    node_id: int,
    instruction: TrainInstruction,
    adapter: ArrayRecord,
    ttl: float,
    base_folder: Optional[Path] = None,
    rows: Optional[Mapping[str, Sequence[str]]] = None,
) -> Message:
    """``ttl`` is the lease's remaining time, so the SuperLink itself refuses a late reply.

    ``rows`` (``text`` and ``language`` lists, and ``chat`` and ``domain`` when given) are the node's
    training rows, handed out by the hub in simulation, where a node must not compute them itself."""
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
    _put_lease_kind(config, instruction.task, instruction.domain, instruction.base_hf)
    content = RecordDict({"arrays": adapter, "config": config})
    _put_optimizer(content, config, instruction.optimizer)
    _put_base_and_rows(content, base_folder, rows)
    return Message(content, dst_node_id=node_id, message_type=TRAIN, ttl=ttl)


def peer_message(
    node_id: int,
    instruction: PeerInstruction,
    candidate: ArrayRecord,
    parent: ArrayRecord,
    *,
    ttl: float,
    rows: Optional[Mapping[str, Sequence[str]]] = None,
    base_folder: Optional[Path] = None,
) -> Message:
    """Ask a peer to judge ``candidate`` against ``parent`` (adapters as ``wire.adapter_to_arrays`` packs
    them) on its held-out rows; ``rows``: in simulation, the node's rows as a train message carries them.
    A node that lacks the base gets it as a train message would: its files (``base_folder``), or where to
    fetch it (``instruction.base_hf``)."""
    config = ConfigRecord(
        {
            "evaluation": int(instruction.evaluation),
            "base-digest": instruction.base_digest,
            "base-version": int(instruction.base_version),
            "languages": ",".join(instruction.languages),
            "max-blocks": int(instruction.max_blocks),
        }
    )
    if instruction.base_hf is not None:
        config["base-revision"] = instruction.base_hf.revision
    _put_lease_kind(config, instruction.task, instruction.domain, instruction.base_hf)
    content = RecordDict({"candidate": candidate, "parent": parent, "config": config})
    _put_base_and_rows(content, base_folder, rows)
    return Message(content, dst_node_id=node_id, message_type=PEER, ttl=ttl)


def _put_lease_kind(config: ConfigRecord, task: str, domain: str, location: Optional[HfLocation]) -> None:
    """What a train and a peer message both name beside their own keys: the task and domain (each
    omitted at its default) and where the node may fetch the base (``_task``, ``_domain``, ``_base_hf``)."""
    if task != CAUSAL_LM:
        config["task"] = task
    if domain:
        config["domain"] = domain
    if location is not None:
        config["base-hf-repo"] = location.repo_id
        if location.endpoint:
            config["base-hf-endpoint"] = location.endpoint


def _put_base_and_rows(content: RecordDict, base_folder: Optional[Path],
                       rows: Optional[Mapping[str, Sequence[str]]]) -> None:
    """The base's files and, in simulation, the node's rows, when the hub sends them."""
    if base_folder is not None:
        content[BASE_FILES] = folder_to_arrays(base_folder)
    if rows is not None:
        names = ROW_COLUMNS + tuple(name for name in OPTIONAL_ROW_COLUMNS if name in rows)
        content[NODE_ROWS] = ConfigRecord({name: list(rows[name]) for name in names})


def keep_sent_base(message: Message, cache: BaseCache, digest: str) -> None:
    """Cache the base files a train message carries (``base-files``), if any, checked against
    ``digest`` as the cache checks every base it adds."""
    if BASE_FILES in message.content:
        record = message.content[BASE_FILES]
        cache.add(digest, lambda folder: arrays_to_folder(record, folder))


def node_rows(message: Message) -> Optional[dict[str, list[str]]]:
    """The training rows the hub sent with a train message (``chat`` and ``domain`` when it sent them),
    or None when it sent none. A missing ``text`` or ``language``, a column that is not a list of
    strings, or lists of other lengths than ``text`` raise ``InvalidInstruction``: a row would otherwise
    be read with another row's conversation or domain."""
    if NODE_ROWS not in message.content:
        return None
    record = message.content[NODE_ROWS]
    rows = {}
    for name in ROW_COLUMNS + OPTIONAL_ROW_COLUMNS:
        values = record[name] if name in record else None
        if values is None and name in OPTIONAL_ROW_COLUMNS:
            continue
        if not isinstance(values, list) or not all(isinstance(value, str) for value in values):
            raise InvalidInstruction(f"train message `{NODE_ROWS}` `{name}` is {_column_kind(values)}; "
                                     "it must be a list of strings")
        rows[name] = list(values)
    for name, values in rows.items():
        if len(values) != len(rows["text"]):
            raise InvalidInstruction(f"train message `{NODE_ROWS}` has {len(values)} `{name}` for "
                                     f"{len(rows['text'])} `text` rows")
    return rows


def _column_kind(values: Any) -> str:
    """What a row column is, by type: a column of a million rows is never echoed."""
    if not isinstance(values, list):
        return "missing" if values is None else f"of type {type(values).__name__}"
    odd = next(value for value in values if not isinstance(value, str))
    return f"a list holding {type(odd).__name__}"


def parse_train_instruction(message: Message) -> TrainInstruction:
    """Read what the hub asks; the base's revision, digest and Hub location are checked, since the
    node fetches and trusts by them, and a bad one raises ``InvalidInstruction``."""
    config = message.content["config"]
    languages = tuple(lang for lang in str(config["languages"]).split(",") if lang)
    revision = _instruction_field(config, "base-revision", BASE_REVISION, "a base revision like 'v3'")
    digest = _instruction_field(config, "base-digest", SHA256_HEX, "a sha256 hex digest")
    base_hf = _base_hf(config, revision)
    optimizer, problem = _read_optimizer(message, "train message")
    if problem:
        raise InvalidInstruction(problem)
    task, domain = _task(config), _domain(config)
    return TrainInstruction(
        adapter=str(config["adapter"]),
        adapter_version=int(config["adapter-version"]),
        languages=languages,
        token=int(config["lease-token"]),
        base=ArtifactRef(str(config["base-repo"]), revision, digest),
        base_version=int(config["base-version"]),
        budget_s=float(config["budget-s"]),
        max_steps=int(config["max-steps"]),
        base_hf=base_hf,
        optimizer=optimizer,
        task=task,
        domain=domain,
    )


def parse_peer_instruction(message: Message) -> PeerInstruction:
    """Read what a peer is asked to judge; a field of the wrong type or shape raises ``InvalidInstruction``."""
    what = "peer message"
    config = message.content.get("config") if "config" in message.content else None
    if not isinstance(config, ConfigRecord):
        raise InvalidInstruction(f"{what} has no `config` record")
    for key in ("candidate", "parent"):
        if key not in message.content or not isinstance(message.content[key], ArrayRecord):
            raise InvalidInstruction(f"{what} has no `{key}` ArrayRecord")
    raw = config.get("languages") if "languages" in config else None
    languages = tuple(raw.split(",")) if isinstance(raw, str) and raw else ()
    if not languages or len(languages) > MAX_LANGUAGES or not all(LANGUAGE_CODE.match(code) for code in languages):
        raise InvalidInstruction(f"{what} `languages` is {_show(raw)}; it must be 1 to {MAX_LANGUAGES} "
                                 "comma-separated language codes like 'hi,pt-BR'")
    base_hf = None
    if "base-hf-repo" in config or "base-hf-endpoint" in config:
        revision = _instruction_field(config, "base-revision", BASE_REVISION, "a base revision like 'v3'", what=what)
        base_hf = _base_hf(config, revision, what)
    return PeerInstruction(
        evaluation=_instruction_int(config, "evaluation", what, minimum=0),
        base_digest=_instruction_field(config, "base-digest", SHA256_HEX, "a sha256 hex digest", what=what),
        base_version=_instruction_int(config, "base-version", what, minimum=0),
        languages=languages,
        max_blocks=_instruction_int(config, "max-blocks", what, minimum=1),
        task=_task(config, what),
        domain=_domain(config, what),
        base_hf=base_hf,
    )


def _base_hf(config: ConfigRecord, revision: str, what: str = "train message") -> Optional[HfLocation]:
    """Where a message says the node may fetch its base (``base-hf-repo``, ``base-hf-endpoint``), checked."""
    if "base-hf-repo" not in config:
        if "base-hf-endpoint" in config:
            raise InvalidInstruction(f"{what} has `base-hf-endpoint` but no `base-hf-repo`")
        return None
    repo_id = _instruction_field(config, "base-hf-repo", HF_REPO_ID, "a Hugging Face repo id 'namespace/name'",
                                 what=what)
    endpoint = ""
    if "base-hf-endpoint" in config:
        endpoint = _instruction_field(config, "base-hf-endpoint", ENDPOINT, "an http(s) URL", MAX_ENDPOINT_CHARS,
                                      what=what)
    return HfLocation(repo_id, revision, endpoint)


def _instruction_int(config: ConfigRecord, key: str, what: str, minimum: int) -> int:
    value = config.get(key) if key in config else None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InvalidInstruction(f"{what} `{key}` is {_show(value)}; it must be an integer >= {minimum}")
    return value


def _task(config: ConfigRecord, what: str = "train message") -> str:
    """The lease's task (``causal-lm`` when unnamed); one this node cannot tell apart is refused."""
    value = config.get("task") if "task" in config else CAUSAL_LM
    if not isinstance(value, str) or value not in TASK_FORMATS:
        raise InvalidInstruction(
            f"{what} `task` is {_show(value)}; it must be one of {', '.join(map(repr, TASK_FORMATS))}"
        )
    return value


def _domain(config: ConfigRecord, what: str = "train message") -> str:
    """The domain the lease's rows must carry ("" when unnamed): a plain tag, never a path or a query."""
    if "domain" not in config or config.get("domain") == "":
        return ""
    return _instruction_field(config, "domain", DOMAIN_TAG, "a domain tag like 'health' (letters, digits, _ . -)", 64,
                              what=what)


def _instruction_field(config: ConfigRecord, key: str, pattern: re.Pattern, allowed: str, limit: int = 200, *,
                       what: str = "train message") -> str:
    value = config.get(key) if key in config else None
    if not isinstance(value, str) or len(value) > limit or ".." in value or not pattern.match(value):
        raise InvalidInstruction(f"{what} `{key}` is {_show(value)}; it must be {allowed}")
    return value


# -- node -> hub -------------------------------------------------------------------------------


def train_reply(
    message: Message, instruction: TrainInstruction, adapter: ArrayRecord, metrics: Mapping[str, float],
    optimizer: Optional[OptimizerRecord] = None,
) -> Message:
    """``optimizer``: the adapter's updated optimizer state, when the hub sent one (``train.carry``)."""
    record = MetricRecord({k: float(v) for k, v in metrics.items()})
    config = _claims(instruction, OK)
    content = RecordDict({"arrays": adapter, "metrics": record, "config": config})
    _put_optimizer(content, config, optimizer)
    return Message(content, reply_to=message)


def _put_optimizer(content: RecordDict, config: ConfigRecord, optimizer: Optional[OptimizerRecord]) -> None:
    if optimizer is None:
        return
    config[OPTIMIZER_STEP] = int(optimizer.step)
    config[OPTIMIZER_WARMUP_FROM] = int(optimizer.warmup_from)
    if optimizer.arrays is not None:
        content[OPTIMIZER] = optimizer.arrays


def _read_optimizer(message: Message, what: str) -> tuple[Optional[OptimizerRecord], str]:
    """The optimizer state a message carries (None when it carries none), or why it cannot be read.

    Only its form is checked here; its moments are unpacked and checked against the adapter's spec
    by the receiver (``wire.arrays_to_optimizer``)."""
    config = message.content["config"]
    arrays = message.content.get(OPTIMIZER) if OPTIMIZER in message.content else None
    if OPTIMIZER_STEP not in config:
        if arrays is not None or OPTIMIZER_WARMUP_FROM in config:
            return None, f"{what} has optimizer fields but no `{OPTIMIZER_STEP}`"
        return None, ""
    numbers = {}
    for key in (OPTIMIZER_STEP, OPTIMIZER_WARMUP_FROM):
        value = config.get(key) if key in config else None
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return None, f"{what} `{key}` is {_show(value)}; it must be a non-negative integer"
        numbers[key] = value
    if numbers[OPTIMIZER_WARMUP_FROM] > numbers[OPTIMIZER_STEP]:
        return None, (f"{what} `{OPTIMIZER_WARMUP_FROM}` is {numbers[OPTIMIZER_WARMUP_FROM]}, past "
                      f"`{OPTIMIZER_STEP}` {numbers[OPTIMIZER_STEP]}")
    if arrays is not None and not isinstance(arrays, ArrayRecord):
        return None, f"{what} `{OPTIMIZER}` is a {type(arrays).__name__}, not an ArrayRecord"
    return OptimizerRecord(numbers[OPTIMIZER_STEP], numbers[OPTIMIZER_WARMUP_FROM], arrays), ""


def status_reply(message: Message, instruction: TrainInstruction, status: str, detail: str = "") -> Message:
    """A lease the node cannot train: ``no-data`` (none of the leased languages) or ``missing-base``."""
    if status not in STATUSES or status == OK:
        raise ValueError(f"`status` is {status!r}; allowed: {NO_DATA!r}, {MISSING_BASE!r}")
    config = _claims(instruction, status)
    config["detail"] = detail[:MAX_DETAIL_CHARS]
    return Message(RecordDict({"config": config}), reply_to=message)


def _claims(instruction: TrainInstruction, status: str) -> ConfigRecord:
    return ConfigRecord(
        {
            "lease-token": instruction.token,
            "adapter": instruction.adapter,
            "base-version": instruction.base_version,
            "status": status,
        }
    )


def parse_train_reply(message: Message, sent: TrainInstruction) -> TrainReply:
    """Read a reply's claims, status, adapter and metrics; a malformed one raises ``InvalidReply``, one
    whose claims differ from the instruction ``sent`` (the message it answers) ``ClaimMismatch``."""
    config = _config(message, "train reply")
    token = _int(config, "lease-token", "train reply")
    adapter = _text(config, "adapter", "train reply", 200)
    base_version = _int(config, "base-version", "train reply")
    status = config.get("status", OK)
    if status not in STATUSES:
        raise InvalidReply(f"train reply `status` is {_show(status)}; allowed: {', '.join(STATUSES)}")
    arrays = message.content.get("arrays") if status == OK else None
    if status == OK and not isinstance(arrays, ArrayRecord):
        raise InvalidReply(f"train reply with status {OK!r} has no `arrays` record")
    metrics = message.content.get("metrics") if status == OK else None
    kept, dropped = parse_metrics(metrics if isinstance(metrics, MetricRecord) else MetricRecord({}))
    detail = config.get("detail", "")
    optimizer, optimizer_problem = _read_optimizer(message, "train reply") if status == OK else (None, "")
    mismatch = _claim_mismatch(token, adapter, base_version, sent)
    if mismatch:
        raise ClaimMismatch(mismatch, kept, dropped)
    return TrainReply(
        token=token,
        adapter=adapter,
        base_version=base_version,
        status=status,
        arrays=arrays,
        metrics=kept,
        dropped_metrics=dropped,
        detail=detail[:MAX_DETAIL_CHARS] if isinstance(detail, str) else "",
        optimizer=optimizer,
        optimizer_problem=optimizer_problem,
    )


def _claim_mismatch(token: int, adapter: str, base_version: int, sent: TrainInstruction) -> str:
    """The first claim that differs from the instruction ``sent``, as a ``claim-mismatch`` reason, or ""."""
    if token != sent.token:
        return f"claim-mismatch: token {token} claimed, lease {sent.token}"
    if adapter != sent.adapter:
        return f"claim-mismatch: adapter {adapter!r} claimed, lease {sent.token} is on {sent.adapter!r}"
    if base_version != sent.base_version:
        return f"claim-mismatch: base version {base_version} claimed, lease {sent.token} is on {sent.base_version}"
    return ""


def peer_reply(message: Message, instruction: PeerInstruction,
               results: Mapping[str, tuple[int, float, float]]) -> Message:
    """``results``: per language, (scored tokens, mean loss of base+candidate, of base+parent)."""
    metrics: dict[str, Any] = {}
    for language, (tokens, candidate, parent) in sorted(results.items()):
        metrics[f"tokens.{language}"] = int(tokens)
        metrics[f"candidate.{language}"] = float(candidate)
        metrics[f"parent.{language}"] = float(parent)
    config = ConfigRecord({"evaluation": instruction.evaluation, "status": OK})
    return Message(RecordDict({"metrics": MetricRecord(metrics), "config": config}), reply_to=message)


def peer_status_reply(message: Message, instruction: PeerInstruction, status: str, detail: str = "") -> Message:
    """A judgement the node cannot give: ``no-data`` (no held-out rows that fit) or ``missing-base``."""
    if status not in STATUSES or status == OK:
        raise ValueError(f"`status` is {status!r}; allowed: {NO_DATA!r}, {MISSING_BASE!r}")
    config = ConfigRecord({"evaluation": instruction.evaluation, "status": status, "detail": detail[:MAX_DETAIL_CHARS]})
    return Message(RecordDict({"config": config}), reply_to=message)


def parse_peer_reply(message: Message, sent: PeerInstruction, max_tokens: int) -> PeerReply:
    """Check a peer's reply to ``sent``: ``ClaimMismatch`` when it answers another evaluation, else
    ``InvalidReply`` naming the field and value for an unknown status, a language not asked, a missing
    number, a loss that is not a finite number >= 0, tokens that are not a whole number in
    [1, ``max_tokens``] (the caller's bound, e.g. the peer's declared data), an ``ok`` with no
    language, or more metrics than three per language asked."""
    what = "peer reply"
    config = _config(message, what)
    evaluation = _int(config, "evaluation", what)
    if evaluation != sent.evaluation:
        raise ClaimMismatch(f"claim-mismatch: evaluation {evaluation} claimed, sent {sent.evaluation}", {}, ())
    status = config.get("status") if "status" in config else None
    if status not in STATUSES:
        raise InvalidReply(f"{what} `status` is {_show(status)}; allowed: {', '.join(STATUSES)}")
    detail = config.get("detail", "")
    detail = detail[:MAX_DETAIL_CHARS] if isinstance(detail, str) else ""
    if status != OK:  # a node that could not judge carries no numbers
        return PeerReply(evaluation, status, detail, {}, {}, {})
    record = message.content.get("metrics") if "metrics" in message.content else None
    if not isinstance(record, MetricRecord) or not record:
        raise InvalidReply(f"{what} with status {OK!r} reports no language")
    bound = len(PEER_NUMBERS) * len(sent.languages)
    if len(record) > bound:
        raise InvalidReply(f"{what} holds {len(record)} metrics; at most {bound} (three per language asked)")
    numbers: dict[str, dict[str, Any]] = {name: {} for name in PEER_NUMBERS}
    for key in sorted(record, key=str):
        name, _, language = str(key).partition(".")
        if name not in numbers or not LANGUAGE_CODE.match(language):
            raise InvalidReply(f"{what} metric {_show(key)} is not `<{'|'.join(PEER_NUMBERS)}>.<language code>`")
        if language not in sent.languages:
            raise InvalidReply(f"{what} metric `{key}` names language {language!r}, not asked "
                               f"(asked: {','.join(sent.languages)})")
        numbers[name][language] = _peer_number(record[key], key, max_tokens if name == "tokens" else None)
    for language in sorted(set().union(*numbers.values())):
        missing = [name for name in PEER_NUMBERS if language not in numbers[name]]
        if missing:
            raise InvalidReply(f"{what} reports language {language!r} without `{missing[0]}.{language}`")
    return PeerReply(evaluation, status, detail, numbers["tokens"], numbers["candidate"], numbers["parent"])


def _peer_number(value: Any, key: str, max_tokens: Optional[int]) -> Any:
    """A peer's token count (a whole number in [1, ``max_tokens``]) or, without a bound, a loss (finite, >= 0)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if max_tokens is not None:
        if not number or not float(value).is_integer() or not 1 <= value <= max_tokens:
            raise InvalidReply(f"peer reply `{key}` is {_show(value)}; it must be a whole number of tokens "
                               f"in [1, {max_tokens}]")
        return int(value)
    if not number or not math.isfinite(value) or value < 0:
        raise InvalidReply(f"peer reply `{key}` is {_show(value)}; it must be a finite loss >= 0")
    return float(value)


def parse_metrics(record: Mapping[str, Any]) -> tuple[dict[str, float], tuple[str, ...]]:
    """Keep at most ``MAX_METRICS`` finite numbers under short plain keys (sorted by key); name the
    rest. Dropped names are cut to ``MAX_METRIC_KEY_CHARS`` and listed at most ``MAX_METRICS`` times."""
    kept: dict[str, float] = {}
    dropped: list[str] = []
    for key in sorted(record, key=str):
        value = record[key]
        good_key = isinstance(key, str) and len(key) <= MAX_METRIC_KEY_CHARS and METRIC_KEY.match(key)
        if good_key and _finite_number(value) and len(kept) < MAX_METRICS:
            kept[key] = float(value)
        else:
            dropped.append(str(key)[:MAX_METRIC_KEY_CHARS])
    if len(dropped) > MAX_METRICS:
        dropped = dropped[:MAX_METRICS] + [f"...{len(dropped) - MAX_METRICS} more"]
    return kept, tuple(dropped)


def _finite_number(value: Any) -> bool:
    """A finite float, or an int in the signed 64-bit range a metric record can carry (not a bool)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -(2**63) <= value < 2**63
    return isinstance(value, float) and math.isfinite(value)


def profile_reply(message: Message, profile: Mapping[str, Any]) -> Message:
    """``profile`` holds ``languages`` and ``chat-languages`` (lists), ``device``, ``data-bytes``,
    ``base-digests`` (list), and in simulation ``partition-id`` and ``num-partitions``."""
    return Message(RecordDict({"config": ConfigRecord(dict(profile))}), reply_to=message)


def parse_profile_reply(message: Message) -> ProfileReply:
    """Check a profile reply field by field; the first bad or missing field raises ``InvalidReply``."""
    config = _config(message, "profile reply")
    languages = _language_codes(config, "languages")
    chat_languages = _language_codes(config, "chat-languages") if "chat-languages" in config else []
    undeclared = [language for language in chat_languages if language not in languages]
    if undeclared:
        raise InvalidReply(f"profile reply `chat-languages` holds {_show(undeclared[0])}, absent from its "
                           f"`languages` {_show(languages)}: chat rows are rows of a declared language")
    digests = _list(config, "base-digests", MAX_BASE_DIGESTS)
    for value in digests:
        if not SHA256_HEX.match(value):
            raise InvalidReply(f"profile reply `base-digests` holds {_show(value)}, not a sha256 hex digest")
    partition = _int(config, "partition-id", "profile reply") if "partition-id" in config else None
    partitions = _int(config, "num-partitions", "profile reply") if "num-partitions" in config else None
    if partition is not None and partitions is not None and partition >= partitions:
        raise InvalidReply(f"profile reply `partition-id` is {partition}; "
                           f"it must be below `num-partitions` {partitions}")
    return ProfileReply(
        languages=tuple(sorted(set(languages))),
        device=_text(config, "device", "profile reply", MAX_DEVICE_CHARS),
        data_bytes=_int(config, "data-bytes", "profile reply"),
        base_digests=frozenset(digests),
        partition_id=partition,
        num_partitions=partitions,
        chat_languages=tuple(sorted(set(chat_languages))),
    )


def _language_codes(config: ConfigRecord, key: str) -> list[str]:
    """A profile's list of language codes under ``key``, each checked."""
    languages = _list(config, key, MAX_LANGUAGES)
    for language in languages:
        if not LANGUAGE_CODE.match(language):
            raise InvalidReply(f"profile reply `{key}` holds {_show(language)}, "
                               "not a language code like 'hi' or 'pt-BR'")
    return languages


def _config(message: Message, what: str) -> ConfigRecord:
    config = message.content.get("config") if "config" in message.content else None
    if not isinstance(config, ConfigRecord):
        raise InvalidReply(f"{what} has no `config` record")
    return config


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _missing(config: ConfigRecord, key: str, what: str) -> Any:
    if key not in config:
        raise InvalidReply(f"{what} has no `{key}`")
    return config[key]


def _int(config: ConfigRecord, key: str, what: str) -> int:
    value = _missing(config, key, what)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidReply(f"{what} `{key}` is {_show(value)}; it must be a non-negative integer")
    return value


def _text(config: ConfigRecord, key: str, what: str, limit: int) -> str:
    value = _missing(config, key, what)
    if not isinstance(value, str) or not value or len(value) > limit:
        raise InvalidReply(f"{what} `{key}` is {_show(value)}; it must be a string of 1 to {limit} characters")
    return value


def _list(config: ConfigRecord, key: str, limit: int) -> list[str]:
    value = _missing(config, key, "profile reply")
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise InvalidReply(f"profile reply `{key}` is {_show(value)}; it must be a list of strings")
    if len(value) > limit:
        raise InvalidReply(f"profile reply `{key}` holds {len(value)} entries; at most {limit}")
    return value


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
