"""Out of memory as an answer: which phase ran out, memory let go, what was trained kept.

The training loop marks its phases with :func:`oom_phase` ("latent caching", "a step", "a preview",
"saving"): torch's OutOfMemoryError inside one becomes :class:`~lora_trainer.errors.OutOfMemory`
naming the phase. :func:`keep_what_was_trained` then lets go of the memory the failed call held
(its frames, through the traceback; then ``gc`` and ``torch.cuda.empty_cache``) and, when steps
were done, saves the LoRA and the resume state the way a stop does, so the run can be resumed or
its file used. The job (``lora_trainer.jobs``) adds the advice from the memory plan.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lora_trainer.errors import OutOfMemory
from lora_trainer.log import logger
from lora_trainer.train.device import is_out_of_memory, release_memory


@contextlib.contextmanager
def oom_phase(phase: str) -> Iterator[None]:
    """Turn torch's out-of-memory error inside the block into OutOfMemory(phase); others pass through."""
    try:
        yield
    except OutOfMemory:
        raise
    except Exception as e:
        if is_out_of_memory(e):
            raise OutOfMemory(phase, "") from e
        raise


def keep_what_was_trained(error: OutOfMemory, steps: int, save: Callable[[], Path | None]) -> OutOfMemory:
    """Release memory, then (after ``steps`` > 0) ``save()`` the partial LoRA and state; returns ``error``
    with ``saved`` set. A save that runs out of memory again leaves nothing written (the file is atomic)."""
    release_memory(error)
    if steps <= 0:
        return error
    try:
        path = save()
    except Exception as e:  # noqa: BLE001 - the run already failed; saving is a best effort, said in the log
        logger.warning("could not save what was trained before running out of memory: %s", e)
        release_memory(e)
        return error
    error.saved = str(path) if path is not None else None
    return error


def train_steps(run: Any, result: Any) -> None:
    """``run._loop(result)`` (the training loop's steps), its out-of-memory errors answered: the error
    names the phase ("a step" unless a preview or a save ran out), and what was trained is saved."""
    try:
        with oom_phase("a step"):
            run._loop(result)
    except OutOfMemory as e:
        raise keep_what_was_trained(e, run.step, lambda: _save_partial(run, result)) from None


def _save_partial(run: Any, result: Any) -> Path:
    """What a stopped run saves: the LoRA so far (its metadata says stopped early) and the resume state."""
    result.stopped_early = True
    run._zero_grad()
    result.steps, result.epochs = run.step, min(run.position[0], run.total_epochs)
    result.output_path = run._save(result, run.cfg.save.output_name, result.epochs, final=True)
    result.state_dir = run._save_state(result)
    return result.output_path
