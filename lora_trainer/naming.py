"""Which modules a kohya LoRA targets, and the kohya key of each.

All key mapping lives here. The input is the WebUI's own module trees (ldm/sgm
UNet names such as ``input_blocks.1.1.transformer_blocks.0.attn1.to_q``; HF CLIP
``text_model.encoder.layers.0.self_attn.q_proj``; OpenCLIP
``transformer.resblocks.0.attn``) or a diffusers ``UNet2DConditionModel``
(``down_blocks.0.attentions.0.proj_in``), the output is what kohya's ``networks/lora.py``
writes for the same layer, whichever UNet it came from:

* UNet, SD1/SD2: diffusers names (``lora_unet_down_blocks_0_attentions_0_proj_in``).
* UNet, SDXL: compvis names (``lora_unet_input_blocks_4_1_proj_in``).
* HF CLIP text encoders: ``lora_te_`` (SD1) / ``lora_te1_`` (SDXL) + the HF path.
* OpenCLIP text encoders (SD2 ``lora_te_``, SDXL ``lora_te2_``): HF-style names, the
  fused ``attn.in_proj_weight`` split into q/k/v rows, ``attn.out_proj`` ->
  ``self_attn_out_proj``, ``mlp.c_fc`` -> ``mlp_fc1``, ``mlp.c_proj`` -> ``mlp_fc2``.
  SD2 leaves out the last resblock: it conditions on the penultimate layer.

What is targeted (as kohya): every Linear and 1x1 Conv2d inside a UNet
``SpatialTransformer``, every Linear of the text encoders' attention and MLP; with
``conv_dim`` also the UNet's ``ResBlock``/``Downsample``/``Upsample`` layers, whose
3x3 convs take ``conv_dim`` and whose Linear/1x1 layers take ``network_dim``. On a diffusers
UNet the same layers are those of ``Transformer2DModel`` and ``ResnetBlock2D``/``Downsample2D``/
``Upsample2D``; a target's ``module_name`` is then the diffusers path.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import cast

from torch import nn

from lora_trainer.errors import IncompatibleModelError

UNET_ATTENTION_CLASSES = ("SpatialTransformer",)
UNET_CONV_CLASSES = ("ResBlock", "Downsample", "Upsample")
DIFFUSERS_ATTENTION_CLASSES = ("Transformer2DModel",)
DIFFUSERS_CONV_CLASSES = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
DIFFUSERS_TOP_BLOCKS = ("down_blocks", "mid_block", "up_blocks")
# Newer transformers pick the attention class by implementation (eager, SDPA, flash); all have
# the same q/k/v/out_proj layers and kohya keys.
HF_CLIP_CLASSES = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")
OPENCLIP_BLOCK_CLASSES = ("ResidualAttentionBlock",)

TE_PREFIXES = {"te": "lora_te", "te1": "lora_te1", "te2": "lora_te2"}

# ldm ResBlock layer -> diffusers resnet layer (SD1/SD2 keys)
_RESNET_RENAMES = {
    "in_layers.2": "conv1",
    "out_layers.3": "conv2",
    "emb_layers.1": "time_emb_proj",
    "skip_connection": "conv_shortcut",
}
# OpenCLIP resblock layer -> HF CLIP encoder layer
_OPENCLIP_RENAMES = {"attn.out_proj": "self_attn_out_proj", "mlp.c_fc": "mlp_fc1", "mlp.c_proj": "mlp_fc2"}


@dataclass(frozen=True)
class Target:
    """One layer a LoRA module attaches to.

    ``module`` is the Linear/Conv2d itself, or for ``kind`` ``mha_q``/``mha_k``/``mha_v``
    the ``nn.MultiheadAttention`` whose fused ``in_proj_weight`` rows it adds to.
    ``module_name`` is the module's path inside its component (unet or text encoder).
    """

    key: str
    module: nn.Module
    module_name: str
    group: str  # "unet", "te", "te1", "te2"
    kind: str  # "linear", "conv1x1", "conv3x3", "mha_q", "mha_k", "mha_v"
    in_features: int
    out_features: int
    kernel_size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)

    @property
    def uses_conv_dim(self) -> bool:
        return self.kind == "conv3x3"

    @property
    def is_conv(self) -> bool:
        return self.kind.startswith("conv")


def _layer_target(key: str, name: str, module: nn.Module, group: str) -> Target | None:
    if isinstance(module, nn.Linear):
        return Target(key, module, name, group, "linear", module.in_features, module.out_features)
    if isinstance(module, nn.Conv2d):
        kernel = cast("tuple[int, int]", tuple(module.kernel_size))
        kind = "conv1x1" if kernel == (1, 1) else "conv3x3"
        return Target(
            key,
            module,
            name,
            group,
            kind,
            module.in_channels,
            module.out_channels,
            kernel,
            cast("tuple[int, int]", tuple(module.stride)),
            cast("tuple[int, int]", tuple(module.padding)),
        )
    return None


def _linear_target(key: str, name: str, module: nn.Module, group: str) -> Target:
    target = _layer_target(key, name, module, group)
    if target is None or target.kind != "linear":
        raise IncompatibleModelError(f"{name} is not a Linear layer")
    return target


# The ldm/sgm <-> diffusers block arithmetic (SD1, SD2, SDXL: two res blocks per level). ldm numbers
# its top-level blocks through the levels: ``input_blocks.0`` is the input conv, then per level two
# res blocks and the downsampler; ``output_blocks`` per level (deepest first, as diffusers'
# ``up_blocks``) three res blocks, the upsampler inside the third.
_PER_LEVEL = 3


def _ldm_index(side: str, level: int, position: int) -> int:
    """diffusers ``down_blocks``/``up_blocks`` level and position in it -> ldm top-level block number."""
    return (1 if side == "down" else 0) + _PER_LEVEL * level + position


def _diffusers_position(ldm_side: str, n: int) -> tuple[int, int]:
    """ldm ``input_blocks``/``output_blocks`` number -> diffusers level and position (inverse of _ldm_index)."""
    level, position = divmod(n - (1 if ldm_side == "input_blocks" else 0), _PER_LEVEL)
    return level, position


def _unet_prefix_diffusers(block_name: str) -> str:
    """ldm top-level UNet block (``input_blocks.4.1``) -> diffusers block (``down_blocks_1_attentions_0``).

    Valid for the SD1/SD2 layout: two res blocks per level, a down/upsampler closing each level.
    """
    parts = block_name.split(".")
    if parts[0] == "middle_block":
        index = int(parts[1])
        return "mid_block_attentions_0" if index == 1 else f"mid_block_resnets_{index // 2}"
    n, m = int(parts[1]), int(parts[2])
    if parts[0] == "input_blocks":
        level, i = _diffusers_position(parts[0], n)
        if i == 2:
            return f"down_blocks_{level}_downsamplers_0"
        return f"down_blocks_{level}_{'attentions' if m == 1 else 'resnets'}_{i}"
    if parts[0] == "output_blocks":
        level, i = _diffusers_position(parts[0], n)
        return f"up_blocks_{level}_{'attentions' if m == 1 else 'resnets'}_{i}"
    raise IncompatibleModelError(f"unexpected UNet block {block_name!r}")


def _unet_key(family: str, block_name: str, block: nn.Module, inner: str) -> str:
    if family == "sdxl":
        return "lora_unet_" + f"{block_name}.{inner}".replace(".", "_")
    cls = type(block).__name__
    if cls == "ResBlock":
        inner = _RESNET_RENAMES.get(inner, inner)
    elif cls == "Downsample":
        inner = "conv"  # op -> downsamplers_0_conv
    elif cls == "Upsample":
        level, _ = _diffusers_position("output_blocks", int(block_name.split(".")[1]))
        return f"lora_unet_up_blocks_{level}_upsamplers_0_conv"
    return f"lora_unet_{_unet_prefix_diffusers(block_name)}_{inner.replace('.', '_')}"


_SGM_RESNET_NAMES = {diffusers: ldm for ldm, diffusers in _RESNET_RENAMES.items()}


def _sgm_path(unet: nn.Module, block_name: str, inner: str) -> str:
    """diffusers UNet block + layer (``down_blocks.1.resnets.0``, ``conv1``) -> sgm path (``input_blocks.4.0.in_layers.2``)."""
    parts = block_name.split(".")
    if parts[0] == "mid_block":
        kind, j = parts[1], int(parts[2])
        top = f"middle_block.{1 if kind == 'attentions' else 2 * j}"
    else:
        side, level, kind, j = parts[0].split("_")[0], int(parts[1]), parts[2], int(parts[3])
        ldm_side = "input_blocks" if side == "down" else "output_blocks"
        if kind == "downsamplers":
            return f"{ldm_side}.{_ldm_index(side, level, _PER_LEVEL - 1)}.0.op"
        if kind == "upsamplers":
            # the upsampler follows the last res block (and its attention, where the level has one)
            index = 2 if hasattr(unet.get_submodule(f"up_blocks.{level}"), "attentions") else 1
            return f"{ldm_side}.{_ldm_index(side, level, _PER_LEVEL - 1)}.{index}.conv"
        top = f"{ldm_side}.{_ldm_index(side, level, j)}.{1 if kind == 'attentions' else 0}"
    if kind == "resnets":
        inner = _SGM_RESNET_NAMES.get(inner, inner)
    return f"{top}.{inner}"


def is_diffusers_unet(unet: nn.Module) -> bool:
    """Whether ``unet`` is a diffusers ``UNet2DConditionModel`` (or built like one) rather than an ldm/sgm one."""
    if any(hasattr(unet, name) for name in DIFFUSERS_TOP_BLOCKS):
        return True
    classes = (*DIFFUSERS_ATTENTION_CLASSES, *DIFFUSERS_CONV_CLASSES)
    return any(type(m).__name__ in classes for m in unet.modules())


def _children(block: nn.Module, name: str) -> list[nn.Module]:
    found = getattr(block, name, None)
    return list(cast("nn.ModuleList", found)) if found is not None else []


def ldm_top_blocks(unet: nn.Module) -> tuple[list[list[nn.Module]], int]:
    """A diffusers UNet's layers grouped as ldm/sgm's top-level blocks, and how many are input blocks.

    The groups are ``input_blocks.N`` (the input conv; per level a res block with its attention,
    the downsampler alone), ``middle_block`` and ``output_blocks.N`` (the upsampler in the last of
    its level), in ldm's order: what an ldm walk of the same model would see.
    """
    inputs: list[list[nn.Module]] = [[unet.get_submodule("conv_in")]]
    for down in _children(unet, "down_blocks"):
        attentions = _children(down, "attentions")
        inputs += [[res, *attentions[j : j + 1]] for j, res in enumerate(_children(down, "resnets"))]
        inputs += [[d] for d in _children(down, "downsamplers")]
    mid = unet.get_submodule("mid_block")
    resnets, attentions = _children(mid, "resnets"), _children(mid, "attentions")
    middle = [resnets[0]]
    for i, res in enumerate(resnets[1:]):
        middle += [*attentions[i : i + 1], res]
    outputs: list[list[nn.Module]] = []
    for up in _children(unet, "up_blocks"):
        attentions = _children(up, "attentions")
        outputs += [[res, *attentions[j : j + 1]] for j, res in enumerate(_children(up, "resnets"))]
        outputs[-1] += _children(up, "upsamplers")
    return [*inputs, middle, *outputs], len(inputs)


def _diffusers_key(unet: nn.Module, family: str, block_name: str, inner: str) -> str:
    """kohya: SD1/SD2 keys are the diffusers path; SDXL's are sgm's (kohya trains SDXL on an sgm-named UNet)."""
    path = _sgm_path(unet, block_name, inner) if family == "sdxl" else f"{block_name}.{inner}"
    return "lora_unet_" + path.replace(".", "_")


def unet_targets(unet: nn.Module, family: str, conv: bool) -> Iterator[Target]:
    """Targets in an ldm/sgm ``UNetModel`` or a diffusers ``UNet2DConditionModel``; ``conv`` adds the res/down/up layers."""
    diffusers = is_diffusers_unet(unet)
    attention_classes = DIFFUSERS_ATTENTION_CLASSES if diffusers else UNET_ATTENTION_CLASSES
    conv_classes = DIFFUSERS_CONV_CLASSES if diffusers else UNET_CONV_CLASSES
    for block_name, block in unet.named_modules():
        cls = type(block).__name__
        if cls in attention_classes:
            convs_ok = ("conv1x1",)
        elif conv and cls in conv_classes:
            convs_ok = ("conv1x1", "conv3x3")
        else:
            continue
        for inner, module in block.named_modules():
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            if diffusers:
                # diffusers' Downsample2D registers its conv twice (``Conv2d_0`` first, then ``conv``)
                inner = "conv" if cls == "Downsample2D" else inner
                key = _diffusers_key(unet, family, block_name, inner)
            else:
                key = _unet_key(family, block_name, block, inner)
            target = _layer_target(key, f"{block_name}.{inner}", module, "unet")
            if target is not None and (not target.is_conv or target.kind in convs_ok):
                yield target


_HF_LAYER = re.compile(r"^text_model\.encoder\.layers\.\d+\.")
_OPENCLIP_LAYER = re.compile(r"^transformer\.resblocks\.(\d+)$")


def text_encoder_targets(encoder: nn.Module, group: str, family: str) -> Iterator[Target]:
    """Targets in one text encoder, HF CLIP or OpenCLIP (detected from its module names)."""
    prefix = TE_PREFIXES[group]
    names = dict(encoder.named_modules())
    if any(_HF_LAYER.match(n) for n in names):
        for block_name, block in names.items():
            if type(block).__name__ not in HF_CLIP_CLASSES:
                continue
            for inner, module in block.named_modules():
                if isinstance(module, nn.Linear):
                    path = f"{block_name}.{inner}"
                    yield _linear_target(f"{prefix}_{path.replace('.', '_')}", path, module, group)
        return

    blocks = [(int(m.group(1)), n) for n in names if (m := _OPENCLIP_LAYER.match(n))]
    if not blocks:
        raise IncompatibleModelError(
            f"text encoder {group!r} is neither an HF CLIP nor an OpenCLIP text model "
            "(no text_model.encoder.layers.N nor transformer.resblocks.N modules)"
        )
    blocks.sort()
    if family == "sd2":
        blocks = blocks[:-1]  # SD2 conditions on the penultimate layer: kohya's encoder has one layer less
    for index, block_name in blocks:
        base = f"{prefix}_text_model_encoder_layers_{index}_"
        attn = names[f"{block_name}.attn"]
        if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim:
            raise IncompatibleModelError(f"{block_name}.attn is not a fused nn.MultiheadAttention")
        e = attn.embed_dim
        for kind in ("q", "k", "v"):
            yield Target(f"{base}self_attn_{kind}_proj", attn, f"{block_name}.attn", group, f"mha_{kind}", e, e)
        for inner, renamed in _OPENCLIP_RENAMES.items():
            path = f"{block_name}.{inner}"
            yield _linear_target(base + renamed, path, names[path], group)


def find_targets(
    family: str,
    unet: nn.Module | None,
    text_encoders: dict[str, nn.Module] | None,
    conv: bool = False,
) -> list[Target]:
    """Every kohya target of a model, text encoders first (kohya's order), keys unique."""
    targets: list[Target] = []
    for group, encoder in (text_encoders or {}).items():
        if group not in TE_PREFIXES:
            raise IncompatibleModelError(f"unknown text encoder group {group!r}")
        targets.extend(text_encoder_targets(encoder, group, family))
    if unet is not None:
        targets.extend(unet_targets(unet, family, conv))
    seen: set[str] = set()
    for t in targets:
        if t.key in seen:
            raise IncompatibleModelError(f"two layers map to the same LoRA key {t.key!r}")
        seen.add(t.key)
    return targets


# -- the key lists of the full-size models, without a model (for checking files)

_TE_LAYERS = {"sd1": (("lora_te", 12),), "sd2": (("lora_te", 23),), "sdxl": (("lora_te1", 12), ("lora_te2", 32))}
_TE_PARTS = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")
_ATTN_PARTS = (
    *(f"{a}_{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out_0")),
    "ff_net_0_proj",
    "ff_net_2",
)


