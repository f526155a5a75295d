"""Golden test: our networks on full-size WebUI module trees equal kohya's key lists exactly.

The trees are built on the meta device (no memory) by tests/fixtures, whose faithfulness
to the WebUI's own modules is checked against tests/data/a1111_modules_*.json in
test_fixtures.py. The expected keys, shapes and module mapping are tests/data/lora_keys_*.json,
produced by running kohya's sd-scripts and the WebUI's Lora loader.
"""

import json
from pathlib import Path

import pytest
import torch

from lora_trainer.naming import find_targets, kohya_names
from lora_trainer.networks.network import LoRANetwork
from tests.fixtures.webui_models import build_webui_model, components

DATA = Path(__file__).parent / "data"
RANK, CONV_RANK = 4, 8


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def full_model(request):
    family = request.param
    return family, build_webui_model(family, size="full", device="meta")


def golden(family):
    return json.loads((DATA / f"lora_keys_{family}.json").read_text())["modules"]


def expected_shape(shape, rank):
    return tuple(rank if d == "r" else d for d in shape)


@pytest.mark.parametrize("conv", [False, True], ids=["default", "conv_dim"])
def test_keys_shapes_and_modules_equal_kohya(full_model, conv):
    family, root = full_model
    unet, text_encoders = components(root, family)
    targets = find_targets(family, unet, text_encoders, conv=conv)
    network = LoRANetwork(targets, rank=RANK, alpha=1.0, conv_rank=CONV_RANK if conv else 0, conv_alpha=4.0)

    expected = {m["kohya"]: m for m in golden(family) if conv or not m["conv_dim_only"]}
    got = {t.key: t for t in network.targets.values()}
    assert sorted(set(got) - set(expected)) == []
    assert sorted(set(expected) - set(got)) == []

    state = network.state_dict()
    assert len(state) == 3 * len(expected)
    names = {id(m): n for n, m in root.named_modules()}
    for key, entry in expected.items():
        rank = CONV_RANK if entry["rank_from"] == "conv_dim" else RANK
        assert tuple(state[f"{key}.lora_down.weight"].shape) == expected_shape(entry["lora_down_shape"], rank), key
        assert tuple(state[f"{key}.lora_up.weight"].shape) == expected_shape(entry["lora_up_shape"], rank), key
        assert state[f"{key}.alpha"].shape == torch.Size([]), key
        target = got[key]
        assert names[id(target.module)] == entry["a1111_module_hijacked"], key
        if entry["a1111_param_slice"]:
            row = ["q", "k", "v"].index(target.kind[-1])
            e = target.in_features
            assert entry["a1111_param_slice"] == f"in_proj_weight[{row * e}:{(row + 1) * e}]", key
        lora = getattr(network, key)
        if entry["kind"] == "conv3x3":
            assert tuple(lora.lora_down.stride) == tuple(entry["stride"]), key


def test_unet_only_and_text_encoder_only_split_the_key_set(full_model):
    family, root = full_model
    unet, text_encoders = components(root, family)
    everything = {t.key for t in find_targets(family, unet, text_encoders)}
    unet_only = {t.key for t in find_targets(family, unet, None)}
    te_only = {t.key for t in find_targets(family, None, text_encoders)}
    assert unet_only
    assert te_only
    assert unet_only | te_only == everything
    assert not unet_only & te_only
    assert all(k.startswith("lora_unet_") for k in unet_only)
    assert all(k.startswith("lora_te") for k in te_only)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("conv", [False, True], ids=["default", "conv_dim"])
def test_kohya_names_without_a_model_equal_kohya(family, conv):
    names = kohya_names(family, conv=conv)
    assert len(names) == len(set(names))
    assert set(names) == {m["kohya"] for m in golden(family) if conv or not m["conv_dim_only"]}


@pytest.mark.parametrize("attention_class", ["CLIPSdpaAttention", "CLIPFlashAttention2"])
def test_newer_transformers_attention_classes_give_the_same_keys(attention_class):
    # transformers >= 4.41 builds CLIPSdpaAttention / CLIPFlashAttention2 instead of CLIPAttention
    root = build_webui_model("sd1", size="full", device="meta")
    _, text_encoders = components(root, "sd1")
    renamed = 0
    for module in root.modules():
        if type(module).__name__ == "CLIPAttention":
            module.__class__ = type(attention_class, (type(module),), {})
            renamed += 1
    assert renamed
    keys = {t.key for t in find_targets("sd1", None, text_encoders)}
    expected = {m["kohya"] for m in golden("sd1") if m["kohya"].startswith("lora_te") and not m["conv_dim_only"]}
    assert keys == expected
    assert any("self_attn_q_proj" in k for k in keys)
