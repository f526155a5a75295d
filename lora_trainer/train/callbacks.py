"""What the training loop tells its caller, and how the caller stops it.

The loop emits a :class:`StepInfo` to ``Callbacks.on_step`` after every optimizer
step and polls ``Callbacks.should_stop()`` before every batch. Hosts subclass
:class:`Callbacks` (the WebUI job maps them onto ``shared.state``); every method has
a no-op default.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class StepInfo:
    step: int  # optimizer steps done
    total_steps: int
    epoch: int  # 1-based
    total_epochs: int
    loss: float | None  # this step's loss (mean over its micro-batches); None when it was NaN/inf (skipped)
    avg_loss: float | None  # mean of the last few finite losses; None before the first
    lrs: dict[str, float]  # learning rate per parameter group ("unet", "text_encoder")
    steps_per_s: float
    eta_s: float
    elapsed_s: float
    skipped_steps: int = 0  # steps skipped so far for NaN/inf loss or gradients (lora_trainer.train.guards)


@dataclass
class TrainResult:
    output_path: Path | None  # the final LoRA file (None if stopped before the first step)
    steps: int
    epochs: int
    stopped_early: bool
    state_dir: Path | None  # resume state, if written
    losses: list[float | None] = field(default_factory=list)  # loss of every step (None: NaN/inf, skipped)
    saved: list[Path] = field(default_factory=list)  # every LoRA file written, in order
    seed: int = 0
    skipped_steps: int = 0  # steps skipped for NaN/inf loss or gradients (their losses are in ``losses``)
    upcast_latents: int = 0  # images the VAE gave NaN/inf for, encoded again in float32
    val_losses: list[dict] = field(default_factory=list)  # {"step", "epoch", "loss"} per validation (train.validation)


class Callbacks:
    def on_status(self, text: str) -> None:
        """A phase change ("Caching latents 3/20", "Saving ...")."""

    def on_start(self, total_steps: int, total_epochs: int) -> None:
        pass

    def on_step(self, info: StepInfo) -> None:
        pass

    def should_stop(self) -> bool:
        return False

    def on_save(self, path: Path, final: bool) -> None:
        pass

    def on_sample(self, step: int, epoch: int) -> None:
        """Time for sample images: the network is attached, in eval mode, with no autograd."""

    def on_validation(self, step: int, epoch: int, loss: float) -> None:
        """A validation loss was measured (``lora_trainer.train.validation``) after ``step`` steps."""


class ProgressMeter:
    """Steps per second over a sliding window, and the ETA derived from it."""

    def __init__(self, total_steps: int, window: int = 20):
        self.total_steps = total_steps
        self.start = time.perf_counter()
        self.times: deque[float] = deque(maxlen=window + 1)
        self.losses: deque[float] = deque(maxlen=window)
        self.times.append(self.start)

    def update(
        self, step: int, epoch: int, total_epochs: int, loss: float, lrs: dict[str, float], skipped: int = 0
    ) -> StepInfo:
        """The StepInfo of ``step``; a NaN/inf ``loss`` (a skipped step) is left out of the average and
        reported as None, so progress never shows a non-finite (or made-up) number."""
        now = time.perf_counter()
        self.times.append(now)
        if math.isfinite(loss):
            self.losses.append(loss)
        avg = sum(self.losses) / len(self.losses) if self.losses else None
        span = self.times[-1] - self.times[0]
        rate = (len(self.times) - 1) / span if span > 0 else 0.0
        remaining = max(self.total_steps - step, 0)
        return StepInfo(
            step=step,
            total_steps=self.total_steps,
            epoch=epoch,
            total_epochs=total_epochs,
            loss=loss if math.isfinite(loss) else None,
            avg_loss=avg,
            lrs=lrs,
            steps_per_s=rate,
            eta_s=remaining / rate if rate > 0 else float("inf"),
            elapsed_s=now - self.start,
            skipped_steps=skipped,
        )
