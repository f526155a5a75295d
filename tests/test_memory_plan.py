"""The memory and time plan (``lora_trainer.train.memory``): how it responds to settings, its
suggestions, its agreement with the measured peak of the tiny models, and where it shows (API, tab)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from lora_trainer.contracts import DeviceMemory
from lora_trainer.jobs import JobManager
from lora_trainer.train.memory import (
    GB,
    Settings,
    estimate,
    peak_bytes,
    profile_model,
    settings_from_config,
)
from lora_trainer.webui import render
from lora_trainer.webui.api import PREFIX, mount
from tests.fixtures.host import FakeHost
from tests.fixtures.memory_probe import training_peak
from tests.fixtures.training import make_dataset
from tests.fixtures.webui_models import TinyAdapter, build_webui_model, components

FAMILIES = ("sd1", "sd2", "sdxl")


@pytest.fixture(scope="module")
def full_profiles():
    """Full-size SD1/SDXL architectures on the meta device (no memory), fp16 as the WebUI holds them."""
    out = {}
    for family in ("sd1", "sdxl"):
        unet, tes = components(build_webui_model(family, "full", device="meta"))
        unet.half()
        for te in tes.values():
            te.half()
        out[family] = profile_model(family, unet, tes)
    return out


@pytest.fixture(scope="module")
def tiny_profiles():
    out = {}
    for family in FAMILIES:
        a = TinyAdapter(family)
        out[family] = profile_model(family, a.unet, a.text_encoders, a.root.first_stage_model)
    return out


def test_full_size_parameter_counts_are_the_real_models(full_profiles):
    sd1, sdxl = full_profiles["sd1"], full_profiles["sdxl"]
    assert sd1.parts["unet"].params == 859_520_964  # SD1.5's UNet
    assert sd1.parts["te"].params == 123_060_480  # CLIP ViT-L/14 text
    assert sdxl.parts["unet"].params == 2_567_463_684  # SDXL base UNet
    assert sd1.parts["unet"].bytes == 2 * 859_520_964
    assert sd1.parts["vae"].params == 83_653_863  # the standard VAE, when the model gives none
    # kohya's rank-16 UNet LoRA of SD1.5 (192 modules) has 3,188,736 parameters (attention-only targets)
    assert sd1.lora_params(16, 0, True, False) > 2_000_000
    assert sd1.lora_params(32, 0, True, False) == 2 * sd1.lora_params(16, 0, True, False)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_estimate_grows_with_batch_resolution_and_rank(full_profiles, tiny_profiles, family):
    for profile in (full_profiles[family], tiny_profiles[family]):
        base = Settings(width=512, height=512, batch=1, rank=16)
        peak = peak_bytes(profile, base)
        assert peak_bytes(profile, dataclasses.replace(base, batch=2)) > peak
        assert peak_bytes(profile, dataclasses.replace(base, width=768, height=768)) > peak
        assert peak_bytes(profile, dataclasses.replace(base, rank=64)) > peak
        assert peak_bytes(profile, dataclasses.replace(base, train_text_encoder=True)) > peak
        assert peak_bytes(profile, dataclasses.replace(base, conv_rank=8)) > peak


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_memory_savers_lower_the_estimate(full_profiles, family):
    profile = full_profiles[family]
    base = Settings(width=512, height=512, batch=2, rank=32, cache_latents=False, gradient_checkpointing=True)
    peak = peak_bytes(profile, base)
    cached = peak_bytes(profile, dataclasses.replace(base, cache_latents=True))
    # encoding a batch (before the forward pass) outgrows SD1's checkpointed activations, not SDXL's
    assert cached < peak if family == "sd1" else cached <= peak
    for change in (
        {"placement": "medvram", "cache_text_encoder_outputs": True},  # --medvram: the text encoders leave
        {"optimizer": "AdamW8bit"},
        {"rank": 8},
    ):
        assert peak_bytes(profile, dataclasses.replace(base, **change)) < peak, change
    base = dataclasses.replace(base, cache_latents=True, gradient_checkpointing=False)
    peak = peak_bytes(profile, base)
    assert peak_bytes(profile, dataclasses.replace(base, attention="Doggettx")) > peak  # keeps n x n softmaxes
    assert peak_bytes(profile, dataclasses.replace(base, optimizer="Prodigy")) > peak
    # the big one: checkpointing takes most activations away (SDXL 1024 px: many GB)
    saved = peak - peak_bytes(profile, dataclasses.replace(base, gradient_checkpointing=True))
    assert saved > 0.5 * GB


def test_sdxl_on_an_8gb_card_gets_ordered_suggestions_that_fit(full_profiles):
    profile = full_profiles["sdxl"]
    memory = DeviceMemory("cuda", 8 * 10**9, 8 * 10**9, "8 GB card", "sdp")
    plan = estimate(profile, Settings(width=1024, height=1024, batch=1, rank=32), memory)
    assert plan.fits is False
    assert plan.suggestions
    assert plan.suggestions[0].change == "gradient checkpointing on"
    peaks = [s.peak_bytes for s in plan.suggestions]
    assert peaks == sorted(peaks, reverse=True)  # each change lowers the peak further
    assert plan.suggestions[-1].fits
    assert not any(s.fits for s in plan.suggestions[:-1])
    assert "does NOT fit" in plan.summary()
    assert plan.advice().startswith("Try: gradient checkpointing on (~")
    fitting = estimate(profile, Settings(width=1024, height=1024), DeviceMemory("cuda", 80 * 10**9, None))
    assert fitting.fits is True
    assert fitting.suggestions == []


def test_seconds_per_step_grows_with_the_work(full_profiles):
    profile = full_profiles["sdxl"]
    flops = 100e12
    one = estimate(profile, Settings(width=1024, height=1024), flops_per_s=flops).seconds_per_step
    two = estimate(profile, Settings(width=1024, height=1024, batch=2), flops_per_s=flops).seconds_per_step
    gc = estimate(
        profile, Settings(width=1024, height=1024, gradient_checkpointing=True), flops_per_s=flops
    ).seconds_per_step
    assert one is not None
    assert two is not None
    assert gc is not None
    assert 1.5 * one < two < 2 * one  # twice the work, the same per-module overhead
    assert gc > one
    assert estimate(profile, Settings()).seconds_per_step is None  # no throughput: unknown, not a guess


def measured_run(tmp_path, family, resolution, batch, checkpointing):
    adapter = TinyAdapter(family)
    data = make_dataset(tmp_path / "data", n=2, size=resolution)
    from tests.fixtures.training import make_config

    cfg = make_config(
        tmp_path,
        **{
            "dataset.train_data_dir": str(data),
            "dataset.resolution": resolution,
            "dataset.cache_latents": True,
            "training.max_train_steps": 1,
            "training.train_batch_size": batch,
            "training.gradient_checkpointing": checkpointing,
        },
    )
    measured = training_peak(adapter, cfg, tmp_path / "work")
    profile = profile_model(family, adapter.unet, adapter.text_encoders, adapter.root.first_stage_model)
    return measured, peak_bytes(profile, settings_from_config(cfg), "cpu")


@pytest.mark.parametrize(("family", "checkpointing"), [("sd1", False), ("sdxl", True)])
def test_estimate_is_within_a_band_of_the_measured_peak(tmp_path, family, checkpointing):
    """The tiny models' peak of live tensors during a step, measured with torch's profiler on the CPU
    (``bench/bench_memory_plan.py`` prints more settings)."""
    torch.manual_seed(0)
    measured, estimated = measured_run(tmp_path, family, 192, 1, checkpointing)
    assert 0.75 < estimated / measured < 1.5, (estimated, measured)


def test_plan_api_and_job_memory_report(tmp_path):
    host = FakeHost(tmp_path)
    manager = JobManager(host)
    app = FastAPI()
    mount(app, manager)
    from tests.fixtures.training import make_config

    cfg = make_config(tmp_path, **{"training.max_train_steps": 2})
    cfg.save.output_dir = None
    with TestClient(app) as client:
        r = client.post(f"{PREFIX}/plan", json=cfg.to_dict())
        assert r.status_code == 200, r.text
        plan = r.json()
        assert plan["fits"] is True
        assert plan["free_gb"] == 8.0
        assert plan["settings"]["width"] == 64
        assert plan["peak_gb"] > 0
        assert set(plan["parts_gb"]) >= {"weights", "lora", "optimizer", "activations"}
        bigger = cfg.to_dict()
        bigger["training"]["train_batch_size"] = 4
        assert client.post(f"{PREFIX}/plan", json=bigger).json()["peak_gb"] > plan["peak_gb"]
        bad = cfg.to_dict()
        bad["network"]["network_dim"] = 0
        r = client.post(f"{PREFIX}/plan", json=bad)
        assert r.status_code == 422
        assert r.json()["field"] == "network.network_dim"
    job = manager.start(cfg)
    manager.wait(job.id, timeout=120)
    memory = job.to_dict()["memory"]
    assert memory["estimated_peak_gb"] == pytest.approx(plan["peak_gb"], rel=1e-6)
    assert memory["measured_peak_gb"] is None  # CPU: the estimate only
    assert "estimated peak" in render.status_html(job.to_dict())


def test_plan_html_shows_the_verdict_and_advice(full_profiles):
    memory = DeviceMemory("cuda", 6 * 10**9, 6 * 10**9, "6 GB card", "sdp")
    html = render.plan_html(estimate(full_profiles["sdxl"], Settings(width=1024, height=1024), memory).to_dict())
    assert 'data-fits="false"' in html
    assert "does NOT fit" in html
    assert "Try: gradient checkpointing on" in html
    assert "No plan" in render.plan_html(None)


def test_plan_button_shows_the_plan_of_the_fields(tmp_path):
    from lora_trainer.webui import fields
    from lora_trainer.webui.ui import _Actions, create_tab
    from tests.fixtures.training import make_config

    host = FakeHost(tmp_path / "host")
    manager = JobManager(host)
    actions = _Actions(manager, host, tmp_path / "presets")
    cfg = make_config(tmp_path, **{"training.train_batch_size": 2})
    html = actions.plan(*fields.widget_values(cfg))
    assert "lora_train_plan" in html
    assert "batch 2" in html
    assert "fits" in html
    host.memory = DeviceMemory("cpu", 1000, 1000, "tiny device", "sdp")
    assert "does NOT fit" in actions.plan(*fields.widget_values(cfg))
    cfg.network.network_dim = 0
    assert "Fix these settings to plan" in actions.plan(*fields.widget_values(cfg))
    ids = [getattr(b, "elem_id", None) for b in create_tab(manager, host).blocks.values()]
    assert "lora_train_plan_button" in ids
    assert "lora_train_plan" in ids
