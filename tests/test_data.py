"""Corpora, partitions, token blocks and the held-out split (no model needed)."""

from __future__ import annotations

import json

import datasets
import pytest
import torch

from fedem_flwr.config.schema import DataConfig
from fedem_flwr.data.blocks import heldout_split, tokenize_blocks, without
from fedem_flwr.data.corpus import column, corpus_digest, language_sizes, load_corpus
from fedem_flwr.data.labels import IGNORE_INDEX, labels_for
from fedem_flwr.data.partition import partition, partitions
from fedem_flwr.errors import ConfigError, DataError

datasets.disable_progress_bars()

TEN = ["en", "fa", "hi", "te", "bn", "ta", "zh", "ja", "fr", "th"]
KEY = bytes(range(32))  # a hub derives its key from its secret; any 16+ bytes do here


@pytest.fixture(scope="module")
def demo():
    return load_corpus(DataConfig())


@pytest.fixture(scope="module")
def ten():
    return load_corpus(DataConfig(languages=TEN))


@pytest.fixture(scope="module")
def small():
    """Six of the smaller languages (about 64 KB): enough for held-out blocks, quick to tokenize."""
    return load_corpus(DataConfig(languages=["hi", "bn", "ta", "te", "zh", "fr"]))


# -- corpus ---------------------------------------------------------------------------------------
def test_demo_corpus_has_28_languages_with_codes(demo):
    sizes = language_sizes(demo)

    assert len(sizes) == 28
    assert {"en", "hi", "te", "bn", "ta", "fa", "zh", "zh-Hant", "hi-Latn"} <= set(sizes)
    assert list(sizes)[:2] == ["fa", "en"] and sizes["fa"] > 200_000
    assert list(sizes)[-1] == "th" and sizes["th"] < 1_000
    assert demo.column_names == ["text", "language", "chat", "domain"]


def test_languages_filter_accepts_codes_and_names(demo):
    ds = load_corpus(DataConfig(languages=["Hindi", "te"]))

    assert sorted(ds.unique("language")) == ["hi", "te"]
    assert len(ds) == sum(1 for lang in column(demo, "language") if lang in ("hi", "te"))


def test_languages_filter_naming_an_absent_language_is_an_error():
    with pytest.raises(DataError, match=r"\['xx'\].*absent"):
        load_corpus(DataConfig(languages=["hi", "xx"]))


