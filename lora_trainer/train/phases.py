"""What each phase of a run needs on the device, and text-encoder outputs cached before the steps.

A run has three phases: latent caching (the VAE), caption encoding when the text-encoder outputs
are cached (the text encoders), and the steps (the UNet, plus the text encoders unless their
outputs are cached, plus the VAE unless latents are cached). The loop wraps each in
``contracts.placement``, which moves the parts for hosts that keep them in CPU memory (the
WebUI's --medvram/--lowvram) and does nothing otherwise.

:class:`TextOutputCache` is kohya's ``cache_text_encoder_outputs``: every caption the run will use
(with each of its SDXL size conditionings) is encoded once before the steps and kept in CPU
memory, so the text encoders are not needed during the steps (on a small card they never sit on
the GPU beside the UNet). A batch is put together from its captions' outputs the way the WebUI
encodes a batch: a caption with fewer 75-token chunks than the longest in the batch is padded
with the encoding of an empty chunk (``sd_hijack_clip``'s ``empty_chunk``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager as ContextManager
from typing import Any

import torch

from lora_trainer.config import TrainConfig
from lora_trainer.contracts import Conditioning, ModelAdapter, SizeCond, placement
from lora_trainer.data.dataset import TrainDataset
from lora_trainer.data.images import crop_offsets
from lora_trainer.log import logger, warning_once
from lora_trainer.text import WINDOW_LENGTH

__all__ = ["TextOutputCache", "cache_text_outputs", "caption_samples", "step_parts"]

Sample = tuple[str, SizeCond | None]
Encode = Callable[[list[str], list[SizeCond] | None], Conditioning]


def step_parts(cfg: TrainConfig) -> frozenset[str]:
    """The model parts the steps use: the UNet, the text encoders unless their outputs are cached,
    the VAE unless latents are cached."""
    parts = {"unet"}
    if not cfg.dataset.cache_text_encoder_outputs:
        parts.add("text_encoders")
    if not cfg.dataset.cache_latents:
        parts.add("vae")
    return frozenset(parts)


def caption_samples(dataset: TrainDataset, caption: Callable[[str], str], sdxl: bool) -> list[Sample]:
    """Every (caption, SDXL size conditioning) a run over ``dataset`` encodes, as its batches carry them.

    ``caption`` turns a file's caption into the trained one (trigger words; no shuffle or dropout,
    which cached outputs exclude). The size conditioning: original size (h, w), the crop
    conditioning of ``TrainDataset.sdxl_crop`` for the centre crop (and for a flipped copy), the
    bucket (h, w), as ``load_batch`` gives them.
    """
    samples: list[Sample] = []
    for i, item in enumerate(dataset.items):
        text = caption(item.caption)
        if not sdxl:
            samples.append((text, None))
            continue
        assignment = dataset.assignments[i]
        (rw, _), (bw, bh) = assignment.resized_size, assignment.bucket
        top, left = crop_offsets(assignment.resized_size, assignment.bucket)
        w, h = dataset.sizes[i]
        for flip in (False, True) if dataset.flip_aug else (False,):
            crop = dataset.sdxl_crop(i, flip, (top, rw - bw - left if flip else left))
            samples.append((text, SizeCond((h, w), crop, (bh, bw))))
    return samples


def cache_text_outputs(
    adapter: ModelAdapter,
    dataset: TrainDataset,
    *,
    caption: Callable[[str], str],
    clip_skip: int,
    max_token_length: int,
    autocast: Callable[[], ContextManager[Any]],
    status: Callable[[str], None],
    weighted_captions: bool = False,
) -> TextOutputCache:
    """A filled :class:`TextOutputCache` for a run over ``dataset``, the text encoders on the device
    meanwhile. ``caption``, ``clip_skip``, ``max_token_length``, ``autocast`` and ``weighted_captions``:
    the run's own."""

    def encode(captions: list[str], size_cond: list[SizeCond] | None) -> Conditioning:
        with autocast():
            return adapter.encode_text(
                captions,
                clip_skip=clip_skip,
                max_token_length=max_token_length,
                size_cond=size_cond,
                weighted_captions=weighted_captions,
            )

    def progress(done: int, total: int) -> None:
        status(f"Caching text encoder outputs {done}/{total}")

    cache = TextOutputCache(adapter, encode)
    with placement(adapter, ("text_encoders",)):
        cache.fill(caption_samples(dataset, caption, adapter.family == "sdxl"), progress)
    return cache


class TextOutputCache:
    """Text-encoder outputs of the run's captions, encoded once before the steps (see the module doc)."""

    def __init__(self, adapter: object, encode: Encode):
        """``encode(captions, size_cond)``: the run's own text encoding (clip skip, token length, autocast)."""
        self.adapter = adapter
        self.encode = encode
        self.outputs: dict[Sample, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.empty_chunk: torch.Tensor | None = None
        self.misses = 0

    def __len__(self) -> int:
        return len(self.outputs)

    def fill(self, samples: Sequence[Sample], progress: Callable[[int, int], None] | None = None) -> None:
        """Encode each distinct sample (the caller has the text encoders on the device)."""
        todo = [s for s in dict.fromkeys(samples) if s not in self.outputs]
        with torch.no_grad():
            for done, sample in enumerate(todo, 1):
                self._store(sample)
                if progress is not None:
                    progress(done, len(todo))
            if self.empty_chunk is None and todo:
                empty = self.encode([""], None if todo[0][1] is None else [todo[0][1]])
                self.empty_chunk = empty.context[0, :WINDOW_LENGTH].detach().cpu()
        logger.info("cached the text encoder outputs of %d caption(s)", len(self.outputs))

    def _store(self, sample: Sample) -> None:
        text, size = sample
        cond = self.encode([text], None if size is None else [size])
        vector = None if cond.vector is None else cond.vector[0].detach().cpu()
        self.outputs[sample] = (cond.context[0].detach().cpu(), vector)

    def batch(self, captions: Sequence[str], size_cond: Sequence[SizeCond] | None) -> Conditioning:
        """The batch's conditioning from the cache (in CPU memory; the loop moves it to the device).

        A sample the cache lacks (it should not happen) is encoded with the text encoders placed
        on the device for it, and kept."""
        sizes = list(size_cond) if size_cond is not None else [None] * len(captions)
        samples = list(zip(captions, sizes, strict=True))
        missing = [s for s in dict.fromkeys(samples) if s not in self.outputs]
        if missing:
            self.misses += len(missing)
            warning_once("a caption was not in the text encoder output cache; encoding it during the steps")
            with placement(self.adapter, ("text_encoders",)), torch.no_grad():
                for sample in missing:
                    self._store(sample)
        contexts = [self.outputs[s][0] for s in samples]
        width = max(c.shape[0] for c in contexts)
        context = torch.stack([self._pad(c, width) for c in contexts])
        vectors = [self.outputs[s][1] for s in samples]
        vector = None if vectors[0] is None else torch.stack([v for v in vectors if v is not None])
        return Conditioning(context, vector)

    def _pad(self, context: torch.Tensor, width: int) -> torch.Tensor:
        """``context`` padded to ``width`` tokens with empty chunks, as the WebUI pads a shorter caption."""
        if context.shape[0] == width:
            return context
        if self.empty_chunk is None:
            raise RuntimeError("the text encoder output cache was not filled")
        chunks = (width - context.shape[0]) // WINDOW_LENGTH
        return torch.cat([context, self.empty_chunk.to(context.dtype).repeat(chunks, 1)])
