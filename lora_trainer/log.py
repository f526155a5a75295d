"""The package logger (``lora_trainer``) and a warn-once helper."""

import functools
import logging

logger = logging.getLogger("lora_trainer")
logger.propagate = False
if not logger.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("[lora-train] %(levelname)s: %(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)


@functools.cache
def warning_once(message: str) -> None:
    """Log ``message`` as a warning the first time it is seen in this process."""
    logger.warning(message)
