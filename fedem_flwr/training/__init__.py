"""Fine-tuning loop and held-out evaluation; tensors in, numbers out (no Flower, no registry).

Names resolve lazily (PEP 562), and neither loop imports `datasets` or flwr-datasets: a GPU machine
trains on blocks it is handed without carrying them.
"""

from fedem_flwr.lazy import export_lazily

export_lazily(__name__, {
    "pick_device": "device", "pick_precision": "device",
    "evaluate": "evaluate", "mean_loss": "evaluate",
    "TrainResult": "finetune", "is_out_of_memory": "finetune", "lr_at": "finetune",
    "shrink_micro_batch": "finetune", "train": "finetune",
})
