"""UNet blocks by kohya's numbering: per-block ranks/alphas and per-block learning-rate weights.

kohya's ``networks/lora.py`` numbers the UNet's blocks so that ``block_dims``/``block_alphas``,
``conv_block_dims``/``conv_block_alphas`` and ``down_lr_weight``/``mid_lr_weight``/``up_lr_weight``
can address them:

- SD1/SD2 (diffusers module names): 25 blocks. 0 is the input conv (never targeted), 1-11 the
  down blocks (``down_blocks_<i>_{resnets,attentions}_<j>`` -> 1 + 3i + j, a downsampler -> 1 + 3i + 2),
  12 the mid block, 13-24 the up blocks (13 + 3i + j the same way).
- SDXL (ldm module names): 23 blocks. 0 time/label embedding, 1 + n for ``input_blocks_<n>``,
  10 + n for ``middle_block_<n>``, 13 + n for ``output_blocks_<n>``, 22 the output layer.

A module outside these (text encoders) has no block: index -1. Torch-free.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from lora_trainer.errors import ConfigError
from lora_trainer.log import logger

__all__ = [
    "LR_WEIGHT_PRESETS",
    "BlockPlan",
    "BlockSettings",
    "block_count",
    "block_index",
    "block_lr_weights",
    "block_plan",
    "parse_numbers",
]

SD_DOWN_UP_BLOCKS = 12
SD_MID_BLOCKS = 1
SDXL_DOWN_UP_BLOCKS = 9
SDXL_MID_BLOCKS = 3

LR_WEIGHT_PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")
"""kohya's named down/up lr-weight curves (``name`` or ``name+<base>``, base added to each weight)."""

_SD_UNET = re.compile(r"^lora_unet_(down|up)_blocks_(\d+)_(resnets|attentions|upsamplers|downsamplers)_(\d+)_")
_SDXL_UNET = re.compile(r"^lora_unet_(time_embed|label_emb|input_blocks|middle_block|output_blocks|out)_(\d+)?")
_SDXL_BASE = {"time_embed": 0, "label_emb": 0, "input_blocks": 1, "middle_block": 10, "output_blocks": 13, "out": 22}


def block_count(family: str) -> int:
    """How many values a per-block list has for ``family`` (25 for SD1/SD2, 23 for SDXL)."""
    if family == "sdxl":
        return 1 + 2 * SDXL_DOWN_UP_BLOCKS + SDXL_MID_BLOCKS + 1
    return 2 * SD_DOWN_UP_BLOCKS + SD_MID_BLOCKS


def block_index(key: str, family: str) -> int:
    """kohya's block number of the module named ``key`` (a kohya module name), or -1 if it has none."""
    if family == "sdxl":
        m = _SDXL_UNET.match(key)
        if not m:
            return -1
        base = _SDXL_BASE[m.group(1)]
        return base + int(m.group(2)) if m.group(2) is not None and base not in (0, 22) else base
    m = _SD_UNET.match(key)
    if m:
        side, i, kind, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
        position = 3 * i + (2 if kind in ("upsamplers", "downsamplers") else j)
        return 1 + position + (0 if side == "down" else SD_DOWN_UP_BLOCKS)
    return SD_DOWN_UP_BLOCKS if key.startswith("lora_unet_mid_block_") else -1


def parse_numbers(field: str, text: str, convert: Callable[[str], float]) -> list:
    """``"4,4,8"`` -> ``[4, 4, 8]`` with ``convert``; ConfigError naming ``field`` if a value is not a number."""
    out = []
    for part in text.split(","):
        try:
            out.append(convert(part.strip()))
        except ValueError:
            raise ConfigError(field, f"must be comma-separated numbers, got {part.strip()!r} in {text!r}") from None
    return out


def _sized(field: str, text: str | None, count: int, family: str, convert: Callable[[str], float]) -> list | None:
    if text is None:
        return None
    values = parse_numbers(field, text, convert)
    if len(values) != count:
        raise ConfigError(
            field,
            f"must have {count} comma-separated values for a {family.upper()} model (one per UNet block), "
            f"got {len(values)}",
        )
    return values


def _preset(field: str, text: str, count: int) -> list[float]:
    name, _, base_text = text.partition("+")
    base = parse_numbers(field, base_text, float)[0] if base_text else 0.0
    steps = [i / (count - 1) for i in range(count)]
    curves = {
        "sine": [math.sin(math.pi * s / 2) for s in steps],
        "cosine": [math.sin(math.pi * s / 2) for s in reversed(steps)],
        "linear": steps,
        "reverse_linear": list(reversed(steps)),
        "zeros": [0.0] * count,
    }
    if name.strip() not in curves:
        raise ConfigError(field, f"must be {count} comma-separated numbers or one of {', '.join(LR_WEIGHT_PRESETS)}")
    return [w + base for w in curves[name.strip()]]


