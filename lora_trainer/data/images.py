"""Image loading and the bucket resize/crop, shared by training and the dataset tools.

Conventions:

* Bucket and target sizes are ``(width, height)``, as kohya writes them.
* SDXL size conditioning values (``original_size``, ``crop_top_left``) are returned in
  SDXL/sgm order, ``(height, width)`` and ``(top, left)``, the order of
  :class:`lora_trainer.contracts.SizeCond`.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from lora_trainer.data.buckets import cover_size
from lora_trainer.errors import DatasetError
from lora_trainer.log import logger

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "CropResult",
    "check_image",
    "cover_size",
    "crop_offsets",
    "load_image_rgb",
    "pil_to_tensor",
    "read_image_size",
    "resize_and_crop",
]

# Images above this many pixels are refused (a decompression-bomb guard). 16384 x 16384 is
# far beyond any training image; Pillow's own limit (about 179 million pixels) also applies.
DEFAULT_MAX_PIXELS = 16384 * 16384

_EXIF_ORIENTATION = 0x0112
_RESAMPLE = Image.Resampling.LANCZOS

_FIX_HINT = "Open it in an image editor and save it again (as PNG or JPEG), or remove it from the dataset folder."


def _open(path: Path, max_pixels: int | None) -> Image.Image:
    try:
        img = Image.open(path)
    except FileNotFoundError:
        raise DatasetError(
            f"Image not found: {path}. It may have been moved or deleted; scan the dataset again."
        ) from None
    except Image.DecompressionBombError as e:
        raise DatasetError(
            f"Image {path} is too large to load safely ({e}). Scale it down with an image editor or remove it."
        ) from None
    except UnidentifiedImageError:
        raise DatasetError(f"Cannot read image {path}: the file is damaged or is not an image. {_FIX_HINT}") from None
    except OSError as e:
        raise DatasetError(f"Cannot read image {path}: {e}. {_FIX_HINT}") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        img.close()
        raise DatasetError(f"Image {path} has no pixels ({w}x{h}). {_FIX_HINT}")
    if max_pixels is not None and w * h > max_pixels:
        img.close()
        raise DatasetError(
            f"Image {path} is {w}x{h} = {w * h} pixels, above the limit of {max_pixels} pixels "
            "(a guard against decompression bombs). Scale it down with an image editor or remove it."
        )
    return img


def _orientation(img: Image.Image) -> int:
    if img.format == "PNG" and "exif" not in img.info:
        return 1  # Pillow would decode the whole PNG looking for a late eXIf chunk
    try:
        value = img.getexif().get(_EXIF_ORIENTATION, 1)
        return int(value)
    except Exception:  # noqa: BLE001 - broken EXIF blocks are common and fail in many ways; they must not stop training
        return 1


def read_image_size(path: str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) of the image as :func:`load_image_rgb` returns it (EXIF rotation applied).

    Reads only the header; raises :class:`DatasetError` for unreadable files.
    """
    path = Path(path)
    img = _open(path, max_pixels)
    try:
        w, h = img.size
        if _orientation(img) in (5, 6, 7, 8):  # rotated by 90 or 270 degrees
            w, h = h, w
        return w, h
    finally:
        img.close()


def _sixteen_bit_to_l(img: Image.Image) -> Image.Image:
    """Greyscale with more than 8 bits (I;16*, I, F) to 8-bit L, scaling instead of clipping."""
    arr = np.asarray(img)
    if img.mode == "F":
        arr = arr.astype(np.float64)
        peak = float(arr.max()) if arr.size else 0.0
        scale = 255.0 if peak <= 1.0 else 255.0 / 65535.0  # float images: [0, 1] or 16-bit range
        out = arr * scale
    else:
        # Pillow opens 16-bit PNGs as "I" and 16-bit TIFFs as "I;16": both hold 0..65535.
        out = arr.astype(np.float64) / 257.0
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "L")


def _to_rgb(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    mode = img.mode
    if mode in ("RGB", "L") and "transparency" in img.info:  # a transparent colour (PNG tRNS)
        img = img.convert("RGBA")
        mode = "RGBA"
    elif mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    elif mode in ("I", "F") or mode.startswith("I;16"):
        img = _sixteen_bit_to_l(img)
        mode = "L"
    elif mode == "PA":
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))  # pyright: ignore[reportArgumentType] (old Pillow stub)
        base.alpha_composite(rgba)
        return base.convert("RGB")
    return img.convert("RGB")


