"""DoRA (weight-decomposed LoRA, LyCORIS's ``dora_wd``): algorithm ``"dora"``.

A DoRA module is a LoRA/LoCon module (same ``lora_down``/``lora_up``/``alpha``) plus a
trained magnitude ``dora_scale``. The target's weight becomes

    W' = (W + dW) * dora_scale / ||W + dW||,    dW = up @ down * alpha / rank

where the norm is taken per *input* channel: over the output rows (and the kernel) of each
column. That is the only decomposition the WebUI's builtin Lora extension applies
(``network.py``: ``apply_weight_decompose``, whatever the file's ``dora_scale`` shape), so
``dora_scale`` is saved shaped ``(1, in)`` for a Linear and ``(1, in, 1, 1)`` for a conv, as
LyCORIS writes it with ``wd_on_output=False``. LyCORIS's default, ``wd_on_output=True``
(a norm per output row), is not offered: the WebUI would apply such a file wrongly.

The module's output delta is ``(W' - W) * multiplier``, as the WebUI merges it, and it
has no epsilon in the norm, as the WebUI has none; ``W`` is the target's current weight (the
q/k/v rows for a fused attention slice), detached. A fresh module starts with
``dora_scale = ||W||`` and a zero ``lora_up``, so it changes nothing.

The merged weight is formed each step, so DoRA has no per-activation network dropout
(``dropout``, refused); rank dropout masks ranks of the merged delta for the whole batch,
module dropout skips the module, as for LoRA.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from lora_trainer.naming import Target
from lora_trainer.networks.base import NetworkModule
from lora_trainer.networks.lora import LoRAModule, lora_delta_weight
from lora_trainer.networks.registry import register_algorithm


def column_norm(weight: torch.Tensor) -> torch.Tensor:
    """The norm of each input channel of ``weight`` (out, in[, kh, kw]), shaped (1, in[, 1, 1]) to broadcast."""
    per_input = weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
    return per_input.reshape(1, weight.shape[1], *[1] * (weight.dim() - 2))


def target_weight(target: Target) -> torch.Tensor:
    """The weight a target's delta adds to: the layer's, or its rows of a fused ``in_proj_weight``."""
    if target.kind.startswith("mha_"):
        fused = cast(torch.Tensor, target.module.in_proj_weight)
        return fused.chunk(3)["qkv".index(target.kind[-1])]
    return cast(torch.Tensor, target.module.weight)


class DoRAModule(LoRAModule):
    """LoRA/LoCon with a trained per-input-channel magnitude (``dora_scale``), applied to the merged weight."""

    weight_keys = ("lora_down.weight", "lora_up.weight", "dora_scale")

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
        if dropout:
            raise ValueError("DoRA takes no network dropout (it trains the merged weight); use rank or module dropout")
        super().__init__(
            target,
            rank,
            alpha,
            rank_dropout=rank_dropout,
            module_dropout=module_dropout,
            device=device,
            dtype=dtype,
        )
        base = target_weight(target).detach()
        if base.device.type == "meta" or self.lora_down.weight.device.type == "meta":
            shape = (1, base.shape[1], *[1] * (base.dim() - 2))
            self.dora_scale = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        else:
            magnitude = column_norm(base.to(device=device, dtype=torch.float32))
            self.dora_scale = nn.Parameter(magnitude.to(dtype))

    def delta(self, x: torch.Tensor, base_weight: torch.Tensor | None = None) -> torch.Tensor | None:
        """The merged-weight delta applied to ``x`` as the target would (``NetworkModule.delta``)."""
        return NetworkModule.delta(self, x, base_weight)

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """``(W' - W) * multiplier`` for the target's weight ``base_weight`` (required), shaped like it."""
        if base_weight is None:
            raise ValueError("DoRA's delta depends on the target's weight: pass base_weight")
        weight = base_weight.detach().to(self.dora_scale.device, self.dora_scale.dtype)
        up = self.lora_up.weight
        scale = self.scale
        if self.training and self.rank_dropout:
            keep = (torch.rand(self.rank, device=up.device) > self.rank_dropout).to(up.dtype)
            up = up * keep.reshape(1, -1, *[1] * (up.dim() - 2))
            scale = scale / (1.0 - self.rank_dropout)
        merged = weight + lora_delta_weight(self.lora_down.weight, up, scale)
        decomposed = merged * (self.dora_scale / column_norm(merged))
        return (decomposed - weight) * self.multiplier


register_algorithm("dora", DoRAModule)
