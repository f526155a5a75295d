"""Single-file checkpoints -> diffusers modules: key mapping against the WebUI's real key lists,
numerical equality with the ldm-named denoiser, family detection, prediction type and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from safetensors.torch import save_file

from lora_trainer.backends.checkpoint.configs import unet_config, vae_config
from lora_trainer.backends.checkpoint.loader import (
    UNET_PREFIX,
    VAE_PREFIX,
    build_unet,
    detect_family,
    load_checkpoint,
    read_state_dict,
)
from lora_trainer.backends.checkpoint.unet import convert_unet_state, unet_config_from_state, unet_key_map
from lora_trainer.backends.checkpoint.vae import convert_vae_state, vae_config_from_state, vae_key_map
from lora_trainer.errors import CheckpointError, IncompatibleModelError
from tests.fixtures.checkpoints import tiny_checkpoint_state, write_tiny_checkpoint
from tests.fixtures.webui_models import UNET_CONFIGS, UNetModel

GOLDEN = json.loads((Path(__file__).parent / "data" / "webui_checkpoint_keys.json").read_text())
FAMILIES = ("sd1", "sd2", "sdxl")


def _meta_state(family: str, prefix: str) -> dict[str, torch.Tensor]:
    return {
        k[len(prefix) :]: torch.empty(shape, device="meta")
        for k, shape in GOLDEN[family].items()
        if k.startswith(prefix)
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_golden_unet_keys_map_one_to_one_onto_the_full_size_diffusers_unet(family):
    state = _meta_state(family, UNET_PREFIX)
    config = unet_config_from_state(state, family)
    expected = unet_config(family)
    for name in (
        "block_out_channels",
        "down_block_types",
        "up_block_types",
        "cross_attention_dim",
        "use_linear_projection",
    ):
        assert config[name] == expected[name], name
    assert config.get("projection_class_embeddings_input_dim") == expected.get("projection_class_embeddings_input_dim")
    with torch.device("meta"):
        model = UNet2DConditionModel(**config)
    params = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    key_map = unet_key_map(state)
    assert set(key_map) == set(state)  # every golden key is mapped
    assert sorted(key_map.values()) == sorted(params)  # onto every parameter, each once
    for old, new in key_map.items():
        assert tuple(state[old].shape) == params[new], (old, new)


@pytest.mark.parametrize("family", FAMILIES)
def test_golden_vae_keys_map_one_to_one_onto_the_full_size_diffusers_vae(family):
    state = _meta_state(family, VAE_PREFIX)
    with torch.device("meta"):
        model = AutoencoderKL(**vae_config(family))
    params = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    key_map = vae_key_map(state)
    assert sorted(key_map.values()) == sorted(params)
    converted = convert_vae_state(dict(state))
    assert {k: tuple(v.shape) for k, v in converted.items()} == params  # 1x1 convs reshaped to Linear
    assert tuple(state["encoder.mid.attn_1.q.weight"].shape) == (512, 512, 1, 1)
    assert vae_config_from_state(converted, family) == vae_config(family)


def test_a_vae_file_in_diffusers_names_is_taken_as_it_is():
    with torch.device("meta"):
        names = AutoencoderKL(**vae_config("sd1")).state_dict()
    state = {k: torch.empty(v.shape, device="meta") for k, v in names.items()}
    assert set(convert_vae_state(dict(state))) == set(state)


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_diffusers_unet_computes_what_the_ldm_unet_computes(family):
    cfg = UNET_CONFIGS[family, "tiny"]
    torch.manual_seed(0)
    reference = UNetModel(cfg).eval()
    for p in reference.parameters():  # no zero-initialised layers: every path shows in the output
        torch.nn.init.normal_(p, std=0.05)
    state = {k: v.detach().clone() for k, v in reference.state_dict().items()}
    config = unet_config_from_state(state, family, heads=lambda ch: cfg.heads(ch)[0])
    model = UNet2DConditionModel(**config).eval()
    model.load_state_dict(convert_unet_state(state), strict=True)
    x = torch.randn(2, 4, 16, 16)
    t = torch.tensor([10, 900])
    context = torch.randn(2, 7, cfg.context_dim)
    y = torch.randn(2, cfg.adm_in_channels) if cfg.adm_in_channels else None
    with torch.no_grad():
        expected = reference(x, t, context, y)
        got = model(x, t, encoder_hidden_states=context, class_labels=y).sample
    assert expected.abs().mean() > 0.01
    with torch.no_grad():  # the attention layers show in the output
        assert (reference(x, t, torch.randn_like(context), y) - expected).abs().max() > 1e-4
    assert (got - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_family_is_detected_from_the_keys(family, tmp_path):
    golden = {k: torch.empty(shape, device="meta") for k, shape in GOLDEN[family].items()}
    assert detect_family(golden) == family
    path = write_tiny_checkpoint(tmp_path / f"{family}.safetensors", family)
    adapter = load_checkpoint(path)
    assert adapter.family == family
    assert adapter.prediction_type == "epsilon"
    assert adapter.model_name == path.name
    assert len(adapter.model_legacy_hash) == 8


def _save(path: Path, state: dict[str, torch.Tensor]) -> Path:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_a_yaml_beside_the_checkpoint_saying_v_makes_it_v_prediction_unless_told_otherwise(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "m.safetensors", "sd1")
    path.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    assert load_checkpoint(path).prediction_type == "v_prediction"
    assert load_checkpoint(path, v_parameterization=False).prediction_type == "epsilon"


def test_sd2_prediction_type_follows_the_webui_forward_test(tmp_path):
    state = tiny_checkpoint_state("sd2")
    unet = {k[len(UNET_PREFIX) :]: v.clone() for k, v in state.items() if k.startswith(UNET_PREFIX)}
    assert load_checkpoint(_save(tmp_path / "eps.safetensors", state)).prediction_type == "epsilon"
    state[UNET_PREFIX + "out.2.bias"] = torch.full_like(state[UNET_PREFIX + "out.2.bias"], -3.0)
    assert load_checkpoint(_save(tmp_path / "v.safetensors", state)).prediction_type == "v_prediction"
    assert build_unet(unet, "sd2", tmp_path).config.use_linear_projection


def test_a_separate_vae_file_replaces_the_checkpoint_vae(tmp_path):
    state = tiny_checkpoint_state("sd1")
    vae = {k[len(VAE_PREFIX) :]: torch.ones_like(v) for k, v in state.items() if k.startswith(VAE_PREFIX)}
    vae["loss.logvar"] = torch.zeros(())  # as in VAE files saved by ldm's training
    vae_file = _save(tmp_path / "my.vae.safetensors", vae)
    adapter = load_checkpoint(_save(tmp_path / "m.safetensors", state), vae_path=vae_file)
    assert adapter.vae_name == "my.vae.safetensors"
    assert torch.all(adapter.vae.decoder.conv_in.weight == 1)


def test_damaged_and_truncated_files_name_the_file(tmp_path):
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match=r"damaged\.safetensors"):
        load_checkpoint(damaged)
    good = write_tiny_checkpoint(tmp_path / "good.safetensors", "sd1")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"truncated\.safetensors"):
        load_checkpoint(truncated)


def test_missing_checkpoint_and_missing_vae_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"nothere\.safetensors"):
        load_checkpoint(tmp_path / "nothere.safetensors")
    path = write_tiny_checkpoint(tmp_path / "m.safetensors", "sd1")
    with pytest.raises(CheckpointError, match=r"novae\.safetensors"):
        load_checkpoint(path, vae_path=tmp_path / "novae.safetensors")


def test_pickled_checkpoints_need_allow_pickle(tmp_path):
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": tiny_checkpoint_state("sd1")}, str(path))
    with pytest.raises(CheckpointError, match=r"old\.ckpt.*--allow-pickle"):
        load_checkpoint(path)
    assert load_checkpoint(path, allow_pickle=True).family == "sd1"


def test_inpainting_and_other_models_are_refused_with_what_they_look_like(tmp_path):
    state = tiny_checkpoint_state("sd1")
    conv_in = state[UNET_PREFIX + "input_blocks.0.0.weight"]
    state[UNET_PREFIX + "input_blocks.0.0.weight"] = torch.zeros(conv_in.shape[0], 9, *conv_in.shape[2:])
    with pytest.raises(IncompatibleModelError, match=r"inpaint\.safetensors looks like an inpainting sd1"):
        load_checkpoint(_save(tmp_path / "inpaint.safetensors", state))
    sd3 = {"model.diffusion_model.joint_blocks.0.x.weight": torch.zeros(2)}
    with pytest.raises(IncompatibleModelError, match=r"sd3\.safetensors looks like an SD3 checkpoint.*Supported"):
        load_checkpoint(_save(tmp_path / "sd3.safetensors", sd3))
    refiner = {"conditioner.embedders.0.model.ln_final.weight": torch.zeros(2), UNET_PREFIX + "x": torch.zeros(1)}
    with pytest.raises(IncompatibleModelError, match="SDXL refiner"):
        load_checkpoint(_save(tmp_path / "refiner.safetensors", refiner))


def test_read_state_dict_reads_all_tensors(tmp_path):
    path = _save(tmp_path / "t.safetensors", {"a": torch.ones(2), "b": torch.zeros(3)})
    assert set(read_state_dict(path)) == {"a", "b"}


def test_a_half_precision_file_loads_in_the_dtype_asked_for(tmp_path):
    """Most checkpoints are stored in fp16: each tensor is cast once, to the dtype the model trains in."""
    from safetensors.torch import load_file, save_file

    from lora_trainer.backends.checkpoint.loader import load_checkpoint
    from tests.fixtures.checkpoints import write_tiny_checkpoint

    full = write_tiny_checkpoint(tmp_path / "full.safetensors", "sd1")
    half = tmp_path / "half.safetensors"
    save_file({k: v.half() if v.is_floating_point() else v for k, v in load_file(str(full)).items()}, str(half))
    for dtype in (torch.float32, torch.bfloat16):
        adapter = load_checkpoint(half, dtype=dtype)
        modules = [adapter.unet, adapter.vae, *adapter.text_encoders.values()]
        assert {p.dtype for m in modules for p in m.parameters()} == {dtype}
    reference = load_checkpoint(full)
    adapter = load_checkpoint(half)  # float32
    weight = "down_blocks.0.resnets.0.conv1.weight"
    assert torch.equal(adapter.unet.state_dict()[weight], reference.unet.state_dict()[weight].half().float())


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_the_yaml_beside_the_checkpoint_gives_the_denoisers_heads(tmp_path, family):
    """No tensor shows the heads: the WebUI takes them from the checkpoint's .yaml, and so does the loader.
    With it, the loaded denoiser computes what the WebUI-shaped tiny model computes; without it, the family's
    rule (SD1 8 heads, SD2/SDXL 64-channel heads) gives another attention."""
    from lora_trainer.backends.checkpoint.loader import load_checkpoint
    from lora_trainer.contracts import Conditioning
    from tests.fixtures.webui_models import TinyAdapter

    path = write_tiny_checkpoint(tmp_path / f"{family}.safetensors", family, seed=3)
    webui = TinyAdapter(family, seed=3)
    context_dim = next(m for n, m in webui.unet.named_modules() if n.endswith("attn2.to_k")).in_features
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([10, 900])
    vector = torch.randn(2, webui.unet.label_emb[0][0].in_features, generator=gen) if family == "sdxl" else None
    cond = Conditioning(torch.randn(2, 77, context_dim, generator=gen), vector)
    with torch.no_grad():
        expected = webui.predict(x, t, cond)
        loaded = load_checkpoint(path, v_parameterization=False)
        torch.testing.assert_close(loaded.predict(x, t, cond), expected, rtol=1e-5, atol=1e-5)
        path.with_suffix(".yaml").unlink()
        by_rule = load_checkpoint(path, v_parameterization=False)
        assert loaded.unet.config.attention_head_dim != by_rule.unet.config.attention_head_dim
        assert not torch.allclose(by_rule.predict(x, t, cond), expected, rtol=1e-4, atol=1e-4)
