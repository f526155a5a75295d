"""Image sizes: the aspect-ratio bucket report, or resizing everything to one fixed size.

Bucket mode (:func:`bucket_report`) only reports: training does the bucketing, with the same
functions (:mod:`lora_trainer.data.buckets`), so the report is what training will do.

Fixed mode (:func:`resize_fixed`) writes ``width x height`` copies into the workspace: each
image is scaled (Lanczos) to cover the size, then cropped. The full-size image is moved to
``.workshop/originals/`` the first time, and every later resize starts again from it, so
trying another size or crop loses nothing. Crop modes:

* ``"center"``: the middle.
* ``"focal"``: automatic. On a greyscale thumbnail (longest side 128 px) the edge energy
  (|dx| + |dy|) is summed over every possible crop window along the axis being cropped, and the
  window with the most energy wins (ties: the one nearest the centre). Detail draws the crop;
  flat backgrounds do not. Simple and predictable, not face detection.
* ``"point"``: a point the user picked per image (``points``: image id -> (x, y) as fractions
  of the width and height, 0-1); the crop is centred on it as far as the image allows.
  Images without a point are centre-cropped.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from lora_trainer.data.buckets import BucketSettings, cover_size, plan_buckets
from lora_trainer.data.images import load_image_rgb
from lora_trainer.data.layout import is_workshop_image
from lora_trainer.errors import ConfigError, DatasetError
from lora_trainer.files.atomic_write import atomic_write_bytes
from lora_trainer.workshop.cleaning import probe
from lora_trainer.workshop.dedupe import HashCache
from lora_trainer.workshop.layout import (
    concept_folders,
    iter_images,
    rel_path,
    state_dir,
)
from lora_trainer.workshop.report import Report
from lora_trainer.workshop.resources import WORKSHOP_MAX_PIXELS

__all__ = [
    "CROP_MODES",
    "BucketInfo",
    "BucketPlanReport",
    "ResizeReport",
    "ResizedImage",
    "bucket_report",
    "crop_box",
    "focal_point",
    "resize_fixed",
]

CROP_MODES = ("center", "focal", "point")
_LANCZOS = Image.Resampling.LANCZOS


@dataclass
class BucketInfo:
    width: int
    height: int
    images: int
    images_with_repeats: int


@dataclass
class BucketPlanReport(Report):
    """buckets: the buckets in use; per_image: ``{"path", "size": [w, h], "bucket": [w, h],
    "upscaled"}``; too_small: images with a side below ``min_bucket_reso`` (strongly enlarged,
    blurry); upscaled: images enlarged to fill their bucket."""

    resolution: tuple[int, int] = (512, 512)
    images: int = 0
    buckets: list[BucketInfo] = field(default_factory=list)
    per_image: list[dict] = field(default_factory=list)
    too_small: list[str] = field(default_factory=list)
    upscaled: list[str] = field(default_factory=list)
    mean_ar_error: float = 0.0
    summary: list[str] = field(default_factory=list)


def _repeats_of(root: Path) -> dict[str, int]:
    return {f.name: r for f, r, _ in concept_folders(root)}


def bucket_report(
    root: Path,
    settings: BucketSettings,
    *,
    max_pixels: int | None = WORKSHOP_MAX_PIXELS,
) -> BucketPlanReport:
    """How training would bucket the workspace's images with ``settings``. Sizes come from the
    fingerprint cache or the file headers (EXIF rotation counted); nothing is decoded."""
    reps = _repeats_of(root)
    report = BucketPlanReport(resolution=settings.resolution)
    entries = []
    cache = HashCache(root)
    for path in iter_images(root):
        rel = rel_path(root, path)
        fp = cache.get(path)  # sizes clean() saw, while the file is unchanged
        if fp is not None:
            size = (fp.width, fp.height)
        else:
            try:
                size = probe(path, max_pixels)["upright_size"]
            except DatasetError as e:
                report.add("unreadable", rel, f"{e.args[0]} Run clean() first.", "error")
                continue
        entries.append((rel, size, reps.get(rel.split("/", 1)[0], 1)))
    assignments, plan = plan_buckets(entries, settings)
    report.images = len(entries)
    report.mean_ar_error = float(plan.mean_ar_error)
    report.buckets = [BucketInfo(w, h, plan.image_counts.get((w, h), 0), n) for (w, h), n in plan.counts.items()]
    report.per_image = [
        {"path": rel, "size": list(size), "bucket": list(a.bucket), "upscaled": a.upscaled}
        for (rel, size, _), a in zip(entries, assignments, strict=True)
    ]
    report.too_small = list(plan.too_small)
    report.upscaled = list(plan.upscaled)
    sizes = {rel: size for rel, size, _ in entries}
    for rel in plan.too_small:
        w, h = sizes[rel]
        report.add(
            "too_small",
            rel,
            f"{rel} is {w}x{h}, a side below {settings.min_bucket_reso} px: training enlarges it a lot (blurry). "
            "Replace it with a larger version or remove it.",
        )
    report.summary = plan.summary_lines()
    return report


# -- fixed size ------------------------------------------------------------------------------------


def focal_point(img: Image.Image, target: tuple[int, int]) -> tuple[float, float]:
    """(x, y), fractions of the image, of the centre of the ``target`` (w, h)-shaped crop window
    with the most edge energy (see the module doc)."""
    g = img.convert("L")
    scale = 128 / max(g.size)
    if scale < 1:
        g = g.resize((max(1, round(g.size[0] * scale)), max(1, round(g.size[1] * scale))), Image.Resampling.BOX)
    a = np.asarray(g, dtype=np.float32)
    energy = np.zeros_like(a)
    energy[:, 1:] += np.abs(np.diff(a, axis=1))
    energy[1:, :] += np.abs(np.diff(a, axis=0))
    th, tw = a.shape
    s = max(target[0] / tw, target[1] / th)  # thumbnail -> covering size
    win_w, win_h = min(tw, max(1, round(target[0] / s))), min(th, max(1, round(target[1] / s)))

    def best(profile: np.ndarray, win: int) -> float:
        n = profile.shape[0]
        if win >= n:
            return 0.5
        c = np.concatenate([[0.0], np.cumsum(profile, dtype=np.float64)])
        sums = c[win:] - c[:-win]  # window starting at 0 .. n - win
        centre = (n - win) / 2
        top = sums.max()
        candidates = np.nonzero(sums >= top - 1e-6 * max(top, 1.0))[0]
        start = int(candidates[np.argmin(np.abs(candidates - centre))])
        return (start + win / 2) / n

    return best(energy.sum(axis=0), win_w), best(energy.sum(axis=1), win_h)


def crop_box(
    resized: tuple[int, int], target: tuple[int, int], focus: tuple[float, float] = (0.5, 0.5)
) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the ``target`` window in an image of size ``resized``, centred
    on ``focus`` (fractions) as far as the edges allow."""
    rw, rh = resized
    tw, th = target
    left = min(max(round(focus[0] * rw - tw / 2), 0), rw - tw)
    top = min(max(round(focus[1] * rh - th / 2), 0), rh - th)
    return left, top, left + tw, top + th


