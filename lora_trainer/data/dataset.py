"""The training dataset: folder scan (kohya layout), bucketed epochs and batch loading.

Layout (kohya's ``--train_data_dir``)::

    train_data_dir/
        10_mychar/          <- 10 repeats; "10_mychar" is the subset name (ss_tag_frequency key)
            img1.png
            img1.txt        <- caption (or img1.caption)
            more/img2.jpg   <- subfolders are scanned too
        3_background/ ...

Folders whose name does not start with ``<number>_`` are reported and skipped, as kohya
does. A folder with no such subfolders is taken as one flat subset with 1 repeat (scanned
recursively), which is friendlier for a plain folder of images.

Captions: ``<stem><caption_extension>`` beside the image; if absent, ``.txt`` or
``.caption`` (whichever was not asked for) so no caption file is silently ignored. The
first line is the caption (kohya's rule; read by
:func:`lora_trainer.data.captions.read_caption_file`). An image without a caption file
gets the folder's class tokens (``10_sks dog`` -> ``sks dog``), as kohya does, or "" in a
flat folder; it is listed in the scan report either way.

Batches (kohya's scheme): each image is put ``repeats`` times in its bucket; per epoch every
bucket is shuffled and cut into batches of ``batch_size`` (the last one may be short), and
the list of all batches is shuffled. Everything is seeded by (seed, epoch), so a resumed run
can call :meth:`TrainDataset.batches_for_epoch` and skip batches without decoding them.
"""

from __future__ import annotations

import math
import os
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import ImageOps

from lora_trainer.data.buckets import BucketAssignment, BucketSettings, Size, plan_buckets
from lora_trainer.data.cache import LatentCache, LatentRequest
from lora_trainer.data.captions import read_caption_file, tag_frequency_by_dir
from lora_trainer.data.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    cover_size,
    crop_offsets,
    is_image_file,
    load_image_rgb,
    pil_to_tensor,
    read_image_size,
    resize_and_crop,
)
from lora_trainer.errors import ConfigError, DatasetError
from lora_trainer.log import logger, warning_once

CAPTION_EXTENSIONS = (".txt", ".caption")
_SUBSET_RE = re.compile(r"^(\d+)_(.*)$", re.DOTALL)
_FILE_ATTRIBUTE_HIDDEN = 0x2


# -- scanning --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageItem:
    """One training image.

    path: the image file. caption: its raw caption. repeats: times per epoch.
    subset_name: the subset folder's name (kohya's ``ss_tag_frequency``/``ss_dataset_dirs`` key).
    key: a stable id, ``<subset_name>/<path relative to the subset folder>`` (posix); defaults
    to the path.
    """

    path: Path
    caption: str
    repeats: int
    subset_name: str
    key: str = ""

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))
        if not self.key:
            object.__setattr__(self, "key", self.path.as_posix())


@dataclass
class SubsetInfo:
    folder: Path
    repeats: int
    image_count: int = 0
    class_tokens: str | None = None


