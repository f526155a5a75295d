"""A LoRA network over a model's targets, attached without touching any base tensor.

``LoRANetwork`` is an ``nn.Module`` whose children are named by kohya key, so its
``state_dict()`` is exactly what kohya saves. ``network.applied()`` attaches it and
always detaches it on exit:

* Linear / Conv2d targets get a forward hook that adds the module's delta to the
  layer's output; the layer's own forward (and the WebUI's patched class forward)
  runs unchanged.
* ``nn.MultiheadAttention`` targets (OpenCLIP) use the fused ``in_proj_weight``
  inside ``F.multi_head_attention_forward``, which no hook can reach, so the instance
  gets its own ``forward`` for the duration: q/k/v projections plus their LoRA deltas,
  then ``scaled_dot_product_attention`` and a call of ``out_proj`` as a module (whose
  LoRA is an ordinary hook).

Base weights are never written, so removal leaves every base tensor bit-identical.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..naming import Target, find_targets
from .lora import LoRAModule


class LoRANetwork(nn.Module):
    def __init__(
        self,
        targets: list[Target],
        *,
        rank: int,
        alpha: float | None,
        conv_rank: int = 0,
        conv_alpha: float | None = None,
        dropout: float = 0.0,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.targets: dict[str, Target] = {}
        for t in targets:
            r, a = (conv_rank, conv_alpha) if t.uses_conv_dim else (rank, alpha)
            if r <= 0:
                continue
            device = _target_device(t)
            module = LoRAModule(
                t,
                r,
                a,
                dropout=dropout,
                rank_dropout=rank_dropout,
                module_dropout=module_dropout,
                device=device,
                dtype=dtype,
            )
            self.add_module(t.key, module)
            self.targets[t.key] = t
        self._handles: list = []
        self._mha_forwards: dict[nn.MultiheadAttention, object] = {}

    def loras(self, group: str | None = None) -> Iterator[LoRAModule]:
        """The LoRA modules, optionally of one group ("unet", "te", "te1", "te2")."""
        for key, module in self.named_children():
            if group is None or self.targets[key].group == group:
                yield module

    def parameters_of(self, groups: tuple[str, ...]) -> list[nn.Parameter]:
        return [p for m in self.loras() if self.targets[m.key].group in groups for p in m.parameters()]

    def set_multiplier(self, multiplier: float) -> None:
        for m in self.loras():
            m.multiplier = multiplier

    @property
    def is_applied(self) -> bool:
        return bool(self._handles or self._mha_forwards)

    def apply_to_model(self) -> None:
        if self.is_applied:
            raise RuntimeError("LoRA network is already applied")
        mha_parts: dict[nn.MultiheadAttention, dict[str, LoRAModule]] = defaultdict(dict)
        try:
            for key, lora in self.named_children():
                target = self.targets[key]
                if target.kind.startswith("mha_"):
                    mha_parts[target.module][target.kind[-1]] = lora
                else:
                    self._handles.append(target.module.register_forward_hook(_delta_hook(lora)))
            for mha, parts in mha_parts.items():
                self._mha_forwards[mha] = mha.__dict__.get("forward")
                mha.forward = _mha_forward(mha, parts)
        except BaseException:
            self.remove_from_model()
            raise

    def remove_from_model(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for mha, previous in self._mha_forwards.items():
            if previous is None:
                mha.__dict__.pop("forward", None)
            else:
                mha.forward = previous
        self._mha_forwards.clear()

    @contextlib.contextmanager
    def applied(self):
        """Attach for the duration of the block; detached again whatever happens."""
        self.apply_to_model()
        try:
            yield self
        finally:
            self.remove_from_model()


def _target_device(t: Target) -> torch.device:
    weight = t.module.in_proj_weight if t.kind.startswith("mha_") else t.module.weight
    return weight.device


def _delta_hook(lora: LoRAModule):
    def hook(module, args, output):
        delta = lora.delta(args[0])
        return output if delta is None else output + delta

    return hook


def _mha_forward(mha: nn.MultiheadAttention, parts: dict[str, LoRAModule]):
    """A forward for one fused ``nn.MultiheadAttention`` with q/k/v LoRA deltas.

    Same signature and results as ``nn.MultiheadAttention.forward`` (up to float
    rounding); attention weights are returned only when asked for.
    """

    def forward(
        query,
        key,
        value,
        key_padding_mask=None,
        need_weights=True,
        attn_mask=None,
        average_attn_weights=True,
        is_causal=False,
    ):
        if not mha.batch_first:  # (L, N, E) -> (N, L, E)
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        e, heads = mha.embed_dim, mha.num_heads
        w = mha.in_proj_weight.chunk(3)
        b = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)
        projected = []
        for i, (name, x) in enumerate((("q", query), ("k", key), ("v", value))):
            y = F.linear(x, w[i], b[i])
            lora = parts.get(name)
            delta = lora.delta(x) if lora is not None else None
            projected.append((y if delta is None else y + delta).unflatten(-1, (heads, e // heads)).transpose(1, 2))
        q, k, v = projected
        mask = _merge_masks(attn_mask, key_padding_mask, q.dtype, heads)
        dropout = mha.dropout if mha.training else 0.0
        if need_weights:
            scores = q @ k.transpose(-2, -1) / (q.shape[-1] ** 0.5)
            if mask is not None:
                scores = scores + mask
            elif is_causal:
                causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu(1)
                scores = scores.masked_fill(causal, float("-inf"))
            weights = F.dropout(scores.softmax(-1), dropout, mha.training)
            out = weights @ v
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal and mask is None
            )
            weights = None
        out = mha.out_proj(out.transpose(1, 2).flatten(2))
        if not mha.batch_first:
            out = out.transpose(0, 1)
        if weights is not None and average_attn_weights:
            weights = weights.mean(1)
        return out, weights

    return forward


def _merge_masks(attn_mask, key_padding_mask, dtype, heads: int) -> torch.Tensor | None:
    """MHA masks (bool True = blocked, or additive float) as one additive float mask."""

    def additive(mask):
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
        return mask.to(dtype)

    mask = None
    if attn_mask is not None:
        mask = additive(attn_mask)
        if mask.dim() == 3:  # (N*heads, L, S) -> (N, heads, L, S)
            mask = mask.view(-1, heads, *mask.shape[1:])
    if key_padding_mask is not None:
        pad = additive(key_padding_mask)[:, None, None, :]
        mask = pad if mask is None else mask + pad
    return mask


def network_from_weights(
    state_dict: dict[str, torch.Tensor],
    family: str,
    unet: nn.Module | None,
    text_encoders: dict[str, nn.Module] | None,
) -> tuple[LoRANetwork, list[str]]:
    """A network for the modules a kohya LoRA file names, loaded with its weights (fp32).

    Returns the network and the keys of the file that match no module of the model;
    rank and alpha are read per module, as kohya's ``create_network_from_weights`` does.
    """
    modules = {}
    for key, value in state_dict.items():
        name, _, part = key.partition(".")
        modules.setdefault(name, {})[part] = value
    targets = {t.key: t for t in find_targets(family, unet, text_encoders, conv=True)}
    network = LoRANetwork([], rank=1, alpha=None)
    unplaced = []
    for name, parts in modules.items():
        target = targets.get(name)
        down = parts.get("lora_down.weight")
        if target is None or down is None or "lora_up.weight" not in parts:
            unplaced.append(name)
            continue
        alpha = parts.get("alpha")
        lora = LoRAModule(target, down.shape[0], None if alpha is None else float(alpha), device=_target_device(target))
        lora.lora_down.weight.data.copy_(down)
        lora.lora_up.weight.data.copy_(parts["lora_up.weight"])
        network.add_module(name, lora)
        network.targets[name] = target
    return network, sorted(unplaced)