@dataclass
class ResizedImage:
    """path: the image now; original: the full-size copy under ``.workshop/originals/``;
    original_size / size: (w, h) before and after; crop: (left, top, right, bottom) in the scaled
    image; focus: the (x, y) fractions the crop was centred on; upscaled: it was enlarged."""

    path: str
    original: str
    original_size: tuple[int, int]
    size: tuple[int, int]
    crop: tuple[int, int, int, int]
    focus: tuple[float, float]
    upscaled: bool


@dataclass
class ResizeReport(Report):
    """resized: one entry per image written; problems codes: too_small (not resized, upscale off),
    already_sized (left as it is), upscaled, no_point (centre used), unreadable."""

    width: int = 0
    height: int = 0
    crop: str = "center"
    resized: list[ResizedImage] = field(default_factory=list)
    skipped: int = 0


def _find_original(root: Path, image: Path) -> Path | None:
    """The full-size copy of ``image`` in ``.workshop/originals/`` (same folder, same stem)."""
    folder = state_dir(root, "originals", *image.relative_to(root).parent.parts)
    if not folder.is_dir():
        return None
    for name in os.listdir(folder):
        if os.path.splitext(name)[0] == image.stem and is_workshop_image(name):
            return folder / name
    return None


def _check_resize_args(width: int, height: int, crop: str) -> None:
    for name, v in (("width", width), ("height", height)):
        if int(v) != v or not 8 <= v <= 8192:
            raise ConfigError(f"workshop.resize.{name}", f"must be a whole number from 8 to 8192, got {v!r}")
    if crop not in CROP_MODES:
        raise ConfigError("workshop.resize.crop", f"must be one of {', '.join(CROP_MODES)}, not {crop!r}")


def _leave_as_is(
    rel: str, size: tuple[int, int], target: tuple[int, int], first: bool, upscale: bool, report: ResizeReport
) -> bool:
    """True (reported, skipped) when the image is not resized: already the size on a first
    resize, or smaller than it with upscaling off."""
    w, h = size
    if first and (w, h) == target:
        report.add("already_sized", rel, f"{rel} is already {w}x{h}; left as it is.", "info")
    elif not upscale and (w < target[0] or h < target[1]):
        report.add(
            "too_small",
            rel,
            f"{rel} is {w}x{h}, smaller than {target[0]}x{target[1]}; left as it is (upscaling is off).",
        )
    else:
        return False
    report.skipped += 1
    return True


