"""The WebUI host and adapter (``lora_trainer.backends.webui``) against a stand-in WebUI.

``tests.fixtures.fake_webui`` installs a ``modules`` package and the Lora extension's ``networks``
module around a tiny SD1/SD2/SDXL model for one test at a time; the backend is imported against it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
import types
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from lora_trainer.contracts import FAMILIES, SizeCond
from lora_trainer.errors import IncompatibleModelError, LoraFileError
from lora_trainer.files.lora_file import load_lora, save_lora
from lora_trainer.jobs import JobManager
from lora_trainer.naming import find_targets
from lora_trainer.networks.network import LoRANetwork
from lora_trainer.webui.settings import register_settings
from tests.fixtures.fake_webui import SAMPLERS, FakeWebUI
from tests.fixtures.training import make_config
from tests.fixtures.webui_models import TinyAdapter, build_webui_model, webui_text_encoders

ROOT = Path(__file__).resolve().parents[1]
TE_GROUPS = {"sd1": ("te",), "sd2": ("te",), "sdxl": ("te1", "te2")}
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
MISSING = object()
WATCHED_ATTRIBUTES = ("is_trainable", "ucg_rate", "layer_idx", "network_current_names", "use_checkpoint", "checkpoint")


def job_config(tmp_path, steps=2, **overrides):
    cfg = make_config(tmp_path, **{"training.max_train_steps": steps, **overrides})
    cfg.save.output_dir = None  # the host's Lora folder
    return cfg


def run_job(host, cfg, manager=None, **kwargs):
    manager = manager or JobManager(host)
    job = manager.wait(manager.start(cfg, **kwargs).id, timeout=120)
    assert not job.thread.is_alive()
    return manager, job


# --------------------------------------------------------------------------------------------
# "left as found"


def snapshot(fake: FakeWebUI) -> dict:
    model = fake.sd_model
    modules = dict(model.named_modules())
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "params": {n: (p.dtype, p.device, p.requires_grad, p.grad) for n, p in model.named_parameters()},
        "buffers": {n: (b.dtype, b.device) for n, b in model.named_buffers()},
        "training": {n: m.training for n, m in modules.items()},
        "hooks": {n: tuple(tuple(getattr(m, h)) for h in HOOK_DICTS) for n, m in modules.items()},
        "forwards": {n: m.__dict__.get("forward") for n, m in modules.items()},
        "class_forwards": {type(m): type(m).__dict__.get("forward") for m in modules.values()},
        "attrs": {n: tuple(getattr(m, a, MISSING) for a in WATCHED_ATTRIBUTES) for n, m in modules.items()},
        "optimization": fake.hijack.optimization_method,
        "options": dict(fake.opts.data),
        "loaded_networks": list(fake.lora.loaded_networks),
    }


def assert_left_as_found(before: dict, after: dict) -> None:
    assert after["tensors"].keys() == before["tensors"].keys()
    for key, tensor in before["tensors"].items():
        now = after["tensors"][key]
        assert now.dtype == tensor.dtype, key
        assert now.device == tensor.device, key
        assert torch.equal(now, tensor), key
    for part in before:
        if part != "tensors":
            assert after[part] == before[part], part


# --------------------------------------------------------------------------------------------
# import boundary


def test_core_imports_without_the_webui_or_gradio():
    code = textwrap.dedent(
        """
        import importlib, pkgutil, sys
        sys.modules["modules"] = sys.modules["gradio"] = sys.modules["networks"] = None
        import lora_trainer
        allowed = {"lora_trainer.webui.ui", "lora_trainer.webui.workshop_ui", "lora_trainer.webui.results_ui", "lora_trainer.webui.tryout_ui", "lora_trainer.webui.export_ui"}  # gradio at import time
        backend, failed = [], []
        for info in pkgutil.walk_packages(lora_trainer.__path__, "lora_trainer."):
            if info.name.startswith("lora_trainer.backends.webui."):
                backend.append(info.name)
            elif info.name not in allowed:
                try:
                    importlib.import_module(info.name)
                except Exception as e:
                    failed.append(f"{info.name}: {type(e).__name__}: {e}")
        if not backend:
            failed.append("no lora_trainer.backends.webui modules found")
        for name in backend:
            try:
                importlib.import_module(name)
                failed.append(f"{name} imported without the WebUI")
            except ImportError:
                pass
        print("\\n".join(failed))
        sys.exit(1 if failed else 0)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_stand_in_webui_does_not_leak(make_webui):
    fake = make_webui("sd1")
    assert sys.modules["modules.shared"].sd_model is fake.sd_model
    assert "lora_trainer.backends.webui" in sys.modules


