"""The validation split: images held out of training to measure the validation loss.

Like kohya-ss/sd-scripts' ``validation_split`` the images are shuffled with the validation seed and
a fraction is held out; here the draw is over the whole dataset's images in key order (kohya splits
each subset on its own), so the same files and seed always hold out the same images, and a fraction
holds out at least one image. A count holds out exactly that many. Held-out images are never trained:
they are left out of the training items, so they are in no bucket and no epoch.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

from lora_trainer.data.scan import ImageItem
from lora_trainer.errors import ConfigError

__all__ = ["held_out_count", "split_validation"]


def held_out_count(images: int, fraction: float = 0.0, count: int | None = None) -> int:
    """How many of ``images`` a split holds out: ``count``, else ``fraction`` of them rounded, at least one
    when the fraction is set; 0 when neither is set. ``ConfigError`` when no image would be left to train on."""
    if count:
        held, field = int(count), "validation.validation_count"
    elif fraction > 0:
        held, field = max(1, round(images * fraction)), "validation.validation_split"
    else:
        return 0
    if held >= images:
        message = f"holds out {held} of the {images} training image(s), leaving none to train on: hold out fewer"
        raise ConfigError(field, message)
    return held


def split_validation(
    items: Sequence[ImageItem], *, fraction: float = 0.0, count: int | None = None, seed: int = 0
) -> tuple[list[ImageItem], list[ImageItem]]:
    """(training items, held-out items). The training items keep their order and repeats; the held-out
    ones come in key order, with one repeat each (each is measured once)."""
    held = held_out_count(len(items), fraction, count)
    if not held:
        return list(items), []
    order = sorted(range(len(items)), key=lambda i: items[i].key)
    random.Random(seed).shuffle(order)
    chosen = set(order[:held])
    train = [it for i, it in enumerate(items) if i not in chosen]
    val = sorted((dataclasses.replace(items[i], repeats=1) for i in chosen), key=lambda it: it.key)
    return train, val
