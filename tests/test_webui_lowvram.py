"""--medvram, --medvram-sdxl and --lowvram: the run places the model's parts, then everything is as before.

The stand-in WebUI's ``modules.lowvram`` follows the real one (``tests/fixtures/fake_webui/lowvram.py``):
applied as a model loads, hooks that move parts to ``devices.device`` on use. Here ``devices.device`` is
``cpu:0`` standing for the GPU: tensors stay on the CPU (the moves are no-ops, as in a WebUI on a CPU),
and :class:`MoveLog` records every ``nn.Module.to`` so each tensor has a place, the GPU or the CPU.
Also kohya's ``cache_text_encoder_outputs`` on the tiny models (``lora_trainer.train.phases``).
"""

from __future__ import annotations

import contextlib
import sys

import pytest
import torch
from torch import nn

from lora_trainer.contracts import SizeCond
from lora_trainer.data.buckets import BucketSettings
from lora_trainer.data.dataset import TrainDataset
from lora_trainer.data.scan import scan_dataset
from lora_trainer.jobs import JobManager
from lora_trainer.train import objectives
from lora_trainer.train.loop import train
from lora_trainer.train.phases import TextOutputCache, caption_samples
from tests.fixtures.fake_webui import FakeWebUI
from tests.fixtures.training import make_config
from tests.fixtures.webui_models import TinyAdapter

GPU = torch.device("cpu", 0)
MODES = {"medvram": "medvram", "lowvram": "lowvram", "medvram-sdxl": "medvram_sdxl"}


class MoveLog:
    """Where each tensor of the model would be, from the ``nn.Module.to`` calls (the CPU moves nothing)."""

    def __init__(self, monkeypatch):
        self.where: dict[tuple[int, str], str] = {}
        self.moves = 0
        original = nn.Module.to

        def to(module, *args, **kwargs):
            device = torch._C._nn._parse_to(*args, **kwargs)[0]
            if device is not None:
                self.moves += 1
                label = "gpu" if device == GPU else "cpu"
                for m in module.modules():
                    for name in (*m._parameters, *m._buffers):
                        self.where[(id(m), name)] = label
            return original(module, *args, **kwargs)

        monkeypatch.setattr(nn.Module, "to", to)

    def of(self, *modules: nn.Module) -> str:
        places = {
            self.where.get((id(m), name), "cpu")
            for module in modules
            for m in module.modules()
            for name, t in (*m._parameters.items(), *m._buffers.items())
            if t is not None
        }
        return places.pop() if len(places) == 1 else "split"


def unet_blocks(model) -> list[nn.Module]:
    unet = model.model.diffusion_model
    return [unet.time_embed, *unet.input_blocks, unet.middle_block, *unet.output_blocks]


def text_root(model) -> nn.Module:
    return model.conditioner if model.is_sdxl else model.cond_stage_model


def placement(log: MoveLog, model) -> dict[str, str]:
    return {
        "vae": log.of(model.first_stage_model),
        "text": log.of(text_root(model)),
        "unet": log.of(*unet_blocks(model)),
    }


def webui_state(log: MoveLog, model) -> dict:
    """Everything lowvram set up or moved: places, hooks in order, VAE wrappers, ``module_in_gpu``."""
    modules = dict(model.named_modules())
    return {
        "where": {
            f"{n}.{t}": log.where.get((id(m), t), "cpu")
            for n, m in modules.items()
            for t in (*m._parameters, *m._buffers)
        },
        "hooks": {n: list(m._forward_pre_hooks.items()) for n, m in modules.items() if m._forward_pre_hooks},
        "wrappers": {k: model.first_stage_model.__dict__.get(k) for k in ("encode", "decode")},
        "module_in_gpu": sys.modules["modules.lowvram"].module_in_gpu,
        "lowvram": model.lowvram,
        "tensors": {k: v.clone() for k, v in model.state_dict().items()},
        "flags": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": [n for n, p in model.named_parameters() if p.grad is not None],
    }


def assert_same_state(before: dict, after: dict) -> None:
    for key in before:
        if key == "tensors":
            assert all(torch.equal(after[key][k], v) for k, v in before[key].items())
        else:
            assert after[key] == before[key], key


