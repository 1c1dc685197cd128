"""The non-federated references (centralized, local-only) on a real tiny hub, at a small token budget."""

from __future__ import annotations

import json
import math
from statistics import mean

import datasets
import pytest
import torch

from fedem_flwr.config.loader import load_run_config
from fedem_flwr.data.blocks import tokenize_blocks
from fedem_flwr.data.chat import conversation_text
from fedem_flwr.data.labels import inputs_of, labels_for
from fedem_flwr.data.tasks import AdapterTerms
from fedem_flwr.errors import ConfigError
from fedem_flwr.hub.paths import registry_path
from fedem_flwr.hub.registry import Registry
from fedem_flwr.relay.bootstrap import open_hub
from fedem_flwr.simulation.baselines import adapter_rows, chat_loss_blocks, run_baseline
from fedem_flwr.simulation.record import read_result, read_trace

pytestmark = pytest.mark.slow  # centralized and local-only runs that train real adapters

BUDGET = 16_000
CONTRIBUTORS = 6
OVERRIDES = (f"data.languages=[hi,ta,mr,de] train.max_steps=8 train.batch_size=4 train.progress=false "
             f"sim.max_tokens={BUDGET}")
STEP_TOKENS = 4 * 128  # batch_size x block_size: the most one step trains


def _run(tmp_path_factory, method, contributors=1):
    hub = tmp_path_factory.mktemp(method) / "hub"
    cfg = load_run_config({"overrides": OVERRIDES, "hub": str(hub)})
    return hub, cfg, run_baseline(method, cfg, hub, contributors, progress=False)


@pytest.fixture(scope="module")
def centralized(tmp_path_factory):
    return _run(tmp_path_factory, "centralized")


@pytest.fixture(scope="module")
def local_only(tmp_path_factory):
    return _run(tmp_path_factory, "local-only", CONTRIBUTORS)


def _fresh_losses(hub):
    """Base v0 with each language's fresh adapter, as the hub recorded it when seeding."""
    registry = Registry.open(registry_path(hub))
    return {a.name: registry.adapter_versions(a.name)[0].metrics["heldout"][a.name] for a in registry.adapters()}


@pytest.mark.parametrize("which", ["centralized", "local_only"])
def test_every_language_ends_below_base_v0(which, request):
    hub, _, result = request.getfixturevalue(which)
    fresh = _fresh_losses(hub)
    assert sorted(result["losses"]) == sorted(fresh) == ["de", "hi", "mr", "ta"]
    for language, loss in result["losses"].items():
        assert loss < fresh[language] - 0.1, (language, loss, fresh[language])


@pytest.mark.parametrize("which", ["centralized", "local_only"])
def test_budget_is_spent_within_a_step_per_adapter(which, request):
    _, _, result = request.getfixturevalue(which)
    assert abs(result["tokens"] - BUDGET) <= result["adapters_trained"] * STEP_TOKENS
    assert result["tokens"] > BUDGET - STEP_TOKENS * result["adapters_trained"]


def test_centralized_trains_one_adapter_per_language_on_all_its_rows(centralized):
    _, _, result = centralized
    assert result["adapters_trained"] == 4 and result["contributors"] == 1
    assert "per_contributor" not in result


def test_local_only_averages_over_the_contributors_holding_a_language(local_only):
    hub_path, cfg, result = local_only
    hub = open_hub(cfg, hub_path)
    holders = {}
    for pid in range(CONTRIBUTORS):
        for language in set(hub.training_rows(pid, CONTRIBUTORS)["language"]):
            holders.setdefault(language, []).append(f"p{pid}")
    per = result["per_contributor"]
    assert sorted(per) == sorted(f"p{pid}" for pid in range(CONTRIBUTORS))
    assert any(len(h) > 1 for h in holders.values())  # the mean is over several somewhere
    for language, loss in result["losses"].items():
        assert sorted(p for p in per if language in per[p]["losses"]) == sorted(holders[language])
        assert loss == pytest.approx(mean(per[p]["losses"][language] for p in holders[language]))
    for entry in per.values():  # each contributor alone on its share of the budget
        assert entry["tokens"] <= BUDGET / CONTRIBUTORS + len(entry["losses"]) * STEP_TOKENS


@pytest.mark.parametrize("which", ["centralized", "local_only"])
def test_result_and_trace_are_written(which, request):
    hub, _, result = request.getfixturevalue(which)
    assert read_result(hub) == result
    assert result["method"] == {"centralized": "centralized", "local_only": "local-only"}[which]
    assert result["sim_seconds"] is None and result["wall_seconds"] > 0
    rows = read_trace(hub)
    assert rows[0]["tokens"] == 0 and rows[-1]["tokens"] == result["tokens"]
    assert rows[-1]["losses"] == pytest.approx(result["losses"], abs=1e-6)
    assert len(rows) >= 4  # evaluations as the budget is spent, not only at start and end
    assert [r["tokens"] for r in rows] == sorted(r["tokens"] for r in rows)
    assert all(math.isnan(r["sim_s"]) for r in rows)


