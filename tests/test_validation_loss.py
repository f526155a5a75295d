"""Validation loss: the held-out split, its settings, the deterministic measurement, and where it is reported."""

from __future__ import annotations

import json

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from lora_trainer.config import TrainConfig
from lora_trainer.data.dataset import TrainDataset
from lora_trainer.data.scan import scan_dataset
from lora_trainer.data.split import held_out_count, split_validation
from lora_trainer.errors import ConfigError
from lora_trainer.files.lora_file import load_lora
from lora_trainer.jobs import JobManager, past_jobs
from lora_trainer.train.callbacks import Callbacks
from lora_trainer.train.loop import _Run, train
from lora_trainer.train.validation import fixed_timesteps
from lora_trainer.webui import render
from lora_trainer.webui.api import PREFIX, mount
from lora_trainer.workshop.advisor import advise
from tests.fixtures.host import FakeHost
from tests.fixtures.training import StopAfter, make_config, make_dataset
from tests.fixtures.webui_models import TinyAdapter


def _items(tmp_path, n=10):
    return scan_dataset(make_dataset(tmp_path / "split", n=n))


# -- the split


def test_split_count_fraction_and_seed(tmp_path):
    items = _items(tmp_path)
    train_items, held = split_validation(items, fraction=0.2, seed=7)
    assert len(held) == 2
    assert len(train_items) == 8
    assert {it.key for it in held}.isdisjoint(it.key for it in train_items)
    assert all(it.repeats == 1 for it in held)
    assert all(it.repeats == 2 for it in train_items)
    assert split_validation(items, fraction=0.2, seed=7) == (train_items, held)  # the seed decides
    others = {tuple(it.key for it in split_validation(items, fraction=0.2, seed=s)[1]) for s in range(8)}
    assert len(others) > 1
    assert len(split_validation(items, count=3, seed=7)[1]) == 3
    assert len(split_validation(items, fraction=0.01, seed=7)[1]) == 1  # never fewer than one image
    assert split_validation(items) == (list(items), [])


def test_split_that_leaves_nothing_to_train_is_an_error_naming_the_field():
    with pytest.raises(ConfigError) as exc:
        held_out_count(3, count=3)
    assert exc.value.field == "validation.validation_count"
    with pytest.raises(ConfigError) as exc:
        held_out_count(1, fraction=0.5)
    assert exc.value.field == "validation.validation_split"


def test_config_checks_at_the_door(tmp_path):
    cfg = make_config(tmp_path, **{"validation.validation_split": 0.5, "validation.validation_count": 1})
    assert [e.field for e in cfg.errors()] == ["validation.validation_count"]
    cfg = make_config(tmp_path, **{"validation.validation_count": 1, "validation.validation_data_dir": "x"})
    assert [e.field for e in cfg.errors()] == ["validation.validation_data_dir"]
    cfg = make_config(tmp_path, **{"validation.validation_split": 1.0})
    assert [e.field for e in cfg.errors()] == ["validation.validation_split"]
    # the dataset has 2 images: holding out 2 leaves none, refused before the model is touched
    cfg = make_config(tmp_path, **{"validation.validation_count": 2})
    with pytest.raises(ConfigError, match="leaving none to train on") as exc:
        train(cfg, TinyAdapter("sd1"), work_dir=tmp_path / "work")
    assert exc.value.field == "validation.validation_count"


def test_kohya_names_round_trip_through_toml(tmp_path):
    cfg = make_config(
        tmp_path,
        **{
            "validation.validation_split": 0.25,
            "validation.validate_every_n_steps": 3,
            "validation.validation_seed": 5,
        },
    )
    text = cfg.to_toml()
    assert "validation_split = 0.25" in text
    assert "validate_every_n_steps = 3" in text
    assert TrainConfig.from_toml(text).validation == cfg.validation
    kohya = TrainConfig.from_toml("validation_split = 0.1\nmax_validation_steps = 4\n", strict=True)
    assert kohya.validation.validation_split == 0.1
    assert kohya.validation.max_validation_steps == 4


def test_advisor_counts_the_split():
    whole = advise([(20, 5)], epochs=10)
    split = advise([(20, 5)], epochs=10, held_out=4)
    assert (split.images, split.validation_images, split.samples_per_epoch) == (16, 4, 80)
    assert split.total_steps < whole.total_steps


def test_fixed_timesteps_are_kohyas_spread():
    assert fixed_timesteps(1000) == [200, 400, 600, 800]


# -- training with a split


class _Seen(Callbacks):
    def __init__(self):
        self.val: list[tuple[int, int, float]] = []

    def on_validation(self, step, epoch, loss):
        self.val.append((step, epoch, loss))


def _split_config(tmp_path, **overrides):
    make_dataset(tmp_path / "data", n=5)
    return make_config(tmp_path, **{"validation.validation_count": 2, "training.max_train_steps": 8, **overrides})


