"""The WebUI's own DeepBooru tagger and BLIP interrogator, for the dataset workshop.

Owns the captioning helpers (:func:`deepbooru_tags`, :func:`blip_caption` and their batch forms,
which load the model to the GPU once per batch, as the WebUI's interrogator does) and the
workshop captioners over them (:class:`DeepBooruCaptioner`, :class:`BlipCaptioner`), which run
under the WebUI's queue lock so a caption run never shares the GPU with a generation or a
training run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch
from modules import call_queue, devices, shared

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "BlipCaptioner",
    "DeepBooruCaptioner",
    "blip_caption",
    "blip_captions",
    "deepbooru_tags",
    "deepbooru_tags_many",
]

_T = TypeVar("_T")


def deepbooru_tags(
    image: Image.Image, threshold: float = 0.5, *, include_ratings: bool = False
) -> list[tuple[str, float]]:
    """DeepBooru tags of one image with their scores, best first, raw (``long_hair``, unescaped)."""
    return deepbooru_tags_many([image], threshold, include_ratings=include_ratings)[0]


def deepbooru_tags_many(
    images: Iterable[Image.Image], threshold: float = 0.5, *, include_ratings: bool = False
) -> list[list[tuple[str, float]]]:
    """:func:`deepbooru_tags` for many images, loading the model to the GPU once.

    As the WebUI's interrogator: ``deepbooru.model.start()`` (downloads the model on first use,
    moves it to the GPU), then ``stop()`` (back to RAM unless "Keep models in VRAM" is set).
    """
    from modules import deepbooru
    from modules import images as webui_images

    model = deepbooru.model
    model.start()
    try:
        results = []
        for image in images:
            picture = webui_images.resize_image(2, image.convert("RGB"), 512, 512)  # 2 = resize and fill
            array = np.expand_dims(np.asarray(picture, dtype=np.float32), 0) / 255
            with torch.no_grad(), devices.autocast():
                x = torch.from_numpy(array).to(devices.device, devices.dtype)
                scores = model.model(x)[0].detach().float().cpu().numpy()
            pairs = [
                (str(tag), float(score))
                for tag, score in zip(model.model.tags, scores, strict=False)
                if score >= threshold and (include_ratings or not str(tag).startswith("rating:"))
            ]
            pairs.sort(key=lambda pair: -pair[1])
            results.append(pairs)
        return results
    finally:
        model.stop()


def blip_caption(image: Image.Image) -> str:
    """A BLIP caption of one image, through the WebUI's interrogator."""
    return blip_captions([image])[0]


def blip_captions(images: Iterable[Image.Image]) -> list[str]:
    """BLIP captions, loading only BLIP (not the interrogator's CLIP) to the GPU once.

    Follows ``InterrogateModels.interrogate``: low-VRAM parts to the CPU first, BLIP loaded
    (downloaded on first use) and halved unless ``--no-half``, moved back to RAM after (unless
    "Keep models in VRAM" is set).
    """
    from modules import lowvram

    interrogator = shared.interrogator
    lowvram.send_everything_to_cpu()
    devices.torch_gc()
    if interrogator.blip_model is None:
        blip = interrogator.load_blip_model()
        if not shared.cmd_opts.no_half and not interrogator.running_on_cpu:
            blip = blip.half()
        interrogator.blip_model = blip
    interrogator.blip_model = interrogator.blip_model.to(devices.device_interrogate)
    interrogator.dtype = next(interrogator.blip_model.parameters()).dtype  # generate_caption casts images to it
    try:
        return [str(interrogator.generate_caption(image.convert("RGB"))) for image in images]
    finally:
        interrogator.send_blip_to_ram()
        devices.torch_gc()


class _WebUICaptioner:
    """Shared by the workshop captioners below: one image at a time under the WebUI's queue lock,
    so a caption run and a generation (or a training run) never share the GPU.

    The first image of a run does not wait: if the lock is held (a training run holds it for
    its whole length) :class:`~lora_trainer.workshop.CaptionerUnavailable` says so before anything
    is written. Later images wait their turn, as the WebUI's own Interrogate button does.
    """

    name = ""
    label = ""

    def __init__(self) -> None:
        self._started = False

    def _locked(self, run: Callable[[], _T]) -> _T:
        from lora_trainer.workshop.captioning import CaptionerUnavailable

        lock = call_queue.queue_lock
        if not self._started:
            if not lock.acquire(False):
                raise CaptionerUnavailable(
                    f"The WebUI is busy (a generation or a LoRA training run holds the GPU); {self.label} "
                    "captions can run when it is free."
                )
            self._started = True
        else:
            lock.acquire()
        try:
            return run()
        finally:
            lock.release()


class DeepBooruCaptioner(_WebUICaptioner):
    """The WebUI's DeepBooru as a :class:`lora_trainer.workshop.Captioner`: ``(tag, score)`` pairs
    at or above ``threshold``, best first, ratings left out (the workshop formats and merges them)."""

    name = "deepbooru"
    label = "DeepBooru"

    def __init__(self, threshold: float = 0.5, *, include_ratings: bool = False) -> None:
        super().__init__()
        self.threshold = float(threshold)
        self.include_ratings = include_ratings

    def caption(self, image: Image.Image) -> list[tuple[str, float]]:
        return self._locked(lambda: deepbooru_tags(image, self.threshold, include_ratings=self.include_ratings))


class BlipCaptioner(_WebUICaptioner):
    """The WebUI's BLIP interrogator as a :class:`lora_trainer.workshop.Captioner` (a sentence)."""

    name = "blip"
    label = "BLIP"

    def caption(self, image: Image.Image) -> str:
        return self._locked(lambda: blip_caption(image))
