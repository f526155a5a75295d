"""Aspect-ratio buckets, as kohya's sd-scripts make and assign them.

Sizes here are ``(width, height)`` in pixels, kohya's order.

* :func:`make_buckets` lists the bucket resolutions (kohya's ``make_bucket_resolutions``).
* :func:`assign_bucket` picks an image's bucket and the size it is resized to before the
  crop (kohya's ``BucketManager.select_bucket``), :func:`assign_fixed` the same for the
  fixed-size mode (bucketing off: every image is centre-cropped to one size).
* :class:`BucketSettings` bundles the options; :func:`plan_buckets` assigns a whole dataset
  and returns a :class:`BucketReport` (counts, upscaled and too-small images, and the
  ``ss_bucket_info`` metadata value).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from lora_trainer.errors import ConfigError

Size = tuple[int, int]


def _check_positive(name: str, value: int) -> None:
    if int(value) != value or value <= 0:
        raise ConfigError(name, f"must be a positive whole number, got {value!r}")


def make_buckets(
    max_reso: Size = (512, 512),
    min_size: int = 256,
    max_size: int = 1024,
    step: int = 64,
) -> list[Size]:
    """Bucket resolutions for a training resolution ``max_reso`` (w, h), kohya's way.

    Every bucket has width * height <= max_reso's area, both sides multiples of ``step``,
    and (but for the square bucket, always included) both sides within [min_size, max_size].
    Sorted by (width, height).
    """
    for name, value in (
        ("dataset.resolution", max_reso[0]),
        ("dataset.resolution", max_reso[1]),
        ("dataset.min_bucket_reso", min_size),
        ("dataset.max_bucket_reso", max_size),
        ("dataset.bucket_reso_steps", step),
    ):
        _check_positive(name, value)
    if min_size > max_size:
        raise ConfigError(
            "dataset.min_bucket_reso", f"min_bucket_reso ({min_size}) is above max_bucket_reso ({max_size})"
        )
    max_area = max_reso[0] * max_reso[1]
    side = int(math.sqrt(max_area) // step) * step
    if side < step:
        raise ConfigError("dataset.resolution", f"resolution {max_reso} is smaller than one bucket step ({step})")
    resos: set[Size] = {(side, side)}
    cap = max_size - max_size % step
    width = min_size
    while width <= max_size:
        height = min(cap, int((max_area // width) // step) * step)
        if height >= min_size and width % step == 0:
            resos.add((width, height))
            resos.add((height, width))
        width += step
    return sorted(resos)


@dataclass(frozen=True)
class BucketAssignment:
    """Where one image goes.

    bucket: the (w, h) it is trained at.
    resized_size: the (w, h) it is scaled to before the crop (covers ``bucket``).
    ar_error: bucket aspect ratio minus image aspect ratio (kohya's ``ar_error``).
    upscaled: True when the image is enlarged (resized_size larger than the image).
    """

    bucket: Size
    resized_size: Size
    ar_error: float
    upscaled: bool


def _round_to_step(x: float, step: int) -> int:
    x = int(x + 0.5)
    return x - x % step


def cover_size(image_size: Size, bucket: Size) -> Size:
    """(w, h) of ``image_size`` scaled, aspect kept, to the smallest size covering ``bucket`` (w, h)."""
    w, h = image_size
    bw, bh = bucket
    if w * bh > bw * h:  # image wider than the bucket: match heights
        scale = bh / h
    else:
        scale = bw / w
    return max(bw, int(w * scale + 0.5)), max(bh, int(h * scale + 0.5))


def _finish(image_size: Size, bucket: Size, resized: Size) -> BucketAssignment:
    w, h = image_size
    return BucketAssignment(
        bucket=bucket,
        resized_size=resized,
        ar_error=bucket[0] / bucket[1] - w / h,
        upscaled=resized[0] > w or resized[1] > h,
    )


def assign_bucket(
    image_size: Size,
    buckets: Sequence[Size],
    no_upscale: bool = False,
    *,
    max_area: int | None = None,
    step: int = 64,
) -> BucketAssignment:
    """Pick the bucket for an image of ``image_size`` (w, h).

    Default: the bucket with the closest aspect ratio (an exact size match wins; ties go to
    the first in ``buckets``), the image scaled to cover it, then cropped.

    ``no_upscale`` (kohya ``--bucket_no_upscale``): ``buckets`` is not used. An image larger
    than ``max_area`` is first scaled down (aspect kept) to about ``max_area``; the bucket is
    its size rounded down to ``step`` on each side, so the image is cropped, never enlarged.
    An image narrower than one ``step`` still gets a one-step side (and is enlarged).
    """
    w, h = int(image_size[0]), int(image_size[1])
    if w <= 0 or h <= 0:
        raise ValueError(f"image size must be positive, got {image_size}")
    aspect = w / h
    if not no_upscale:
        if not buckets:
            raise ValueError("no buckets to choose from")
        if (w, h) in buckets:
            bucket = (w, h)
        else:
            bucket = min(buckets, key=lambda b: abs(b[0] / b[1] - aspect))
        bucket = (int(bucket[0]), int(bucket[1]))
        return _finish((w, h), bucket, cover_size((w, h), bucket))

    if max_area is None:
        raise ValueError("no_upscale needs max_area (the resolution's width * height)")
    if w * h > max_area:
        rw = math.sqrt(max_area * aspect)
        rh = max_area / rw
        # round one side to the step and derive the other: keep whichever is closer in aspect
        bw_r = _round_to_step(rw, step)
        bh_from_w = _round_to_step(bw_r / aspect, step)
        bh_r = _round_to_step(rh, step)
        bw_from_h = _round_to_step(bh_r * aspect, step)
        ar_w = bw_r / bh_from_w if bh_from_w else math.inf
        ar_h = bw_from_h / bh_r if bh_r else math.inf
        if abs(ar_w - aspect) < abs(ar_h - aspect):
            resized = (bw_r, int(bw_r / aspect + 0.5))
        else:
            resized = (int(bh_r * aspect + 0.5), bh_r)
    else:
        resized = (w, h)
    bucket = (max(step, resized[0] - resized[0] % step), max(step, resized[1] - resized[1] % step))
    if resized[0] < bucket[0] or resized[1] < bucket[1]:  # tiny image: cover the one-step bucket
        resized = cover_size((w, h), bucket)
    return _finish((w, h), bucket, resized)


def assign_fixed(image_size: Size, target: Size) -> BucketAssignment:
    """Fixed-size mode (bucketing off): scale to cover ``target`` (w, h), centre-crop to it."""
    w, h = int(image_size[0]), int(image_size[1])
    if w <= 0 or h <= 0:
        raise ValueError(f"image size must be positive, got {image_size}")
    target = (int(target[0]), int(target[1]))
    return _finish((w, h), target, cover_size((w, h), target))


def sdxl_crop_top_left(image_size: Size, bucket: Size, *, flipped: bool = False) -> Size:
    """SDXL ``crop_coords_top_left`` (top, left) for an image of ``image_size`` (w, h) trained in ``bucket`` (w, h).

    kohya's value (``BucketManager.get_crop_ltrb``), so a LoRA is conditioned as kohya's would be:
    the image is fitted *inside* the bucket, aspect kept, and the conditioning is the margin
    left on the top and on the left, halved and floored (0 on the side that fits). For a
    mirrored copy the left is the margin on the right (bucket width minus the fitted image's
    right edge). These are not the pixel offsets of the crop actually taken from the covering
    resize (those are on the other axis: a 1000x1500 image in an 832x1216 bucket is cropped
    16 px from the top, while kohya and this function give (0, 10)). Values truncate to ints,
    as kohya's ``int()`` does.
    """
    w, h = image_size
    bw, bh = bucket
    image_ar = w / h
    if bw / bh > image_ar:  # bucket wider than the image: the fitted image spans the height
        fit_w, fit_h = bh * image_ar, float(bh)
    else:
        fit_w, fit_h = float(bw), bw / image_ar
    left = (bw - fit_w) // 2
    top = (bh - fit_h) // 2
    if flipped:
        left = bw - (left + fit_w)
    return int(top), int(left)


@dataclass(frozen=True)
class BucketSettings:
    """kohya's bucket options. ``resolution`` is (w, h); with ``enable_bucket`` False every
    image is scaled and centre-cropped to exactly ``resolution``."""

    resolution: Size = (512, 512)
    enable_bucket: bool = True
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False

    def __post_init__(self):
        res = self.resolution
        if isinstance(res, int):
            res = (res, res)
        object.__setattr__(self, "resolution", (int(res[0]), int(res[1])))
        _check_positive("dataset.resolution", self.resolution[0])
        _check_positive("dataset.resolution", self.resolution[1])
        if self.enable_bucket:
            _check_positive("dataset.bucket_reso_steps", self.bucket_reso_steps)
            _check_positive("dataset.min_bucket_reso", self.min_bucket_reso)
            _check_positive("dataset.max_bucket_reso", self.max_bucket_reso)
            if self.min_bucket_reso > self.max_bucket_reso:
                raise ConfigError(
                    "dataset.min_bucket_reso",
                    f"min_bucket_reso ({self.min_bucket_reso}) is above max_bucket_reso ({self.max_bucket_reso})",
                )

    @property
    def max_area(self) -> int:
        return self.resolution[0] * self.resolution[1]

    def buckets(self) -> list[Size]:
        """The predefined buckets ([resolution] in fixed-size mode, [] with no_upscale)."""
        if not self.enable_bucket:
            return [self.resolution]
        if self.bucket_no_upscale:
            return []
        return make_buckets(self.resolution, self.min_bucket_reso, self.max_bucket_reso, self.bucket_reso_steps)

    def assigner(self):
        """A function image_size -> BucketAssignment for these settings."""
        if not self.enable_bucket:
            target = self.resolution
            return lambda size: assign_fixed(size, target)
        if self.bucket_no_upscale:
            area, step = self.max_area, self.bucket_reso_steps
            return lambda size: assign_bucket(size, (), True, max_area=area, step=step)
        buckets = self.buckets()
        return lambda size: assign_bucket(size, buckets)

    def assign(self, image_size: Size) -> BucketAssignment:
        return self.assigner()(image_size)


@dataclass
class BucketReport:
    """How a dataset spread over the buckets.

    counts: bucket (w, h) -> images including repeats (kohya's per-bucket count), sorted.
    image_counts: bucket -> distinct images.
    upscaled: keys of images enlarged to fill their bucket (blurrier training data).
    too_small: keys of images with a side below ``min_size`` (min_bucket_reso): strongly
        enlarged; consider removing or replacing them.
    mean_ar_error: mean |bucket aspect - image aspect| over distinct images.
    """

    enable_bucket: bool
    min_size: int
    counts: dict[Size, int] = field(default_factory=dict)
    image_counts: dict[Size, int] = field(default_factory=dict)
    upscaled: list[str] = field(default_factory=list)
    too_small: list[str] = field(default_factory=list)
    mean_ar_error: float = 0.0
    bucket_ids: dict[Size, int] = field(default_factory=dict)  # kohya's bucket numbers (ss_bucket_info keys)

    def to_metadata(self) -> dict | None:
        """kohya's ``ss_bucket_info`` value (before json.dumps); None in fixed-size mode, as kohya."""
        if not self.enable_bucket:
            return None
        return {
            "buckets": {
                str(self.bucket_ids.get((w, h), i)): {"resolution": [w, h], "count": n}
                for i, ((w, h), n) in enumerate(self.counts.items())
            },
            "mean_img_ar_error": float(self.mean_ar_error),
        }

    def summary_lines(self) -> list[str]:
        """Human-readable lines for a log or the UI."""
        lines = [
            f"bucket {w}x{h}: {n} images (with repeats), {self.image_counts.get((w, h), 0)} distinct"
            for (w, h), n in self.counts.items()
        ]
        if self.enable_bucket:
            lines.append(f"mean aspect-ratio error: {self.mean_ar_error:.4f}")
        if self.upscaled:
            lines.append(f"{len(self.upscaled)} image(s) are smaller than their bucket and will be enlarged")
        if self.too_small:
            lines.append(
                f"{len(self.too_small)} image(s) have a side below {self.min_size} px; they will be strongly "
                "enlarged (blurry). Consider replacing them: "
                + ", ".join(self.too_small[:5])
                + (" ..." if len(self.too_small) > 5 else "")
            )
        return lines


def plan_buckets(
    entries: Iterable[tuple[str, Size, int]],
    settings: BucketSettings,
) -> tuple[list[BucketAssignment], BucketReport]:
    """Assign every ``(key, image_size (w, h), repeats)``; return the assignments in order and the report."""
    assign = settings.assigner()
    # "Too small": below the smallest bucket side, or in fixed-size mode enlarged more than twice.
    min_size = settings.min_bucket_reso if settings.enable_bucket else min(settings.resolution) // 2
    report = BucketReport(enable_bucket=settings.enable_bucket, min_size=min_size)
    assignments: list[BucketAssignment] = []
    counts: dict[Size, int] = {}
    image_counts: dict[Size, int] = {}
    errors: list[float] = []
    for key, size, repeats in entries:
        a = assign(size)
        assignments.append(a)
        counts[a.bucket] = counts.get(a.bucket, 0) + int(repeats)
        image_counts[a.bucket] = image_counts.get(a.bucket, 0) + 1
        errors.append(abs(a.ar_error))
        if a.upscaled:
            report.upscaled.append(key)
        if min(size) < min_size:
            report.too_small.append(key)
    report.counts = dict(sorted(counts.items()))
    report.image_counts = dict(sorted(image_counts.items()))
    report.mean_ar_error = sum(errors) / len(errors) if errors else 0.0
    # kohya numbers buckets by their place among all (predefined and used) resolutions
    report.bucket_ids = {b: i for i, b in enumerate(sorted(set(settings.buckets()) | set(counts)))}
    return assignments, report
