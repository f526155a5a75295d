"""The checkpoint backend's text encoders, tokenizer and adapter against the WebUI-shaped tiny models.

The tiny WebUI models (``tests/fixtures/webui_models.py``) encode text the WebUI's way; their state
dicts carry the WebUI's checkpoint names, so converting them with ``build_text_encoders`` and
encoding through ``CheckpointAdapter`` must give the same conditioning.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch

from lora_trainer.backends.checkpoint import tokenizer as tokenizer_module
from lora_trainer.backends.checkpoint.adapter import CheckpointAdapter, scaled_linear_alphas_cumprod
from lora_trainer.backends.checkpoint.text_encoders import build_text_encoders
from lora_trainer.backends.checkpoint.tokenizer import clip_tokenizer
from lora_trainer.contracts import SizeCond
from lora_trainer.errors import ConfigError, IncompatibleModelError
from tests.fixtures.webui_models import TinyAdapter, ToyTokenizer, sd_alphas_cumprod

pytest.importorskip("diffusers")

TINY_HEADS = {"te": 4, "te1": 4, "te2": 4}  # the tiny fixtures' heads (no tensor shows them)
LONG = ", ".join(f"word{i} thing" for i in range(60))  # 180 toy tokens: three chunks
CAPTIONS = ["a photo of a cat", "red dress, smiling, outdoors", LONG]


class ToyHFTokenizer:
    """The fixtures' toy tokenizer behind the HF call the adapter makes."""

    def __init__(self, toy: ToyTokenizer):
        self.toy = toy
        self.bos_token_id, self.eos_token_id = toy.bos_id, toy.eos_id

    def __call__(self, texts: Sequence[str], **kwargs) -> dict[str, list[list[int]]]:
        assert kwargs.get("add_special_tokens") is False
        return {"input_ids": self.toy(texts)}


PREFIXES = {
    "te": {"sd1": "cond_stage_model.transformer.", "sd2": "cond_stage_model.model."},
    "te1": {"sdxl": "conditioner.embedders.0.transformer."},
    "te2": {"sdxl": "conditioner.embedders.1.model."},
}


def checkpoint_state(tiny: TinyAdapter) -> dict[str, torch.Tensor]:
    """The tiny model's text encoders under the names a checkpoint gives them (the WebUI's hijack
    wraps token embeddings in ``.wrapped``; a file has none)."""
    return {
        PREFIXES[key][tiny.family] + name.replace(".wrapped.", "."): value
        for key, te in tiny.text_encoders.items()
        for name, value in te.state_dict().items()
    }


def _checkpoint_adapter(tiny: TinyAdapter, unet: torch.nn.Module | None = None) -> CheckpointAdapter:
    state = checkpoint_state(tiny)
    text_encoders = build_text_encoders(state, tiny.family, num_heads=TINY_HEADS)
    return CheckpointAdapter(
        tiny.family,
        "epsilon",
        unet if unet is not None else torch.nn.Linear(1, 1),
        torch.nn.Linear(1, 1),  # no VAE needed for text
        text_encoders,
        ToyHFTokenizer(tiny.tokenizer),
        model_name="tiny",
    )


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("clip_skip", [1, 2])
def test_encode_text_equals_the_webui_models(family: str, clip_skip: int):
    tiny = TinyAdapter(family)
    adapter = _checkpoint_adapter(tiny)
    sizes = [SizeCond((512, 768), (0, 32), (1024, 1024)), SizeCond((1024, 1024), (0, 0), (1024, 1024))] * 2
    kwargs: dict[str, Any] = {"clip_skip": clip_skip, "max_token_length": 225}
    if family == "sdxl":
        kwargs["size_cond"] = sizes[:3]
    with torch.no_grad():
        want = tiny.encode_text(CAPTIONS, **kwargs)
        got = adapter.encode_text(CAPTIONS, **kwargs)
    assert got.context.shape == want.context.shape == (3, 3 * 77, want.context.shape[2])  # LONG: 3 chunks
    assert (got.context - want.context).abs().max().item() < 1e-5
    if family == "sdxl":
        assert got.vector is not None
        assert want.vector is not None
        assert got.vector.shape == want.vector.shape
        assert (got.vector - want.vector).abs().max().item() < 1e-4
    else:
        assert got.vector is None


def test_sdxl_clip_skip_above_two_moves_clip_l_back():
    """The WebUI's "Clip skip SDXL": CLIP-L hidden state -3; OpenCLIP-bigG and the vector unchanged."""
    tiny = TinyAdapter("sdxl")
    adapter = _checkpoint_adapter(tiny)
    with torch.no_grad():
        base = adapter.encode_text(CAPTIONS[:2], clip_skip=2)
        skip3 = adapter.encode_text(CAPTIONS[:2], clip_skip=3)
        ids = adapter._chunks(CAPTIONS[:2], 75, None)[:, 0]
        te1: Any = adapter.text_encoders["te1"]
        want = te1(input_ids=ids, output_hidden_states=True).hidden_states[-3]
    width1 = te1.config.hidden_size
    assert torch.allclose(skip3.context[:, :, :width1], want)
    assert not torch.allclose(skip3.context[:, :, :width1], base.context[:, :, :width1])
    assert torch.equal(skip3.context[:, :, width1:], base.context[:, :, width1:])
    assert base.vector is not None
    assert skip3.vector is not None
    assert torch.equal(skip3.vector, base.vector)


