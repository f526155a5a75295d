"""JobManager over a stand-in host: lifecycle, one job at a time, cancel, failures, samples."""

import json
import threading
from pathlib import Path

import pytest
from PIL import Image

from lora_trainer.errors import ConfigError, DatasetError, IncompatibleModelError
from lora_trainer.jobs import JobBusyError, JobManager, UnknownJobError
from lora_trainer.webui.render import status_html
from tests.fixtures.host import FakeHost
from tests.fixtures.training import make_config


def config(tmp_path, **overrides):
    cfg = make_config(tmp_path, **overrides)
    cfg.save.output_dir = overrides.get("save.output_dir")  # unset: the host's Lora folder
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


def test_finished_run_gives_its_card_the_last_preview(tmp_path):
    host = FakeHost(tmp_path)
    manager = JobManager(host)
    previews = {"sample.sample_every_n_steps": 2, "sample.sample_prompts": ["a"]}
    job = manager.wait(manager.start(config(tmp_path, **previews)).id, timeout=60)
    card = host.lora_dir / "tiny.preview.png"  # what the WebUI's find_preview looks up beside tiny.safetensors
    assert job.output_file == str(host.lora_dir / "tiny.safetensors")
    assert card.read_bytes() == Path(job.samples[-1]).read_bytes()
    assert list(host.lora_dir.glob(".*")) == []  # no temp file left

    # a preview the user made is kept when the run writes a new file (tiny_1) ...
    mine = host.lora_dir / "tiny_1.png"
    Image.new("RGB", (4, 4), (0, 0, 255)).save(mine)
    second = manager.wait(manager.start(config(tmp_path, **previews)).id, timeout=60)
    assert second.output_file == str(host.lora_dir / "tiny_1.safetensors")
    assert not (host.lora_dir / "tiny_1.preview.png").exists()
    assert Image.open(mine).getpixel((0, 0)) == (0, 0, 255)

    # ... and replaced when the run wrote over the LoRA itself
    card.write_bytes(b"the user's own preview")
    third = manager.wait(manager.start(config(tmp_path, **previews, **{"save.overwrite": True})).id, timeout=60)
    assert third.output_file == str(host.lora_dir / "tiny.safetensors")
    assert card.read_bytes() == Path(third.samples[-1]).read_bytes()


def test_run_without_previews_writes_no_card_preview(tmp_path):
    host = FakeHost(tmp_path)
    manager = JobManager(host)
    job = manager.wait(manager.start(config(tmp_path)).id, timeout=60)
    assert job.state == "done"
    assert job.samples == []
    assert sorted(p.name for p in host.lora_dir.iterdir()) == ["tiny.safetensors"]


# --------------------------------------------------------------------------------------------
# refused at the door: where files are written, unreadable datasets, resume with other settings


def test_output_dir_must_be_inside_the_lora_folder_unless_the_setting_allows(tmp_path):
    host = FakeHost(tmp_path)
    manager = JobManager(host)
    outside = tmp_path / "elsewhere"
    link = host.lora_dir / "link"
    link.symlink_to(outside, target_is_directory=True)  # a link in the Lora folder that leads out of it
    for bad in (str(outside), "../../escape", "link/sub", str(host.lora_dir / ".." / "x")):
        with pytest.raises(ConfigError, match="outside the WebUI's Lora folder") as refused:
            manager.start(config(tmp_path, **{"save.output_dir": bad, "training.max_train_steps": 1}))
        assert refused.value.field == "save.output_dir"
        assert "Settings > LoRA Train" in refused.value.message
    assert manager.list() == []
    assert not outside.exists()
    assert not (tmp_path / "escape").exists()
    inside = manager.start(config(tmp_path, **{"save.output_dir": "chars/mine", "training.max_train_steps": 1}))
    assert inside.config.save.output_dir == str(host.lora_dir / "chars" / "mine")  # relative: under the Lora folder
    assert manager.wait(inside.id, timeout=120).state == "done", inside.error
    assert (host.lora_dir / "chars" / "mine" / "tiny.safetensors").is_file()
    host.allow_any_output_dir = True  # the WebUI setting, never a request field
    anywhere = manager.start(config(tmp_path, **{"save.output_dir": str(outside), "training.max_train_steps": 1}))
    assert manager.wait(anywhere.id, timeout=120).state == "done", anywhere.error
    assert (outside / "tiny.safetensors").is_file()