def _attention_keys(prefix: str, depth: int) -> list[str]:
    keys = [f"{prefix}_proj_in", f"{prefix}_proj_out"]
    return keys + [f"{prefix}_transformer_blocks_{b}_{p}" for b in range(depth) for p in _ATTN_PARTS]


def _resnet_keys(prefix: str, shortcut: bool, sdxl: bool) -> list[str]:
    """conv1, conv2, time embedding and, where channels change, the 1x1 shortcut."""
    parts = [p.replace(".", "_") for p in _RESNET_RENAMES] if sdxl else list(_RESNET_RENAMES.values())
    return [f"{prefix}_{p}" for p in parts[: 4 if shortcut else 3]]


def kohya_names(family: str, conv: bool = True) -> list[str]:
    """kohya's module names for the full-size SD1/SD2/SDXL base models (``conv``: with conv_dim).

    Built from the architectures' layouts alone, for checking files without a model;
    the golden tests hold it equal to kohya's own lists.
    """
    keys = [
        f"{p}_text_model_encoder_layers_{i}_{part}"
        for p, n in _TE_LAYERS[family]
        for i in range(n)
        for part in _TE_PARTS
    ]
    return keys + (_sdxl_unet_names(conv) if family == "sdxl" else _sd_unet_names(conv))


