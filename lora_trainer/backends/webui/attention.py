"""The attention a run trains with: the fastest one that is correct under backward, for the run only.

The WebUI patches its attention classes' ``forward`` with the "Cross attention optimization" the
user picked for generation (``sd_hijack.current_optimizer``, one of ``sd_hijack.optimizers``).
Some are slow or memory-hungry under backward (the sliced "InvokeAI" the WebUI picks on a CPU,
"Doggettx", "sub-quadratic", "V1"), so for the length of a run :func:`use_training_attention`
applies xformers where it is listed and its backward works on the device, else torch's
scaled-dot-product attention ("sdp"), and puts the WebUI's choice back afterwards (done,
failure, cancel, out of memory). :meth:`TrainingAttention.webui_choice` puts the WebUI's own
choice back for a preview generated during the run. Weights are never touched: only which
function the attention classes call.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from typing import Any

import torch
from modules import sd_hijack

from lora_trainer.log import logger

__all__ = ["TRAINING_ATTENTION", "TrainingAttention", "planned_attention", "use_training_attention"]

TRAINING_ATTENTION = ("xformers", "sdp")
"""The WebUI optimisations a run trains with, best first (their ``name``)."""

_XFORMERS_WORKS: dict[tuple[str, str], bool] = {}


def xformers_backward_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether xformers' memory-efficient attention runs forward and backward on ``device`` in
    ``dtype`` (checked once per device and dtype on a tiny input)."""
    key = (str(device), str(dtype))
    if key not in _XFORMERS_WORKS:
        try:
            ops: Any = importlib.import_module("xformers.ops")
            q = torch.randn(1, 16, 1, 64, device=device, dtype=dtype, requires_grad=True)
            ops.memory_efficient_attention(q, q, q).float().sum().backward()
            works = q.grad is not None and bool(torch.isfinite(q.grad).all())
        except Exception as e:  # noqa: BLE001 - any failure means: train with sdp instead
            logger.info("xformers attention does not run under backward here (%s: %s)", type(e).__name__, e)
            works = False
        _XFORMERS_WORKS[key] = works
    return _XFORMERS_WORKS[key]


def _training_optimizer(device: torch.device, dtype: torch.dtype) -> Any:
    """The listed WebUI optimisation a run trains with, or None when none of them is listed."""
    listed = {getattr(o, "name", None): o for o in getattr(sd_hijack, "optimizers", None) or []}
    for name in TRAINING_ATTENTION:
        optimizer = listed.get(name)
        if optimizer is None or (name == "xformers" and not xformers_backward_works(device, dtype)):
            continue
        return optimizer
    return None


def planned_attention(device: torch.device, dtype: torch.dtype) -> str:
    """The name of the attention a run would train with (the WebUI's own when none is listed)."""
    optimizer = _training_optimizer(device, dtype)
    if optimizer is not None:
        return str(optimizer.name)
    return str(getattr(sd_hijack.model_hijack, "optimization_method", None) or "")


def _switch(old: Any, new: Any) -> None:
    """What ``sd_hijack.apply_optimizations`` does between two choices, without its other work."""
    if old is not None:
        old.undo()
    if new is not None:
        new.apply()
    sd_hijack.current_optimizer = new


class TrainingAttention:
    """The run's attention in place of the WebUI's (``webui``: None when it had none applied)."""

    def __init__(self, webui: Any, training: Any):
        self.webui, self.training = webui, training

    def restore(self) -> None:
        """Put the WebUI's choice back, unless a new one was applied during the run (a setting change)."""
        if sd_hijack.current_optimizer is self.training:
            _switch(self.training, self.webui)
            logger.info("attention for generation: %s again", getattr(self.webui, "name", "none"))

    @contextlib.contextmanager
    def webui_choice(self) -> Iterator[None]:
        """The WebUI's own attention for a generation inside the run (a preview), then the run's again."""
        if sd_hijack.current_optimizer is not self.training:
            yield
            return
        _switch(self.training, self.webui)
        try:
            yield
        finally:
            if sd_hijack.current_optimizer is self.webui:
                _switch(self.webui, self.training)


def use_training_attention(
    undo: contextlib.ExitStack, device: torch.device, dtype: torch.dtype
) -> TrainingAttention | None:
    """Apply the run's attention now and put the WebUI's back when ``undo`` closes; None when the
    WebUI's choice already is the run's or no listed optimisation is usable (then nothing changes)."""
    current = getattr(sd_hijack, "current_optimizer", None)
    training = _training_optimizer(device, dtype)
    if training is None:
        logger.warning("no scaled-dot-product or xformers attention in the WebUI: training with its own choice")
        return None
    if training is current:
        return None
    swap = TrainingAttention(current, training)
    _switch(current, training)
    undo.callback(swap.restore)
    logger.info(
        "attention for training: %s (the WebUI's %s is back after the run and for previews)",
        training.name,
        getattr(current, "name", "none"),
    )
    return swap
