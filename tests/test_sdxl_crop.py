"""SDXL crop conditioning: kohya's ``get_crop_ltrb`` values for bucketed images."""

import pytest
from PIL import Image

from lora_trainer.data.buckets import BucketSettings, sdxl_crop_top_left
from lora_trainer.data.dataset import TrainDataset
from lora_trainer.data.scan import scan_dataset


@pytest.mark.parametrize(
    ("image", "bucket", "plain", "flipped"),
    [
        # portrait 2:3 in 832x1216 (wider bucket): fitted 810.67x1216, left (832 - 810.67) // 2 = 10,
        # right edge 820.67, mirrored left 832 - 820.67 = 11.33 -> 11
        ((1000, 1500), (832, 1216), (0, 10), (0, 11)),
        # 16:9 in 1344x768 (narrower bucket): fitted 1344x756, top (768 - 756) // 2 = 6
        ((1920, 1080), (1344, 768), (6, 0), (6, 0)),
        # exact fit: no margin
        ((1024, 1024), (1024, 1024), (0, 0), (0, 0)),
        ((512, 512), (1024, 1024), (0, 0), (0, 0)),
        # 96x48 in 80x48: fitted 80x40, top 4
        ((96, 48), (80, 48), (4, 0), (4, 0)),
        # 100x300 in 128x320: fitted 106.67x320, left 10, right 116.67, mirrored 11.33 -> 11
        ((100, 300), (128, 320), (0, 10), (0, 11)),
        # 3000x1000 in 1536x640: fitted 1536x512, top 64
        ((3000, 1000), (1536, 640), (64, 0), (64, 0)),
    ],
)
def test_crop_top_left_is_kohyas(image, bucket, plain, flipped):
    assert sdxl_crop_top_left(image, bucket) == plain
    assert sdxl_crop_top_left(image, bucket, flipped=True) == flipped


def _dataset(tmp_path, size, settings, **kw):
    root = tmp_path / "d" / "4_x"
    root.mkdir(parents=True)
    Image.new("RGB", size, (200, 10, 10)).save(root / "a.png")
    return TrainDataset(scan_dataset(tmp_path / "d"), settings, batch_size=1, **kw)


def test_bucketed_batches_carry_kohyas_crop(tmp_path):
    # 1000x1500 at 1024x1024 (kohya's default buckets): bucket 832x1216; the covering resize is
    # 832x1248, cropped 16 px from the top, but kohya conditions on (top 0, left 10)
    settings = BucketSettings(resolution=(1024, 1024), min_bucket_reso=256, max_bucket_reso=2048)
    ds = _dataset(tmp_path, (1000, 1500), settings, flip_aug=True, seed=1)
    assert ds.assignments[0].bucket == (832, 1216)
    assert ds.assignments[0].resized_size == (832, 1248)
    seen = {}
    for epoch in range(3):
        for batch in ds.iter_epoch(epoch):
            seen[batch["flipped"][0]] = batch["crop_top_lefts"][0]
    assert seen == {False: (0, 10), True: (0, 11)}
    # random crop changes the pixels, not the conditioning (kohya's too)
    ds = _dataset(tmp_path / "r", (1000, 1500), settings, random_crop=True, seed=1)
    assert {b["crop_top_lefts"][0] for b in ds.iter_epoch(0)} == {(0, 10)}


def test_fixed_size_mode_conditions_on_the_crop_taken(tmp_path):
    # bucketing off: 100x300 scaled to 64x192 and centre-cropped to 64x64, 64 px from the top
    ds = _dataset(tmp_path, (100, 300), BucketSettings(resolution=(64, 64), enable_bucket=False))
    assert {b["crop_top_lefts"][0] for b in ds.iter_epoch(0)} == {(64, 0)}
