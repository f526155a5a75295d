"""The attention a run trains with (``lora_trainer.backends.webui.attention``), on the stand-in WebUI.

The stand-in applies "InvokeAI" (the WebUI's choice on a CPU) when installed; a run must train
with torch's scaled-dot-product attention (or xformers where it works under backward), generate
its previews with the WebUI's choice, and leave the WebUI's choice and the model as found after
every ending.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from lora_trainer.jobs import JobManager
from tests.fixtures import webui_models
from tests.fixtures.fake_webui import FakeWebUI
from tests.fixtures.fake_webui.optimizations import (
    PLAIN_FORWARD,
    SdOptimizationXformers,
    scaled_dot_product_attention_forward,
    split_cross_attention_forward_invokeAI,
)
from tests.fixtures.model_state import assert_model_unchanged, model_snapshot
from tests.fixtures.training import make_config


def _config(tmp_path, steps: int, **overrides):
    cfg = make_config(tmp_path, **{"training.max_train_steps": steps, **overrides})
    cfg.save.output_dir = None
    return cfg


def _whole_model(fake: FakeWebUI):
    return types.SimpleNamespace(unet=fake.sd_model, text_encoders={})


def _attention_now() -> tuple[object, str | None]:
    current = sys.modules["modules.sd_hijack"].current_optimizer
    return webui_models.CrossAttention.forward, getattr(current, "name", None)


@pytest.mark.parametrize("ending", ["done", "failure", "cancel"])
def test_a_run_trains_with_sdp_previews_and_ends_with_the_webui_choice(make_webui, tmp_path, ending):
    fake = make_webui("sd1")
    assert webui_models.CrossAttention.forward is split_cross_attention_forward_invokeAI
    host = fake.backend.host.WebUIHost()
    manager = JobManager(host)
    before = model_snapshot(_whole_model(fake))
    during, in_previews = [], []
    original_progress = host.on_job_progress

    def progress(job):
        original_progress(job)
        if job.step:
            during.append(_attention_now())
        if job.step == 2 and ending == "cancel":
            manager.cancel(job.id)
        if job.step == 2 and ending == "failure":
            raise RuntimeError("injected failure after a step")

    host.on_job_progress = progress
    processing = sys.modules["modules.processing"]
    process_images = processing.process_images

    def recording_process_images(p):
        in_previews.append(_attention_now())
        return process_images(p)

    processing.process_images = recording_process_images
    cfg = _config(tmp_path, 4, **{"network.train_text_encoder": True})
    cfg.sample.sample_prompts, cfg.sample.sample_every_n_steps = ["a cat"], 1
    job = manager.wait(manager.start(cfg).id, timeout=120)
    processing.process_images = process_images

    assert job.state == {"done": "done", "failure": "failed", "cancel": "stopped"}[ending], job.error
    assert during
    assert set(during) == {(scaled_dot_product_attention_forward, "sdp")}
    assert in_previews
    assert set(in_previews) == {(split_cross_attention_forward_invokeAI, "InvokeAI")}
    assert _attention_now() == (split_cross_attention_forward_invokeAI, "InvokeAI")
    assert fake.hijack.optimization_method == "InvokeAI"
    assert_model_unchanged(_whole_model(fake), before)


def test_an_out_of_memory_error_puts_the_webui_choice_back(make_webui, tmp_path):
    fake = make_webui("sd1")
    host = fake.backend.host.WebUIHost()
    during = []

    def step():
        with host.training_session():
            during.append(_attention_now())
            raise MemoryError("out of memory in a step")

    with pytest.raises(MemoryError):
        step()
    assert during == [(scaled_dot_product_attention_forward, "sdp")]
    assert _attention_now() == (split_cross_attention_forward_invokeAI, "InvokeAI")


@pytest.mark.parametrize(
    ("webui_choice", "xformers", "trains_with"),
    [
        ("InvokeAI", "works", "xformers"),
        ("InvokeAI", "fails under backward", "sdp"),
        ("sdp", None, "sdp"),
        (None, None, "sdp"),
    ],
)
def test_the_training_attention_is_picked_and_restored(make_webui, monkeypatch, webui_choice, xformers, trains_with):
    fake = make_webui("sd1")
    attention = fake.backend.attention
    if xformers is not None:
        fake.optimizers.insert(0, SdOptimizationXformers())
        monkeypatch.setattr(attention, "xformers_backward_works", lambda device, dtype: xformers == "works")
    fake.apply_attention(webui_choice)
    found = _attention_now()
    host = fake.backend.host.WebUIHost()
    assert host.free_memory().attention == trains_with  # the memory plan counts the attention the run uses
    with host.training_session():
        assert _attention_now()[1] == trains_with
    assert _attention_now() == found
    if webui_choice is None:
        assert found == (PLAIN_FORWARD, None)


def test_xformers_probe_is_false_without_a_working_xformers(make_webui):
    attention = make_webui("sd1").backend.attention
    try:
        import xformers.ops  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("xformers is installed here")
    assert attention.xformers_backward_works(torch.device("cpu"), torch.float32) is False
