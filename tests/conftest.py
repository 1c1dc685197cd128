"""Shared fixtures: one CPU thread (identical runs otherwise vary 2 s to 31 s), tiny config."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def config():
    """The embedded default configuration (tiny model, demo corpus)."""
    from fedem_flwr.config import load_config

    return load_config()
