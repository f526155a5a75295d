"""An ldm/sgm denoiser state dict (the keys after ``model.diffusion_model.``) as diffusers'
``UNet2DConditionModel``.

The configuration is read from the tensors (levels, widths, res blocks per level, which levels
have attention and how deep, cross-attention width, linear or 1x1-conv projections, input and
output channels, SDXL's ``y`` width), starting from :func:`configs.unet_config`. Heads show in no
name or shape, so they follow the families' yaml files: SD1 has 8 heads at every level, SD2 and
SDXL heads of 64 channels (``num_head_channels: 64``); a level narrower than one head gets one.

Names (ldm -> diffusers):

* ``time_embed.0/2`` -> ``time_embedding.linear_1/2``; ``label_emb.0.0/0.2`` (SDXL) ->
  ``class_embedding.linear_1/2``; ``input_blocks.0.0`` -> ``conv_in``; ``out.0/2`` ->
  ``conv_norm_out`` / ``conv_out``.
* ``input_blocks.N``: the res blocks of each level, then its downsampler (``.0.op`` ->
  ``down_blocks.L.downsamplers.0.conv``); ``.0`` -> ``down_blocks.L.resnets.J``, ``.1`` ->
  ``down_blocks.L.attentions.J``.
* ``middle_block.0/1/2`` -> ``mid_block.resnets.0`` / ``attentions.0`` / ``resnets.1``.
* ``output_blocks.N``: res blocks + 1 per level, deepest level first; the last one of a level ends
  with an upsampler (``.K.conv`` -> ``up_blocks.L.upsamplers.0.conv``).
* inside a res block: ``in_layers.0/2`` -> ``norm1/conv1``, ``emb_layers.1`` -> ``time_emb_proj``,
  ``out_layers.0/3`` -> ``norm2/conv2``, ``skip_connection`` -> ``conv_shortcut``; a spatial
  transformer's names are the same in both (``norm``, ``proj_in``, ``transformer_blocks.K...``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from lora_trainer.backends.checkpoint.configs import unet_config
from lora_trainer.errors import IncompatibleModelError

__all__ = ["convert_unet_state", "unet_config_from_state", "unet_key_map"]

_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_FIXED = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "class_embedding.linear_1",
    "label_emb.0.2": "class_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
_SD1_HEADS = 8
_HEAD_CHANNELS = 64


def _indices(state: Mapping[str, Any], prefix: str) -> list[int]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in state if (m := pattern.match(k))})


def _layout(state: Mapping[str, Any]) -> tuple[int, int]:
    """(levels, res blocks per level) of the input side."""
    blocks = _indices(state, "input_blocks.")
    downsamplers = [n for n in blocks if f"input_blocks.{n}.0.op.weight" in state]
    levels = len(downsamplers) + 1
    per_level, rest = divmod(len(blocks) - 1 - len(downsamplers), levels)
    if not blocks or rest or per_level < 1:
        raise IncompatibleModelError("the denoiser's input blocks are not an SD UNet's")
    return levels, per_level


def _input_index(level: int, j: int, per_level: int) -> int:
    return 1 + level * (per_level + 1) + j


def _depth(state: Mapping[str, Any], prefix: str) -> int:
    return len(_indices(state, prefix + "transformer_blocks."))


def _heads(family: str, channels: int) -> int:
    if family == "sd1":
        return _SD1_HEADS
    return max(1, channels // _HEAD_CHANNELS)


def unet_config_from_state(state: Mapping[str, torch.Tensor], family: str, heads: Any = None) -> dict[str, Any]:
    """``UNet2DConditionModel`` arguments of a denoiser state dict (ldm names, no prefix).

    ``heads``: a function channels -> number of heads, replacing the families' rule (see the module).
    """
    levels, per_level = _layout(state)
    config = unet_config(family)
    conv_in = state["input_blocks.0.0.weight"]
    widths = [
        int(state[f"input_blocks.{_input_index(lv, 0, per_level)}.0.out_layers.3.weight"].shape[0])
        for lv in range(levels)
    ]
    depths = [_depth(state, f"input_blocks.{_input_index(lv, 0, per_level)}.1.") for lv in range(levels)]
    middle = _depth(state, "middle_block.1.")
    if depths[-1] and depths[-1] != middle:
        raise IncompatibleModelError("the denoiser's middle block and deepest level differ in transformer depth")
    rule = heads or (lambda channels: _heads(family, channels))
    proj_in = state["middle_block.1.proj_in.weight"]
    config.update(
        in_channels=int(conv_in.shape[1]),
        out_channels=int(state["out.2.weight"].shape[0]),
        block_out_channels=widths,
        layers_per_block=per_level,
        down_block_types=["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths],
        up_block_types=["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depths)],
        transformer_layers_per_block=[d or 1 for d in depths[:-1]] + [middle],
        cross_attention_dim=int(state["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]),
        attention_head_dim=[rule(w) for w in widths],
        use_linear_projection=proj_in.ndim == 2,
    )
    if "label_emb.0.0.weight" in state:
        config.update(
            class_embed_type="projection",
            projection_class_embeddings_input_dim=int(state["label_emb.0.0.weight"].shape[1]),
        )
    else:
        config.pop("class_embed_type", None)
        config.pop("projection_class_embeddings_input_dim", None)
    return config


def _pair(src: str, dst: str, state: Mapping[str, Any], out: dict[str, str]) -> None:
    """Map ``src.weight/bias`` to ``dst.weight/bias`` where the state has them."""
    for suffix in ("weight", "bias"):
        if f"{src}.{suffix}" in state:
            out[f"{src}.{suffix}"] = f"{dst}.{suffix}"


def _block_map(old: str, new: tuple[str, str], state: Mapping[str, Any], out: dict[str, str]) -> None:
    """Map the res block (``old.0``) and spatial transformer (``old.1``) of one ldm block."""
    for src, dst in _RESNET.items():
        _pair(f"{old}.0.{src}", f"{new[0]}.{dst}", state, out)
    attention = f"{old}.1."
    if f"{attention}proj_in.weight" not in state:
        return
    for key in state:
        if key.startswith(attention):
            out[key] = new[1] + "." + key[len(attention) :]


def unet_key_map(state: Mapping[str, Any]) -> dict[str, str]:
    """ldm key -> diffusers key for every tensor of the denoiser state dict (ldm names, no prefix)."""
    levels, per_level = _layout(state)
    out: dict[str, str] = {}
    for src, dst in _FIXED.items():
        _pair(src, dst, state, out)
    for level in range(levels):
        prefix = f"down_blocks.{level}"
        for j in range(per_level):
            n = _input_index(level, j, per_level)
            _block_map(f"input_blocks.{n}", (f"{prefix}.resnets.{j}", f"{prefix}.attentions.{j}"), state, out)
        n = _input_index(level, per_level, per_level)
        _pair(f"input_blocks.{n}.0.op", f"{prefix}.downsamplers.0.conv", state, out)
    _block_map("middle_block", ("mid_block.resnets.0", "mid_block.attentions.0"), state, out)
    for src, dst in _RESNET.items():
        _pair(f"middle_block.2.{src}", f"mid_block.resnets.1.{dst}", state, out)
    for n in _indices(state, "output_blocks."):
        up, j = divmod(n, per_level + 1)
        prefix = f"up_blocks.{up}"
        _block_map(f"output_blocks.{n}", (f"{prefix}.resnets.{j}", f"{prefix}.attentions.{j}"), state, out)
        for k in (1, 2):
            _pair(f"output_blocks.{n}.{k}.conv", f"{prefix}.upsamplers.0.conv", state, out)
    return out


def convert_unet_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The denoiser state dict in diffusers names; ``state`` is emptied on the way (memory)."""
    key_map = unet_key_map(state)
    unknown = sorted(set(state) - set(key_map))
    if unknown:
        raise IncompatibleModelError(f"the denoiser has tensors an SD UNet does not have: {', '.join(unknown[:5])}")
    return {key_map[k]: state.pop(k) for k in list(state)}