def _lr_part(field: str, text: str | None, count: int) -> list[float]:
    if text is None:
        return [1.0] * count
    values = parse_numbers(field, text, float) if ("," in text or _is_number(text)) else _preset(field, text, count)
    if len(values) != count:
        # kohya cuts a longer list and fills a shorter one with 1.0, warning; so do we.
        logger.warning(f"{field} has {len(values)} values, the model has {count} blocks there: using {count}")
        values = (values + [1.0] * count)[:count]
    return values


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def block_lr_weights(
    family: str, down: str | None, mid: str | None, up: str | None, zero_threshold: float = 0.0
) -> list[float] | None:
    """The lr multiplier of each block (``block_count(family)`` values), or None when none of the three is set.

    A weight not above ``zero_threshold`` becomes 0: that block is not trained (and, as in kohya,
    gets no modules).
    """
    if down is None and mid is None and up is None:
        return None
    sides = SDXL_DOWN_UP_BLOCKS if family == "sdxl" else SD_DOWN_UP_BLOCKS
    mids = SDXL_MID_BLOCKS if family == "sdxl" else SD_MID_BLOCKS
    weights = (
        _lr_part("network.down_lr_weight", down, sides)
        + _lr_part("network.mid_lr_weight", mid, mids)
        + _lr_part("network.up_lr_weight", up, sides)
    )
    weights = [w if w > zero_threshold else 0.0 for w in weights]
    return [1.0, *weights, 1.0] if family == "sdxl" else weights


@dataclass(frozen=True)
class BlockPlan:
    """Per-block ranks/alphas of the UNet (conv lists None = the 3x3 convs are not targeted) and lr weights."""

    family: str
    dims: list[int]
    alphas: list[float]
    conv_dims: list[int] | None
    conv_alphas: list[float] | None
    lr_weights: list[float] | None

    def rank_alpha(self, key: str, uses_conv_dim: bool) -> tuple[int, float] | None:
        """(rank, alpha) of the UNet module ``key``, or None for a module with no block (the default applies)."""
        index = block_index(key, self.family)
        if index < 0:
            return None
        if not uses_conv_dim:
            return self.dims[index], self.alphas[index]
        if self.conv_dims is None or self.conv_alphas is None:
            return 0, 1.0
        return self.conv_dims[index], self.conv_alphas[index]

    def lr_weight_at(self, index: int) -> float:
        """The lr weight of block ``index`` (1 for -1, a module with no block, or with no lr weights)."""
        return 1.0 if self.lr_weights is None or index < 0 else self.lr_weights[index]


@dataclass(frozen=True)
class BlockSettings:
    """The per-block settings as written (kohya's comma-separated strings)."""

    block_dims: str | None = None
    block_alphas: str | None = None
    conv_block_dims: str | None = None
    conv_block_alphas: str | None = None
    down_lr_weight: str | None = None
    mid_lr_weight: str | None = None
    up_lr_weight: str | None = None
    block_lr_zero_threshold: float = 0.0


def block_plan(
    family: str, s: BlockSettings, *, rank: int, alpha: float, conv_rank: int, conv_alpha: float
) -> BlockPlan | None:
    """The per-block plan kohya's ``create_network`` makes, or None when no per-block setting is set.

    Missing ``block_dims``/``block_alphas`` default to ``rank``/``alpha`` in every block; missing conv
    lists to ``conv_rank``/``conv_alpha`` (no 3x3 convs when ``conv_rank`` is 0). Blocks whose lr
    weight is 0 get rank 0 (no modules), as in kohya.
    """
    lr_weights = block_lr_weights(family, s.down_lr_weight, s.mid_lr_weight, s.up_lr_weight, s.block_lr_zero_threshold)
    if s.block_dims is None and lr_weights is None:
        for name in ("block_alphas", "conv_block_dims", "conv_block_alphas"):
            if getattr(s, name) is not None:
                logger.warning(f"network.{name} is ignored without network.block_dims or an lr weight (as in kohya)")
        return None
    n = block_count(family)
    dims = _sized("network.block_dims", s.block_dims, n, family, int) or [rank] * n
    alphas = _sized("network.block_alphas", s.block_alphas, n, family, float) or [float(alpha)] * n
    conv_dims = _sized("network.conv_block_dims", s.conv_block_dims, n, family, int)
    conv_alphas = _sized("network.conv_block_alphas", s.conv_block_alphas, n, family, float)
    if conv_dims is not None:
        conv_alphas = conv_alphas or [float(conv_alpha)] * n
    elif conv_rank > 0:
        conv_dims, conv_alphas = [conv_rank] * n, [float(conv_alpha)] * n
    else:
        conv_alphas = None
    if lr_weights is not None:
        dims = [0 if w == 0 else d for d, w in zip(dims, lr_weights, strict=True)]
        if conv_dims is not None:
            conv_dims = [0 if w == 0 else d for d, w in zip(conv_dims, lr_weights, strict=True)]
    return BlockPlan(family, dims, alphas, conv_dims, conv_alphas, lr_weights)
