"""What every network algorithm's module shares: the ``NetworkModule`` base class.

A ``NetworkModule`` is one algorithm's trainable part for one target layer (a Linear, a
Conv2d, or one q/k/v slice of a fused ``nn.MultiheadAttention``, see
``lora_trainer.naming.Target``). It never holds or writes the base layer: the network
(``network.py``) attaches it with a hook and passes the input, plus the base weight for
algorithms that need it. The base class owns what the algorithms share:

* ``alpha`` (a buffer, saved as kohya's ``<key>.alpha``) and ``scale = alpha / rank``
  (kohya: alpha None or 0 means alpha = rank), the ``multiplier``;
* the dropout settings and module dropout (skip the whole module for a step);
* which saved parts belong to it (``weight_keys``, ``optional_keys``, ``shared_keys``),
  detection from a saved module's parts, and construction from saved weights;
* a default ``delta`` that applies ``delta_weight`` to the input as the base layer would
  (linear, or conv with the target's stride and padding), for algorithms that only
  know their merged weight (as the WebUI applies LoHa/LoKr: ``calc_updown``).

An algorithm subclasses it, names its tensor parts, implements ``rank_of`` and
``delta_weight`` (and ``delta`` where a faster form exists), and registers itself with
``lora_trainer.networks.registry.register_algorithm``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lora_trainer.naming import Target


class NetworkModule(nn.Module):
    """One algorithm's module on one target: alpha/scale/multiplier, dropouts, saved-part layout."""

    algorithm: ClassVar[str] = ""
    """The registered name (set by ``register_algorithm``)."""
    weight_keys: ClassVar[tuple[str, ...]] = ()
    """Parts every saved module of this algorithm has (detection needs all of them)."""
    optional_keys: ClassVar[tuple[str, ...]] = ()
    """Parts a saved module of this algorithm may also have."""
    shared_keys: ClassVar[tuple[str, ...]] = ("alpha",)
    """Parts any algorithm may carry."""

    alpha: torch.Tensor

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
        self.stride = target.stride
        self.padding = target.padding
        alpha = float(rank) if not alpha else float(alpha)  # kohya: None or 0 means alpha = rank
        self.register_buffer("alpha", torch.tensor(alpha, device=device, dtype=dtype))
        self.scale = alpha / rank
        self.multiplier = 1.0
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout

    @property
    def is_conv(self) -> bool:
        return self.kind.startswith("conv")

    # -- saved layout

    @classmethod
    def detect(cls, parts: Collection[str]) -> bool:
        """Whether a saved module with these parts is of this algorithm (all ``weight_keys`` present)."""
        return bool(cls.weight_keys) and all(k in parts for k in cls.weight_keys)

    @classmethod
    def unknown_parts(cls, parts: Collection[str]) -> list[str]:
        """The parts this algorithm does not know (a file it would load only partly)."""
        known = {*cls.weight_keys, *cls.optional_keys, *cls.shared_keys}
        return sorted(p for p in parts if p not in known)

    @classmethod
    def rank_of(cls, parts: Mapping[str, torch.Tensor]) -> int:
        """The rank (kohya's dim) of a saved module."""
        raise NotImplementedError(f"{cls.__qualname__} does not say how to read its rank")

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
        """A module for ``target`` holding a saved module's tensors (cast to ``dtype``).

        Rank and alpha are read from the parts, as kohya's ``create_network_from_weights``
        does; a tensor whose shape does not fit the target raises ``RuntimeError``.
        """
        alpha = parts.get("alpha")
        module = cls(
            target,
            cls.rank_of(parts),
            None if alpha is None else float(alpha),
            device=device,
            dtype=dtype,
            **options,
        )
        state = {k: v for k, v in parts.items() if k != "alpha"}
        module.load_state_dict({**state, "alpha": module.alpha}, strict=True)
        return module

    # -- maths

    def module_dropped(self) -> bool:
        """True when module dropout skips this module for this call (training only)."""
        return bool(self.training and self.module_dropout and torch.rand(()) < self.module_dropout)

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """The merged weight delta, shaped like the target's weight, scale and multiplier applied.

        ``base_weight`` is the target's weight (the q/k/v rows for a fused attention slice),
        for algorithms whose delta depends on it; no dropout.
        """
        raise NotImplementedError(f"{type(self).__qualname__} has no delta_weight")

    def delta(self, x: torch.Tensor, base_weight: torch.Tensor | None = None) -> torch.Tensor | None:
        """The module's contribution to the target's output for input ``x``, in ``x``'s dtype.

        None when module dropout skips it. This default applies ``delta_weight`` as the base
        layer would (no bias); algorithms with a cheaper form override it.
        """
        if self.module_dropped():
            return None
        w = self.delta_weight(base_weight)
        h = x.to(w.dtype)
        out = F.conv2d(h, w, None, self.stride, self.padding) if self.is_conv else F.linear(h, w)
        return out.to(x.dtype)
