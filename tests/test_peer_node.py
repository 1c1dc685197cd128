"""Peer judging on the node and on the wire: a node keeps a private keyed share of its rows out of
training, judges a pushed adapter against its parent on them with the hub's own loss, and answers
through ``evaluate.peer``; the hub reads a peer's reply as a stranger's (``parse_peer_reply``)."""

from __future__ import annotations

import hashlib
import hmac
import math
import random
import shutil
import stat

import datasets
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedem_flwr import client_app as client_app_module
from fedem_flwr.client_app import app as client_app
from fedem_flwr.config.loader import load_config
from fedem_flwr.data.blocks import tokenize_blocks
from fedem_flwr.data.chat import chat_blocks, parse_messages
from fedem_flwr.errors import ConfigError, DataError
from fedem_flwr.gate.evaluator import HubWorkbench
from fedem_flwr.gate.loss import evaluate
from fedem_flwr.hub.manifest import digest
from fedem_flwr.hub.store import ArtifactRef
from fedem_flwr.model.factory import build_model, load_base, save_base
from fedem_flwr.model.lora import adapter_state, attach_lora
from fedem_flwr.model.tokenizer import build_byte_tokenizer
from fedem_flwr.node.cache import BaseCache
from fedem_flwr.node.contributor import NodeData, lease_rows
from fedem_flwr.node.peer_eval import peer_evaluate
from fedem_flwr.node.peer_holdout import held_out_side, peer_secret, split_rows, training_side
from fedem_flwr.protocol import faults, messages
from fedem_flwr.protocol.wire import adapter_to_arrays
from tests.support.fake_grid import InProcessGrid

OVERRIDES = "train.max_steps=2 train.batch_size=2 train.progress=false data.block_size=32 gate.peer_holdout=0.5"
SIM_NODE = {"partition-id": 0, "num-partitions": 2}


@pytest.fixture(scope="module")
def identity():
    InProcessGrid(ClientApp(), {}, {})  # sets the task identity messages need


@pytest.fixture(scope="module")
def cfg():
    return load_config(OVERRIDES.split())


def _rows(n: int, languages=("hi", "ta")) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"text": [f"row number {i} of the corpus" for i in range(n)],
                                       "language": [languages[i % len(languages)] for i in range(n)]})


def _texts(rows: datasets.Dataset) -> list[str]:
    return list(rows["text"])


# -- the split -------------------------------------------------------------------------------------


def test_a_row_is_held_out_when_its_keyed_ticket_is_below_the_share():
    rows = datasets.Dataset.from_dict({"text": ["a", "a", "b"], "language": ["hi", "hi", "ta"],
                                       "chat": ["", '[{"role": "user", "content": "a"}]', ""]})
    tickets = [int.from_bytes(hmac.new(b"s", f"{lang}\0{text}\0{chat}".encode(), hashlib.sha256).digest()[:8], "big")
               / 2**64 for lang, text, chat in zip(rows["language"], rows["text"], rows["chat"])]
    share = sorted(tickets)[1] + 1e-12  # the two lowest tickets held out

    train, held = split_rows(rows, b"s", share)

    assert [i for i, t in enumerate(tickets) if t < share] == [i for i in range(3) if rows[i] in held.to_list()]
    assert len(held) == 2 and len(train) == 1


def test_the_split_is_fixed_by_the_secret_and_differs_between_secrets():
    rows = _rows(1000)

    first, again, other = (_texts(split_rows(rows, secret, 0.2)[1]) for secret in (b"a" * 32, b"a" * 32, b"b" * 32))

    assert first == again
    assert first != other
    assert 150 <= len(first) <= 250  # about 0.2 of 1000 (four standard deviations either side)


def test_the_sides_are_disjoint_cover_the_rows_in_order_and_stay_put_as_rows_are_added():
    rows = _rows(1000)
    train, held = split_rows(rows, b"k" * 32, 0.3)
    _, held_early = split_rows(rows.select(range(500)), b"k" * 32, 0.3)

    train, held, held_early, rows = map(_texts, (train, held, held_early, rows))

    assert not set(train) & set(held)
    assert sorted(train + held) == sorted(rows)
    assert train == [text for text in rows if text in set(train)]  # the rows' own order
    assert held_early == [text for text in held if text in set(rows[:500])]


