"""Nothing non-finite ever reaches a LoRA file: NaN latents, NaN losses and inf gradients, in fp32, fp16 and bf16.

* A latent the (half-precision) VAE turns into NaN is encoded again with the VAE in float32; still NaN:
  the run stops before training with the image named (cached latents), or at its batch (uncached).
* A NaN/inf loss or gradient skips the step (counted in ``StepInfo.skipped_steps``); five counted
  skips in a row stop the run with ``NonFiniteError`` and no file. With a GradScaler (fp16), inf
  gradients lower the scale first and only count once it is below 1.
* ``save_lora`` refuses NaN/inf weights; the loop stops rather than writing them.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from lora_trainer.errors import DatasetError, NonFiniteError
from lora_trainer.files.lora_file import load_lora, save_lora
from lora_trainer.jobs import JobManager
from lora_trainer.networks.network import LoRANetwork
from lora_trainer.train.callbacks import Callbacks
from lora_trainer.train.guards import MAX_BAD_STEPS_IN_A_ROW
from lora_trainer.train.loop import train
from lora_trainer.webui.render import status_html
from tests.fixtures.fake_webui import FakeWebUI
from tests.fixtures.host import FakeHost
from tests.fixtures.model_state import assert_model_unchanged, model_snapshot
from tests.fixtures.training import make_config
from tests.fixtures.webui_models import FixedLatentEncoder, TinyAdapter

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Record(Callbacks):
    def __init__(self):
        self.infos = []

    def on_step(self, info):
        self.infos.append(info)

    def skipped_at(self) -> list[int]:
        """The steps at which the skipped-steps counter went up."""
        counts = [0] + [i.skipped_steps for i in self.infos]
        return [i.step for i, (a, b) in zip(self.infos, itertools.pairwise(counts), strict=True) if b > a]


def half_model(dtype_name: str) -> TinyAdapter:
    """A tiny SD1 model held as the WebUI holds it: UNet, text encoder and VAE all in ``dtype``."""
    dtype = DTYPES[dtype_name]
    return TinyAdapter("sd1", dtype=dtype, vae_dtype=dtype)


def no_lora_files(tmp_path) -> bool:
    out = tmp_path / "out"
    return not out.exists() or not list(out.glob("*.safetensors"))


# -- latents ------------------------------------------------------------------------------------


class NaNForDarkImages(FixedLatentEncoder):
    """A VAE that gives NaN latents for an all-black image: only while held in half precision
    (``always=False``, as an fp16 VAE overflowing), or whatever its dtype (``always=True``)."""

    def __init__(self, always: bool):
        super().__init__()
        self.always = always
        self.calls: list[torch.dtype] = []

    def forward(self, pixels):
        self.calls.append(self.weight.dtype)
        out = super().forward(pixels)
        dark = pixels.flatten(1).amax(dim=1) < -0.99
        if self.always or self.weight.dtype != torch.float32:
            out = torch.where(dark[:, None, None, None].to(out.device), torch.full_like(out, math.nan), out)
        return out


def add_dark_image(cfg):
    folder = next(Path(cfg.dataset.train_data_dir).iterdir())  # the kohya "2_subject" folder
    Image.new("RGB", (64, 64), (0, 0, 0)).save(folder / "dark.png")
    (folder / "dark.txt").write_text("subject, dark")


def poisoned_model(dtype_name: str, *, always: bool) -> tuple[TinyAdapter, NaNForDarkImages]:
    adapter = half_model(dtype_name)
    vae = NaNForDarkImages(always).to(DTYPES[dtype_name])
    adapter.root.first_stage_model = vae
    return adapter, vae


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "uncached"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_half_vae_nan_latent_is_encoded_again_in_fp32(tmp_path, dtype_name, cached):
    adapter, vae = poisoned_model(dtype_name, always=False)
    cfg = make_config(tmp_path, **{"training.max_train_steps": 6, "dataset.cache_latents": cached})
    add_dark_image(cfg)
    snapshot = model_snapshot(adapter)
    result = train(cfg, adapter, work_dir=tmp_path / "work")
    assert_model_unchanged(adapter, snapshot)
    assert result.steps == 6
    if dtype_name != "fp16":  # fp16: the GradScaler may skip a step while its scale settles
        assert result.skipped_steps == 0
    half = dtype_name != "fp32"
    if half:
        assert result.upcast_latents >= 1  # the dark image, encoded again with the VAE in float32
        assert torch.float32 in vae.calls
        if cached:
            assert result.upcast_latents == 1  # once, then from the cache
    else:
        assert result.upcast_latents == 0
    assert vae.weight.dtype == DTYPES[dtype_name]  # the VAE is put back
    state, _ = load_lora(result.output_path)
    assert all(torch.isfinite(v.float()).all() for v in state.values())


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "uncached"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_latent_still_nan_in_fp32_stops_the_run_naming_the_image(tmp_path, dtype_name, cached):
    adapter, vae = poisoned_model(dtype_name, always=True)
    cfg = make_config(tmp_path, **{"training.max_train_steps": 6, "dataset.cache_latents": cached})
    add_dark_image(cfg)
    snapshot = model_snapshot(adapter)
    rec = Record()
    with pytest.raises(DatasetError, match=r"dark\.png.*NaN/inf latents even with the VAE in float32"):
        train(cfg, adapter, rec, work_dir=tmp_path / "work")
    assert_model_unchanged(adapter, snapshot)
    assert vae.weight.dtype == DTYPES[dtype_name]
    if cached:
        assert rec.infos == []  # stopped before training
    assert no_lora_files(tmp_path)
    assert not list((tmp_path / "work").rglob("*.safetensors"))  # nothing cached for it either


# -- losses and gradients -----------------------------------------------------------------------


class _InfGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


def inject(adapter: TinyAdapter, kind: str, steps) -> None:
    """Make ``predict`` give a NaN loss / inf gradients at the given (1-based) calls; one call per step here."""
    real, calls = adapter.predict, [0]

    def predict(*args, **kwargs):
        calls[0] += 1
        out = real(*args, **kwargs)
        if calls[0] in steps:
            return out * math.nan if kind == "nan_loss" else _InfGrad.apply(out)
        return out

    adapter.predict = predict


@pytest.mark.parametrize("kind", ["nan_loss", "inf_grad"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_a_few_bad_steps_are_skipped_and_counted(tmp_path, dtype_name, kind):
    adapter = half_model(dtype_name)
    inject(adapter, kind, {4, 5})
    cfg = make_config(tmp_path, **{"training.max_train_steps": 7})
    snapshot = model_snapshot(adapter)
    rec = Record()
    result = train(cfg, adapter, rec, work_dir=tmp_path / "work")
    assert_model_unchanged(adapter, snapshot)
    assert result.steps == 7
    assert not result.stopped_early
    assert {4, 5} <= set(rec.skipped_at())
    if dtype_name != "fp16":  # no scaler: only the injected steps are skipped
        assert rec.skipped_at() == [4, 5]
        assert result.skipped_steps == 2
    # progress never shows NaN, nor a made-up number: a skipped NaN loss is None ("–" in the tab)
    assert all(i.loss is None or math.isfinite(i.loss) for i in rec.infos)
    assert all(i.avg_loss is not None and math.isfinite(i.avg_loss) for i in rec.infos)
    assert (result.losses[3] is None) == (kind == "nan_loss")
    state, _ = load_lora(result.output_path)
    assert all(torch.isfinite(v.float()).all() for v in state.values())


@pytest.mark.parametrize("kind", ["nan_loss", "inf_grad"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_bad_steps_in_a_row_stop_the_run_without_a_file(tmp_path, dtype_name, kind):
    adapter = half_model(dtype_name)
    inject(adapter, kind, set(range(3, 1000)))
    cfg = make_config(tmp_path, **{"training.max_train_steps": 60})
    snapshot = model_snapshot(adapter)
    rec = Record()
    with pytest.raises(NonFiniteError, match=f"{MAX_BAD_STEPS_IN_A_ROW} steps in a row") as err:
        train(cfg, adapter, rec, work_dir=tmp_path / "work")
    assert_model_unchanged(adapter, snapshot)
    assert no_lora_files(tmp_path)
    stopped_at = rec.infos[-1].step + 1  # the step that raised emits no StepInfo
    if dtype_name == "fp16" and kind == "inf_grad":
        # the GradScaler's business: the scale halves from 65536 first; only skips below a scale of 1 count
        # (at least 15 halvings from 2**15 or more), then 5 counted: 0.5, 0.25, ... 2**-5
        assert f"loss scale lowered to {2.0**-MAX_BAD_STEPS_IN_A_ROW:g})" in str(err.value)
        assert stopped_at - 3 + 1 >= 15 + MAX_BAD_STEPS_IN_A_ROW
    else:
        assert stopped_at == 3 + MAX_BAD_STEPS_IN_A_ROW - 1
    assert rec.infos[-1].skipped_steps >= MAX_BAD_STEPS_IN_A_ROW - 1


# -- saving -------------------------------------------------------------------------------------


def test_save_lora_refuses_non_finite_weights(tmp_path):
    good = {"lora_unet_x.lora_down.weight": torch.ones(2, 4), "lora_unet_x.alpha": torch.tensor(2.0)}
    bad = {**good, "lora_unet_x.lora_up.weight": torch.tensor([[1.0, math.nan]])}
    with pytest.raises(NonFiniteError, match=r"lora_unet_x\.lora_up\.weight.*nothing was written"):
        save_lora(tmp_path / "a.safetensors", bad)
    huge = {**good, "lora_unet_x.lora_up.weight": torch.full((4, 2), 1e6)}
    with pytest.raises(NonFiniteError, match="overflow the save precision"):
        save_lora(tmp_path / "b.safetensors", huge, dtype="fp16")
    assert list(tmp_path.iterdir()) == []
    assert save_lora(tmp_path / "b.safetensors", huge, dtype="bf16").is_file()


def test_the_loop_stops_rather_than_write_non_finite_weights(tmp_path, monkeypatch):
    real = LoRANetwork.state_dict

    def poisoned(self, *args, **kwargs):
        state = real(self, *args, **kwargs)
        key = next(k for k in state if k.endswith("lora_up.weight"))
        state[key] = state[key].clone().fill_(math.inf)
        return state

    monkeypatch.setattr(LoRANetwork, "state_dict", poisoned)
    adapter = half_model("fp16")
    snapshot = model_snapshot(adapter)
    with pytest.raises(NonFiniteError, match="not saved"):
        train(make_config(tmp_path, **{"training.max_train_steps": 2}), adapter, work_dir=tmp_path / "work")
    assert_model_unchanged(adapter, snapshot)
    assert no_lora_files(tmp_path)


# -- the WebUI adapter --------------------------------------------------------------------------


@pytest.fixture
def fake_webui(tmp_path):
    fake = FakeWebUI(tmp_path / "webui", "sd1")
    with fake.installed():
        yield fake


def test_webui_adapter_encodes_again_with_the_vae_in_fp32_and_puts_it_back(fake_webui):
    """As the WebUI's "Automatically revert VAE to 32-bit floats" on decode: here on encode, for one call."""
    devices = fake_webui.devices
    devices.dtype_vae = torch.float16  # the WebUI's default (no --no-half-vae)
    vae = NaNForDarkImages(always=False).to(torch.float16)
    fake_webui.sd_model.first_stage_model = vae
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    pixels[1] = -1.0  # the image the fp16 VAE "overflows" on
    with fake_webui.backend.host.WebUIHost().training_session() as adapter:
        half = adapter.encode_images(pixels)
        assert torch.isfinite(half[0]).all()
        assert torch.isnan(half[1]).all()
        full = adapter.encode_images_fp32(pixels)
        assert full.dtype == torch.float32
        assert torch.isfinite(full).all()
        assert torch.allclose(full[0], half[0].float(), atol=1e-2)
        assert vae.calls[-1] == torch.float32
        assert devices.dtype_vae == torch.float16  # put back as it was
        assert vae.weight.dtype == torch.float16
        assert torch.isnan(adapter.encode_images(pixels)[1]).all()  # the next plain encode is fp16 again


