import random

import pytest

from lora_trainer.data.buckets import (
    BucketSettings,
    assign_bucket,
    assign_fixed,
    make_buckets,
    plan_buckets,
)
from lora_trainer.errors import ConfigError

# kohya's make_bucket_resolutions((512, 512), 256, 1024, 64), worked out by hand from its rule:
# for each width w in 256..1024 step 64, h = min(1024, (262144 // w) // 64 * 64), both (w, h) and (h, w)
# when h >= 256, plus the square side floor(sqrt(area) / 64) * 64.
SD15_512 = [
    (256, 832), (256, 896), (256, 960), (256, 1024),
    (320, 704), (320, 768), (384, 640), (448, 576), (512, 512),
    (576, 448), (640, 384), (704, 320), (768, 320),
    (832, 256), (896, 256), (960, 256), (1024, 256),
]  # fmt: skip


def test_sd15_512_buckets_match_kohya():
    buckets = make_buckets((512, 512), 256, 1024, 64)
    assert buckets == SD15_512
    assert buckets == sorted(buckets)
    for w, h in buckets:
        assert w % 64 == 0
        assert h % 64 == 0
        assert w * h <= 512 * 512
        assert 256 <= w <= 1024
        assert 256 <= h <= 1024
    for must in [(512, 512), (576, 448), (448, 576), (640, 384), (384, 640), (768, 320), (1024, 256)]:
        assert must in buckets
    assert make_buckets() == SD15_512  # the defaults are kohya's


def test_sdxl_1024_buckets_contain_the_usual_ones():
    buckets = make_buckets((1024, 1024), 256, 2048, 64)
    assert all(w * h <= 1024 * 1024 and w % 64 == 0 and h % 64 == 0 for w, h in buckets)
    for must in [(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (1344, 768), (768, 1344), (1536, 640)]:
        assert must in buckets
    # one side of every bucket is as long as the area allows for the other (no wasted area)
    for w, h in buckets:
        if (w, h) != (1024, 1024):
            assert w * (h + 64) > 1024 * 1024 or (w + 64) * h > 1024 * 1024 or 2048 in (w, h)


def test_non_square_resolution_uses_its_area():
    buckets = make_buckets((768, 512), 256, 1024, 64)
    assert all(w * h <= 768 * 512 for w, h in buckets)
    assert (576, 576) in buckets  # kohya's square: floor(sqrt(393216) / 64) * 64
    assert (768, 512) in buckets


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"min_size": 512, "max_size": 256}, "dataset.min_bucket_reso"),
        ({"step": 0}, "dataset.bucket_reso_steps"),
        ({"max_reso": (0, 512)}, "dataset.resolution"),
        ({"max_reso": (32, 32)}, "dataset.resolution"),
    ],
)
def test_bad_bucket_settings_raise_config_error(kwargs, field):
    with pytest.raises(ConfigError) as e:
        make_buckets(**kwargs)
    assert e.value.field == field


def test_assignment_picks_closest_aspect_ratio():
    buckets = make_buckets()
    cases = {
        (1000, 600): (640, 384),
        (600, 1000): (384, 640),
        (800, 800): (512, 512),
        (2000, 500): (1024, 256),
        (1200, 900): (576, 448),
        (512, 512): (512, 512),
        (576, 448): (576, 448),  # an exact size wins and is not resized
    }
    for size, bucket in cases.items():
        assert assign_bucket(size, buckets).bucket == bucket, size
    a = assign_bucket((576, 448), buckets)
    assert a.resized_size == (576, 448)
    assert a.ar_error == 0
    assert not a.upscaled

    rng = random.Random(0)
    for _ in range(300):
        w, h = rng.randint(50, 4000), rng.randint(50, 4000)
        a = assign_bucket((w, h), buckets)
        best = min(abs(bw / bh - w / h) for bw, bh in buckets)
        assert abs(a.bucket[0] / a.bucket[1] - w / h) == pytest.approx(best)
        assert a.ar_error == pytest.approx(a.bucket[0] / a.bucket[1] - w / h)
        rw, rh = a.resized_size
        bw, bh = a.bucket
        assert rw >= bw
        assert rh >= bh
        assert rw == bw or rh == bh  # and touches it on one side
        assert abs(rw / rh - w / h) < 0.02 + 1 / min(rw, rh)  # aspect kept
        assert a.upscaled == (rw > w or rh > h)