def test_a_share_of_zero_holds_nothing_out_and_hands_the_rows_back_as_they_are(config):
    rows = _rows(10)
    data = NodeData.of(rows)

    train, held = split_rows(rows, b"k" * 32, 0.0)

    assert train is rows and len(held) == 0
    assert config.gate.holdout_share == 0.0 and training_side(config, {}, data) is data  # no secret is even read
    with pytest.raises(DataError, match="holds no rows out"):
        held_out_side(config, SIM_NODE, data)


# -- the secret ------------------------------------------------------------------------------------


def test_the_node_configs_secret_is_used_as_given(cfg, tmp_path):
    assert peer_secret(cfg, {"peer-secret": "hunter2 ü", "cache-dir": str(tmp_path)}) == "hunter2 ü".encode()
    assert not (tmp_path / "peer-secret").exists()
    with pytest.raises(ConfigError, match=r"`peer-secret` is 123 \(int\); it must be a string"):
        peer_secret(cfg, {"peer-secret": 123})


def test_a_real_nodes_secret_is_drawn_once_readable_by_its_owner_only(cfg, tmp_path):
    node = {"cache-dir": str(tmp_path / "cache")}

    first = peer_secret(cfg, node)
    kept = tmp_path / "cache" / "peer-secret"
    inode = kept.stat().st_ino

    assert len(first) == 32 and kept.read_bytes() == first
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert peer_secret(cfg, node) == first and kept.stat().st_ino == inode  # read back, never redrawn
    assert peer_secret(cfg, {"cache-dir": str(tmp_path / "other")}) != first


def test_a_simulated_nodes_secret_follows_the_seed_and_partition(cfg, tmp_path):
    node = {**SIM_NODE, "cache-dir": str(tmp_path)}
    reseeded = load_config([*OVERRIDES.split(), "seed=1"])

    assert peer_secret(cfg, node) == peer_secret(cfg, dict(node))
    assert peer_secret(cfg, node) != peer_secret(cfg, {**node, "partition-id": 1})
    assert peer_secret(cfg, node) != peer_secret(reseeded, node)
    assert not any(tmp_path.iterdir())  # nothing written


# -- the wire --------------------------------------------------------------------------------------

INSTRUCTION = messages.PeerInstruction(evaluation=41, base_digest="a" * 64, base_version=3, languages=("hi", "ta"),
                                       max_blocks=8)
ADAPTER = {"w": torch.zeros(2)}


def _peer_message(instruction=INSTRUCTION, rows=None, ttl=60.0) -> Message:
    message = messages.peer_message(100, instruction, adapter_to_arrays(ADAPTER), adapter_to_arrays(ADAPTER),
                                    ttl=ttl, rows=rows)
    message.metadata.__dict__["_message_id"] = "m"
    return message


def test_a_peer_message_round_trips_and_omits_task_and_domain_at_their_defaults(identity):
    task = messages.PeerInstruction(7, "b" * 64, 0, ("en",), 64, task="sft-chat", domain="health")
    rows = {"text": ["a", "b"], "language": ["en", "en"]}

    plain, chat = _peer_message(), _peer_message(task, rows=rows)

    assert messages.parse_peer_instruction(plain) == INSTRUCTION
    assert messages.parse_peer_instruction(chat) == task
    assert plain.metadata.message_type == messages.PEER == "evaluate.peer"
    assert dict(plain.content["config"]) == {"evaluation": 41, "base-digest": "a" * 64, "base-version": 3,
                                             "languages": "hi,ta", "max-blocks": 8}
    assert messages.node_rows(chat) == rows and messages.node_rows(plain) is None


