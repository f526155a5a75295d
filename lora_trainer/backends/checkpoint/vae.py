"""An ldm VAE state dict (``first_stage_model.*`` of a checkpoint, or a WebUI VAE file: the same
names without the prefix) as diffusers' ``AutoencoderKL``.

Names (ldm -> diffusers): ``encoder.down.I.block.J`` -> ``encoder.down_blocks.I.resnets.J``,
``encoder.down.I.downsample.conv`` -> ``encoder.down_blocks.I.downsamplers.0.conv``;
``decoder.up.I.block.J`` -> ``decoder.up_blocks.(N-1-I).resnets.J`` (ldm counts the decoder's
levels from the output side), ``decoder.up.I.upsample.conv`` -> ``...upsamplers.0.conv``;
``mid.block_1/2`` -> ``mid_block.resnets.0/1``; ``mid.attn_1.norm/q/k/v/proj_out`` ->
``mid_block.attentions.0.group_norm/to_q/to_k/to_v/to_out.0``: ldm's are 1x1 convs, diffusers'
Linear layers, so those weights lose their two trailing 1-sized dimensions; ``nin_shortcut`` ->
``conv_shortcut``, ``norm_out`` -> ``conv_norm_out``. ``quant_conv``, ``post_quant_conv``,
``conv_in``, ``conv_out`` and the res blocks' ``norm1/conv1/norm2/conv2`` keep their names.

A file already in diffusers' names (``encoder.down_blocks.*``) is taken as it is.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from lora_trainer.backends.checkpoint.configs import vae_config

__all__ = ["convert_vae_state", "is_diffusers_vae", "vae_config_from_state", "vae_key_map"]

_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_LINEAR = {"to_q", "to_k", "to_v", "to_out.0"}


def is_diffusers_vae(state: Mapping[str, Any]) -> bool:
    """True when the keys are already diffusers' ``AutoencoderKL`` names."""
    return any(k.startswith("encoder.down_blocks.") for k in state)


def _levels(state: Mapping[str, Any], side: str) -> int:
    pattern = re.compile(rf"{side}\.(\d+)\.")
    found = {int(m.group(1)) for k in state if (m := pattern.match(k.split("coder.", 1)[-1]))}
    return max(found) + 1 if found else 0


def _rename(key: str, levels: int) -> str:
    part, _, rest = key.partition(".")
    if part not in ("encoder", "decoder"):
        return key
    rest = rest.replace("norm_out.", "conv_norm_out.")
    if m := re.match(r"(down|up)\.(\d+)\.(block|downsample|upsample)\.(.*)", rest):
        side, level, kind, tail = m.groups()
        index = int(level) if side == "down" else levels - 1 - int(level)
        block = f"{side}_blocks.{index}"
        if kind == "block":
            j, _, tail = tail.partition(".")
            rest = f"{block}.resnets.{j}.{tail.replace('nin_shortcut', 'conv_shortcut')}"
        else:
            rest = f"{block}.{kind}rs.0.{tail}"
    elif m := re.match(r"mid\.(block_1|block_2|attn_1)\.([a-z_0-9]+)\.(.*)", rest):
        block, layer, tail = m.groups()
        if block == "attn_1":
            rest = f"mid_block.attentions.0.{_ATTENTION[layer]}.{tail}"
        else:
            index = 0 if block == "block_1" else 1
            rest = f"mid_block.resnets.{index}.{layer.replace('nin_shortcut', 'conv_shortcut')}.{tail}"
    return f"{part}.{rest}"


def vae_key_map(state: Mapping[str, Any]) -> dict[str, str]:
    """ldm key -> diffusers key for every tensor of a VAE state dict (no prefix)."""
    levels = _levels(state, "up")
    return {key: _rename(key, levels) for key in state}


def convert_vae_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The VAE state dict in diffusers names (1x1-conv attention weights as Linear weights);
    ``state`` is emptied on the way (memory)."""
    if is_diffusers_vae(state):
        return {k: state.pop(k) for k in list(state)}
    key_map = vae_key_map(state)
    out: dict[str, torch.Tensor] = {}
    for key in list(state):
        new = key_map[key]
        tensor = state.pop(key)
        layer = new.rsplit(".", 1)[0].split("attentions.0.", 1)[-1]
        if "mid_block.attentions.0." in new and layer in _LINEAR and tensor.ndim == 4:
            tensor = tensor.reshape(tensor.shape[0], tensor.shape[1])
        out[new] = tensor
    return out


def vae_config_from_state(state: Mapping[str, torch.Tensor], family: str) -> dict[str, Any]:
    """``AutoencoderKL`` arguments of a VAE state dict in diffusers names, starting from
    :func:`configs.vae_config` (group norms of 32 groups, as every SD VAE has)."""
    config = vae_config(family)
    widths = []
    while f"encoder.down_blocks.{len(widths)}.resnets.0.conv1.weight" in state:
        widths.append(int(state[f"encoder.down_blocks.{len(widths)}.resnets.0.conv1.weight"].shape[0]))
    per_level = 0
    while f"encoder.down_blocks.0.resnets.{per_level}.conv1.weight" in state:
        per_level += 1
    config.update(
        in_channels=int(state["encoder.conv_in.weight"].shape[1]),
        out_channels=int(state["decoder.conv_out.weight"].shape[0]),
        block_out_channels=widths,
        down_block_types=["DownEncoderBlock2D"] * len(widths),
        up_block_types=["UpDecoderBlock2D"] * len(widths),
        layers_per_block=per_level,
        latent_channels=int(state["post_quant_conv.weight"].shape[0]),
    )
    return config
