"""kohya's per-block ranks/alphas, per-block lr weights and LoRA+ (networks.blocks, train.network_setup)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lora_trainer.config import TrainConfig
from lora_trainer.config.network_group import NetworkConfig
from lora_trainer.errors import ConfigError
from lora_trainer.naming import find_targets
from lora_trainer.networks.blocks import block_count, block_index, block_lr_weights
from lora_trainer.networks.network import LoRANetwork
from lora_trainer.train.network_setup import block_network_args, block_plan_for, network_groups, rank_alpha_for
from lora_trainer.train.optim import build_optimizer, current_lrs
from tests.fixtures.webui_models import build_webui_model, components

DATA = Path(__file__).parent / "data"


def golden_unet_keys(family):
    modules = json.loads((DATA / f"lora_keys_{family}.json").read_text())["modules"]
    return [m["kohya"] for m in modules if m["group"] == "unet"], [m["kohya"] for m in modules if m["group"] != "unet"]


@pytest.mark.parametrize(
    ("family", "key", "index"),
    [
        ("sd1", "lora_unet_down_blocks_0_attentions_0_proj_in", 1),
        ("sd1", "lora_unet_down_blocks_0_resnets_1_conv1", 2),
        ("sd1", "lora_unet_down_blocks_0_downsamplers_0_conv", 3),
        ("sd1", "lora_unet_down_blocks_3_resnets_1_conv2", 11),
        ("sd1", "lora_unet_mid_block_attentions_0_proj_out", 12),
        ("sd1", "lora_unet_up_blocks_0_upsamplers_0_conv", 15),
        ("sd1", "lora_unet_up_blocks_3_attentions_2_proj_out", 24),
        ("sdxl", "lora_unet_input_blocks_4_1_proj_in", 5),
        ("sdxl", "lora_unet_middle_block_1_proj_in", 11),
        ("sdxl", "lora_unet_output_blocks_8_0_skip_connection", 21),
        ("sdxl", "lora_te1_text_model_encoder_layers_0_self_attn_k_proj", -1),
    ],
)
def test_block_index_of_kohya_names(family, key, index):
    assert block_index(key, family) == index


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_every_golden_unet_key_has_a_block_and_text_encoders_none(family):
    unet, te = golden_unet_keys(family)
    low = 2 if family == "sdxl" else 1  # SDXL's input_blocks_0 (the input conv) is never targeted
    assert {block_index(k, family) for k in unet} <= set(
        range(low, block_count(family) - 1 if family == "sdxl" else 25)
    )
    assert {block_index(k, family) for k in te} == {-1}
    assert block_count(family) == (23 if family == "sdxl" else 25)


def test_lr_weight_presets_and_threshold():
    w = block_lr_weights("sd1", "sine", None, "zeros+0.5", 0.1)
    assert len(w) == 25
    assert w[0] == 0.0  # sin(0) is not above the threshold
    assert w[10] == pytest.approx(math.sin(math.pi * 10 / 11 / 2))
    assert w[11] == pytest.approx(1.0)
    assert w[12] == 1.0  # mid unset
    assert w[13:] == [0.5] * 12
    sdxl = block_lr_weights("sdxl", None, "0,1,0", None)
    assert len(sdxl) == 23
    assert sdxl[10:13] == [0.0, 1.0, 0.0]
    assert sdxl[0] == sdxl[22] == 1.0


def test_wrong_block_count_for_the_family_is_refused():
    net = NetworkConfig(block_dims=",".join(["4"] * 25))
    assert block_plan_for(net, "sd1") is not None
    with pytest.raises(ConfigError) as info:
        block_plan_for(net, "sdxl")
    assert info.value.field == "network.block_dims"
    assert "23" in info.value.message
    assert "got 25" in info.value.message


def test_config_checks_block_lists():
    errors = TrainConfig.from_dict({"network": {"block_dims": "4,4"}}).errors()
    assert any(e.field == "network.block_dims" and "25 or 23" in e.message for e in errors)
    errors = TrainConfig.from_dict({"network": {"down_lr_weight": "wave"}}).errors()
    assert any(e.field == "network.down_lr_weight" for e in errors)


def tiny_network(net: NetworkConfig, family="sd1"):
    root = build_webui_model(family)
    unet, text_encoders = components(root, family)
    plan = block_plan_for(net, family)
    targets = find_targets(family, unet, text_encoders, conv=net.conv_dim > 0 or bool(plan and plan.conv_dims))
    network = LoRANetwork(
        targets,
        rank=net.network_dim,
        alpha=net.network_alpha,
        conv_rank=net.conv_dim,
        conv_alpha=net.conv_alpha,
        rank_alpha=rank_alpha_for(plan),
    )
    return network, plan


def test_block_dims_give_those_ranks_and_zero_leaves_the_block_out():
    dims = [(i % 3) * 2 for i in range(25)]  # 0, 2, 4, 0, 2, 4, ...
    alphas = [float(i) + 0.5 for i in range(25)]
    net = NetworkConfig(network_dim=8, block_dims=",".join(map(str, dims)), block_alphas=",".join(map(str, alphas)))
    network, _ = tiny_network(net)
    sd = network.state_dict()
    unet = list(network.loras("unet"))
    assert unet
    for m in unet:
        i = block_index(m.key, "sd1")
        assert dims[i] > 0
        assert sd[f"{m.key}.lora_down.weight"].shape[0] == dims[i]
        assert float(sd[f"{m.key}.alpha"]) == alphas[i]
    present = {block_index(m.key, "sd1") for m in unet}
    assert not any(dims[i] == 0 for i in present)
    assert all(sd[f"{m.key}.lora_down.weight"].shape[0] == 8 for m in network.loras("te"))  # text encoder: network_dim


def test_block_lr_weights_give_per_block_lrs():
    down = "1,0,1,1,0.25,1,1,1,1,1,1,1"  # kohya's list starts at block 0 (the input conv, never targeted)
    net = NetworkConfig(down_lr_weight=down, mid_lr_weight="0.5", up_lr_weight=",".join(["2"] * 12))
    network, plan = tiny_network(net)
    groups = network_groups(network, net, plan, 1e-3, 5e-4, 1e-4)
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs["text_encoder"] == 5e-4
    assert "unet" not in lrs
    assert "unet_block1" not in lrs
    assert not [m for m in network.loras("unet") if block_index(m.key, "sd1") == 1]
    assert lrs["unet_block4"] == pytest.approx(2.5e-4)
    for name, lr in lrs.items():
        if name.startswith("unet_block"):
            index = int(name.removeprefix("unet_block"))
            assert lr == pytest.approx(1e-3 * plan.lr_weights[index])
    assert lrs["unet_block12"] == pytest.approx(5e-4)
    assert lrs["unet_block20"] == pytest.approx(2e-3)
    optimizer = build_optimizer("AdamW", groups, 1e-4, None)
    assert current_lrs(optimizer)["unet_block20"] == pytest.approx(2e-3)


def test_loraplus_up_weights_get_ratio_times_lr_and_train():
    net = NetworkConfig(loraplus_lr_ratio=16.0, loraplus_text_encoder_lr_ratio=4.0)
    network, plan = tiny_network(net)
    groups = network_groups(network, net, plan, 1e-3, None, 2e-4)
    by_name = {g["name"]: g for g in groups}
    assert {n: g["lr"] for n, g in by_name.items()} == pytest.approx(
        {"unet": 1e-3, "unet_plus": 1.6e-2, "text_encoder": 2e-4, "text_encoder_plus": 8e-4}
    )
    up = {id(p) for n, p in network.named_parameters() if "lora_up" in n}
    assert {id(p) for p in by_name["unet_plus"]["params"]} <= up
    assert not {id(p) for p in by_name["unet"]["params"]} & up
    assert sum(len(g["params"]) for g in groups) == len(list(network.parameters()))
    # it trains: the up weights (zero at the start) move
    optimizer = build_optimizer("AdamW", groups, 2e-4, None)
    for p in network.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert all(p.abs().sum() > 0 for g in groups if g["name"].endswith("_plus") for p in g["params"])


def test_toml_round_trip_and_network_args():
    cfg = TrainConfig.from_dict(
        {
            "network": {
                "loraplus_lr_ratio": 8,
                "block_dims": ",".join(["4"] * 25),
                "down_lr_weight": "cosine+0.1",
                "block_lr_zero_threshold": 0.2,
            }
        }
    )
    assert not [e for e in cfg.errors() if e.field.startswith("network.")]
    text = cfg.to_toml()
    assert TrainConfig.from_toml(text) == cfg
    assert "loraplus_lr_ratio=8.0" in text
    assert "down_lr_weight=cosine+0.1" in text
    args = block_network_args(cfg.network)
    assert args == {
        "loraplus_lr_ratio": "8.0",
        "block_dims": ",".join(["4"] * 25),
        "down_lr_weight": "cosine+0.1",
        "block_lr_zero_threshold": "0.2",
    }
