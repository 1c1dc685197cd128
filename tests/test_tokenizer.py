"""Byte tokenizer: exact round-trip of every script, special-token spellings kept, standard reload, role tokens."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from fedem_flwr.config.schema import TokenizerConfig
from fedem_flwr.errors import ConfigError, ModelNotFound
from fedem_flwr.model.tokenizer import (
    BYTE_VOCAB_SIZE,
    ROLE_TOKENS,
    build_byte_tokenizer,
    has_chat_template,
    load_tokenizer,
)

SAMPLES = {
    "latin": "Grüße, señor! Ça va? naïve façade",
    "devanagari": "नमस्ते दुनिया, आप कैसे हैं?",
    "telugu": "హలో ప్రపంచం, మీరు ఎలా ఉన్నారు?",
    "cjk": "你好，世界。日本語のテキスト。한국어 문장.",
    "arabic": "مرحبا بالعالم، كيف حالك؟",
    "emoji": "🙂👍🏽 family 👨‍👩‍👧 flag 🇮🇳",
    "specials": "literal <pad> and <eos><bos> then <unk>!",
    "whitespace": "  two spaces\n\ttab\r\nend  ",
}


@pytest.fixture(scope="module")
def saved_and_reloaded(tmp_path_factory):
    tokenizer = build_byte_tokenizer()
    folder = tmp_path_factory.mktemp("tok")
    tokenizer.save_pretrained(folder)
    return tokenizer, AutoTokenizer.from_pretrained(folder)


def test_vocab_and_special_ids():
    tokenizer = build_byte_tokenizer(chat=False)

    assert len(tokenizer) == BYTE_VOCAB_SIZE == 260
    assert tokenizer.chat_template is None and not has_chat_template(tokenizer)
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (
        0, 1, 2, 3,
    )
    assert tokenizer("A", add_special_tokens=False)["input_ids"] == [ord("A") + 4]


@pytest.mark.parametrize("script", sorted(SAMPLES))
def test_round_trip_every_script(saved_and_reloaded, script):
    text = SAMPLES[script]
    for tokenizer in saved_and_reloaded:
        # Execute
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        wrapped = tokenizer(text)["input_ids"]

        # Assert: one id per UTF-8 byte, exact text back, specials only where we put them
        assert ids == [b + 4 for b in text.encode("utf-8")]
        assert tokenizer.decode(ids) == text
        assert wrapped == [1, *ids, 2]
        assert tokenizer.decode(wrapped, skip_special_tokens=True) == text


def test_literal_special_spellings_are_bytes_after_reload(saved_and_reloaded):
    _, reloaded = saved_and_reloaded

    ids = reloaded("<eos>", add_special_tokens=False)["input_ids"]

    assert ids != [reloaded.eos_token_id]
    assert len(ids) == len("<eos>")


def test_batch_padding_uses_pad_id(saved_and_reloaded):
    tokenizer, _ = saved_and_reloaded

    batch = tokenizer(["a", "abc"], padding=True, add_special_tokens=False)

    assert batch["input_ids"][0] == [ord("a") + 4, 0, 0]
    assert batch["attention_mask"][0] == [1, 0, 0]


def test_bpe_merges_shorten_and_round_trip(tmp_path):
    corpus = [SAMPLES[s] for s in sorted(SAMPLES)] * 20

    tokenizer = build_byte_tokenizer(corpus, bpe_merges=40)
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)

    assert BYTE_VOCAB_SIZE + len(ROLE_TOKENS) < len(reloaded) <= BYTE_VOCAB_SIZE + 40 + len(ROLE_TOKENS)
    assert reloaded.pad_token_id == 0
    # The role tokens follow the merges, and the template survives the reload
    assert reloaded.convert_tokens_to_ids(list(ROLE_TOKENS)) == list(range(len(reloaded) - 4, len(reloaded)))
    assert has_chat_template(reloaded)
    for text in SAMPLES.values():
        ids = reloaded(text, add_special_tokens=False)["input_ids"]
        assert reloaded.decode(ids) == text
    text = SAMPLES["devanagari"]
    assert len(reloaded(text, add_special_tokens=False)["input_ids"]) < len(text.encode("utf-8"))


def test_bpe_without_corpus_is_a_config_error():
    with pytest.raises(ConfigError, match="bpe_merges"):
        build_byte_tokenizer(None, bpe_merges=10)


def test_load_tokenizer_from_config(tmp_path):
    build_byte_tokenizer().save_pretrained(tmp_path)

    built = load_tokenizer(TokenizerConfig())
    loaded = load_tokenizer(TokenizerConfig(kind="pretrained", path=str(tmp_path)))
    without_chat = load_tokenizer(TokenizerConfig(chat=False))

    assert len(built) == len(loaded) == 264 and has_chat_template(loaded)
    assert len(without_chat) == 260 and not has_chat_template(without_chat)
    assert loaded.decode(loaded(SAMPLES["telugu"], add_special_tokens=False)["input_ids"]) == SAMPLES["telugu"]


def test_missing_pretrained_tokenizer_names_the_path(tmp_path):
    missing = tmp_path / "nope"

    with pytest.raises(ModelNotFound, match="nope"):
        load_tokenizer(TokenizerConfig(kind="pretrained", path=str(missing)))


# -- role tokens ------------------------------------------------------------------------------------
def test_role_tokens_follow_the_bytes_whose_ids_do_not_move():
    chat, plain = build_byte_tokenizer(), build_byte_tokenizer(chat=False)

    assert len(chat) == BYTE_VOCAB_SIZE + len(ROLE_TOKENS) == 264
    assert chat.convert_tokens_to_ids(list(ROLE_TOKENS)) == [260, 261, 262, 263]
    assert chat.get_vocab().items() >= plain.get_vocab().items()  # every byte and special keeps its id
    for text in SAMPLES.values():
        assert chat(text)["input_ids"] == plain(text)["input_ids"]
    assert has_chat_template(chat) and not has_chat_template(plain)


def test_role_tokens_are_matched_in_any_text_special_spellings_stay_bytes():
    tokenizer = build_byte_tokenizer()

    ids = tokenizer("a<|user|>b<eos>", add_special_tokens=False)["input_ids"]

    # The documented price of non-special role tokens: a literal <|user|> is the role token
    assert ids == [ord("a") + 4, 261, ord("b") + 4, *(b + 4 for b in b"<eos>")]
    assert tokenizer.decode(ids) == "a<|user|>b<eos>"


def test_a_template_without_its_role_tokens_is_no_chat_template():
    tokenizer = build_byte_tokenizer(chat=False)
    tokenizer.chat_template = build_byte_tokenizer().chat_template  # the template, not the tokens

    assert not has_chat_template(tokenizer)
