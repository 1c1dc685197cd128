"""The adapter catalog: its validation, its keys, what a hub may change, and where task adapters go.

No model here: the coordinator judges with a scripted workbench (tests.support.relay), so these run
in milliseconds; the catalog on a real hub is tested in test_catalog_hub.
"""

from __future__ import annotations

import random

import pytest
import torch

from fedem_flwr.config.schema import CatalogConfig, CatalogEntry, GateConfig
from fedem_flwr.data.tasks import AdapterTerms, DataKey, adapter_terms, heldout_key, node_serving, parse_key
from fedem_flwr.errors import ConfigError
from fedem_flwr.hub.settings import catalog_differences
from fedem_flwr.relay.coordinator import RelayCoordinator
from fedem_flwr.relay.policies import NodeProfile, make_policy
from tests.support.relay import TTL, FakeClock, ScriptedWorkbench, seeded_coordinator

CHAT = CatalogEntry(name="hi-chat", task="sft-chat", languages=["hi"])


# -- validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fields, message", [
    (dict(name="x", task="seq2seq", languages=["hi"]),
     "catalog adapter 'x': unknown task 'seq2seq'. Task must be one of 'causal-lm', 'sft-chat'."),
    (dict(name="x", task="sft-chat", languages=[]), "catalog adapter 'x': `languages` is empty"),
    (dict(name="x", languages=["hi", "hi"]), "names a language twice"),
    (dict(name="", languages=["hi"]), "a name is 1-64 letters"),
    (dict(name="a/b", languages=["hi"]), "a name is 1-64 letters"),
    (dict(name="x", languages=["hi"], domain="a b"), "`domain` 'a b' is not a plain tag"),
    (dict(name="x", languages=["hi"], margin=float("nan")), "`margin` is nan"),
    (dict(name="x", languages=["hi"], tolerance=-1.0), "`tolerance` is -1.0"),
])
def test_a_bad_entry_is_refused_naming_what_is_wrong(fields, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        CatalogEntry(**fields)


def test_duplicate_names_are_refused():
    with pytest.raises(ConfigError, match="declares 'hi-chat' twice"):
        CatalogConfig(adapters=[CHAT, CatalogEntry(name="hi-chat", languages=["ta"])])


def test_the_catalog_composes_from_its_config_group():
    from fedem_flwr.config.loader import load_config

    assert load_config().catalog == CatalogConfig()  # the default: language adapters only
    chat = load_config(["catalog=chat"]).catalog
    assert chat.per_language and [(e.name, e.task, e.languages) for e in chat.adapters] == [
        ("en-chat", "sft-chat", ["en"])]
    with pytest.raises(ConfigError, match="unknown task 'x'"):
        load_config(["catalog=chat", "catalog.adapters.0.task=x"])


def test_task_adapters_are_not_merged_unless_the_catalog_says_so():
    assert not CHAT.mergeable
    assert CatalogEntry(name="x", task="sft-chat", languages=["hi"], merge=True).mergeable
    assert CatalogEntry(name="x", languages=["hi"]).mergeable
    assert not CatalogEntry(name="x", languages=["hi"], merge=False).mergeable


# -- keys ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key, parts", [
    ("hi", DataKey("hi")), ("hi:chat", DataKey("hi", "chat")), ("en@health", DataKey("en", "text", "health")),
    ("zh-Hant:chat@food", DataKey("zh-Hant", "chat", "food")),
])
def test_keys_round_trip(key, parts):
    assert parse_key(key) == parts and str(parts) == key == heldout_key(*parts)


def test_a_language_adapter_keeps_its_language_as_its_only_key():
    terms = adapter_terms("hi", ["hi"], "causal-lm", CatalogConfig(adapters=[CHAT]))
    assert (terms.heldout_keys, terms.serving, terms.mergeable) == (("hi",), ("hi",), True)
    old = adapter_terms("ta", ["ta"], "", None)  # a hub from before tasks
    assert (old.task, old.heldout_keys) == ("causal-lm", ("ta",))


def test_a_task_adapter_is_judged_on_its_task_data_and_served_by_its_format():
    terms = adapter_terms("hi-chat", ["hi"], "sft-chat", CatalogConfig(adapters=[CHAT]))
    assert (terms.heldout_keys, terms.serving, terms.mergeable) == (("hi:chat",), ("hi:chat",), False)
    health = AdapterTerms("en-health", "sft-chat", ("en", "hi"), domain="health")
    assert health.heldout_keys == ("en:chat@health", "hi:chat@health")
    assert health.serving == ("en:chat", "hi:chat")  # the domain is the node's to check: no-data otherwise
    assert node_serving(["hi", "en"], ["hi"]) == ("en", "hi", "hi:chat")


# -- what an existing hub may change ---------------------------------------------------------------


def _recorded(*entries: CatalogEntry, per_language: bool = True) -> dict:
    from dataclasses import asdict

    return asdict(CatalogConfig(per_language=per_language, adapters=list(entries)))


