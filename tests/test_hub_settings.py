"""A hub records what it was set up with and refuses to start with a config that contradicts it."""

from __future__ import annotations

import pytest

from fedem_flwr.config.loader import load_config
from fedem_flwr.errors import ConfigError
from fedem_flwr.hub.registry import Registry
from fedem_flwr.hub.settings import check_and_record
from fedem_flwr.hub.store import LocalStore
from fedem_flwr.relay.bootstrap import open_hub

BASE = ["data.languages=[hi,ta]"]


def seeded(tmp_path, *overrides: str) -> Registry:
    """A registry whose settings were recorded from ``BASE + overrides``, with a base checkpoint."""
    registry = Registry.memory(secret=b"k" * 32)
    check_and_record(registry, load_config(BASE + list(overrides)), LocalStore(tmp_path), tmp_path, now=1.0)
    registry.add_checkpoint(None, "init", "fedem/base", None, "0" * 64, {}, created=1.0)
    return registry


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("lora.r=16", "`lora.r`: recorded 8, configured 16"),
        ("lora.alpha=32", "`lora.alpha`: recorded 16, configured 32"),
        ("lora.target_modules=[in_proj,embeddings]",
         "`lora.target_modules`: recorded ['in_proj'], configured ['in_proj', 'embeddings']"),
        ("tokenizer.bpe_merges=64", "`tokenizer.bpe_merges`: recorded 0, configured 64"),
        ("tokenizer.model_max_length=512", "`tokenizer.model_max_length`: recorded 4096, configured 512"),
        ("model.hidden_size=32", "`model.hidden_size`: recorded 64, configured 32"),
        ("model.arch=mamba", "`model.arch`: recorded 'mamba2', configured 'mamba'"),
        ("model.dtype=bfloat16", "`model.dtype`: recorded 'float32', configured 'bfloat16'"),
        ("data.block_size=64", "`data.block_size`: recorded 128, configured 64"),
        ("data.languages=[hi]", "`data.languages`: recorded ['hi', 'ta'], configured ['hi'] (languages may be "
                                "added, not removed: ta would lose"),
        ("hub.repo_prefix=other", "`hub.repo_prefix`: recorded 'fedem', configured 'other'"),
        ("hub.store=hf", "`hub.store`: recorded 'local', configured 'hf'"),
    ],
)
def test_a_changed_setting_is_refused_naming_key_values_and_the_way_out(tmp_path, override, expected):
    registry = seeded(tmp_path)

    with pytest.raises(ConfigError) as err:
        check_and_record(registry, load_config(BASE + [override]), LocalStore(tmp_path), tmp_path / "hub")

    message = str(err.value)
    assert expected in message
    assert "recorded values (overrides \"" in message and "new hub folder" in message
    assert str(tmp_path / "hub") in message


def test_every_difference_is_named_with_one_override_each(tmp_path):
    registry = seeded(tmp_path)

    with pytest.raises(ConfigError) as err:
        check_and_record(registry, load_config(BASE + ["lora.r=4", "data.block_size=64"]), LocalStore(tmp_path),
                         tmp_path)

    assert "`lora.r`: recorded 8, configured 4" in str(err.value)
    assert "`data.block_size`: recorded 128, configured 64" in str(err.value)
    assert 'overrides "lora.r=8 data.block_size=128"' in str(err.value)


