"""The test fixtures are faithful to the WebUI's models, and lora_trainer.text chunks like the WebUI.

(a) Full-size trees, built on the meta device, have exactly the Linear/Conv2d/MultiheadAttention
    modules (names, types, weight shapes) of the real WebUI models (tests/data/a1111_modules_*.json).
(b) The tiny adapters satisfy the ModelAdapter contract and pass gradients to UNet and text encoders.
(c) 75-token chunking.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lora_trainer.contracts import FAMILIES, Conditioning, ModelAdapter, SizeCond
from lora_trainer.text import CHUNK_LENGTH, WINDOW_LENGTH, chunk_token_ids, encode_chunks, num_chunks
from tests.fixtures.webui_models import (
    CrossAttention,
    TinyAdapter,
    ToyTokenizer,
    build_webui_model,
    components,
    sd_alphas_cumprod,
    webui_text_encoders,
)

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="class")
def full_model():
    """full_model(family, hijacked=True): a full-size tree on meta, built once per test class.

    Freed after the class: while these trees (~0.5 M Python objects) are alive, every full GC pass
    during autograd gets slow enough to make a tiny forward/backward take seconds instead of ms.
    """
    cache: dict[tuple[str, bool], nn.Module] = {}

    def get(family: str, hijacked: bool = True) -> nn.Module:
        if (family, hijacked) not in cache:
            cache[family, hijacked] = build_webui_model(family, "full", "meta", hijacked=hijacked)
        return cache[family, hijacked]

    yield get
    cache.clear()
    gc.collect()


def _reference(name: str) -> dict:
    return json.loads((DATA / name).read_text())


def _weight_modules(root: nn.Module) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (class name, weight shape) of every Linear/Conv2d/MHA outside the VAE."""
    found = {}
    for name, module in root.named_modules():
        if name.startswith("first_stage_model"):
            continue
        if isinstance(module, nn.MultiheadAttention):
            found[name] = (type(module).__name__, tuple(module.in_proj_weight.shape))
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            found[name] = (type(module).__name__, tuple(module.weight.shape))
    return found


# --------------------------------------------------------------------------------------------
# (a) full-size trees == the WebUI's


_CLASSES = {
    "sd1": {
        "": "LatentDiffusion",
        "model": "DiffusionWrapper",
        "model.diffusion_model": "UNetModel",
        "model.diffusion_model.input_blocks.1": "TimestepEmbedSequential",
        "model.diffusion_model.input_blocks.1.0": "ResBlock",
        "model.diffusion_model.input_blocks.1.0.in_layers.0": "GroupNorm32",
        "model.diffusion_model.input_blocks.1.0.h_upd": "Identity",
        "model.diffusion_model.input_blocks.1.0.out_layers.2": "Dropout",
        "model.diffusion_model.input_blocks.1.1": "SpatialTransformer",
        "model.diffusion_model.input_blocks.1.1.norm": "GroupNorm",
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0": "BasicTransformerBlock",
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2": "CrossAttention",
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_out.1": "Dropout",
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.ff": "FeedForward",
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.0": "GEGLU",
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.norm3": "LayerNorm",
        "model.diffusion_model.input_blocks.3.0": "Downsample",
        "model.diffusion_model.output_blocks.2.1": "Upsample",
        "model.diffusion_model.output_blocks.5.2": "Upsample",
        "model.diffusion_model.out.0": "GroupNorm32",
        "cond_stage_model": "FrozenCLIPEmbedderWithCustomWords",
        "cond_stage_model.wrapped": "FrozenCLIPEmbedder",
        "cond_stage_model.wrapped.transformer": "CLIPTextModel",
        "cond_stage_model.wrapped.transformer.text_model.embeddings.token_embedding": "EmbeddingsWithFixes",
        "cond_stage_model.wrapped.transformer.text_model.embeddings.token_embedding.wrapped": "Embedding",
        "cond_stage_model.wrapped.transformer.text_model.encoder.layers.11.mlp.activation_fn": "QuickGELUActivation",
    },
    "sd2": {
        "cond_stage_model": "FrozenOpenCLIPEmbedderWithCustomWords",
        "cond_stage_model.wrapped": "FrozenOpenCLIPEmbedder",
        "cond_stage_model.wrapped.model": "CLIP",
        "cond_stage_model.wrapped.model.transformer": "Transformer",
        "cond_stage_model.wrapped.model.transformer.resblocks.23": "ResidualAttentionBlock",
        "cond_stage_model.wrapped.model.transformer.resblocks.23.ln_1": "LayerNorm",
        "cond_stage_model.wrapped.model.transformer.resblocks.23.ls_1": "Identity",
        "cond_stage_model.wrapped.model.transformer.resblocks.23.mlp.gelu": "GELU",
        "cond_stage_model.wrapped.model.token_embedding": "EmbeddingsWithFixes",
    },
    "sdxl": {
        "": "DiffusionEngine",
        "model": "OpenAIWrapper",
        "model.diffusion_model.label_emb.0": "Sequential",
        "conditioner": "GeneralConditioner",
        "conditioner.wrapped": "Module",
        "conditioner.embedders.0": "FrozenCLIPEmbedderForSDXLWithCustomWords",
        "conditioner.embedders.1": "FrozenOpenCLIPEmbedder2WithCustomWords",
        "conditioner.embedders.1.wrapped": "FrozenOpenCLIPEmbedder2",
        "conditioner.embedders.1.wrapped.model.ln_final": "LayerNorm",
        "conditioner.embedders.2": "ConcatTimestepEmbedderND",
        "conditioner.embedders.4.timestep": "Timestep",
    },
}


