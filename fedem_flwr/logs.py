"""Route fedem's log records through Flower's console handler, so they appear in `flwr run
--stream` and in SuperNode logs beside Flower's own, in the same format."""

from __future__ import annotations

import logging

PACKAGE_LOGGER = "fedem_flwr"


def use_flower_logging(level: int = logging.INFO) -> logging.Logger:
    """Idempotent: handlers are attached once per process."""
    from flwr.supercore.logger import FLOWER_LOGGER

    logger = logging.getLogger(PACKAGE_LOGGER)
    logger.setLevel(level)
    for handler in FLOWER_LOGGER.handlers:
        if handler not in logger.handlers:
            logger.addHandler(handler)
    logger.propagate = False
    return logger


def quiet_library_progress() -> None:
    """Hide the progress bars `datasets` and `transformers` draw for internal steps (filters,
    shard writes, weight loads): inside a relay they flood the run's log with no information.
    fedem's own training progress stays, as `train.progress` says."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
