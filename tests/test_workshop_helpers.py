"""Image and file makers shared by the workshop tests, and a check that they make what they claim
(the cleaning tests are only as good as these files)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def pattern(size=(96, 64), seed=0) -> Image.Image:
    """A smooth random colour field (distinct per seed; structured, so perceptual hashes differ)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), "RGB")
    return small.resize(size, Image.Resampling.BICUBIC)


def save(img: Image.Image, path: Path, fmt: str | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt, **kw)
    return path


def exif_rotated_jpeg(path: Path, orientation: int = 6) -> Path:
    """A 40x20 JPEG stored landscape (left red, right blue) with an EXIF orientation tag."""
    img = Image.new("RGB", (40, 20), BLUE)
    img.paste(RED, (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return save(img, path, "JPEG", exif=exif.tobytes(), quality=95)


def animated_gif(path: Path) -> Path:
    frames = [Image.new("RGB", (32, 32), c).convert("P") for c in (RED, BLUE, GREEN)]
    return save(frames[0], path, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def png16(path: Path, value: int = 65535 // 2) -> Path:
    arr = np.full((24, 32), value, dtype=np.uint16)
    return save(Image.fromarray(arr, "I;16"), path, "PNG")


def cmyk_jpeg(path: Path) -> Path:
    return save(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), path, "JPEG", quality=95)  # red


def palette_transparent_png(path: Path) -> Path:
    img = Image.new("P", (32, 32), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.paste(1, (16, 0, 32, 32))  # right half red, left half index 0 (transparent)
    return save(img, path, "PNG", transparency=0)


def truncated(path: Path, fmt: str = "PNG", size=(128, 128)) -> Path:
    buf = io.BytesIO()
    pattern(size, seed=7).save(buf, fmt)
    data = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 2])
    return path


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` (a decompression bomb's signature)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body)
    return path


def every_format(folder: Path) -> dict[str, Path]:
    """One file per format/mode the cleaner must handle."""
    f = folder
    la = Image.new("LA", (32, 32), (100, 0))
    la.paste((100, 255), (16, 0, 32, 32))
    rgba = Image.new("RGBA", (32, 32), (0, 0, 255, 0))
    rgba.paste((255, 0, 0, 255), (16, 0, 32, 32))
    return {
        "rgb_png": save(pattern(seed=1), f / "rgb.png"),
        "rgb_jpeg": save(pattern(seed=2), f / "rgbj.jpg", quality=90),
        "rgba_png": save(rgba, f / "rgba.png"),
        "la_png": save(la, f / "la.png"),
        "palette_png": palette_transparent_png(f / "palette.png"),
        "gray_png": save(Image.new("L", (32, 32), 77), f / "gray.png"),
        "bilevel_png": save(Image.new("1", (32, 32), 1), f / "bilevel.png"),
        "png16": png16(f / "deep.png"),
        "cmyk_jpeg": cmyk_jpeg(f / "cmyk.jpg"),
        "gray_jpeg": save(Image.new("L", (32, 32), 200), f / "grayj.jpg"),
        "webp": save(pattern(seed=3), f / "web.webp", "WEBP", lossless=True),
        "gif": animated_gif(f / "anim.gif"),
        "bmp": save(pattern(seed=4), f / "bitmap.bmp"),
        "tiff": save(pattern(seed=5), f / "scan.tiff"),
        "exif_jpeg": exif_rotated_jpeg(f / "phone.jpg"),
    }


EXPECTED_MODES = {
    "rgb_png": ("PNG", "RGB"),
    "rgb_jpeg": ("JPEG", "RGB"),
    "rgba_png": ("PNG", "RGBA"),
    "la_png": ("PNG", "LA"),
    "palette_png": ("PNG", "P"),
    "gray_png": ("PNG", "L"),
    "bilevel_png": ("PNG", "1"),
    "png16": ("PNG", "I"),
    "cmyk_jpeg": ("JPEG", "CMYK"),
    "gray_jpeg": ("JPEG", "L"),
    "webp": ("WEBP", "RGB"),
    "gif": ("GIF", "P"),
    "bmp": ("BMP", "RGB"),
    "tiff": ("TIFF", "RGB"),
    "exif_jpeg": ("JPEG", "RGB"),
}


def test_makers_make_what_they_claim(tmp_path):
    files = every_format(tmp_path)
    assert set(files) == set(EXPECTED_MODES)
    for kind, path in files.items():
        with Image.open(path) as img:
            assert (img.format, img.mode) == EXPECTED_MODES[kind], kind
            if kind == "gif":
                assert img.n_frames == 3
            if kind == "palette_png":
                assert "transparency" in img.info
            if kind == "exif_jpeg":
                assert img.getexif().get(0x0112) == 6
    with pytest.raises(OSError), Image.open(truncated(tmp_path / "t.png")) as img:
        img.load()
    with pytest.raises(Image.DecompressionBombError):
        Image.open(png_header_only(tmp_path / "bomb.png", 30000, 30000))