@pytest.fixture
def lowvram_webui(tmp_path, monkeypatch):
    with contextlib.ExitStack() as stack:

        def make(family: str, mode: str) -> tuple[FakeWebUI, MoveLog]:
            fake = FakeWebUI(tmp_path / f"webui-{family}", family)
            stack.enter_context(fake.installed())
            fake.devices.device = GPU
            setattr(fake.cmd_opts, MODES[mode], True)
            log = MoveLog(monkeypatch)
            fake.apply_lowvram()  # as the WebUI loads the model
            assert fake.sd_model.lowvram
            return fake, log

        yield make


class Probe:
    """Records the placement at each VAE encode, text encode and denoiser call of the loaded model."""

    def __init__(self, fake: FakeWebUI, log: MoveLog):
        self.events: list[tuple[str, dict, object]] = []
        model, lowvram = fake.sd_model, sys.modules["modules.lowvram"]

        def record(kind: str) -> None:
            self.events.append((kind, placement(log, model), lowvram.module_in_gpu))

        def wrap(name: str, kind: str) -> None:
            original = getattr(model, name)

            def call(*args, **kwargs):
                record(kind)
                return original(*args, **kwargs)

            setattr(model, name, call)

        wrap("encode_first_stage", "vae")
        wrap("apply_model", "unet")
        self.handle = text_root(model).register_forward_pre_hook(lambda *_: record("text"))

    def kinds(self, kind: str) -> list[tuple[dict, object]]:
        return [(where, in_gpu) for k, where, in_gpu in self.events if k == kind]


def run_job(fake: FakeWebUI, tmp_path, steps: int = 3, manager=None, **overrides):
    cfg = make_config(tmp_path, **{"training.max_train_steps": steps, **overrides})
    cfg.save.output_dir = None
    host = fake.backend.host.WebUIHost() if manager is None else manager.host
    manager = manager or JobManager(host)
    job = manager.wait(manager.start(cfg).id, timeout=120)
    return job


GPU_FOR = {
    "vae": {"vae": "gpu", "text": "cpu", "unet": "cpu"},
    "text": {"vae": "cpu", "text": "gpu", "unet": "cpu"},
}


@pytest.mark.parametrize(
    ("family", "mode", "cache_text"),
    [("sd1", "medvram", False), ("sd1", "lowvram", True), ("sdxl", "medvram-sdxl", True), ("sdxl", "lowvram", False)],
)
def test_a_lowvram_model_trains_with_the_parts_placed_per_phase(lowvram_webui, tmp_path, family, mode, cache_text):
    fake, log = lowvram_webui(family, mode)
    model = fake.sd_model
    assert placement(log, model) == {"vae": "cpu", "text": "cpu", "unet": "cpu"}  # as the WebUI set it up
    model.encode_first_stage(torch.zeros(1, 3, 64, 64))  # a WebUI use: its hook puts the VAE on the GPU
    assert placement(log, model)["vae"] == "gpu"
    before = webui_state(log, model)
    probe = Probe(fake, log)
    overrides = {"dataset.cache_text_encoder_outputs": cache_text, "network.train_text_encoder": not cache_text}
    job = run_job(fake, tmp_path, **overrides)
    assert job.state == "done", job.error
    assert job.output_file

    vae, text, unet = probe.kinds("vae"), probe.kinds("text"), probe.kinds("unet")
    assert vae == [(GPU_FOR["vae"], None)] * 2  # the two images' latents, the VAE alone on the GPU
    assert len(unet) == 3
    in_steps = {"vae": "cpu", "text": "cpu" if cache_text else "gpu", "unet": "gpu"}
    assert unet == [(in_steps, None)] * 3  # no lowvram hook moved anything: module_in_gpu stays None
    first_step = next(i for i, e in enumerate(probe.events) if e[0] == "unet")
    text_in_steps = [e for e in probe.events[first_step:] if e[0] == "text"]
    if cache_text:
        assert text == [(GPU_FOR["text"], None)] * 3  # two captions and the empty chunk, before the steps
        assert text_in_steps == []
    else:
        assert text  # encoded in the steps (each new batch), beside the UNet
        assert all(where == in_steps and in_gpu is None for where, in_gpu in text)

    probe.handle.remove()
    assert_same_state(before, webui_state(log, model))
    assert placement(log, model) == {"vae": "gpu", "text": "cpu", "unet": "cpu"}