@pytest.mark.parametrize(("key", "value"), [
    ("evaluation", -1), ("evaluation", "41"), ("evaluation", True), ("evaluation", None),
    ("base-digest", "abc"), ("base-digest", "../" + "a" * 61), ("base-version", -1), ("base-version", 1.5),
    ("languages", ""), ("languages", "english"), ("languages", "hi,,ta"), ("languages", 5),
    ("languages", ",".join(["hi"] * 65)), ("max-blocks", 0), ("max-blocks", "8"), ("task", "rlhf"),
    ("domain", "../etc"),
])
def test_a_hostile_peer_instruction_is_refused_naming_the_field(identity, key, value):
    message = _peer_message()
    config = message.content["config"]
    if value is None:
        del config[key]
    else:
        config[key] = value
    with pytest.raises(messages.InvalidInstruction, match=f"peer message `{key}` is"):
        messages.parse_peer_instruction(message)


def test_a_peer_message_without_an_adapter_is_refused(identity):
    message = _peer_message()
    del message.content["parent"]
    with pytest.raises(messages.InvalidInstruction, match="has no `parent` ArrayRecord"):
        messages.parse_peer_instruction(message)


def _reply(results=None, **metrics) -> Message:
    """An ``ok`` reply to ``INSTRUCTION`` judging ``hi``, with ``metrics`` set (None: removed)."""
    reply = messages.peer_reply(_peer_message(), INSTRUCTION, results or {"hi": (100, 2.0, 2.5)})
    record = dict(reply.content["metrics"])
    for key, value in metrics.items():
        key = key.replace("_", ".")
        if value is None:
            del record[key]
        else:
            record[key] = value
    reply.content["metrics"] = MetricRecord(record)
    return reply


def test_a_peer_reply_reads_back_exactly(identity):
    both = _reply({"hi": (100, 2.0, 2.5), "ta": (7, 0.0, 1.25)})

    parsed = messages.parse_peer_reply(both, INSTRUCTION, max_tokens=100)

    assert parsed == messages.PeerReply(41, messages.OK, "", {"hi": 100, "ta": 7}, {"hi": 2.0, "ta": 0.0},
                                        {"hi": 2.5, "ta": 1.25})


@pytest.mark.parametrize(("metrics", "reason"), [
    ({"candidate_hi": math.nan}, r"`candidate.hi` is nan; it must be a finite loss >= 0"),
    ({"parent_hi": math.inf}, r"`parent.hi` is inf; it must be a finite loss >= 0"),
    ({"candidate_hi": -0.5}, r"`candidate.hi` is -0.5; it must be a finite loss >= 0"),
    ({"tokens_hi": 0}, r"`tokens.hi` is 0; it must be a whole number of tokens in \[1, 1000\]"),
    ({"tokens_hi": 10**9}, r"`tokens.hi` is 1000000000; it must be a whole number"),
    ({"tokens_hi": 1.5}, r"`tokens.hi` is 1.5; it must be a whole number"),
    ({"tokens_de": 5}, r"metric `tokens.de` names language 'de', not asked \(asked: hi,ta\)"),
    ({"tokens_english": 5}, r"metric 'tokens.english' is not `<tokens\|candidate\|parent>.<language code>`"),
    ({"score_hi": 5}, r"metric 'score.hi' is not `<tokens"),
    ({"parent_hi": None}, r"reports language 'hi' without `parent.hi`"),
    ({"tokens_hi": None, "candidate_hi": None, "parent_hi": None}, r"with status 'ok' reports no language"),
    ({"tokens_ta": 1, "candidate_ta": 1.0, "parent_ta": 1.0, "tokens_de": 1},
     r"holds 7 metrics; at most 6 \(three per language asked\)"),
], ids=["nan", "inf", "negative", "no-tokens", "huge-tokens", "fractional-tokens", "unasked", "not-a-code",
        "unknown-number", "missing-number", "ok-with-nothing", "too-many"])
def test_a_hostile_peer_reply_is_refused_naming_the_field_and_value(identity, metrics, reason):
    with pytest.raises(messages.InvalidReply, match=reason):
        messages.parse_peer_reply(_reply(**metrics), INSTRUCTION, max_tokens=1000)


def test_a_reply_for_another_evaluation_is_a_claim_mismatch(identity):
    other = _reply()
    other.content["config"]["evaluation"] = 40

    with pytest.raises(messages.ClaimMismatch, match="evaluation 40 claimed, sent 41"):
        messages.parse_peer_reply(other, INSTRUCTION, max_tokens=1000)


