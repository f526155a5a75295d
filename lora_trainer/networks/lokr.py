"""LoKr (LyCORIS ``algo=lokr``): algorithm ``"lokr"``.

The delta weight is a Kronecker product ``w1 (x) w2 * scale``, shaped like the target's weight.
Both dimensions are split in two with :func:`factorization` (``factor``, LyCORIS's option):
out = a*b, in = c*d; ``w1`` is (a, c), ``w2`` is (b, d) (times the kernel for a conv). The state
dict is LyCORIS's, as the WebUI's ``network_lokr.py`` reads it:

* ``lokr_w1`` (a, c), or with ``decompose_both`` (when rank < max(a, c) / 2) the low-rank
  pair ``lokr_w1_a`` (a, r) and ``lokr_w1_b`` (r, c);
* ``lokr_w2_a`` (b, r) and ``lokr_w2_b`` (r, d*kh*kw) while rank < max(b, d) / 2, else the
  full ``lokr_w2`` (b, d[, kh, kw]); with ``use_tucker`` a k x k conv gets a core ``lokr_t2``
  (r, r, kh, kw) with ``lokr_w2_a`` (r, b) and ``lokr_w2_b`` (r, d);
* ``full_matrix`` keeps both factors full;
* ``alpha``; scale = alpha / rank, and 1 when neither factor is low-rank (then the saved
  alpha is the rank, as LyCORIS writes it: the WebUI has no rank to divide by and uses 1).

Initialisation as LyCORIS: the full or low-rank ``w1`` and ``lokr_w2_a``/``lokr_t2``
Kaiming-uniform, ``lokr_w2_b`` (or a full ``lokr_w2``) zero. Rank dropout and dropout as
``loha.py`` (LyCORIS's).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lora_trainer.naming import Target
from lora_trainer.networks.base import NetworkModule
from lora_trainer.networks.loha import apply_delta_weight, target_weight_shape, tucker_weight
from lora_trainer.networks.registry import register_algorithm


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``dimension`` as (m, n), m <= n, m * n = dimension: LyCORIS's split for LoKr.

    A positive ``factor`` that divides ``dimension`` is used as it is; otherwise m is the
    largest divisor no greater than the square root of ``dimension`` and, when ``factor``
    is positive, no greater than ``factor`` either.
    """
    if factor > 0 and dimension % factor == 0:
        return min(factor, dimension // factor), max(factor, dimension // factor)
    limit = math.isqrt(dimension) if factor <= 0 else min(math.isqrt(dimension), factor)
    m = max(d for d in range(1, limit + 1) if dimension % d == 0)
    return m, dimension // m


def lokr_layout(
    target: Target,
    rank: int,
    *,
    factor: int = -1,
    decompose_both: bool = False,
    full_matrix: bool = False,
    use_tucker: bool = False,
) -> dict[str, tuple[int, ...]]:
    """The saved parts (name -> shape) LyCORIS gives a LoKr module on ``target`` (``alpha`` aside)."""
    shape = target_weight_shape(target)
    kernel = shape[2:]
    a, b = factorization(shape[0], int(factor))
    c, d = factorization(shape[1], int(factor))
    parts: dict[str, tuple[int, ...]] = {}
    if decompose_both and rank < max(a, c) / 2 and not full_matrix:
        parts["lokr_w1_a"], parts["lokr_w1_b"] = (a, rank), (rank, c)
    else:
        parts["lokr_w1"] = (a, c)
    tucker = use_tucker and bool(kernel) and tuple(kernel) != (1, 1)
    if full_matrix or rank >= max(b, d) / 2:
        parts["lokr_w2"] = (b, d, *kernel)
    elif tucker:
        parts["lokr_t2"] = (rank, rank, *kernel)
        parts["lokr_w2_a"], parts["lokr_w2_b"] = (rank, b), (rank, d)
    else:
        parts["lokr_w2_a"], parts["lokr_w2_b"] = (b, rank), (rank, d * math.prod(kernel))
    return parts


class LoKrModule(NetworkModule):
    """delta W = w1 (x) w2 * scale * multiplier, in LyCORIS's layout (see the module's docstring)."""

    weight_keys = ()
    optional_keys = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

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
        factor: int = -1,
        decompose_both: bool = False,
        full_matrix: bool = False,
        use_tucker: bool = False,
        layout: Mapping[str, tuple[int, ...]] | None = None,
    ):
        """``layout`` (part -> shape, as a saved module has them) replaces the one the options give."""
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
        if layout is None:
            layout = lokr_layout(
                target,
                rank,
                factor=factor,
                decompose_both=decompose_both,
                full_matrix=full_matrix,
                use_tucker=use_tucker,
            )
        for name, shape in layout.items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape, device=device, dtype=dtype)))
        self.parts = tuple(layout)
        if "lokr_w1" in layout and "lokr_w2" in layout:  # no low-rank factor: LyCORIS's scale 1
            self.alpha.fill_(rank)
            self.scale = 1.0
        if self.alpha.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """LyCORIS's initialisation: the second factor starts at zero, so the product does."""
        with torch.no_grad():
            for name in self.parts:
                p = self.get_parameter(name)
                if name in ("lokr_w2", "lokr_w2_b"):
                    nn.init.zeros_(p)
                else:
                    nn.init.kaiming_uniform_(p, a=math.sqrt(5))

    @classmethod
    def detect(cls, parts) -> bool:
        """A first factor (``lokr_w1`` or both ``lokr_w1_a``/``_b``) and a second one, as the WebUI asks."""
        has_1 = "lokr_w1" in parts or {"lokr_w1_a", "lokr_w1_b"} <= set(parts)
        has_2 = "lokr_w2" in parts or {"lokr_w2_a", "lokr_w2_b"} <= set(parts)
        return has_1 and has_2

    @classmethod
    def rank_of(cls, parts: Mapping[str, torch.Tensor]) -> int:
        """The low-rank factors' rank (the WebUI's ``dim``); 1 for a module with none (scale 1 then)."""
        for name in ("lokr_w2_b", "lokr_w1_b"):
            if name in parts:
                return int(parts[name].shape[0])
        return 1

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
        options.setdefault("layout", {k: tuple(v.shape) for k, v in parts.items() if k != "alpha"})
        return super().from_weights(target, parts, device=device, dtype=dtype, **options)

    def _factor(self, prefix: str) -> torch.Tensor:
        """``lokr_w1`` or ``lokr_w2``, full, rebuilt from its low-rank pair, or through the Tucker core."""
        p = self.get_parameter
        if prefix in self.parts:
            return p(prefix)
        if prefix == "lokr_w2" and "lokr_t2" in self.parts:
            return tucker_weight(p("lokr_t2"), p("lokr_w2_a"), p("lokr_w2_b"))
        return p(f"{prefix}_a") @ p(f"{prefix}_b")

    def unscaled_weight(self) -> torch.Tensor:
        """w1 (x) w2, shaped like the target's weight (no scale, no multiplier)."""
        w1, w2 = self._factor("lokr_w1"), self._factor("lokr_w2")
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return torch.kron(w1, w2.contiguous()).reshape(self.shape)

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        return self.unscaled_weight() * (self.scale * self.multiplier)

    def delta(self, x: torch.Tensor, base_weight: torch.Tensor | None = None) -> torch.Tensor | None:
        if self.module_dropped():
            return None
        return apply_delta_weight(self, x, self.delta_weight(base_weight))


register_algorithm("lokr", LoKrModule)
