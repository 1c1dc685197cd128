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
    from fedem_flwr.config.loader import load_config

    return load_config()


@pytest.fixture(scope="session")
def tokenizer():
    """The byte-level tokenizer (built locally, no download), shared by every test that needs one."""
    from fedem_flwr.model.tokenizer import build_byte_tokenizer

    return build_byte_tokenizer()


@pytest.fixture
def fresh_db():
    """An in-memory registry with a fixed secret."""
    from fedem_flwr.hub.registry import Registry

    registry = Registry.memory(secret=b"k" * 32)
    yield registry
    registry.close()


@pytest.fixture
def local_hub(tmp_path_factory):
    """A local Hugging Face Hub endpoint (`tests.support.hf_server`) for one test."""
    from tests.support.hf_server import serve_hub

    with serve_hub(tmp_path_factory.mktemp("hub-blobs")) as hub:
        yield hub


@pytest.fixture
def hf_env(local_hub, tmp_path_factory):
    """transformers, PEFT and datasets pointed at `local_hub`, with a fresh temporary HF_HOME."""
    from tests.support.hf_server import hub_environment

    with hub_environment(local_hub.endpoint, tmp_path_factory.mktemp("hf-home")):
        yield local_hub


def pytest_collection_modifyitems(config, items):
    """Skip tests marked `gpu` where torch sees no CUDA device (CPU machines and CI)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