def test_dataset_without_readable_images_is_refused_with_its_field(tmp_path):
    manager = JobManager(FakeHost(tmp_path))
    broken = tmp_path / "broken" / "2_subject"
    broken.mkdir(parents=True)
    for i in range(2):
        (broken / f"img{i}.png").write_bytes(b"not an image at all" * 10)
        (broken / f"img{i}.txt").write_text("subject")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {
        str(broken.parent): "no image in",
        str(tmp_path / "nowhere"): "does not exist",
        str(empty): "No training images found",
    }
    for folder, message in cases.items():
        with pytest.raises(DatasetError, match=message) as refused:
            manager.start(config(tmp_path, **{"dataset.train_data_dir": folder}))
        assert isinstance(refused.value, ConfigError)
        assert refused.value.field == "dataset.train_data_dir"
    good = config(tmp_path).dataset.train_data_dir
    (tmp_path / "data" / "2_subject" / "img9.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # one bad among good
    with pytest.raises(ConfigError, match=r"1 of 3 images .* cannot be read.*img9\.png") as refused:
        manager.start(config(tmp_path, **{"dataset.train_data_dir": good}))
    assert refused.value.field == "dataset.train_data_dir"
    assert manager.list() == []


def test_resume_is_refused_at_start_without_a_run_or_with_other_settings(tmp_path):
    host = FakeHost(tmp_path)
    manager = JobManager(host)
    with pytest.raises(ConfigError, match="no stopped run of 'tiny'") as refused:
        manager.start(config(tmp_path), resume=True)
    assert refused.value.field == "resume"
    first = manager.start(config(tmp_path, **{"training.max_train_steps": 1, "save.save_state": True}))
    assert manager.wait(first.id, timeout=120).state == "done", first.error
    with pytest.raises(ConfigError, match=r"differs from the stopped run of 'tiny' \(4 then, 8 now\)") as refused:
        manager.start(config(tmp_path, **{"network.network_dim": 8, "save.save_state": True}), resume=True)
    assert refused.value.field == "network.network_dim"
    state_json = host.work_dir / "states" / "tiny" / "state.json"
    document = json.loads(state_json.read_text())
    del document["info"]["info"]["settings"]  # a state saved before the settings were kept in it
    state_json.write_text(json.dumps(document))
    with pytest.raises(ConfigError, match="the settings differ") as refused:
        manager.start(config(tmp_path, **{"network.network_dim": 8}), resume=True)
    assert refused.value.field == "resume"
    assert len(manager.list()) == 1
    again = manager.start(config(tmp_path, **{"training.max_train_steps": 2, "training.seed": 99}), resume=True)
    assert manager.wait(again.id, timeout=120).state == "done", again.error


def test_a_stopped_job_reports_no_eta(tmp_path):
    host = FakeHost(tmp_path)
    manager = JobManager(host)
    original = host.on_job_progress

    def stop_at_two(job):
        original(job)
        if job.step == 2:
            manager.cancel(job.id)

    host.on_job_progress = stop_at_two
    job = manager.wait(manager.start(config(tmp_path, **{"training.max_train_steps": 50})).id, timeout=120)
    assert job.state == "stopped"
    assert job.eta_s is not None  # the last step's estimate ...
    assert job.to_dict()["eta_s"] is None  # ... is not reported once it stopped


def _stop_at(manager, host, step):
    original = host.on_job_progress

    def stop(job):
        original(job)
        if job.step == step:
            manager.cancel(job.id)

    host.on_job_progress = stop
    return original


def _past_runs(tmp_path):
    """A finished, a failed and a stopped run, by one program session; returns their jobs."""
    host = FakeHost(tmp_path)
    manager = JobManager(host)
    done = manager.wait(manager.start(config(tmp_path, **{"save.output_name": "fine"})).id, timeout=120)
    original = host.adapter.predict
    host.adapter.predict = lambda *a, **k: (_ for _ in ()).throw(ValueError("broken step"))
    failed = manager.wait(manager.start(config(tmp_path, **{"save.output_name": "broken"})).id, timeout=120)
    host.adapter.predict = original
    _stop_at(manager, host, 2)
    stopped = manager.wait(manager.start(config(tmp_path, **{"training.max_train_steps": 50})).id, timeout=120)
    assert (done.state, failed.state, stopped.state) == ("done", "failed", "stopped")
    return done, failed, stopped


def test_jobs_survive_a_restart_and_a_stopped_one_resumes(tmp_path):
    done, failed, stopped = _past_runs(tmp_path)
    assert stopped.resumable
    assert not done.resumable

    restarted = JobManager(FakeHost(tmp_path))  # a new program session over the same folders
    listed = {j.id: j for j in restarted.list()}
    assert list(listed) == [done.id, failed.id, stopped.id]
    assert all(j.restored for j in listed.values())
    assert [(j.state, j.resumable) for j in listed.values()] == [("done", False), ("failed", False), ("stopped", True)]
    assert listed[failed.id].error == failed.error
    assert listed[stopped.id].output_file == stopped.output_file
    assert listed[stopped.id].step == 2
    assert listed[done.id].to_dict()["output_name"] == "fine"
    with pytest.raises(ConfigError, match="no stopped run"):
        restarted.resume(done.id)
    shown = status_html(listed[stopped.id].to_dict())  # the tab's status panel says where it comes from
    assert "from before the WebUI restarted" in shown
    assert "press Resume" in shown
    assert "press Resume" not in status_html(listed[done.id].to_dict())

    resumed = restarted.wait(restarted.resume(stopped.id).id, timeout=300)
    assert resumed.state == "done", resumed.error
    assert resumed.step == 50
    assert resumed.output_file == stopped.output_file  # the stopped run's file is finished
    assert not listed[stopped.id].resumable  # finished by the resume: nothing left to continue
    again = {j.id: j for j in JobManager(FakeHost(tmp_path)).list()}
    assert not again[stopped.id].resumable
    with pytest.raises(ConfigError, match="no stopped run"):
        restarted.resume(stopped.id)


def test_a_run_the_program_did_not_see_end_is_listed_by_what_it_saved(tmp_path):
    _, _, stopped = _past_runs(tmp_path)
    work = FakeHost(tmp_path).work_dir
    record = work / "jobs" / f"{stopped.id}.json"
    data = json.loads(record.read_text())
    record.write_text(json.dumps({**data, "state": "running"}))  # the program ended during the run
    data["config"]["save"]["output_name"] = "gone"  # a run that ended before it saved anything
    (work / "jobs" / "job-1-99.json").write_text(json.dumps({**data, "id": "job-1-99", "state": "running"}))
    (work / "jobs" / "job-1-98.json").write_text("{damaged")
    jobs = {j.id: j for j in JobManager(FakeHost(tmp_path)).list()}
    assert jobs[stopped.id].state == "stopped"
    assert jobs[stopped.id].resumable
    assert jobs["job-1-99"].state == "failed"
    assert not jobs["job-1-99"].resumable
    assert "the WebUI stopped during this run" in jobs["job-1-99"].error
    assert "job-1-98" not in jobs

    for f in (work / "jobs").iterdir():  # no records at all: the resume state and the LoRA header tell
        f.unlink()
    (only,) = JobManager(FakeHost(tmp_path)).list()
    assert (only.id, only.state, only.resumable, only.step) == ("run-tiny", "stopped", True, 2)
    assert only.total_steps == 50
    assert only.output_file == stopped.output_file
    manager = JobManager(FakeHost(tmp_path))
    resumed = manager.wait(manager.resume("run-tiny").id, timeout=300)
    assert (resumed.state, resumed.step) == ("done", 50), resumed.error