def _sdxl_unet_names(conv: bool) -> list[str]:
    """SDXL UNet, compvis names: attention in levels 1 and 2 only."""
    depth = {1: 2, 2: 10}  # transformer depth per level (level 0 has none)
    keys: list[str] = []
    for n in range(1, 9):  # input_blocks: 2 per level, a downsampler after levels 0 and 1
        level, i = divmod(n - 1, 3)
        if i == 2:
            keys += [f"lora_unet_input_blocks_{n}_0_op"] if conv else []
            continue
        if level in depth:
            keys += _attention_keys(f"lora_unet_input_blocks_{n}_1", depth[level])
        keys += _resnet_keys(f"lora_unet_input_blocks_{n}_0", n in (4, 7), True) if conv else []
    keys += _attention_keys("lora_unet_middle_block_1", 10)
    keys += [k for r in (0, 2) for k in _resnet_keys(f"lora_unet_middle_block_{r}", False, True)] if conv else []
    for n in range(9):  # output_blocks: 3 per level from the deepest, an upsampler closing levels 2 and 1
        level = 2 - n // 3
        if level in depth:
            keys += _attention_keys(f"lora_unet_output_blocks_{n}_1", depth[level])
        if conv:
            keys += _resnet_keys(f"lora_unet_output_blocks_{n}_0", True, True)
            if n in (2, 5):
                keys.append(f"lora_unet_output_blocks_{n}_2_conv")
    return keys