def test_a_status_reply_carries_no_numbers_and_an_unknown_status_is_refused(identity):
    sent = _peer_message()
    missing = messages.peer_status_reply(sent, INSTRUCTION, messages.MISSING_BASE, "x" * 1000)
    bad = messages.peer_status_reply(sent, INSTRUCTION, messages.NO_DATA)
    bad.content["config"]["status"] = "great"

    parsed = messages.parse_peer_reply(missing, INSTRUCTION, max_tokens=1000)

    assert (parsed.status, parsed.detail, parsed.tokens, parsed.candidate) == (messages.MISSING_BASE, "x" * 200, {}, {})
    with pytest.raises(messages.InvalidReply, match=r"`status` is 'great'; allowed: ok, no-data, missing-base"):
        messages.parse_peer_reply(bad, INSTRUCTION, max_tokens=1000)
    with pytest.raises(ValueError, match="`status` is 'ok'"):
        messages.peer_status_reply(sent, INSTRUCTION, messages.OK)


# -- the evaluation on a tiny base -----------------------------------------------------------------


def _save_base(cfg, folder, chat: bool):
    tokenizer = build_byte_tokenizer(chat=chat)
    return save_base(build_model(cfg.model, tokenizer), tokenizer, folder)


@pytest.fixture(scope="module")
def plain_base(cfg, tmp_path_factory):
    return _save_base(cfg, tmp_path_factory.mktemp("plain-base"), chat=False)


@pytest.fixture(scope="module")
def chat_base(cfg, tmp_path_factory):
    return _save_base(cfg, tmp_path_factory.mktemp("chat-base"), chat=True)


@pytest.fixture(scope="module")
def adapters(cfg, plain_base):
    """A fresh adapter (the parent) and one with every ``lora_B`` moved (the candidate: another loss)."""
    model, _ = load_base(str(plain_base))
    parent = adapter_state(attach_lora(model, cfg.lora, seed=0))
    generator = torch.Generator().manual_seed(1)
    candidate = {k: v + 0.05 * torch.randn(v.shape, generator=generator) if "lora_B" in k else v.clone()
                 for k, v in parent.items()}
    return candidate, parent


HELD = datasets.Dataset.from_dict({
    "text": ["नमस्ते दुनिया, यह एक लंबा वाक्य है", "दूसरी पंक्ति यहाँ है", "tamil row here and more", "x" * 10],
    "language": ["hi", "hi", "ta", "de"],
    "domain": ["", "", "", "health"],
})


def _targets(blocks: torch.Tensor, pad: int) -> int:
    """Hand-counted scored tokens: every non-pad target after a block's first, context (negative) excluded."""
    after = blocks[:, 1:]
    return int(((after != pad) & (after >= 0)).sum())


def test_a_peer_scores_the_first_blocks_with_the_hubs_loss(cfg, plain_base, adapters):
    candidate, parent = adapters
    model, tokenizer = load_base(str(plain_base))
    hi_blocks = tokenize_blocks(HELD["text"][:2], tokenizer, cfg.data.block_size)
    assert len(hi_blocks) > 2  # so that max_blocks cuts

    judged = peer_evaluate(cfg, plain_base, candidate, parent, HELD, ("hi", "ta", "mr"), max_blocks=2, score=evaluate)
    ta_blocks = tokenize_blocks(HELD["text"][2:3], tokenizer, cfg.data.block_size)
    hub = HubWorkbench(model, cfg.lora, {"hi": hi_blocks, "ta": ta_blocks}, pad_id=tokenizer.pad_token_id,
                       batch_size=cfg.train.eval_batch_size, max_blocks=2)

    assert sorted(judged) == ["hi", "ta"]  # no held-out rows in mr: left out
    assert judged["hi"][0] == _targets(hi_blocks[:2], tokenizer.pad_token_id)
    assert {lang: judged[lang][1] for lang in judged} == hub.evaluate(candidate)  # the same blocks, the same loss
    assert {lang: judged[lang][2] for lang in judged} == hub.evaluate(parent)
    assert judged["hi"][1] != judged["hi"][2]


