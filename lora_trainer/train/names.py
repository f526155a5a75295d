"""Names of the optimizers and learning-rate schedulers the trainer builds, without importing torch.

``lora_trainer.train.optim`` builds exactly these (it checks so at import); the config offers them
as the choices of ``optim.optimizer_type`` and ``optim.lr_scheduler``.
"""

from __future__ import annotations

__all__ = ["LR_SCHEDULERS", "OPTIMIZERS"]

OPTIMIZERS: tuple[str, ...] = ("AdamW", "AdamW8bit", "Lion", "Prodigy", "Adafactor")
"""``optim.optimizer_type`` values, as kohya spells them."""

LR_SCHEDULERS: tuple[str, ...] = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
)
"""``optim.lr_scheduler`` values (kohya's ``get_scheduler_fix`` names)."""
