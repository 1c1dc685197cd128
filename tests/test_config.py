"""The composed config is the single source of truth; bad values fail at start-up naming the key."""

import pytest

from fedem_flwr.config.loader import load_config, load_run_config, parse_overrides
from fedem_flwr.errors import ConfigError


def test_defaults_compose_to_typed_dataclasses(config):
    assert config.model.name == "seshu-tiny"
    assert config.model.arch == "mamba2"
    assert config.lora.target_modules == ["in_proj"]
    assert config.relay.lease_ttl_s == 10800
    assert config.relay.sweep_interval_s == 300


def test_overrides_and_group_selection():
    cfg = load_config(["lora.r=16", "model=seshu-130m", "seed=7"])
    assert cfg.lora.r == 16
    assert cfg.model.hidden_size == 768 and cfg.model.num_hidden_layers == 24
    assert cfg.seed == 7


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("lora.nope=1", "lora.nope"),
        ("lora.r=abc", "lora.r"),
        ("model=nope", "model/nope"),
        ("relay.policy=fastest", "relay.policy"),
        ("train.lr=-1", "train.lr"),
        ("model.head_dim=7", "model.head_dim"),
    ],
)
def test_bad_values_name_the_key(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config([override])


def test_run_config_selects_and_overrides():
    cfg = load_run_config({"config-name": "config", "overrides": "train.max_steps=3 data.languages=[hi,te]",
                           "hub": "/srv/hub"})
    assert cfg.train.max_steps == 3
    assert cfg.data.languages == ["hi", "te"]
    assert cfg.hub.path == "/srv/hub"


def test_run_config_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="lora-r"):
        load_run_config({"lora-r": 16})


def test_parse_overrides_is_shell_like():
    assert parse_overrides("a=1  'b=x y'") == ["a=1", "b=x y"]
    with pytest.raises(ConfigError):
        parse_overrides("a='unterminated")
