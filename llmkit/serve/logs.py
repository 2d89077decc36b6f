"""Where llmkit's log lines go when it serves: the front end's and its engine process's."""

from __future__ import annotations

import logging


def log_to_stderr(level: str) -> None:
    """llmkit's log lines to stderr at `level` (the server's and its engine process's)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("llmkit")
    logger.addHandler(handler)
    logger.setLevel(level.upper())
