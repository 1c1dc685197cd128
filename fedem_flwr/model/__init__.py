"""Base model, byte tokenizer and LoRA adapters; no Flower imports here.

Names resolve lazily (PEP 562) so that the config schema can use ``model.lora.check_targets``
without importing torch or transformers.
"""

from fedem_flwr.lazy import export_lazily

export_lazily(__name__, {
    "build_model": "factory", "count_parameters": "factory", "kernel_path": "factory",
    "kernels_available": "factory", "load_base": "factory", "save_base": "factory",
    "build_byte_tokenizer": "tokenizer", "load_tokenizer": "tokenizer",
    "SAFE_TARGETS": "lora", "adapter_state": "lora", "attach_lora": "lora", "check_targets": "lora",
    "load_adapter": "lora", "load_adapter_state": "lora", "peft_config": "lora", "save_adapter": "lora",
    "AdapterSpec": "adapter_spec", "load_adapter_file": "adapter_spec", "validate_adapter_state": "adapter_spec",
})
