"""Task adapters on the node side and on the wire: a profile declares the languages a node holds
conversations in, a train message names the lease's task and domain, and the node trains an
``sft-chat`` lease on its conversations only, masked to the assistant's turns, or answers ``no-data``."""

from __future__ import annotations

import json
import math

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedem_flwr import client_app as client_app_module
from fedem_flwr.client_app import app as client_app
from fedem_flwr.config.loader import load_config, load_run_config
from fedem_flwr.data.blocks import tokenize_blocks
from fedem_flwr.data.chat import chat_blocks, parse_messages
from fedem_flwr.errors import DataError
from fedem_flwr.hub.manifest import digest
from fedem_flwr.hub.store import ArtifactRef
from fedem_flwr.model.factory import build_model, load_base, save_base
from fedem_flwr.model.lora import adapter_state, attach_lora
from fedem_flwr.model.tokenizer import build_byte_tokenizer
from fedem_flwr.node import contributor
from fedem_flwr.node.contributor import NodeData, lease_rows, relay_train
from fedem_flwr.protocol import messages
from fedem_flwr.protocol.wire import adapter_to_arrays
from tests.support.fake_grid import InProcessGrid

OVERRIDES = "train.max_steps=2 train.batch_size=2 train.progress=false data.block_size=32"
PROFILE = {"languages": ["en", "hi"], "device": "cpu", "data-bytes": 5, "base-digests": []}


def _talk(user: str, assistant: str) -> str:
    return json.dumps([{"role": "user", "content": user}, {"role": "assistant", "content": assistant}])


# Two English conversations (one tagged health), English and Hindi plain text.
ROWS = {
    "text": ["Hi\nHello there", "Fever?\nRest and drink water", "Plain English prose", "नमस्ते दुनिया"],
    "language": ["en", "en", "en", "hi"],
    "chat": [_talk("Hi", "Hello there"), _talk("Fever?", "Rest and drink water"), "", ""],
    "domain": ["", "health", "health", ""],
}


@pytest.fixture(scope="module")
def identity():
    InProcessGrid(ClientApp(), {}, {})  # sets the task identity messages need


def _query() -> Message:
    query = messages.profile_message(10, ttl=60)
    query.metadata.__dict__["_message_id"] = "q"
    return query


def _profile(identity, **fields) -> messages.ProfileReply:
    answer = {**PROFILE, **fields}
    return messages.parse_profile_reply(messages.profile_reply(_query(), answer))


# -- the profile -----------------------------------------------------------------------------------


def test_a_profile_declares_its_chat_languages_and_an_old_node_declares_none(identity):
    assert _profile(identity, **{"chat-languages": ["hi", "en", "en"]}).chat_languages == ("en", "hi")
    assert _profile(identity).chat_languages == ()  # a node from before tasks sends no key


@pytest.mark.parametrize(("value", "reason"), [
    ("en", r"`chat-languages` is 'en'; it must be a list of strings"),
    ([1], r"`chat-languages` is \[1\]; it must be a list of strings"),
    (["english"], r"`chat-languages` holds 'english', not a language code"),
    (["en", "ta"], r"`chat-languages` holds 'ta', absent from its `languages` \['en', 'hi'\]"),
    (["en"] * 65, r"`chat-languages` holds 65 entries; at most 64"),
    (["x" * 1_000_000], r"`chat-languages` holds 'xxx.*\.\.\., not a language code"),
], ids=["not-a-list", "not-strings", "not-a-code", "undeclared-language", "too-many", "huge"])
def test_a_hostile_chat_declaration_is_refused_naming_the_value(identity, value, reason):
    with pytest.raises(messages.InvalidReply, match=reason) as caught:
        _profile(identity, **{"chat-languages": value})
    assert len(str(caught.value)) < 300  # a huge value is named, never echoed


def test_the_node_profile_reports_the_languages_it_holds_conversations_in(tmp_path, monkeypatch):
    data = NodeData.from_rows(ROWS)
    monkeypatch.setattr(contributor, "node_data", lambda cfg, node_config: data)
    answer = contributor.profile(load_config(), {}, contributor.BaseCache(tmp_path))
    assert (answer["languages"], answer["chat-languages"]) == (["en", "hi"], ["en"])


# -- the train instruction ---------------------------------------------------------------------------

BASE = ArtifactRef("t/base", "v0", "a" * 64)


def _instruction(**fields) -> messages.TrainInstruction:
    return messages.TrainInstruction(**{"adapter": "en-chat", "adapter_version": 3, "languages": ("en",),
                                        "token": 7, "base": BASE, "base_version": 0, "budget_s": 60.0,
                                        "max_steps": 2, **fields})


def _message(instruction: messages.TrainInstruction, rows=None) -> Message:
    return messages.train_message(10, instruction, adapter_to_arrays({"w": torch.zeros(1)}), ttl=60, rows=rows)


