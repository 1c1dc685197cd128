"""Task adapters on the read side: a hub with a language adapter, a domain adapter and an ``sft-chat``
adapter (catalog recorded in the registry) publishes a chat adapter card naming its task, languages and
chat template; the ledger site lists adapters under a heading per task; the report and the site draw
a chat adapter on its ``en:chat`` loss; and a hub recorded before catalogs existed still reads."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from test_cli import T0, adapter_files, as_json, make_hub, put, table

from fedem_flwr.cli.report import adapter_curves, plot_hub, summary
from fedem_flwr.config.schema import CatalogConfig, CatalogEntry
from fedem_flwr.hub.lineage import base_chat_template, version_card, write_adapter_card
from fedem_flwr.hub.model_card import adapter_card
from fedem_flwr.hub.registry import Registry
from fedem_flwr.hub.stores import open_store
from fedem_flwr.hub.terms import adapter_terms_of, catalog_from, own_loss
from fedem_flwr.site.build import build_site
from fedem_flwr.site.data import site_data

TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
CATALOG = CatalogConfig(adapters=[CatalogEntry("en-chat", "sft-chat", ["en"]),
                                  CatalogEntry("en-health", "causal-lm", ["en"], domain="health")])
# name -> (languages, task, held-out losses of v0, v1, ...): every version scored on every held-out set
ADAPTERS = {
    "hi": (["hi"], "causal-lm", [{"hi": 5.0, "en": 5.2, "en:chat": 5.5}, {"hi": 4.5, "en": 5.3, "en:chat": 5.6}]),
    "en-chat": (["en"], "sft-chat", [{"hi": 5.0, "en": 5.2, "en:chat": 5.5}, {"hi": 5.1, "en": 5.0, "en:chat": 4.0},
                                     {"hi": 5.1, "en": 5.4, "en:chat": 3.5}]),
    "en-health": (["en"], "causal-lm", [{"en": 5.2, "en@health": 4.9}, {"en": 5.1, "en@health": 4.6}]),
}


def task_hub(tmp_path: Path, catalog: bool = True) -> Path:
    """Base v0 saved with its tokenizer's chat template, the three ``ADAPTERS`` and (``catalog``) the
    catalog setting the hub records."""
    path = tmp_path / "hub"
    store = open_store(path)
    with Registry.open(path) as registry:
        ref = put(store, tmp_path, "fedem/base", "v0", {"config.json": "{}", "chat_template.jinja": TEMPLATE})
        registry.add_checkpoint(None, "init", ref.repo, ref.revision, ref.digest,
                                {"heldout": {"hi": 5.0, "en": 5.2, "en:chat": 5.5}}, T0)
        for name, (languages, task, losses) in ADAPTERS.items():
            registry.add_adapter(name, languages, task, {"r": 8}, T0)
            for n, heldout in enumerate(losses):
                ref = put(store, tmp_path, f"fedem/adapter-{name}", f"v{n}", adapter_files(n))
                registry.add_adapter_version(name, 0, n - 1 if n else None, ref.repo, ref.revision, ref.digest,
                                             {"heldout": heldout}, T0 + 60 * n)
        if catalog:
            registry.put_setting("catalog", asdict(CATALOG), T0)
    return path


@pytest.fixture
def hub(tmp_path) -> Path:
    return task_hub(tmp_path)


def between(text: str, start: str, end: str) -> str:
    return text[text.index(start):text.index(end, text.index(start))]


# -- terms read back from the registry ---------------------------------------------------------------


def test_terms_come_from_the_recorded_catalog(hub):
    with Registry.open(hub, readonly=True) as registry:
        terms = adapter_terms_of(registry)
    assert {name: (t.task, t.languages, t.domain, t.heldout_keys) for name, t in terms.items()} == {
        "hi": ("causal-lm", ("hi",), "", ("hi",)), "en-chat": ("sft-chat", ("en",), "", ("en:chat",)),
        "en-health": ("causal-lm", ("en",), "health", ("en@health",))}
    assert own_loss(ADAPTERS["en-chat"][2][-1], terms["en-chat"]) == 3.5


def test_a_catalog_this_version_cannot_read_leaves_those_adapters_to_their_rows():
    recorded = {"per_language": True, "adapters": [
        {"name": "en-chat", "task": "sft-chat", "languages": ["en"], "added_later": 1},
        {"name": "xx", "task": "a-future-task", "languages": ["en"]}, "not an entry"]}
    catalog = catalog_from(recorded)
    assert [e.name for e in catalog.adapters] == ["en-chat"] and catalog_from(None) is None


# -- model cards ------------------------------------------------------------------------------------


def test_the_chat_adapter_card_names_its_task_languages_and_template(hub, tmp_path):
    # Prepare: en-chat v3 about to be stored, as the relay coordinator writes it (no task, no template given)
    folder = tmp_path / "en-chat-v3"
    folder.mkdir()
    with Registry.open(hub) as registry:
        store = open_store(hub)

        # Execute
        card = write_adapter_card(folder, registry, store, repo="fedem/adapter-en-chat", adapter="en-chat", version=3,
                                  base_version=0, parent_version=2, kind="push", heldout={"en:chat": 3.2, "en": 5.4},
                                  contributor="c-0a1b2c3d4e5f")
        v2 = registry.latest_adapter_version("en-chat")
        rebuilt = version_card(registry, v2, "fedem/adapter-en-chat", "fedem/base", "v0",
                               chat_template=base_chat_template(store, "fedem/base", "v0"))

    # Assert: metadata the Hub reads, the task, the assistant-only loss and the template in a fenced block
    text = (folder / "README.md").read_text()
    data = ModelCard(text).data
    assert (data.library_name, data.pipeline_tag, data.base_model, data.language) == (
        "peft", "text-generation", "fedem/base", ["en"])
    assert "sft-chat" in data.tags and data.fedem["task"] == "sft-chat"
    assert "task `sft-chat`: supervised fine-tuning on conversations" in text
    assert "the loss was on the assistant's turns only" in text and "- languages: en" in text
    assert f"## Chat template\n\n```jinja\n{TEMPLATE}\n```" in text
    assert "tokenizer.apply_chat_template(messages, add_generation_prompt=True)" in text
    assert "| held-out set | held-out loss |" in text and "| en:chat | 3.2000 |" in text
    assert card.content == text
    # the card `fedem publish` rebuilds for a recorded version carries the same terms
    assert "sft-chat" in ModelCard(rebuilt.content).data.tags and f"```jinja\n{TEMPLATE}\n```" in rebuilt.content


def test_chat_pushes_read_their_bases_chat_template_from_the_store_once(hub, tmp_path, monkeypatch):
    # Prepare: every folder the store is asked for is counted
    store = open_store(hub)
    asked: list[tuple[str, str]] = []
    local_path = store.local_path
    monkeypatch.setattr(store, "local_path", lambda repo, rev: asked.append((repo, rev)) or local_path(repo, rev))

    # Execute: three accepted pushes of the chat adapter on base v0, as the relay coordinator writes their cards
    with Registry.open(hub) as registry:
        for version in (3, 4, 5):
            folder = tmp_path / f"en-chat-v{version}"
            folder.mkdir()
            write_adapter_card(folder, registry, store, repo="fedem/adapter-en-chat", adapter="en-chat",
                               version=version, base_version=0, parent_version=2, kind="push",
                               heldout={"en:chat": 3.2}, contributor="c-0a1b2c3d4e5f")

    # Assert: each card shows the template; the base was read once
    assert all(f"```jinja\n{TEMPLATE}\n```" in (tmp_path / f"en-chat-v{n}/README.md").read_text() for n in (3, 4, 5))
    assert asked == [("fedem/base", "v0")]


def test_a_fresh_chat_adapter_card_takes_the_task_it_is_given(hub, tmp_path):
    # Prepare: a base version whose tokenizer has no chat template saved with it
    store = open_store(hub)
    with Registry.open(hub) as registry:
        ref = put(store, tmp_path, "fedem/base", "v1", {"config.json": "{}"})
        registry.add_checkpoint(0, "cpt", ref.repo, ref.revision, ref.digest, {}, T0 + 600)
        folder = tmp_path / "de-chat-v0"
        folder.mkdir()

        # Execute: as the hub's start seeds a catalog adapter not registered yet
        write_adapter_card(folder, registry, store, repo="fedem/adapter-de-chat", adapter="de-chat", version=0,
                           base_version=1, parent_version=None, kind="fresh", heldout={"de:chat": 5.0},
                           languages=["de"], task="sft-chat")

    # Assert: the card says where the template is instead of showing it
    text = (folder / "README.md").read_text()
    data = ModelCard(text).data
    assert data.language == ["de"] and "sft-chat" in data.tags and data.fedem["task"] == "sft-chat"
    assert "chat template: the base tokenizer's, saved with `fedem/base` revision `v1`" in text
    assert "## Chat template" not in text


def test_a_template_with_backticks_cannot_close_its_fence_and_text_adapters_show_none():
    template = "{{ '```' }}{{ messages }}"
    chat = adapter_card("o/a", "en-chat", 0, "o/base", "v0", ["en"], [], task="sft-chat", chat_template=template)
    text = adapter_card("o/a", "hi", 0, "o/base", "v0", ["hi"], [], chat_template=template)
    assert f"````jinja\n{template}\n````" in chat.content
    assert "Chat template" not in text.content and "causal-lm" in text.data.tags
    health = adapter_card("o/a", "en-health", 0, "o/base", "v0", ["en"], [], task="causal-lm", domain="health")
    assert "flat text tagged `health`" in health.content and health.data.fedem["domain"] == "health"


# -- the ledger site -------------------------------------------------------------------------------


def test_the_site_lists_adapters_under_a_heading_per_task(hub, tmp_path):
    # Execute
    with Registry.open(hub, readonly=True) as registry:
        site = site_data(registry, T0 + 600)
        build_site(registry, tmp_path / "site", T0 + 600)
    index = (tmp_path / "site" / "index.html").read_text()
    progress = (tmp_path / "site" / "progress.html").read_text()

    # Assert: language adapters first, each adapter under its own task's heading, with its task and domain
    assert [(g["task"], [a["name"] for a in g["adapters"]]) for g in site["overview"]["groups"]] == [
        ("causal-lm", ["en-health", "hi"]), ("sft-chat", ["en-chat"])]
    language, chat = "Language adapters</h3>", "Chat adapters (supervised, loss on the assistant&#39;s turns)</h3>"
    for page, row in ((index, "<td>{}</td><td>v"), (progress, '<h4 id="adapter-{}">')):
        assert page.index(language) < page.index(chat)
        languages, chats = between(page, language, chat), page[page.index(chat):]
        assert row.format("hi") in languages and row.format("en-health") in languages
        assert row.format("en-chat") in chats and row.format("en-chat") not in languages
    assert "<td>sft-chat</td>" in between(index, chat, "</table>")
    assert "<td>causal-lm (domain health)</td>" in index
    # each adapter is drawn on its own held-out sets: the chat adapter on en:chat, not English text
    chat_progress = site["progress"]["adapters"]["en-chat"]
    assert list(chat_progress["series"]) == ["en:chat"]
    assert [loss for _, loss in chat_progress["series"]["en:chat"]] == [5.5, 4.0, 3.5]
    assert list(site["progress"]["adapters"]["en-health"]["series"]) == ["en@health"]


# -- the report and the CLI ------------------------------------------------------------------------


def test_the_report_draws_the_chat_adapter_on_its_chat_loss(hub, tmp_path):
    with Registry.open(hub, readonly=True) as registry:
        curves = adapter_curves(registry)
        gains = summary(registry)["adapters"]
        figure = plot_hub(registry, tmp_path / "relay.png")
    assert curves["en-chat"] == [(0, 5.5), (1, 4.0), (2, 3.5)]  # English text would read 5.2, 5.0, 5.4
    assert curves["hi"] == [(0, 5.0), (1, 4.5)] and curves["en-health"] == [(0, 4.9), (1, 4.6)]
    assert gains["en-chat"] == {"task": "sft-chat", "heldout_keys": ["en:chat"], "versions": 2, "loss_v0": 5.5,
                                "loss_latest": 3.5}
    assert figure.stat().st_size > 10_000


def test_status_and_adapters_show_each_adapters_task(hub):
    status = {a["name"]: a["task"] for a in as_json(hub, "status")["adapters"]}
    adapters = {a["name"]: (a["task"], a["domain"]) for a in as_json(hub, "adapters")}
    assert status == {"en-chat": "sft-chat", "en-health": "causal-lm", "hi": "causal-lm"}
    assert adapters == {"en-chat": ("sft-chat", ""), "en-health": ("causal-lm", "health"), "hi": ("causal-lm", "")}
    assert [row[:4] for row in table(hub, "Adapters", "status")] == [
        ["adapter", "version", "languages", "task"], ["en-chat", "2", "en", "sft-chat"],
        ["en-health", "1", "en", "causal-lm"], ["hi", "1", "hi", "causal-lm"]]
    assert ["en-health", "1", "0", "en", "causal-lm@health"] in [row[:5] for row in table(hub, "Adapters", "adapters")]


# -- hubs recorded before catalogs ----------------------------------------------------------------


def test_a_hub_without_a_recorded_catalog_still_reads(tmp_path):
    # Prepare: make_hub's hub (language adapters, no `catalog` setting), and ours without its setting
    old = make_hub(tmp_path / "old")
    rows_only = task_hub(tmp_path / "rows", catalog=False)

    # Execute
    with Registry.open(old, readonly=True) as registry:
        build_site(registry, tmp_path / "site", T0 + 600)
        gains = summary(registry)["adapters"]
        v1 = registry.latest_adapter_version("hi")
        card = version_card(registry, v1, "fedem/adapter-hi", "fedem/base", "v0")
    with Registry.open(rows_only, readonly=True) as registry:
        terms = adapter_terms_of(registry)
        curves = adapter_curves(registry)

    # Assert: language adapters throughout; the registry's own task column still says what each adapter is
    index = (tmp_path / "site" / "index.html").read_text()
    assert "Language adapters</h3>" in index and "Chat adapters" not in index and gains == {}
    assert [a["task"] for a in as_json(old, "status")["adapters"]] == ["causal-lm", "causal-lm"]
    assert "causal-lm" in card.data.tags and card.data.fedem["task"] == "causal-lm"
    assert (terms["en-chat"].heldout_keys, terms["en-health"].heldout_keys) == (("en:chat",), ("en",))
    assert curves["en-chat"] == [(0, 5.5), (1, 4.0), (2, 3.5)]
