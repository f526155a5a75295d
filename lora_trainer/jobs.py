"""Training jobs: one at a time, in a background thread, observable and cancellable.

The UI, the REST API and the CLI all start training through a :class:`JobManager`.
It talks to the program it runs in only through a :class:`Host`: the WebUI's host
(``lora_trainer.backends.webui.host``) maps it onto ``shared.sd_model``, ``shared.state`` and the
GPU queue lock; tests use a stand-in over tiny models.

A run that runs out of device memory (latent caching, a step, a preview, saving) ends as
"failed" (not "stopped", which is a stop someone asked for): ``error`` says in which phase, the
estimated peak against the free memory, and which settings to change (``lora_trainer.train.memory``);
when steps were done, what was trained is saved as a stop saves it (``output_file``, resume state).
Every job's ``memory`` reports the estimated peak beside the measured one (CUDA's
``max_memory_allocated``; on other devices the estimate only).

Jobs outlive the program: each is recorded in ``<work dir>/jobs/<id>.json`` (its settings and how
it ended) when it starts and when it ends, and a new :class:`JobManager` lists those past jobs
(``restored``) with their state; a run the program did not see end is "stopped" when it left a
resume state, else "failed". Stopped runs that left a resume state but no record (an older
version, the command line) are listed from that state and the ``ss_*`` metadata of their LoRA
file (its header only). A ``resumable`` job continues with :meth:`JobManager.resume`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch

from lora_trainer.config import TrainConfig
from lora_trainer.contracts import Host
from lora_trainer.errors import ConfigError, IncompatibleModelError, LoraTrainerError, OutOfMemory
from lora_trainer.files.atomic_write import atomic_write_bytes
from lora_trainer.files.card_preview import write_card_preview
from lora_trainer.files.resume_state import StateFileError, load_state_info
from lora_trainer.files.safetensors_format import file_metadata
from lora_trainer.log import logger
from lora_trainer.train.callbacks import Callbacks, StepInfo, TrainResult
from lora_trainer.train.device import device_throughput, is_out_of_memory, release_memory
from lora_trainer.train.loop import state_dir_for, train
from lora_trainer.train.memory import GB, Plan, estimate, format_bytes, settings_from_config
from lora_trainer.train.preflight import check_dataset, check_resume, resolve_output_dir


class JobBusyError(LoraTrainerError):
    """A training job is already running."""


class UnknownJobError(LoraTrainerError, KeyError):
    """No job has that id."""


STATES = ("queued", "running", "done", "stopped", "failed")


@dataclasses.dataclass
class Job:
    id: str
    config: TrainConfig  # what runs: the output folder resolved to the host's
    resume: bool = False
    submitted: TrainConfig | None = None  # as given (an unset output folder stays unset): what the tab shows again
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
    skipped_steps: int = 0  # steps skipped for NaN/inf loss or gradients (lora_trainer.train.guards)
    eta_s: float | None = None
    losses: list[float | None] = dataclasses.field(default_factory=list)
    val_losses: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # {"step", "epoch", "loss"}
    samples: list[str] = dataclasses.field(default_factory=list)
    saved: list[str] = dataclasses.field(default_factory=list)
    output_file: str | None = None
    error: str | None = None
    memory: dict[str, Any] = dataclasses.field(default_factory=dict)  # estimated and measured peak
    created_at: float = dataclasses.field(default_factory=time.time)
    finished_at: float | None = None
    stop_requested: bool = False
    restored: bool = False  # read back from what an earlier session of the program saved
    resumable: bool = False  # stopped, and its resume state is there: JobManager.resume continues it
    thread: threading.Thread | None = dataclasses.field(default=None, repr=False)

    @property
    def active(self) -> bool:
        return self.state in ("queued", "running")

    def _eta(self) -> float | None:
        """Seconds left: while running (None while unknown), 0 when done, None for a stopped or failed run."""
        if self.state == "done":
            return 0.0
        if self.state != "running" or self.eta_s is None or self.eta_s == float("inf"):
            return None
        return self.eta_s

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
            "skipped_steps": self.skipped_steps,
            "eta_s": self._eta(),
            "output_file": self.output_file,
            "saved": self.saved,
            "samples": self.samples,
            "error": self.error,
            "memory": self.memory,
            "created_at": self.created_at,
            "finished_at": self.finished_at,
            "restored": self.restored,
            "resumable": self.resumable,
            "val_losses": self.val_losses,
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
        job.skipped_steps = info.skipped_steps
        job.losses.append(info.loss)
        self.host.on_job_progress(job)

    def should_stop(self) -> bool:
        return self.job.stop_requested or self.host.interrupted()

    def on_save(self, path: Path, final: bool) -> None:
        self.job.saved.append(str(path))

    def on_validation(self, step: int, epoch: int, loss: float) -> None:
        self.job.val_losses.append({"step": step, "epoch": epoch, "loss": loss})
        self.host.on_job_progress(self.job)

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
        try:
            self._jobs = {job.id: job for job in past_jobs(host.work_dir, keep)}
        except Exception as e:  # noqa: BLE001 - the list of past runs is a convenience: it must not stop the program
            logger.warning("the past training jobs could not be listed: %s: %s", type(e).__name__, e)

    def start(self, cfg: TrainConfig, *, resume: bool = False) -> Job:
        """Validate and start; ConfigError, DatasetError or JobBusyError come back at once, nothing started."""
        submitted = cfg
        cfg.validate()
        output_dir = resolve_output_dir(cfg.save.output_dir, self.host.lora_dir, self.host.allowed_output_roots())
        cfg = dataclasses.replace(cfg, save=dataclasses.replace(cfg.save, output_dir=str(output_dir)))
        check_dataset(cfg)  # a missing or empty folder, or one with an unreadable image, fails now
        info = self.host.model_info()
        if info.problem:
            raise IncompatibleModelError(info.problem)
        if resume:
            check_resume(cfg, info.family or "", self.host.work_dir)
        with self._lock:
            running = self.current()
            if running is not None:
                raise JobBusyError(
                    f"training '{running.config.save.output_name}' is still running ({running.id}); "
                    "wait for it or stop it first"
                )
            job_id = f"job-{int(time.time())}-{next(self._ids)}"
            while job_id in self._jobs:  # a restored job of an earlier session may hold it
                job_id = f"job-{int(time.time())}-{next(self._ids)}"
            job = Job(id=job_id, config=cfg, resume=resume, submitted=submitted)
            self._jobs[job.id] = job
            self._forget_old()
            _save_record(self.host.work_dir, job)
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

    def resume(self, job_id: str) -> Job:
        """Continue the stopped job ``job_id`` (one of this session or a restored one) with its settings."""
        job = self.get(job_id)
        if not job.resumable:
            raise ConfigError("resume", f"job {job_id} ({job.config.save.output_name}) has no stopped run to resume")
        return self.start(job.submitted or job.config, resume=True)

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
            with contextlib.suppress(OSError):
                _record_path(self.host.work_dir, job.id).unlink()

    def plan(self, cfg: TrainConfig) -> Plan | None:
        """The memory and time plan of ``cfg`` on the loaded model and the host's device (None: no model)."""
        profile = self.host.model_profile()
        if profile is None:
            return None
        memory = self.host.free_memory()
        settings = settings_from_config(cfg, attention=memory.attention or "sdp", placement=memory.placement)
        return estimate(profile, settings, memory, flops_per_s=_throughput(memory.device))

    def _run(self, job: Job) -> None:
        host = self.host
        plan: Plan | None = None
        try:
            job.phase = "Waiting for the GPU"
            with host.gpu_lock():
                job.state, job.phase = "running", "Preparing"
                host.on_job_start(job)
                callbacks = _JobCallbacks(job, host, host.work_dir / "samples" / job.id)
                plan = self._plan_quietly(job.config)
                existing = _lora_files(job.config.save.output_dir)
                result = self._train(job, callbacks, plan)
            job.losses, job.val_losses = list(result.losses), list(result.val_losses)
            if result.output_path is None:
                job.state, job.phase = "stopped", "Stopped before the first step: nothing saved"
                return
            self._finish(job, result.output_path, result.stopped_early, replaced=result.output_path.name in existing)
        except OutOfMemory as e:
            self._out_of_memory(job, e, plan)
        except Exception as e:  # noqa: BLE001 - the job reports every failure; the host keeps running
            job.state = "failed"
            job.error = _describe(e)
            job.phase = "Failed"
            # an expected error is its message; anything else gets its traceback too
            logger.error("training job %s failed: %s", job.id, job.error, exc_info=not isinstance(e, LoraTrainerError))
        finally:
            job.finished_at = time.time()
            job.resumable = job.state == "stopped" and _state_of(host.work_dir, job) is not None
            _save_record(host.work_dir, job)
            if job.state in ("done", "stopped"):
                self._supersede(job)
            with contextlib.suppress(Exception):
                host.on_job_end(job)
            release_memory()  # what the run held (network, optimizer, caches) is unreachable by now

    def _train(self, job: Job, callbacks: _JobCallbacks, plan: Plan | None) -> TrainResult:
        """The run inside the host's training session; what it built dies with this frame."""
        host = self.host
        with host.training_session() as adapter:
            peak = _PeakMemory(adapter.device)
            try:
                return train(job.config, adapter, callbacks, work_dir=host.work_dir, resume=job.resume)
            finally:
                job.memory = _memory_report(plan, peak.measured())

    def _supersede(self, job: Job) -> None:
        """Earlier stopped jobs of ``job``'s output name are no longer what a resume continues: the
        newest run's state (or its end) is."""
        name = job.config.save.output_name
        with self._lock:
            older = [
                j for j in self._jobs.values() if j is not job and j.resumable and j.config.save.output_name == name
            ]
        for other in older:
            other.resumable = False
            _save_record(self.host.work_dir, other)

    def _finish(self, job: Job, path: Path, stopped_early: bool, *, replaced: bool) -> None:
        host = self.host
        job.phase = "Checking the file loads in the WebUI"
        unplaced = host.verify_lora(path)
        if unplaced:
            raise LoraTrainerError(
                f"{path.name} does not fully load: {len(unplaced)} module(s) match nothing "
                f"in the loaded model (first: {', '.join(unplaced[:5])})"
            )
        write_card_preview(path, job.samples, replace=replaced)  # before the refresh that shows the card
        host.publish_lora(path)
        job.output_file = str(path)
        job.state = "stopped" if stopped_early else "done"
        job.phase = "Stopped; saved what was trained so far" if stopped_early else "Done"

    def _plan_quietly(self, cfg: TrainConfig) -> Plan | None:
        try:
            return self.plan(cfg)
        except Exception as e:  # noqa: BLE001 - the plan is advice: a failure to make one must not stop a run
            logger.warning("no memory plan for this run: %s: %s", type(e).__name__, e)
            return None

    def _out_of_memory(self, job: Job, error: OutOfMemory, plan: Plan | None) -> None:
        """End ``job`` as failed with advice; publish what was saved before the error."""
        release_memory(error)
        error.advice = _oom_advice(plan)
        job.state, job.phase = "failed", "Out of memory"
        job.error = str(error)
        if error.saved:
            job.output_file = error.saved
            write_card_preview(error.saved, job.samples, replace=False)
            with contextlib.suppress(Exception):
                self.host.publish_lora(Path(error.saved))
        logger.error("training job %s: %s", job.id, job.error)


