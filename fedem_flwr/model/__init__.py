"""The base model (transformers Mamba / Mamba-2), the byte-level tokenizer and LoRA adapters with
kernel-safe targets; no Flower, no registry."""
