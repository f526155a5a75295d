"""The core on a diffusers ``UNet2DConditionModel`` (the checkpoint backend's denoiser).

Full-size diffusers UNets and HF text encoders, built on the meta device from the backend's configs,
give exactly kohya's keys (tests/data/lora_keys_*.json) with the same layer shapes; per-block
settings, the memory profile and gradient checkpointing see the same model as on the WebUI's
ldm/sgm UNet; a tiny diffusers UNet trains the same with checkpointing on and off.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lora_trainer.backends.checkpoint.configs import text_encoder_config, unet_config
from lora_trainer.files.lora_file import load_lora
from lora_trainer.naming import find_targets, is_diffusers_unet
from lora_trainer.networks.blocks import block_index
from lora_trainer.train.guard import unet_blocks
from lora_trainer.train.loop import train
from lora_trainer.train.memory import profile_model
from tests.fixtures.training import make_config
from tests.fixtures.webui_models import TinyAdapter, build_webui_model, components

DATA = Path(__file__).parent / "data"
FAMILIES = ("sd1", "sd2", "sdxl")
TEXT = {"sd1": {"te": "clip_l"}, "sd2": {"te": "openclip_h"}, "sdxl": {"te1": "clip_l", "te2": "openclip_bigg"}}


def golden(family: str) -> dict[str, dict]:
    return {m["kohya"]: m for m in json.loads((DATA / f"lora_keys_{family}.json").read_text())["modules"]}


def diffusers_model(family: str) -> tuple[torch.nn.Module, dict[str, torch.nn.Module]]:
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config(family))
        tes = {}
        for group, kind in TEXT[family].items():
            cls = CLIPTextModelWithProjection if group == "te2" else CLIPTextModel
            tes[group] = cls(CLIPTextConfig(**text_encoder_config(kind)))
    return unet, tes


@pytest.fixture(scope="module", params=FAMILIES)
def full_model(request):
    return request.param, *diffusers_model(request.param)


@pytest.mark.parametrize("conv", [False, True], ids=["default", "conv_dim"])
def test_full_size_diffusers_model_gives_kohyas_keys_and_layers(full_model, conv):
    family, unet, tes = full_model
    expected = {k: m for k, m in golden(family).items() if conv or not m["conv_dim_only"]}
    targets = find_targets(family, unet, tes, conv=conv)
    got = {t.key: t for t in targets}
    assert len(got) == len(targets)
    assert sorted(set(got) - set(expected)) == []
    assert sorted(set(expected) - set(got)) == []
    for key, entry in expected.items():
        t = got[key]
        assert (t.kind, t.in_features, t.out_features, list(t.kernel_size)) == (
            entry["kind"],
            entry["in"],
            entry["out"],
            entry["kernel"],
        ), key
        if entry["stride"] is not None:
            assert (list(t.stride), list(t.padding)) == (entry["stride"], entry["padding"]), key
        root = unet if t.group == "unet" else tes[t.group]
        assert root.get_submodule(t.module_name) is t.module, key  # module_name is the diffusers/HF path
        if t.group == "unet" and family != "sdxl":
            assert t.module_name == entry["kohya_module_path"], key


def test_counts_per_family():
    counts = {}
    for family in FAMILIES:
        unet, tes = diffusers_model(family)
        counts[family] = (
            len(find_targets(family, unet, None)),
            len(find_targets(family, unet, None, conv=True)),
            len(find_targets(family, None, tes)),
        )
    # (unet, unet with conv_dim, text encoders): kohya's own counts
    assert counts == {"sd1": (192, 278, 72), "sd2": (192, 278, 138), "sdxl": (722, 788, 264)}


def test_diffusers_unet_is_recognised_and_the_ldm_one_is_not():
    unet, _ = diffusers_model("sd1")
    ldm_unet, _ = components(build_webui_model("sd1", "tiny", device="meta"))
    assert is_diffusers_unet(unet)
    assert not is_diffusers_unet(ldm_unet)


@pytest.mark.parametrize("family", FAMILIES)
def test_blocks_and_memory_profile_equal_the_ldm_models(family):
    unet, tes = diffusers_model(family)
    ldm_unet, ldm_tes = components(build_webui_model(family, "full", device="meta"))
    diffusers_targets = find_targets(family, unet, None, conv=True)
    ldm_targets = find_targets(family, ldm_unet, None, conv=True)
    # per-block dims / lr weights: every UNet module lands in the same kohya block
    indices = Counter(block_index(t.key, family) for t in diffusers_targets)
    assert indices == Counter(block_index(t.key, family) for t in ldm_targets)
    assert -1 not in indices

    ours, theirs = profile_model(family, unet, tes), profile_model(family, ldm_unet, ldm_tes)
    assert ours.blocks == theirs.blocks
    assert ours.top_inputs == theirs.top_inputs
    assert ours.unet_macs == theirs.unet_macs
    for part in ("unet", "unet_conv"):  # (the text encoders differ for SD2: HF CLIP here, OpenCLIP there)
        assert sorted(ours.targets[part]) == sorted(theirs.targets[part])
    assert ours.parts["unet"].params == theirs.parts["unet"].params


def test_checkpointing_units_of_a_diffusers_unet():
    unet, _ = diffusers_model("sdxl")
    blocks = unet_blocks(unet)
    names = {id(m): n for n, m in unet.named_modules()}
    assert Counter(type(b).__name__ for b in blocks) == {"ResnetBlock2D": 17, "Transformer2DModel": 11}
    assert names[id(blocks[0])] == "down_blocks.0.resnets.0"


class DiffusersTinyAdapter(TinyAdapter):
    """The tiny SD1 model with a tiny diffusers UNet as its denoiser."""

    def __init__(self):
        super().__init__("sd1")
        width = self.encode_text(["a"]).context.shape[-1]
        torch.manual_seed(0)
        config = {
            "sample_size": 8,
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "block_out_channels": [32, 64],
            "layers_per_block": 2,
            "cross_attention_dim": width,
            "attention_head_dim": 4,
            "norm_num_groups": 8,
        }
        self.unet: torch.nn.Module = UNet2DConditionModel(**config)

    def predict(self, noisy_latents, timesteps, cond):
        return self.unet(
            noisy_latents.to(self.device, self.dtype),
            timesteps.to(self.device),
            encoder_hidden_states=cond.context.to(self.device, self.dtype),
            return_dict=False,
        )[0]


def test_tiny_diffusers_unet_trains_the_same_with_gradient_checkpointing(tmp_path):
    assert torch.get_num_threads() == 1  # bit-exact comparisons need one thread (tests/conftest.py)
    plain = train(make_config(tmp_path / "a"), DiffusersTinyAdapter(), work_dir=tmp_path / "a" / "w")
    adapter = DiffusersTinyAdapter()
    before = {k: v.clone() for k, v in adapter.unet.state_dict().items()}
    ckpt = train(
        make_config(tmp_path / "b", **{"training.gradient_checkpointing": True}), adapter, work_dir=tmp_path / "b" / "w"
    )
    assert len(plain.losses) > 1
    assert ckpt.losses == pytest.approx(plain.losses, rel=1e-6)
    assert plain.losses[0] != plain.losses[-1]
    assert plain.output_path is not None
    state, _ = load_lora(plain.output_path)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in state
    after = adapter.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all("forward" not in b.__dict__ for b in unet_blocks(adapter.unet))