class _PeakMemory:
    """The run's peak of allocated device memory: CUDA's ``max_memory_allocated``; None elsewhere."""

    def __init__(self, device: Any):
        self.device = device if getattr(device, "type", None) == "cuda" else None
        if self.device is not None:
            torch.cuda.reset_peak_memory_stats(self.device)

    def measured(self) -> float | None:
        return None if self.device is None else float(torch.cuda.max_memory_allocated(self.device))


def _lora_files(output_dir: str | None) -> set[str]:
    """The names of the LoRA files in ``output_dir`` before a run: one the run writes over gets a new card preview."""
    if output_dir is None:
        return set()
    try:
        return {e.name for e in os.scandir(output_dir) if e.name.endswith(".safetensors")}
    except OSError:
        return set()


def _memory_report(plan: Plan | None, measured: float | None) -> dict[str, Any]:
    return {
        "estimated_peak_gb": None if plan is None else round(plan.peak_bytes / GB, 3),
        "measured_peak_gb": None if measured is None else round(measured / GB, 3),
        "free_gb": None if plan is None or plan.free_bytes is None else round(plan.free_bytes / GB, 3),
        "device": None if plan is None else plan.device,
        "plan": None if plan is None else plan.summary(),
    }


def _oom_advice(plan: Plan | None) -> str:
    generic = (
        "Try: gradient checkpointing on, cache latents on, batch 1, a lower resolution or rank, "
        "optimizer AdamW8bit, and close other programs using the GPU."
    )
    if plan is None:
        return generic
    s = plan.settings
    head = f"at {s['width']}x{s['height']} px, batch {s['batch']}: estimated peak {format_bytes(plan.peak_bytes)}"
    if plan.free_bytes is not None:
        head += f" vs {format_bytes(plan.free_bytes)} free"
    advice = plan.advice() or plan.advice_below(0.75)
    return f"{head}. {advice or generic}"


