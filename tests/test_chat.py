"""Conversations: the byte tokenizer's chat template, masked blocks (loss on the assistant's tokens only),
conversation columns of every corpus source, hostile messages, and held-out sets for task keys."""

from __future__ import annotations

import json
import logging
import time

import datasets
import pytest
import torch
from transformers import AutoTokenizer

from fedem_flwr.config.schema import DataConfig
from fedem_flwr.data.blocks import heldout_split, tokenize_blocks
from fedem_flwr.data.chat import MAX_TURNS, chat_blocks, conversation_text, parse_messages
from fedem_flwr.data.corpus import column, corpus_digest, load_corpus
from fedem_flwr.data.labels import IGNORE_INDEX, inputs_of, labels_for, target_count
from fedem_flwr.errors import ConfigError, DataError
from fedem_flwr.model.tokenizer import build_byte_tokenizer

datasets.disable_progress_bars()

KEY = bytes(range(32))
SYSTEM, USER, ASSISTANT, END = 260, 261, 262, 263  # the role tokens' ids in the byte tokenizer
EOS, PAD = 2, 0
TWO_TURNS = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
THREE_TURNS = [{"role": "system", "content": "Be brief."}, *TWO_TURNS]


def byte_ids(text: str) -> list[int]:
    return [b + 4 for b in text.encode("utf-8")]


def render(tokenizer, messages, **kwargs):
    return tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, **kwargs
    )


@pytest.fixture(scope="module")
def demo():
    return load_corpus(DataConfig())


# -- the chat template ------------------------------------------------------------------------------
def test_the_template_renders_role_tokens_and_masks_the_assistant(tokenizer):
    # Execute
    text = tokenizer.apply_chat_template(THREE_TURNS, tokenize=False)
    out = render(tokenizer, THREE_TURNS)
    prompt = tokenizer.apply_chat_template(THREE_TURNS[:2], tokenize=False, add_generation_prompt=True)

    # Assert: one id per role token, bytes for content, no bos; the mask is the answer and its <|end|>
    assert text == "<|system|>Be brief.<|end|><|user|>hi<|end|><|assistant|>hello<|end|>"
    context = [SYSTEM, *byte_ids("Be brief."), END, USER, *byte_ids("hi"), END, ASSISTANT]
    assert out["input_ids"] == [*context, *byte_ids("hello"), END]
    assert out["assistant_masks"] == [0] * len(context) + [1] * (len("hello") + 1)
    assert prompt == "<|system|>Be brief.<|end|><|user|>hi<|end|><|assistant|>"


def test_special_spellings_in_content_stay_bytes(tokenizer):
    messages = [{"role": "user", "content": "say <eos>"}, {"role": "assistant", "content": "<bos><pad>"}]

    out = render(tokenizer, messages)

    assert out["input_ids"] == [USER, *byte_ids("say <eos>"), END, ASSISTANT, *byte_ids("<bos><pad>"), END]
    assert EOS not in out["input_ids"]


def test_the_template_round_trips_through_save_pretrained(tokenizer, tmp_path):
    # Execute
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)

    # Assert: the template file a plain transformers pipeline reads, and the same ids, text and mask
    assert (tmp_path / "chat_template.jinja").is_file()
    for messages in (TWO_TURNS, THREE_TURNS):
        before, after = render(tokenizer, messages), render(reloaded, messages)
        assert after["input_ids"] == before["input_ids"]
        assert after["assistant_masks"] == before["assistant_masks"]
        text = reloaded.apply_chat_template(messages, tokenize=False)
        assert text == tokenizer.apply_chat_template(messages, tokenize=False)
        # Non-special role tokens: tokenizing the rendered text gives the template's ids
        assert reloaded(text, add_special_tokens=False)["input_ids"] == before["input_ids"]


# -- masked blocks --------------------------------------------------------------------------------
def test_a_two_turn_conversation_has_exactly_the_answer_its_end_and_eos_as_targets(tokenizer):
    # Execute
    blocks = chat_blocks([TWO_TURNS], tokenizer, block_size=16)
    labels = labels_for(blocks, PAD)

    # Assert, counted by hand: <|user|> h i <|end|> <|assistant|> are context (stored ~id);
    # h e l l o <|end|> eos are the 7 targets; the tail is padding
    context = [USER, *byte_ids("hi"), END, ASSISTANT]
    assert blocks.tolist() == [[*(~i for i in context), *byte_ids("hello"), END, EOS, PAD, PAD, PAD, PAD]]
    assert target_count(labels) == len("hello") + 1 + 1 == 7
    assert labels.tolist() == [[IGNORE_INDEX] * 5 + [*byte_ids("hello"), END, EOS] + [IGNORE_INDEX] * 4]


