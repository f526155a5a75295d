import io
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lora_trainer.data import dataset as dataset_mod
from lora_trainer.data.buckets import BucketSettings
from lora_trainer.data.dataset import TrainDataset
from lora_trainer.data.images import (
    load_image_rgb,
    pil_to_tensor,
    read_image_size,
    resize_and_crop,
)
from lora_trainer.data.layout import IMAGE_EXTENSIONS
from lora_trainer.data.scan import (
    ImageItem,
    dataset_dirs_info,
    dataset_tag_frequency,
    scan_dataset,
)
from lora_trainer.errors import ConfigError, DatasetError
from tests.fixtures.files import tree_hashes

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)
SMALL = BucketSettings(resolution=(64, 64), min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16)


def save(path: Path, size=(64, 64), color=RED, fmt=None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, fmt, **kw)
    return path


def two_colour(size=(64, 32), left=RED, right=BLUE) -> Image.Image:
    w, h = size
    img = Image.new("RGB", size, right)
    img.paste(left, (0, 0, w // 2, h))
    return img


@pytest.fixture
def kohya_dir(tmp_path) -> Path:
    root = tmp_path / "train"
    s = root / "10_mychar"
    save(s / "a.png", (96, 64), RED)
    (s / "a.txt").write_text("mychar, red shirt\n", encoding="utf-8")
    save(s / "b.jpg", (64, 96), GREEN, quality=95)
    (s / "b.caption").write_text("mychar, green", encoding="utf-8")  # .caption used when .txt is absent
    save(s / "c.png", (64, 64), BLUE)  # no caption: kohya uses the folder's class tokens
    save(s / "nested" / "d.webp", (64, 64), RED)
    (s / "nested" / "d.txt").write_bytes("café, Smile".encode("cp1252"))  # not UTF-8
    (s / "e.png").write_bytes(b"")  # 0-byte: skipped
    save(s / ".hidden.png")  # hidden: skipped
    save(s / ".thumbs" / "t.png")  # hidden folder: skipped
    save(s / "f.PNG", (64, 64), GREEN)  # upper-case extension
    (s / "f.txt").write_text("first line\nsecond line\n", encoding="utf-8")
    (s / "notes.md").write_text("not an image")
    save(root / "3_style bg" / "x.bmp", (128, 64), WHITE)
    save(root / "mychar_raw" / "r.png")  # no repeat count: skipped like kohya
    save(root / "0_off" / "o.png")  # 0 repeats: skipped
    save(root / "stray.png")  # directly in the root beside subset folders: not used
    return root


# -- scanning --------------------------------------------------------------------------------


def test_scan_kohya_layout(kohya_dir, records):
    items = scan_dataset(kohya_dir)
    by_key = {it.key: it for it in items}
    assert list(by_key) == [
        "10_mychar/a.png",
        "10_mychar/b.jpg",
        "10_mychar/c.png",
        "10_mychar/f.PNG",
        "10_mychar/nested/d.webp",
        "3_style bg/x.bmp",
    ]
    assert by_key["10_mychar/a.png"].caption == "mychar, red shirt"
    assert by_key["10_mychar/b.jpg"].caption == "mychar, green"
    assert by_key["10_mychar/c.png"].caption == "mychar"  # class tokens, as kohya
    assert by_key["10_mychar/nested/d.webp"].caption == "café, Smile"  # cp1252 fallback
    assert by_key["10_mychar/f.PNG"].caption == "first line"  # kohya: first line only
    assert {it.repeats for it in items if it.subset_name == "10_mychar"} == {10}
    assert by_key["3_style bg/x.bmp"].repeats == 3
    assert by_key["3_style bg/x.bmp"].caption == "style bg"
    assert by_key["10_mychar/a.png"].path == kohya_dir / "10_mychar" / "a.png"

    r = items.report
    assert not r.flat
    assert set(r.subsets) == {"10_mychar", "3_style bg"}
    assert r.subsets["10_mychar"].repeats == 10
    assert r.subsets["10_mychar"].image_count == 5
    skipped = {p.name for p, _ in r.skipped_folders}
    assert skipped == {"mychar_raw", "0_off"}
    assert [p.name for p in r.ignored_files] == ["stray.png"]
    assert {p.name for p in r.hidden_files} == {".hidden.png", ".thumbs"}
    assert [p.name for p in r.empty_files] == ["e.png"]
    assert {p.name for p in r.missing_captions} == {"c.png", "x.bmp"}
    assert {p.name for p in r.class_token_captions} == {"c.png", "x.bmp"}
    assert [p.name for p in r.non_utf8_captions] == ["d.txt"]
    assert [p.name for p in r.multiline_captions] == ["f.txt"]
    assert r.other_files == 1
    text = "\n".join(rec.getMessage() for rec in records)
    assert "mychar_raw" in text
    assert "10_mychar_raw" in text
    assert "0-byte" in text
    assert "stray.png" in text
    assert "not UTF-8" in text

    assert dataset_dirs_info(items) == {
        "10_mychar": {"n_repeats": 10, "img_count": 5},
        "3_style bg": {"n_repeats": 3, "img_count": 1},
    }
    freq = dataset_tag_frequency(items)
    assert freq["10_mychar"]["mychar"] == 3  # a, b, and c's class-token caption
    assert freq["10_mychar"]["smile"] == 1  # lower-cased, as kohya
    assert freq["3_style bg"] == {"style bg": 1}


def test_scan_options(kohya_dir):
    items = scan_dataset(kohya_dir, class_tokens_for_missing=False)
    assert {it.key: it.caption for it in items}["10_mychar/c.png"] == ""
    # the asked-for extension wins over the other one
    s = kohya_dir / "10_mychar"
    (s / "a.caption").write_text("from caption file", encoding="utf-8")
    assert {it.key: it.caption for it in scan_dataset(kohya_dir, "caption")}["10_mychar/a.png"] == "from caption file"
    assert {it.key: it.caption for it in scan_dataset(kohya_dir, ".txt")}["10_mychar/a.png"] == "mychar, red shirt"


def test_scan_flat_folder(tmp_path):
    root = tmp_path / "pics"
    save(root / "1.png")
    (root / "1.txt").write_text("one")
    save(root / "sub" / "2.jpg")
    save(root / ".hidden.png")
    save(root / "0_off" / "o.png")  # a 0-repeat folder stays out in a flat folder too
    (root / "loop").symlink_to(root, target_is_directory=True)  # a link loop is walked once
    items = scan_dataset(root)
    assert [(it.key, it.caption, it.repeats, it.subset_name) for it in items] == [
        ("pics/1.png", "one", 1, "pics"),
        ("pics/sub/2.jpg", "", 1, "pics"),  # no class tokens in a flat folder
    ]
    assert items.report.flat
    assert [p.name for p in items.report.hidden_files] == [".hidden.png"]
    assert [p.name for p, _ in items.report.skipped_folders] == ["0_off"]


def test_scan_errors(tmp_path):
    with pytest.raises(DatasetError) as e:
        scan_dataset(tmp_path / "missing")
    assert "missing" in str(e.value)
    assert "10_" in str(e.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError) as e:
        scan_dataset(empty)
    assert str(empty) in str(e.value)
    assert "<repeats>_<name>" in str(e.value)

    bad = tmp_path / "bad"
    (bad / "5_x").mkdir(parents=True)
    (bad / "5_x" / "a.png").write_bytes(b"")
    save(bad / "5_x" / ".b.png")
    (bad / "5_x" / "a.txt").write_text("caption without image")
    with pytest.raises(DatasetError) as e:
        scan_dataset(bad)
    assert "1 empty and 1 hidden" in str(e.value)


# -- image loading ---------------------------------------------------------------------------


def px(img: Image.Image, xy) -> tuple:
    return img.getpixel(xy)


def close(a, b, tol=3):
    return all(abs(int(x) - int(y)) <= tol for x, y in zip(a, b, strict=True))


def test_extensions():
    assert set(IMAGE_EXTENSIONS) == {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def test_modes_become_rgb(tmp_path):
    rgba = Image.new("RGBA", (4, 1))
    rgba.putdata([(255, 0, 0, 0), (255, 0, 0, 255), (255, 0, 0, 128), (0, 0, 255, 255)])
    rgba.save(tmp_path / "rgba.png")
    img = load_image_rgb(tmp_path / "rgba.png")
    assert img.mode == "RGB"
    assert img.size == (4, 1)
    assert px(img, (0, 0)) == WHITE  # transparent -> background
    assert px(img, (1, 0)) == RED
    assert close(px(img, (2, 0)), (255, 127, 127), 1)  # half red over white
    assert px(load_image_rgb(tmp_path / "rgba.png", background=(0, 0, 0)), (0, 0)) == (0, 0, 0)

    la = Image.new("LA", (2, 1))
    la.putdata([(0, 0), (0, 255)])
    la.save(tmp_path / "la.png")
    img = load_image_rgb(tmp_path / "la.png")
    assert [px(img, (x, 0)) for x in range(2)] == [WHITE, (0, 0, 0)]

    p = Image.new("P", (2, 1))
    p.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    p.putdata([0, 1])
    p.save(tmp_path / "p.png", transparency=0)
    p.save(tmp_path / "p.gif", transparency=0)
    for name in ("p.png", "p.gif"):
        img = load_image_rgb(tmp_path / name)
        assert [px(img, (x, 0)) for x in range(2)] == [WHITE, GREEN], name

    Image.new("CMYK", (2, 2), (0, 255, 255, 0)).save(tmp_path / "cmyk.tif")
    Image.new("CMYK", (2, 2), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    assert px(load_image_rgb(tmp_path / "cmyk.tif"), (0, 0)) == RED
    assert close(px(load_image_rgb(tmp_path / "cmyk.jpg"), (0, 0)), RED, 4)

    # 16-bit greyscale: scaled to 8 bits, not clipped (PNG opens as "I", TIFF as "I;16")
    a16 = np.array([[0, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(a16).save(tmp_path / "g16.png")
    Image.fromarray(a16).save(tmp_path / "g16.tif")
    for name in ("g16.png", "g16.tif"):
        img = load_image_rgb(tmp_path / name)
        assert [px(img, (x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), WHITE], name

    trns = Image.new("RGB", (2, 1), RED)
    trns.putpixel((1, 0), BLUE)
    trns.save(tmp_path / "trns.png", transparency=RED)  # a transparent colour (tRNS chunk)
    img = load_image_rgb(tmp_path / "trns.png", background=GREEN)
    assert [px(img, (x, 0)) for x in range(2)] == [GREEN, BLUE]

    Image.new("L", (1, 1), 77).save(tmp_path / "l.png")
    assert px(load_image_rgb(tmp_path / "l.png"), (0, 0)) == (77, 77, 77)
    one = Image.new("1", (2, 1))
    one.putpixel((1, 0), 1)
    one.save(tmp_path / "one.bmp")
    img = load_image_rgb(tmp_path / "one.bmp")
    assert [px(img, (x, 0)) for x in range(2)] == [(0, 0, 0), WHITE]

    frames = [Image.new("RGB", (4, 4), c) for c in (BLUE, RED)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert close(px(load_image_rgb(tmp_path / "anim.gif"), (0, 0)), BLUE, 8)  # first frame


@pytest.mark.parametrize(("orientation", "top", "bottom"), [(6, RED, BLUE), (8, BLUE, RED), (3, None, None)])
def test_exif_orientation(tmp_path, orientation, top, bottom):
    img = two_colour((64, 32))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"rot{orientation}.jpg"
    img.save(path, quality=95, exif=exif.tobytes())
    out = load_image_rgb(path)
    if orientation == 3:  # 180 degrees: blue left, red right
        assert out.size == read_image_size(path) == (64, 32)
        assert close(px(out, (8, 16)), BLUE, 12)
        assert close(px(out, (56, 16)), RED, 12)
        return
    # 6: rotate 90 clockwise to display (the left edge goes to the top); 8: counter-clockwise
    assert out.size == read_image_size(path) == (32, 64)
    assert close(px(out, (16, 8)), top, 12)
    assert close(px(out, (16, 56)), bottom, 12)


def test_broken_files_raise_dataset_error(tmp_path):
    (tmp_path / "junk.png").write_bytes(b"this is not a png at all" * 10)
    with pytest.raises(DatasetError) as e:
        load_image_rgb(tmp_path / "junk.png")
    assert "junk.png" in str(e.value)
    assert "remove it" in str(e.value)
    with pytest.raises(DatasetError):
        read_image_size(tmp_path / "junk.png")

    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    for fmt in ("PNG", "JPEG"):
        buf = io.BytesIO()
        noise.save(buf, fmt)
        data = buf.getvalue()
        path = tmp_path / f"cut.{fmt.lower()}"
        path.write_bytes(data[: len(data) // 2])
        assert read_image_size(path) == (64, 64)  # the header is fine ...
        with pytest.raises(DatasetError) as e:  # ... the pixels are not
            load_image_rgb(path)
        assert path.name in str(e.value)
        assert "truncated" in str(e.value)

    with pytest.raises(DatasetError) as e:
        load_image_rgb(tmp_path / "nope.png")
    assert "nope.png" in str(e.value)

    save(tmp_path / "big.png", (20, 10))
    with pytest.raises(DatasetError) as e:
        load_image_rgb(tmp_path / "big.png", max_pixels=199)
    assert "big.png" in str(e.value)
    assert "199" in str(e.value)
    assert load_image_rgb(tmp_path / "big.png", max_pixels=200).size == (20, 10)


def test_resize_and_crop():
    img = two_colour((200, 100))
    out, (top, left), original = resize_and_crop(img, 64, 64)
    assert out.size == (64, 64)
    assert original == (100, 200)
    assert (top, left) == (0, 32)  # resized to 128x64, centre crop
    arr = np.asarray(out)
    assert close(arr[32, 2], RED)
    assert close(arr[32, 61], BLUE)

    tall = Image.new("RGB", (50, 150), GREEN)
    out, (top, left), original = resize_and_crop(tall, 64, 32)
    assert out.size == (64, 32)
    assert (top, left) == (80, 0)
    assert original == (150, 50)

    a = [resize_and_crop(img, 64, 64, "random", random.Random(s))[1] for s in range(20)]
    b = [resize_and_crop(img, 64, 64, "random", random.Random(s))[1] for s in range(20)]
    assert a == b
    assert len(set(a)) > 1
    assert all(t == 0 and 0 <= left_ <= 64 for t, left_ in a)

    # kohya no-upscale: crop without resizing
    out, (top, left), _ = resize_and_crop(img, 192, 96, resized_size=(200, 100))
    assert out.size == (192, 96)
    assert (top, left) == (2, 4)
    with pytest.raises(ValueError, match=r"crop must be 'center' or 'random', not 'sideways'"):
        resize_and_crop(img, 64, 64, "sideways")

    t = pil_to_tensor(Image.new("RGB", (2, 2), (255, 0, 128)))
    assert t.shape == (3, 2, 2)
    assert t.dtype == torch.float32
    assert t[:, 0, 0].tolist() == pytest.approx([1.0, -1.0, 128 / 127.5 - 1], abs=1e-6)


# -- the training dataset --------------------------------------------------------------------


@pytest.fixture
def mixed_dir(tmp_path) -> Path:
    root = tmp_path / "data"
    for i in range(5):
        save(root / "4_wide" / f"w{i}.png", (96, 48), RED)
    for i in range(3):
        save(root / "2_tall" / f"t{i}.png", (48, 96), GREEN)
    for i in range(2):
        save(root / "1_square" / f"s{i}.png", (64, 64), BLUE)
    return root


def test_dataset_sizes_and_buckets(mixed_dir):
    items = scan_dataset(mixed_dir)
    ds = TrainDataset(items, SMALL, batch_size=3, seed=1)
    assert ds.num_train_images == 5 * 4 + 3 * 2 + 2 * 1 == 28
    assert ds.buckets == [(48, 80), (64, 64), (80, 48)]
    # kohya: ceil(images with repeats / batch size) per bucket
    assert len(ds) == 7 + 2 + 1
    assert ds.bucket_report.counts == {(48, 80): 6, (64, 64): 2, (80, 48): 20}


def test_epoch_batches_are_seeded_and_bucketed(mixed_dir):
    items = scan_dataset(mixed_dir)
    ds = TrainDataset(items, SMALL, batch_size=3, seed=1)
    e0 = ds.batches_for_epoch(0)
    assert len(e0) == len(ds)
    assert e0 == TrainDataset(items, SMALL, batch_size=3, seed=1).batches_for_epoch(0)
    assert e0 != TrainDataset(items, SMALL, batch_size=3, seed=2).batches_for_epoch(0)
    assert e0 != ds.batches_for_epoch(1)
    assert e0 == ds.batches_for_epoch(0)  # asking again (after another epoch) gives the same
    for epoch in range(3):
        batches = ds.batches_for_epoch(epoch)
        seen = Counter(i for b in batches for i in b)
        assert seen == Counter({i: it.repeats for i, it in enumerate(items)})
        for b in batches:
            assert 1 <= len(b) <= 3
            assert len({ds.assignments[i].bucket for i in b}) == 1
    # buckets interleave (kohya shuffles the batch list, not just within buckets)
    order = [ds.assignments[b[0]].bucket for b in e0]
    assert order != sorted(order)


def test_batch_contents(mixed_dir):
    items = scan_dataset(mixed_dir)
    ds = TrainDataset(items, SMALL, batch_size=2, seed=0)
    ds.set_epoch(0)
    plan = ds.batches_for_epoch(0)
    for b, indices in enumerate(plan):
        batch = ds[b]
        bw, bh = batch["bucket"]
        n = len(indices)
        assert batch["indices"] == indices
        assert batch["pixels"].shape == (n, 3, bh, bw)
        assert batch["pixels"].dtype == torch.float32
        assert batch["pixels"].min() >= -1
        assert batch["pixels"].max() <= 1
        assert "latents" not in batch
        assert batch["keys"] == [items[i].key for i in indices]
        assert batch["captions"] == [items[i].caption for i in indices]
        assert batch["target_sizes"] == [(bh, bw)] * n
        assert batch["flipped"] == [False] * n
        for j, i in enumerate(indices):
            w, h = ds.sizes[i]
            assert batch["original_sizes"][j] == (h, w)
            colour = {"4_wide": RED, "2_tall": GREEN, "1_square": BLUE}[items[i].subset_name]
            expected = torch.tensor(colour, dtype=torch.float32) / 127.5 - 1
            assert torch.allclose(batch["pixels"][j].mean(dim=(1, 2)), expected, atol=0.02)
    wide = ds.load_batch([next(i for i, it in enumerate(items) if it.subset_name == "4_wide")])
    # 96x48 covers the 80x48 bucket (8 columns cropped each side); the SDXL conditioning is
    # kohya's: fitted inside the bucket it is 80x40, a margin of (48 - 40) // 2 = 4 on top
    assert wide["bucket"] == (80, 48)
    assert wide["crop_top_lefts"] == [(4, 0)]
    with pytest.raises(ValueError, match=r"batch mixes buckets"):
        ds.load_batch([0, len(items) - 1])  # different buckets
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_flip_and_random_crop_are_deterministic(tmp_path):
    root = tmp_path / "d" / "8_x"
    root.mkdir(parents=True)
    two_colour((128, 64)).save(root / "a.png")
    items = scan_dataset(tmp_path / "d")
    settings = BucketSettings(resolution=(32, 32), enable_bucket=False)
    ds = TrainDataset(items, settings, batch_size=1, flip_aug=True, seed=3)
    flips = []
    for batch in ds.iter_epoch(0):
        px = batch["pixels"][0]
        left_red = px[0, 16, 1] > 0.9 and px[2, 16, 1] < -0.9
        right_red = px[0, 16, 30] > 0.9 and px[2, 16, 30] < -0.9
        assert left_red != right_red
        assert batch["flipped"][0] == right_red
        # 128x64 -> 64x32 -> centre crop at left 16; mirrored: 64 - 32 - 16 = 16
        assert batch["crop_top_lefts"][0] == (0, 16)
        flips.append(batch["flipped"][0])
    assert 0 < sum(flips) < 8
    assert flips == [b["flipped"][0] for b in TrainDataset(items, settings, flip_aug=True, seed=3).iter_epoch(0)]

    ds = TrainDataset(items, settings, random_crop=True, seed=5)
    crops = [b["crop_top_lefts"][0] for b in ds.iter_epoch(0)]
    assert len(set(crops)) > 1
    assert all(t == 0 and 0 <= left <= 32 for t, left in crops)
    assert crops == [
        b["crop_top_lefts"][0] for b in TrainDataset(items, settings, random_crop=True, seed=5).iter_epoch(0)
    ]


def test_resume_skips_without_decoding(mixed_dir, monkeypatch):
    items = scan_dataset(mixed_dir)
    ds = TrainDataset(items, SMALL, batch_size=2, seed=9, flip_aug=True)
    full = list(ds.iter_epoch(2))
    calls = []
    real = dataset_mod.load_image_rgb
    monkeypatch.setattr(dataset_mod, "load_image_rgb", lambda p, **kw: calls.append(p) or real(p, **kw))
    resumed = list(TrainDataset(items, SMALL, batch_size=2, seed=9, flip_aug=True).iter_epoch(2, start_batch=5))
    assert len(calls) == sum(len(b) for b in ds.batches_for_epoch(2)[5:])
    assert len(resumed) == len(full) - 5
    for a, b in zip(full[5:], resumed, strict=True):
        assert a["keys"] == b["keys"]
        assert a["flipped"] == b["flipped"]
        assert torch.equal(a["pixels"], b["pixels"])


def test_dataloader_and_fixed_mode(mixed_dir):
    items = scan_dataset(mixed_dir)
    ds = TrainDataset(items, BucketSettings(resolution=(32, 32), enable_bucket=False), batch_size=4, seed=0)
    assert ds.buckets == [(32, 32)]
    assert len(ds) == 7
    ds.set_epoch(1)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False)
    batches = list(loader)
    assert len(batches) == 7
    assert all(b["pixels"].shape[1:] == (3, 32, 32) for b in batches)
    assert [b["keys"] for b in batches] == [[items[i].key for i in b] for b in ds.batches_for_epoch(1)]


def test_dataset_errors(tmp_path, mixed_dir):
    items = scan_dataset(mixed_dir)
    with pytest.raises(DatasetError):
        TrainDataset([], SMALL)
    with pytest.raises(ConfigError):
        TrainDataset(items, SMALL, batch_size=0)
    with pytest.raises(DatasetError):
        TrainDataset([ImageItem(items[0].path, "", 0, "x")], SMALL)

    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DatasetError) as e:  # unreadable header: found when the dataset is built
        TrainDataset([ImageItem(junk, "", 1, "x")], SMALL)
    assert "junk.png" in str(e.value)

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    cut = tmp_path / "cut.png"
    cut.write_bytes(buf.getvalue()[:2000])
    ds = TrainDataset([ImageItem(cut, "", 1, "x")], SMALL)  # truncation shows only when decoding
    with pytest.raises(DatasetError) as e:
        ds[0]
    assert "cut.png" in str(e.value)


def test_user_folder_untouched(kohya_dir):
    before = tree_hashes(kohya_dir)
    items = scan_dataset(kohya_dir)
    ds = TrainDataset(items, SMALL, batch_size=2, flip_aug=True)
    for _ in ds.iter_epoch(0):
        pass
    assert tree_hashes(kohya_dir) == before


def test_workshop_state_folder_is_skipped_silently_but_other_hidden_folders_are_reported(tmp_path):
    sub = tmp_path / "3_thing"
    sub.mkdir()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(sub / "a.png")
    for hidden in (tmp_path / ".workshop", tmp_path / ".trash"):
        hidden.mkdir()
        Image.new("RGB", (64, 64)).save(hidden / "b.png")
    items = scan_dataset(tmp_path)
    assert [i.path.name for i in items] == ["a.png"]
    assert items.report.hidden_files == [tmp_path / ".trash"]
