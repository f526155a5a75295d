"""The training dataset: bucketed, seeded epochs and batch loading of scanned images.

The images come from :func:`lora_trainer.data.scan.scan_dataset` (the folder layout and its rules).

Batches (kohya's scheme): each image is put ``repeats`` times in its bucket; per epoch every
bucket is shuffled and cut into batches of ``batch_size`` (the last one may be short), and
the list of all batches is shuffled. Everything is seeded by (seed, epoch), so a resumed run
can call :meth:`TrainDataset.batches_for_epoch` and skip batches without decoding them.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence

import torch
from PIL import ImageOps

from lora_trainer.data.buckets import BucketAssignment, BucketSettings, Size, plan_buckets, sdxl_crop_top_left
from lora_trainer.data.cache import LatentCache, LatentRequest
from lora_trainer.data.images import (
    DEFAULT_MAX_PIXELS,
    cover_size,
    crop_offsets,
    load_image_rgb,
    pil_to_tensor,
    read_image_size,
    resize_and_crop,
)
from lora_trainer.data.scan import ImageItem
from lora_trainer.errors import ConfigError, DatasetError
from lora_trainer.log import logger, warning_once

__all__ = ["TrainDataset"]


# -- the training dataset --------------------------------------------------------------------


class TrainDataset(torch.utils.data.Dataset):
    """Bucketed, seeded batches of an item list; loads images lazily.

    Index it by batch (kohya's dataset does the same): ``len(ds)`` is batches per epoch,
    ``ds[i]`` the i-th batch of the epoch set by :meth:`set_epoch`. With a torch DataLoader
    use ``DataLoader(ds, batch_size=None, shuffle=False, num_workers=n)`` and call
    ``set_epoch`` before creating each epoch's iterator. :meth:`iter_epoch` does the same
    without a DataLoader.

    Each batch is a dict:

    * ``pixels``: (B, 3, H, W) float32 in [-1, 1], or, after :meth:`cache_latents`,
      ``latents``: (B, C, H/8, W/8) float32 (CPU tensors either way);
    * ``captions``: list of raw captions (caption processing is the loop's job);
    * ``original_sizes``: list of (height, width) of the source images;
    * ``crop_top_lefts``: list of SDXL crop conditioning (top, left), see :meth:`sdxl_crop`;
    * ``target_sizes``: list of (height, width), the bucket;
    * ``keys``: list of item keys; ``indices``: item indices; ``flipped``: list of bool;
    * ``bucket``: the bucket (width, height); ``epoch``, ``batch_index``: where it is.

    The three size lists map to :class:`lora_trainer.contracts.SizeCond` in order.
    Random choices (flip, random crop) are seeded by (seed, epoch, batch index, slot).
    """

    def __init__(
        self,
        items: Sequence[ImageItem],
        buckets: BucketSettings | None = None,
        *,
        batch_size: int = 1,
        flip_aug: bool = False,
        random_crop: bool = False,
        seed: int = 0,
        background: tuple[int, int, int] = (255, 255, 255),
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        image_sizes: Sequence[Size] | None = None,
    ):
        if not items:
            raise DatasetError("The dataset has no images; scan a folder with images first.")
        if int(batch_size) != batch_size or batch_size < 1:
            raise ConfigError("training.train_batch_size", f"must be a whole number of at least 1, got {batch_size!r}")
        self.items: list[ImageItem] = list(items)
        self.settings = buckets if buckets is not None else BucketSettings()
        self.batch_size = int(batch_size)
        self.flip_aug = bool(flip_aug)
        self.random_crop = bool(random_crop)
        self.seed = int(seed)
        self.background = (int(background[0]), int(background[1]), int(background[2]))
        self.max_pixels = max_pixels
        for it in self.items:
            if int(it.repeats) != it.repeats or it.repeats < 1:
                raise DatasetError(f"{it.path}: repeats must be at least 1, got {it.repeats!r}")
        if image_sizes is None:
            self.sizes: list[Size] = [read_image_size(it.path, max_pixels=max_pixels) for it in self.items]
        else:
            if len(image_sizes) != len(self.items):
                raise ValueError("image_sizes must have one (w, h) per item")
            self.sizes = [(int(w), int(h)) for w, h in image_sizes]
        self.assignments: list[BucketAssignment]
        self.assignments, self.bucket_report = plan_buckets(
            ((it.key, s, it.repeats) for it, s in zip(self.items, self.sizes, strict=True)), self.settings
        )
        members: dict[Size, list[int]] = {}
        for i, a in enumerate(self.assignments):
            members.setdefault(a.bucket, []).append(i)
        self._members = dict(sorted(members.items()))
        self._len = sum(
            math.ceil(sum(self.items[i].repeats for i in idx) / self.batch_size) for idx in self._members.values()
        )
        self._latents: list[tuple[torch.Tensor, torch.Tensor | None]] | None = None
        self._epoch = 0
        self._plan: tuple[int, list[list[int]]] | None = None
        for line in self.bucket_report.summary_lines():
            logger.info(line)

    # -- sizes and metadata

    @property
    def num_train_images(self) -> int:
        """Images times repeats (kohya's ``ss_num_train_images``)."""
        return sum(it.repeats for it in self.items)

    @property
    def buckets(self) -> list[Size]:
        """The buckets in use, sorted (w, h)."""
        return list(self._members)

    @property
    def latents_cached(self) -> bool:
        return self._latents is not None

    def __len__(self) -> int:
        return self._len

    # -- epoch plan

    def batches_for_epoch(self, epoch: int) -> list[list[int]]:
        """The epoch's batches as lists of item indices, in order; deterministic for (seed, epoch)."""
        if self._plan is not None and self._plan[0] == epoch:
            return [list(b) for b in self._plan[1]]
        rng = random.Random(f"lora_trainer.batches/{self.seed}/{int(epoch)}")
        batches: list[list[int]] = []
        bs = self.batch_size
        for idx in self._members.values():
            pool = [i for i in idx for _ in range(self.items[i].repeats)]
            rng.shuffle(pool)
            batches.extend(pool[k : k + bs] for k in range(0, len(pool), bs))
        rng.shuffle(batches)
        self._plan = (epoch, batches)
        return [list(b) for b in batches]

    def set_epoch(self, epoch: int) -> None:
        self._epoch = int(epoch)

    def __getitem__(self, batch_index: int) -> dict:
        plan = self.batches_for_epoch(self._epoch)
        if not -len(plan) <= batch_index < len(plan):
            raise IndexError(batch_index)
        batch_index %= len(plan)
        return self.load_batch(plan[batch_index], epoch=self._epoch, batch_index=batch_index)

    def iter_epoch(
        self, epoch: int, start_batch: int = 0, shard: Callable[[int], slice] | None = None
    ) -> Iterator[dict]:
        """Yield the epoch's batches from ``start_batch`` on (earlier ones are not loaded).

        ``shard(n)``: this process's part of a batch of ``n`` (data parallel training): only that part
        is loaded, each sample with the random choices it has in the whole batch; the batch also
        carries ``batch_size`` (the whole batch's) and ``batch_captions`` (all its captions). A
        process whose part is empty gets the batch without images (``indices`` empty, no tensors).
        """
        plan = self.batches_for_epoch(epoch)
        for b in range(start_batch, len(plan)):
            if shard is None:
                yield self.load_batch(plan[b], epoch=epoch, batch_index=b)
                continue
            part = shard(len(plan[b]))
            indices = plan[b][part]
            if indices:
                batch = self.load_batch(indices, epoch=epoch, batch_index=b, first_slot=part.start)
            else:
                batch = {"indices": [], "captions": [], "epoch": epoch, "batch_index": b}
            batch["batch_size"] = len(plan[b])
            batch["batch_captions"] = [self.items[i].caption for i in plan[b]]
            yield batch

    # -- loading

    def _sample_rng(self, epoch: int, batch_index: int, slot: int) -> random.Random:
        return random.Random(f"lora_trainer.sample/{self.seed}/{int(epoch)}/{int(batch_index)}/{int(slot)}")

    def _render(self, i: int, crop: str, rng: random.Random | None, flip: bool):
        """(pixels (3,H,W), (top, left), (orig h, orig w)) of item i in its bucket."""
        item, a = self.items[i], self.assignments[i]
        img = load_image_rgb(item.path, background=self.background, max_pixels=self.max_pixels)
        bw, bh = a.bucket
        if img.size == self.sizes[i]:
            resized = a.resized_size
        else:  # the file changed since the dataset was built: fit it into the same bucket
            warning_once(f"{item.path} changed size since the dataset was scanned; fitting it to {bw}x{bh}.")
            resized = cover_size(img.size, a.bucket)
        out, (top, left), original = resize_and_crop(img, bw, bh, crop, rng, resized_size=resized)
        if flip:
            out = ImageOps.mirror(out)
            left = resized[0] - bw - left
        return pil_to_tensor(out), (top, left), original

    def sdxl_crop(self, i: int, flip: bool, crop_top_left: Size) -> Size:
        """SDXL crop conditioning (top, left) of item ``i``; ``crop_top_left`` is the crop actually taken.

        Bucketed: kohya's value (:func:`sdxl_crop_top_left`, the same with random crop), so
        the LoRA is conditioned as kohya's. Fixed-size mode (bucketing off): the crop actually
        taken, mirrored when flipped; kohya does not resize there (it needs images of exactly
        the resolution and conditions on (0, 0)), while this mode scales and crops, so the real
        offset is the meaningful value.
        """
        if not self.settings.enable_bucket:
            return crop_top_left
        return sdxl_crop_top_left(self.sizes[i], self.assignments[i].bucket, flipped=flip)

    def load_batch(self, indices: Sequence[int], *, epoch: int = 0, batch_index: int = 0, first_slot: int = 0) -> dict:
        """Load the batch of item ``indices`` (all from one bucket); see the class doc for the dict.

        ``first_slot``: the first item's place in its batch when ``indices`` is a part of it (the
        random flip and crop are drawn per place)."""
        if not indices:
            raise ValueError("empty batch")
        bucket = self.assignments[indices[0]].bucket
        tensors, captions, originals, crops, flips = [], [], [], [], []
        for slot, i in enumerate(indices):
            a = self.assignments[i]
            if a.bucket != bucket:
                raise ValueError(f"batch mixes buckets {bucket} and {a.bucket}")
            rng = self._sample_rng(epoch, batch_index, first_slot + slot)
            flip = self.flip_aug and rng.random() < 0.5
            if self._latents is not None:
                plain, flipped = self._latents[i]
                tensors.append(flipped if flip and flipped is not None else plain)
                top, left = crop_offsets(a.resized_size, a.bucket)
                if flip:
                    left = a.resized_size[0] - a.bucket[0] - left
                w, h = self.sizes[i]
                original = (h, w)
            else:
                t, (top, left), original = self._render(i, "random" if self.random_crop else "center", rng, flip)
                tensors.append(t)
            captions.append(self.items[i].caption)
            originals.append(original)
            crops.append(self.sdxl_crop(i, flip, (top, left)))
            flips.append(flip)
        batch = {
            "captions": captions,
            "original_sizes": originals,
            "crop_top_lefts": crops,
            "target_sizes": [(bucket[1], bucket[0])] * len(indices),
            "keys": [self.items[i].key for i in indices],
            "indices": list(indices),
            "flipped": flips,
            "bucket": bucket,
            "epoch": epoch,
            "batch_index": batch_index,
        }
        batch["latents" if self._latents is not None else "pixels"] = torch.stack(tensors)
        return batch

    # -- latent caching

    def latent_requests(self) -> list[LatentRequest]:
        """The cache entries this dataset needs: each image in its bucket, plus mirrored with flip_aug."""
        variant = "bg={},{},{}".format(*self.background)
        reqs = []
        for it, a in zip(self.items, self.assignments, strict=True):
            reqs.append(LatentRequest(it.path, a.bucket, a.resized_size, "center", False, variant))
            if self.flip_aug:
                reqs.append(LatentRequest(it.path, a.bucket, a.resized_size, "center", True, variant))
        return reqs

    def cache_latents(
        self,
        cache: LatentCache,
        encode_fn: Callable[[torch.Tensor], torch.Tensor],
        *,
        vae_id: str,
        batch_size: int = 1,
        progress: Callable[[int, int], None] | None = None,
        upcast_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        """Encode (or load from ``cache``) every image's latents; batches then carry ``latents``.

        Latents are checked: NaN/inf ones are encoded again with ``upcast_fn`` (the VAE in float32);
        an image still not finite raises :class:`DatasetError` naming it (see ``LatentCache``).

        With flip_aug the mirrored images are cached too (twice the encoding work), so flip
        augmentation keeps working. Random crop cannot be cached: raises :class:`DatasetError`.
        """
        if self.random_crop:
            raise DatasetError(
                "Random crop cannot be combined with latent caching (the crop changes every epoch, as in "
                "kohya's sd-scripts). Turn off random crop or turn off latent caching."
            )
        reqs = self.latent_requests()
        step = 2 if self.flip_aug else 1
        owner = {r: n // step for n, r in enumerate(reqs)}  # equal requests render equal pixels

        def pixels_fn(req: LatentRequest) -> torch.Tensor:
            return self._render(owner[req], "center", None, req.flip)[0]

        latents = cache.get_or_encode(
            reqs,
            encode_fn,
            vae_id=vae_id,
            batch_size=batch_size,
            pixels_fn=pixels_fn,
            progress=progress,
            upcast_fn=upcast_fn,
        )
        if self.flip_aug:
            self._latents = [(latents[2 * i], latents[2 * i + 1]) for i in range(len(self.items))]
        else:
            self._latents = [(lat, None) for lat in latents]

    def drop_latents(self) -> None:
        """Forget cached latents; batches carry ``pixels`` again."""
        self._latents = None
