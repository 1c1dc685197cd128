"""Route fedem's log records through Flower's console handler, so they appear in `flwr run
--stream` and in SuperNode logs beside Flower's own, in the same format; keep the libraries'
deprecation notices (meant for their callers' developers, not for whoever runs a hub or a node)
out of that log."""

from __future__ import annotations

import logging
import warnings

PACKAGE_LOGGER = "fedem_flwr"
# Flower's own logger (``flwr.supercore.logger.FLOWER_LOGGER``), taken by name: this module stays free
# of Flower, so the CLI can use it; the apps that call ``use_flower_logging`` have imported Flower.
FLOWER_LOGGER_NAME = "flwr"
# Libraries whose deprecation and future warnings are hidden from a run's log; fedem's own stay.
QUIET_LIBRARIES = ("transformers", "peft", "datasets", "huggingface_hub", "torch", "flwr", "typer", "click",
                   "ray", "hydra", "omegaconf", "safetensors", "tokenizers", "pydantic")
_DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


def use_flower_logging(level: int = logging.INFO) -> logging.Logger:
    """Idempotent: handlers are attached once per process."""
    logger = logging.getLogger(PACKAGE_LOGGER)
    logger.setLevel(level)
    for handler in logging.getLogger(FLOWER_LOGGER_NAME).handlers:
        if handler not in logger.handlers:
            logger.addHandler(handler)
    logger.propagate = False
    quiet_library_deprecations()
    return logger


def quiet_library_deprecations() -> None:
    """Ignore deprecation and future warnings raised inside `QUIET_LIBRARIES` (idempotent)."""
    pattern = rf"({'|'.join(QUIET_LIBRARIES)})(\.|$)"
    for category in _DEPRECATIONS:
        warnings.filterwarnings("ignore", category=category, module=pattern)


def quiet_library_progress() -> None:
    """Hide the progress bars `datasets` and `transformers` draw for internal steps (filters,
    shard writes, weight loads): inside a relay they flood the run's log with no information.
    fedem's own training progress stays, as `train.progress` says."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