def test_an_adapter_judged_against_itself_scores_the_same(cfg, plain_base, adapters):
    _, parent = adapters

    judged = peer_evaluate(cfg, plain_base, parent, parent, HELD, ("hi",), max_blocks=64, score=evaluate)

    assert judged["hi"][1] == judged["hi"][2] and judged["hi"][0] > 0


def test_a_peer_without_held_out_rows_that_fit_raises_data_error(cfg, plain_base, adapters):
    with pytest.raises(DataError, match="no held-out rows in mr,te for task 'causal-lm'"):
        peer_evaluate(cfg, plain_base, *adapters, HELD, ("mr", "te"), max_blocks=4, score=evaluate)
    with pytest.raises(DataError, match="no held-out rows of domain 'law'"):
        peer_evaluate(cfg, plain_base, *adapters, HELD, ("hi", "de"), domain="law", max_blocks=4, score=evaluate)
    domain = peer_evaluate(cfg, plain_base, *adapters, HELD, ("hi", "de"), domain="health", max_blocks=4,
                           score=evaluate)
    assert sorted(domain) == ["de"]


def test_a_chat_task_scores_only_the_assistants_tokens(cfg, chat_base):
    talk = '[{"role": "user", "content": "How are you?"}, {"role": "assistant", "content": "Well, thanks."}]'
    rows = datasets.Dataset.from_dict({"text": ["How are you?\nWell, thanks.", "plain"], "language": ["en", "en"],
                                       "chat": [talk, ""]})
    model, tokenizer = load_base(str(chat_base))
    state = adapter_state(attach_lora(model, cfg.lora, seed=0))
    blocks = chat_blocks([parse_messages(talk, where="test")], tokenizer, cfg.data.block_size)

    judged = peer_evaluate(cfg, chat_base, state, state, rows, ("en",), task="sft-chat", max_blocks=64,
                           score=evaluate)

    assert judged["en"][0] == _targets(blocks, tokenizer.pad_token_id)
    assert 0 < judged["en"][0] < int((blocks[:, 1:] != tokenizer.pad_token_id).sum())  # the user's turn is not scored


# -- the node's training side ----------------------------------------------------------------------

ROWS = {"text": [f"यह पंक्ति संख्या {i} है" for i in range(24)], "language": ["hi"] * 24}


def _node(tmp_path, base=None, **extra) -> dict:
    """A simulated node's config, its cache holding ``base`` when given."""
    node = {**SIM_NODE, "cache-dir": str(tmp_path / "cache"), **extra}
    if base is not None:
        BaseCache.for_node(node).add(digest(base), lambda folder: shutil.copytree(base, folder, dirs_exist_ok=True))
    return node


def test_a_train_with_a_holdout_share_never_sees_the_held_out_rows(identity, cfg, plain_base, tmp_path, monkeypatch):
    node = _node(tmp_path)
    seen = []

    def recorded(data, *args, **kwargs):
        seen.append(_texts(data.rows))
        return lease_rows(data, *args, **kwargs)

    monkeypatch.setattr(client_app_module, "lease_rows", recorded)
    instruction = messages.TrainInstruction("hi", 0, ("hi",), 7, ArtifactRef("t/base", "v0", digest(plain_base)), 0,
                                            600.0, 2)
    model, _ = load_base(str(plain_base))
    message = messages.train_message(100, instruction, adapter_to_arrays(adapter_state(attach_lora(model, cfg.lora))),
                                     ttl=600, base_folder=plain_base, rows=ROWS)
    message.metadata.__dict__["_message_id"] = "t"

    reply = client_app(message, Context(7, 100, node, RecordDict(), {"overrides": OVERRIDES}))

    held = _texts(split_rows(datasets.Dataset.from_dict(ROWS), peer_secret(cfg, node), 0.5)[1])
    assert messages.parse_train_reply(reply, instruction).status == messages.OK
    assert 0 < len(held) < 24
    assert seen == [[text for text in ROWS["text"] if text not in held]]