def test_a_baseline_needs_a_budget_and_a_known_method(tmp_path):
    cfg = load_run_config({"overrides": "data.languages=[hi,ta]", "hub": str(tmp_path / "hub")})
    with pytest.raises(ConfigError, match="sim.max_tokens"):
        run_baseline("centralized", cfg, tmp_path / "hub")
    with pytest.raises(ConfigError, match="'fedprox'"):
        run_baseline("fedprox", cfg, tmp_path / "hub")


CHAT_BUDGET = 8192
CHAT_OVERRIDES = (f"catalog=chat data.languages=[en] train.max_steps=8 train.batch_size=4 train.progress=false "
                  f"sim.max_tokens={CHAT_BUDGET}")
CONVERSATIONS = [
    [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi! How are you?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a cat?"},
     {"role": "assistant", "content": "A small animal."}, {"role": "user", "content": "Thanks"}],
]


@pytest.fixture(scope="module")
def centralized_chat(tmp_path_factory):
    """Centralized with the chat catalog: the `en` language adapter and `en-chat` (sft-chat on en)."""
    hub = tmp_path_factory.mktemp("chat") / "hub"
    cfg = load_run_config({"overrides": CHAT_OVERRIDES, "hub": str(hub)})
    return hub, cfg, run_baseline("centralized", cfg, hub, progress=False)


def test_centralized_trains_the_chat_adapter_and_judges_it_on_held_out_conversations(centralized_chat):
    hub, _, result = centralized_chat
    assert result["adapters_trained"] == 2
    assert sorted(result["adapter_tokens"]) == ["en", "en-chat"]  # the budget split equally over the adapters
    assert abs(result["adapter_tokens"]["en-chat"] - CHAT_BUDGET / 2) <= STEP_TOKENS
    assert sorted(result["losses"]) == ["en", "en:chat"]
    for key, loss in result["losses"].items():
        assert loss < result["initial_losses"][key] - 0.1, (key, loss, result["initial_losses"][key])
    assert read_trace(hub)[-1]["losses"] == pytest.approx(result["losses"], abs=1e-6)


def test_chat_loss_must_be_a_known_variant(tmp_path):
    with pytest.raises(ConfigError, match="sim.chat_loss.*'response', 'all', 'flat'"):
        load_run_config({"overrides": "sim.chat_loss=sft", "hub": str(tmp_path / "hub")})


def test_response_and_all_read_the_same_tokens_and_differ_in_targets(tokenizer):
    response = chat_loss_blocks(CONVERSATIONS, tokenizer, 16, "response")
    every = chat_loss_blocks(CONVERSATIONS, tokenizer, 16, "all")
    pad = tokenizer.pad_token_id
    assert torch.equal(inputs_of(response), every)  # the rendered chat: one and the same input
    assert (every >= 0).all() and (response < 0).any()  # all: every token a target; response: context too
    response_targets, every_targets = labels_for(response, pad) != -100, labels_for(every, pad) != -100
    assert (response_targets <= every_targets).all() and response_targets.sum() < every_targets.sum()


def test_flat_reads_the_conversations_as_plain_text(tokenizer):
    flat = chat_loss_blocks(CONVERSATIONS, tokenizer, 16, "flat")
    plain = tokenize_blocks([conversation_text(messages) for messages in CONVERSATIONS], tokenizer, 16)
    assert torch.equal(flat, plain)
    assert flat.numel() < chat_loss_blocks(CONVERSATIONS, tokenizer, 16, "all").numel()  # no template tokens


def test_a_chat_adapter_trains_on_its_languages_conversations_of_its_domain():
    chat = json.dumps(CONVERSATIONS[0])
    rows = datasets.Dataset.from_dict({
        "text": ["plain", "a chat", "a health chat", "ein Chat"], "language": ["en", "en", "en", "de"],
        "chat": ["", chat, chat, chat], "domain": ["", "greetings", "health", "health"],
    })
    texts = {name: adapter_rows(terms, rows)["text"] for name, terms in {
        "en": AdapterTerms("en", "causal-lm", ("en",)),
        "en-chat": AdapterTerms("en-chat", "sft-chat", ("en",)),
        "en-health-chat": AdapterTerms("en-health-chat", "sft-chat", ("en",), domain="health"),
        "fr-chat": AdapterTerms("fr-chat", "sft-chat", ("fr",)),
    }.items()}
    assert texts == {"en": ["plain", "a chat", "a health chat"], "en-chat": ["a chat", "a health chat"],
                     "en-health-chat": ["a health chat"], "fr-chat": []}