def _report_loss(
    rel: str, size: tuple[int, int], resized: tuple[int, int], target: tuple[int, int], report: ResizeReport
) -> None:
    """Report an enlargement (a warning above 2x: blurry) and a crop that keeps less than half the image (a warning)."""
    w, h = size
    scale = resized[0] / w
    if scale > 2:
        report.add(
            "upscaled",
            rel,
            f"{rel} ({w}x{h}) was enlarged {scale:.1f}x to fit {target[0]}x{target[1]}: it will look blurry. "
            "Use a larger source image, or a smaller size.",
        )
    elif scale > 1:
        report.add("upscaled", rel, f"{rel} ({w}x{h}) was enlarged to fit {target[0]}x{target[1]}.", "info")
    kept = (target[0] * target[1]) / (resized[0] * resized[1])
    if kept < 0.5:
        report.add(
            "heavy_crop",
            rel,
            f"{rel} ({w}x{h}) was cropped to {target[0]}x{target[1]}, keeping only {kept:.0%} of it. "
            "Check the crop, pick a focal point, or use a size of closer shape.",
        )


def _focus(
    img: Image.Image,
    rel: str,
    crop: str,
    target: tuple[int, int],
    points: Mapping[str, tuple[float, float]],
    report: ResizeReport,
) -> tuple[float, float]:
    """The crop's focal point (x, y in 0..1) for crop mode ``crop``."""
    if crop == "focal":
        return focal_point(img, target)
    if crop != "point":
        return (0.5, 0.5)
    if rel in points:
        fx, fy = points[rel]
        return (min(max(float(fx), 0.0), 1.0), min(max(float(fy), 0.0), 1.0))
    report.add("no_point", rel, f"No focal point given for {rel}; cropped at the centre.", "info")
    return (0.5, 0.5)


def _save_resized(root: Path, path: Path, original: Path | None, out: Image.Image) -> tuple[Path, Path]:
    """Write ``out`` as the image's PNG; on a first resize, move the full-size image to
    ``.workshop/originals/`` first. Returns (new image path, original path)."""
    if original is None:  # first resize: keep the full-size image
        dest_dir = state_dir(root, "originals", *path.relative_to(root).parent.parts)
        dest_dir.mkdir(parents=True, exist_ok=True)
        original = dest_dir / path.name
        os.replace(path, original)
    buf = io.BytesIO()
    out.save(buf, "PNG", compress_level=4)
    new_path = path.with_suffix(".png")
    atomic_write_bytes(new_path, buf.getvalue(), durable=False)
    if new_path != path and path.exists():
        os.unlink(path)
    return new_path, original


def resize_fixed(
    root: Path,
    width: int,
    height: int,
    *,
    crop: str = "center",
    points: Mapping[str, tuple[float, float]] | None = None,
    upscale: bool = True,
    background: tuple[int, int, int] = (255, 255, 255),
    max_pixels: int | None = WORKSHOP_MAX_PIXELS,
    progress: Callable[[int, int], None] | None = None,
) -> ResizeReport:
    """Resize every image of the workspace to ``width`` x ``height`` (see the module doc).

    ``upscale=False`` leaves images smaller than the size (on either side) alone and reports them.
    Results are PNG (lossless), named like the image with a ``.png`` extension; captions stay.
    """
    _check_resize_args(width, height, crop)
    target = (int(width), int(height))
    points = dict(points or {})
    report = ResizeReport(width=target[0], height=target[1], crop=crop)
    images = iter_images(root)
    for n, path in enumerate(images):
        rel = rel_path(root, path)
        original = _find_original(root, path)
        source = original if original is not None else path
        try:
            img = load_image_rgb(source, background=background, max_pixels=max_pixels)
        except DatasetError as e:
            report.add("unreadable", rel, f"{e} Run clean() first.", "error")
            report.skipped += 1
            continue
        w, h = img.size
        if _leave_as_is(rel, (w, h), target, original is None, upscale, report):
            continue
        focus = _focus(img, rel, crop, target, points, report)
        resized = cover_size((w, h), target)
        box = crop_box(resized, target, focus)
        out = img.resize(resized, _LANCZOS) if resized != (w, h) else img
        out = out.crop(box) if resized != target else out
        upscaled = resized[0] > w or resized[1] > h
        _report_loss(rel, (w, h), resized, target, report)
        new_path, original = _save_resized(root, path, original, out)
        report.resized.append(
            ResizedImage(
                rel_path(root, new_path),
                rel_path(root, original),
                (w, h),
                target,
                box,
                (round(focus[0], 4), round(focus[1], 4)),
                upscaled,
            )
        )
        if progress is not None:
            progress(n + 1, len(images))
    return report