class TestFullSizeTrees:
    """Full-size trees on the meta device."""

    @pytest.mark.parametrize("hijacked", [True, False], ids=["hijacked", "checkpoint_names"])
    @pytest.mark.parametrize("family", FAMILIES)
    def test_full_tree_matches_webui_modules(self, full_model, family, hijacked):
        root = full_model(family, hijacked)
        assert all(p.is_meta for p in root.parameters())
        field = "a1111_module_hijacked" if hijacked else "a1111_module"
        expected = {
            m[field]: (m["type"], tuple(m["weight_shape"]))
            for m in _reference(f"a1111_modules_{family}.json")["modules"]
        }
        ours = _weight_modules(root)
        assert sorted(set(expected) - set(ours)) == []
        assert sorted(set(ours) - set(expected)) == []
        assert {n: v for n, v in ours.items() if v != expected[n]} == {}

    @pytest.mark.parametrize("family", FAMILIES)
    def test_full_tree_has_every_kohya_target(self, full_model, family):
        """Every module of the golden kohya keys exists with its type, kernel, stride and padding."""
        modules = dict(full_model(family).named_modules())
        for entry in _reference(f"lora_keys_{family}.json")["modules"]:
            module = modules[entry["a1111_module_hijacked"]]
            assert type(module).__name__ == entry["a1111_module_type"], entry["kohya"]
            if isinstance(module, nn.Conv2d):
                assert list(module.kernel_size) == entry["kernel"], entry["kohya"]
                assert (module.in_channels, module.out_channels) == (entry["in"], entry["out"]), entry["kohya"]
                assert list(module.stride) == entry["stride"], entry["kohya"]
                assert list(module.padding) == entry["padding"], entry["kohya"]

    @pytest.mark.parametrize("family", FAMILIES)
    def test_full_tree_class_names(self, full_model, family):
        """Class names as in the WebUI's own listing (shared/guide/webui-modules-*.txt)."""
        root = full_model(family)
        modules = dict(root.named_modules())
        assert {n: type(modules[n]).__name__ for n in _CLASSES[family] if n in modules} == _CLASSES[family]
        # ldm's ResBlock shares one Identity between h_upd and x_upd: only h_upd is listed.
        assert not any(n.endswith("x_upd") for n in modules)
        unet, te = components(root, family)
        assert unet is root.model.diffusion_model
        assert sorted(te) == (["te1", "te2"] if family == "sdxl" else ["te"])

    def test_full_openclip_text_tower(self, full_model):
        for family, width, layers in (("sd2", 1024, 24), ("sdxl", 1280, 32)):
            te = webui_text_encoders(full_model(family))["te2" if family == "sdxl" else "te"]
            assert isinstance(te.text_projection, nn.Parameter)
            assert tuple(te.text_projection.shape) == (width, width)
            assert tuple(te.positional_embedding.shape) == (77, width)
            assert tuple(te.attn_mask.shape) == (77, 77)
            assert len(te.transformer.resblocks) == layers
            assert "attn_mask" not in te.state_dict()  # a non-persistent buffer, as in open_clip