@dataclass
class ScanReport:
    """What :func:`scan_dataset` found besides the images.

    flat: True when the folder itself was the (1-repeat) subset.
    subsets: subset name -> :class:`SubsetInfo`.
    skipped_folders: (folder, reason) for folders left out.
    ignored_files: images directly in the root, left out because subset folders exist (kohya).
    hidden_files / empty_files: skipped images (hidden names or attributes; 0 bytes).
    missing_captions: images with no caption file. class_token_captions: those of them
        that got the folder's class tokens as caption.
    non_utf8_captions: caption files that were not UTF-8 (decoded with a fallback).
    multiline_captions: caption files with text after the first line (only the first line is used).
    other_files: count of files that are neither images nor captions.
    """

    root: Path
    flat: bool = False
    subsets: dict[str, SubsetInfo] = field(default_factory=dict)
    skipped_folders: list[tuple[Path, str]] = field(default_factory=list)
    ignored_files: list[Path] = field(default_factory=list)
    hidden_files: list[Path] = field(default_factory=list)
    empty_files: list[Path] = field(default_factory=list)
    missing_captions: list[Path] = field(default_factory=list)
    class_token_captions: list[Path] = field(default_factory=list)
    non_utf8_captions: list[Path] = field(default_factory=list)
    multiline_captions: list[Path] = field(default_factory=list)
    other_files: int = 0

    def warnings(self) -> list[str]:
        """One human-readable line per kind of problem."""
        out = []

        def some(paths) -> str:
            shown = ", ".join(str(p) for p in paths[:5])
            return shown + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")

        for folder, reason in self.skipped_folders:
            out.append(f"Skipped folder {folder}: {reason}")
        if self.ignored_files:
            out.append(
                f"{len(self.ignored_files)} image(s) directly in {self.root} are not used, because it has "
                f"'<repeats>_<name>' subfolders; move them into one: {some(self.ignored_files)}"
            )
        if self.hidden_files:
            out.append(f"Skipped {len(self.hidden_files)} hidden file(s)/folder(s): {some(self.hidden_files)}")
        if self.empty_files:
            out.append(f"Skipped {len(self.empty_files)} empty (0-byte) image file(s): {some(self.empty_files)}")
        if self.missing_captions:
            n_cls = len(self.class_token_captions)
            n_missing = len(self.missing_captions)
            if n_cls == n_missing:
                how = "they use their folder's name as caption"
            elif n_cls:
                how = f"{n_cls} use their folder's name as caption, the rest an empty caption"
            else:
                how = "they use an empty caption"
            out.append(
                f"No caption file for {len(self.missing_captions)} image(s) ({how}): {some(self.missing_captions)}"
            )
        if self.non_utf8_captions:
            out.append(
                f"{len(self.non_utf8_captions)} caption file(s) are not UTF-8 and were read with a fallback "
                f"encoding; check them and save as UTF-8: {some(self.non_utf8_captions)}"
            )
        if self.multiline_captions:
            out.append(
                f"{len(self.multiline_captions)} caption file(s) have several lines; only the first is used: "
                f"{some(self.multiline_captions)}"
            )
        return out


class ScanResult(list):
    """The list of :class:`ImageItem` that :func:`scan_dataset` returns, with its ``report``."""

    def __init__(self, items: Sequence[ImageItem], report: ScanReport):
        super().__init__(items)
        self.report = report


WORKSHOP_DIR = ".workshop"  # the dataset workshop's own state inside a workspace: skipped silently


def is_hidden_name(name: str) -> bool:
    """Dot-files, macOS resource forks (``__MACOSX``) and Windows ``Thumbs.db``/``desktop.ini``."""
    return name.startswith(".") or name == "__MACOSX" or name.lower() in ("thumbs.db", "desktop.ini")


def is_hidden_entry(entry: os.DirEntry) -> bool:
    """:func:`is_hidden_name`, or the Windows hidden attribute."""
    if is_hidden_name(entry.name):
        return True
    try:
        attrs = getattr(entry.stat(follow_symlinks=False), "st_file_attributes", 0)
    except OSError:
        return False
    return bool(attrs & _FILE_ATTRIBUTE_HIDDEN)