def test_a_language_held_out_entirely_has_nothing_to_train_on(cfg):
    data = NodeData.from_rows({"text": ["only row"], "language": ["ta"]})
    node = {"peer-secret": "t"}
    held = len(split_rows(data.rows, b"t", 0.5)[1])

    assert held == 1  # this row's ticket with this secret is below 0.5
    with pytest.raises(DataError, match="no rows in ta"):
        lease_rows(training_side(cfg, node, data), ("ta",))


# -- the handler -----------------------------------------------------------------------------------


def _judge(base, node: dict, *, languages=("hi",), digest_of=None, overrides=OVERRIDES, ttl=600.0, send_base=False):
    """One ``evaluate.peer`` message through the real ClientApp of a simulated node handed ``ROWS`` (and the
    base's files with it, ``send_base``)."""
    cfg = load_config(overrides.split())
    model, _ = load_base(str(base))
    parent = adapter_state(attach_lora(model, cfg.lora, seed=0))
    candidate = {k: v + 0.05 if "lora_B" in k else v for k, v in parent.items()}
    instruction = messages.PeerInstruction(5, digest_of or digest(base), 0, languages, 4)
    message = messages.peer_message(100, instruction, adapter_to_arrays(candidate), adapter_to_arrays(parent),
                                    ttl=ttl, rows=ROWS, base_folder=base if send_base else None)
    message.metadata.__dict__["_message_id"] = "p"
    reply = client_app(message, Context(7, 100, node, RecordDict(), {"overrides": overrides}))
    return reply, message, instruction


def test_the_client_app_judges_on_the_nodes_held_out_rows(identity, cfg, plain_base, tmp_path):
    node = _node(tmp_path, plain_base)

    reply, _, instruction = _judge(plain_base, node)
    parsed = messages.parse_peer_reply(reply, instruction, max_tokens=10**6)

    held = held_out_side(cfg, node, NodeData.from_rows(ROWS))
    model, tokenizer = load_base(str(plain_base))
    blocks = tokenize_blocks(_texts(held), tokenizer, cfg.data.block_size)[:4]
    assert (parsed.status, sorted(parsed.tokens)) == (messages.OK, ["hi"])
    assert parsed.tokens["hi"] == _targets(blocks, tokenizer.pad_token_id)
    assert parsed.candidate["hi"] != parsed.parent["hi"]
    assert all(math.isfinite(v) and v > 0 for v in (parsed.candidate["hi"], parsed.parent["hi"]))


def test_a_node_without_the_base_keeps_the_one_sent_with_the_question(identity, plain_base, tmp_path):
    node = _node(tmp_path)  # an empty cache

    reply, _, instruction = _judge(plain_base, node, send_base=True)

    assert messages.parse_peer_reply(reply, instruction, max_tokens=10**6).status == messages.OK
    assert BaseCache.for_node(node).has(digest(plain_base))  # kept for its next lease


def test_the_client_app_answers_missing_base_and_no_data(identity, plain_base, tmp_path):
    node = _node(tmp_path, plain_base)

    missing, _, sent_missing = _judge(plain_base, node, digest_of="c" * 64)
    unheld, _, sent_unheld = _judge(plain_base, node, languages=("ta",))
    nothing_out, _, sent_nothing = _judge(plain_base, node, overrides=OVERRIDES.replace("gate.peer_holdout=0.5", ""))

    missing, unheld, nothing_out = (messages.parse_peer_reply(reply, sent, max_tokens=10**6) for reply, sent in
                                    ((missing, sent_missing), (unheld, sent_unheld), (nothing_out, sent_nothing)))
    assert missing.status == messages.MISSING_BASE  # not cached, not sent, nowhere to fetch it from
    assert missing.detail.startswith("base cccccccccccc not cached in") and missing.detail.endswith("and not sent")
    assert (unheld.status, unheld.detail) == (messages.NO_DATA, "this node holds no held-out rows in ta for task "
                                                                "'causal-lm'")
    assert (nothing_out.status, nothing_out.detail) == (
        messages.NO_DATA, "this node holds no rows out to judge peers on (`gate.peer_holdout` leaves a share of 0)")
    assert not (tmp_path / "cache" / "bases" / ("c" * 64)).exists()  # a judge never fetches


