"""End-to-end training on tiny WebUI-shaped models (CPU): learning, safety, resume, files."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lora_trainer.errors import ConfigError, DatasetError
from lora_trainer.files.lora_file import load_lora
from lora_trainer.naming import find_targets
from lora_trainer.train.callbacks import Callbacks
from lora_trainer.train.loop import train
from tests.fixtures.model_state import assert_model_unchanged, model_snapshot
from tests.fixtures.training import StopAfter, fixed_eval_loss, make_config
from tests.fixtures.webui_models import TinyAdapter


@pytest.mark.parametrize(
    ("family", "prediction", "conv_dim", "lr"),
    [("sd1", "epsilon", 0, 3e-3), ("sd2", "v_prediction", 0, 3e-3), ("sdxl", "epsilon", 4, 1e-2)],
)
def test_loss_falls_on_tiny_overfit_task_and_model_is_untouched(tmp_path, family, prediction, conv_dim, lr):
    """The tiny SDXL has attention only in its two lower levels: it learns through LoCon."""
    adapter = TinyAdapter(family, prediction_type=prediction)
    overrides = {"training.max_train_steps": 60, "optim.learning_rate": lr, "network.conv_dim": conv_dim}
    cfg = make_config(tmp_path, **{**overrides, "network.conv_alpha": float(conv_dim or 1)})
    before = fixed_eval_loss(adapter, cfg)
    snapshot = model_snapshot(adapter)
    result = train(cfg, adapter, work_dir=tmp_path / "work")
    assert_model_unchanged(adapter, snapshot)
    assert result.steps == 60
    assert not result.stopped_early
    assert result.output_path == tmp_path / "out" / "tiny.safetensors"
    assert result.output_path.is_file()
    after = fixed_eval_loss(adapter, cfg, result.output_path)
    assert after < 0.8 * before, (before, after)
    assert fixed_eval_loss(adapter, cfg) == pytest.approx(before)  # file applied only inside the check


def test_saved_file_keys_metadata_and_family(tmp_path):
    adapter = TinyAdapter("sdxl")
    cfg = make_config(tmp_path, **{"dataset.trigger_words": ["sks"]})
    result = train(cfg, adapter, work_dir=tmp_path / "work")
    state, meta = load_lora(result.output_path)
    expected = {t.key for t in find_targets("sdxl", adapter.unet, adapter.text_encoders)}
    assert {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in state} == expected
    assert all(v.dtype == torch.float16 for v in state.values())
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "4"
    assert float(meta["ss_network_alpha"]) == 4.0
    assert meta["ss_steps"] == "6"
    assert meta["ss_output_name"] == "tiny"
    assert meta["ss_num_train_images"] == "4"  # 2 images x 2 repeats
    assert "sks" in meta["ss_training_comment"]
    assert '"subject"' in meta["ss_tag_frequency"] or "subject" in meta["ss_tag_frequency"]
    assert len(meta["sshs_model_hash"]) == 64


def test_never_overwrites_unless_told(tmp_path):
    adapter = TinyAdapter("sd1")
    cfg = make_config(tmp_path, **{"training.max_train_steps": 1})
    first = train(cfg, adapter, work_dir=tmp_path / "work").output_path
    original = first.read_bytes()
    second = train(cfg, adapter, work_dir=tmp_path / "work").output_path
    assert second != first
    assert second.name == "tiny_1.safetensors"
    assert first.read_bytes() == original
    cfg.save.overwrite = True
    third = train(cfg, adapter, work_dir=tmp_path / "work").output_path
    assert third == first


def test_exception_mid_training_leaves_model_untouched(tmp_path):
    adapter = TinyAdapter("sd2")
    cfg = make_config(tmp_path, **{"network.conv_dim": 2, "network.conv_alpha": 1.0})
    snapshot = model_snapshot(adapter)

    class Boom(Callbacks):
        def on_step(self, info):
            if info.step == 2:
                raise RuntimeError("simulated out of memory")

    with pytest.raises(RuntimeError, match="simulated"):
        train(cfg, adapter, Boom(), work_dir=tmp_path / "work")
    assert_model_unchanged(adapter, snapshot)
    assert not list((tmp_path / "out").glob("*.safetensors")) if (tmp_path / "out").exists() else True


@pytest.fixture
def one_thread():
    """Multi-threaded CPU kernels reduce in varying order: bit-exact comparisons need one thread
    (tests/conftest.py sets it for the whole suite; this makes the requirement explicit)."""
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_resume_continues_exactly(tmp_path, family, one_thread):
    overrides = {
        "training.max_train_steps": 8,
        "training.gradient_accumulation_steps": 2,
        "dataset.shuffle_caption": True,
        "dataset.caption_tag_dropout_rate": 0.2,
        "network.network_dropout": 0.1,
        "optim.lr_scheduler": "cosine",
        "dataset.cache_latents": False,
    }
    full_cfg = make_config(tmp_path / "a", **overrides)
    full = train(full_cfg, TinyAdapter(family), work_dir=tmp_path / "a" / "work")

    cfg = make_config(tmp_path / "b", **overrides)
    stopper = StopAfter(3)
    partial = train(cfg, TinyAdapter(family), stopper, work_dir=tmp_path / "b" / "work")
    assert partial.stopped_early
    assert partial.steps == 3
    assert partial.state_dir is not None
    _, meta = load_lora(partial.output_path)
    assert meta["lora_train.stopped_early"] == "True"
    resumed = train(cfg, TinyAdapter(family), work_dir=tmp_path / "b" / "work", resume=True)
    assert resumed.steps == 8
    assert resumed.output_path == partial.output_path  # finishes the stopped run's file, no tiny_1
    assert sorted(p.name for p in (tmp_path / "b" / "out").iterdir()) == ["tiny.safetensors"]
    assert "lora_train.stopped_early" in load_lora(resumed.output_path)[1]
    assert load_lora(resumed.output_path)[1]["lora_train.stopped_early"] == "False"
    assert resumed.losses == full.losses
    a, _ = load_lora(full.output_path)
    b, _ = load_lora(resumed.output_path)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_changed_settings(tmp_path):
    cfg = make_config(tmp_path)
    train(cfg, TinyAdapter("sd1"), StopAfter(2), work_dir=tmp_path / "work")
    cfg.network.network_dim = 8
    with pytest.raises(Exception, match="settings differ"):
        train(cfg, TinyAdapter("sd1"), work_dir=tmp_path / "work", resume=True)


def test_progress_callback_reports_step_lr_and_eta(tmp_path):
    cb = StopAfter(10**9)
    train(make_config(tmp_path, **{"optim.lr_scheduler": "linear"}), TinyAdapter("sd1"), cb, work_dir=tmp_path / "w")
    assert [i.step for i in cb.infos] == list(range(1, 7))
    assert all(i.total_steps == 6 for i in cb.infos)
    assert cb.infos[-1].eta_s == 0
    assert cb.infos[0].steps_per_s > 0
    assert set(cb.infos[0].lrs) == {"unet", "text_encoder"}
    assert cb.infos[0].lrs["unet"] > cb.infos[-1].lrs["unet"]  # linear decay
    assert [i.epoch for i in cb.infos] == [1, 1, 1, 1, 2, 2]  # 4 batches per epoch


def test_gradient_checkpointing_gives_the_same_training(tmp_path, one_thread):
    plain = train(make_config(tmp_path / "a"), TinyAdapter("sd1"), work_dir=tmp_path / "a" / "w")
    adapter = TinyAdapter("sd1")
    snapshot = model_snapshot(adapter)
    ckpt = train(
        make_config(tmp_path / "b", **{"training.gradient_checkpointing": True}), adapter, work_dir=tmp_path / "b" / "w"
    )
    assert ckpt.losses == pytest.approx(plain.losses, rel=1e-6)
    assert_model_unchanged(adapter, snapshot)


def test_unet_only_writes_no_text_encoder_keys(tmp_path):
    result = train(
        make_config(tmp_path, **{"network.train_text_encoder": False}), TinyAdapter("sd2"), work_dir=tmp_path / "w"
    )
    state, _ = load_lora(result.output_path)
    assert state
    assert all(k.startswith("lora_unet_") for k in state)


def test_text_encoder_lora_trains(tmp_path):
    result = train(make_config(tmp_path), TinyAdapter("sd2"), work_dir=tmp_path / "w")
    state, _ = load_lora(result.output_path)
    te_up = [v for k, v in state.items() if k.startswith("lora_te_") and k.endswith("lora_up.weight")]
    assert te_up
    assert all(v.abs().sum() > 0 for v in te_up)
    assert any("self_attn_q_proj" in k for k in state)


@pytest.mark.parametrize(("optimizer", "lr"), [("Lion", 1e-4), ("Prodigy", 1.0), ("Adafactor", 1e-3)])
def test_other_optimizers_train(tmp_path, optimizer, lr):
    cfg = make_config(tmp_path, **{"optim.optimizer_type": optimizer, "optim.learning_rate": lr})
    result = train(cfg, TinyAdapter("sd1"), work_dir=tmp_path / "w")
    assert result.steps == 6
    assert all(torch.isfinite(torch.tensor(result.losses)))


def test_bf16_autocast_and_min_snr_and_noise_offset_run(tmp_path):
    cfg = make_config(
        tmp_path,
        **{"training.mixed_precision": "bf16", "training.min_snr_gamma": 5.0, "training.noise_offset": 0.05},
    )
    result = train(cfg, TinyAdapter("sdxl"), work_dir=tmp_path / "w")
    assert result.steps == 6
    assert all(torch.isfinite(torch.tensor(result.losses)))


def test_bad_inputs_fail_before_touching_the_model(tmp_path):
    adapter = TinyAdapter("sd1")
    cfg = make_config(tmp_path)
    cfg.network.network_dim = 0
    with pytest.raises(ConfigError, match="network_dim"):
        train(cfg, adapter, work_dir=tmp_path / "w")
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = dataclasses.replace(make_config(tmp_path))
    cfg.dataset.train_data_dir = str(empty)
    with pytest.raises(DatasetError):
        train(cfg, adapter, work_dir=tmp_path / "w")


@pytest.mark.parametrize("mixed", ["bf16", "no"])
def test_half_precision_base_model_trains_in_fp32_and_is_left_bit_identical(tmp_path, mixed):
    """The WebUI holds the model in half precision; LoRA weights still train in fp32."""
    adapter = TinyAdapter("sd1", dtype=torch.bfloat16)
    snapshot = model_snapshot(adapter)
    cfg = make_config(tmp_path, **{"training.mixed_precision": mixed, "training.max_train_steps": 2})
    result = train(cfg, adapter, work_dir=tmp_path / "w")
    assert_model_unchanged(adapter, snapshot)
    assert result.steps == 2
    assert all(torch.isfinite(torch.tensor(result.losses)))
    state, _ = load_lora(result.output_path)
    assert any(v.abs().sum() > 0 for k, v in state.items() if k.endswith("lora_up.weight"))


def test_save_every_n_epochs_and_steps(tmp_path):
    # 4 batches per epoch, 10 steps: epochs 1 and 2 end at steps 4 and 8
    cfg = make_config(
        tmp_path, **{"training.max_train_steps": 10, "save.save_every_n_epochs": 1, "save.save_every_n_steps": 3}
    )
    result = train(cfg, TinyAdapter("sd1"), work_dir=tmp_path / "w")
    names = [p.name for p in result.saved]
    assert names == [
        "tiny-step00000003.safetensors",
        "tiny-000001.safetensors",
        "tiny-step00000006.safetensors",
        "tiny-000002.safetensors",
        "tiny-step00000009.safetensors",
        "tiny.safetensors",
    ]
    steps = [load_lora(p)[1]["ss_steps"] for p in result.saved]
    assert steps == ["3", "4", "6", "8", "9", "10"]


def test_previews_every_n_steps_and_epochs_include_the_last(tmp_path):
    class Samples(Callbacks):
        def __init__(self):
            self.at = []

        def on_sample(self, step, epoch):
            self.at.append((step, epoch))

    # 4 batches per epoch, 8 steps: epochs end at steps 4 and 8
    by_steps, by_epochs = Samples(), Samples()
    train(
        make_config(
            tmp_path / "a",
            **{"training.max_train_steps": 8, "sample.sample_every_n_steps": 3, "sample.sample_prompts": ["x"]},
        ),
        TinyAdapter("sd1"),
        by_steps,
        work_dir=tmp_path / "a" / "w",
    )
    train(
        make_config(
            tmp_path / "b",
            **{"training.max_train_steps": 8, "sample.sample_every_n_epochs": 1, "sample.sample_prompts": ["x"]},
        ),
        TinyAdapter("sd1"),
        by_epochs,
        work_dir=tmp_path / "b" / "w",
    )
    assert by_steps.at == [(3, 1), (6, 2)]
    assert by_epochs.at == [(4, 1), (8, 2)]
