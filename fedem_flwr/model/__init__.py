"""Base model, byte tokenizer and LoRA adapters; no Flower imports here."""

from fedem_flwr.model.factory import (
    build_model,
    count_parameters,
    kernel_path,
    kernels_available,
    load_base,
    save_base,
)
from fedem_flwr.model.tokenizer import build_byte_tokenizer, load_tokenizer

__all__ = [
    "build_byte_tokenizer", "build_model", "count_parameters", "kernel_path", "kernels_available",
    "load_base", "load_tokenizer", "save_base",
]
