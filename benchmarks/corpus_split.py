"""The demo corpus split as a hub splits it, for the scripts in this folder that train and judge adapters
on the tiny model (each is run as ``python benchmarks/NAME.py``, which puts this folder on the path)."""

from __future__ import annotations

from typing import Any, Optional


def corpus_split(key: bytes, overrides: Optional[list[str]] = None) -> tuple[Any, Any, Any]:
    """``(cfg, tokenizer, split)``: the composed config (with ``overrides``), the byte tokenizer, and the
    corpus split into training and held-out rows under ``key`` (a benchmark's own, at least 16 bytes)."""
    import datasets

    from fedem_flwr.config.loader import load_config
    from fedem_flwr.data.blocks import heldout_split
    from fedem_flwr.data.corpus import load_corpus
    from fedem_flwr.model.tokenizer import build_byte_tokenizer

    datasets.disable_progress_bars()
    cfg = load_config(overrides or [])
    tokenizer = build_byte_tokenizer()
    split = heldout_split(load_corpus(cfg.data), cfg.data.heldout_fraction, cfg.data.min_heldout_blocks,
                          cfg.data.block_size, tokenizer, key=key)
    return cfg, tokenizer, split
