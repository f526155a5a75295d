"""JobManager over a stand-in host: lifecycle, one job at a time, cancel, failures, samples."""

import threading

import pytest

from lora_trainer.errors import ConfigError, DatasetError, IncompatibleModelError
from lora_trainer.jobs import JobBusyError, JobManager, UnknownJobError
from tests.fixtures.host import FakeHost
from tests.fixtures.training import make_config


def config(tmp_path, **overrides):
    cfg = make_config(tmp_path, **overrides)
    cfg.save.output_dir = None  # the host's Lora folder
    return cfg


def test_job_runs_publishes_and_reports(tmp_path):
    host = FakeHost(tmp_path)
    manager = JobManager(host)
    job = manager.start(config(tmp_path))
    manager.wait(job.id, timeout=120)
    status = job.to_dict()
    assert status["state"] == "done", status["error"]
    assert status["step"] == status["total_steps"] == 6
    assert len(status["losses"]) == 6
    assert status["eta_s"] == 0
    assert host.published == [host.lora_dir / "tiny.safetensors"]
    assert status["output_file"] == str(host.lora_dir / "tiny.safetensors")
    assert ("start", job.id) in host.events
    assert host.events[-1] == ("end", "done")
    assert manager.list() == [job]
    assert manager.current() is None


def test_one_job_at_a_time_and_cancel_keeps_what_was_trained(tmp_path):
    host = FakeHost(tmp_path)
    manager = JobManager(host)
    gate = threading.Event()
    original = host.on_job_progress

    def slow(job):
        original(job)
        if job.step == 2:
            gate.set()
            manager.cancel(job.id)

    host.on_job_progress = slow
    job = manager.start(config(tmp_path, **{"training.max_train_steps": 50}))
    with pytest.raises(JobBusyError, match="still running"):
        manager.start(config(tmp_path))
    assert gate.wait(60)
    manager.wait(job.id, timeout=120)
    assert job.state == "stopped"
    assert job.step == 2
    assert job.output_file
    assert host.published
    assert (host.work_dir / "states" / "tiny" / "state.json").is_file()  # resumable
    resumed = manager.start(config(tmp_path, **{"training.max_train_steps": 50}), resume=True)
    manager.wait(resumed.id, timeout=300)
    assert resumed.state == "done"
    assert resumed.step == 50
    assert resumed.output_file == job.output_file  # the stopped run's file is finished, not copied


def test_webui_interrupt_stops_the_job(tmp_path):
    host = FakeHost(tmp_path)
    host.interrupt = True
    manager = JobManager(host)
    job = manager.wait(manager.start(config(tmp_path)).id, timeout=60)
    assert job.state == "stopped"
    assert job.output_file is None
    assert not host.published


def test_file_that_does_not_fully_load_is_a_failure(tmp_path):
    host = FakeHost(tmp_path)
    host.verify_lora = lambda path: ["lora_unet_nowhere"]
    manager = JobManager(host)
    job = manager.wait(manager.start(config(tmp_path)).id, timeout=60)
    assert job.state == "failed"
    assert "does not fully load" in job.error
    assert "lora_unet_nowhere" in job.error
    assert not host.published
    assert job.output_file is None


def test_errors_before_start(tmp_path):
    host = FakeHost(tmp_path)
    manager = JobManager(host)
    bad = config(tmp_path)
    bad.optim.learning_rate = -1
    with pytest.raises(ConfigError, match=r"optim\.learning_rate"):
        manager.start(bad)
    missing = config(tmp_path)
    missing.dataset.train_data_dir = str(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="nowhere"):
        manager.start(missing)
    host.problem = "no model is loaded"
    with pytest.raises(IncompatibleModelError, match="no model"):
        manager.start(config(tmp_path))
    assert manager.list() == []
    with pytest.raises(UnknownJobError):
        manager.get("job-nope")


def test_crash_inside_training_is_reported_and_host_keeps_working(tmp_path):
    host = FakeHost(tmp_path)
    manager = JobManager(host)
    original = host.adapter.predict
    host.adapter.predict = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("CUDA out of memory. Tried to allocate"))
    job = manager.wait(manager.start(config(tmp_path)).id, timeout=60)
    assert job.state == "failed"
    assert job.error.startswith("Out of memory during a step")  # a RuntimeError saying so counts too (MPS)
    assert "Try: " in job.error
    host.adapter.predict = original
    again = manager.wait(manager.start(config(tmp_path)).id, timeout=60)
    assert again.state == "done"


def test_samples_are_written_every_n_steps(tmp_path):
    host = FakeHost(tmp_path)
    manager = JobManager(host)
    cfg = config(tmp_path, **{"sample.sample_every_n_steps": 2, "sample.sample_prompts": ["a", "b"]})
    job = manager.wait(manager.start(cfg).id, timeout=60)
    assert job.state == "done"
    assert len(job.samples) == 6  # steps 2, 4 and 6 (the last), two prompts each
    assert all(p.endswith(".png") for p in job.samples)
