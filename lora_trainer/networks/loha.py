"""LoHa (LyCORIS ``algo=loha``): algorithm ``"loha"``.

The delta weight is the Hadamard (element-wise) product of two low-rank products,
``(w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank``, shaped like the target's weight; a
module of rank r can reach rank r**2. The state dict is LyCORIS's: ``hada_w1_a`` (out, r),
``hada_w1_b`` (r, in*kh*kw), ``hada_w2_a``, ``hada_w2_b``, ``alpha``. With ``use_tucker`` a
conv with a kernel larger than 1x1 gets LyCORIS's Tucker layout instead: cores ``hada_t1``/
``hada_t2`` (r, r, kh, kw) with ``hada_w*_a`` (r, out) and ``hada_w*_b`` (r, in). These are the
tensors the WebUI's ``network_hada.py`` reads, with the same scale rule (alpha / rank, where
rank is ``hada_w1_b``'s first dimension).

As LyCORIS: ``hada_w1_a`` ~ N(0, 0.1), the ``_b`` factors ~ N(0, 1), Tucker cores ~ N(0, 0.1)
and ``hada_w2_a`` zero, so a fresh module changes nothing. Rank dropout drops output rows of
the delta weight (LyCORIS's default, without rescaling); plain dropout is not applied, as in
LyCORIS, whose LoHa/LoKr have none.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lora_trainer.naming import Target
from lora_trainer.networks.base import NetworkModule
from lora_trainer.networks.registry import register_algorithm


def tucker_weight(core: torch.Tensor, out_factor: torch.Tensor, in_factor: torch.Tensor) -> torch.Tensor:
    """A (out, in, kh, kw) weight from a Tucker core (r1, r2, kh, kw), out factor (r1, out), in factor (r2, in)."""
    return torch.einsum("abhw,ao,bi->oihw", core, out_factor, in_factor)


def target_weight_shape(target: Target) -> tuple[int, ...]:
    """The shape of the weight a module adds to: (out, in) or (out, in, kh, kw)."""
    if target.is_conv:
        return (target.out_features, target.in_features, *target.kernel_size)
    return (target.out_features, target.in_features)


def apply_delta_weight(module: NetworkModule, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (the delta, scale applied) applied to ``x`` as the target layer would, with
    LyCORIS's rank dropout in training (whole output rows dropped, no rescaling); in ``x``'s dtype."""
    if module.training and module.rank_dropout:
        keep = torch.rand(weight.shape[0], device=weight.device) > module.rank_dropout
        weight = weight * keep.to(weight.dtype).view(-1, *[1] * (weight.dim() - 1))
    h = x.to(weight.dtype)
    out = F.conv2d(h, weight, None, module.stride, module.padding) if module.is_conv else F.linear(h, weight)
    return out.to(x.dtype)


class LoHaModule(NetworkModule):
    """delta W = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank * multiplier (Tucker form on k x k convs)."""

    weight_keys = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    optional_keys = ("hada_t1", "hada_t2")

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
        use_tucker: bool = False,
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
        self.shape = target_weight_shape(target)
        self.tucker = bool(use_tucker) and target.is_conv and tuple(target.kernel_size) != (1, 1)
        out_dim, in_dim = self.shape[0], self.shape[1]

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(shape, device=device, dtype=dtype))

        if self.tucker:
            kernel = self.shape[2:]
            self.hada_w1_a, self.hada_w1_b = param(rank, out_dim), param(rank, in_dim)
            self.hada_w2_a, self.hada_w2_b = param(rank, out_dim), param(rank, in_dim)
            self.hada_t1, self.hada_t2 = param(rank, rank, *kernel), param(rank, rank, *kernel)
        else:
            flat_in = in_dim * (self.shape[2] * self.shape[3] if target.is_conv else 1)
            self.hada_w1_a, self.hada_w1_b = param(out_dim, rank), param(rank, flat_in)
            self.hada_w2_a, self.hada_w2_b = param(out_dim, rank), param(rank, flat_in)
        if self.hada_w1_a.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """LyCORIS's initialisation: the product starts at zero (``hada_w2_a`` = 0)."""
        with torch.no_grad():
            if self.tucker:
                nn.init.normal_(self.hada_t1, std=0.1)
                nn.init.normal_(self.hada_t2, std=0.1)
            nn.init.normal_(self.hada_w1_a, std=0.1)
            nn.init.normal_(self.hada_w1_b, std=1.0)
            nn.init.normal_(self.hada_w2_b, std=1.0)
            nn.init.zeros_(self.hada_w2_a)

    @classmethod
    def rank_of(cls, parts: Mapping[str, torch.Tensor]) -> int:
        return int(parts["hada_w1_b"].shape[0])

    @classmethod
    def from_weights(
        cls,
        target: Target,
        parts: Mapping[str, torch.Tensor],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        **options: Any,
    ) -> NetworkModule:
        options.setdefault("use_tucker", "hada_t1" in parts)
        return super().from_weights(target, parts, device=device, dtype=dtype, **options)

    def unscaled_weight(self) -> torch.Tensor:
        """(w1_a @ w1_b) * (w2_a @ w2_b), shaped like the target's weight (no scale, no multiplier)."""
        if self.tucker:
            w1 = tucker_weight(self.hada_t1, self.hada_w1_a, self.hada_w1_b)
            w2 = tucker_weight(self.hada_t2, self.hada_w2_a, self.hada_w2_b)
        else:
            w1 = self.hada_w1_a @ self.hada_w1_b
            w2 = self.hada_w2_a @ self.hada_w2_b
        return (w1 * w2).reshape(self.shape)

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        return self.unscaled_weight() * (self.scale * self.multiplier)

    def delta(self, x: torch.Tensor, base_weight: torch.Tensor | None = None) -> torch.Tensor | None:
        if self.module_dropped():
            return None
        return apply_delta_weight(self, x, self.delta_weight(base_weight))


register_algorithm("loha", LoHaModule)
