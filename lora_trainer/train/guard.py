"""Leave the host's model exactly as it was found.

``frozen_base(*modules)`` freezes every base parameter for training and, whatever
happens inside (finish, cancel, exception, out-of-memory), puts back each
parameter's ``requires_grad``, each module's train/eval mode and drops any
gradient the run left on base parameters. It never copies or writes weights: the
trainer only adds hooks, which the network removes itself.

``checkpointed(blocks)`` runs the given blocks under non-reentrant activation
checkpointing (works with LoRA hooks and any parameter, unlike ldm's own
``checkpoint``) and restores their ``forward`` afterwards.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable
from typing import TypeVar

import torch.utils.checkpoint
from torch import nn

from lora_trainer.naming import is_diffusers_unet

M = TypeVar("M", bound=nn.Module)


@contextlib.contextmanager
def frozen_base(*modules: nn.Module):
    params = {id(p): p for m in modules for p in m.parameters()}.values()
    requires_grad = [(p, p.requires_grad, p.grad) for p in params]
    training = [(m, m.training) for root in modules for m in root.modules()]
    try:
        for p in params:
            p.requires_grad_(False)
        for root in modules:
            root.eval()
        yield
    finally:
        for p, flag, grad in requires_grad:
            p.requires_grad_(flag)
            p.grad = grad
        for m, flag in training:
            m.training = flag


@contextlib.contextmanager
def wrapped_forwards(modules: Iterable[M], wrap: Callable[[M, Callable], Callable]):
    """For the block, each module's ``forward`` is ``wrap(module, its forward)``; afterwards each is as
    it was (an instance ``forward`` set before is kept, else the class's applies again). Yields how many."""
    patched = []
    try:
        for module in modules:
            previous = module.__dict__.get("forward")
            module.forward = wrap(module, module.forward)
            patched.append((module, previous))
        yield len(patched)
    finally:
        for module, previous in patched:
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous


def checkpointed(blocks: Iterable[nn.Module]) -> contextlib.AbstractContextManager:
    return wrapped_forwards(blocks, lambda _block, forward: _checkpointed_forward(forward))


def _checkpointed_forward(forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def unet_blocks(unet: nn.Module) -> list[nn.Module]:
    """The units activation checkpointing works on: an ldm/sgm UNet's top-level blocks, a diffusers
    UNet's res blocks and attention transformers (each about half of an ldm top-level block)."""
    if is_diffusers_unet(unet):
        return [m for m in unet.modules() if type(m).__name__ in ("ResnetBlock2D", "Transformer2DModel")]
    blocks = []
    for name in ("input_blocks", "output_blocks"):
        blocks.extend(getattr(unet, name, []))
    middle = getattr(unet, "middle_block", None)
    if middle is not None:
        blocks.append(middle)
    return blocks
