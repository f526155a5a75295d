"""``SampleConfig``: the preview settings group of ``TrainConfig`` (kept apart from the other groups
in :mod:`lora_trainer.config.groups` for size; the same kind of stdlib dataclass with field metadata).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lora_trainer.config.coerce import CoercedGroup
from lora_trainer.config.meta import MAX_RESOLUTION, MAX_SEED, field_meta, setting

__all__ = ["SampleConfig"]


@dataclass
class SampleConfig(CoercedGroup):
    """Preview images generated during training."""

    sample_every_n_steps: int | None = setting(
        None,
        label="Preview every N steps",
        kohya="sample_every_n_steps",
        ge=1,
        le=1_000_000,
        help="Generate previews every N steps; unset = off.",
    )
    sample_every_n_epochs: int | None = setting(
        None,
        label="Preview every N epochs",
        kohya="sample_every_n_epochs",
        ge=1,
        le=1_000_000,
        help="Generate previews every N epochs; unset = off.",
    )
    sample_prompts: list[str] = field(
        default_factory=list,
        metadata=field_meta(
            label="Preview prompts",
            help="Prompts for the previews, one per entry. (kohya's sample_prompts is a file path instead and is "
            "not read.)",
        ),
    )
    sample_sampler: str = setting(
        "Euler a",
        label="Preview sampler",
        help="WebUI sampler name for previews, e.g. 'Euler a' or 'DPM++ 2M'.",
    )
    sample_steps: int = setting(20, label="Preview steps", ge=1, le=150, help="Sampling steps per preview.")
    sample_cfg: float = setting(7.0, label="Preview CFG scale", ge=1.0, le=30.0, help="CFG scale for previews.")
    sample_seed: int | None = setting(
        None,
        label="Preview seed",
        ge=0,
        le=MAX_SEED,
        help="Seed of every preview, so they can be compared; unset = one random seed for the whole run.",
    )
    sample_width: int | None = setting(
        None,
        label="Preview width",
        ge=64,
        le=MAX_RESOLUTION,
        help="Preview width in pixels (a multiple of 8); unset = the training resolution.",
    )
    sample_height: int | None = setting(
        None,
        label="Preview height",
        ge=64,
        le=MAX_RESOLUTION,
        help="Preview height in pixels (a multiple of 8); unset = the training resolution.",
    )
