"""Conversations: checked on the way in, rendered as masked token blocks for ``sft-chat`` adapters.

A conversation is a list of ``{"role", "content"}`` turns, roles ``system``, ``user`` and
``assistant``; the corpus stores it as a JSON string (one string column concatenates and ships like
any other). Every conversation reaching a model went through :func:`parse_messages`, so a malformed
row fails where it is read, naming its file and row, not deep inside a Jinja template.

:func:`chat_blocks` renders conversations with the tokenizer's chat template and packs them like
``blocks.tokenize_blocks`` packs documents (each followed by eos, concatenated, cut in rows, the
tail padded). Only the assistant's tokens are targets: the template's ``{% generation %}`` mask
marks the assistant's content and its ``<|end|>``; every other token is stored as context
(``~id``, see ``data.labels``). The eos after a conversation is a target when the assistant spoke
last (the model learns to stop after its answer) and context otherwise.

As flat text (:func:`conversation_text`: the contents joined by newlines) a conversation is also an
ordinary document of its language, which is how the language's own adapter and the keyed held-out
lottery read it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fedem_flwr.errors import DataError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")  # after every other token, in this order
ROLES = ("system", "user", "assistant")
# One line, so no newline creeps into the rendering; no bos: blocks separate conversations with eos.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}"
    "{% else %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")

MAX_TURNS = 256  # a conversation longer than this is more likely a broken export than a dialogue
ASSISTANT = "assistant"


def parse_messages(value: Any, *, where: str) -> list[dict[str, str]]:
    """The turns of a conversation given as a list of ``{"role", "content"}`` mappings or its JSON string.

    Extra keys of a turn are dropped. Raises :class:`DataError` naming ``where`` and what is wrong.
    """
    if isinstance(value, str):
        value = _json(value, where)
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
        raise DataError(f"{where}: messages are {_kind(value)}, not a list of {{'role', 'content'}} turns.")
    if not value:
        raise DataError(f"{where}: the conversation has no turns; give a list of {{'role', 'content'}} turns.")
    if len(value) > MAX_TURNS:
        raise DataError(f"{where}: the conversation has {len(value)} turns; at most {MAX_TURNS} are accepted.")
    turns = [_turn(turn, i, where) for i, turn in enumerate(value)]
    if not any(turn["role"] == ASSISTANT for turn in turns):
        raise DataError(
            f"{where}: the conversation has no assistant turn, so nothing to learn (`sft-chat` learns only "
            "the assistant's tokens)."
        )
    return turns


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{where}: messages are a string but not JSON ({err.msg} at character {err.pos}); give a list of "
            "{'role', 'content'} turns or its JSON."
        ) from err


def _turn(turn: Any, index: int, where: str) -> dict[str, str]:
    if not isinstance(turn, Mapping):
        raise DataError(f"{where}: turn {index} is {_kind(turn)}, not a {{'role', 'content'}} mapping.")
    role, content = turn.get("role"), turn.get("content")
    if not isinstance(role, str) or role not in ROLES:
        raise DataError(
            f"{where}: turn {index} has role {role!r}; a role is one of {', '.join(repr(r) for r in ROLES)}."
        )
    if not isinstance(content, str):
        raise DataError(f"{where}: turn {index} ({role}) has content {_kind(content)}; content must be a string.")
    return {"role": role, "content": content}


def _kind(value: Any) -> str:
    return "missing" if value is None else f"of type {type(value).__name__}"


def conversation_text(messages: Iterable[Mapping[str, str]]) -> str:
    """The conversation as one flat document: its turns' contents joined by newlines."""
    return "\n".join(message["content"] for message in messages)


def chat_blocks(
    conversations: Iterable[list[dict[str, str]]], tokenizer: "PreTrainedTokenizerBase", block_size: int
) -> "torch.Tensor":
    """int64 ``[n, block_size]`` of rendered ``conversations``, context tokens stored as ``~id`` (module doc)."""
    import torch  # here, not above: reading a corpus (``parse_messages``) needs no torch

    from fedem_flwr.data.labels import check_block_size, pack_blocks, special_ids

    check_block_size(block_size)
    if not has_chat_template(tokenizer):
        raise DataError(
            f"tokenizer {type(tokenizer).__name__} has no chat template marking the assistant's tokens "
            "({% generation %}); `sft-chat` needs one: use `tokenizer.kind=bytes` with `tokenizer.chat=true`, "
            "or a pretrained tokenizer whose template has generation markers."
        )
    eos, pad = special_ids(tokenizer)
    conversations = [list(conversation) for conversation in conversations]
    if not conversations:
        return torch.empty((0, block_size), dtype=torch.long)
    rendered = tokenizer.apply_chat_template(
        conversations, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    documents = [
        _masked(ids, mask, eos) for ids, mask in zip(rendered["input_ids"], rendered["assistant_masks"])
    ]
    return pack_blocks(documents, pad, block_size)


def _masked(ids: Sequence[int], mask: Sequence[int], eos: int) -> np.ndarray:
    """One rendered conversation and its eos, context tokens complemented."""
    ids = np.asarray([*ids, eos], dtype=np.int64)
    target = np.asarray([*mask, 0], dtype=bool)
    target[-1] = bool(target[-2]) if len(target) > 1 else False  # eos: learnt after the assistant's last turn
    return np.where(target, ids, ~ids)


def has_chat_template(tokenizer: "PreTrainedTokenizerBase") -> bool:
    """Whether ``tokenizer`` can render conversations with an assistant mask.

    Its template must mark the assistant's tokens (``{% generation %}``); a template in our role-token
    spelling also needs those tokens in the vocabulary, or each role would come out as a dozen bytes.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or not _GENERATION.search(template):
        return False
    if ROLE_TOKENS[-1] not in template:
        return True  # a pretrained tokenizer's own template and tokens
    vocab = tokenizer.get_vocab()
    return all(token in vocab for token in ROLE_TOKENS)
