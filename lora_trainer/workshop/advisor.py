"""Training-length advice from the dataset's size, the repeats, epochs and batch size.

Step counting follows kohya: one epoch shows every image ``repeats`` times, in batches, so

    steps per epoch = ceil(sum(images * repeats) / batch size)
    total steps     = steps per epoch * epochs
    steps per image = sum(images * repeats) * epochs / images   (= repeats * epochs with one folder)

(kohya batches within each bucket, so with several buckets an epoch can be a few steps longer;
the advice does not need that precision.)

The rules of thumb checked, each a warning with a stable ``code``:

* ``too_few_images``: fewer than 15 images (``min_images``);
* ``too_few_steps_per_image``: each image seen fewer than 100 times (``min_steps_per_image``);
* ``too_few_total_steps``: fewer than 1500 steps in all (``min_total_steps``);
* ``batch_larger_than_dataset``: the batch is bigger than an epoch (one short step per epoch);
* ``no_images``: nothing to train on.

When a step rule fails, :attr:`Advice.suggestions` gives the smallest repeats (same epochs) and
the smallest epochs (same repeats) that satisfy both step rules.

``held_out``: images held out of training for the validation loss (``lora_trainer.data.split``);
they are counted in ``validation_images`` and left out of every other number (their repeats are
the folders' average).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from lora_trainer.errors import ConfigError
from lora_trainer.workshop.report import Report

__all__ = ["Advice", "AdviceWarning", "Suggestion", "advise", "steps_per_epoch"]

MIN_IMAGES = 15
MIN_STEPS_PER_IMAGE = 100
MIN_TOTAL_STEPS = 1500
_MAX_SEARCH = 100_000


@dataclass
class AdviceWarning:
    code: str
    message: str
    severity: str = "warning"


@dataclass
class Suggestion:
    """A setting that meets the step rules: ``repeats`` for every folder and ``epochs``."""

    repeats: int
    epochs: int
    steps_per_epoch: int
    total_steps: int
    steps_per_image: float
    note: str


@dataclass
class Advice(Report):
    """The numbers, the warnings (code + text) and, if needed, suggestions. ``ok``: no warnings."""

    images: int = 0  # training images (without the held-out ones)
    validation_images: int = 0  # held out for the validation loss
    samples_per_epoch: int = 0  # images * repeats
    repeats: float = 0.0  # average repeats per image
    epochs: int = 0
    batch_size: int = 1
    steps_per_epoch: int = 0
    total_steps: int = 0
    steps_per_image: float = 0.0
    warnings: list[AdviceWarning] = field(default_factory=list)
    suggestions: list[Suggestion] = field(default_factory=list)
    ok: bool = True

    def warning_codes(self) -> set[str]:
        """The warnings' codes (``problems`` stays empty: advice is about the whole dataset)."""
        return {w.code for w in self.warnings}


def steps_per_epoch(samples: int, batch_size: int) -> int:
    return math.ceil(samples / batch_size) if samples > 0 else 0


def _whole(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < minimum:
        raise ConfigError(name, f"must be a whole number of at least {minimum}, got {value!r}")
    return int(value)


def _satisfies(images: int, repeats: int, epochs: int, batch: int, min_spi: int, min_total: int) -> bool:
    return repeats * epochs >= min_spi and steps_per_epoch(images * repeats, batch) * epochs >= min_total


def advise(
    folders: Sequence[tuple[int, int]] | int,
    epochs: int,
    batch_size: int = 1,
    *,
    repeats: int | None = None,
    min_images: int = MIN_IMAGES,
    min_steps_per_image: int = MIN_STEPS_PER_IMAGE,
    min_total_steps: int = MIN_TOTAL_STEPS,
    held_out: int = 0,
) -> Advice:
    """Advice for ``folders``, a list of (images, repeats) per concept folder, or a number of
    images with ``repeats`` (default 1)."""
    if isinstance(folders, int):
        folders = [(folders, 1 if repeats is None else repeats)]
    folders = [(_whole("images", n, 0), _whole("repeats", r, 1)) for n, r in folders]
    epochs = _whole("training.max_train_epochs", epochs, 1)
    batch = _whole("training.train_batch_size", batch_size, 1)
    images, samples, held = _hold_out(
        sum(n for n, _ in folders), sum(n * r for n, r in folders), _whole("held_out", held_out, 0)
    )
    a = Advice(images=images, samples_per_epoch=samples, epochs=epochs, batch_size=batch, validation_images=held)
    if images == 0:
        a.warnings.append(AdviceWarning("no_images", "The dataset has no images; import some first.", "error"))
        a.ok = False
        return a
    a.repeats = samples / images
    a.steps_per_epoch = steps_per_epoch(samples, batch)
    a.total_steps = a.steps_per_epoch * epochs
    a.steps_per_image = samples * epochs / images

    if images < min_images:
        a.warnings.append(
            AdviceWarning(
                "too_few_images",
                f"Only {images} image(s); {min_images} or more varied images give a LoRA that generalises better "
                "(different poses, backgrounds, lighting).",
            )
        )
    if batch > samples:
        a.warnings.append(
            AdviceWarning(
                "batch_larger_than_dataset",
                f"The batch size ({batch}) is larger than one epoch ({samples} images x repeats): each epoch is one "
                "short step. Lower the batch size or raise the repeats.",
                "info",
            )
        )
    low_spi = a.steps_per_image < min_steps_per_image
    low_total = a.total_steps < min_total_steps
    if low_spi:
        a.warnings.append(
            AdviceWarning(
                "too_few_steps_per_image",
                f"Each image is trained {a.steps_per_image:g} times (repeats x epochs); aim for at least "
                f"{min_steps_per_image}. Raise the repeats or the epochs.",
            )
        )
    if low_total:
        a.warnings.append(
            AdviceWarning(
                "too_few_total_steps",
                f"{a.total_steps} steps in all ({a.steps_per_epoch} per epoch x {epochs} epochs); aim for at least "
                f"{min_total_steps}. Raise the repeats or the epochs.",
            )
        )
    if low_spi or low_total:
        cur_r = max(1, round(a.repeats))
        for r in range(1, _MAX_SEARCH):
            if _satisfies(images, r, epochs, batch, min_steps_per_image, min_total_steps):
                a.suggestions.append(_suggest(images, r, epochs, batch, f"keep {epochs} epochs, use {r} repeats"))
                break
        for e in range(1, _MAX_SEARCH):
            if _satisfies(images, cur_r, e, batch, min_steps_per_image, min_total_steps):
                a.suggestions.append(_suggest(images, cur_r, e, batch, f"keep {cur_r} repeats, train {e} epochs"))
                break
    a.ok = not a.warnings
    return a


def _hold_out(images: int, samples: int, held: int) -> tuple[int, int, int]:
    """(training images, training samples, held-out images) once ``held`` images are held out."""
    held = min(held, images)
    if not held:
        return images, samples, 0
    return images - held, samples - round(samples * held / images), held


def _suggest(images: int, r: int, e: int, batch: int, note: str) -> Suggestion:
    spe = steps_per_epoch(images * r, batch)
    return Suggestion(r, e, spe, spe * e, float(r * e), note)