def test_a_changed_hub_endpoint_names_the_environment_variable(tmp_path):
    class Hf(LocalStore):
        def __init__(self, endpoint):
            super().__init__(tmp_path)
            self.endpoint = endpoint

    registry = Registry.memory(secret=b"k" * 32)
    cfg = load_config(BASE + ["hub.store=hf", "hub.repo_prefix=org/seshu"])
    check_and_record(registry, cfg, Hf("http://127.0.0.1:1"), tmp_path)
    registry.add_checkpoint(None, "init", "fedem/base", None, "0" * 64, {}, created=1.0)

    with pytest.raises(ConfigError, match=r"`HF_ENDPOINT`: recorded 'http://127.0.0.1:1', configured 'http://x'"
                                          r"(.|\n)*set HF_ENDPOINT=http://127.0.0.1:1"):
        check_and_record(registry, cfg, Hf("http://x"), tmp_path)
    with pytest.raises(ConfigError) as err:  # a change of store kind is one difference, not two
        check_and_record(registry, load_config(BASE + ["hub.repo_prefix=org/seshu"]), LocalStore(tmp_path), tmp_path)
    assert "`hub.store`: recorded 'hf', configured 'local'" in str(err.value)
    assert "HF_ENDPOINT" not in str(err.value)


@pytest.mark.parametrize(
    "override",
    ["lora.dropout=0.1", "model.kernels=never", "data.languages=[hi,ta,de]", "data.languages=[]",
     "data.partitioner=iid", "data.min_language_bytes=100", "data.heldout_fraction=0.2",
     "data.min_heldout_blocks=3", "hub.private=true"],
)
def test_a_safe_change_starts_and_is_recorded(tmp_path, override):
    registry = seeded(tmp_path)
    key, value = override.split("=")
    section, name = key.split(".")

    check_and_record(registry, load_config(BASE + [override]), LocalStore(tmp_path), tmp_path, now=2.0)

    setting = registry.setting("store" if section == "hub" else section)
    assert str(setting[name]).lower().replace(" ", "").replace("'", "") == value


def test_a_hub_without_a_base_yet_records_the_config_as_it_is(tmp_path):
    registry = Registry.memory(secret=b"k" * 32)
    check_and_record(registry, load_config(BASE), LocalStore(tmp_path), tmp_path)

    check_and_record(registry, load_config(BASE + ["lora.r=4"]), LocalStore(tmp_path), tmp_path)

    assert registry.setting("lora")["r"] == 4


def test_a_hub_set_up_before_settings_is_checked_against_its_adapters_lora_spec(tmp_path):
    registry = Registry.memory(secret=b"k" * 32)
    registry.add_checkpoint(None, "init", "fedem/base", None, "0" * 64, {}, created=1.0)
    registry.add_adapter("hi", ["hi"], "causal-lm", {"r": 8, "alpha": 16, "dropout": 0.0,
                                                      "target_modules": ["in_proj"]}, created=1.0)

    with pytest.raises(ConfigError, match="`lora.r`: recorded 8, configured 16"):
        check_and_record(registry, load_config(BASE + ["lora.r=16"]), LocalStore(tmp_path), tmp_path)


# -- through open_hub ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory):
    """A hub opened once with the tiny default config (base and adapters seeded)."""
    path = tmp_path_factory.mktemp("settings") / "hub"
    hub = open_hub(load_config(BASE), path)
    hub.registry.close()
    return path


def test_open_hub_records_the_settings_and_an_unchanged_config_starts(hub_dir):
    hub = open_hub(load_config(BASE), hub_dir)

    assert hub.registry.setting("lora") == {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["in_proj"]}
    assert hub.registry.setting("store") == {"kind": "local", "repo_prefix": "fedem", "endpoint": None,
                                             "private": False}
    assert hub.registry.setting("data")["languages"] == ["hi", "ta"]
    assert {a.name for a in hub.registry.adapters()} == {"hi", "ta"}
    hub.registry.close()


def test_open_hub_refuses_a_changed_lora_spec_before_touching_anything(hub_dir):
    before = (hub_dir / "registry.sqlite").stat().st_mtime_ns

    with pytest.raises(ConfigError, match="`lora.r`: recorded 8, configured 4"):
        open_hub(load_config(BASE + ["lora.r=4"]), hub_dir)

    assert Registry.open(hub_dir / "registry.sqlite", readonly=True).setting("lora")["r"] == 8
    assert (hub_dir / "registry.sqlite").stat().st_mtime_ns == before