def test_sd2_drops_openclip_last_block_and_splits_attention():
    tiny = TinyAdapter("sd2")
    te: Any = build_text_encoders(checkpoint_state(tiny), "sd2", num_heads=TINY_HEADS)["te"]
    openclip: Any = tiny.text_encoders["te"]
    blocks = openclip.transformer.resblocks
    assert te.config.num_hidden_layers == len(blocks) - 1
    assert te.config.hidden_act == "gelu"
    width = te.config.hidden_size
    q = te.text_model.encoder.layers[1].self_attn.q_proj.weight
    v = te.text_model.encoder.layers[1].self_attn.v_proj.bias
    assert torch.equal(q, blocks[1].attn.in_proj_weight[:width])
    assert torch.equal(v, blocks[1].attn.in_proj_bias[2 * width :])


def test_sdxl_te2_projection_is_transposed():
    tiny = TinyAdapter("sdxl")
    tes: dict[str, Any] = build_text_encoders(checkpoint_state(tiny), "sdxl", num_heads=TINY_HEADS)
    openclip: Any = tiny.text_encoders["te2"]
    assert torch.equal(tes["te2"].text_projection.weight, openclip.text_projection.t())
    assert tes["te1"].config.hidden_act == "quick_gelu"
    assert tes["te2"].config.num_hidden_layers == len(openclip.transformer.resblocks)


def test_missing_text_encoder_is_an_incompatible_model():
    state = {k: v for k, v in checkpoint_state(TinyAdapter("sdxl")).items() if "embedders.1" not in k}
    with pytest.raises(IncompatibleModelError, match=r"conditioner\.embedders\.1\.model\."):
        build_text_encoders(state, "sdxl")


def test_weighted_captions_need_the_webui():
    adapter = _checkpoint_adapter(TinyAdapter("sd1"))
    with pytest.raises(ConfigError, match="weighted"):
        adapter.encode_text(["(red:1.2) dress"], weighted_captions=True)


def test_schedule_is_the_scaled_linear_one():
    ours = scaled_linear_alphas_cumprod()
    assert ours.shape == (1000,)
    assert ours.dtype == torch.float32
    assert torch.allclose(ours, sd_alphas_cumprod())
    # first beta 0.00085, last alpha-bar of SD's schedule ~0.0047
    assert abs(1 - ours[0].item() - 0.00085) < 1e-7
    assert abs(ours[-1].item() - 0.0047) < 1e-4


# -- tokenizer

# The ids of HF's openai/clip-vit-large-patch14 tokenizer (the WebUI's SD1 tokenizer), as published
# with it; "," and "!" are single bytes: 256 + their place among the byte symbols ("!" first).
KNOWN_IDS = {
    "a photo of a cat": [320, 1125, 539, 320, 2368],
    "a photo of a dog": [320, 1125, 539, 320, 1929],
    "Hello, world!": [3306, 267, 1002, 256],
    "A PHOTO of  a Cat!": [320, 1125, 539, 320, 2368, 256],
}


def test_clip_tokenizer_ids_equal_the_webuis():
    tok = clip_tokenizer()
    assert len(tok) == 49408
    assert (tok.bos_token_id, tok.eos_token_id) == (49406, 49407)
    got = tok(list(KNOWN_IDS), add_special_tokens=False)["input_ids"]
    assert got == list(KNOWN_IDS.values())
    with_specials: Any = tok(["a photo of a cat"])["input_ids"]
    assert with_specials[0] == [49406, *KNOWN_IDS["a photo of a cat"], 49407]


def test_missing_open_clip_says_what_to_install(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(tokenizer_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(IncompatibleModelError, match="pip install open-clip-torch"):
        tokenizer_module.bpe_file()


TINY_UNET_HEADS = {
    "sd1": lambda channels: 2,
    "sd2": lambda channels: channels // 16,
    "sdxl": lambda channels: channels // 16,
}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_predict_equals_the_webui_models(family: str):
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

    from lora_trainer.backends.checkpoint.unet import convert_unet_state, unet_config_from_state

    tiny = TinyAdapter(family)
    unet_state = dict(tiny.unet.state_dict())
    unet = UNet2DConditionModel(**unet_config_from_state(unet_state, family, heads=TINY_UNET_HEADS[family]))
    unet.load_state_dict(convert_unet_state(unet_state))
    adapter = _checkpoint_adapter(tiny, unet)
    gen = torch.Generator().manual_seed(1)
    noisy = torch.randn(2, 4, 16, 16, generator=gen)
    timesteps = torch.tensor([10, 900])
    with torch.no_grad():
        cond = tiny.encode_text(CAPTIONS[:2])
        want = tiny.predict(noisy, timesteps, cond)
        got = adapter.predict(noisy, timesteps, cond)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-4


def test_encode_images_samples_the_posterior_and_scales():
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

    tiny = TinyAdapter("sdxl")
    torch.manual_seed(0)
    vae: Any = AutoencoderKL(block_out_channels=(32,), norm_num_groups=32, scaling_factor=0.13025)
    adapter = _checkpoint_adapter(tiny)
    adapter.vae = vae.eval()
    pixels = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.manual_seed(5)
        latents = adapter.encode_images(pixels)
        torch.manual_seed(5)
        want = vae.encode(pixels).latent_dist.sample() * 0.13025
        mean = vae.encode(pixels).latent_dist.mean * 0.13025
    assert torch.allclose(latents, want)
    assert not torch.allclose(latents, mean)  # a sample, not the mean
    vae.to(torch.bfloat16)
    torch.manual_seed(5)
    fp32 = adapter.encode_images_fp32(pixels)
    assert fp32.dtype == torch.float32
    assert torch.allclose(fp32, want, atol=0.05)  # bfloat16 weights, float32 maths
    assert next(vae.parameters()).dtype == torch.bfloat16
