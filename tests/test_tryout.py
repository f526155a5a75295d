"""The test panel's pair: one LoRA file at one seed, with and without it (``lora_trainer.tryout``)."""

from __future__ import annotations

import base64
import contextlib
import io
import sys
from pathlib import Path

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from torch import nn

from lora_trainer.errors import ConfigError
from lora_trainer.files.lora_file import save_lora
from lora_trainer.jobs import JobManager
from lora_trainer.naming import find_targets
from lora_trainer.networks.network import LoRANetwork
from lora_trainer.tryout import PairRequest, make_pair, pair_prompts, request_from_dict, with_strength
from lora_trainer.webui.api import PREFIX, mount
from lora_trainer.webui.tryout_ui import TryoutActions
from tests.fixtures.fake_webui import FakeWebUI
from tests.fixtures.host import FakeHost
from tests.fixtures.training import make_config
from tests.fixtures.webui_models import webui_text_encoders


@pytest.fixture
def fake(tmp_path):
    with contextlib.ExitStack() as stack:
        webui = FakeWebUI(tmp_path / "webui", "sd1")
        stack.enter_context(webui.installed())
        yield webui


def _write_lora(fake: FakeWebUI, name: str, std: float = 0.1) -> Path:
    unet, text_encoders = fake.sd_model.model.diffusion_model, webui_text_encoders(fake.sd_model)
    network = LoRANetwork(find_targets("sd1", unet, text_encoders), rank=2, alpha=1)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        for lora in network.loras():
            nn.init.normal_(lora.lora_up.weight, std=std)
    state = {k: v.detach().clone() for k, v in network.state_dict().items()}
    return save_lora(Path(fake.cmd_opts.lora_dir) / f"{name}.safetensors", state, {}, dtype="float")


def _plain_txt2img(prompt: str, seed: int) -> bytes:
    """A user's txt2img with the same settings (the WebUI's processing, extra networks on)."""
    processing = sys.modules["modules.processing"]
    p = processing.StableDiffusionProcessingTxt2Img(prompt=prompt, seed=seed, width=64, height=64, steps=4)
    return processing.process_images(p).images[0].tobytes()


def test_pair_without_is_a_plain_generation_and_with_differs(fake):
    host = fake.backend.host.WebUIHost()
    path = _write_lora(fake, "style")
    pristine = {k: v.clone() for k, v in fake.sd_model.state_dict().items()}
    request = PairRequest(str(path), "<lora:style:1.0> a cat, outdoors", 1.5, seed=77, width=64, height=64, steps=4)
    result = make_pair(host, request)  # under the WebUI's queue lock
    assert result.with_prompt == "<lora:style:1.5> a cat, outdoors"
    assert result.without_prompt == "a cat, outdoors"
    assert result.with_lora is not None
    assert result.without_lora is not None
    with_p, without_p = (record["p"] for record in fake.samples)
    assert (with_p.seed, without_p.seed) == (77, 77)
    assert not with_p.disable_extra_networks
    assert with_p.do_not_save_samples
    assert ("load_networks", ["style"]) in fake.lora.calls  # the WebUI's loader applied the file
    # the model is as it was: no network left on it
    assert not fake.networks.loaded_networks
    after = fake.sd_model.state_dict()
    assert all(torch.equal(pristine[k], after[k]) for k in pristine)
    without = result.without_lora.tobytes()
    assert without == _plain_txt2img("a cat, outdoors", 77)  # bit for bit
    assert result.with_lora.tobytes() != without
    assert not fake.state.interrupted


def test_pair_at_strength_zero_equals_the_base(fake):
    host = fake.backend.host.WebUIHost()
    path = _write_lora(fake, "style")
    images = host.generate_pair(PairRequest(str(path), "a cat", 0.0, seed=3, width=64, height=64, steps=4))
    assert images[0].tobytes() == images[1].tobytes()


def test_pair_stops_on_interrupt_and_refuses_files_outside_the_lora_list(fake, tmp_path, monkeypatch):
    host = fake.backend.host.WebUIHost()
    path = _write_lora(fake, "style")
    processing = sys.modules["modules.processing"]
    original = processing.process_images

    def interrupted_after(p):
        processed = original(p)
        fake.state.interrupted = True  # the WebUI's Interrupt during the first image
        return processed

    monkeypatch.setattr(processing, "process_images", interrupted_after)
    assert len(host.generate_pair(PairRequest(str(path), "a cat", 1.0, width=64, height=64))) == 1
    assert not fake.networks.loaded_networks
    assert not fake.state.interrupted  # the Interrupt meant for the pair does not outlive it
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    other = elsewhere / "style.safetensors"
    other.write_bytes(path.read_bytes())
    with pytest.raises(ConfigError) as caught:
        host.generate_pair(PairRequest(str(other), "a cat", 1.0, width=64, height=64))
    assert caught.value.field == "file"
    with pytest.raises(ConfigError, match="not one of the WebUI's samplers") as caught:
        host.generate_pair(PairRequest(str(path), "a cat", 1.0, width=64, height=64, sampler="Euler z"))
    assert caught.value.field == "sampler"  # at the door, not the WebUI's assert deep in processing


