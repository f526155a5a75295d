"""Half-precision host models train on the CPU through the same code a GPU runs (autocast + GradScaler).

The WebUI holds the UNet, text encoders and VAE in fp16 (bf16 on some setups). These tests build the
tiny models that way and train them end to end with ``train()``: the loss falls, the LoRA weights and
the optimizer state stay float32, the saved file is finite, and the base is bit-identical afterwards.
"""

from __future__ import annotations

import math

import pytest
import torch

from lora_trainer.files.lora_file import load_lora
from lora_trainer.train import loop
from lora_trainer.train.guards import Precision, precision_plan
from tests.fixtures.model_state import assert_model_unchanged, model_snapshot
from tests.fixtures.training import StopAfter, fixed_eval_loss, make_config
from tests.fixtures.webui_models import TinyAdapter

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32


@pytest.mark.parametrize(
    ("model", "mixed", "autocast", "scaler", "name"),
    [
        (FP32, "no", None, False, "no"),
        (FP32, "fp16", FP16, True, "fp16"),
        (FP32, "bf16", BF16, False, "bf16"),
        (FP16, "no", FP16, True, "fp16"),  # the WebUI's default model
        (FP16, "fp16", FP16, True, "fp16"),
        (FP16, "bf16", FP16, True, "fp16"),  # the model's own half type wins
        (BF16, "no", BF16, False, "bf16"),
        (BF16, "fp16", BF16, False, "bf16"),
        (BF16, "bf16", BF16, False, "bf16"),
    ],
)
def test_precision_rule(model, mixed, autocast, scaler, name):
    plan = precision_plan(model, mixed)
    assert plan == Precision(autocast, scaler, name)
    made = plan.make_scaler("cpu")
    assert (made is not None) == scaler
    if made is not None:
        assert isinstance(made, torch.amp.GradScaler)
        assert made.is_enabled()  # a CPU scaler really scales


class Spy:
    """Records the optimizer and the GradScaler a run builds (wrapping the real ones)."""

    def __init__(self, monkeypatch):
        self.optimizer = None
        self.scalers: list = []
        real_build, real_make = loop.build_optimizer, Precision.make_scaler

        def build_optimizer(*args, **kwargs):
            self.optimizer = real_build(*args, **kwargs)
            return self.optimizer

        def make_scaler(plan, device_type):
            scaler = real_make(plan, device_type)
            self.scalers.append((device_type, scaler))
            return scaler

        monkeypatch.setattr(loop, "build_optimizer", build_optimizer)
        monkeypatch.setattr(Precision, "make_scaler", make_scaler)


CASES = [
    # family, model dtype, mixed_precision setting, conv_dim, lr
    ("sd1", FP16, "no", 0, 1e-2),
    ("sd1", BF16, "no", 0, 1e-2),
    ("sdxl", FP16, "no", 4, 2e-2),
    ("sdxl", BF16, "no", 4, 2e-2),
    ("sd1", FP32, "fp16", 0, 1e-2),  # fp16 autocast on an fp32 model: no longer turned off on the CPU
]


@pytest.mark.parametrize(("family", "dtype", "mixed", "conv_dim", "lr"), CASES)
def test_half_precision_model_trains_end_to_end(tmp_path, monkeypatch, family, dtype, mixed, conv_dim, lr):
    adapter = TinyAdapter(family, dtype=dtype, vae_dtype=dtype)
    spy = Spy(monkeypatch)
    cfg = make_config(
        tmp_path,
        **{
            "training.max_train_steps": 20,
            "training.mixed_precision": mixed,
            "optim.learning_rate": lr,
            "network.conv_dim": conv_dim,
            "network.conv_alpha": float(conv_dim or 1),
        },
    )
    before = fixed_eval_loss(adapter, cfg)
    snapshot = model_snapshot(adapter)

    result = loop.train(cfg, adapter, work_dir=tmp_path / "work")

    assert_model_unchanged(adapter, snapshot)
    assert adapter.root.first_stage_model.weight.dtype == dtype  # the VAE is held as it was
    assert result.steps == 20
    after = fixed_eval_loss(adapter, cfg, result.output_path)
    assert after < 0.85 * before, (before, after)

    # the same path a GPU takes: autocast to the half type, a GradScaler on the device type when fp16 is involved
    fp16_involved = FP16 in (dtype, {"fp16": FP16}.get(mixed))
    ((device_type, scaler),) = spy.scalers
    assert device_type == "cpu"
    assert (scaler is not None) == fp16_involved
    if scaler is not None:
        assert 0 < scaler.get_scale() <= 65536.0
    # LoRA weights and optimizer state are float32 even on a half model
    opt = spy.optimizer
    params = [p for g in opt.param_groups for p in g["params"]]
    assert params
    assert all(p.dtype == FP32 for p in params)
    states = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.is_floating_point()]
    assert states
    assert all(v.dtype == FP32 for v in states)
    # nothing non-finite saved; the losses of the steps taken are finite
    state, meta = load_lora(result.output_path)
    assert all(torch.isfinite(v.float()).all() for v in state.values())
    assert any(v.abs().sum() > 0 for k, v in state.items() if k.endswith("lora_up.weight"))
    assert meta["ss_mixed_precision"] == ("fp16" if fp16_involved else "bf16")
    assert sum(not math.isfinite(x) for x in result.losses) == 0
    assert result.skipped_steps <= 5  # at most the scaler settling from 65536


def test_fp16_run_resumes_exactly_with_its_loss_scale(tmp_path):
    """The CPU GradScaler's state (scale, growth tracker) and the skip count travel with the resume state."""
    overrides = {"training.max_train_steps": 10, "optim.learning_rate": 1e-2}

    def model():
        return TinyAdapter("sd1", dtype=FP16, vae_dtype=FP16)

    full = loop.train(make_config(tmp_path / "a", **overrides), model(), work_dir=tmp_path / "a" / "w")
    cfg = make_config(tmp_path / "b", **overrides)
    partial = loop.train(cfg, model(), StopAfter(4), work_dir=tmp_path / "b" / "w")
    assert partial.steps == 4
    resumed = loop.train(cfg, model(), work_dir=tmp_path / "b" / "w", resume=True)
    assert full.skipped_steps > 0  # the scale settled from 65536 on the way: the resumed run must match that
    assert resumed.losses == full.losses
    assert resumed.skipped_steps == full.skipped_steps
    a, _ = load_lora(full.output_path)
    b, _ = load_lora(resumed.output_path)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