def test_the_task_and_domain_travel_and_are_omitted_at_their_defaults(identity):
    task = _instruction(task="sft-chat", domain="health")
    plain = _instruction()

    sent, old = _message(task).content["config"], _message(plain).content["config"]

    assert (sent["task"], sent["domain"]) == ("sft-chat", "health")
    assert "task" not in old and "domain" not in old  # a language adapter's message reads as before
    assert messages.parse_train_instruction(_message(task)) == task
    assert messages.parse_train_instruction(_message(plain)) == plain
    assert (plain.task, plain.domain) == ("causal-lm", "")


@pytest.mark.parametrize(("key", "value"), [
    ("task", "rlhf"), ("task", 7), ("task", ""), ("domain", "../etc"), ("domain", "health care"),
    ("domain", "x" * 65), ("domain", "en@health"), ("domain", ".hidden"), ("domain", 5),
])
def test_a_hostile_task_or_domain_is_refused_on_the_node(identity, key, value):
    message = _message(_instruction())
    message.content["config"][key] = value
    with pytest.raises(messages.InvalidInstruction, match=f"train message `{key}` is"):
        messages.parse_train_instruction(message)


@pytest.mark.parametrize(("column", "value", "reason"), [
    ("text", None, "`text` is missing"),
    ("language", None, "`language` is missing"),
    ("text", "abcd", "`text` is of type str"),
    ("chat", [1, 2, 3, 4], "`chat` is a list holding int"),
])
def test_hub_rows_of_the_wrong_shape_are_refused_naming_the_column(identity, column, value, reason):
    message = _message(_instruction(), rows=ROWS)
    sent = {name: values for name, values in ROWS.items() if name != column}
    if value is not None:
        sent[column] = value
    message.content[messages.NODE_ROWS] = ConfigRecord(sent)
    with pytest.raises(messages.InvalidInstruction, match=f"{reason}; it must be a list of strings"):
        messages.node_rows(message)


def test_the_hubs_rows_carry_conversations_and_domains(identity):
    plain = {"text": ROWS["text"], "language": ROWS["language"]}

    assert messages.node_rows(_message(_instruction(), rows=ROWS)) == ROWS
    assert messages.node_rows(_message(_instruction(), rows=plain)) == plain
    short = _message(_instruction(), rows={**ROWS, "chat": ROWS["chat"][:2]})
    with pytest.raises(messages.InvalidInstruction, match="has 2 `chat` for 4 `text` rows"):
        messages.node_rows(short)


# -- the node's rows -------------------------------------------------------------------------------


def test_node_data_names_the_languages_with_conversations():
    data = NodeData.from_rows(ROWS)

    assert (data.languages, data.chat_languages) == (("en", "hi"), ("en",))
    assert NodeData.from_rows({"text": ["a"], "language": ["en"]}).chat_languages == ()


@pytest.mark.parametrize(("task", "domain", "texts"), [
    ("causal-lm", "", ROWS["text"][:3]),  # every row reads as text
    ("causal-lm", "health", ROWS["text"][1:3]),
    ("sft-chat", "", ROWS["text"][:2]),
    ("sft-chat", "health", ROWS["text"][1:2]),
])
def test_a_lease_selects_its_languages_then_its_domain_then_its_format(task, domain, texts):
    assert lease_rows(NodeData.from_rows(ROWS), ("en",), task, domain)["text"] == texts


@pytest.mark.parametrize(("languages", "task", "domain", "reason"), [
    (("ta",), "causal-lm", "", "no rows in ta; it holds en,hi"),
    (("en", "hi"), "causal-lm", "law", "no rows of domain 'law' in en,hi"),
    (("hi",), "sft-chat", "", r"no conversations \(rows with `chat`\) in hi for task 'sft-chat'"),
])
def test_a_lease_without_rows_names_what_is_missing(languages, task, domain, reason):
    with pytest.raises(DataError, match=reason):
        lease_rows(NodeData.from_rows(ROWS), languages, task, domain)


def test_rows_from_before_chat_and_domain_existed_hold_neither():
    old = NodeData.from_rows({"text": ["a"], "language": ["en"]})
    with pytest.raises(DataError, match="no rows of domain 'health'"):
        lease_rows(old, ("en",), "causal-lm", "health")
    with pytest.raises(DataError, match="no conversations"):
        lease_rows(old, ("en",), "sft-chat")


# -- relay fine-tunes on a tiny base -----------------------------------------------------------------


@pytest.fixture(scope="module")
def cfg():
    return load_config(OVERRIDES.split())


def _save_base(cfg, folder, chat: bool):
    tokenizer = build_byte_tokenizer(chat=chat)
    return save_base(build_model(cfg.model, tokenizer), tokenizer, folder)


@pytest.fixture(scope="module")
def chat_base(cfg, tmp_path_factory):
    return _save_base(cfg, tmp_path_factory.mktemp("chat-base"), chat=True)


@pytest.fixture(scope="module")
def plain_base(cfg, tmp_path_factory):
    return _save_base(cfg, tmp_path_factory.mktemp("plain-base"), chat=False)


def _fresh_adapter(cfg, base):
    model, _ = load_base(str(base))
    return adapter_state(attach_lora(model, cfg.lora))