def test_small_image_is_upscaled():
    a = assign_bucket((100, 100), make_buckets())
    assert a.bucket == (512, 512)
    assert a.resized_size == (512, 512)
    assert a.upscaled


def test_no_upscale_follows_kohya():
    area = 512 * 512
    # small enough: the bucket is the size rounded down to the step, cropped without resizing
    a = assign_bucket((400, 300), [], True, max_area=area, step=64)
    assert a.bucket == (384, 256)
    assert a.resized_size == (400, 300)
    assert not a.upscaled
    # too large: scaled to about the max area first (kohya's rounding), then rounded down
    a = assign_bucket((700, 500), [], True, max_area=area, step=64)
    assert a.bucket == (512, 384)
    assert a.resized_size == (538, 384)
    assert not a.upscaled
    a = assign_bucket((4000, 3000), [], True, max_area=area, step=64)
    assert a.bucket == (512, 384)
    assert a.resized_size == (512, 384)
    assert a.bucket[0] * a.bucket[1] <= area
    # an image narrower than one step still gets a (one-step) bucket, enlarged
    a = assign_bucket((40, 30), [], True, max_area=area, step=64)
    assert a.bucket == (64, 64)
    assert a.upscaled
    with pytest.raises(ValueError, match=r"no_upscale needs max_area"):
        assign_bucket((400, 300), [], True)  # needs max_area


def test_fixed_size_mode_covers_and_crops():
    a = assign_fixed((200, 100), (64, 64))
    assert a.bucket == (64, 64)
    assert a.resized_size == (128, 64)
    assert not a.upscaled
    a = assign_fixed((32, 48), (64, 64))
    assert a.resized_size == (64, 96)
    assert a.upscaled
    s = BucketSettings(resolution=(64, 64), enable_bucket=False)
    assert s.buckets() == [(64, 64)]
    assert s.assign((300, 1000)).bucket == (64, 64)
    assert BucketSettings(resolution=512).resolution == (512, 512)
    assert BucketSettings(bucket_no_upscale=True).buckets() == []


def test_plan_report_counts_and_metadata():
    settings = BucketSettings(resolution=(512, 512))
    entries = [
        ("a", (1000, 600), 10),
        ("b", (1000, 600), 10),
        ("c", (512, 512), 3),
        ("d", (200, 150), 1),  # enlarged, and below min_bucket_reso
    ]
    assignments, report = plan_buckets(entries, settings)
    assert [a.bucket for a in assignments] == [(640, 384), (640, 384), (512, 512), (576, 448)]
    assert report.counts == {(512, 512): 3, (576, 448): 1, (640, 384): 20}
    assert report.image_counts == {(512, 512): 1, (576, 448): 1, (640, 384): 2}
    assert report.upscaled == ["d"]
    assert report.too_small == ["d"]
    meta = report.to_metadata()
    assert meta["mean_img_ar_error"] == pytest.approx(sum(abs(a.ar_error) for a in assignments) / 4)
    ids = {tuple(v["resolution"]): (k, v["count"]) for k, v in meta["buckets"].items()}
    # kohya numbers a bucket by its place among all resolutions
    assert ids[(512, 512)] == (str(SD15_512.index((512, 512))), 3)
    assert ids[(640, 384)] == (str(SD15_512.index((640, 384))), 20)
    assert any("enlarged" in line for line in report.summary_lines())

    _, fixed = plan_buckets(entries, BucketSettings(resolution=(512, 512), enable_bucket=False))
    assert fixed.counts == {(512, 512): 24}
    assert fixed.to_metadata() is None


def test_fixed_size_mode_calls_too_small_only_what_is_enlarged_more_than_twice():
    settings = BucketSettings(resolution=(64, 64), enable_bucket=False)
    _, report = plan_buckets([("same", (64, 64), 1), ("small", (40, 48), 1), ("tiny", (20, 30), 1)], settings)
    assert report.upscaled == ["small", "tiny"]
    assert report.too_small == ["tiny"]
    assert not any("below 256" in line for line in report.summary_lines())
