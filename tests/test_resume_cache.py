"""Resume is exact with the latent cache: in memory, on disk, and without it.

The WebUI's VAE encode samples the latent distribution with torch's global generator
(``DiagonalGaussianDistribution.sample``: mean + std * ``torch.randn``); the adapter here does the
same, so caching latents draws random numbers as it does in the WebUI.
"""

from __future__ import annotations

import random

import pytest
import torch

from lora_trainer.files.lora_file import load_lora
from lora_trainer.train.loop import train
from tests.fixtures.training import StopAfter, make_config
from tests.fixtures.webui_models import TinyAdapter


class SamplingAdapter(TinyAdapter):
    """A tiny model whose VAE encode samples its latent distribution with the global generator, as the WebUI's."""

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        mean = super().encode_images(pixels).float()
        return (mean + 0.5 * torch.randn(mean.shape).to(mean.device)).to(self.dtype)


def _weights(result) -> dict[str, torch.Tensor]:
    assert result.output_path is not None
    return load_lora(result.output_path)[0]


class Previews(StopAfter):
    """Previews as the WebUI makes them with seed -1: each seeds the global generator with a random seed
    (``modules.rng.manual_seed``). Stops after ``steps`` steps when given."""

    def __init__(self, steps: int | None = None):
        super().__init__(steps if steps is not None else 10**9)
        self.previews = 0

    def on_sample(self, step, epoch):
        self.previews += 1
        torch.manual_seed(random.SystemRandom().randrange(2**31))


OVERRIDES = {
    "training.max_train_steps": 8,
    "training.gradient_accumulation_steps": 2,
    "dataset.shuffle_caption": True,
    "dataset.caption_tag_dropout_rate": 0.2,
    "dataset.flip_aug": True,
    "network.network_dropout": 0.1,
    "optim.lr_scheduler": "cosine",
    "save.save_precision": "float",
    "sample.sample_every_n_steps": 2,
    "sample.sample_prompts": ["subject"],
}

CACHES = {
    "memory": {"dataset.cache_latents": True, "dataset.cache_latents_to_disk": False},
    "disk": {"dataset.cache_latents": True, "dataset.cache_latents_to_disk": True},
    "none": {"dataset.cache_latents": False},
}


def _full_and_resumed(tmp_path, family: str, cache: str, stop_after: int = 3):
    overrides = {**OVERRIDES, **CACHES[cache]}
    full_cfg = make_config(tmp_path / "a", **overrides)
    previews = Previews()
    full = train(full_cfg, SamplingAdapter(family), previews, work_dir=tmp_path / "a" / "work")
    assert previews.previews == full.steps // 2
    cfg = make_config(tmp_path / "b", **overrides)
    partial = train(cfg, SamplingAdapter(family), Previews(stop_after), work_dir=tmp_path / "b" / "work")
    assert partial.stopped_early
    assert partial.steps == stop_after
    resumed = train(cfg, SamplingAdapter(family), Previews(), work_dir=tmp_path / "b" / "work", resume=True)
    return full, resumed


@pytest.mark.parametrize(("family", "cache"), [("sd1", "memory"), ("sd1", "disk"), ("sd1", "none"), ("sdxl", "memory")])
def test_resume_with_latent_cache_is_exact(tmp_path, family, cache):
    assert torch.get_num_threads() == 1  # bit-exact comparisons need one thread (tests/conftest.py)
    full, resumed = _full_and_resumed(tmp_path, family, cache)
    assert resumed.steps == full.steps == 8
    assert resumed.losses == full.losses
    a = _weights(full)
    b = _weights(resumed)
    assert a.keys() == b.keys()
    assert all(a[k].dtype == torch.float32 for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_the_disk_cache_was_deleted_is_exact(tmp_path):
    """A resumed run that finds no cache files encodes the latents again, drawn as the first run drew them."""
    overrides = {**OVERRIDES, **CACHES["disk"]}
    full = train(make_config(tmp_path / "a", **overrides), SamplingAdapter("sd1"), work_dir=tmp_path / "a" / "work")
    cfg = make_config(tmp_path / "b", **overrides)
    train(cfg, SamplingAdapter("sd1"), StopAfter(3), work_dir=tmp_path / "b" / "work")
    files = list((tmp_path / "b" / "work" / "latents").glob("*.safetensors"))
    assert len(files) == 4  # 2 images, each also mirrored (flip_aug)
    for f in files:
        f.unlink()
    resumed = train(cfg, SamplingAdapter("sd1"), work_dir=tmp_path / "b" / "work", resume=True)
    assert resumed.losses == full.losses
    a = _weights(full)
    b = _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_same_lora_whether_latents_are_encoded_or_read_from_disk(tmp_path):
    """Encoding latents draws random numbers; reading them from the disk cache does not. The steps'
    random numbers are the same either way, so a second run on the same seed repeats the first."""
    cfg = make_config(tmp_path, **{**OVERRIDES, **CACHES["disk"], "save.overwrite": True})
    first = train(cfg, SamplingAdapter("sd1"), work_dir=tmp_path / "work")
    first_weights = _weights(first)
    second = train(cfg, SamplingAdapter("sd1"), work_dir=tmp_path / "work")  # every latent from disk
    assert second.losses == first.losses
    again = _weights(second)
    assert all(torch.equal(first_weights[k], again[k]) for k in first_weights)