def test_job_status_shows_skipped_steps_and_the_stop_reason(tmp_path):
    host = FakeHost(tmp_path / "a")
    inject(host.adapter, "nan_loss", {2, 3})
    manager = JobManager(host)
    cfg = make_config(tmp_path / "a")
    cfg.save.output_dir = None
    job = manager.wait(manager.start(cfg).id, timeout=120)
    status = job.to_dict()
    assert status["state"] == "done", status["error"]
    assert status["skipped_steps"] == 2
    assert math.isfinite(status["loss"])
    assert math.isfinite(status["avg_loss"])
    assert [x is None for x in status["losses"]] == [False, True, True, False, False, False]
    json.dumps(status, allow_nan=False)  # valid JSON for the API: no NaN anywhere
    assert "2 skipped (NaN/inf)" in status_html(status)

    host = FakeHost(tmp_path / "b")
    inject(host.adapter, "nan_loss", set(range(1, 100)))
    cfg = make_config(tmp_path / "b", **{"training.max_train_steps": 20})
    cfg.save.output_dir = None
    manager = JobManager(host)
    job = manager.wait(manager.start(cfg).id, timeout=120)
    status = job.to_dict()
    assert status["state"] == "failed"
    assert f"{MAX_BAD_STEPS_IN_A_ROW} steps in a row were skipped" in status["error"]
    assert not list(host.lora_dir.glob("*.safetensors"))