def test_stand_in_webui_is_gone_after_the_test():
    assert "modules" not in sys.modules
    assert "networks" not in sys.modules
    assert "lora_trainer.backends.webui" not in sys.modules


# --------------------------------------------------------------------------------------------
# the adapter


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_matches_the_reference_adapter(make_webui, family):
    """Images, text and denoiser through the WebUI's calls give what TinyAdapter computes directly."""
    fake = make_webui(family)
    host = fake.backend.host.WebUIHost()
    reference = TinyAdapter(family)  # same seed, same weights
    with host.training_session() as adapter:
        assert (adapter.family, adapter.prediction_type) == (family, "epsilon")
        assert adapter.unet is fake.sd_model.model.diffusion_model
        assert adapter.text_encoders.keys() == set(TE_GROUPS[family])
        for group, te in webui_text_encoders(fake.sd_model).items():
            assert adapter.text_encoders[group] is te
        assert adapter.alphas_cumprod.shape == (1000,)
        assert adapter.alphas_cumprod.dtype == torch.float32
        assert adapter.model_name == f"tiny-{family}.safetensors"
        assert len(adapter.model_hash) == 64

        pixels = torch.rand(2, 3, 64, 64) * 2 - 1
        latents = adapter.encode_images(pixels)
        assert latents.shape == (2, 4, 8, 8)
        assert torch.allclose(latents, reference.encode_images(pixels))
        assert fake.encode_calls == [0]  # the full VAE, not the UI's encode method

        sizes = [SizeCond((64, 96), (0, 8), (64, 64)), SizeCond((64, 64), (0, 0), (64, 64))]
        size_cond = sizes if family == "sdxl" else None
        captions = ["a photo of a cat", "word " * 100]  # the second needs two 75-token chunks
        cond = adapter.encode_text(captions, max_token_length=150, size_cond=size_cond)
        expected = reference.encode_text(captions, max_token_length=150, size_cond=size_cond)
        assert cond.context.shape == expected.context.shape == (2, 154, expected.context.shape[-1])
        assert torch.allclose(cond.context, expected.context, atol=1e-5)
        if family == "sdxl":
            assert torch.allclose(cond.vector, expected.vector, atol=1e-5)
        else:
            assert cond.vector is None
        short = adapter.encode_text(captions, max_token_length=75, size_cond=size_cond)
        assert short.context.shape[1] == 77  # max_token_length caps the WebUI's chunks

        noisy, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
        out = adapter.predict(noisy, t, expected)
        assert out.shape == noisy.shape
        assert torch.allclose(out, reference.predict(noisy, t, expected), atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_text_encoder_lora_gets_gradients_through_the_webui_conditioning(make_webui, family):
    fake = make_webui(family)
    host = fake.backend.host.WebUIHost()
    with host.training_session() as adapter:
        network = LoRANetwork(find_targets(family, adapter.unet, adapter.text_encoders), rank=2, alpha=2)
        for lora in network.loras():
            nn.init.normal_(lora.lora_up.weight, std=0.05)
        size_cond = [SizeCond((64, 64), (0, 0), (64, 64))] if family == "sdxl" else None
        with network.applied():
            cond = adapter.encode_text(["(a photo) of a cat"], clip_skip=adapter.default_clip_skip, size_cond=size_cond)
            adapter.predict(torch.randn(1, 4, 8, 8), torch.tensor([500]), cond).square().mean().backward()
        for group in (*TE_GROUPS[family], "unet"):
            grads = [p.grad for p in network.parameters_of((group,))]
            assert any(g is not None and g.abs().sum() > 0 for g in grads), group
        assert all(p.grad is None for p in fake.sd_model.parameters())
        if family == "sdxl":
            assert [e.is_trainable for e in fake.sd_model.conditioner.embedders[:2]] == [True, True]
    if family == "sdxl":  # the WebUI's own setting is back: its generations run the text encoders without grad
        assert [e.is_trainable for e in fake.sd_model.conditioner.embedders[:2]] == [False, False]
        assert not hasattr(fake.sd_model.conditioner.embedders[0], "ucg_rate")


def test_sd2_v_prediction_and_its_clip_skip(make_webui):
    fake = make_webui("sd2")
    fake.sd_model.parameterization = "v"
    host = fake.backend.host.WebUIHost()
    assert host.model_info().family == "sd2"
    wrapped = fake.sd_model.cond_stage_model.wrapped
    with host.training_session() as adapter:
        assert adapter.prediction_type == "v_prediction"
        assert adapter.default_clip_skip == 1  # ldm's penultimate layer; the WebUI's option does not reach SD2
        adapter.encode_text(["a cat"], clip_skip=2)
        assert wrapped.layer_idx == 2
        assert fake.opts.CLIP_stop_at_last_layers == 1
    assert wrapped.layer_idx == 1


def test_sd1_clip_skip_option_is_set_for_the_run_only(make_webui):
    fake = make_webui("sd1")
    host = fake.backend.host.WebUIHost()
    reference = TinyAdapter("sd1")
    with host.training_session() as adapter:
        assert adapter.default_clip_skip == 1
        cond = adapter.encode_text(["a cat"], clip_skip=2)
        assert fake.opts.CLIP_stop_at_last_layers == 2
        assert torch.allclose(cond.context, reference.encode_text(["a cat"], clip_skip=2).context, atol=1e-5)
    assert fake.opts.CLIP_stop_at_last_layers == 1
    fake.opts.data["CLIP_stop_at_last_layers"] = 3  # the user's setting: the default, and kept
    with host.training_session() as adapter:
        assert adapter.default_clip_skip == 3
        adapter.encode_text(["a cat"], clip_skip=2)
        fake.opts.data["CLIP_stop_at_last_layers"] = 4  # changed in the Settings tab during the run
    assert fake.opts.CLIP_stop_at_last_layers == 4


# --------------------------------------------------------------------------------------------
# jobs through the host


@pytest.mark.parametrize("family", FAMILIES)
def test_training_job_on_each_family_leaves_the_model_as_found(make_webui, tmp_path, family):
    fake = make_webui(family)
    host = fake.backend.host.WebUIHost()
    before = snapshot(fake)
    overrides = {"network.train_text_encoder": True}
    if family == "sd1":
        overrides |= {"training.clip_skip": 2, "sample.sample_every_n_steps": 2, "sample.sample_prompts": ["a cat"]}
    seen = {}
    original = host.on_job_progress

    def progress(job):
        original(job)
        if job.step == 1:
            seen["lock_free"] = fake.queue_lock.acquire(blocking=False)
            seen["clip_skip"] = fake.opts.CLIP_stop_at_last_layers
            seen["frozen"] = not any(p.requires_grad for p in fake.sd_model.parameters())
            seen["state"] = (fake.state.job_count, fake.state.sampling_step, fake.state.sampling_steps)

    host.on_job_progress = progress
    _, job = run_job(host, job_config(tmp_path, 3, **overrides))
    assert job.state == "done", job.error
    assert seen == {
        "lock_free": False,
        "clip_skip": 2 if family == "sd1" else 1,
        "frozen": True,
        "state": (1, 1, 3),
    }
    path = Path(job.output_file)
    assert path.parent == Path(fake.cmd_opts.lora_dir)
    assert path.is_file()
    state, metadata = load_lora(path)
    prefixes = {key.split("_text_model")[0] for key in state if "_text_model" in key}
    assert prefixes == {"lora_" + g for g in TE_GROUPS[family]}
    assert any(key.startswith("lora_unet_") for key in state)
    assert ("load_network", path.stem) in fake.lora.calls  # checked by the WebUI's loader
    assert path.stem in fake.lora.available_networks  # published: the Lora list was refreshed
    info = fake.sd_model.sd_checkpoint_info  # the WebUI's own hashes of the checkpoint, as kohya writes them
    assert metadata["ss_sd_model_name"] == f"tiny-{family}.safetensors"
    assert metadata["ss_sd_model_hash"] == info.hash
    assert metadata["ss_new_sd_model_hash"] == info.sha256
    assert (metadata["ss_unet_lr"], metadata["ss_text_encoder_lr"]) == ("None", "None")  # unset, as kohya
    if family != "sd1":
        assert metadata["ss_clip_skip"] == "None"
    if family == "sd1":
        assert metadata["ss_clip_skip"] == "2"
        assert len(job.samples) == 1
        assert len(fake.samples) == 1
    assert_left_as_found(before, snapshot(fake))
    assert fake.state.job == ""
    assert fake.state.job_count == 0
    assert fake.state._events == [("begin", host.task_id(job)), ("end", host.task_id(job))]
    assert fake.progress.finished == [host.task_id(job)]
    assert fake.progress.current_task is None
    assert fake.queue_lock.acquire(blocking=False)
    fake.queue_lock.release()
    assert fake.gc_calls > 0


@pytest.mark.parametrize(("family", "ending"), [("sd2", "cancel"), ("sdxl", "failure"), ("sd1", "failure")])
def test_cancel_and_failure_leave_the_model_as_found(make_webui, tmp_path, family, ending):
    fake = make_webui(family)
    host = fake.backend.host.WebUIHost()
    manager = JobManager(host)
    before = snapshot(fake)
    original_progress = host.on_job_progress

    def progress(job):
        original_progress(job)
        if job.step == 1 and ending == "cancel":
            manager.cancel(job.id)

    host.on_job_progress = progress
    calls = []
    model = fake.sd_model
    apply_model = model.apply_model

    def failing_apply_model(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure in the denoiser")
        return apply_model(*args, **kwargs)

    if ending == "failure":
        model.apply_model = failing_apply_model
    cfg = job_config(tmp_path, 10, **{"network.train_text_encoder": True, "training.clip_skip": 2})
    _, job = run_job(host, cfg, manager)
    model.__dict__.pop("apply_model", None)
    if ending == "cancel":
        assert job.state == "stopped"
        assert job.step == 1
        assert job.output_file
    else:
        assert job.state == "failed"
        assert "injected failure" in job.error
    assert_left_as_found(before, snapshot(fake))
    assert fake.state.job == ""
    assert fake.queue_lock.acquire(blocking=False)
    fake.queue_lock.release()


@pytest.mark.parametrize("button", ["interrupt", "stop_generating"])
def test_the_webui_interrupt_button_stops_training(make_webui, tmp_path, button):
    fake = make_webui("sd1")
    host = fake.backend.host.WebUIHost()
    original = host.on_job_progress

    def progress(job):
        original(job)
        if job.step == 2:
            getattr(fake.state, button)()  # what the Interrupt button calls

    host.on_job_progress = progress
    _, job = run_job(host, job_config(tmp_path, 20))
    assert job.state == "stopped"
    assert job.step == 2
    assert Path(job.output_file).is_file()
    assert not fake.state.interrupted
    assert not fake.state.stopping_generation
    fake.state.skip()
    assert not host.interrupted()  # Skip is for generations, not a stop


def test_generation_waits_for_training_and_starts_with_a_clean_state(make_webui, tmp_path):
    fake = make_webui("sd1")
    host = fake.backend.host.WebUIHost()
    manager = JobManager(host)
    at_step, release = threading.Event(), threading.Event()
    original = host.on_job_progress

    def progress(job):
        original(job)
        if job.step == 1 and not at_step.is_set():
            at_step.set()
            assert release.wait(60)

    host.on_job_progress = progress
    job = manager.start(job_config(tmp_path, 3))
    assert at_step.wait(60)
    assert fake.state.job == host.task_id(job)
    assert fake.progress.current_task == host.task_id(job)
    assert "step 1/3" in fake.state.textinfo
    assert "Training LoRA 'tiny'" in fake.state.textinfo
    seen = []

    def generate():  # what txt2img (UI or API) does
        with fake.queue_lock:
            fake.state.begin(job="txt2img")
            manager.wait(job.id, timeout=60)  # our job finishes (and reports its end) meanwhile
            seen.append((fake.state.job, fake.state.job_count))
            fake.state.end()

    generation = threading.Thread(target=generate)
    generation.start()
    time.sleep(0.2)
    assert generation.is_alive()
    assert not seen
    release.set()
    generation.join(60)
    assert job.state == "done", job.error
    assert seen == [("txt2img", -1)]  # our job's end did not end the generation's
    task = host.task_id(job)
    assert fake.state._events == [("begin", task), ("end", task), ("begin", "txt2img"), ("end", "txt2img")]


# --------------------------------------------------------------------------------------------
# active networks, the WebUI's loader and its Lora list


def write_lora(fake: FakeWebUI, name: str, *, conv: bool = False, seed: int = 1) -> tuple[Path, dict]:
    unet, text_encoders = fake.sd_model.model.diffusion_model, webui_text_encoders(fake.sd_model)
    network = LoRANetwork(find_targets(fake.family, unet, text_encoders, conv=conv), rank=2, alpha=1, conv_rank=2)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for lora in network.loras():
            nn.init.normal_(lora.lora_up.weight, std=0.1)
    state = {k: v.detach().clone() for k, v in network.state_dict().items()}
    path = save_lora(Path(fake.cmd_opts.lora_dir) / f"{name}.safetensors", state, {}, dtype="float")
    return path, state


def test_an_applied_lora_is_taken_off_before_training(make_webui):
    fake = make_webui("sd2")  # fused attention too
    pristine = {k: v.clone() for k, v in fake.sd_model.state_dict().items()}
    write_lora(fake, "style")
    fake.networks.load_networks(["style"])  # a generation with <lora:style:1>
    fake.lora.apply_as_a_generation_would(fake.sd_model)
    merged = {k: v.clone() for k, v in fake.sd_model.state_dict().items()}
    changed = [k for k in pristine if not torch.equal(pristine[k], merged[k])]
    assert any("in_proj_weight" in k for k in changed)
    assert any("diffusion_model" in k for k in changed)

    host = fake.backend.host.WebUIHost()
    with host.training_session():
        assert fake.lora.loaded_networks == []
        assert all(torch.equal(v, pristine[k]) for k, v in fake.sd_model.state_dict().items())
    assert all(torch.equal(v, pristine[k]) for k, v in fake.sd_model.state_dict().items())
    assert all(getattr(m, "network_current_names", ()) == () for m in fake.sd_model.modules())
    fake.networks.load_networks(["style"])  # and the WebUI applies it again at the next generation
    fake.lora.apply_as_a_generation_would(fake.sd_model)
    assert all(torch.equal(v, merged[k]) for k, v in fake.sd_model.state_dict().items())


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_verify_lora_reports_what_the_webui_loader_does_not_place(make_webui, family):
    fake = make_webui(family)
    host = fake.backend.host.WebUIHost()
    path, state = write_lora(fake, "mine", conv=True)
    assert host.verify_lora(path) == []
    assert ("load_network", "mine") in fake.lora.calls

    te = "lora_te" if family == "sd2" else "lora_te2"
    layer = f"{te}_text_model_encoder_layers_1_self_attn"
    resized = next(k for k in state if k.startswith("lora_unet_") and k.endswith("to_k.lora_up.weight"))
    doctored = {k: v for k, v in state.items() if not k.startswith(f"{layer}_k_proj.")}
    doctored[resized] = torch.zeros(doctored[resized].shape[0] + 1, doctored[resized].shape[1])
    for part, tensor in (("lora_down.weight", torch.zeros(2, 8)), ("lora_up.weight", torch.zeros(8, 2))):
        doctored[f"lora_unet_nowhere_proj.{part}"] = tensor
    bad = save_lora(path.with_name("doctored.safetensors"), doctored, {}, dtype="float")
    with host.training_session():
        pass
    problems = host.verify_lora(bad)
    assert len(problems) == 5, problems
    assert "lora_unet_nowhere_proj" in problems
    lacking = [p for p in problems if "lacks k_proj" in p]
    assert sorted(p.split()[0] for p in lacking) == [f"{layer}_{x}_proj" for x in ("out", "q", "v")]
    assert any(p.startswith(resized.split(".")[0]) and "does not fit" in p for p in problems)
    # a checkpoint change queued behind the run loads before the check: nothing to check the file against
    with host.training_session():
        pass
    fake.set_model(build_webui_model(family, "tiny", seed=5))
    assert host.verify_lora(bad) == []
    assert len(host.verify_lora(bad)) == 5  # a later check is against the model loaded then


def test_ldm_block_checkpointing_is_off_for_the_run(make_webui):
    """ldm/sgm's CheckpointFunction computes no gradient for a LoRA hooked inside a block."""
    fake = make_webui("sdxl")
    unet = fake.sd_model.model.diffusion_model
    res_block = unet.input_blocks[1][0]
    transformer_block = unet.input_blocks[4][1].transformer_blocks[0]
    res_block.use_checkpoint = transformer_block.checkpoint = True
    host = fake.backend.host.WebUIHost()
    with host.training_session():
        assert res_block.use_checkpoint is False
        assert transformer_block.checkpoint is False
    assert res_block.use_checkpoint is True
    assert transformer_block.checkpoint is True


def test_verify_lora_without_the_lora_extension_uses_our_loader(make_webui, monkeypatch):
    fake = make_webui("sd1")
    host = fake.backend.host.WebUIHost()
    path, state = write_lora(fake, "mine")
    monkeypatch.setitem(sys.modules, "networks", None)
    assert host.verify_lora(path) == []
    state["lora_unet_nowhere.lora_down.weight"] = torch.zeros(2, 4)
    state["lora_unet_nowhere.lora_up.weight"] = torch.zeros(4, 2)
    assert host.verify_lora(save_lora(path.with_name("x.safetensors"), state, {})) == ["lora_unet_nowhere"]
    host.publish_lora(path)  # nothing to refresh: no error


def test_verify_lora_reports_a_file_the_webui_cannot_load(make_webui):
    fake = make_webui("sd1")
    host = fake.backend.host.WebUIHost()
    path, state = write_lora(fake, "mine")
    key = next(k for k in state if k.endswith(".lora_up.weight"))
    del state[key]
    with pytest.raises(LoraFileError, match="the WebUI's Lora loader cannot load"):
        host.verify_lora(save_lora(path.with_name("broken.safetensors"), state, {}))


# --------------------------------------------------------------------------------------------
# what cannot be trained


def test_fp8_is_refused_and_medvram_lowvram_are_not(make_webui):
    """--medvram/--lowvram models train (the run places the parts: tests/test_webui_lowvram.py)."""
    fake = make_webui("sdxl")
    host = fake.backend.host.WebUIHost()
    fake.cmd_opts.medvram = fake.cmd_opts.medvram_sdxl = fake.cmd_opts.lowvram = True
    fake.sd_model.lowvram = True
    assert host.model_info().problem is None
    fake.devices.fp8 = True
    assert "FP8" in host.model_info().problem


def _rename_class(module: nn.Module, name: str) -> None:
    module.__class__ = type(name, (type(module),), {})


UNSUPPORTED = {
    "sd3": ("sd1", lambda m: setattr(m, "is_sd3", True), "Stable Diffusion 3"),
    "inpainting": (
        "sd1",
        lambda m: m.model.diffusion_model.input_blocks[0].__setitem__(0, nn.Conv2d(9, 32, 3, padding=1)),
        "inpainting",
    ),
    "sdxl-inpainting": ("sdxl", lambda m: setattr(m, "is_sdxl_inpaint", True), "inpainting SDXL"),
    "pix2pix": ("sd1", lambda m: setattr(m, "cond_stage_key", "edit"), "instruct-pix2pix"),
    "refiner": (
        "sdxl",
        lambda m: setattr(m.conditioner, "embedders", nn.ModuleList(list(m.conditioner.embedders)[1:])),
        "refiner",
    ),
    "altdiffusion": (
        "sd1",
        lambda m: _rename_class(m.cond_stage_model, "FrozenXLMREmbedderWithCustomWords"),
        "FrozenXLMREmbedderWithCustomWords",
    ),
    "unknown-prediction": ("sd2", lambda m: setattr(m, "parameterization", "x0"), "'x0'"),
}


@pytest.mark.parametrize("kind", UNSUPPORTED)
def test_unsupported_models_are_refused_with_a_reason(make_webui, kind):
    family, change, reason = UNSUPPORTED[kind]
    fake = make_webui(family)
    change(fake.sd_model)
    host = fake.backend.host.WebUIHost()
    info = host.model_info()
    assert info.family is None
    assert reason in info.problem
    assert info.checkpoint.startswith(f"tiny-{family}")
    with pytest.raises(IncompatibleModelError, match=reason), host.training_session():
        pass


def test_no_model_loaded(make_webui):
    fake = make_webui("sd1")
    fake.set_model(None)
    host = fake.backend.host.WebUIHost()
    info = host.model_info()
    assert info.family is None
    assert info.checkpoint == ""
    assert "no model is loaded" in info.problem
    with pytest.raises(IncompatibleModelError, match="no model is loaded"), host.training_session():
        pass


# --------------------------------------------------------------------------------------------
# previews


def test_previews_run_the_webui_txt2img_with_the_network_attached(make_webui, tmp_path):
    fake = make_webui("sd1")
    host = fake.backend.host.WebUIHost()
    processing = sys.modules["modules.processing"]
    cfg = job_config(tmp_path)
    cfg.sample.sample_sampler, cfg.sample.sample_steps, cfg.sample.sample_cfg = "Euler", 7, 5.0
    title = fake.sd_model.sd_checkpoint_info.title
    fake.opts.data["sd_model_checkpoint"] = "another.safetensors"  # picked in the UI while training runs
    processing.StableDiffusionProcessing.cached_c = [("a cat", 1), "stale conditioning"]
    state = fake.state
    state.job, state.job_count, state.sampling_step, state.sampling_steps, state.textinfo = "task(x)", 1, 3, 10, "T"
    with host.training_session() as adapter:
        network = LoRANetwork(find_targets("sd1", adapter.unet, adapter.text_encoders), rank=2, alpha=2)
        with network.applied(), torch.no_grad():
            network.eval()
            images = host.sample_images(["a cat", "a dog"], cfg, 3)
            again = host.sample_images(["a cat"], cfg, 4)
    assert len(images) == 2
    assert all(isinstance(i, Image.Image) and i.size == (64, 64) for i in images)
    assert len(again) == 1
    first, second = fake.samples
    p = first["p"]
    assert (p.sampler_name, p.steps, p.cfg_scale, p.width, p.height) == ("Euler", 7, 5.0, 64, 64)
    assert p.prompt == ["a cat", "a dog"]
    assert p.n_iter == 2
    assert p.batch_size == 1
    assert p.override_settings == {"sd_model_checkpoint": title}
    assert p.disable_extra_networks
    assert p.do_not_save_samples
    assert p.do_not_save_grid
    assert p._closed
    assert second["p"].seed == p.seed  # unset sample_seed: one seed for the whole run
    assert first["hooks_on_unet"] > 0
    assert not first["grad_enabled"]
    assert first["loaded_networks"] == 0
    assert first["cache_hits"] == 0
    assert second["cache_hits"] == 0
    assert processing.StableDiffusionProcessing.cached_c == [None, None]
    assert fake.opts.data["sd_model_checkpoint"] == "another.safetensors"
    assert (state.job, state.job_count, state.sampling_step, state.sampling_steps, state.textinfo) == (
        "task(x)",
        1,
        3,
        10,
        "T",
    )
    assert state.current_image is again[0]
    cfg.sample.sample_seed, cfg.sample.sample_width = 1234, 128
    fake.opts.data["sd_model_checkpoint"] = title  # nothing to pin: no override (none to restore either)
    host.sample_images(["a cat"], cfg, 5)
    last = fake.samples[-1]["p"]
    assert (last.seed, last.width, last.override_settings) == (1234, 128, {})


# --------------------------------------------------------------------------------------------
# settings, API switches, captioning


def test_settings_section_folders_and_api_switches(make_webui, monkeypatch):
    fake = make_webui("sd1")
    be = fake.backend.options
    gradio = types.ModuleType("gradio")
    gradio.Dropdown, gradio.Slider, gradio.Checkbox = "Dropdown", "Slider", "Checkbox"
    monkeypatch.setitem(sys.modules, "gradio", gradio)
    with pytest.raises(KeyError):  # the WebUI knows a setting only once the extension declared it
        fake.opts.set(be.OPT_ANY_OUTPUT_DIR, True)
    register_settings()
    labels = fake.opts.data_labels
    for key, default in be.SETTINGS.items():
        assert labels[key].section == ("lora_train", "LoRA Train")
        assert labels[key].category_id == "training"
        assert fake.opts.data[key] == default
    assert "quick-test" in labels[be.OPT_PRESET].component_args()["choices"]
    assert labels[be.OPT_SAMPLER].component_args()["choices"] == SAMPLERS
    assert be.sample_defaults() == {"sample_sampler": "Euler a", "sample_steps": 20}

    host = fake.backend.host.WebUIHost()
    lora_dir = Path(fake.cmd_opts.lora_dir)
    assert host.lora_dir == lora_dir
    assert host.work_dir == Path(fake.cmd_opts.data_dir) / "lora_train"
    fake.opts.data[be.OPT_SUBFOLDER] = "trained\\mine"
    assert host.lora_dir == lora_dir / "trained" / "mine"
    for bad in ("../elsewhere", "/abs", "C:/x"):
        fake.opts.data[be.OPT_SUBFOLDER] = bad
        assert host.lora_dir == lora_dir
    # where runs may write: the Lora folder itself (subfolder setting or not), anywhere only by the setting
    assert labels[be.OPT_ANY_OUTPUT_DIR].component == "Checkbox"
    assert host.allowed_output_roots() == [lora_dir]
    assert fake.opts.set(be.OPT_ANY_OUTPUT_DIR, True)
    assert host.allowed_output_roots() is None
    assert fake.opts.set(be.OPT_ANY_OUTPUT_DIR, False)
    assert host.allowed_output_roots() == [lora_dir]
    del fake.cmd_opts.lora_dir  # the Lora extension is disabled: its --lora-dir option does not exist
    assert host.lora_dir == Path(fake.cmd_opts.data_dir) / "models" / "Lora"
    assert host.allowed_output_roots() == [host.lora_dir]

    assert not be.api_enabled()
    assert be.api_auth() is None
    fake.cmd_opts.api, fake.cmd_opts.api_auth = True, "alice:secret,bob:pass:word"
    assert be.api_enabled()
    assert be.api_auth() == {"alice": "secret", "bob": "pass:word"}


def test_captioning_helpers_use_the_webui_models(make_webui):
    fake = make_webui("sd1")
    be = fake.backend.captioners
    bright = Image.new("RGB", (100, 60), (250, 250, 250))
    dark = Image.new("L", (64, 64), 10)
    tags = be.deepbooru_tags(bright)
    assert [t for t, _ in tags] == ["bright", "1girl", "long_hair"]  # best first; below 0.5 and ratings dropped
    assert tags[0][1] == pytest.approx(250 / 255, abs=1e-3)
    assert "rating:safe" in [t for t, _ in be.deepbooru_tags(dark, 0.5, include_ratings=True)]
    fake.deepbooru._events.clear()
    many = be.deepbooru_tags_many([bright, dark], threshold=0.8)
    assert [[t for t, _ in r] for r in many] == [["bright", "1girl"], ["1girl"]]
    assert fake.deepbooru._events == ["start", "stop"]  # loaded to the GPU once for the batch

    assert be.blip_caption(bright) == "a picture of 100x60 pixels, mean 250"
    assert be.blip_captions([dark, bright])[0] == "a picture of 64x64 pixels, mean 10"
    assert fake.interrogator._events == ["load_blip_model", "send_blip_to_ram", "send_blip_to_ram"]