# --------------------------------------------------------------------------------------------
# (b) tiny adapters


_ADAPTERS: dict[str, TinyAdapter] = {}


@pytest.fixture(scope="module", autouse=True)
def _free_adapters():
    yield
    _ADAPTERS.clear()


def _adapter(family: str) -> TinyAdapter:
    """A shared tiny adapter per family (tests that change it build their own)."""
    if family not in _ADAPTERS:
        _ADAPTERS[family] = TinyAdapter(family)
    return _ADAPTERS[family]


def test_tiny_adapter_contract_and_schedule():
    adapter = _adapter("sd1")
    assert isinstance(adapter, ModelAdapter)
    assert adapter.alphas_cumprod.shape == (1000,)
    assert adapter.alphas_cumprod.dtype == torch.float32
    assert adapter.alphas_cumprod[0].item() == pytest.approx(1 - 0.00085, rel=1e-6)
    assert adapter.alphas_cumprod[-1].item() == pytest.approx(0.0046, abs=2e-4)
    assert torch.equal(adapter.root.alphas_cumprod, sd_alphas_cumprod())
    assert TinyAdapter("sd2", "v_prediction").prediction_type == "v_prediction"
    with pytest.raises(ValueError, match=r"unknown prediction_type 'sample'"):
        TinyAdapter("sd1", "sample")
    with pytest.raises(ValueError, match=r"unknown family 'sd3'"):
        TinyAdapter("sd3")