def test_a_catalog_may_grow_and_retune_but_not_change_what_an_entry_means():
    from dataclasses import replace

    recorded = _recorded(CHAT)
    assert catalog_differences(recorded, _recorded(CHAT, CatalogEntry(name="ta-chat", task="sft-chat",
                                                                      languages=["ta"]))) == []
    assert catalog_differences(recorded, _recorded(replace(CHAT, merge=True, margin=0.1, tolerance=0.2))) == []
    assert catalog_differences(_recorded(per_language=False), _recorded()) == []

    removed = catalog_differences(recorded, _recorded())
    assert [str(d) for d in removed] == ["`catalog.adapters`: recorded 'hi-chat', configured None (adapter 'hi-chat' "
                                         "was declared; entries may be added, not removed)"]
    changed = catalog_differences(recorded, _recorded(replace(CHAT, task="causal-lm", languages=["hi", "ta"])))
    assert [d.recorded for d in changed] == ["hi-chat.task='sft-chat'", "hi-chat.languages=['hi']"]
    assert "declare a new adapter under a new name" in str(changed[0])
    assert [d.key for d in catalog_differences(_recorded(), _recorded(per_language=False))] == ["per_language"]


def test_a_hub_refuses_to_start_with_a_changed_catalog_entry(tmp_path):
    from fedem_flwr.config.loader import load_config
    from fedem_flwr.hub.registry import Registry
    from fedem_flwr.hub.settings import check_and_record

    registry = Registry.open(tmp_path / "registry.sqlite")
    registry.add_checkpoint(None, "init", "t/base", "v0", "0" * 64, {}, 0.0)
    store = object()
    check_and_record(registry, load_config(["catalog=chat"]), store, tmp_path)
    # not seeded yet (say its data was missing): the entry is the operator's to fix
    check_and_record(registry, load_config(["catalog=chat", "catalog.adapters.0.languages=[de]"]), store, tmp_path)
    check_and_record(registry, load_config(["catalog=chat"]), store, tmp_path)
    registry.add_adapter("en-chat", ["en"], "sft-chat", {}, 0.0)
    check_and_record(registry, load_config(["catalog=chat", "catalog.adapters.0.tolerance=0.5"]), store, tmp_path)
    with pytest.raises(ConfigError, match=r"(?s)en-chat\.languages=\['en'\].*declare the recorded catalog entries as they were"):
        check_and_record(registry, load_config(["catalog=chat", "catalog.adapters.0.languages=[de]"]), store,
                         tmp_path)


# -- where task adapters go, and how they are judged -----------------------------------------------


class ChatWorkbench(ScriptedWorkbench):
    heldout = dict.fromkeys(["hi", "ta", "hi:chat"])

    def evaluate(self, state, languages=None):
        return {key: float(state["w"][0]) for key in languages or self.heldout}


@pytest.fixture
def chat_hub(tmp_path):
    """Adapters ``hi`` and ``ta`` (language) and ``hi-chat`` (sft-chat), all at v0 (loss 4.0)."""
    clock = FakeClock()
    _, registry, store = seeded_coordinator(tmp_path, clock, workbench=ChatWorkbench())
    v0 = registry.latest_adapter_version("hi")
    registry.add_adapter("hi-chat", ["hi"], "sft-chat", {}, clock())
    registry.add_adapter_version("hi-chat", 0, None, v0.repo, v0.revision, v0.digest, {"heldout": {"hi:chat": 4.0}},
                                 clock())

    def coordinator(policy: str, catalog=CatalogConfig(adapters=[CHAT]), gate=None) -> RelayCoordinator:
        c = RelayCoordinator(registry, store, make_policy(policy, random.Random(0)), ChatWorkbench(),
                             lease_ttl_s=TTL, sweep_interval_s=10, clock=clock, catalog=catalog, gate=gate)
        c.recover()
        return c

    return coordinator, registry, clock


@pytest.mark.parametrize("policy", ["random", "round-robin", "least-recent", "language", "fair"])
def test_a_task_adapter_is_leased_only_to_a_node_that_declared_its_data(chat_hub, policy):
    coordinator, _, _ = chat_hub
    relay = coordinator(policy)
    text_only = [NodeProfile(f"sim:{i}", node_serving(["hi"])) for i in range(4)]
    undeclared = [NodeProfile("sim:9")]  # declared nothing: any language adapter, never a task one

    leased = {a.adapter.name for a in relay.assign(text_only + undeclared)}
    assert "hi-chat" not in leased and leased <= {"hi", "ta"}

    (chat,) = relay.assign([NodeProfile("sim:5", node_serving(["hi"], ["hi"]))])
    assert (chat.adapter.name, chat.languages, chat.task, chat.domain) == ("hi-chat", ("hi",), "sft-chat", "")


def test_a_chat_push_is_judged_on_its_task_data_with_its_own_margin(chat_hub):
    coordinator, registry, _ = chat_hub
    strict = CatalogConfig(adapters=[CatalogEntry(name="hi-chat", task="sft-chat", languages=["hi"], margin=0.5)])
    relay = coordinator("language", catalog=strict, gate=GateConfig(margin=0.0))
    node = NodeProfile("sim:5", ("hi:chat",))

    (lease,) = [a.lease for a in relay.assign([node])]
    small = relay.receive_push(token=lease.token, state={"w": torch.tensor([3.8])})
    assert not small.accepted and "hi:chat" in small.reason  # 0.2 better: below its own margin of 0.5

    (lease,) = [a.lease for a in relay.assign([node])]
    big = relay.receive_push(token=lease.token, state={"w": torch.tensor([3.0])})
    assert big.accepted and registry.latest_adapter_version("hi-chat").metrics["heldout"] == {"hi:chat": 3.0}
