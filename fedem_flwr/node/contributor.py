"""A contributor's side of the relay, without Flower: its data, its base-checkpoint cache, and one
relay fine-tune. The ClientApp only reads messages and calls these.

Node config keys (``flower-supernode --node-config``):

``data-path``  a file or folder of the contributor's own data (schema in ``fedem_flwr.data.corpus``)
``languages``  comma-separated language codes to train on, e.g. ``languages='hi,te'``
``cache-dir``  where base checkpoints are cached by digest (default: ``$FEDEM_CACHE``, else
               ``$XDG_CACHE_HOME/fedem``, else ``~/.cache/fedem``)
``base-fetch`` ``hub`` (default): fetch a missing base from the Hugging Face Hub when the hub
               publishes there (read token ``HF_TOKEN``, endpoint ``HF_ENDPOINT``), else take it
               through Flower; ``inband``: always through Flower (``fedem_flwr.node.fetch``)

Chat data, for task adapters such as ``sft-chat``: JSON lines files under ``data-path`` whose rows
hold a ``messages`` column, a conversation as a list of ``{"role": ..., "content": ...}`` turns (as
``datasets`` reads them), beside the ``language`` column, and optionally a ``domain`` column (e.g.
``health``; absent or empty = unknown) that a domain adapter's lease selects by. The profile declares
the languages with at least one conversation (``chat-languages``); a lease names its task and domain,
and a node without rows that fit answers ``no-data``, as does one whose base has no chat template.

In simulation Flower sets ``partition-id`` and ``num-partitions``: the node's profile then
describes its partition of the configured corpus (public and deterministic), and it trains on the
rows the hub sends with each lease, since only the hub knows which rows it holds out.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional

import datasets
import torch

from fedem_flwr.config.schema import TASK_FORMATS, FedemConfig
from fedem_flwr.data.blocks import tokenize_blocks
from fedem_flwr.data.chat import chat_blocks, parse_messages
from fedem_flwr.data.corpus import CHAT, DOMAIN, LANGUAGE, TEXT, column, language_sizes, load_corpus, select_languages
from fedem_flwr.data.partition import partition
from fedem_flwr.data.tasks import CAUSAL_LM
from fedem_flwr.data.tasks import CHAT as CHAT_FORMAT
from fedem_flwr.errors import ConfigError, DataError
from fedem_flwr.model.factory import kernel_path, load_base
from fedem_flwr.model.lora import adapter_state, attach_lora, load_adapter_state
from fedem_flwr.model.tokenizer import has_chat_template
from fedem_flwr.node.cache import BaseCache, NodeConfig
from fedem_flwr.training.device import pick_device
from fedem_flwr.training.finetune import train
from fedem_flwr.training.optimizer_state import OptimizerState

log = logging.getLogger(__name__)

SENT_COLUMNS = (TEXT, LANGUAGE, CHAT, DOMAIN)  # what a hub's rows may hold; chat and domain are optional


@dataclass(frozen=True)
class NodeData:
    """The rows a node trains on, and what its profile reports about them."""

    rows: datasets.Dataset
    languages: tuple[str, ...]
    partition_id: Optional[int] = None
    num_partitions: Optional[int] = None
    chat_languages: tuple[str, ...] = ()  # the languages with at least one conversation (a non-empty ``chat``)

    @classmethod
    def of(cls, rows: datasets.Dataset, partition_id: Optional[int] = None,
           num_partitions: Optional[int] = None) -> "NodeData":
        """``rows`` with the languages and chat languages a profile declares read from them."""
        languages = tuple(sorted(set(column(rows, LANGUAGE))))
        return cls(rows, languages, partition_id, num_partitions, _chat_languages(rows))

    @classmethod
    def from_rows(cls, rows: Mapping[str, list[str]]) -> "NodeData":
        """The rows the hub handed out with a train message (``text`` and ``language`` lists, and
        ``chat`` and ``domain`` when it sent them)."""
        return cls.of(datasets.Dataset.from_dict({name: list(rows[name]) for name in SENT_COLUMNS if name in rows}))

    @property
    def data_bytes(self) -> int:
        return sum(language_sizes(self.rows).values())


def _chat_languages(rows: datasets.Dataset) -> tuple[str, ...]:
    if CHAT not in rows.column_names:
        return ()
    return tuple(sorted({lang for lang, chat in zip(column(rows, LANGUAGE), column(rows, CHAT)) if chat}))


_node_data: dict[str, NodeData] = {}


def node_data(cfg: FedemConfig, node_config: NodeConfig) -> NodeData:
    """The node's own files (``data-path``) or, in simulation, its partition of the corpus.

    Cached per process: a SuperNode (or a simulation actor) answers many messages with the same
    data; files added under ``data-path`` are seen after the SuperNode restarts.
    """
    key = json.dumps([asdict(cfg.data), asdict(cfg.tokenizer), cfg.seed, dict(node_config)], sort_keys=True)
    if key not in _node_data:
        _node_data[key] = _load_node_data(cfg, node_config)
    return _node_data[key]


def training_data(cfg: FedemConfig, node_config: NodeConfig, rows: Optional[Mapping[str, list[str]]]) -> NodeData:
    """What a train message is trained on: the rows the hub sent with it, else the node's own files.

    A simulated node never trains on its corpus partition: that holds the hub's held-out rows."""
    if rows is not None:
        return NodeData.from_rows(rows)
    if "data-path" not in node_config:
        raise DataError("a simulated node trains on the rows the hub sends (`node-rows`); this train message has none")
    return node_data(cfg, node_config)


