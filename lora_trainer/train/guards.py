"""Mixed precision and the non-finite guard of the training loop (the same on a CPU and a GPU).

Precision (:func:`precision_plan`), decided from the model's dtype and ``training.mixed_precision``:

* autocast: when the host holds the model in fp16 or bf16 (the WebUI's default), ``torch.autocast``
  to that dtype, whatever the setting says (autocasting to the other half type only adds casts, and
  on the CPU a norm holding one half type cannot take the other); on an fp32 model, autocast to the
  setting's dtype ("fp16"/"bf16"), none for "no". Autocast runs on the model's device type, the CPU
  included (torch's CPU autocast does fp16 and bf16).
* loss scaling: a ``torch.amp.GradScaler`` on the model's device type whenever fp16 is involved, fp16
  weights or fp16 autocast, as fp16's narrow range lets small gradients underflow; none for bf16
  (fp32's range) or fp32.
* the LoRA weights, their gradients and the optimizer state are float32 whatever the model's dtype
  (the network is built in float32; its modules cast their input and output).

Non-finite guard (:class:`StepGuard`): nothing NaN or inf reaches the LoRA weights.

* A step whose loss is NaN/inf is skipped (no backward, no optimizer or scheduler step): counted.
* Without a scaler, a step whose gradients are NaN/inf is skipped: counted.
* With a scaler, NaN/inf gradients are the scaler's normal business: it skips the optimizer step and
  halves the scale (the loop skips the scheduler step too, as accelerate does). Counted as skipped;
  such a skip counts towards the limit below only once the scale has fallen below
  :data:`SCALE_FLOOR` (1.0, i.e. the gradients overflow fp16 even unscaled), so the scale's normal
  settling from its initial 65536 never stops a run.
* A skipped step still counts as a step of the run (progress, schedule of saves and previews).
* :data:`MAX_BAD_STEPS_IN_A_ROW` counted skips in a row stop the run with :class:`NonFiniteError`:
  nothing more is written by that run (files saved earlier hold finite weights).
* A run whose every step was skipped trained nothing: it ends with :class:`NonFiniteError` rather
  than write a LoRA that changes nothing (on an fp16 model the loss scale may need more steps than a
  short run has to settle).
* ``save_lora`` refuses a state dict holding NaN/inf (:class:`NonFiniteError`), so no file is ever
  written with non-finite weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from lora_trainer.errors import NonFiniteError
from lora_trainer.log import logger

MAX_BAD_STEPS_IN_A_ROW = 5
SCALE_FLOOR = 1.0
LOSS_SKIP = "a NaN/inf loss"  # the reason StepGuard.skip is given for a non-finite loss

_HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}
_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class Precision:
    """How a run computes: ``autocast`` dtype (None: off), whether a GradScaler scales the loss, and
    ``name`` ("no", "fp16", "bf16"), the mixed precision in effect (for metadata)."""

    autocast: torch.dtype | None
    scaler: bool
    name: str

    def autocast_context(self, device_type: str):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.autocast)

    def make_scaler(self, device_type: str) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler(device_type) if self.scaler else None


def precision_plan(model_dtype: torch.dtype, mixed_precision: str) -> Precision:
    """The precision rule above, for a model held in ``model_dtype`` and the ``mixed_precision`` setting."""
    autocast = model_dtype if model_dtype in _NAMES else _HALF.get(mixed_precision)
    if model_dtype in _NAMES and mixed_precision in _HALF and _HALF[mixed_precision] != model_dtype:
        held = _NAMES[model_dtype]
        logger.info("The model is held in %s: mixed precision runs in %s, not %s", held, held, mixed_precision)
    scaler = torch.float16 in (model_dtype, autocast)
    return Precision(autocast, scaler, _NAMES[autocast] if autocast is not None else "no")


def grads_finite(params: Iterable[torch.Tensor]) -> bool:
    """True when every gradient of ``params`` is finite (parameters without one are ignored)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    return bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))


def nonfinite_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating tensors of ``state`` holding NaN or inf."""
    return [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


class StepGuard:
    """Counts skipped steps and stops the run after too many counted skips in a row (see the module doc)."""

    def __init__(self, limit: int = MAX_BAD_STEPS_IN_A_ROW):
        self.limit = limit
        self.skipped = 0  # every skipped step, scaler skips included
        self.in_a_row = 0  # counted skips since the last good step
        self.loss_skips = 0  # skips for a non-finite loss (this session of the run)

    def ok(self) -> None:
        """An optimizer step was taken."""
        self.in_a_row = 0

    def require_progress(self, steps: int) -> None:
        """Raise NonFiniteError when all ``steps`` steps of the run were skipped (nothing was trained)."""
        if not steps or self.skipped < steps:
            return
        if self.loss_skips >= steps:  # the loss itself, not an fp16 gradient overflow
            raise NonFiniteError(
                f"Nothing was trained: the loss was NaN/inf at all {steps} steps, so no LoRA file was written. "
                "The model gives non-finite outputs for these images or captions: check that txt2img works "
                "with this checkpoint and VAE, and with weighted_captions on, try the WebUI's emphasis "
                'option "No norm" or captions without emphasis weights.'
            )
        raise NonFiniteError(
            f"Nothing was trained: all {steps} steps were skipped for NaN/inf losses or gradients, so no "
            "LoRA file was written. On an fp16 model the loss scale needs some steps to settle: train "
            "more steps, or use bf16 where the GPU has it, or the WebUI's --no-half (fp32)."
        )

    def skip(self, step: int, what: str, *, counts: bool = True) -> None:
        """Step ``step`` was skipped because of ``what``; raises NonFiniteError at the limit."""
        self.skipped += 1
        if what == LOSS_SKIP:
            self.loss_skips += 1
        if counts:
            self.in_a_row += 1
        logger.warning("Step %d skipped: %s (%d skipped so far)", step, what, self.skipped)
        if self.in_a_row >= self.limit:
            raise NonFiniteError(
                f"Training stopped at step {step}: {self.in_a_row} steps in a row were skipped for NaN/inf "
                f"values (last: {what}); the final LoRA file was not written. Lower the learning rate, set a "
                "max grad norm, or use bf16 where the GPU has it (an fp16 model overflows more easily; the "
                "WebUI's --no-half keeps it in fp32)."
            )
