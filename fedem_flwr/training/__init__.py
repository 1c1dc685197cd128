"""Fine-tuning loop and held-out evaluation; tensors in, numbers out (no Flower, no registry)."""

from fedem_flwr.training.device import pick_device, pick_precision
from fedem_flwr.training.evaluate import evaluate, mean_loss
from fedem_flwr.training.finetune import TrainResult, is_out_of_memory, lr_at, shrink_micro_batch, train

__all__ = [
    "TrainResult", "evaluate", "is_out_of_memory", "lr_at", "mean_loss", "pick_device", "pick_precision",
    "shrink_micro_batch", "train",
]
