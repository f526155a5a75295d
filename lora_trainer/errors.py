"""Typed errors. The core raises these; the UI and the API translate them at the edge."""


class LoraTrainerError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(LoraTrainerError, ValueError):
    """An invalid setting. ``field`` names the offending config field (dotted path)."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class DatasetError(LoraTrainerError):
    """A dataset problem: empty folder, unreadable image, bad caption file ..."""


class IncompatibleModelError(LoraTrainerError):
    """The loaded model is not one we can train (unknown family, missing parts ...)."""


class LoraFileError(LoraTrainerError):
    """A file that is not a readable LoRA (damaged, not safetensors, no LoRA keys)."""


class TrainingInterrupted(LoraTrainerError):
    """Raised inside the loop when the caller asked to stop."""
