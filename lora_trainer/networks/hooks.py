"""How a network module reaches its target's output without touching any base tensor.

* Linear / Conv2d targets: a forward hook (:func:`delta_hook`) adds the module's delta
  to the layer's output; the layer's own forward (and the WebUI's patched class
  forward) runs unchanged.
* Conv2d targets also get a pre-hook (:func:`contiguous_input_hook`) that hands the layer
  its input in the standard memory layout.
* ``nn.MultiheadAttention`` targets (OpenCLIP) use the fused ``in_proj_weight``
  inside ``F.multi_head_attention_forward``, which no hook can reach, so the instance
  gets its own forward (:func:`mha_forward`) while attached: q/k/v projections plus
  their deltas, then ``scaled_dot_product_attention`` and a call of ``out_proj`` as a
  module (whose own delta is an ordinary hook).

Every delta is asked for with the input and the base weight it adds to (the q/k/v
rows for a fused slice), so algorithms that scale by the base weight can.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lora_trainer.naming import Target
from lora_trainer.networks.base import NetworkModule


def target_device(t: Target) -> torch.device:
    """Where the target's weight lives (its network module is built there)."""
    weight = getattr(t.module, "in_proj_weight" if t.kind.startswith("mha_") else "weight")
    return weight.device


def delta_hook(module: NetworkModule):
    """A forward hook for a Linear/Conv2d target: output + the module's delta."""

    def hook(layer, args, output):
        delta = module.delta(args[0], layer.weight)
        return output if delta is None else output + delta

    return hook


def contiguous_input_hook(layer, args):
    """A forward pre-hook for a Conv2d target: its input in the standard (NCHW) memory layout.

    The WebUI's SpatialTransformer hands ``proj_out`` a permuted (channels-last strided)
    view; a conv on such an input returns channels-last output, and that layout then runs
    through the rest of the UNet, where every later conv copies its (large) weight to
    channels-last on each call, forward and backward. One copy of the activation here
    keeps the whole UNet in the standard layout (diffusers' transformer, as kohya trains
    it, makes the same copy). Values are unchanged.
    """
    x = args[0]
    if x.dim() == 4 and not x.is_contiguous():
        return (x.contiguous(), *args[1:])
    return None


def mha_forward(mha: nn.MultiheadAttention, parts: dict[str, NetworkModule]):
    """A forward for one fused ``nn.MultiheadAttention`` with q/k/v deltas (``parts``: "q"/"k"/"v" -> module).

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
        heads = mha.num_heads
        q, k, v = (
            h.unflatten(-1, (heads, mha.embed_dim // heads)).transpose(1, 2)
            for h in _projections(mha, parts, (query, key, value))
        )
        mask = _merge_masks(attn_mask, key_padding_mask, q.dtype, heads)
        dropout = mha.dropout if mha.training else 0.0
        if need_weights:
            out, weights = _attention_with_weights(q, k, v, mask, is_causal, dropout, mha.training)
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


def _projections(mha: nn.MultiheadAttention, parts: dict[str, NetworkModule], inputs) -> list[torch.Tensor]:
    """q, k, v: the fused in-projection rows plus each slice's delta."""
    w = mha.in_proj_weight.chunk(3)
    b = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)
    projected = []
    for i, (name, x) in enumerate(zip("qkv", inputs, strict=True)):
        y = F.linear(x, w[i], b[i])
        module = parts.get(name)
        delta = module.delta(x, w[i]) if module is not None else None
        projected.append(y if delta is None else y + delta)
    return projected


def _attention_with_weights(q, k, v, mask, is_causal: bool, dropout: float, training: bool):
    scores = q @ k.transpose(-2, -1) / (q.shape[-1] ** 0.5)
    if mask is not None:
        scores = scores + mask
    elif is_causal:
        causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(causal, float("-inf"))
    weights = F.dropout(scores.softmax(-1), dropout, training)
    return weights @ v, weights


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