def _train(cfg, base, monkeypatch, **lease):
    """``relay_train`` on ``ROWS`` in English; returns its metrics and the blocks it trained on."""
    seen = []
    real = contributor.train

    def spy(model, blocks, *args, **kwargs):
        seen.append(blocks)
        return real(model, blocks, *args, **kwargs)

    monkeypatch.setattr(contributor, "train", spy)
    _, metrics, _ = relay_train(cfg, base, _fresh_adapter(cfg, base), NodeData.from_rows(ROWS), ("en",),
                                budget_s=600.0, max_steps=cfg.train.max_steps, seed=0, **lease)
    return metrics, seen[0]


def test_an_sft_chat_lease_trains_on_the_conversations_masked_to_the_assistant(cfg, chat_base, monkeypatch):
    metrics, blocks = _train(cfg, chat_base, monkeypatch, task="sft-chat")

    _, tokenizer = load_base(str(chat_base))
    conversations = [parse_messages(chat, where="test") for chat in ROWS["chat"][:2]]
    assert torch.equal(blocks, chat_blocks(conversations, tokenizer, cfg.data.block_size))
    assert (blocks < 0).any() and (blocks > 0).any()  # the user's turns are context, the assistant's targets
    assert metrics["own-language-rows"] == 2.0  # the conversations, not the plain English row
    assert metrics["steps"] == cfg.train.max_steps and math.isfinite(metrics["loss-last"])


def test_a_causal_lm_lease_of_a_domain_trains_on_that_domains_text(cfg, chat_base, monkeypatch):
    metrics, blocks = _train(cfg, chat_base, monkeypatch, domain="health")

    _, tokenizer = load_base(str(chat_base))
    assert torch.equal(blocks, tokenize_blocks(ROWS["text"][1:3], tokenizer, cfg.data.block_size))
    assert metrics["own-language-rows"] == 2.0


def test_a_lease_the_node_cannot_train_raises_data_error_before_training(cfg, chat_base, plain_base, monkeypatch):
    with pytest.raises(DataError, match="no rows of domain 'law' in en"):
        _train(cfg, chat_base, monkeypatch, task="sft-chat", domain="law")
    with pytest.raises(DataError, match="no chat template"):
        _train(cfg, plain_base, monkeypatch, task="sft-chat")


# -- the ClientApp ---------------------------------------------------------------------------------


def _ask(cfg, base, tmp_path, rows=ROWS, **lease) -> messages.TrainReply:
    """One train message through the real ClientApp of a simulated node handed ``rows``."""
    run_config = {"overrides": OVERRIDES}
    node_config = {"partition-id": 0, "num-partitions": 2, "cache-dir": str(tmp_path / "cache")}
    ref = ArtifactRef("t/base", "v0", digest(base))
    instruction = _instruction(base=ref, **lease)
    state = _fresh_adapter(load_run_config(run_config), base)
    message = messages.train_message(100, instruction, adapter_to_arrays(state), ttl=600, base_folder=base,
                                     rows=rows)
    message.metadata.__dict__["_message_id"] = "m"
    reply = client_app(message, Context(7, 100, node_config, RecordDict(), run_config))
    return messages.parse_train_reply(reply, instruction)


def test_the_client_app_trains_a_chat_lease_and_answers_no_data_when_it_cannot(
    identity, cfg, chat_base, plain_base, tmp_path
):
    trained = _ask(cfg, chat_base, tmp_path, task="sft-chat", domain="health")
    no_domain = _ask(cfg, chat_base, tmp_path, task="sft-chat", domain="law")
    no_chat = _ask(cfg, chat_base, tmp_path, languages=("hi",), task="sft-chat")
    no_template = _ask(cfg, plain_base, tmp_path, task="sft-chat")

    assert (trained.status, trained.metrics["own-language-rows"]) == (messages.OK, 1.0)
    assert (no_domain.status, no_chat.status, no_template.status) == (messages.NO_DATA,) * 3
    assert "no rows of domain 'law'" in no_domain.detail
    assert "no conversations" in no_chat.detail
    assert "no chat template" in no_template.detail


def test_the_client_app_selects_a_leases_rows_once(identity, cfg, chat_base, tmp_path, monkeypatch):
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[1:])
        return lease_rows(*args, **kwargs)

    monkeypatch.setattr(client_app_module, "lease_rows", counted)
    monkeypatch.setattr(contributor, "lease_rows", counted)

    reply = _ask(cfg, chat_base, tmp_path, task="sft-chat")

    assert (reply.status, reply.metrics["own-language-rows"]) == (messages.OK, 2.0)
    assert calls == [(("en",), "sft-chat", "")]  # the pre-check's rows are the rows trained on


def test_a_malformed_conversation_in_the_hubs_rows_is_answered_no_data_naming_it(identity, cfg, chat_base, tmp_path):
    broken = {**ROWS, "chat": ["[{'role': 'user'}]", *ROWS["chat"][1:]]}

    reply = _ask(cfg, chat_base, tmp_path, rows=broken, task="sft-chat")

    assert reply.status == messages.NO_DATA and "chat row 0: messages are a string but not JSON" in reply.detail
