"""The captioners the Dataset workshop offers: one :class:`CaptionerSpec` per dropdown choice.

A spec builds its captioner only when a caption run starts, so nothing loads (no model, no
onnxruntime, not even the WebUI backend) before it is used.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lora_trainer.workshop import CaptionerUnavailable, WD14Captioner
from lora_trainer.workshop.captioning import Captioner

__all__ = ["CaptionerSpec", "default_captioners", "wd14_spec"]


@dataclass(frozen=True)
class CaptionerSpec:
    """One choice of the captioner dropdown. ``make(threshold)`` builds the captioner when a run
    starts (so nothing loads before it is used) and may raise ``CaptionerUnavailable``.
    ``threshold``: the default score threshold, None for free-text captioners (BLIP)."""

    make: Callable[[float], Captioner]
    threshold: float | None = 0.35
    note: str = ""


def wd14_spec(model_dir: str | os.PathLike | None, *, allow_download: bool = True) -> CaptionerSpec:
    """WD14 (the core's ONNX tagger) with its model in ``model_dir`` (downloaded there if missing)."""

    def make(threshold: float) -> Captioner:
        if importlib.util.find_spec("onnxruntime") is None:  # say so before downloading a model
            raise CaptionerUnavailable(
                "The WD14 tagger needs onnxruntime: pip install onnxruntime (or onnxruntime-gpu for CUDA) "
                "in the WebUI's Python environment, then restart the WebUI. DeepBooru and BLIP work without it."
            )
        return WD14Captioner(model_dir=model_dir, general_threshold=threshold, allow_download=allow_download)

    model = "downloaded on first use" if allow_download else f"model files in {model_dir}"
    return CaptionerSpec(make, 0.35, f"SmilingWolf's WD14 tagger (needs onnxruntime; {model}).")


def default_captioners(
    backend: Callable[[], Any], wd14_dir: str | os.PathLike | None = None
) -> dict[str, CaptionerSpec]:
    """DeepBooru and BLIP from the WebUI (``backend()`` returns ``lora_trainer.backends.webui``,
    imported only when a run starts) and WD14."""
    return {
        "DeepBooru": CaptionerSpec(
            lambda t: backend().DeepBooruCaptioner(threshold=t), 0.5, "The WebUI's DeepBooru tagger (anime tags)."
        ),
        "BLIP": CaptionerSpec(lambda t: backend().BlipCaptioner(), None, "The WebUI's BLIP: one sentence per image."),
        "WD14": wd14_spec(wd14_dir),
    }
