"""The hub's held-out set: keyed with its secret, kept out of every node's training rows, recorded
as a fingerprint, and the parents' losses evaluated again when it changes (real hub, tiny model)."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest

from fedem_flwr.config.loader import load_config
from fedem_flwr.data.blocks import heldout_split
from fedem_flwr.data.corpus import column
from fedem_flwr.hub.paths import secret_path
from fedem_flwr.hub.store import ArtifactRef
from fedem_flwr.lineage.heldout import KEY_PURPOSE, SETTING, split_id
from fedem_flwr.model.adapter_spec import load_adapter_file
from fedem_flwr.model.tokenizer import build_byte_tokenizer
from fedem_flwr.relay.bootstrap import open_hub
from fedem_flwr.relay.keeper import BaseKeeper

LANGUAGES = "data.languages=[hi,ta,mr,de]"


def _open(path, *overrides):
    return open_hub(load_config([LANGUAGES, *overrides]), path)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    hub = _open(tmp_path_factory.mktemp("heldout") / "hub")
    yield hub
    hub.registry.close()


def heldout_texts(hub) -> set[str]:
    """The documents of the hub's held-out blocks, decoded back (the byte tokenizer is the hub's)."""
    tokenizer = build_byte_tokenizer()
    texts = set()
    for blocks in hub.split.heldout.values():
        text = tokenizer.decode(blocks.flatten().tolist())
        texts.update(text.split(tokenizer.eos_token)[:-1])
    return texts


@pytest.mark.parametrize(("scheme", "nodes"), [("language", 2), ("language", 3), ("language", 7), ("iid", 3),
                                               ("dirichlet", 2)])
def test_no_node_receives_a_heldout_row(hub, scheme, nodes):
    # Prepare: the same hub, partitioned another way
    cfg = dataclasses.replace(hub.cfg, data=dataclasses.replace(hub.cfg.data, partitioner=scheme, dirichlet_alpha=5.0))
    hub = dataclasses.replace(hub, cfg=cfg)
    held = heldout_texts(hub)
    assert len(held) >= 10

    # Execute
    delivered = [hub.training_rows(pid, nodes) for pid in range(nodes)]

    # Assert: no delivered text is held out, and together the nodes get every other row
    texts = [set(column(rows, "text")) for rows in delivered]
    assert all(mine.isdisjoint(held) for mine in texts)
    every = set(column(hub.corpus, "text"))
    assert set().union(*texts) == every - {text for _, text in hub.split.withheld}
    assert all(rows.column_names == ["text", "language", "chat", "domain"] for rows in delivered)
    assert hub.training_rows(0, nodes) is delivered[0]  # cached per partition


def test_the_split_is_keyed_with_a_key_derived_from_the_hub_secret(hub):
    # A node knows the corpus, the fraction and the seed, but not the key: neither a public hash of
    # the rows nor another key selects the hub's held-out rows.
    cfg = hub.cfg.data
    key = hub.registry.derived_key(KEY_PURPOSE)
    secret = bytes.fromhex(secret_path(hub.path).read_text().strip())
    tokenizer = build_byte_tokenizer()

    again = heldout_split(hub.corpus, cfg.heldout_fraction, cfg.min_heldout_blocks, cfg.block_size, tokenizer, key)
    guessed = heldout_split(hub.corpus, cfg.heldout_fraction, cfg.min_heldout_blocks, cfg.block_size, tokenizer,
                            str(hub.cfg.seed).encode() * 16)

    assert again.withheld == hub.split.withheld
    assert len(guessed.withheld & hub.split.withheld) < 0.5 * len(hub.split.withheld)
    assert key not in (secret, hub.registry.derived_key("other"))
    recorded = json.dumps(hub.registry.settings())
    assert key.hex() not in recorded and secret.hex() not in recorded  # only the key's id is recorded


def test_the_fingerprint_is_recorded(hub):
    fingerprint = hub.registry.setting(SETTING)
    assert {k: fingerprint[k] for k in ("fraction", "min-blocks", "block-size")} == {
        "fraction": 0.1, "min-blocks": 2, "block-size": 128}
    assert fingerprint["languages"] == sorted(hub.split.heldout)
    assert {"key-id", "corpus", "tokenizer", "withheld"} <= fingerprint.keys()


def test_a_changed_fraction_re_evaluates_the_parent_losses(tmp_path, caplog):
    # Prepare: a hub opened with the default fraction, then closed
    first = _open(tmp_path / "hub")
    before = first.registry.latest_adapter_versions()
    old_fingerprint = first.registry.setting(SETTING)
    first.registry.close()

    # Execute: the operator changes data.heldout_fraction
    with caplog.at_level(logging.INFO, logger="fedem_flwr.lineage.heldout"):
        hub = _open(tmp_path / "hub", "data.heldout_fraction=0.25")

    # Assert: the new fingerprint is recorded and every parent's losses come from the new held-out set
    fingerprint = hub.registry.setting(SETTING)
    assert fingerprint["fraction"] == 0.25 and fingerprint["withheld"] != old_fingerprint["withheld"]
    assert "fraction 0.1 -> 0.25" in caplog.text
    assert f"re-evaluated the parent losses of {len(before)} adapter(s)" in caplog.text
    after = hub.registry.latest_adapter_versions()
    for name, old in before.items():
        new = after[name]
        assert new.version == old.version
        state = load_adapter_file(hub.store.get(ArtifactRef(new.repo, new.revision, new.digest))
                                  / "adapter_model.safetensors")
        assert new.metrics["heldout"] == pytest.approx(hub.workbench.evaluate(state))
        assert new.metrics["heldout"] != old.metrics["heldout"]
        assert new.metrics["heldout-split"] == split_id(fingerprint)
        assert new.metrics["heldout-replaced"] == [
            {"heldout": old.metrics["heldout"], "split": split_id(old_fingerprint), "until": pytest.approx(
                new.metrics["heldout-replaced"][0]["until"])}]
    # Base v0 keeps the losses it was published with, named by their split; the base gate measures it
    # again on the held-out set in use rather than compare with losses on other texts.
    v0 = hub.registry.checkpoint(0)
    assert v0.metrics["heldout-split"] == split_id(old_fingerprint) != hub.split_id == split_id(fingerprint)
    bare = BaseKeeper(hub).bare_losses(v0)
    assert bare == pytest.approx(hub.workbench.evaluate(hub.workbench.initial_state))
    assert bare != v0.metrics["heldout"]
    hub.registry.close()

    # Execute: opened again unchanged, nothing is evaluated again
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fedem_flwr.lineage.heldout"):
        same = _open(tmp_path / "hub", "data.heldout_fraction=0.25")
    assert "re-evaluated" not in caplog.text
    assert same.registry.latest_adapter_versions() == after
    same.registry.close()