def test_local_files_in_every_format(tmp_path):
    # Prepare
    rows = [{"text": "hello there", "language": "en"}, {"text": "नमस्ते दुनिया", "language": "hi"}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    datasets.Dataset.from_list([{"body": "హలో", "lang": "Telugu", "id": 3}]).to_parquet(tmp_path / "b.parquet")
    (tmp_path / "c.csv").write_text("body,lang\nবাংলা লেখা,bn\n", encoding="utf-8")
    (tmp_path / "notes.ta.txt").write_text("முதல் பத்தி\nஇரண்டாம் வரி\n\nஇரண்டாம் பத்தி\n", encoding="utf-8")

    # Execute
    tables = load_corpus(DataConfig(source="files", paths=[str(tmp_path / "a.jsonl")]))
    renamed = load_corpus(DataConfig(
        source="files", paths=[str(tmp_path / "b.parquet"), str(tmp_path / "c.csv")],
        text_column="body", language_column="lang",
    ))
    text = load_corpus(DataConfig(source="files", paths=[str(tmp_path / "notes.ta.txt")]))

    # Assert: plain rows, no chat and no domain
    assert tables.to_list() == [plain(**row) for row in rows]
    assert renamed.to_list() == [plain("హలో", "te"), plain("বাংলা লেখা", "bn")]
    assert text.to_list() == [
        plain("முதல் பத்தி\nஇரண்டாம் வரி", "ta"),  # one row per paragraph
        plain("இரண்டாம் பத்தி", "ta"),
    ]


def plain(text: str, language: str) -> dict[str, str]:
    """A corpus row of plain text (no conversation, no domain)."""
    return {"text": text, "language": language, "chat": "", "domain": ""}


def test_a_folder_means_every_data_file_inside(tmp_path):
    (tmp_path / "hi.txt").write_text("एक\n\nदो\n", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.jsonl").write_text('{"text": "hi", "language": "en"}\n', encoding="utf-8")

    ds = load_corpus(DataConfig(source="files", paths=[str(tmp_path)]))

    assert language_sizes(ds) == {"hi": 12, "en": 2}  # two Devanagari letters a paragraph


def test_missing_file_is_a_data_error_naming_it(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match="nope.jsonl.*does not exist"):
        load_corpus(DataConfig(source="files", paths=[str(missing)]))


def test_file_without_the_columns_names_column_and_columns_found(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"content": "hello", "language": "en"}\n', encoding="utf-8")

    with pytest.raises(DataError) as err:
        load_corpus(DataConfig(source="files", paths=[str(path)]))

    assert "bad.jsonl" in str(err.value) and "'text'" in str(err.value) and "data.text_column" in str(err.value)
    assert "['content', 'language']" in str(err.value)


def test_text_file_without_a_language_in_its_name_is_an_error(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("some text\n", encoding="utf-8")

    with pytest.raises(DataError, match=r"corpus.txt.*<name>.<lang>.txt"):
        load_corpus(DataConfig(source="files", paths=[str(path)]))


def test_bad_language_value_is_an_error(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("text,language\nhello,not a language\n", encoding="utf-8")

    with pytest.raises(DataError, match="'not a language'"):
        load_corpus(DataConfig(source="files", paths=[str(path)]))


def test_hub_source_reads_a_dataset_repo(hf_env):
    from huggingface_hub import HfApi

    rows = [{"text": "hello", "language": "en"}, {"text": "నమస్తే", "language": "te"}]
    api = HfApi(endpoint=hf_env.endpoint)
    api.create_repo("org/corpus", repo_type="dataset")
    api.upload_file(
        path_or_fileobj="\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode(),
        path_in_repo="train.jsonl", repo_id="org/corpus", repo_type="dataset",
    )

    ds = load_corpus(DataConfig(source="hub", hub_id="org/corpus", languages=["te"]))

    assert ds.to_list() == [plain(**rows[1])]
    with pytest.raises(DataError, match="org/missing"):
        load_corpus(DataConfig(source="hub", hub_id="org/missing"))


# -- partitions -----------------------------------------------------------------------------------
def languages_of(ds) -> list[str]:
    return sorted(set(column(ds, "language")))


@pytest.mark.parametrize("nodes", [3, 7])
def test_language_partitions_spread_ten_languages_whole(ten, nodes):
    # Execute
    parts = partitions(ten, "language", nodes, seed=0)
    languages = [languages_of(p) for p in parts]
    rows = sum(len(p) for p in parts)

    # Assert: every node has a language, each language lives whole on exactly one node
    assert all(languages)
    flat = [lang for node in languages for lang in node]
    assert sorted(flat) == sorted(TEN)
    assert rows == len(ten)


def test_language_partitions_over_more_nodes_than_languages_split_large_languages(ten):
    parts = partitions(ten, "language", 14, seed=0)
    languages = [languages_of(p) for p in parts]

    assert all(len(node) == 1 for node in languages)  # one language a node
    assert {node[0] for node in languages} == set(TEN)  # each language somewhere
    assert sum(node == ["en"] for node in languages) > 1  # the largest split over several nodes
    texts = [t for p in parts for t in column(p, "text")]
    assert sorted(texts) == sorted(column(ten, "text"))  # nothing lost, nothing twice


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_iid_and_dirichlet_partitions_cover_the_corpus_once(ten, scheme):
    parts = partitions(ten, scheme, 4, seed=1)

    assert all(len(p) > 0 for p in parts)
    texts = [t for p in parts for t in column(p, "text")]
    assert sorted(texts) == sorted(column(ten, "text"))


def test_iid_partitions_mix_languages(ten):
    assert all(len(languages_of(p)) >= 8 for p in partitions(ten, "iid", 3, seed=0))


def test_partitions_are_deterministic_given_seed(ten):
    assert column(partition(ten, "dirichlet", 3, 1, seed=5), "text") == column(
        partition(ten, "dirichlet", 3, 1, seed=5), "text"
    )
    # One node's partition is the same rows as that node's entry of every partition at once
    assert column(partition(ten, "language", 7, 0, seed=0), "text") == column(partitions(ten, "language", 7, seed=0)[0], "text")


@pytest.mark.parametrize(
    ("scheme", "nodes", "pid", "match"),
    [
        ("language", 3, 3, r"partition_id is 3.*\[0, 3\)"),
        ("language", 3, -1, "partition_id is -1"),
        ("iid", 10_000, 0, "10000 partitions of a corpus of"),
        ("zipf", 3, 0, "`data.partitioner` is 'zipf'"),
    ],
)
def test_partition_errors(ten, scheme, nodes, pid, match):
    with pytest.raises(DataError, match=match):
        partition(ten, scheme, nodes, pid, seed=0)


# -- blocks ---------------------------------------------------------------------------------------
def test_blocks_join_documents_with_eos_and_pad_the_tail(tokenizer):
    blocks = tokenize_blocks(["ab", "", "cde"], tokenizer, block_size=4)

    a, b, c, d, e = (tokenizer.convert_tokens_to_ids(ch) for ch in "abcde")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert blocks.dtype == torch.int64
    assert blocks.tolist() == [[a, b, eos, c], [d, e, eos, pad]]


def test_blocks_from_a_dataset_column_match_blocks_from_a_list(small, tokenizer):
    hindi = small.filter(lambda row: row["language"] == "hi")

    assert torch.equal(tokenize_blocks(hindi["text"], tokenizer, 64), tokenize_blocks(list(column(hindi, "text")), tokenizer, 64))


def test_labels_mask_padding_only(tokenizer):
    blocks = tokenize_blocks(["hello", "नमस्ते"], tokenizer, block_size=8)
    pad = tokenizer.pad_token_id

    labels = labels_for(blocks, pad)

    assert (labels == IGNORE_INDEX).sum() == (blocks == pad).sum() > 0
    assert torch.equal(labels[blocks != pad], blocks[blocks != pad])
    assert (labels[blocks == pad] == IGNORE_INDEX).all()


def documents(blocks: torch.Tensor, tokenizer) -> list[str]:
    """The documents held in ``blocks`` (each ends with eos; padding follows the last)."""
    text = tokenizer.decode(blocks.flatten().tolist())
    return text.split(tokenizer.eos_token)[:-1]


def by_language(ds) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for text, lang in zip(column(ds, "text"), column(ds, "language")):
        out.setdefault(lang, []).append(text)
    return out


def test_heldout_split_is_deterministic_and_disjoint(small, tokenizer):
    # Execute
    split1 = heldout_split(small, 0.1, 2, 64, tokenizer, KEY)
    split2 = heldout_split(small.shuffle(seed=3), 0.1, 2, 64, tokenizer, KEY)
    other = heldout_split(small, 0.1, 2, 64, tokenizer, bytes(32))

    # Assert: same key, any row order -> same blocks; another key -> other blocks
    held1, held2, train1 = split1.heldout, split2.heldout, split1.train
    assert held1.keys() == held2.keys() and {"hi", "bn", "ta", "zh", "fr"} <= held1.keys()
    assert all(torch.equal(held1[lang], held2[lang]) for lang in held1)
    assert sorted(column(train1, "text")) == sorted(column(split2.train, "text"))
    assert split1.withheld == split2.withheld
    assert not torch.equal(held1["zh"][:2], other.heldout["zh"][:2])
    assert all(b.dtype == torch.int64 and b.shape[1] == 64 and b.shape[0] >= 2 for b in held1.values())
    # Held-out rows never train; together with the training rows they are the corpus
    trained, every = by_language(train1), by_language(small)
    for lang in held1:
        held_docs = documents(held1[lang], tokenizer)
        assert set(held_docs).isdisjoint(trained[lang])
        assert sorted(held_docs + trained[lang]) == sorted(every[lang])
        assert set(held_docs) == {text for language, text in split1.withheld if language == lang}


def test_small_language_is_training_only(small, tokenizer):
    split = heldout_split(small, 0.1, 2, 128, tokenizer, KEY)

    assert "te" not in split.heldout  # 576 bytes: its held-out rows give too few blocks
    assert {"hi", "bn"} <= split.heldout.keys()
    train_langs = column(split.train, "language")
    assert train_langs.count("te") == column(small, "language").count("te")  # every row trains
    assert not any(lang == "te" for lang, _ in split.withheld)


def test_hub_named_language_is_withheld_even_when_small_here(small, tokenizer):
    te = small.filter(lambda row: row["language"] == "te")

    alone = heldout_split(te, 0.1, 2, 128, tokenizer, KEY)
    named = heldout_split(te, 0.1, 2, 128, tokenizer, KEY, heldout_languages=["te"])

    assert alone.heldout == {} and len(alone.train) == len(te) and not alone.withheld  # every row trains
    assert named.heldout == {} and 0 < len(named.train) < len(te)  # held out by name: its rows stay out
    assert len(named.withheld) == len(te) - len(named.train)


def test_the_split_needs_the_key_a_public_hash_does_not_rebuild_it(small, tokenizer):
    """A node holds the corpus, the fraction and the seed: before, that was enough to compute the
    held-out rows (a public hash of each row); now the selection depends on the hub's key."""
    import hashlib

    split = heldout_split(small, 0.1, 2, 64, tokenizer, KEY)
    rows = list(zip(column(small, "language"), column(small, "text")))

    def public_ticket(lang: str, text: str) -> float:  # what any node could compute, seed 0
        digest = hashlib.sha256(f"0\x00{lang}\x00{text}".encode("utf-8")).digest()
        return int.from_bytes(digest[:8], "big") / 2.0**64

    guessed = {row for row in rows if public_ticket(*row) < 0.1}
    guessed_with_other_key = heldout_split(small, 0.1, 2, 64, tokenizer, b"n" * 32).withheld

    # Assert: a guess finds about a tenth of the held-out rows (chance), never the set
    assert len(split.withheld) > 50
    for guess in (guessed, guessed_with_other_key):
        assert len(guess & split.withheld) < 0.3 * len(split.withheld)
    with pytest.raises(ConfigError, match="held-out split key"):
        heldout_split(small, 0.1, 2, 64, tokenizer, 0)  # a seed is no key
    with pytest.raises(ConfigError, match="at least 16"):
        heldout_split(small, 0.1, 2, 64, tokenizer, b"short")


def test_without_drops_exactly_the_withheld_rows(small, tokenizer):
    split = heldout_split(small, 0.1, 2, 64, tokenizer, KEY)
    node = partition(small, "iid", 3, 2, seed=0)

    kept = without(node, split.withheld)

    pairs = set(zip(column(kept, "language"), column(kept, "text")))
    assert pairs.isdisjoint(split.withheld)
    dropped = [p for p in zip(column(node, "language"), column(node, "text")) if p in split.withheld]
    assert 0 < len(dropped) and len(kept) == len(node) - len(dropped)
    assert without(node, frozenset()) is node


def test_corpus_digest_changes_with_the_text_not_the_order(small):
    digest = corpus_digest(small)
    assert corpus_digest(small.shuffle(seed=1)) == digest
    changed = small.map(lambda row, i: {"text": row["text"] + ("!" if i == 0 else "")}, with_indices=True)
    assert corpus_digest(changed) != digest


def test_heldout_needs_two_blocks_at_least(small, tokenizer):
    with pytest.raises(ConfigError, match="data.min_heldout_blocks"):
        heldout_split(small, 0.1, 1, 128, tokenizer, KEY)


# -- the test split --------------------------------------------------------------------------------

def _digest(blocks_by_language: dict) -> str:
    import hashlib

    digest = hashlib.sha256()
    for lang in sorted(blocks_by_language):
        digest.update(lang.encode())
        digest.update(blocks_by_language[lang].numpy().tobytes())
    return digest.hexdigest()


def test_without_a_test_fraction_the_heldout_set_is_the_one_drawn_before_test_splits(small, tokenizer):
    # Execute
    split = heldout_split(small, 0.1, 2, 64, tokenizer, KEY)
    explicit = heldout_split(small, 0.1, 2, 64, tokenizer, KEY, test_fraction=0.0)

    # Assert: bit for bit the held-out blocks of this corpus, key and tokenizer drawn before test
    # splits existed (the digest was taken with that code), and no test set
    assert _digest(split.heldout) == "0591f216160cc6fa1706880d25129dcb17f383eafa83245a86bcf6aef0b985ab"
    assert _digest(explicit.heldout) == _digest(split.heldout) and explicit.withheld == split.withheld
    assert split.test == {} and explicit.test == {}


def test_the_test_split_is_disjoint_from_heldout_and_training_rows_and_withheld(small, tokenizer):
    # Execute
    split = heldout_split(small, 0.1, 2, 64, tokenizer, KEY, test_fraction=0.1)
    plain = heldout_split(small, 0.1, 2, 64, tokenizer, KEY)

    # Assert: test, held-out and training rows of a language are disjoint and together its corpus
    trained, every = by_language(split.train), by_language(small)
    assert {"hi", "bn", "ta", "zh", "fr"} <= split.test.keys() and split.test.keys() <= split.heldout.keys()
    for lang in split.test:
        test_docs, held_docs = documents(split.test[lang], tokenizer), documents(split.heldout[lang], tokenizer)
        assert set(test_docs).isdisjoint(held_docs) and set(test_docs).isdisjoint(trained[lang])
        assert set(held_docs).isdisjoint(trained[lang])
        assert sorted(test_docs + held_docs + trained[lang]) == sorted(every[lang])
        withheld = {text for language, text in split.withheld if language == lang}
        assert withheld == set(test_docs) | set(held_docs)  # no node, CPT or baseline trains on test rows
        # About a tenth of the text each (the last row drawn may pass the share)
        size = sum(len(t.encode()) for t in every[lang])
        assert 0.1 * size <= sum(len(t.encode()) for t in test_docs) < 0.1 * size + max(map(len, map(str.encode, every[lang])))
    assert all(b.dtype == torch.int64 and b.shape[1] == 64 and b.shape[0] >= 2 for b in split.test.values())
    # One lottery, test first: at equal fractions the test rows are exactly the rows held out without
    # a test split, and the held-out rows are the next tickets.
    assert split.test.keys() == plain.heldout.keys()
    assert all(torch.equal(split.test[lang], plain.heldout[lang]) for lang in split.test)


def test_the_test_split_is_keyed_and_the_same_for_any_row_order(small, tokenizer):
    split = heldout_split(small, 0.1, 2, 64, tokenizer, KEY, test_fraction=0.1)
    shuffled = heldout_split(small.shuffle(seed=5), 0.1, 2, 64, tokenizer, KEY, test_fraction=0.1)
    other = heldout_split(small, 0.1, 2, 64, tokenizer, bytes(32), test_fraction=0.1)

    assert _digest(split.test) == _digest(shuffled.test) and split.withheld == shuffled.withheld
    assert _digest(split.test) != _digest(other.test)
    assert not torch.equal(split.test["zh"][:2], other.test["zh"][:2])


def test_a_language_with_too_little_test_text_trains_on_it(small, tokenizer):
    te = small.filter(lambda row: row["language"] == "te")  # 576 bytes

    split = heldout_split(te, 0.1, 2, 128, tokenizer, KEY, test_fraction=0.1)
    named = heldout_split(te, 0.1, 2, 128, tokenizer, KEY, heldout_languages=["te"], test_fraction=0.1)

    assert split.test == {} and split.heldout == {} and len(split.train) == len(te) and not split.withheld
    assert named.test == {} and len(named.train) < len(te)  # a language the hub names stays out whatever its size


def test_a_test_fraction_must_leave_text_to_train_on(small, tokenizer):
    with pytest.raises(ConfigError, match="`data.test_fraction` is 0.95"):
        heldout_split(small, 0.1, 2, 64, tokenizer, KEY, test_fraction=0.95)
    with pytest.raises(ConfigError, match="`data.test_fraction` is -0.1"):
        heldout_split(small, 0.1, 2, 64, tokenizer, KEY, test_fraction=-0.1)
