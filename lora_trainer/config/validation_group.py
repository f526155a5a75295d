"""``ValidationConfig``: the validation-loss settings group of ``TrainConfig`` (a held-out split of the
dataset, evaluated at fixed timesteps with fixed noise; see :mod:`lora_trainer.train.validation`).

The names are kohya-ss/sd-scripts' (``train_network.py``), where kohya has the setting; the count form
and the separate folder are ours (kohya has only the fraction).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lora_trainer.config.coerce import CoercedGroup
from lora_trainer.config.meta import MAX_SEED, setting
from lora_trainer.errors import ConfigError

__all__ = ["ValidationConfig", "check_validation", "validation_on"]


@dataclass
class ValidationConfig(CoercedGroup):
    """Validation loss on held-out images: how to hold them out and when to evaluate."""

    validation_split: float = setting(
        0.0,
        label="Validation split (fraction)",
        kohya="validation_split",
        ge=0.0,
        lt=1.0,
        help="Fraction of the images held out of training to measure the validation loss (e.g. 0.1); "
        "at least one image when set; 0 = no split.",
    )
    validation_count: int | None = setting(
        None,
        label="Validation images (count)",
        ge=1,
        le=100_000,
        help="Number of images held out of training instead of a fraction; unset = use the fraction. "
        "(kohya has only the fraction.)",
    )
    validation_data_dir: str = setting(
        "",
        label="Validation images folder",
        help="A separate folder of validation images (same layout as the training folder); all of the "
        "training images are then trained on. Empty = none. (kohya has no such setting.)",
    )
    validation_seed: int | None = setting(
        None,
        label="Validation seed",
        kohya="validation_seed",
        ge=0,
        le=MAX_SEED,
        help="Seed of the split and of the validation noise; unset = the training seed.",
    )
    validate_every_n_steps: int | None = setting(
        None,
        label="Validate every N steps",
        kohya="validate_every_n_steps",
        ge=1,
        le=1_000_000,
        help="Also measure the validation loss every N steps; unset = only at epoch ends.",
    )
    validate_every_n_epochs: int | None = setting(
        None,
        label="Validate every N epochs",
        kohya="validate_every_n_epochs",
        ge=1,
        le=1_000_000,
        help="Measure the validation loss every N epochs; unset = every epoch. Epochs that save a file and "
        "the end of the run are always measured.",
    )
    max_validation_steps: int | None = setting(
        None,
        label="Max validation images",
        kohya="max_validation_steps",
        ge=1,
        le=1_000_000,
        help="Measure on at most this many held-out images; unset = all of them.",
    )


def validation_on(values: dict[str, Any]) -> bool:
    """Whether validation is on, from dotted-path values (``TrainConfig.to_flat()`` shape)."""
    return bool(
        values.get("validation.validation_split")
        or values.get("validation.validation_count")
        or values.get("validation.validation_data_dir")
    )


def check_validation(v: dict[str, Any]) -> list[ConfigError]:
    """One way to hold images out at a time: a fraction, a count, or a folder."""
    names = ("validation.validation_split", "validation.validation_count", "validation.validation_data_dir")
    if not all(name in v for name in names):
        return []
    split, count, folder = (v[name] for name in names)
    if split and count:
        return [ConfigError(names[1], "set either a count or a fraction (validation.validation_split), not both")]
    if folder and (split or count):
        message = "a validation folder replaces the split: unset validation.validation_split and _count"
        return [ConfigError(names[2], message)]
    return []