def test_tiny_build_is_deterministic_and_keeps_rng():
    state = torch.random.get_rng_state()
    a = build_webui_model("sd2", seed=3).state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)
    b = build_webui_model("sd2", seed=3).state_dict()
    c = build_webui_model("sd2", seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_webui_like_requires_grad():
    root = _adapter("sdxl").root
    assert all(p.requires_grad for p in root.model.diffusion_model.parameters())
    assert not any(p.requires_grad for p in root.conditioner.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_images(family):
    adapter = _adapter(family)
    pixels = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = adapter.encode_images(pixels)
    assert latents.shape == (2, 4, 8, 12)
    assert not latents.requires_grad
    assert torch.equal(latents, adapter.encode_images(pixels))


_CONTEXT = {"sd1": 32, "sd2": 32, "sdxl": 32 + 48}


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_text_shapes(family):
    adapter = _adapter(family)
    cond = adapter.encode_text(["a photo of a cat", "a dog, " * 40])
    assert isinstance(cond, Conditioning)
    assert cond.context.shape == (2, 77, _CONTEXT[family])
    long = adapter.encode_text(["a photo of a cat", "a dog, " * 40], max_token_length=225)
    assert long.context.shape == (2, 77 * 2, _CONTEXT[family])  # 120 tokens -> 2 chunks
    assert torch.allclose(long.context[:, :77], cond.context, atol=1e-6)
    if family == "sdxl":
        assert cond.vector.shape == (2, 48 + 3 * 512)
        assert adapter.unet.config.adm_in_channels == cond.vector.shape[1]
        assert torch.allclose(long.vector, cond.vector, atol=1e-6)  # pooled from the first chunk
    else:
        assert cond.vector is None


def test_sdxl_size_conditioning():
    adapter = _adapter("sdxl")
    square = SizeCond((1024, 1024), (0, 0), (1024, 1024))
    cropped = SizeCond((768, 1344), (32, 0), (768, 1344))
    a = adapter.encode_text(["x"], size_cond=[square]).vector
    b = adapter.encode_text(["x"], size_cond=[cropped]).vector
    assert torch.equal(a, adapter.encode_text(["x"]).vector)  # default: 1024 square, no crop
    assert torch.equal(a[:, :48], b[:, :48])  # pooled text part unchanged
    # each number -> 256-dim [cos, sin] sinusoid; crop (0, 0) -> cos 1, sin 0
    crop = a[0, 48 + 512 : 48 + 1024].reshape(2, 256)
    assert torch.allclose(crop[:, :128], torch.ones(2, 128))
    assert torch.allclose(crop[:, 128:], torch.zeros(2, 128))
    assert b[0, 48 + 512].item() == pytest.approx(torch.cos(torch.tensor(32.0)).item(), abs=1e-5)
    with pytest.raises(ValueError, match=r"1 size_cond for 2 captions"):
        adapter.encode_text(["x", "y"], size_cond=[square])


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_clip_skip(family):
    adapter = _adapter(family)
    one = adapter.encode_text(["a photo of a cat"]).context
    two = adapter.encode_text(["a photo of a cat"], clip_skip=2).context
    assert not torch.allclose(one, two)
    with pytest.raises(ValueError, match=r"clip_skip must be >= 1, got 0"):
        adapter.encode_text(["x"], clip_skip=0)
    if family == "sd1":  # clip_skip 1 is HF's last_hidden_state (final layer norm applied)
        te = adapter.text_encoders["te"]
        tok = adapter.tokenizer
        ids = chunk_token_ids([tok.encode("a photo of a cat")], bos_id=tok.bos_id, eos_id=tok.eos_id)[:, 0]
        assert torch.allclose(one, te(input_ids=ids).last_hidden_state, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_unet_and_text_encoders(family):
    adapter = TinyAdapter(family, seed=1)
    te_params = {
        name: te.transformer.resblocks[0].attn.in_proj_weight  # OpenCLIP
        if hasattr(te, "transformer")
        else te.text_model.encoder.layers[0].self_attn.q_proj.weight  # HF CLIP
        for name, te in adapter.text_encoders.items()
    }
    for p in te_params.values():
        p.requires_grad_(True)
    unet_param = adapter.unet.input_blocks[4][1].transformer_blocks[0].attn2.to_k.weight

    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = adapter.encode_images(pixels)
    cond = adapter.encode_text(["a photo of a cat", "a red car on a road"])
    noise = torch.randn_like(latents)
    t = torch.tensor([100, 700])
    a = adapter.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    out = adapter.predict(noisy, t, cond)
    assert out.shape == latents.shape
    assert out.dtype == torch.float32
    torch.nn.functional.mse_loss(out, noise).backward()

    assert unet_param.grad is not None
    assert unet_param.grad.abs().sum() > 0
    for name, p in te_params.items():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def test_half_precision_runs_on_cpu():
    adapter = TinyAdapter("sdxl", dtype=torch.bfloat16)
    assert adapter.unet.input_blocks[0][0].weight.dtype == torch.bfloat16
    assert adapter.alphas_cumprod.dtype == adapter.root.alphas_cumprod.dtype == torch.float32
    latents = adapter.encode_images(torch.zeros(1, 3, 64, 64))
    out = adapter.predict(latents, torch.tensor([10]), adapter.encode_text(["a cat"]))
    assert out.dtype == latents.dtype == torch.bfloat16
    assert torch.isfinite(out).all()


def test_cross_attention_is_plain_softmax_attention():
    attn = CrossAttention(query_dim=8, heads=2, dim_head=4, context_dim=6)
    x, ctx = torch.randn(2, 5, 8), torch.randn(2, 3, 6)
    q, k, v = (t.reshape(2, -1, 2, 4).transpose(1, 2) for t in (attn.to_q(x), attn.to_k(ctx), attn.to_v(ctx)))
    weights = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)
    expected = attn.to_out((weights @ v).transpose(1, 2).reshape(2, 5, 8))
    assert torch.allclose(attn(x, ctx), expected, atol=1e-6)


def test_predict_rejects_missing_vector():
    adapter = _adapter("sdxl")
    cond = adapter.encode_text(["x"])
    with pytest.raises(ValueError, match=r"y must be given exactly when the model has adm_in_channels \(SDXL\)"):
        adapter.unet(torch.zeros(1, 4, 8, 8), torch.tensor([1]), cond.context)


# --------------------------------------------------------------------------------------------
# (c) lora_trainer.text


BOS, EOS = 49406, 49407


def test_chunk_short_caption_layout():
    ids = chunk_token_ids([[5, 6, 7]], bos_id=BOS, eos_id=EOS)
    assert ids.shape == (1, 1, WINDOW_LENGTH)
    assert ids.dtype == torch.long
    assert ids[0, 0].tolist() == [BOS, 5, 6, 7] + [EOS] * 73
    open_clip = chunk_token_ids([[5, 6, 7]], bos_id=BOS, eos_id=EOS, pad_id=0)
    assert open_clip[0, 0].tolist() == [BOS, 5, 6, 7, EOS] + [0] * 72


def test_chunk_counts_and_truncation():
    caption = list(range(1, 201))  # 200 tokens
    assert chunk_token_ids([caption], bos_id=BOS, eos_id=EOS).shape == (1, 1, 77)
    assert chunk_token_ids([caption], bos_id=BOS, eos_id=EOS, max_token_length=150).shape == (1, 2, 77)
    full = chunk_token_ids([caption], bos_id=BOS, eos_id=EOS, pad_id=0, max_token_length=225)
    assert full.shape == (1, 3, 77)
    assert full[0, 0].tolist() == [BOS, *range(1, 76), EOS]  # a full chunk has no padding
    assert full[0, 1].tolist() == [BOS, *range(76, 151), EOS]
    assert full[0, 2].tolist() == [BOS, *range(151, 201), EOS] + [0] * 25
    truncated = chunk_token_ids([caption], bos_id=BOS, eos_id=EOS, max_token_length=75)
    assert truncated[0, 0].tolist() == [BOS, *range(1, 76), EOS]


def test_chunk_batch_uses_longest_caption():
    ids = chunk_token_ids([[], [1] * 80, [2] * 75], bos_id=BOS, eos_id=EOS, pad_id=0, max_token_length=225)
    assert ids.shape == (3, 2, 77)
    assert ids[0, 0].tolist() == [BOS, EOS] + [0] * 75  # empty caption
    assert ids[0, 1].tolist() == ids[0, 0].tolist()  # empty chunk, like the WebUI's empty_chunk
    assert ids[1, 1].tolist() == [BOS] + [1] * 5 + [EOS] + [0] * 70
    assert ids[2, 1].tolist() == [BOS, EOS] + [0] * 75  # exactly 75 tokens: one chunk of its own
    assert chunk_token_ids([[]], bos_id=BOS, eos_id=EOS).shape == (1, 1, 77)
    assert chunk_token_ids([], bos_id=BOS, eos_id=EOS).shape == (0, 1, 77)


def test_num_chunks_validates():
    assert [num_chunks(n) for n in (75, 150, 225)] == [1, 2, 3]
    for bad in (0, 76, 100, -75):
        with pytest.raises(ValueError, match=rf"max_token_length must be a positive multiple of 75, got {bad}$"):
            num_chunks(bad)
    with pytest.raises(ValueError, match=r"max_token_length must be a positive multiple of 75, got 77"):
        chunk_token_ids([[1]], bos_id=BOS, eos_id=EOS, max_token_length=77)


def test_encode_chunks_concatenates_windows():
    ids = chunk_token_ids([[1] * 80, [2, 3]], bos_id=BOS, eos_id=EOS, max_token_length=150)
    calls = []

    def fake_encoder(window_ids):
        calls.append(window_ids.shape)
        return window_ids.float()[..., None].expand(-1, -1, 3)

    out = encode_chunks(fake_encoder, ids)
    assert calls == [(4, 77)]
    assert out.shape == (2, 2 * 77, 3)
    assert torch.equal(out[:, :, 0], ids.reshape(2, -1).float())

    def with_pooled(window_ids):
        return window_ids.float()[..., None], window_ids[:, 1:2].float()

    hidden, pooled = encode_chunks(with_pooled, ids)
    assert hidden.shape == (2, 154, 1)
    assert pooled.tolist() == [[1.0], [2.0]]  # the first window's


def test_toy_tokenizer_is_stable():
    tok = ToyTokenizer()
    ids = tok.encode("A photo, of a Cat!")
    assert ids == tok.encode("a photo , of a cat !")
    assert len(ids) == 7
    assert all(1 <= i < tok.bos_id for i in ids)
    assert ids[0] == ids[4]
    assert (tok.bos_id, tok.eos_id) == (998, 999)
    assert CHUNK_LENGTH == 75