def test_held_out_images_are_never_trained(tmp_path, monkeypatch):
    cfg = _split_config(tmp_path)
    loaded: list[str] = []
    original = TrainDataset.load_batch

    def spy(self, indices, **kw):
        if self.batch_size == cfg.training.train_batch_size and not getattr(self, "_val", False):
            loaded.extend(self.items[i].key for i in indices)
        return original(self, indices, **kw)

    monkeypatch.setattr(TrainDataset, "load_batch", spy)
    run = _Run(cfg, TinyAdapter("sd1"), Callbacks(), tmp_path / "work", cfg.training.seed)
    assert run.validator is not None
    held = {it.key for it in run.validator.items}
    run.validator.dataset._val = True  # type: ignore[attr-defined]
    assert len(held) == 2
    assert len(run.items) == 3
    assert held.isdisjoint(it.key for it in run.dataset.items)
    loaded.clear()
    result = run.execute(None)
    assert result.steps == 8
    assert loaded
    assert held.isdisjoint(loaded)


def test_validation_is_deterministic_and_reported(tmp_path):
    cfg = _split_config(tmp_path, **{"validation.validate_every_n_steps": 3, "save.save_every_n_epochs": 1})
    adapter = TinyAdapter("sd1")
    seen = _Seen()
    run = _Run(cfg, adapter, seen, tmp_path / "work", cfg.training.seed)
    result = run.execute(None)
    assert result.val_losses
    assert [p["step"] for p in result.val_losses] == [s for s, _, _ in seen.val]
    steps = [p["step"] for p in result.val_losses]
    assert {3, 6, 8} <= set(steps)
    assert len(steps) == len(set(steps))
    assert run.validator is not None
    with run.network.applied():
        first = run.validator.evaluate(99, 9).loss
        second = run.validator.evaluate(99, 9).loss
    assert first == second  # the same network gives the same number
    assert first == pytest.approx(result.val_losses[-1]["loss"])
    _, meta = load_lora(result.output_path)
    assert json.loads(meta["lora_train.val_losses"]) == result.val_losses
    assert meta["ss_num_validation_images"] == "2"
    assert meta["ss_validate_every_n_steps"] == "3"


def test_separate_folder_holds_out_all_its_images(tmp_path):
    make_dataset(tmp_path / "val", n=3, folder="1_other")
    cfg = make_config(tmp_path, **{"validation.validation_data_dir": str(tmp_path / "val")})
    run = _Run(cfg, TinyAdapter("sd1"), Callbacks(), tmp_path / "work", cfg.training.seed)
    assert run.validator is not None
    assert len(run.validator.items) == 3
    assert len(run.items) == 2  # every training image is trained


def test_plot_shows_the_validation_curve():
    svg = render.loss_svg(
        [1.0, 0.8, 0.6, 0.5], [{"step": 2, "epoch": 1, "loss": 0.9}, {"step": 4, "epoch": 2, "loss": 0.7}]
    )
    assert "lora_train_plot_val" in svg
    assert "lora_train_plot_val" not in render.loss_svg([1.0, 0.8])


def test_api_returns_val_losses(tmp_path):
    host = FakeHost(tmp_path)
    manager = JobManager(host)
    app = FastAPI()
    mount(app, manager)
    cfg = _split_config(tmp_path, **{"training.max_train_steps": 2})
    cfg.save.output_dir = None
    with TestClient(app) as client:
        started = client.post(f"{PREFIX}/jobs", json=cfg.to_dict())
        assert started.status_code == 202, started.text
        job_id = started.json()["id"]
        assert manager.wait(job_id, timeout=120)
        status = client.get(f"{PREFIX}/jobs/{job_id}").json()
    assert status["state"] == "done", status
    assert status["val_losses"]
    assert status["val_losses"][-1]["step"] == 2


def test_val_losses_survive_a_resume(tmp_path):
    overrides = {"validation.validate_every_n_steps": 3, "dataset.cache_latents": False}
    full_cfg = _split_config(tmp_path / "a", **overrides)
    full = train(full_cfg, TinyAdapter("sd1"), work_dir=tmp_path / "a" / "work")
    cfg = _split_config(tmp_path / "b", **overrides)
    partial = train(cfg, TinyAdapter("sd1"), StopAfter(4), work_dir=tmp_path / "b" / "work")
    assert partial.stopped_early
    assert [p["step"] for p in partial.val_losses] == [3, 4]
    resumed = train(cfg, TinyAdapter("sd1"), work_dir=tmp_path / "b" / "work", resume=True)
    assert [p["step"] for p in full.val_losses] == [3, 6, 8]
    # the stopped run measured at its stop (step 4) as well; the rest are the uninterrupted run's numbers
    assert [p for p in resumed.val_losses if p["step"] != 4] == full.val_losses
    _, meta = load_lora(resumed.output_path)
    assert json.loads(meta["lora_train.val_losses"]) == resumed.val_losses


def test_restored_jobs_read_their_val_losses_back(tmp_path):
    host = FakeHost(tmp_path)
    manager = JobManager(host)
    cfg = _split_config(tmp_path, **{"training.max_train_steps": 2})
    cfg.save.output_dir = None
    job = manager.start(cfg)
    manager.wait(job.id, timeout=120)
    assert job.state == "done", job.error
    assert job.val_losses
    restored = {j.id: j for j in past_jobs(host.work_dir)}[job.id]
    assert restored.restored
    assert restored.val_losses == job.val_losses
