"""Training under the WebUI's --medvram, --medvram-sdxl and --lowvram: the trainer places the model.

What the WebUI does (``modules/lowvram.py``, v1.10.1): when a model loads and ``lowvram.is_needed``
(--lowvram, --medvram, or --medvram-sdxl with an SDXL model), ``setup_for_low_vram(sd_model,
use_medvram)`` sets ``sd_model.lowvram``, keeps the large parts in CPU memory (``first_stage_model``;
the text encoder: SDXL's ``conditioner``, SD2's ``cond_stage_model.model``, SD1's
``cond_stage_model.transformer``; the UNet: ``sd_model.model`` with medvram, each of the diffusion
model's ``time_embed``, input blocks, ``middle_block`` and output blocks with lowvram), moves the
rest to the GPU and registers a forward pre-hook on each of those parts that moves it (or its
parent) to the GPU and the part there before (``lowvram.module_in_gpu``) back to CPU memory; the
VAE's ``encode``/``decode`` are replaced by wrappers doing the same. One part is on the GPU at a time.

A run cannot train through those hooks (each forward would move parts back and forth, and a
backward pass needs its part where its forward ran), so :func:`taken_over` takes them off for the
run: the hooks and wrappers come off (each remembered at its place), every part goes to CPU
memory, and :meth:`LowVramPlacement.place` puts on the GPU the parts each phase of the run asks
for (``WebUIAdapter.place``). Previews use the WebUI's own processing, so
:meth:`LowVramPlacement.webui_placement` gives the WebUI its hooks back for them. At the end every
part is back in CPU memory, the part that was on the GPU is there again, and ``module_in_gpu``,
the hooks (in their order) and the wrappers are as they were, however the run ended.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from modules import devices, lowvram
from torch import nn

__all__ = ["LowVramPlacement", "is_lowvram", "taken_over"]

_WRAPPED_METHODS = ("encode", "decode")
"""The VAE methods ``setup_for_low_vram`` replaces on the instance."""


def is_lowvram(sd_model: Any) -> bool:
    """True when the WebUI set the model up for --medvram/--lowvram (``lowvram.is_enabled``)."""
    return bool(getattr(sd_model, "lowvram", False))


def _from_lowvram(fn: Any) -> bool:
    """A hook or wrapper ``setup_for_low_vram`` made: a function defined in the lowvram module."""
    return getattr(fn, "__globals__", None) is vars(lowvram)


class LowVramPlacement:
    """The parts of a --medvram/--lowvram model and where the run wants them (see the module doc)."""

    def __init__(self, sd_model: Any):
        self.sd_model = sd_model
        self.device = devices.device
        self.cpu = lowvram.cpu
        self._hooks: list[tuple[dict, list[Any], dict[Any, Any]]] = []  # (table, key order, lowvram's entries)
        self._wrappers: list[tuple[nn.Module, str, Any]] = []
        hooked = self._find_lowvram_changes()
        unet_modules = {id(m) for m in sd_model.model.modules()}
        unet_units = [m for m in hooked if id(m) in unet_modules] or [sd_model.model]
        text_root = sd_model.conditioner if hasattr(sd_model, "conditioner") else sd_model.cond_stage_model
        self.units: dict[str, list[nn.Module]] = {
            "vae": [sd_model.first_stage_model],
            "text_encoders": [text_root],
            "unet": unet_units,
        }
        self.placed: frozenset[str] = frozenset()
        self.hooks_off = False

    def _find_lowvram_changes(self) -> list[nn.Module]:
        """Record the lowvram hooks and wrappers on the model; return the modules with a hook."""
        hooked = []
        for module in self.sd_model.modules():
            table = module._forward_pre_hooks
            mine = {key: fn for key, fn in table.items() if _from_lowvram(fn)}
            if mine:
                self._hooks.append((table, list(table), mine))
                hooked.append(module)
            for name in _WRAPPED_METHODS:
                fn = module.__dict__.get(name)
                if fn is not None and _from_lowvram(fn):
                    self._wrappers.append((module, name, fn))
        return hooked

    # -- the WebUI's hooks

    def take_hooks_off(self) -> None:
        for table, _, mine in self._hooks:
            for key in mine:
                table.pop(key, None)
        for module, name, _ in self._wrappers:
            module.__dict__.pop(name, None)
        self.hooks_off = True

    def put_hooks_back(self) -> None:
        """Each hook at its place in its table (the same table object: hook handles hold it), each wrapper."""
        for table, order, mine in self._hooks:
            current = dict(table)
            table.clear()
            for key in order:
                if key in mine:
                    table[key] = mine[key]
                elif key in current:
                    table[key] = current.pop(key)
            table.update(current)  # hooks added meanwhile (the model guard takes those off)
        for module, name, fn in self._wrappers:
            module.__dict__[name] = fn
        self.hooks_off = False

    # -- placement

    def move(self, parts: frozenset[str], *, force: bool = False) -> None:
        """``parts`` on the device, the other parts in CPU memory (out first: the lower peak)."""
        for part, modules in self.units.items():
            if part not in parts and (force or part in self.placed):
                for module in modules:
                    module.to(self.cpu)
        for part in sorted(parts):
            if force or part not in self.placed:
                for module in self.units[part]:
                    module.to(self.device)
        self.placed = parts

    @contextlib.contextmanager
    def place(self, parts: frozenset[str]) -> Iterator[None]:
        """``parts`` on the device for the block, then the placement before it."""
        previous = self.placed
        self.move(frozenset(parts))
        try:
            yield
        finally:
            self.move(previous)

    @contextlib.contextmanager
    def webui_placement(self) -> Iterator[None]:
        """The WebUI's own placement and hooks for the block (a preview), then the run's again."""
        if not self.hooks_off:
            yield
            return
        placed = self.placed
        self.move(frozenset())
        lowvram.module_in_gpu = None  # every part in CPU memory: as the hooks expect to find them
        self.put_hooks_back()
        try:
            yield
        finally:
            try:
                lowvram.send_everything_to_cpu()
            finally:
                self.take_hooks_off()
                self.move(placed)


@contextlib.contextmanager
def taken_over(sd_model: Any) -> Iterator[LowVramPlacement]:
    """The run places the parts of a --medvram/--lowvram model; everything as before afterwards."""
    placement = LowVramPlacement(sd_model)
    in_gpu = lowvram.module_in_gpu
    placement.take_hooks_off()
    try:
        lowvram.send_everything_to_cpu()
        placement.move(frozenset(), force=True)
        yield placement
    finally:
        try:
            placement.move(frozenset(), force=True)
            if in_gpu is not None:
                in_gpu.to(placement.device)
        finally:
            lowvram.module_in_gpu = in_gpu
            placement.put_hooks_back()