@pytest.mark.parametrize(("family", "ending"), [("sd1", "failure"), ("sdxl", "cancel")])
def test_failure_and_cancel_give_everything_back(lowvram_webui, tmp_path, family, ending):
    fake, log = lowvram_webui(family, "lowvram")
    model = fake.sd_model
    model.get_learned_conditioning(["a WebUI prompt"])  # its hook puts the text encoder on the GPU
    assert placement(log, model)["text"] == "gpu"
    before = webui_state(log, model)
    host = fake.backend.host.WebUIHost()
    manager = JobManager(host)
    calls = []
    apply_model = model.apply_model

    def failing(*args, **kwargs):
        calls.append(1)
        if ending == "failure" and len(calls) == 2:
            raise RuntimeError("injected failure in the denoiser")
        return apply_model(*args, **kwargs)

    model.apply_model = failing
    progress = host.on_job_progress

    def cancel_at_step_one(job):
        progress(job)
        if job.step == 1 and ending == "cancel":
            manager.cancel(job.id)

    host.on_job_progress = cancel_at_step_one
    job = run_job(fake, tmp_path, 10, manager, **{"network.train_text_encoder": True})
    del model.apply_model
    assert job.state == ("failed" if ending == "failure" else "stopped"), job.error
    assert_same_state(before, webui_state(log, model))
    assert placement(log, model) == {"vae": "cpu", "text": "gpu", "unet": "cpu"}


def test_previews_run_with_the_webui_placement_then_training_resumes_its_own(lowvram_webui, tmp_path):
    fake, log = lowvram_webui("sd1", "medvram")
    model, lowvram = fake.sd_model, sys.modules["modules.lowvram"]
    processing = sys.modules["modules.processing"]
    seen = []
    process_images = processing.process_images

    def preview(p):
        hooks = sum(
            1 for m in model.modules() for fn in m._forward_pre_hooks.values() if fn.__name__ == "send_me_to_gpu"
        )
        out = process_images(p)
        seen.append((hooks, lowvram.module_in_gpu is model.model, placement(log, model)))
        return out

    processing.process_images = preview
    before = webui_state(log, model)
    probe = Probe(fake, log)
    job = run_job(fake, tmp_path, 3, **{"sample.sample_every_n_steps": 1, "sample.sample_prompts": ["a cat"]})
    assert job.state == "done", job.error
    # the WebUI's hooks (text encoder, VAE, UNet) were back for each preview and moved the UNet last
    assert seen == [(3, True, {"vae": "cpu", "text": "cpu", "unet": "gpu"})] * 3
    steps = probe.kinds("unet")
    ours = [e for e in steps if e[1] is None]
    assert len(ours) == 3  # the training steps: our placement again, no hook in charge
    assert all(where == {"vae": "cpu", "text": "gpu", "unet": "gpu"} for where, _ in ours)
    probe.handle.remove()
    assert_same_state(before, webui_state(log, model))


# --------------------------------------------------------------------------------------------
# cache_text_encoder_outputs on the tiny models


def counting(adapter: TinyAdapter) -> list[str]:
    """Log of the adapter's text-encoder and denoiser calls."""
    calls: list[str] = []
    encode_text, predict = adapter.encode_text, adapter.predict

    def text(*args, **kwargs):
        calls.append("text")
        return encode_text(*args, **kwargs)

    def unet(*args, **kwargs):
        calls.append("unet")
        return predict(*args, **kwargs)

    adapter.encode_text, adapter.predict = text, unet
    return calls


def eval_loss(adapter: TinyAdapter, cfg, network=None) -> float:
    """Loss on fixed noise and timesteps over the dataset (the LoRA applied when given)."""
    items = scan_dataset(cfg.dataset.train_data_dir)
    ds = TrainDataset(items, BucketSettings(resolution=cfg.dataset.resolution_wh, enable_bucket=False), batch_size=2)
    batch = ds.load_batch([0, 1])
    gen = torch.Generator().manual_seed(7)
    alphas = adapter.alphas_cumprod.float()
    with torch.no_grad(), network.applied() if network else contextlib.nullcontext():
        latents = adapter.encode_images(batch["pixels"]).float()
        cond = adapter.encode_text(batch["captions"])
        total = 0.0
        for _ in range(8):
            noise = torch.randn(latents.shape, generator=gen)
            t = torch.randint(0, 1000, (2,), generator=gen)
            pred = adapter.predict(objectives.add_noise(latents, noise, t, alphas), t, cond)
            total += torch.nn.functional.mse_loss(pred.float(), noise).item()
    return total / 8


