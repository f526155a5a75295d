"""clean(): every format and colour mode to upright 8-bit RGB; broken files set aside, never fatal."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from lora_trainer.workshop import Workspace
from tests.fixtures.files import tree_hashes
from tests.fixtures.images import (
    every_format,
    pattern,
    png_header_only,
    save,
    truncated,
)

GREEN_BG = (0, 255, 0)


@pytest.fixture
def cleaned(tmp_path):
    src = tmp_path / "src"
    every_format(src)
    before = tree_hashes(src)
    ws = Workspace.create(tmp_path / "w", "ds")
    ws.import_folder(src, concept="c")
    originals = {p.name: p.read_bytes() for p in (ws.path / "1_c").iterdir()}
    report = ws.clean(background=GREEN_BG)
    assert tree_hashes(src) == before
    return ws, report, originals


def px(ws, name, xy):
    with Image.open(ws.path / "1_c" / name) as img:
        assert img.mode == "RGB", name
        return img.getpixel(xy)


def close(a, b, tol=12):
    return all(abs(int(x) - int(y)) <= tol for x, y in zip(a, b, strict=True))


def test_every_image_ends_up_rgb_png_or_jpeg(cleaned):
    ws, report, _ = cleaned
    names = sorted(p.name for p in (ws.path / "1_c").iterdir())
    for n in names:
        with Image.open(ws.path / "1_c" / n) as img:
            assert img.mode == "RGB", n
            assert (img.format, n.rsplit(".", 1)[1]) in (("PNG", "png"), ("JPEG", "jpg")), n
            assert img.getexif().get(0x0112, 1) == 1
    assert report.quarantined == 0
    assert report.kept + report.converted == 15
    json.dumps(report.to_dict())


def test_rgb_png_and_jpeg_are_kept_byte_for_byte(cleaned):
    ws, report, originals = cleaned
    kept = {f.path for f in report.files if f.action == "kept"}
    assert kept == {"1_c/rgb.png", "1_c/rgbj.jpg"}
    assert (ws.path / "1_c/rgbj.jpg").read_bytes() == originals["rgbj.jpg"]  # no JPEG recompression
    assert (ws.path / "1_c/rgb.png").read_bytes() == originals["rgb.png"]


def test_conversions(cleaned):
    ws, report, _ = cleaned
    by_original = {f.original: f for f in report.files}
    for name in ("web.webp", "anim.gif", "bitmap.bmp", "scan.tiff"):
        f = by_original[f"1_c/{name}"]
        assert f.action == "converted"
        assert f.path == f"1_c/{name.rsplit('.', 1)[0]}.png"
        assert not (ws.path / "1_c" / name).exists()
    # transparency goes onto the chosen colour
    assert close(px(ws, "rgba.png", (2, 2)), GREEN_BG)
    assert close(px(ws, "rgba.png", (30, 2)), (255, 0, 0))
    assert close(px(ws, "palette.png", (2, 2)), GREEN_BG)
    assert close(px(ws, "palette.png", (30, 2)), (255, 0, 0))
    assert close(px(ws, "la.png", (2, 2)), GREEN_BG)
    assert close(px(ws, "la.png", (30, 2)), (100, 100, 100))
    assert close(px(ws, "gray.png", (5, 5)), (77, 77, 77))
    assert close(px(ws, "bilevel.png", (5, 5)), (255, 255, 255))
    assert close(px(ws, "deep.png", (5, 5)), (127, 127, 127), 2)  # 16-bit scaled, not clipped to 255
    assert close(px(ws, "cmyk.png", (5, 5)), (255, 0, 0), 30)
    assert close(px(ws, "grayj.png", (5, 5)), (200, 200, 200), 3)
    assert close(px(ws, "anim.png", (5, 5)), (255, 0, 0), 8)  # first frame
    changes = by_original["1_c/anim.gif"].changes
    assert any("first of 3 frames" in c for c in changes)
    assert any("16-bit" in c for c in by_original["1_c/deep.png"].changes)
    assert any("CMYK" in c for c in by_original["1_c/cmyk.jpg"].changes)


def test_exif_orientation_is_applied(cleaned):
    ws, report, _ = cleaned
    f = next(f for f in report.files if f.original == "1_c/phone.jpg")
    assert f.path == "1_c/phone.png"
    assert any("EXIF orientation 6" in c for c in f.changes)
    with Image.open(ws.path / f.path) as img:
        assert img.size == (20, 40)  # stored 40x20 landscape, shown portrait
        assert close(img.getpixel((10, 5)), (255, 0, 0), 40)  # the red left half is now on top
        assert close(img.getpixel((10, 35)), (0, 0, 255), 40)


def test_broken_files_are_quarantined_with_captions(tmp_path):
    ws = Workspace.create(tmp_path / "w", "ds")
    d = ws.path / "1_c"
    save(pattern((32, 32), seed=1), d / "good.png")
    truncated(d / "cut.png", size=(64, 64))
    truncated(d / "cut.jpg", "JPEG", size=(64, 64))
    (d / "cut.txt").write_text("caption of cut", encoding="utf-8")
    (d / "zero.png").write_bytes(b"")
    (d / "text.png").write_text("not an image", encoding="utf-8")
    png_header_only(d / "bomb.png", 30000, 30000)
    save(pattern((128, 128), seed=2), d / "toolarge.png")
    report = ws.clean(max_pixels=100 * 100)
    assert report.kept == 1
    assert report.quarantined == 6
    codes = {p.path: p.code for p in report.problems if p.severity == "error"}
    assert codes == {
        "1_c/cut.jpg": "corrupt",
        "1_c/cut.png": "corrupt",
        "1_c/zero.png": "empty",
        "1_c/text.png": "corrupt",
        "1_c/bomb.png": "too_large",
        "1_c/toolarge.png": "too_large",
    }
    assert sorted(p.name for p in d.iterdir()) == ["good.png"]
    q = ws.path / ".workshop" / "quarantine" / "1_c"
    assert (q / "cut.jpg").exists()
    assert (q / "cut.txt").read_text(encoding="utf-8") == "caption of cut"
    assert (q / "cut_2.png").exists()  # a second file with the stem gets a unique name there
    assert ws.summary().quarantined == 6
    for p in report.problems:
        if p.severity == "error":
            assert p.path in p.message
            assert "moved to .workshop/quarantine" in p.message


def test_captions_are_tidied(tmp_path):
    ws = Workspace.create(tmp_path / "w", "ds")
    d = ws.path / "2_c"
    for n in ("a", "b", "c", "d"):
        save(pattern(seed=ord(n)), d / f"{n}.png")
    (d / "a.caption").write_text("from blip", encoding="utf-8")
    (d / "b.txt").write_bytes("na\xefve".encode("cp1252"))
    (d / "c.txt").write_text("one\ntwo", encoding="utf-8")
    (d / "d.txt").write_text("keep", encoding="utf-8")
    (d / "d.caption").write_text("ignored", encoding="utf-8")
    (d / "ghost.txt").write_text("orphan", encoding="utf-8")
    (d / "x.json").write_text("{}", encoding="utf-8")
    save(pattern(), ws.path / "stray.png")
    (ws.path / "nofolder").mkdir()
    report = ws.clean()
    assert (d / "a.txt").read_text(encoding="utf-8") == "from blip"
    assert not (d / "a.caption").exists()
    assert (d / "b.txt").read_bytes() == "naïve".encode()
    assert (d / "c.txt").read_text(encoding="utf-8") == "one, two"
    assert (d / "d.txt").read_text(encoding="utf-8") == "keep"
    assert {
        "caption_converted",
        "caption_reencoded",
        "caption_multiline",
        "caption_ignored",
        "orphan_caption",
        "not_image",
        "misplaced",
    } <= report.codes()
    assert sorted(report.problem_paths("misplaced")) == ["nofolder", "stray.png"]


def test_clean_twice_changes_nothing(cleaned):
    ws, _, _ = cleaned
    before = tree_hashes(ws.path / "1_c")
    second = ws.clean(background=GREEN_BG)
    assert second.converted == 0
    assert second.quarantined == 0
    assert tree_hashes(ws.path / "1_c") == before


def test_converted_name_collision_gets_new_stem(tmp_path):
    """A user-dropped x.webp beside an unrelated x.png must not overwrite it."""
    ws = Workspace.create(tmp_path / "w", "ds")
    d = ws.path / "1_c"
    save(pattern(seed=1), d / "x.png")
    save(pattern(seed=2), d / "x.webp", "WEBP", lossless=True)
    png_before = (d / "x.png").read_bytes()
    report = ws.clean()
    assert (d / "x.png").read_bytes() == png_before
    [conv] = [f for f in report.files if f.action == "converted"]
    assert conv.path == "1_c/x_2.png"
    got = np.asarray(Image.open(d / "x_2.png"))
    assert np.abs(got.astype(int) - np.asarray(pattern(seed=2)).astype(int)).max() == 0


def test_unexpected_decoder_errors_are_not_fatal(tmp_path, monkeypatch):
    from lora_trainer.workshop import cleaning

    ws = Workspace.create(tmp_path / "w", "ds")
    save(pattern((16, 16), 1), ws.path / "1_c" / "a.png")
    save(pattern((16, 16), 2), ws.path / "1_c" / "b.png")
    real = cleaning.load_image_rgb

    def flaky(path, **kw):
        if path.name == "a.png":
            raise IndexError("broken tile table")
        return real(path, **kw)

    monkeypatch.setattr(cleaning, "load_image_rgb", flaky)
    report = ws.clean()
    assert report.kept == 1
    assert report.quarantined == 1
    assert "IndexError: broken tile table" in report.problems_with("corrupt")[0].message


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_images_above_the_workshop_pixel_limit_are_set_aside_from_the_header(tmp_path):
    ws = Workspace.create(tmp_path / "w", "ds")
    d = ws.path / "1_c"
    save(pattern((32, 32), seed=1), d / "good.png")
    png_header_only(d / "big.png", 13000, 13000)  # under Pillow's own limit; ~500 MB per decode
    png_header_only(d / "bomb.png", 30000, 30000)  # over Pillow's: it refuses to open it
    report = ws.clean()  # the default limit
    assert report.kept == 1
    assert report.quarantined == 2
    notes = {p.path: p for p in report.problems if p.severity == "error"}
    assert {k: p.code for k, p in notes.items()} == {"1_c/big.png": "too_large", "1_c/bomb.png": "too_large"}
    big = notes["1_c/big.png"].message  # too_large (not corrupt): refused from the header, never decoded
    assert "13000x13000 (169.0 megapixels)" in big
    assert "above the workshop's limit of 67.1 megapixels" in big
    assert "memory" in big
    assert "moved to .workshop/quarantine" in big
    assert "900.0 megapixels" in notes["1_c/bomb.png"].message


def test_clean_workers_are_bounded_by_memory(tmp_path, monkeypatch):
    from lora_trainer.workshop import cleaning, resources

    monkeypatch.setattr(resources.os, "cpu_count", lambda: 16)
    gib = 1 << 30
    monkeypatch.setattr(resources, "available_memory", lambda: 64 * gib)
    assert resources.worker_count() == 4  # the CPU bound
    monkeypatch.setattr(resources, "available_memory", lambda: 3 * gib)
    assert resources.worker_count() == 1  # half of 3 GiB carries one 1 GiB worker
    assert resources.worker_count(max_pixels=2048 * 2048) == 4  # smaller images, smaller workers
    monkeypatch.setattr(resources, "available_memory", lambda: 100 << 20)
    assert resources.worker_count() == 1  # always at least one
    assert resources.worker_count(3) == 3  # an explicit count is kept
    monkeypatch.setattr(resources, "available_memory", lambda: None)
    assert resources.worker_count() == 4  # memory unknown: the CPU bound alone

    seen = []
    real_pool = cleaning.ThreadPoolExecutor

    def pool(max_workers):
        seen.append(max_workers)
        return real_pool(max_workers=max_workers)

    monkeypatch.setattr(cleaning, "ThreadPoolExecutor", pool)
    monkeypatch.setattr(resources, "available_memory", lambda: 3 * gib)
    ws = Workspace.create(tmp_path / "w", "ds")
    save(pattern((32, 32), seed=1), ws.path / "1_c" / "a.png")
    assert ws.clean().kept == 1
    assert seen == [1]


def test_available_memory_reads_meminfo(tmp_path):
    from lora_trainer.workshop.resources import available_memory

    f = tmp_path / "meminfo"
    f.write_text("MemTotal:       16000000 kB\nMemFree:  1000 kB\nMemAvailable:    8000000 kB\n", encoding="ascii")
    assert available_memory(str(f)) == 8000000 * 1024
    f.write_text("MemTotal:       16000000 kB\n", encoding="ascii")
    assert available_memory(str(f)) is None
    assert available_memory(str(tmp_path / "missing")) is None


def test_clean_strips_nul_and_sets_aside_captions_above_the_import_limit(tmp_path):
    """Clean applies the import's rules to captions already in a workspace: NUL bytes are
    removed (with a note) and a caption above 1 MiB is moved aside, not converted."""
    from tests.fixtures.images import pattern, save

    ws = Workspace.create(tmp_path / "w", "ds")
    folder = ws.path / "10_x"
    for stem in ("nul", "big", "bigtxt"):
        save(pattern((16, 16), 1), folder / f"{stem}.png")
    (folder / "nul.txt").write_bytes(b"red\x00 hair")
    (folder / "big.caption").write_bytes(b"tag, " * (300 * 1024))
    (folder / "bigtxt.txt").write_bytes(b"tag, " * (300 * 1024))
    report = ws.clean()
    assert (folder / "nul.txt").read_bytes() == b"red hair"
    assert report.problem_paths("caption_nul") == ["10_x/nul.txt"]
    assert sorted(report.problem_paths("too_large")) == ["10_x/big.caption", "10_x/bigtxt.txt"]
    assert not (folder / "big.txt").exists()
    assert not (folder / "bigtxt.txt").exists()
    assert (ws.path / ".workshop" / "quarantine" / "10_x" / "big.caption").is_file()
    assert all(p.severity == "warning" for p in report.problems_with("too_large"))