def test_prompts_of_a_pair():
    assert pair_prompts("<lora:me:1.0> me, smiling", "me", 0.6) == ("<lora:me:0.6> me, smiling", "me, smiling")
    # the tag keeps its place; "without" is the same text with only the tag gone, as the WebUI strips
    # it before encoding, so both images see the same words
    assert pair_prompts("<lora:me:1.0>, sks, smiling", "me", 0.8) == ("<lora:me:0.8>, sks, smiling", ", sks, smiling")
    assert pair_prompts("x, <lora:me:1.0>, y <lora:me>", "me", 2.0) == ("x, <lora:me:2>, y", "x, , y")
    # another file's tag stays in both; a prompt without the tag gets it in front
    assert pair_prompts("a, <lora:other:0.5>, b", "me", 1.0) == (
        "<lora:me:1> a, <lora:other:0.5>, b",
        "a, <lora:other:0.5>, b",
    )
    assert with_strength("", "me", 1.0) == "<lora:me:1>"


def test_request_fields_are_checked(tmp_path):
    file = tmp_path / "me.safetensors"
    file.write_bytes(b"x")
    ok = request_from_dict({"file": str(file), "prompt": "p", "strength": 0.5, "seed": 9, "width": 256})
    assert (ok.name, ok.strength, ok.seed, ok.width, ok.height) == ("me", 0.5, 9, 256, 512)
    bad = {
        "file": {"file": str(tmp_path / "none.safetensors")},
        "strength": {"file": str(file), "strength": 2.5},
        "width": {"file": str(file), "width": 100},
        "seed": {"file": str(file), "seed": "x"},
        "job": {"job": "nope"},
        "prompt": {"file": str(file), "prompt": 3},
    }
    for field, data in bad.items():
        with pytest.raises(ConfigError) as caught:
            request_from_dict(data)
        assert caught.value.field == field


def _png(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


def test_api_test_image_for_a_restored_job(tmp_path):
    host = FakeHost(tmp_path)
    cfg = make_config(tmp_path, **{"training.max_train_steps": 1, "dataset.trigger_words": ["mychar"]})
    cfg.save.output_dir = None
    first = JobManager(host)
    job = first.start(cfg)
    first.wait(job.id, timeout=120)
    assert job.state == "done", job.error
    manager = JobManager(host)  # after a restart: the job is restored from its record
    assert manager.get(job.id).restored
    app = FastAPI()
    mount(app, manager)
    with TestClient(app) as client:
        name = Path(job.output_file).stem
        body = {"job": job.id, "prompt": f"<lora:{name}:1.0> mychar", "strength": 0.8, "width": 64, "height": 64}
        answer = client.post(f"{PREFIX}/test-image", json=body)
        assert answer.status_code == 200, answer.text
        data = answer.json()
        assert data["complete"]
        assert (data["with_prompt"], data["without_prompt"]) == (f"<lora:{name}:0.8> mychar", "mychar")
        with_image, without_image = _png(data["with_lora"]), _png(data["without_lora"])
        assert with_image.size == without_image.size == (64, 64)
        assert with_image.tobytes() != without_image.tobytes()
        assert ("pair", name) in host.events
        bad = client.post(f"{PREFIX}/test-image", json={"job": job.id, "strength": 3})
        assert bad.status_code == 422
        assert bad.json()["field"] == "strength"
        assert client.post(f"{PREFIX}/test-image", json={"job": "nope"}).json()["field"] == "job"
        assert client.post(f"{PREFIX}/test-image", json=[1]).status_code == 422


def test_panel_actions_fill_the_prompt_and_show_both_images(tmp_path):
    host = FakeHost(tmp_path)
    cfg = make_config(tmp_path, **{"training.max_train_steps": 1, "dataset.trigger_words": ["mychar", "blue hair"]})
    cfg.save.output_dir = None
    manager = JobManager(host)
    job = manager.start(cfg)
    manager.wait(job.id, timeout=120)
    actions = TryoutActions(JobManager(host))  # after a restart
    file = str(job.output_file)
    assert actions.files() == [file]
    dropdown, prompt = actions.refresh(None)
    assert dropdown["value"] == file
    assert prompt == "<lora:tiny:1.0> mychar, blue hair"
    assert actions.strength(file, prompt, 0.5) == "<lora:tiny:0.5> mychar, blue hair"
    gallery, message = actions.generate(file, prompt, 0.5, 7, 64, 64)
    assert message == ""
    (with_image, with_label), (without_image, without_label) = gallery["value"]
    assert with_label == "with: <lora:tiny:0.5> mychar, blue hair"
    assert without_label == "without: mychar, blue hair"
    assert with_image.tobytes() != without_image.tobytes()
    _, error = actions.generate(file, prompt, 0.5, 7, 100, 64)
    assert "width: must be a multiple of 8" in error