def _throughput(device: str) -> float | None:
    return device_throughput(device) if device in ("cuda", "cpu") else None


def _describe(e: BaseException) -> str:
    if isinstance(e, LoraTrainerError):
        return str(e)
    text = str(e)
    if is_out_of_memory(e):
        return (
            "out of GPU memory: lower the batch size or resolution, turn on gradient checkpointing and latent "
            "caching, or use AdamW8bit/Adafactor"
        )
    return f"{type(e).__name__}: {text}"


# -- jobs on disk ------------------------------------------------------------------------------------


def _record_path(work_dir: str | os.PathLike, job_id: str) -> Path:
    return Path(work_dir) / "jobs" / f"{job_id}.json"


def _save_record(work_dir: str | os.PathLike, job: Job) -> None:
    """Write ``job``'s record (its status and settings); a failure is logged, never raised."""
    record = {
        "version": 1,
        **job.to_dict(with_losses=False),
        "resume": job.resume,
        "config": job.config.to_dict(),
        "submitted": job.submitted.to_dict() if job.submitted is not None else None,
    }
    try:
        path = _record_path(work_dir, job.id)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps(record, default=str).encode("utf-8"), durable=False)
    except (OSError, TypeError, ValueError) as e:
        logger.warning("could not record training job %s: %s", job.id, e)


