import json
import struct
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

from lora_trainer.data.buckets import BucketSettings
from lora_trainer.data.cache import LatentCache, LatentRequest, cache_key
from lora_trainer.data.dataset import TrainDataset
from lora_trainer.data.scan import scan_dataset
from lora_trainer.errors import DatasetError
from lora_trainer.files.hashes import file_sha256
from tests.fixtures.files import tree_hashes

SMALL = BucketSettings(resolution=(64, 64), min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16)


class ToyVAE:
    """8x average pooling: a deterministic, equivariant stand-in for a VAE encoder."""

    def __init__(self):
        self.calls: list[tuple[int, ...]] = []

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        assert pixels.dim() == 4
        assert pixels.shape[1] == 3
        assert pixels.dtype == torch.float32
        self.calls.append(tuple(pixels.shape))
        return F.avg_pool2d(pixels, 8)

    @property
    def encoded(self) -> int:
        return sum(c[0] for c in self.calls)


def gradient(path: Path, size=(64, 32), shift=0) -> Path:
    w, h = size
    img = Image.new("RGB", size)
    img.putdata([((x * 4 + shift) % 256, (y * 8) % 256, 128) for y in range(h) for x in range(w)])
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def test_memory_cache_hits(tmp_path):
    img = gradient(tmp_path / "a.png")
    vae = ToyVAE()
    cache = LatentCache()
    req = LatentRequest(img, (32, 32))
    (lat,) = cache.get_or_encode([req], vae, vae_id="vae-A")
    assert lat.shape == (3, 4, 4)
    assert lat.dtype == torch.float32
    (again,) = cache.get_or_encode([req], vae, vae_id="vae-A")
    assert again is lat
    assert vae.encoded == 1
    assert cache.stats["memory_hits"] == 1
    # the same request twice in one call is encoded once
    reqs = [LatentRequest(img, (48, 32)), LatentRequest(img, (48, 32))]
    a, b = cache.get_or_encode(reqs, vae, vae_id="vae-A", batch_size=2)
    assert a is b
    assert vae.encoded == 2


def test_disk_cache_is_safetensors_and_reused(tmp_path):
    img = gradient(tmp_path / "imgs" / "a.png")
    cache_dir = tmp_path / "cache"
    vae = ToyVAE()
    req = LatentRequest(img, (32, 32))
    (lat,) = LatentCache(cache_dir).get_or_encode([req], vae, vae_id="vae-A")
    key = cache_key(file_sha256(img), req, "vae-A")
    files = sorted(p.name for p in cache_dir.iterdir())
    assert files == [f"{key}.safetensors"]
    path = cache_dir / files[0]
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])  # plain safetensors: a JSON header, no pickle
    assert set(header) == {"__metadata__", "latents"}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert torch.equal(f.get_tensor("latents"), lat)
    assert meta["vae_id"] == "vae-A"
    assert meta["size"] == "32x32"
    assert meta["key"] == key
    assert meta["content_sha256"] == file_sha256(img)

    fresh = LatentCache(cache_dir)  # a new process: found on disk, not encoded
    (lat2,) = fresh.get_or_encode([req], vae, vae_id="vae-A")
    assert torch.equal(lat, lat2)
    assert vae.encoded == 1
    assert fresh.stats["disk_hits"] == 1


def test_changes_miss(tmp_path):
    img = gradient(tmp_path / "a.png")
    cache_dir = tmp_path / "cache"
    vae = ToyVAE()
    cache = LatentCache(cache_dir)
    base = LatentRequest(img, (32, 32))
    (first,) = cache.get_or_encode([base], vae, vae_id="vae-A")
    assert vae.encoded == 1

    cache.get_or_encode([base], vae, vae_id="vae-B")  # another VAE
    assert vae.encoded == 2
    cache.get_or_encode([LatentRequest(img, (48, 32))], vae, vae_id="vae-A")  # another size
    assert vae.encoded == 3
    (flipped,) = cache.get_or_encode([LatentRequest(img, (32, 32), flip=True)], vae, vae_id="vae-A")
    assert vae.encoded == 4
    torch.testing.assert_close(flipped, first.flip(-1))

    gradient(img, shift=40)  # same name, same size, new content
    (changed,) = LatentCache(cache_dir).get_or_encode([base], vae, vae_id="vae-A")
    assert vae.encoded == 5
    assert not torch.equal(changed, first)
    assert len(list(cache_dir.glob("*.safetensors"))) == 5


