"""``bench/bench_webui_step.py``'s parts that run without a WebUI: its job settings are ones the
extension accepts (and mean what its docstring says), its images, and its reading of process memory."""

from __future__ import annotations

import os

from PIL import Image

from lora_trainer.config.model import TrainConfig
from tests.fixtures.bench import load_bench


def test_job_settings_are_accepted_and_fixed(monkeypatch, tmp_path):
    bench = load_bench("bench_webui_step", monkeypatch)
    for checkpointing in (False, True):
        config = TrainConfig.from_dict(bench.job_body(tmp_path, "b", checkpointing))
        assert config.training.gradient_checkpointing is checkpointing
        assert (config.network.network_dim, config.network.network_alpha) == (32, 16)
        assert config.network.train_unet
        assert config.network.train_text_encoder
        assert (config.training.max_train_steps, config.training.train_batch_size, config.training.seed) == (12, 1, 42)
        assert config.training.mixed_precision == "no"
        assert config.optim.optimizer_type == "AdamW"
        assert config.dataset.cache_latents
        assert not config.dataset.enable_bucket
        assert config.dataset.resolution in (256, (256, 256))


def test_images_are_twelve_captioned_256px_and_repeatable(monkeypatch, tmp_path):
    bench = load_bench("bench_webui_step", monkeypatch)
    folder = bench.write_images(tmp_path / "a") / "1_thing"
    images = sorted(folder.glob("*.png"))
    assert len(images) == 12
    assert all(Image.open(p).size == (256, 256) for p in images)
    assert all(p.with_suffix(".txt").read_text().startswith("thing, ") for p in images)
    again = bench.write_images(tmp_path / "b") / "1_thing"
    assert [p.read_bytes() for p in images] == [p.read_bytes() for p in sorted(again.glob("*.png"))]


def test_process_memory_is_read_in_bytes(monkeypatch):
    bench = load_bench("bench_webui_step", monkeypatch)
    memory = bench.proc_memory(os.getpid())
    assert 10 * 1024**2 < memory["VmRSS"] <= memory["VmHWM"]
