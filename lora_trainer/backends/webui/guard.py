"""Leaving the WebUI's model as it was found: the guard around a training session.

Owns: finding the builtin Lora extension (``networks``, from ``extensions-builtin/Lora``) and
taking the ``<lora:...>`` networks a generation left applied off the model, the WebUI's way;
:func:`model_guard`, which freezes the model for a run and afterwards puts back every flag,
dtype, device, mode, hook and ``forward`` a run might disturb; and turning ldm/sgm's own block
checkpointing off for the run.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import torch
from modules import sd_hijack
from torch import nn

from lora_trainer.backends.webui.model import set_attr
from lora_trainer.log import logger, warning_once

__all__ = ["HOOK_DICTS", "lora_extension", "model_guard", "no_block_checkpointing", "take_networks_off"]

HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks_with_kwargs",
)
"""The hook tables of a torch module whose entries a run may add (and the guard takes out again)."""


def lora_extension() -> ModuleType | None:
    """The builtin Lora extension's ``networks`` module, or None when it is not loaded."""
    module = sys.modules.get("networks")
    if module is None:
        try:
            module = importlib.import_module("networks")
        except ImportError:
            module = None
    needed = ("loaded_networks", "load_networks", "load_network", "network_apply_weights", "list_available_networks")
    if module is None or not all(hasattr(module, name) for name in needed):
        warning_once("the WebUI's builtin Lora extension is not loaded: files are checked by our own loader only")
        return None
    return module


def take_networks_off(sd_model: nn.Module, purpose: str = "for training") -> int:
    """Take ``<lora:...>`` networks a generation left applied off the model, the WebUI's way.

    ``load_networks([])`` (what a generation without LoRAs does: empties ``loaded_networks`` and
    unregisters bundled embeddings), then ``network_apply_weights`` on each layer still holding
    merged deltas restores it from ``network_weights_backup``. Returns how many layers were restored.
    """
    networks = lora_extension()
    if networks is None:
        return 0
    active = [getattr(net, "name", "?") for net in networks.loaded_networks]
    if active:
        logger.info("taking active Lora network(s) off the model %s: %s", purpose, ", ".join(active))
    networks.load_networks([])
    restored = 0
    with torch.no_grad():
        for module in sd_model.modules():
            if getattr(module, "network_current_names", ()):
                networks.network_apply_weights(module)
                restored += 1
    return restored


class _ModelSnapshot:
    """What a run might disturb on a model, recorded before it, and :meth:`restore` to put it back."""

    def __init__(self, sd_model: nn.Module):
        modules = list(sd_model.modules())
        self.params = list(sd_model.parameters())
        self.flags = [(p, p.requires_grad, p.dtype, p.device) for p in self.params]
        self.buffers = [
            (m, name, b.dtype, b.device) for m in modules for name, b in m._buffers.items() if b is not None
        ]
        self.training = [(m, m.training) for m in modules]
        self.hooks = [(m, {name: set(getattr(m, name, {})) for name in HOOK_DICTS}) for m in modules]
        self.forwards = [(m, m.__dict__.get("forward")) for m in modules]
        self.class_forwards = {cls: cls.__dict__.get("forward") for cls in {type(m) for m in modules}}
        self.hijack = sd_hijack.model_hijack
        self.optimization = getattr(self.hijack, "optimization_method", None)

    def restore(self) -> None:
        self._restore_tensors()
        for m, flag in self.training:
            m.training = flag
        self._restore_hooks()
        self._restore_forwards()
        if getattr(self.hijack, "optimization_method", None) != self.optimization:
            self.hijack.optimization_method = self.optimization

    def _restore_tensors(self) -> None:
        for p, requires_grad, dtype, device in self.flags:
            if p.dtype != dtype or p.device != device:
                p.data = p.data.to(device=device, dtype=dtype)
            p.requires_grad_(requires_grad)
            p.grad = None
        for m, name, dtype, device in self.buffers:
            b = m._buffers.get(name)
            if b is not None and (b.dtype != dtype or b.device != device):
                m._buffers[name] = b.to(device=device, dtype=dtype)

    def _restore_hooks(self) -> None:
        for m, before in self.hooks:
            for name, keys in before.items():
                table: Any = getattr(m, name, None)
                for key in [k for k in (table or {}) if k not in keys]:
                    del table[key]

    def _restore_forwards(self) -> None:
        for m, forward in self.forwards:
            if m.__dict__.get("forward") is not forward:
                if forward is None:
                    m.__dict__.pop("forward", None)
                else:
                    m.forward = forward
        for cls, forward in self.class_forwards.items():
            if cls.__dict__.get("forward") is not forward and forward is not None:
                logger.warning("%s.forward changed during training; putting the original back", cls.__name__)
                cls.forward = forward


@contextlib.contextmanager
def model_guard(sd_model: nn.Module) -> Iterator[None]:
    """Freeze the whole model for a run, then put back what a run might disturb.

    Puts back: each parameter's ``requires_grad``, dtype and device (buffers too), every
    module's train/eval mode, hooks and instance ``forward`` overrides, the classes' ``forward``
    (where attention optimisations live) and ``sd_hijack.model_hijack.optimization_method``;
    drops every gradient on the model. Never copies or writes weights.
    """
    snapshot = _ModelSnapshot(sd_model)
    try:
        for p in snapshot.params:
            p.requires_grad_(False)
            p.grad = None
        yield
    finally:
        snapshot.restore()


def no_block_checkpointing(unet: nn.Module, undo: contextlib.ExitStack) -> None:
    """Turn ldm/sgm's own activation checkpointing off for the run.

    Blocks built with ``use_checkpoint`` run through their ``CheckpointFunction``, whose backward
    computes gradients for the block's inputs and own parameters only: a LoRA hooked inside gets
    none. The WebUI builds its models without it ("Do not use checkpoint for inference" in
    ``sd_models.py``); this makes sure. (Our ``gradient_checkpointing`` uses torch's own.)
    """
    for module in unet.modules():
        for name in ("use_checkpoint", "checkpoint"):
            if getattr(module, name, None) is True:
                set_attr(undo, module, name, False)