def load_image_rgb(
    path: str | os.PathLike,
    *,
    background: tuple[int, int, int] = (255, 255, 255),
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Load an image file as an 8-bit RGB PIL image, upright.

    * EXIF orientation is applied (phones store portraits sideways).
    * Transparency (RGBA, LA, P/L/RGB with a transparent colour) is composited onto
      ``background``; CMYK, 16-bit greyscale (scaled, not clipped), L and 1-bit become RGB.
    * Animated files give their first frame.
    * Images above ``max_pixels`` pixels (None = no limit of ours), damaged, truncated or
      non-image files raise :class:`DatasetError` naming the file and what to do about it.
    """
    path = Path(path)
    opened = img = _open(path, max_pixels)
    try:
        try:
            img.load()
            orientation = _orientation(img)
            if orientation != 1:
                try:
                    img = ImageOps.exif_transpose(img)
                except Exception as e:  # noqa: BLE001 - a bad EXIF block can fail in many ways: keep the pixels as stored
                    logger.warning("Could not apply the EXIF orientation of %s (%s); using it as stored.", path, e)
            rgb = _to_rgb(img, (int(background[0]), int(background[1]), int(background[2])))
            if rgb is opened:
                rgb = opened.copy()  # detach from the file handle closed below
            rgb.load()
        except Image.DecompressionBombError as e:
            raise DatasetError(
                f"Image {path} is too large to load safely ({e}). Scale it down with an image editor or remove it."
            ) from None
        except (OSError, SyntaxError, ValueError) as e:
            # Truncated files ("image file is truncated"), broken chunks, bad data streams.
            raise DatasetError(
                f"Cannot decode image {path}: {e}. The file is damaged or truncated. {_FIX_HINT}"
            ) from None
    finally:
        opened.close()
    return rgb


def check_image(path: str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> str | None:
    """Fully decode ``path``; return None when it loads, else the problem as a sentence."""
    try:
        load_image_rgb(path, max_pixels=max_pixels).close()
    except DatasetError as e:
        return str(e)
    return None


class CropResult(NamedTuple):
    """What :func:`resize_and_crop` returns.

    image: RGB PIL image of exactly the target size.
    crop_top_left: (top, left) of the crop, in pixels of the resized image (SDXL's crop coords).
    original_size: (height, width) of the input image (SDXL's original size).
    """

    image: Image.Image
    crop_top_left: tuple[int, int]
    original_size: tuple[int, int]


def crop_offsets(
    resized_size: tuple[int, int],
    target: tuple[int, int],
    crop: str = "center",
    rng: random.Random | None = None,
) -> tuple[int, int]:
    """(top, left) of a ``target`` (w, h) window inside ``resized_size`` (w, h)."""
    rw, rh = resized_size
    tw, th = target
    if rw < tw or rh < th:
        raise ValueError(f"resized size {resized_size} does not cover the target {target}")
    if crop == "center":
        return (rh - th) // 2, (rw - tw) // 2
    if crop == "random":
        rng = rng if rng is not None else random.Random()
        return rng.randint(0, rh - th), rng.randint(0, rw - tw)
    raise ValueError(f"crop must be 'center' or 'random', not {crop!r}")


def resize_and_crop(
    img: Image.Image,
    target_w: int,
    target_h: int,
    crop: str = "center",
    rng: random.Random | None = None,
    *,
    resized_size: tuple[int, int] | None = None,
) -> CropResult:
    """Scale ``img`` to cover (target_w, target_h), then crop to exactly that size.

    ``resized_size`` (w, h), when given, is the size to scale to before cropping (as a bucket
    assignment computes it; kohya's no-upscale buckets crop without resizing); it must cover
    the target. Otherwise the smallest covering size is used. Resampling is Lanczos
    (antialiased when shrinking). ``crop`` is "center" or "random" (``rng`` picks the offset).
    """
    if target_w <= 0 or target_h <= 0:
        raise ValueError(f"target size must be positive, got {target_w}x{target_h}")
    w, h = img.size
    target = (target_w, target_h)
    if resized_size is None:
        resized_size = cover_size((w, h), target)
    resized_size = (int(resized_size[0]), int(resized_size[1]))
    top, left = crop_offsets(resized_size, target, crop, rng)
    if resized_size != (w, h):
        img = img.resize(resized_size, _RESAMPLE)
    if resized_size != target:
        img = img.crop((left, top, left + target_w, top + target_h))
    return CropResult(img, (top, left), (h, w))


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image to a (3, H, W) float32 tensor in [-1, 1]."""
    arr = np.asarray(img.convert("RGB") if img.mode != "RGB" else img, dtype=np.uint8)
    t = torch.from_numpy(arr.copy()).permute(2, 0, 1).float()
    return t / 127.5 - 1.0
