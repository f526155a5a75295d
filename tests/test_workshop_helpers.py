"""The image makers in tests/fixtures/images.py make what they claim."""

from __future__ import annotations

import pytest
from PIL import Image

from tests.fixtures.images import every_format, png_header_only, truncated

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
    with pytest.raises(OSError, match=r"image file is truncated"), Image.open(truncated(tmp_path / "t.png")) as img:
        img.load()
    with pytest.raises(Image.DecompressionBombError):
        Image.open(png_header_only(tmp_path / "bomb.png", 30000, 30000))