@pytest.mark.parametrize("damage", ["garbage", "truncate", "wrong_key"])
def test_corrupt_file_is_reencoded(tmp_path, records, damage):
    img = gradient(tmp_path / "a.png")
    cache_dir = tmp_path / "cache"
    vae = ToyVAE()
    req = LatentRequest(img, (32, 32))
    (lat,) = LatentCache(cache_dir).get_or_encode([req], vae, vae_id="v")
    (path,) = cache_dir.glob("*.safetensors")
    if damage == "garbage":
        path.write_bytes(b"\x00\x01 definitely not safetensors")
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:-20])
    else:  # a valid file stored under another entry's name
        other = LatentRequest(img, (48, 32))
        LatentCache(cache_dir).get_or_encode([other], vae, vae_id="v")
        other_path = cache_dir / f"{cache_key(file_sha256(img), other, 'v')}.safetensors"
        path.write_bytes(other_path.read_bytes())
    n = vae.encoded
    fresh = LatentCache(cache_dir)
    (again,) = fresh.get_or_encode([req], vae, vae_id="v")
    assert vae.encoded == n + 1
    assert fresh.stats["corrupt"] == 1
    assert torch.equal(again, lat)
    assert any("damaged" in r.getMessage() and path.name in r.getMessage() for r in records)
    fresh2 = LatentCache(cache_dir)  # the file was replaced by a good one
    fresh2.get_or_encode([req], vae, vae_id="v")
    assert fresh2.stats["disk_hits"] == 1
    assert vae.encoded == n + 1


def test_random_crop_is_refused(tmp_path):
    img = gradient(tmp_path / "d" / "1_x" / "a.png")
    with pytest.raises(DatasetError) as e:
        LatentCache().get_or_encode([LatentRequest(img, (32, 32), crop="random")], ToyVAE(), vae_id="v")
    assert "random crop" in str(e.value).lower()
    ds = TrainDataset(scan_dataset(tmp_path / "d"), SMALL, random_crop=True)
    with pytest.raises(DatasetError) as e:
        ds.cache_latents(LatentCache(), ToyVAE(), vae_id="v")
    assert "random crop" in str(e.value).lower()


def test_bad_encoder_output(tmp_path):
    img = gradient(tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"encode_fn returned .* for 1 images; expected \(B, C, h, w\)"):
        LatentCache().get_or_encode([LatentRequest(img, (32, 32))], lambda px: px[0], vae_id="v")


def test_dataset_with_cached_latents(tmp_path):
    root = tmp_path / "data"
    gradient(root / "3_a" / "wide.png", (96, 48))
    gradient(root / "3_a" / "square.png", (64, 64), shift=7)
    gradient(root / "2_b" / "tall.png", (48, 96), shift=99)
    gradient(root / "2_b" / "tall2.png", (40, 80), shift=3)
    items = scan_dataset(root)
    before = tree_hashes(root)
    cache_dir = tmp_path / "cache"

    plain = TrainDataset(items, SMALL, batch_size=2, flip_aug=True, seed=4)
    ds = TrainDataset(items, SMALL, batch_size=2, flip_aug=True, seed=4)
    vae = ToyVAE()
    progress = []
    ds.cache_latents(
        LatentCache(cache_dir), vae, vae_id="v", batch_size=4, progress=lambda d, t: progress.append((d, t))
    )
    assert ds.latents_cached
    assert vae.encoded == 2 * len(items)  # each image and its mirror
    assert all(len({c[2:]}) == 1 for c in vae.calls)  # one size per encoder batch
    assert progress[-1] == (2 * len(items), 2 * len(items))

    saw_flip = False
    for a, b in zip(plain.iter_epoch(1), ds.iter_epoch(1), strict=True):
        assert "pixels" not in b
        assert "latents" in b
        for key in ("keys", "captions", "flipped", "original_sizes", "crop_top_lefts", "target_sizes", "bucket"):
            assert a[key] == b[key], key
        # the cached latent is the encoding of exactly the pixels the uncached path loads
        torch.testing.assert_close(b["latents"], F.avg_pool2d(a["pixels"], 8), atol=1e-5, rtol=0)
        saw_flip |= any(b["flipped"])
    assert saw_flip

    again = TrainDataset(items, SMALL, batch_size=2, flip_aug=True, seed=4)
    cache = LatentCache(cache_dir)
    again.cache_latents(cache, vae, vae_id="v")
    assert vae.encoded == 2 * len(items)
    assert cache.stats["disk_hits"] == 2 * len(items)

    assert tree_hashes(root) == before  # nothing written into the image folders
    assert all(p.suffix == ".safetensors" for p in cache_dir.iterdir())

    ds.drop_latents()
    assert "pixels" in ds.load_batch(ds.batches_for_epoch(0)[0])
