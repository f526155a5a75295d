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


class CheckpointError(LoraTrainerError):
    """A base-model file that cannot be read: missing, damaged, truncated, or a pickle not allowed."""


class LoraFileError(LoraTrainerError):
    """A file that is not a readable LoRA (damaged, not safetensors, no LoRA keys)."""


class NonFiniteError(LoraTrainerError):
    """NaN or inf where training needs finite numbers: several steps in a row, or LoRA weights about to be saved."""


class OutOfMemory(LoraTrainerError):
    """The device ran out of memory in ``phase``; ``advice`` says which settings to change.

    ``saved``: the file holding what was trained before it (None when nothing was saved).
    """

    def __init__(self, phase: str, advice: str, saved: str | None = None):
        self.phase, self.advice, self.saved = phase, advice, saved
        super().__init__(phase, advice, saved)

    def __str__(self) -> str:
        text = f"Out of memory during {self.phase}" + (f" {self.advice}" if self.advice else ".")
        if self.saved:
            text += f" What was trained so far is saved in {self.saved} (with its resume state)."
        return text


class TrainingInterrupted(LoraTrainerError):
    """Raised inside the loop when the caller asked to stop."""
