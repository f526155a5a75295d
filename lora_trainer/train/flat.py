"""One contiguous buffer per parameter group, for elementwise optimizers.

A LoRA network has hundreds of small tensors; an optimizer step and a gradient-norm
over them costs more in per-tensor overhead than in arithmetic. ``flatten(params)``
moves the tensors' data into one buffer (each parameter becomes a view of it) and
binds each ``.grad`` to a view of one gradient buffer, so autograd accumulates into it
in place. The optimizer then sees one parameter per group. Only for optimizers whose
update is elementwise (AdamW, Lion, Prodigy): Adafactor factors matrices, and a flat
vector would change its maths.
"""

from __future__ import annotations

import torch
from torch import nn

ELEMENTWISE_OPTIMIZERS = ("adamw", "lion", "prodigy")


def flatten(params: list[nn.Parameter]) -> nn.Parameter:
    """A flat parameter whose storage backs every tensor of ``params`` (and whose grad backs their grads)."""
    first = params[0]
    total = sum(p.numel() for p in params)
    data = torch.empty(total, dtype=first.dtype, device=first.device)
    grad = torch.zeros(total, dtype=first.dtype, device=first.device)
    offset = 0
    for p in params:
        n = p.numel()
        data[offset : offset + n].copy_(p.detach().reshape(-1))
        p.data = data[offset : offset + n].view_as(p)
        p.grad = grad[offset : offset + n].view_as(p)
        offset += n
    flat = nn.Parameter(data)
    flat.grad = grad
    return flat


def zero_flat_grads(flats: list[nn.Parameter]) -> None:
    """Zero in place: the small parameters' grads are views that must stay bound."""
    for flat in flats:
        if flat.grad is not None:
            flat.grad.zero_()
