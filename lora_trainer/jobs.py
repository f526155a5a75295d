"""Training jobs: one at a time, in a background thread, observable and cancellable.

The UI, the REST API and the CLI all start training through a :class:`JobManager`.
It talks to the program it runs in only through a :class:`Host`: the WebUI's host
(``lora_trainer.backends.webui.host``) maps it onto ``shared.sd_model``, ``shared.state`` and the
GPU queue lock; tests use a stand-in over tiny models.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from lora_trainer.config import TrainConfig
from lora_trainer.contracts import Host
from lora_trainer.data.scan import scan_dataset
from lora_trainer.errors import IncompatibleModelError, LoraTrainerError
from lora_trainer.log import logger
from lora_trainer.train.callbacks import Callbacks, StepInfo
from lora_trainer.train.loop import train


class JobBusyError(LoraTrainerError):
    """A training job is already running."""


class UnknownJobError(LoraTrainerError, KeyError):
    """No job has that id."""


STATES = ("queued", "running", "done", "stopped", "failed")


@dataclasses.dataclass
class Job:
    id: str
    config: TrainConfig
    resume: bool = False
    state: str = "queued"
    phase: str = ""
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    total_epochs: int = 0
    loss: float | None = None
    avg_loss: float | None = None
    lr: dict[str, float] = dataclasses.field(default_factory=dict)
    steps_per_s: float = 0.0
    eta_s: float | None = None
    losses: list[float] = dataclasses.field(default_factory=list)
    samples: list[str] = dataclasses.field(default_factory=list)
    saved: list[str] = dataclasses.field(default_factory=list)
    output_file: str | None = None
    error: str | None = None
    created_at: float = dataclasses.field(default_factory=time.time)
    finished_at: float | None = None
    stop_requested: bool = False
    thread: threading.Thread | None = dataclasses.field(default=None, repr=False)

    @property
    def active(self) -> bool:
        return self.state in ("queued", "running")

    def to_dict(self, *, with_losses: bool = True) -> dict[str, Any]:
        """JSON-safe status for the UI and the API."""
        return {
            "id": self.id,
            "state": self.state,
            "phase": self.phase,
            "output_name": self.config.save.output_name,
            "step": self.step,
            "total_steps": self.total_steps,
            "epoch": self.epoch,
            "total_epochs": self.total_epochs,
            "loss": self.loss,
            "avg_loss": self.avg_loss,
            "lr": self.lr,
            "steps_per_s": self.steps_per_s,
            "eta_s": self.eta_s if self.eta_s is None or self.eta_s != float("inf") else None,
            "output_file": self.output_file,
            "saved": self.saved,
            "samples": self.samples,
            "error": self.error,
            "created_at": self.created_at,
            "finished_at": self.finished_at,
            **({"losses": self.losses} if with_losses else {}),
        }


class _JobCallbacks(Callbacks):
    def __init__(self, job: Job, host: Host, sample_dir: Path):
        self.job, self.host, self.sample_dir = job, host, sample_dir

    def on_status(self, text: str) -> None:
        self.job.phase = text
        self.host.on_job_progress(self.job)

    def on_start(self, total_steps: int, total_epochs: int) -> None:
        self.job.total_steps, self.job.total_epochs = total_steps, total_epochs
        self.job.phase = "Training"
        self.host.on_job_progress(self.job)

    def on_step(self, info: StepInfo) -> None:
        job = self.job
        job.step, job.epoch, job.loss, job.avg_loss = info.step, info.epoch, info.loss, info.avg_loss
        job.lr, job.steps_per_s, job.eta_s = info.lrs, info.steps_per_s, info.eta_s
        job.losses.append(info.loss)
        self.host.on_job_progress(job)

    def should_stop(self) -> bool:
        return self.job.stop_requested or self.host.interrupted()

    def on_save(self, path: Path, final: bool) -> None:
        self.job.saved.append(str(path))

    def on_sample(self, step: int, epoch: int) -> None:
        cfg = self.job.config
        images = self.host.sample_images(cfg.sample.sample_prompts, cfg, step)
        self.sample_dir.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            path = self.sample_dir / f"{cfg.save.output_name}_step{step:06d}_{i:02d}.png"
            image.save(path)
            self.job.samples.append(str(path))


class JobManager:
    """Runs one training job at a time on ``host``; keeps finished jobs for status queries."""

    def __init__(self, host: Host, *, keep: int = 20):
        self.host = host
        self.keep = keep
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    def start(self, cfg: TrainConfig, *, resume: bool = False) -> Job:
        """Validate and start; ConfigError, DatasetError or JobBusyError come back at once, nothing started."""
        if cfg.save.output_dir is None:
            cfg = dataclasses.replace(cfg, save=dataclasses.replace(cfg.save, output_dir=str(self.host.lora_dir)))
        cfg.validate()
        scan_dataset(cfg.dataset.train_data_dir, cfg.dataset.caption_extension)  # a missing or empty folder fails now
        problem = self.host.model_info().problem
        if problem:
            raise IncompatibleModelError(problem)
        with self._lock:
            running = self.current()
            if running is not None:
                raise JobBusyError(
                    f"training '{running.config.save.output_name}' is still running ({running.id}); "
                    "wait for it or stop it first"
                )
            job = Job(id=f"job-{int(time.time())}-{next(self._ids)}", config=cfg, resume=resume)
            self._jobs[job.id] = job
            self._forget_old()
            job.thread = threading.Thread(target=self._run, args=(job,), name=f"lora-train {job.id}", daemon=True)
            job.thread.start()
        return job

    def get(self, job_id: str) -> Job:
        try:
            return self._jobs[job_id]
        except KeyError:
            raise UnknownJobError(f"no training job {job_id!r}") from None

    def list(self) -> list[Job]:
        return sorted(self._jobs.values(), key=lambda j: j.created_at)

    def current(self) -> Job | None:
        return next((j for j in self._jobs.values() if j.active), None)

    def latest(self) -> Job | None:
        jobs = self.list()
        return jobs[-1] if jobs else None

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        job.stop_requested = True
        return job

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        job = self.get(job_id)
        if job.thread is not None:
            job.thread.join(timeout)
        return job

    def _forget_old(self) -> None:
        finished = [j for j in self.list() if not j.active]
        for job in finished[: max(0, len(finished) - self.keep)]:
            del self._jobs[job.id]

    def _run(self, job: Job) -> None:
        host = self.host
        try:
            job.phase = "Waiting for the GPU"
            with host.gpu_lock():
                job.state, job.phase = "running", "Preparing"
                host.on_job_start(job)
                callbacks = _JobCallbacks(job, host, host.work_dir / "samples" / job.id)
                with host.training_session() as adapter:
                    result = train(job.config, adapter, callbacks, work_dir=host.work_dir, resume=job.resume)
            job.losses = list(result.losses)
            if result.output_path is None:
                job.state, job.phase = "stopped", "Stopped before the first step: nothing saved"
                return
            job.phase = "Checking the file loads in the WebUI"
            unplaced = host.verify_lora(result.output_path)
            if unplaced:
                raise LoraTrainerError(
                    f"{result.output_path.name} does not fully load: {len(unplaced)} module(s) match nothing "
                    f"in the loaded model (first: {', '.join(unplaced[:5])})"
                )
            host.publish_lora(result.output_path)
            job.output_file = str(result.output_path)
            job.state = "stopped" if result.stopped_early else "done"
            job.phase = "Stopped; saved what was trained so far" if result.stopped_early else "Done"
        except Exception as e:  # noqa: BLE001 - the job reports every failure; the host keeps running
            job.state = "failed"
            job.error = _describe(e)
            job.phase = "Failed"
            logger.error("training job %s failed: %s", job.id, job.error)
            if not isinstance(e, LoraTrainerError):
                logger.debug("%s", traceback.format_exc())
        finally:
            job.finished_at = time.time()
            with contextlib.suppress(Exception):
                host.on_job_end(job)


def _describe(e: BaseException) -> str:
    if isinstance(e, LoraTrainerError):
        return str(e)
    text = str(e)
    if "out of memory" in text.lower():
        return (
            "out of GPU memory: lower the batch size or resolution, turn on gradient checkpointing and latent "
            "caching, or use AdamW8bit/Adafactor"
        )
    return f"{type(e).__name__}: {text}"
