"""Out of memory is an answer: an injected torch OutOfMemoryError in each phase of a job.

The job ends as "failed" with the phase and the plan's advice, the model is bit-identical, what was
trained is saved (file + resume state) when steps were done, nothing is written when none were,
and the memory the failed call held is let go.
"""

from __future__ import annotations

import weakref

import pytest
import torch

from lora_trainer.errors import OutOfMemory
from lora_trainer.files.lora_file import load_lora
from lora_trainer.jobs import JobManager
from lora_trainer.train import loop
from lora_trainer.train.device import is_out_of_memory
from lora_trainer.train.memory import format_bytes
from lora_trainer.train.oom import oom_phase
from tests.fixtures.host import FakeHost
from tests.fixtures.model_state import assert_model_unchanged, model_snapshot
from tests.fixtures.training import make_config

OOM_ERRORS = [torch.OutOfMemoryError, torch.cuda.OutOfMemoryError]


def run_job(tmp_path, host, **overrides):
    cfg = make_config(tmp_path, **overrides)
    cfg.save.output_dir = None
    manager = JobManager(host)
    job = manager.start(cfg)
    manager.wait(job.id, timeout=120)
    return job


def fail_on_call(n, error=torch.OutOfMemoryError, keep=None):
    """A function that raises ``error`` on its n-th call (1-based) and passes through before."""

    def wrap(fn):
        calls = {"n": 0}

        def run(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == n:
                big = torch.ones(256, 256)  # held by the failing frame, through the traceback
                if keep is not None:
                    keep.append(weakref.ref(big))
                raise error("CUDA out of memory. Tried to allocate 2.00 GiB")
            return fn(*args, **kwargs)

        return run

    return wrap


def written(host):
    return sorted(p.name for p in host.lora_dir.glob("*.safetensors"))


@pytest.mark.parametrize("error", OOM_ERRORS)
def test_oom_in_a_step_saves_what_was_trained_and_advises(tmp_path, monkeypatch, error):
    host = FakeHost(tmp_path)
    snapshot = model_snapshot(host.adapter)
    held = []
    host.adapter.predict = fail_on_call(3, error, held)(host.adapter.predict)  # steps 1 and 2 done
    alive_at_save = []
    save_lora = loop.save_lora

    def save(*args, **kwargs):
        alive_at_save.append(held[0]() is not None if held else None)
        return save_lora(*args, **kwargs)

    monkeypatch.setattr(loop, "save_lora", save)
    job = run_job(tmp_path, host)
    assert job.state == "failed"
    assert job.phase == "Out of memory"
    assert job.error.startswith("Out of memory during a step at 64x64 px, batch 1: estimated peak")
    assert "8.0 GB free" in job.error
    assert "Try: " in job.error
    assert "gradient checkpointing on" in job.error
    del host.adapter.predict
    assert_model_unchanged(host.adapter, snapshot)
    assert job.step == 2
    assert written(host) == ["tiny.safetensors"]
    assert job.output_file == str(host.lora_dir / "tiny.safetensors")
    assert host.published == [host.lora_dir / "tiny.safetensors"]
    _, metadata = load_lora(host.lora_dir / "tiny.safetensors")
    assert metadata["ss_steps"] == "2"
    assert (host.work_dir / "states" / "tiny" / "state.json").is_file()  # resumable, as after a stop
    assert alive_at_save == [False]  # the failing call's tensors were let go before the partial save
    assert ("end", "failed") in host.events


def test_oom_in_the_first_step_writes_nothing(tmp_path):
    host = FakeHost(tmp_path)
    snapshot = model_snapshot(host.adapter)
    host.adapter.predict = fail_on_call(1)(host.adapter.predict)
    job = run_job(tmp_path, host)
    assert job.state == "failed"
    assert "Out of memory during a step" in job.error
    assert "saved" not in job.error
    del host.adapter.predict
    assert_model_unchanged(host.adapter, snapshot)
    assert written(host) == []
    assert job.output_file is None
    assert not (host.work_dir / "states" / "tiny").exists()


def test_oom_while_caching_latents_writes_nothing(tmp_path):
    host = FakeHost(tmp_path)
    snapshot = model_snapshot(host.adapter)
    host.adapter.encode_images = fail_on_call(1)(host.adapter.encode_images)
    job = run_job(tmp_path, host, **{"dataset.cache_latents": True})
    assert job.state == "failed"
    assert job.error.startswith("Out of memory during latent caching at 64x64 px")
    del host.adapter.encode_images
    assert_model_unchanged(host.adapter, snapshot)
    assert written(host) == []
    assert job.step == 0


def test_oom_in_a_preview_keeps_the_steps_before_it(tmp_path):
    host = FakeHost(tmp_path)
    snapshot = model_snapshot(host.adapter)
    host.sample_images = fail_on_call(1)(host.sample_images)
    job = run_job(tmp_path, host, **{"sample.sample_every_n_steps": 3, "sample.sample_prompts": ["subject, photo"]})
    assert job.state == "failed"
    assert job.error.startswith("Out of memory during a preview")
    assert_model_unchanged(host.adapter, snapshot)
    assert job.step == 3
    assert written(host) == ["tiny.safetensors"]
    _, metadata = load_lora(host.lora_dir / "tiny.safetensors")
    assert metadata["ss_steps"] == "3"


def test_oom_while_saving_once_is_retried_after_releasing_memory(tmp_path, monkeypatch):
    host = FakeHost(tmp_path)
    snapshot = model_snapshot(host.adapter)
    monkeypatch.setattr(loop, "save_lora", fail_on_call(1)(loop.save_lora))
    job = run_job(tmp_path, host)
    assert job.state == "failed"
    assert job.error.startswith("Out of memory during saving")
    assert_model_unchanged(host.adapter, snapshot)
    assert written(host) == ["tiny.safetensors"]  # the second try, with the memory freed, wrote it
    assert job.output_file == str(host.lora_dir / "tiny.safetensors")


def test_oom_on_every_save_leaves_no_file(tmp_path, monkeypatch):
    host = FakeHost(tmp_path)
    snapshot = model_snapshot(host.adapter)

    def always(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(loop, "save_lora", always)
    job = run_job(tmp_path, host)
    assert job.state == "failed"
    assert job.error.startswith("Out of memory during saving")
    assert "saved in" not in job.error
    assert_model_unchanged(host.adapter, snapshot)
    assert written(host) == []
    assert job.output_file is None


def test_advice_names_settings_that_fit_the_free_memory(tmp_path):
    host = FakeHost(tmp_path)
    host.adapter.predict = fail_on_call(1)(host.adapter.predict)
    plan = JobManager(host).plan(make_config(tmp_path, **{"training.train_batch_size": 2}))
    assert plan is not None
    # a device with less free memory than the estimate: the advice is the plan's own suggestions
    host.memory = type(host.memory)("cpu", int(plan.peak_bytes * 0.9), 10**10, "small device", "sdp")
    job = run_job(tmp_path, host, **{"training.train_batch_size": 2})
    assert "batch 2: estimated peak" in job.error
    assert f"vs {format_bytes(plan.peak_bytes * 0.9)} free" in job.error
    assert "fits)" in job.error  # the last suggestion brings it under the free memory


def test_oom_phase_marks_only_out_of_memory():
    with pytest.raises(OutOfMemory, match="during saving"), oom_phase("saving"):
        raise torch.OutOfMemoryError("CUDA out of memory")
    with pytest.raises(ValueError, match="other"), oom_phase("saving"):
        raise ValueError("other")
    assert is_out_of_memory(RuntimeError("MPS backend out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(RuntimeError("simulated out of memory"))  # only a backend's own message
    with pytest.raises(RuntimeError) as cpu:
        torch.empty(2**60, dtype=torch.uint8)
    assert is_out_of_memory(cpu.value)
