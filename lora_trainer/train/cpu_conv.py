"""Wide convolutions on small feature maps, on the CPU: the direct (im2col + matrix product) kernel.

On the CPU, torch runs most convolutions with oneDNN ("mkldnn"), which re-lays out the weight on
every call, forward and backward. For a wide weight on a small feature map (an SD UNet's 1280- and
2560-channel 3x3 convolutions at 8x8 or 4x4, i.e. 256 to 512 px images) that re-layout costs more
than the product itself, and torch's own direct kernel (``thnn_conv2d``, what ``F.conv2d`` runs
when oneDNN is off) is about twice as fast, forward and backward. ``direct_small_convs(model)``
makes such convolutions take the direct kernel for the length of a run (training calls, with
autograd on), deciding per call from the input's size, and puts every ``forward`` back afterwards.
Values differ from oneDNN's only by float rounding (another summation order); larger feature maps,
other devices and other layers are untouched. Measured on a 2-core CPU (``bench/bench_webui_step.py``):
1280x2560 3x3 at 4x4, forward + input gradient, 88 ms with oneDNN, 22 ms direct; at 16x16 and up
oneDNN is faster.
"""

from __future__ import annotations

import contextlib
from typing import Any, TypeGuard

import torch
from torch import nn

from lora_trainer.train.guard import wrapped_forwards

SMALL_MAP = 64
"""Feature maps of at most this many pixels (8x8) take the direct kernel ..."""
WIDE_PATCH = 8192
"""... when a weight's patch (in_channels x kernel height x kernel width) has at least this many values."""

_thnn_conv2d: Any = getattr(getattr(torch._C, "_nn", None), "thnn_conv2d", None)


def takes_direct_kernel(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether ``conv`` on input ``x`` runs faster on torch's direct kernel than on oneDNN."""
    kh, kw = conv.kernel_size
    return (
        x.device.type == "cpu"
        and x.dim() == 4
        and x.dtype == torch.float32
        and x.shape[-2] * x.shape[-1] <= SMALL_MAP
        and conv.in_channels * kh * kw >= WIDE_PATCH
        and conv.groups == 1
        and conv.dilation == (1, 1)
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
    )


def direct_conv2d(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` on torch's direct kernel (differentiable, as ``F.conv2d`` with oneDNN off)."""
    return _thnn_conv2d(x, conv.weight, conv.kernel_size, conv.bias, conv.stride, conv.padding)


def _forward(conv: nn.Conv2d, previous):
    def forward(input: torch.Tensor, *args, **kwargs) -> torch.Tensor:  # nn.Conv2d.forward's parameter name
        # with autograd only: a preview or validation under no_grad runs as the host's generation does
        if not args and not kwargs and torch.is_grad_enabled() and takes_direct_kernel(conv, input):
            return direct_conv2d(conv, input)
        return previous(input, *args, **kwargs)

    return forward


def _wide_cpu_conv(m: nn.Module) -> TypeGuard[nn.Conv2d]:
    if not isinstance(m, nn.Conv2d) or m.weight.device.type != "cpu":
        return False
    kh, kw = m.kernel_size
    return m.in_channels * kh * kw >= WIDE_PATCH


def direct_small_convs(*models: nn.Module) -> contextlib.AbstractContextManager[int]:
    """For the ``with`` block, the Conv2d layers of ``models`` on the CPU with a wide weight run small
    inputs on the direct kernel (see the module's docstring); yields how many layers may do so."""
    convs = [m for model in models for m in model.modules() if _wide_cpu_conv(m)] if _thnn_conv2d is not None else []
    return wrapped_forwards(convs, _forward)
