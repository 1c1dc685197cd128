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