@pytest.mark.parametrize(
    ("dtype_name", "kind", "reason"),
    [
        ("fp32", "nan_loss", r"the loss was NaN/inf at all 3 steps.*check that txt2img works"),
        ("fp16", "nan_loss", r"the loss was NaN/inf at all 3 steps"),
        ("fp32", "inf_grad", r"all 3 steps were skipped for NaN/inf losses or gradients"),
        ("fp16", "inf_grad", r"all 3 steps were skipped.*loss scale needs some steps"),
    ],
)
def test_a_run_whose_every_step_was_skipped_writes_no_file(tmp_path, dtype_name, kind, reason):
    """A run that trained nothing (every step skipped, here 3 steps, fewer than the in-a-row limit)
    ends with a reason instead of writing a LoRA that changes nothing: a loss that is never finite
    points at the model or the captions, skipped gradients at fp16's loss scale."""
    adapter = half_model(dtype_name)
    inject(adapter, kind, {1, 2, 3})
    cfg = make_config(tmp_path, **{"training.max_train_steps": 3})
    snapshot = model_snapshot(adapter)
    rec = Record()
    with pytest.raises(NonFiniteError, match=rf"Nothing was trained: {reason}"):
        train(cfg, adapter, rec, work_dir=tmp_path / "work")
    assert_model_unchanged(adapter, snapshot)
    assert no_lora_files(tmp_path)
    if kind == "nan_loss":
        assert rec.infos[0].loss is None
        assert rec.infos[0].avg_loss is None  # no finite loss yet: nothing to average, nothing made up
