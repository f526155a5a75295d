"""LoRA / LoCon modules, kohya's ``networks.lora`` layout.

A ``LoRAModule`` owns ``lora_down``, ``lora_up`` and ``alpha`` and computes the
low-rank delta of one target layer; it never holds or touches the base layer (the
network attaches it with a hook, see ``network.py``). Its state dict is exactly
kohya's: ``lora_down.weight``, ``lora_up.weight``, ``alpha``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..naming import Target


class LoRAModule(nn.Module):
    """delta(x) = up(dropout(down(x))) * alpha / rank * multiplier.

    Linear targets get Linear down/up; conv targets get a down conv with the target's
    kernel, stride and padding and a 1x1 up conv (LoCon). Initialisation as kohya:
    ``lora_down`` Kaiming-uniform (a=sqrt(5)), ``lora_up`` zeros, so a fresh module
    changes nothing.
    """

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
        super().__init__()
        self.key = target.key
        self.kind = target.kind
        self.rank = rank
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
        alpha = float(rank) if not alpha else float(alpha)  # kohya: None or 0 means alpha = rank
        self.register_buffer("alpha", torch.tensor(alpha, device=device, dtype=dtype))
        self.scale = alpha / rank
        self.multiplier = 1.0
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        if self.lora_down.weight.device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_up.weight)

    def delta(self, x: torch.Tensor) -> torch.Tensor | None:
        """The LoRA contribution for input ``x``, in ``x``'s dtype; None when module dropout skips it."""
        if self.training and self.module_dropout and torch.rand(()) < self.module_dropout:
            return None
        h = self.lora_down(x.to(self.lora_down.weight.dtype))
        if self.training and self.dropout:
            h = F.dropout(h, p=self.dropout)
        scale = self.scale * self.multiplier
        if self.training and self.rank_dropout:
            if self.kind.startswith("conv"):  # (B, rank, H, W)
                shape = (h.shape[0], self.rank, 1, 1)
            else:  # (B, [T,] rank)
                shape = (h.shape[0],) + (1,) * (h.dim() - 2) + (self.rank,)
            keep = torch.rand(shape, device=h.device) > self.rank_dropout
            h = h * keep.to(h.dtype)
            scale = scale / (1.0 - self.rank_dropout)
        return (self.lora_up(h) * scale).to(x.dtype)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """The merged weight delta up @ down * scale, shaped like the target's weight (no dropout)."""
        down, up = self.lora_down.weight, self.lora_up.weight
        if self.kind.startswith("conv"):
            w = torch.einsum("or,rikl->oikl", up.flatten(1), down)
        else:
            w = up @ down
        return w * (self.scale * self.multiplier)
