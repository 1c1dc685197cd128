"""The logging bridge: route fedem's log records through Flower's console handler, so they appear in
`flwr run --stream` and in SuperNode logs beside Flower's own, in the same format, with the
libraries' deprecation notices kept out (``fedem_flwr.quiet``)."""

from __future__ import annotations

import logging

from flwr.supercore.logger import FLOWER_LOGGER

from fedem_flwr.quiet import quiet_library_deprecations

PACKAGE_LOGGER = "fedem_flwr"


def use_flower_logging(level: int = logging.INFO) -> logging.Logger:
    """Idempotent: handlers are attached once per process."""
    logger = logging.getLogger(PACKAGE_LOGGER)
    logger.setLevel(level)
    for handler in FLOWER_LOGGER.handlers:
        if handler not in logger.handlers:
            logger.addHandler(handler)
    logger.propagate = False
    quiet_library_deprecations()
    return logger
