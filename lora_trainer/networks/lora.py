"""LoRA and LoCon (kohya's ``networks.lora``): algorithm ``"lora"``.

A ``LoRAModule`` owns ``lora_down``, ``lora_up`` and ``alpha`` and computes the
low-rank delta of one target layer; the shared plumbing (alpha/scale, module dropout,
saved layout, attachment) is ``base.py``'s and ``network.py``'s. Its state dict is
exactly kohya's: ``lora_down.weight``, ``lora_up.weight``, ``alpha``. Conv targets get
LoCon's layout (a down conv with the target's kernel, a 1x1 up conv), as kohya's
``networks.lora`` does with ``conv_dim`` and as the WebUI's ``network_lora.py`` loads it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from lora_trainer.naming import Target
from lora_trainer.networks.base import NetworkModule
from lora_trainer.networks.registry import register_algorithm


def lora_delta_weight(down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """up @ down * scale, shaped like the target's weight: (out, in) or, for LoCon, (out, in, kh, kw)."""
    if down.dim() == 4:
        return torch.einsum("or,rikl->oikl", up.flatten(1), down) * scale
    return (up @ down) * scale


class LoRAModule(NetworkModule):
    """delta(x) = up(dropout(down(x))) * alpha / rank * multiplier.

    Linear targets get Linear down/up; conv targets get a down conv with the target's
    kernel, stride and padding and a 1x1 up conv (LoCon). Initialisation as kohya:
    ``lora_down`` Kaiming-uniform (a=sqrt(5)), ``lora_up`` zeros, so a fresh module
    changes nothing.
    """

    weight_keys = ("lora_down.weight", "lora_up.weight")

    def __init__(
        self,
        target: Target,
        rank: int,
        alpha: float | None,
        *,
        dropout: float = 0.0,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__(
            target,
            rank,
            alpha,
            dropout=dropout,
            rank_dropout=rank_dropout,
            module_dropout=module_dropout,
            device=device,
            dtype=dtype,
        )
        self.lora_down: nn.Linear | nn.Conv2d
        self.lora_up: nn.Linear | nn.Conv2d
        if target.is_conv:
            self.lora_down = nn.Conv2d(
                target.in_features,
                rank,
                target.kernel_size,
                target.stride,
                target.padding,
                bias=False,
                device=device,
                dtype=dtype,
            )
            self.lora_up = nn.Conv2d(rank, target.out_features, 1, 1, bias=False, device=device, dtype=dtype)
        else:
            self.lora_down = nn.Linear(target.in_features, rank, bias=False, device=device, dtype=dtype)
            self.lora_up = nn.Linear(rank, target.out_features, bias=False, device=device, dtype=dtype)
        if self.lora_down.weight.device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_up.weight)

    @classmethod
    def rank_of(cls, parts: Mapping[str, torch.Tensor]) -> int:
        return int(parts["lora_down.weight"].shape[0])

    def delta(self, x: torch.Tensor, base_weight: torch.Tensor | None = None) -> torch.Tensor | None:
        """The LoRA contribution for input ``x``, in ``x``'s dtype; None when module dropout skips it."""
        if self.module_dropped():
            return None
        h = self.lora_down(x.to(self.lora_down.weight.dtype))
        if self.training and self.dropout:
            h = F.dropout(h, p=self.dropout)
        scale = self.scale * self.multiplier
        if self.training and self.rank_dropout:
            if self.is_conv:  # (B, rank, H, W)
                shape = (h.shape[0], self.rank, 1, 1)
            else:  # (B, [T,] rank)
                shape = (h.shape[0],) + (1,) * (h.dim() - 2) + (self.rank,)
            keep = torch.rand(shape, device=h.device) > self.rank_dropout
            h = h * keep.to(h.dtype)
            scale = scale / (1.0 - self.rank_dropout)
        # the scale goes on the rank-wide activation, not on the output: the same product
        # (exactly so when the scale is a power of two, as alpha = rank / 2 is), on rank
        # instead of out_features values, forward and backward
        return self.lora_up(h * scale).to(x.dtype)

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """The merged weight delta up @ down * scale * multiplier, shaped like the target's weight (no dropout)."""
        return lora_delta_weight(self.lora_down.weight, self.lora_up.weight, self.scale * self.multiplier)


register_algorithm("lora", LoRAModule)