def test_a_peer_fault_set_in_the_node_config_changes_the_clients_reply(identity, plain_base, tmp_path):
    reply, _, instruction = _judge(plain_base, _node(tmp_path, plain_base, **{"peer-fault": "worse"}))

    parsed = messages.parse_peer_reply(reply, instruction, max_tokens=10**6)

    assert parsed.candidate["hi"] == pytest.approx(parsed.parent["hi"] + 1.0)


@pytest.mark.parametrize("evaluation", [5, 7])
@pytest.mark.parametrize(("fault", "expected"), [
    ("worse", lambda parent, coin: parent + 1.0),
    ("better", lambda parent, coin: max(0.0, parent - 1.0)),
    ("random", lambda parent, coin: max(0.0, parent + (1.0 if coin < 0.5 else -1.0))),
])
def test_a_misjudging_peer_moves_every_candidate_loss_off_its_parents(identity, fault, expected, evaluation):
    instruction = messages.PeerInstruction(evaluation, "a" * 64, 0, ("hi", "ta"), 4)
    reply = messages.peer_reply(_peer_message(), instruction, {"hi": (10, 2.0, 2.5), "ta": (3, 1.0, 0.5)})

    faults.peer_misbehave(reply, _peer_message(), {"peer-fault": fault})
    parsed = messages.parse_peer_reply(reply, instruction, max_tokens=10)

    coin = random.Random(evaluation).random()
    assert parsed.candidate == {"hi": expected(2.5, coin), "ta": expected(0.5, coin)}
    assert parsed.parent == {"hi": 2.5, "ta": 0.5} and parsed.tokens == {"hi": 10, "ta": 3}


def test_random_misjudgement_goes_both_ways_across_evaluations():
    assert {random.Random(evaluation).random() < 0.5 for evaluation in (5, 7)} == {True, False}


@pytest.mark.parametrize(("fault", "refused"), [
    ("nan", (messages.InvalidReply, r"`candidate.hi` is nan")),
    ("huge-tokens", (messages.InvalidReply, r"`tokens.hi` is 1000000000")),
    ("other-evaluation", (messages.ClaimMismatch, "evaluation 42 claimed, sent 41")),
])
def test_a_hostile_peer_fault_is_refused_by_the_hub(identity, fault, refused):
    reply = faults.peer_misbehave(_reply(), _peer_message(), {"peer-fault": fault})

    with pytest.raises(refused[0], match=refused[1]):
        messages.parse_peer_reply(reply, INSTRUCTION, max_tokens=10**6)


@pytest.mark.parametrize("fault", ["late", "silent"])
def test_a_late_or_silent_peer_waits_past_the_ttl(identity, fault):
    message = _peer_message(ttl=30.0)
    slept = []
    now = message.metadata.created_at + 10.0
    reply = _reply()

    def misbehave():
        return faults.peer_misbehave(reply, message, {"peer-fault": fault}, sleep=slept.append, now=lambda: now)

    if fault == "late":
        assert misbehave() is reply
    else:
        with pytest.raises(RuntimeError, match="peer-fault=silent"):
            misbehave()
    assert slept == [pytest.approx(22.0)]  # until 2 s past the 30 s TTL


def test_an_unset_peer_fault_leaves_the_reply_and_an_unknown_one_is_refused(identity):
    reply = _reply()
    before = dict(reply.content["metrics"])

    assert faults.peer_misbehave(reply, _peer_message(), {}) is reply and dict(reply.content["metrics"]) == before
    with pytest.raises(ValueError, match="`peer-fault` is 'sulk'; known: worse, better"):
        faults.peer_misbehave(reply, _peer_message(), {"peer-fault": "sulk"})


def test_a_status_reply_has_no_numbers_to_misjudge(identity):
    reply = messages.peer_status_reply(_peer_message(), INSTRUCTION, messages.NO_DATA, "none")

    assert "metrics" not in faults.peer_misbehave(reply, _peer_message(), {"peer-fault": "worse"}).content
    assert isinstance(reply.content["config"], ConfigRecord)