def _sd_unet_names(conv: bool) -> list[str]:
    """SD1/SD2 UNet, diffusers names: attention in levels 0-2, one transformer block each."""
    keys: list[str] = []
    for b in range(4):
        if b < 3:
            keys += [k for i in range(2) for k in _attention_keys(f"lora_unet_down_blocks_{b}_attentions_{i}", 1)]
        if conv:
            keys += [
                k
                for i in range(2)
                for k in _resnet_keys(f"lora_unet_down_blocks_{b}_resnets_{i}", i == 0 and b in (1, 2), False)
            ]
            keys += [f"lora_unet_down_blocks_{b}_downsamplers_0_conv"] if b < 3 else []
    keys += _attention_keys("lora_unet_mid_block_attentions_0", 1)
    keys += (
        [k for r in range(2) for k in _resnet_keys(f"lora_unet_mid_block_resnets_{r}", False, False)] if conv else []
    )
    for b in range(4):
        if b > 0:
            keys += [k for i in range(3) for k in _attention_keys(f"lora_unet_up_blocks_{b}_attentions_{i}", 1)]
        if conv:
            keys += [k for i in range(3) for k in _resnet_keys(f"lora_unet_up_blocks_{b}_resnets_{i}", True, False)]
            keys += [f"lora_unet_up_blocks_{b}_upsamplers_0_conv"] if b < 3 else []
    return keys