def test_no_target_falls_on_a_system_or_user_turn(tokenizer):
    blocks = chat_blocks([THREE_TURNS, TWO_TURNS], tokenizer, block_size=8)

    labels, inputs = labels_for(blocks, PAD), inputs_of(blocks)

    targets = inputs[labels != IGNORE_INDEX].tolist()
    assert targets == [*byte_ids("hello"), END, EOS] * 2  # the answers, their ends and eos: nothing else
    assert not {SYSTEM, USER, ASSISTANT} & set(targets)


def test_inputs_of_and_labels_for_round_trip(tokenizer):
    conversations = [THREE_TURNS, TWO_TURNS, [{"role": "user", "content": "नमस्ते"}, TWO_TURNS[1]]]

    blocks = chat_blocks(conversations, tokenizer, block_size=8)
    inputs, labels = inputs_of(blocks), labels_for(blocks, PAD)

    # Inputs: every rendered conversation and its eos, packed like text, padded at the tail only
    rendered = [id_ for c in conversations for id_ in [*render(tokenizer, c)["input_ids"], EOS]]
    assert inputs.flatten().tolist()[: len(rendered)] == rendered
    assert (inputs.flatten()[len(rendered):] == PAD).all() and (inputs >= 0).all()
    # Labels: the input where it is a target, -100 at context and padding
    targets = labels != IGNORE_INDEX
    assert torch.equal(labels[targets], inputs[targets]) and torch.equal(targets, blocks > 0)
    # Plain text blocks carry no context: unchanged by inputs_of, labels exactly as before masks
    plain = tokenize_blocks(["hello", "नमस्ते"], tokenizer, block_size=8)
    assert torch.equal(inputs_of(plain), plain)
    assert torch.equal(labels_for(plain, PAD), plain.masked_fill(plain == PAD, IGNORE_INDEX))


def test_the_eos_after_a_conversation_ending_with_the_user_is_context(tokenizer):
    messages = [*TWO_TURNS, {"role": "user", "content": "bye"}]

    blocks = chat_blocks([messages], tokenizer, block_size=32)

    flat = blocks.flatten().tolist()
    assert ~EOS in flat and EOS not in flat
    assert target_count(labels_for(blocks, PAD)) == len("hello") + 1  # the answer and its end only


def test_chat_blocks_need_a_chat_template():
    with pytest.raises(DataError, match=r"no chat template.*tokenizer.chat=true"):
        chat_blocks([TWO_TURNS], build_byte_tokenizer(chat=False), 16)


def test_chat_blocks_render_hundreds_of_conversations_quickly(demo, tokenizer):
    conversations = [parse_messages(chat, where="demo") for chat in column(demo, "chat")[:400] if chat]

    start = time.perf_counter()
    blocks = chat_blocks(conversations, tokenizer, block_size=128)
    seconds = time.perf_counter() - start

    assert len(conversations) > 300 and blocks.shape[0] > 100
    assert seconds < 1.0


# -- parsing messages ------------------------------------------------------------------------------
def test_messages_are_read_from_a_list_or_its_json():
    turns = [{"role": "user", "content": "a", "name": "x"}, {"role": "assistant", "content": ""}]

    assert parse_messages(turns, where="w") == [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]
    assert parse_messages(json.dumps(turns), where="w") == parse_messages(turns, where="w")
    assert conversation_text(parse_messages(THREE_TURNS, where="w")) == "Be brief.\nhi\nhello"


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ([{"role": "robot", "content": "x"}, TWO_TURNS[1]], r"turn 0 has role 'robot'; a role is one of 'system'"),
        ([{"role": "user", "content": 3}, TWO_TURNS[1]], r"turn 0 \(user\) has content of type int; .* a string"),
        ([TWO_TURNS[0], {"role": "assistant"}], r"turn 1 \(assistant\) has content missing"),
        ([TWO_TURNS[0]], r"no assistant turn"),
        ({"role": "user", "content": "x"}, r"messages are of type dict, not a list"),
        (7, r"messages are of type int, not a list"),
        ("[{'role': 'user'}]", r"messages are a string but not JSON"),
        ('"just text"', r"messages are of type str, not a list"),
        ([], r"no turns"),
        (["hi", "there"], r"turn 0 is of type str, not a \{'role', 'content'\} mapping"),
        ([TWO_TURNS[0]] * (MAX_TURNS + 1), rf"{MAX_TURNS + 1} turns; at most {MAX_TURNS}"),
    ],
)
def test_hostile_messages_are_data_errors_naming_the_place(value, match):
    with pytest.raises(DataError, match=match) as err:
        parse_messages(value, where="`data.paths` file 'x.jsonl' row 4")

    assert str(err.value).startswith("`data.paths` file 'x.jsonl' row 4: ")


