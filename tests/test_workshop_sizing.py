"""Bucket report (same numbers training uses) and fixed-size resizing with crop modes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from lora_trainer.data.buckets import BucketSettings
from lora_trainer.data.dataset import TrainDataset
from lora_trainer.data.scan import scan_dataset
from lora_trainer.errors import ConfigError
from lora_trainer.workshop import Workspace
from lora_trainer.workshop.sizing import crop_box, focal_point
from tests.fixtures.images import BLUE, RED, WHITE, pattern, save


@pytest.fixture
def ws(tmp_path):
    ws = Workspace.create(tmp_path / "w", "ds")
    save(pattern((512, 512), 1), ws.path / "2_a" / "square.png")
    save(pattern((768, 512), 2), ws.path / "2_a" / "wide.png")
    save(pattern((512, 768), 3), ws.path / "3_b" / "tall.png")
    save(pattern((100, 80), 4), ws.path / "3_b" / "tiny.png")
    return ws


def test_bucket_report_matches_training(ws):
    report = ws.bucket_report(512, min_bucket_reso=256, max_bucket_reso=1024)
    settings = BucketSettings(resolution=(512, 512), min_bucket_reso=256, max_bucket_reso=1024)
    ds = TrainDataset(scan_dataset(ws.path), settings)
    training = {(b[0], b[1]): n for b, n in ds.bucket_report.counts.items()}
    assert {(b.width, b.height): b.images_with_repeats for b in report.buckets} == training
    by_path = {e["path"]: e for e in report.per_image}
    assert by_path["2_a/wide.png"]["bucket"] == [640, 384]
    assert by_path["3_b/tall.png"]["bucket"] == [384, 640]
    assert report.too_small == ["3_b/tiny.png"]
    assert report.problem_paths("too_small") == ["3_b/tiny.png"]
    assert "3_b/tiny.png" in report.upscaled
    assert sum(b.images for b in report.buckets) == report.images == 4
    json.dumps(report.to_dict())


def test_bucket_report_no_upscale(ws):
    report = ws.bucket_report(512, bucket_no_upscale=True, min_bucket_reso=64)
    by_path = {e["path"]: e for e in report.per_image}
    assert by_path["3_b/tiny.png"]["bucket"] == [64, 64]
    assert not report.upscaled


def test_fixed_center_resize_keeps_originals(ws):
    before = (ws.path / "2_a" / "wide.png").read_bytes()
    report = ws.resize_fixed(256, 256)
    assert len(report.resized) == 4
    for r in report.resized:
        with Image.open(ws.path / r.path) as img:
            assert img.size == (256, 256)
    wide = next(r for r in report.resized if r.path == "2_a/wide.png")
    assert wide.original_size == (768, 512)
    assert wide.crop == (64, 0, 320, 256)
    assert (ws.path / ".workshop/originals/2_a/wide.png").read_bytes() == before
    assert report.problem_paths("upscaled") == ["3_b/tiny.png"]
    # a second resize starts from the original, not from the 256 px copy
    again = ws.resize_fixed(384, 384)
    wide2 = next(r for r in again.resized if r.path == "2_a/wide.png")
    assert wide2.original_size == (768, 512)
    assert not wide2.upscaled
    with Image.open(ws.path / "2_a/wide.png") as img:
        assert img.size == (384, 384)


def test_fixed_resize_without_upscale_skips_small(ws):
    report = ws.resize_fixed(256, 256, upscale=False)
    assert report.problem_paths("too_small") == ["3_b/tiny.png"]
    with Image.open(ws.path / "3_b/tiny.png") as img:
        assert img.size == (100, 80)


def test_jpeg_becomes_png_with_caption_kept(tmp_path):
    ws = Workspace.create(tmp_path / "w", "ds")
    save(pattern((300, 200), 1), ws.path / "1_a" / "p.jpg", quality=90)
    (ws.path / "1_a" / "p.txt").write_text("tag", encoding="utf-8")
    report = ws.resize_fixed(128)
    assert [r.path for r in report.resized] == ["1_a/p.png"]
    assert sorted(p.name for p in (ws.path / "1_a").iterdir()) == ["p.png", "p.txt"]
    assert (ws.path / ".workshop/originals/1_a/p.jpg").exists()


def half_detail(size=(300, 100)) -> Image.Image:
    """White on the left, a busy checkerboard on the right third."""
    w, h = size
    img = Image.new("RGB", size, WHITE)
    arr = np.asarray(img).copy()
    yy, xx = np.mgrid[0:h, 0 : w // 3]
    checks = ((yy // 5 + xx // 5) % 2 == 0)[..., None] * np.array(RED) + ((yy // 5 + xx // 5) % 2 == 1)[
        ..., None
    ] * np.array(BLUE)
    arr[:, w - w // 3 :] = checks
    return Image.fromarray(arr.astype(np.uint8))


def test_focal_point_follows_detail():
    fx, fy = focal_point(half_detail(), (100, 100))
    assert fx > 0.75
    assert fy == 0.5
    fx, _ = focal_point(Image.new("RGB", (300, 100), WHITE), (100, 100))
    assert fx == pytest.approx(0.5, abs=0.02)  # nothing to see: the centre


def test_crop_modes(tmp_path):
    ws = Workspace.create(tmp_path / "w", "ds")
    save(half_detail(), ws.path / "1_a" / "x.png")
    centre = ws.resize_fixed(100, 100, crop="center").resized[0]
    assert centre.crop == (100, 0, 200, 100)
    focal = ws.resize_fixed(100, 100, crop="focal").resized[0]
    assert focal.crop == (200, 0, 300, 100)
    arr = np.asarray(Image.open(ws.path / "1_a/x.png"))
    assert (arr.std(axis=(0, 1)) > 50).any()  # the busy part is in the crop
    point = ws.resize_fixed(100, 100, crop="point", points={"1_a/x.png": (0.0, 0.5)}).resized[0]
    assert point.crop == (0, 0, 100, 100)
    missing = ws.resize_fixed(100, 100, crop="point")
    assert missing.problem_paths("no_point") == ["1_a/x.png"]
    assert missing.resized[0].crop == (100, 0, 200, 100)


def test_crop_box_clamps():
    assert crop_box((300, 100), (100, 100), (1.0, 0.5)) == (200, 0, 300, 100)
    assert crop_box((300, 100), (100, 100), (0.5, 0.5)) == (100, 0, 200, 100)
    assert crop_box((100, 300), (100, 100), (0.5, 0.0)) == (0, 0, 100, 100)


def test_bad_sizes_and_modes(ws):
    with pytest.raises(ConfigError, match="width"):
        ws.resize_fixed(0, 10)
    with pytest.raises(ConfigError, match="crop"):
        ws.resize_fixed(64, 64, crop="faces")


def test_bucket_report_counts_exif_rotation_before_clean(tmp_path):
    ws = Workspace.create(tmp_path / "w", "ds")
    img = pattern((768, 512), 1)
    exif = Image.Exif()
    exif[0x0112] = 6
    save(img, ws.path / "1_a" / "phone.jpg", quality=90, exif=exif.tobytes())
    report = ws.bucket_report(512)
    assert report.per_image[0]["size"] == [512, 768]
    assert report.per_image[0]["bucket"] == [384, 640]
    ws.clean()  # the sizes now come from the fingerprint cache, and agree
    assert ws.bucket_report(512).per_image[0]["size"] == [512, 768]


def test_image_already_at_size_is_left_alone(tmp_path):
    ws = Workspace.create(tmp_path / "w", "ds")
    p = save(pattern((64, 64), 1), ws.path / "1_a" / "x.jpg", quality=90)
    before = p.read_bytes()
    report = ws.resize_fixed(64)
    assert report.resized == []
    assert report.problem_paths("already_sized") == ["1_a/x.jpg"]
    assert p.read_bytes() == before


def test_fixed_size_warns_of_a_big_enlargement_or_a_heavy_crop(tmp_path):
    """A >2x enlargement and a crop keeping under half the image are warnings, not collapsed notes."""
    ws = Workspace.create(tmp_path / "w", "ds")
    save(pattern((8, 8), 1), ws.path / "1_a" / "tiny.png")
    save(pattern((256, 16), 2), ws.path / "1_a" / "pano.png")
    save(pattern((48, 48), 3), ws.path / "1_a" / "mild.png")
    report = ws.resize_fixed(64, 64)
    by_code = {(p.code, p.path): p for p in report.problems}
    assert by_code[("upscaled", "1_a/tiny.png")].severity == "warning"
    assert "8.0x" in by_code[("upscaled", "1_a/tiny.png")].message
    assert by_code[("heavy_crop", "1_a/pano.png")].severity == "warning"
    assert "keeping only 6%" in by_code[("heavy_crop", "1_a/pano.png")].message
    assert by_code[("upscaled", "1_a/mild.png")].severity == "info"