def _caption_flags(path: Path) -> tuple[bool, bool]:
    """(not UTF-8, several non-empty lines) of a caption file, for the scan report."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
        not_utf8 = False
    except UnicodeDecodeError:
        text = data.decode("latin-1")
        not_utf8 = True
    lines = text.splitlines()
    return not_utf8, any(line.strip() for line in lines[1:])


def _caption_candidates(caption_extension: str) -> list[str]:
    ext = caption_extension if caption_extension.startswith(".") else "." + caption_extension
    return [ext] + [e for e in CAPTION_EXTENSIONS if e != ext]


def _layout_help(root: Path) -> str:
    return (
        f"Put the images in subfolders named '<repeats>_<name>', for example {root / '10_mychar'} "
        "(10 repeats), with each caption in a .txt file of the same name beside its image, or put the "
        f"images directly in {root} (1 repeat). Image types: {' '.join(IMAGE_EXTENSIONS)}."
    )


def _walk_subset(
    folder: Path,
    name: str,
    repeats: int,
    class_tokens: str | None,
    caption_exts: list[str],
    report: ScanReport,
    out: list[ImageItem],
    skip: frozenset[Path] = frozenset(),
) -> int:
    """Add the images under ``folder`` (recursively, but not into ``skip``) to ``out``; return how many."""
    count = 0
    stack = [folder]
    visited: set[str] = set()
    while stack:
        current = stack.pop()
        real = os.path.realpath(current)
        if real in visited:  # a symlink loop or two links to one folder
            continue
        visited.add(real)
        try:
            entries = sorted(os.scandir(current), key=lambda e: e.name)
        except OSError as e:
            report.skipped_folders.append((current, f"cannot be read ({e})"))
            continue
        names = {e.name for e in entries}
        subdirs = []
        for entry in entries:
            path = Path(entry.path)
            if path in skip:
                continue
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                if entry.name == WORKSHOP_DIR:
                    continue
                if is_hidden_entry(entry):
                    report.hidden_files.append(path)
                else:
                    subdirs.append(path)
                continue
            if not is_image_file(entry.name):
                if os.path.splitext(entry.name)[1].lower() not in CAPTION_EXTENSIONS:
                    report.other_files += 1
                continue
            if is_hidden_entry(entry):
                report.hidden_files.append(path)
                continue
            try:
                size = entry.stat().st_size
            except OSError:
                size = 0
            if size == 0:
                report.empty_files.append(path)
                continue
            stem = os.path.splitext(entry.name)[0]
            caption = None
            for ext in caption_exts:
                if stem + ext in names:
                    caption_path = Path(current) / (stem + ext)
                    caption = read_caption_file(caption_path)  # kohya: the first line, stripped
                    try:
                        fallback, multi = _caption_flags(caption_path)
                    except OSError:
                        fallback = multi = False
                    if fallback:
                        report.non_utf8_captions.append(caption_path)
                    if multi:
                        report.multiline_captions.append(caption_path)
                    break
            if caption is None:
                report.missing_captions.append(path)
                if class_tokens:
                    caption = class_tokens
                    report.class_token_captions.append(path)
                else:
                    caption = ""
            rel = path.relative_to(folder).as_posix()
            out.append(ImageItem(path, caption, repeats, name, key=f"{name}/{rel}"))
            count += 1
        stack.extend(reversed(subdirs))  # depth-first, in name order
    return count


def scan_dataset(
    train_data_dir: str | os.PathLike,
    caption_extension: str = ".txt",
    *,
    class_tokens_for_missing: bool = True,
) -> ScanResult:
    """Find the training images of ``train_data_dir`` (see the module doc for the layout).

    Returns a list of :class:`ImageItem` (subsets in name order, files in path order) with a
    ``.report`` (:class:`ScanReport`); its warnings are also logged. With
    ``class_tokens_for_missing`` False, images without a caption file get "" instead of the
    folder's class tokens. Raises :class:`DatasetError` when the folder is missing or holds
    no usable image.
    """
    root = Path(train_data_dir)
    if not root.is_dir():
        raise DatasetError(f"Dataset folder {root} does not exist or is not a folder. {_layout_help(root)}")
    caption_exts = _caption_candidates(caption_extension)
    report = ScanReport(root=root)
    subset_dirs: list[tuple[Path, int, str, str]] = []
    other_dirs: list[Path] = []
    root_images: list[Path] = []
    try:
        root_entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as e:
        raise DatasetError(f"Cannot read the dataset folder {root}: {e}") from None
    for entry in root_entries:
        path = Path(entry.path)
        try:
            is_dir = entry.is_dir()
        except OSError:
            is_dir = False
        if is_hidden_entry(entry):
            if (is_dir and entry.name != WORKSHOP_DIR) or is_image_file(entry.name):
                report.hidden_files.append(path)
            continue
        if is_dir:
            m = _SUBSET_RE.match(entry.name)
            if m is None:
                other_dirs.append(path)
            elif int(m.group(1)) < 1:
                report.skipped_folders.append((path, "0 repeats; use a number of at least 1 before the '_'"))
            else:
                subset_dirs.append((path, int(m.group(1)), entry.name, m.group(2).strip()))
        elif is_image_file(entry.name):
            root_images.append(path)

    items: list[ImageItem] = []
    if subset_dirs:
        for d in other_dirs:
            report.skipped_folders.append(
                (d, f"its name does not start with a repeat count; rename it like '10_{d.name}' to use it")
            )
        report.ignored_files.extend(root_images)
        for folder, repeats, name, tokens in subset_dirs:
            info = SubsetInfo(folder, repeats, class_tokens=tokens or None)
            report.subsets[name] = info
            info.image_count = _walk_subset(
                folder, name, repeats, tokens if class_tokens_for_missing else None, caption_exts, report, items
            )
    elif root_images or other_dirs:
        report.flat = True
        name = root.resolve().name or "dataset"
        info = SubsetInfo(root, 1)
        report.subsets[name] = info
        # the root's hidden entries and skipped folders were reported above: leave them out
        skip = frozenset(report.hidden_files) | frozenset(p for p, _ in report.skipped_folders)
        info.image_count = _walk_subset(root, name, 1, None, caption_exts, report, items, skip)
        if info.image_count:
            logger.info(
                "%s has no '<repeats>_<name>' subfolders: using its %d image(s) (subfolders included) with 1 repeat.",
                root,
                info.image_count,
            )

    for line in report.warnings():
        logger.warning(line)
    if not items:
        found = []
        if report.skipped_folders:
            found.append("skipped folders: " + ", ".join(f"{p.name} ({r})" for p, r in report.skipped_folders[:5]))
        if report.empty_files or report.hidden_files:
            found.append(f"{len(report.empty_files)} empty and {len(report.hidden_files)} hidden file(s) skipped")
        extra = (" Found: " + "; ".join(found) + ".") if found else ""
        raise DatasetError(f"No training images found in {root}.{extra} {_layout_help(root)}")
    for info in report.subsets.values():
        if info.image_count == 0:
            logger.warning("Skipped folder %s: no images in it.", info.folder)
            report.skipped_folders.append((info.folder, "no images"))
    report.subsets = {n: i for n, i in report.subsets.items() if i.image_count > 0}
    return ScanResult(items, report)


def dataset_dirs_info(items: Sequence[ImageItem]) -> dict[str, dict[str, int]]:
    """kohya's ``ss_dataset_dirs`` value: {subset_name: {"n_repeats": N, "img_count": images}}."""
    out: dict[str, dict[str, int]] = {}
    for it in items:
        d = out.setdefault(it.subset_name, {"n_repeats": it.repeats, "img_count": 0})
        d["img_count"] += 1
    return out