# -- corpus columns --------------------------------------------------------------------------------
def test_chatterbot_conversations_keep_their_text_and_gain_turns_and_domains(demo):
    # The (language, text) digest of the corpus before chat columns existed (the old loader's rows):
    # the keyed held-out split and every hub's corpus fingerprint stay where they were.
    assert corpus_digest(demo) == "0085903d5f64364c8832a3f1cda95b430886bf49536b34c5192c64fce7ecc4d6"
    assert demo.features == datasets.Features({c: datasets.Value("string") for c in demo.column_names})

    rows = demo.to_list()
    chats = [row for row in rows if row["chat"]]
    assert len(chats) > 0.99 * len(rows)
    for row in chats:
        turns = parse_messages(row["chat"], where="demo")
        assert conversation_text(turns) == row["text"]
        assert [t["role"] for t in turns] == [("user", "assistant")[i % 2] for i in range(len(turns))]
    singles = [row for row in rows if not row["chat"]]
    assert singles and all("\n" not in row["text"] for row in singles)  # a single line is no chat
    english = {row["domain"] for row in rows if row["language"] == "en"}
    assert {"greetings", "health", "botprofile"} <= english and "" not in english


def test_a_jsonl_of_conversations_with_domains_joins_text_files(tmp_path):
    # Prepare: conversations, a plain row of the same table, a table without text, and a text file
    rows = [
        {"messages": THREE_TURNS, "language": "en", "domain": "health"},
        {"messages": TWO_TURNS, "language": "Hindi", "domain": None},
        {"messages": None, "text": "just text", "language": "en", "domain": "misc"},
    ]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    (tmp_path / "notes.ta.txt").write_text("ஒன்று\n\nஇரண்டு\n", encoding="utf-8")
    (tmp_path / "only_chat.jsonl").write_text(json.dumps({"messages": TWO_TURNS, "language": "te"}), encoding="utf-8")

    # Execute
    ds = load_corpus(DataConfig(source="files", paths=[str(tmp_path)]))

    # Assert: the same four string columns from every file, concatenated
    assert ds.column_names == ["text", "language", "chat", "domain"]
    got = {(row["language"], row["text"]): row for row in ds.to_list()}
    health = got[("en", "Be brief.\nhi\nhello")]
    assert json.loads(health["chat"]) == THREE_TURNS and health["domain"] == "health"
    assert json.loads(got[("hi", "hi\nhello")]["chat"]) == TWO_TURNS and got[("hi", "hi\nhello")]["domain"] == ""
    assert got[("en", "just text")]["chat"] == "" and got[("en", "just text")]["domain"] == "misc"
    assert got[("ta", "ஒன்று")] == {"text": "ஒன்று", "language": "ta", "chat": "", "domain": ""}
    assert json.loads(got[("te", "hi\nhello")]["chat"]) == TWO_TURNS  # no text column needed


def test_a_csv_of_conversations_in_renamed_columns(tmp_path):
    path = tmp_path / "c.csv"
    datasets.Dataset.from_list([{"turns": json.dumps(TWO_TURNS), "lang": "fr", "topic": "greetings"}]).to_csv(path)

    ds = load_corpus(DataConfig(source="files", paths=[str(path)], messages_column="turns",
                                language_column="lang", domain_column="topic"))

    assert ds.to_list() == [{"text": "hi\nhello", "language": "fr", "chat": json.dumps(TWO_TURNS),
                             "domain": "greetings"}]


