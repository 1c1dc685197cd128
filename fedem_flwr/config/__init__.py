"""The single source of truth: one composed, validated configuration."""

from fedem_flwr.config.loader import (
    config_to_dict,
    load_config,
    load_run_config,
    parse_overrides,
)
from fedem_flwr.config.schema import (
    CptConfig,
    DataConfig,
    FedemConfig,
    GateConfig,
    HubConfig,
    LoraConfig,
    ModelConfig,
    RelayConfig,
    SimConfig,
    TokenizerConfig,
    TrainConfig,
)

__all__ = [
    "CptConfig", "DataConfig", "FedemConfig", "GateConfig", "HubConfig", "LoraConfig", "ModelConfig",
    "RelayConfig", "SimConfig", "TokenizerConfig", "TrainConfig", "config_to_dict",
    "load_config", "load_run_config", "parse_overrides",
]