def dataset_tag_frequency(items: Sequence[ImageItem]) -> dict[str, dict[str, int]]:
    """kohya's ``ss_tag_frequency`` value: {subset_name: {tag: count}} over the items' captions
    (lower-cased tags, once per image: repeats are not counted, as in kohya)."""
    by_dir: dict[str, list[str]] = {}
    for it in items:
        by_dir.setdefault(it.subset_name, []).append(it.caption)
    return tag_frequency_by_dir(by_dir)


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
    * ``crop_top_lefts``: list of (top, left) of the crop in the resized image (mirrored
      when flipped, as kohya does);
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

    def iter_epoch(self, epoch: int, start_batch: int = 0) -> Iterator[dict]:
        """Yield the epoch's batches from ``start_batch`` on (earlier ones are not loaded)."""
        plan = self.batches_for_epoch(epoch)
        for b in range(start_batch, len(plan)):
            yield self.load_batch(plan[b], epoch=epoch, batch_index=b)

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

    def load_batch(self, indices: Sequence[int], *, epoch: int = 0, batch_index: int = 0) -> dict:
        """Load the batch of item ``indices`` (all from one bucket); see the class doc for the dict."""
        if not indices:
            raise ValueError("empty batch")
        bucket = self.assignments[indices[0]].bucket
        tensors, captions, originals, crops, flips = [], [], [], [], []
        for slot, i in enumerate(indices):
            a = self.assignments[i]
            if a.bucket != bucket:
                raise ValueError(f"batch mixes buckets {bucket} and {a.bucket}")
            rng = self._sample_rng(epoch, batch_index, slot)
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
            crops.append((top, left))
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
    ) -> None:
        """Encode (or load from ``cache``) every image's latents; batches then carry ``latents``.

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
            reqs, encode_fn, vae_id=vae_id, batch_size=batch_size, pixels_fn=pixels_fn, progress=progress
        )
        if self.flip_aug:
            self._latents = [(latents[2 * i], latents[2 * i + 1]) for i in range(len(self.items))]
        else:
            self._latents = [(lat, None) for lat in latents]

    def drop_latents(self) -> None:
        """Forget cached latents; batches carry ``pixels`` again."""
        self._latents = None