def test_a_bad_conversation_names_its_file_row_and_column(tmp_path):
    path = tmp_path / "bad.jsonl"
    bad_turn = [{"role": "bot", "content": "x"}]
    lines = [{"messages": TWO_TURNS, "language": "en"}, {"messages": bad_turn, "language": "en"}]
    path.write_text("\n".join(json.dumps(r) for r in lines), encoding="utf-8")

    with pytest.raises(DataError, match=r"bad.jsonl' row 1, column 'messages': turn 0 has role 'bot'"):
        load_corpus(DataConfig(source="files", paths=[str(path)]))


def test_a_table_with_neither_text_nor_messages_names_both_columns(tmp_path):
    path = tmp_path / "none.jsonl"
    path.write_text('{"body": "x", "language": "en"}\n', encoding="utf-8")

    with pytest.raises(DataError, match=r"no column 'text' \(`data.text_column`\) nor 'messages'"):
        load_corpus(DataConfig(source="files", paths=[str(path)]))


# -- held-out sets for task keys ------------------------------------------------------------------
@pytest.fixture(scope="module")
def task_split(demo, tokenizer):
    return heldout_split(demo, 0.1, 2, 64, tokenizer, KEY, extra_keys=["en:chat", "en@greetings", "en"])


def test_task_keys_get_blocks_and_leave_the_language_split_as_it_was(demo, tokenizer, task_split):
    plain = heldout_split(demo, 0.1, 2, 64, tokenizer, KEY)

    # The language-level split, bit for bit
    assert task_split.withheld == plain.withheld
    assert sorted(column(task_split.train, "text")) == sorted(column(plain.train, "text"))
    assert set(task_split.heldout) == set(plain.heldout) | {"en:chat", "en@greetings"}
    assert all(torch.equal(task_split.heldout[k], plain.heldout[k]) for k in plain.heldout)
    # The task sets: full blocks enough, masked for chat, plain for a domain of text
    chat, greetings = task_split.heldout["en:chat"], task_split.heldout["en@greetings"]
    assert chat.shape[1] == 64 and (chat < 0).any() and target_count(labels_for(chat, PAD)) > 0
    assert greetings.shape[0] >= 2 and (greetings >= 0).all()


def test_task_sets_hold_only_withheld_rows_of_their_domain(demo, tokenizer, task_split):
    held = {text for lang, text in task_split.withheld if lang == "en"}
    greeting_rows = {row["text"] for row in demo.to_list() if row["language"] == "en" and row["domain"] == "greetings"}

    docs = tokenizer.decode(task_split.heldout["en@greetings"].flatten().tolist()).split(tokenizer.eos_token)[:-1]
    chat = inputs_of(task_split.heldout["en:chat"]).flatten().tolist()

    assert docs and set(docs) <= held & greeting_rows
    # The chat set renders every withheld English conversation once (one eos each), single lines none
    conversations = [row for row in demo.to_list() if row["language"] == "en" and row["chat"] and row["text"] in held]
    assert chat.count(EOS) == len(conversations) > 0


def test_task_keys_get_test_blocks_and_small_keys_no_entry(demo, tokenizer, caplog):
    with caplog.at_level(logging.INFO, logger="fedem_flwr.data.blocks"):
        split = heldout_split(demo, 0.1, 2, 64, tokenizer, KEY, test_fraction=0.1,
                              extra_keys=["en:chat", "te:chat@nowhere", "th:chat"])

    assert "en:chat" in split.test and "en:chat" in split.heldout
    assert not {"te:chat@nowhere", "th:chat"} & (set(split.heldout) | set(split.test))
    assert "te:chat@nowhere (0 of 2 blocks)" in caplog.text and "th:chat test" in caplog.text


def test_an_unknown_format_in_a_key_is_a_config_error(demo, tokenizer):
    with pytest.raises(ConfigError, match="'en:audio'"):
        heldout_split(demo, 0.1, 2, 64, tokenizer, KEY, extra_keys=["en:audio"])


def test_a_corpus_without_chat_or_domain_columns_gives_no_task_sets(demo, tokenizer):
    text_only = demo.filter(lambda row: row["language"] == "en").select_columns(["text", "language"])

    split = heldout_split(text_only, 0.1, 2, 64, tokenizer, KEY, extra_keys=["en:chat", "en@greetings"])

    assert set(split.heldout) == {"en"}