def _state_of(work_dir: str | os.PathLike, job: Job) -> dict | None:
    """The resume state ``job`` left (the info of its output name's state, when it belongs to it), else None."""
    try:
        info = load_state_info(state_dir_for(work_dir, job.config.save.output_name))
    except (StateFileError, OSError):
        return None
    if not isinstance(info, dict):
        return None
    mine = job.output_file is None or info.get("output_file") in (None, job.output_file)
    return info if mine else None


def _config_or_none(data: object) -> TrainConfig | None:
    try:
        return TrainConfig.from_dict(data) if isinstance(data, dict) else None
    except ConfigError:
        return None


def _job_from_record(path: Path, work_dir: Path) -> Job | None:
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    cfg = _config_or_none(rec.get("config")) if isinstance(rec, dict) else None
    if cfg is None:
        return None
    fields = {f.name for f in dataclasses.fields(Job)} - {"config", "submitted", "thread"}
    job = Job(config=cfg, **{k: v for k, v in rec.items() if k in fields and k != "restored"})
    job.submitted = _config_or_none(rec.get("submitted"))
    job.restored = True
    state = _state_of(work_dir, job)
    if job.state in ("queued", "running"):  # the program ended during the run
        job.state = "stopped" if state is not None else "failed"
        job.phase = "Ended when the WebUI stopped"
        job.error = None if state is not None else "the WebUI stopped during this run; nothing was saved to resume"
        job.output_file = job.output_file or (state or {}).get("output_file")
    # a record of a finished job says whether a later run superseded its state
    ended_unseen = rec.get("state") in ("queued", "running")
    job.resumable = job.state == "stopped" and state is not None and (ended_unseen or bool(rec.get("resumable")))
    return job


def _job_from_state(directory: Path) -> Job | None:
    """A stopped run known only by its resume state (and the LoRA file it names)."""
    try:
        info = load_state_info(directory)
    except (StateFileError, OSError):
        return None
    if not isinstance(info, dict):
        return None
    output_file = info.get("output_file") if isinstance(info.get("output_file"), str) else None
    meta = file_metadata(output_file)
    nested: dict[str, dict] = {}
    for key, value in (info.get("settings") or {}).items():
        group, _, name = str(key).partition(".")
        nested.setdefault(group, {})[name] = value
    nested.setdefault("save", {})["output_name"] = directory.name
    if output_file:
        nested["save"]["output_dir"] = str(Path(output_file).parent)
    if str(meta.get("ss_max_train_steps", "")).isdigit():
        nested.setdefault("training", {})["max_train_steps"] = int(meta["ss_max_train_steps"])
    cfg = _config_or_none(nested) or TrainConfig.from_dict({"save": nested["save"]})
    stopped = meta.get("lora_train.stopped_early", "True") == "True"
    mtime = (directory / "state.json").stat().st_mtime
    return Job(
        id=f"run-{directory.name}",
        config=cfg,
        state="stopped" if stopped else "done",
        phase="Stopped; saved what was trained so far" if stopped else "Done",
        step=int(info.get("step", 0)),
        total_steps=int(meta.get("ss_max_train_steps", 0) or 0),
        epoch=int(info.get("epoch", 0)),
        output_file=output_file,
        created_at=float(meta.get("ss_training_started_at", mtime) or mtime),
        finished_at=float(meta.get("ss_training_finished_at", mtime) or mtime),
        restored=True,
        resumable=stopped,
    )


def past_jobs(work_dir: str | os.PathLike, keep: int = 20) -> list[Job]:
    """The jobs an earlier session recorded under ``work_dir`` (the last ``keep``), plus the runs
    that left only a resume state; see the module doc."""
    work_dir = Path(work_dir)
    records = sorted(work_dir.glob("jobs/*.json"), key=lambda p: p.stat().st_mtime)[-keep:] if keep else []
    jobs = [j for j in (_quietly(_job_from_record, p, work_dir) for p in records) if j is not None]
    names = {j.config.save.output_name for j in jobs}
    states = work_dir / "states"
    if states.is_dir():
        for d in sorted(states.iterdir()):
            job = _quietly(_job_from_state, d) if d.name not in names and d.is_dir() else None
            if job is not None:
                jobs.append(job)
    return jobs


def _quietly(build: Any, *args: Any) -> Job | None:
    """``build(*args)``, or None (logged) when what it reads is damaged."""
    try:
        return build(*args)
    except (OSError, TypeError, ValueError, AttributeError) as e:
        logger.warning("a past training job could not be read (%s): %s", args[0], e)
        return None