def _load_node_data(cfg: FedemConfig, node_config: NodeConfig) -> NodeData:
    wanted = _languages(node_config)
    pid = num = None
    if "data-path" in node_config:
        data_cfg = replace(cfg.data, source="files", paths=[str(node_config["data-path"])], languages=list(wanted))
        rows = load_corpus(data_cfg)
    elif "partition-id" in node_config and "num-partitions" in node_config:
        pid, num = int(node_config["partition-id"]), int(node_config["num-partitions"])
        corpus = load_corpus(cfg.data)
        rows = partition(corpus, cfg.data.partitioner, num, pid, cfg.seed, cfg.data.dirichlet_alpha)
        if wanted:
            rows = select_languages(rows, wanted)
    else:
        raise ConfigError(
            "node config needs `data-path` (a contributor) or `partition-id`/`num-partitions` (simulation)"
        )
    if len(rows) == 0:
        raise DataError(f"node has no rows to train on (node config {dict(node_config)})")
    return NodeData.of(rows, pid, num)


def _languages(node_config: NodeConfig) -> tuple[str, ...]:
    raw = str(node_config.get("languages", "") or "")
    return tuple(sorted({part.strip() for part in raw.split(",") if part.strip()}))


# -- one relay fine-tune ---------------------------------------------------------------------------


def lease_rows(data: NodeData, languages: Sequence[str], task: str = CAUSAL_LM, domain: str = "") -> datasets.Dataset:
    """The rows a lease trains on: this node's rows of the leased ``languages``, then of ``domain``
    when named, then for a chat task its conversations only. When none are left ``DataError`` names
    what is missing, so the node answers ``no-data`` and the adapter goes to a node that holds some."""
    if task not in TASK_FORMATS:
        raise ConfigError(f"task {task!r} is unknown; allowed: {', '.join(TASK_FORMATS)}")
    mine = [lang for lang in languages if lang in data.languages]
    if not mine:
        raise DataError(f"this node has no rows in {','.join(languages)}; it holds {','.join(data.languages)}")
    rows = select_languages(data.rows, mine)
    where = ",".join(mine)
    if domain:
        rows = _keep(rows, DOMAIN, lambda value: value == domain, f"no rows of domain {domain!r} in {where}")
        where += f" of domain {domain!r}"
    if TASK_FORMATS[task] == CHAT_FORMAT:
        rows = _keep(rows, CHAT, bool, f"no conversations (rows with `chat`) in {where} for task {task!r}")
    return rows


def _keep(rows: datasets.Dataset, name: str, keep: Callable[[str], bool], missing: str) -> datasets.Dataset:
    """The rows whose ``name`` passes ``keep``; an absent column reads as "" (rows from before it existed)."""
    values = column(rows, name) if name in rows.column_names else [""] * len(rows)
    indices = [i for i, value in enumerate(values) if keep(value)]
    if not indices:
        raise DataError(f"this node has {missing}")
    return rows.select(indices)


