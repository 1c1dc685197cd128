"""A hub with a chat adapter, end to end over the in-process Grid: seeded from the catalog, leased only
to nodes holding conversations, judged on response tokens, published as a PEFT adapter that the
README's transformers + PEFT lines load and generate with. And the catalog refused where it cannot work.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
import pytest

from fedem_flwr.client_app import app as client_app
from fedem_flwr.config.loader import load_config, load_run_config
from fedem_flwr.errors import ConfigError
from fedem_flwr.relay.bootstrap import catalog_problems, open_hub
from fedem_flwr.relay.strategy import RelayStrategy
from tests.support.fake_grid import InProcessGrid

README = Path(__file__).resolve().parent.parent / "README.md"
OVERRIDES = (
    "catalog=chat data.languages=[en,hi] train.max_steps=8 train.batch_size=4 train.progress=false "
    "relay.lease_ttl_s=600 relay.poll_interval_s=0.001 relay.no_node_grace_s=0 relay.max_wall_s=300 "
    "relay.policy=language merge.every_accepted=null merge.every_s=null"
)


@pytest.fixture(scope="module")
def relayed(tmp_path_factory):
    """Three nodes: partitions of en and hi by language; the relay runs until 5 pushes are accepted."""
    root = tmp_path_factory.mktemp("catalog")
    run_config = {"overrides": f"{OVERRIDES} relay.max_accepted=5", "hub": str(root / "hub")}
    cfg = load_run_config(run_config)
    hub = open_hub(cfg, root / "hub")
    nodes = 3
    node_configs = {100 + i: {"partition-id": i, "num-partitions": nodes, "cache-dir": str(root / f"cache-{i}")}
                    for i in range(nodes)}
    grid = InProcessGrid(client_app, node_configs, run_config)
    strategy = RelayStrategy(hub.coordinator, cfg.relay, hub.workbench.spec, max_steps=cfg.train.max_steps,
                             training_rows=hub.training_rows)
    return hub, strategy, strategy.start(grid)


def test_the_catalog_seeds_the_chat_adapter_beside_the_language_adapters(relayed):
    hub, _, _ = relayed
    adapters = {a.name: (a.task, a.languages) for a in hub.registry.adapters()}
    assert adapters == {"en": ("causal-lm", ["en"]), "hi": ("causal-lm", ["hi"]), "en-chat": ("sft-chat", ["en"])}
    assert {"en", "hi", "en:chat"} <= set(hub.workbench.heldout)
    v0 = hub.registry.adapter_version("en-chat", 0)
    assert set(v0.metrics["heldout"]) == set(hub.workbench.heldout)  # a fresh LoRA scores the base everywhere


def test_the_chat_adapter_goes_only_to_nodes_that_hold_conversations_and_is_judged_on_them(relayed):
    hub, strategy, result = relayed
    assert result.accepted >= 5, result  # pushes in flight at the stop land too
    chat_leases = [lease for lease in hub.registry.leases() if lease.adapter == "en-chat"]
    assert chat_leases, "the chat adapter was never leased"
    nodes = [strategy.nodes.get(node_id) for node_id in strategy.nodes.ids()]
    declared = {node.identity for node in nodes if "en:chat" in node.profile.languages}
    assert declared and {lease.holder for lease in chat_leases} <= declared
    judged = [c for c in hub.registry.contributions() if c.adapter == "en-chat" and c.evaluation.get("heldout")]
    assert judged and all("en:chat" in c.evaluation["heldout"] for c in judged)
    accepted = [c for c in judged if c.decision == "accepted"]
    assert accepted, [c.reason for c in judged]
    latest, fresh = hub.registry.latest_adapter_version("en-chat"), hub.registry.adapter_version("en-chat", 0)
    assert latest.metrics["heldout"]["en:chat"] < fresh.metrics["heldout"]["en:chat"]


def test_the_readme_lines_load_base_and_chat_adapter_and_generate(relayed):
    hub, _, _ = relayed
    (snippet,) = re.findall(r"### A chat adapter.*?```python\n(.*?)```", README.read_text(), flags=re.S)
    assert 'Path(".fedem/hub/store")' in snippet
    code = snippet.replace('Path(".fedem/hub/store")', f"Path({str(hub.path / 'store')!r})")
    code = code.replace("max_new_tokens=40", "max_new_tokens=5")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own lines, on this hub
    assert scope["reply"].shape[1] > scope["inputs"]["input_ids"].shape[1]  # it generated past the prompt
    rendered = scope["tokenizer"].apply_chat_template(scope["messages"], add_generation_prompt=True, tokenize=False)
    assert rendered == "<|user|>Hello, how are you?<|end|><|assistant|>"


def test_the_chat_adapter_card_names_its_task_and_template(relayed):
    hub, _, _ = relayed
    latest = hub.registry.latest_adapter_version("en-chat")
    card = (hub.store.get(latest.ref) / "README.md").read_text()
    assert "sft-chat" in card and "<|assistant|>" in card
    config = json.loads((hub.store.get(latest.ref) / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == ("fedem/base", f"v{latest.base_version}")


# -- refused catalogs ------------------------------------------------------------------------------


def _corpus(rows: list[tuple[str, str, str]]) -> datasets.Dataset:
    texts, languages, chats = zip(*rows)
    return datasets.Dataset.from_dict({"text": list(texts), "language": list(languages), "chat": list(chats),
                                       "domain": [""] * len(rows)})


def test_a_catalog_the_corpus_cannot_serve_is_refused_naming_each_problem():
    from fedem_flwr.model.tokenizer import build_byte_tokenizer

    chat = json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    corpus = _corpus([("hi\nhello", "en", chat), ("namaste", "hi", "")])
    cfg = load_config([
        "catalog.adapters=[{name: en-chat, task: sft-chat, languages: [en]}, {name: hi-chat, task: sft-chat, "
        "languages: [hi]}, {name: te-x, languages: [te]}, {name: en, task: sft-chat, languages: [en]}]"])
    problems = catalog_problems(cfg, corpus, build_byte_tokenizer(), {"en", "hi"})
    text = "\n".join(problems)
    assert "adapter 'en-chat' (sft-chat): no held-out data 'en:chat'" in text
    assert "adapter 'hi-chat' (sft-chat): the corpus has no conversations in 'hi'" in text
    assert "adapter 'te-x' (causal-lm): the corpus has no text in 'te'" in text
    assert "adapter 'en' (sft-chat): its name is the language adapter of 'en'" in text

    plain = catalog_problems(cfg, corpus, build_byte_tokenizer(chat=False), {"en", "hi", "en:chat"})
    assert any("has no chat template" in p for p in plain)


def test_open_hub_refuses_a_chat_adapter_without_conversations(tmp_path):
    cfg = load_config(["data=files", f"data.paths=[{_text_files(tmp_path)}]",
                       "catalog.adapters=[{name: hi-chat, task: sft-chat, languages: [hi]}]"])
    with pytest.raises(ConfigError, match="no conversations in 'hi'"):
        open_hub(cfg, tmp_path / "hub")


def _text_files(tmp_path: Path) -> Path:
    (tmp_path / "wiki.hi.txt").write_text("\n\n".join(f"पाठ {i} " * 40 for i in range(60)), encoding="utf-8")
    (tmp_path / "wiki.ta.txt").write_text("\n\n".join(f"உரை {i} " * 40 for i in range(60)), encoding="utf-8")
    return tmp_path


def test_a_merge_leaves_the_chat_adapter_out_and_judges_what_it_does_to_it(relayed):
    from fedem_flwr.relay.keeper import BaseKeeper

    hub, _, _ = relayed
    chat = hub.registry.latest_adapter_version("en-chat")
    assert chat.kind == "push"  # trained work, beating the bare base on en:chat: mergeable but for the catalog
    base = hub.registry.latest_checkpoint()

    new = BaseKeeper(hub).merge("test")

    assert new is not None and new.parent == base.version  # en and hi beat the bare base: published
    assert "en-chat" not in [row.adapter for row in hub.registry.absorbed(new.version)]
    report = new.metrics["merge"]["adapters"]["en-chat"]  # carried onto the new base, and judged there
    assert report["absorbed"] is False and set(report["adapted_before"]) == {"en:chat"}
    assert "en:chat" in new.metrics["heldout"]  # the merged base is judged on the conversations too