def test_cached_text_outputs_train_like_encoding_every_step_and_the_loss_falls(tmp_path):
    from lora_trainer.files.lora_file import load_lora
    from lora_trainer.networks.network import network_from_weights

    runs = {}
    for cache in (False, True):
        adapter = TinyAdapter("sd1")
        calls = counting(adapter)
        cfg = make_config(
            tmp_path,
            **{
                "dataset.cache_text_encoder_outputs": cache,
                "network.train_text_encoder": False,
                "training.max_train_steps": 40,
                "training.train_batch_size": 2,
                "optim.learning_rate": 3e-3,
                "save.output_name": f"cache-{cache}",
            },
        )
        result = train(cfg, adapter, work_dir=tmp_path / "work")
        runs[cache] = (result, calls, adapter, cfg)
    (plain, plain_calls, *_), (cached, calls, adapter, cfg) = runs[False], runs[True]
    first = calls.index("unet")
    assert calls[:first] == ["text"] * 3  # two captions and the empty chunk, before any step
    assert calls[first:] == ["unet"] * 40  # never during the steps
    assert "text" in plain_calls[plain_calls.index("unet") :]
    assert cached.losses == pytest.approx(plain.losses, rel=1e-4, abs=1e-6)
    state, _ = load_lora(cached.output_path)
    network, _ = network_from_weights(state, "sd1", adapter.unet, adapter.text_encoders)
    network.eval()
    adapter.encode_text, adapter.predict = (
        TinyAdapter.encode_text.__get__(adapter),
        TinyAdapter.predict.__get__(adapter),
    )
    assert eval_loss(adapter, cfg, network) < 0.8 * eval_loss(adapter, cfg)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a_cached_batch_is_the_batch_encoded_at_once(family):
    """Captions of different chunk counts: the shorter one is padded with the empty chunk, as the WebUI pads."""
    adapter = TinyAdapter(family)
    long = ", ".join(f"tag{i}" for i in range(60))  # over 75 tokens: two chunks
    captions = ["short caption", long]
    sizes = [SizeCond((64, 96), (0, 16), (64, 64)), SizeCond((80, 64), (8, 0), (64, 64))] if family == "sdxl" else None

    def encode(texts, size_cond):
        return adapter.encode_text(texts, max_token_length=150, size_cond=size_cond)

    cache = TextOutputCache(adapter, encode)
    cache.fill(list(zip(captions, sizes or [None, None], strict=True)))
    with torch.no_grad():
        direct = encode(captions, sizes)
    got = cache.batch(captions, sizes)
    assert got.context.shape == direct.context.shape == (2, 154, direct.context.shape[-1])
    torch.testing.assert_close(got.context, direct.context, rtol=1e-5, atol=1e-5)
    if family == "sdxl":
        torch.testing.assert_close(got.vector, direct.vector, rtol=1e-5, atol=1e-5)
    assert cache.misses == 0


def test_caption_samples_cover_every_batch_sdxl_sizes_with_flips(tmp_path):
    from PIL import Image

    folder = tmp_path / "data" / "3_x"
    folder.mkdir(parents=True)
    for i, size in enumerate([(96, 64), (64, 80), (72, 72)]):
        Image.new("RGB", size, (i * 60, 10, 10)).save(folder / f"i{i}.png")
        (folder / f"i{i}.txt").write_text(f"caption {i}")
    buckets = BucketSettings(resolution=(64, 64), enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128)
    ds = TrainDataset(scan_dataset(str(tmp_path / "data")), buckets, batch_size=2, flip_aug=True, seed=3)
    samples = set(caption_samples(ds, lambda c: c.upper(), sdxl=True))
    seen, flipped = set(), set()
    for epoch in (1, 2, 3):
        for batch in ds.iter_epoch(epoch):
            flipped.update(batch["flipped"])
            for c, o, k, t in zip(
                batch["captions"], batch["original_sizes"], batch["crop_top_lefts"], batch["target_sizes"], strict=True
            ):
                seen.add((c.upper(), SizeCond(tuple(o), tuple(k), tuple(t))))
    assert flipped == {False, True}
    assert seen <= samples
    assert {c for c, _ in samples} == {"CAPTION 0", "CAPTION 1", "CAPTION 2"}
