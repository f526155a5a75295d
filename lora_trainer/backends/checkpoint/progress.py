"""What the ``train`` command shows while it trains: a progress bar, status lines, a log file, Ctrl-C.

:class:`TerminalCallbacks` is the loop's :class:`~lora_trainer.train.callbacks.Callbacks` for a
terminal: a tqdm bar (step/total, loss, it/s, ETA) with status lines ("Caching latents ...") printed
above it, and the same lines appended to a log file. Only the main process of a several-process run
shows a bar and writes the log (``main=False`` keeps the others quiet). :class:`StopOnInterrupt`
turns the first Ctrl-C into a stop (the loop then saves what it trained and its resume state) and the
second into an abort.
"""

from __future__ import annotations

import logging
import re
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import IO, Any

from lora_trainer.log import logger
from lora_trainer.train.callbacks import Callbacks, StepInfo

_COUNTED = re.compile(r"^(.*?)\s*(\d+)/(\d+)$")


def _format_step(info: StepInfo) -> str:
    loss = "skipped (NaN/inf)" if info.loss is None else f"{info.loss:.4f}"
    avg = "" if info.avg_loss is None else f" avg {info.avg_loss:.4f}"
    lrs = " ".join(f"lr_{name} {lr:.3g}" for name, lr in info.lrs.items())
    return (
        f"step {info.step}/{info.total_steps} epoch {info.epoch}/{info.total_epochs} loss {loss}{avg} "
        f"{lrs} {info.steps_per_s:.2f} it/s elapsed {info.elapsed_s:.0f}s"
    )


class LogFile:
    """Timestamped lines appended to ``path``; the package logger's warnings go there too while it is open."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file: IO[str] = path.open("a", encoding="utf-8")
        self._handler = logging.StreamHandler(self._file)
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s: %(message)s"))
        logger.addHandler(self._handler)

    def write(self, line: str) -> None:
        self._file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
        self._file.flush()

    def close(self) -> None:
        logger.removeHandler(self._handler)
        self._file.close()


class TerminalCallbacks(Callbacks):
    """Progress bar and status lines on the terminal, the same lines in ``log`` (either may be off)."""

    def __init__(self, log: LogFile | None, *, main: bool = True, stream: IO[str] | None = None):
        self.log = log
        self.main = main
        self.stream = stream or sys.stderr
        self.bar: Any = None
        self.stop_requested = False
        self.saved: list[Path] = []
        self._series = ""

    def _print(self, text: str) -> None:
        if not self.main:
            return
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def on_status(self, text: str) -> None:
        counted = _COUNTED.match(text)
        if counted:  # "Caching latents 3/20": the first and the last of a series, not every one
            head, done, total = counted.group(1), int(counted.group(2)), int(counted.group(3))
            if head == self._series and done != total:
                return
            self._series = head
        self._print(text)
        if self.log:
            self.log.write(text)

    def on_start(self, total_steps: int, total_epochs: int) -> None:
        if self.log:
            self.log.write(f"training: {total_steps} steps, {total_epochs} epochs")
        if self.main:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, unit="step", file=self.stream, dynamic_ncols=True)

    def on_step(self, info: StepInfo) -> None:
        if self.bar is not None:
            self.bar.n = info.step
            loss = "nan" if info.loss is None else f"{info.loss:.4f}"
            self.bar.set_postfix(loss=loss, epoch=f"{info.epoch}/{info.total_epochs}", refresh=False)
            self.bar.refresh()
        if self.log:
            self.log.write(_format_step(info))

    def on_save(self, path: Path, final: bool) -> None:
        self.saved.append(path)
        self.on_status(f"Saved {path}" + (" (final)" if final else ""))

    def on_validation(self, step: int, epoch: int, loss: float) -> None:
        self.on_status(f"validation loss after step {step} (epoch {epoch}): {loss:.4f}")

    def should_stop(self) -> bool:
        return self.stop_requested

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class StopOnInterrupt:
    """While active, the first Ctrl-C asks ``callbacks`` to stop (what was trained is saved, with its
    resume state); the second raises KeyboardInterrupt (abort, nothing more is saved)."""

    def __init__(self, callbacks: TerminalCallbacks):
        self.callbacks = callbacks
        self._previous: Any = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.callbacks.stop_requested:
            raise KeyboardInterrupt
        self.callbacks.stop_requested = True
        self.callbacks.on_status(
            "Stopping: saving what was trained and its resume state (continue with --resume); Ctrl-C again aborts"
        )

    def __enter__(self) -> StopOnInterrupt:
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self._previous)