def task_blocks(rows: datasets.Dataset, tokenizer, block_size: int, task: str = CAUSAL_LM) -> torch.Tensor:
    """Token blocks of ``rows`` as ``task`` scores them: plain text for ``causal-lm``, conversations
    masked to the assistant's turns for a chat task. A tokenizer without a chat template cannot
    render a conversation: ``DataError``, so the node answers ``no-data`` instead of failing."""
    if TASK_FORMATS[task] != CHAT_FORMAT:
        return tokenize_blocks(rows[TEXT], tokenizer, block_size)
    if not has_chat_template(tokenizer):
        raise DataError(f"the leased base's tokenizer has no chat template; this node cannot train task {task!r}")
    conversations = [parse_messages(chat, where=f"chat row {i}") for i, chat in enumerate(column(rows, CHAT))]
    return chat_blocks(conversations, tokenizer, block_size)


def relay_train(
    cfg: FedemConfig,
    base_folder: Path,
    state: Mapping[str, torch.Tensor],
    data: NodeData,
    languages: tuple[str, ...],
    *,
    budget_s: float,
    max_steps: int,
    seed: int,
    clock: Callable[[], float] = time.monotonic,
    optimizer: Optional[OptimizerState] = None,
    lr_schedule: Optional[Callable[[int], float]] = None,
    task: str = CAUSAL_LM,
    domain: str = "",
    rows: Optional[datasets.Dataset] = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float], Optional[OptimizerState]]:
    """Fine-tune the leased adapter on this node's rows of the lease (``lease_rows``: its languages,
    ``domain`` and ``task``), rendered as ``task`` scores them (``task_blocks``), and stop before the
    lease deadline. ``DataError`` when the node cannot: the ClientApp answers ``no-data``. ``rows``:
    the lease's rows when the caller has already selected them with ``lease_rows`` (not selected again).

    ``seed`` orders the batches; the ClientApp derives it from the lease, so a node that gets the
    same adapter again explores other batches instead of repeating a rejected run. ``optimizer`` is
    the adapter's optimizer state to continue (``train.carry``; checked by the caller against its
    own LoRA's spec) and the third value returned is the updated one (None with ``carry=none``);
    ``lr_schedule`` overrides the schedule (``training.finetune.train``)."""
    started = clock()
    if rows is None:
        rows = lease_rows(data, languages, task, domain)
    model, tokenizer = load_base(str(base_folder))
    blocks = task_blocks(rows, tokenizer, cfg.data.block_size, task)
    device = pick_device(cfg.train.device)
    model = attach_lora(model.to(device), cfg.lora)
    load_adapter_state(model, state)  # validated against the model's own adapter spec
    log.info(
        "Relay fine-tune (%s%s): %d blocks of %s on %s (%s path), budget %.0f s",
        task, f", domain {domain}" if domain else "", len(blocks), ",".join(sorted(set(column(rows, LANGUAGE)))),
        device, kernel_path(model), budget_s,
    )
    result = train(
        model, blocks, replace(cfg.train, max_steps=max_steps), pad_id=tokenizer.pad_token_id,
        seed=seed, deadline=started + budget_s, clock=clock, optimizer_state=optimizer, lr_schedule=lr_schedule,
    )
    metrics = {
        "steps": result.steps,
        "tokens": result.tokens,
        "loss-first": result.loss_first,
        "loss-last": result.loss_last,
        "seconds": clock() - started,
        "own-language-rows": float(len(rows)),
    }
    return adapter_state(model), metrics, result.optimizer_state


def profile(cfg: FedemConfig, node_config: NodeConfig, cache: BaseCache) -> dict[str, Any]:
    """What the hub asks once per node: languages (and those it holds conversations in), device,
    data size, cached bases."""
    data = node_data(cfg, node_config)
    answer: dict[str, Any] = {
        "languages": list(data.languages),
        "chat-languages": list(data.chat_languages),
        "device": pick_device(cfg.train.device).type,
        "data-bytes": data.data_bytes,
        "base-digests": cache.digests(),
    }
    if data.partition_id is not None:
        answer["partition-id"] = data.partition_id
        answer["num-partitions"] = data.num_partitions
    return answer
