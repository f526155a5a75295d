"""``python -m lora_trainer train CONFIG.toml --checkpoint MODEL.safetensors``: train without the WebUI.

Reads the config (our TOML or kohya's ``--config_file`` TOML; unknown settings are an error unless
``--ignore-unknown``), applies the command line's overrides, checks the config and the dataset before
the checkpoint is loaded, loads the checkpoint (:mod:`~lora_trainer.backends.checkpoint.loader`),
trains with the core's loop, and writes the LoRA plus ``<name>.toml`` (the settings used, our format,
readable by the tab and by ``train``) next to it. The progress bar, the log file
(``<work_dir>/logs/<name>-<time>.log``) and Ctrl-C are :mod:`~lora_trainer.backends.checkpoint.progress`'s.

Under ``accelerate launch`` with several processes each process trains on its GPU with a share of every
batch (``lora_trainer.train.parallel``); only the main process shows progress and writes the log and the files.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lora_trainer.backends.checkpoint.progress import LogFile, StopOnInterrupt, TerminalCallbacks
from lora_trainer.config import TrainConfig
from lora_trainer.config.kohya_toml import UnknownSetting, parse_toml
from lora_trainer.errors import ConfigError, LoraTrainerError, OutOfMemory
from lora_trainer.files.atomic_write import atomic_write_bytes
from lora_trainer.train.loop import train
from lora_trainer.train.parallel import Parallel, from_torch_distributed
from lora_trainer.train.preflight import check_dataset, check_resume

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
EXIT_ABORTED = 130  # a second Ctrl-C, as a shell reports SIGINT
_EXTRA_MODULES = ("diffusers", "accelerate", "open_clip", "tqdm")
OOM_ADVICE = (
    "Try: gradient checkpointing on, cache latents on, batch 1, a lower resolution or rank, optimizer AdamW8bit, "
    "--dtype fp16 or bf16, and close other programs using the GPU."
)


@dataclasses.dataclass
class Processes:
    """Where this process trains: its device, whether it is the main one, and the parallel group (or None)."""

    device: str
    is_main: bool = True
    parallel: Parallel | None = None


def load_checkpoint(path: str | os.PathLike, **kwargs: Any) -> Any:
    """The checkpoint as a ``ModelAdapter`` (``loader.load_checkpoint``; imported here, so the command
    without the ``train`` extra fails with an instruction, not an ImportError)."""
    from lora_trainer.backends.checkpoint.loader import load_checkpoint as load

    return load(path, **kwargs)


def read_config(path: str, *, ignore_unknown: bool) -> tuple[TrainConfig, dict[str, Any]]:
    """The config in ``path`` and the kohya settings it holds that the config does not use."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError("CONFIG", f"no config file at {file}: give our TOML (saved by the tab) or a kohya TOML")
    try:
        parsed = parse_toml(file.read_text(encoding="utf-8"), strict=not ignore_unknown)
    except UnknownSetting as e:
        raise ConfigError(e.field, f"{e.message} (in {file}; pass --ignore-unknown to ignore it)") from None
    except ConfigError as e:
        raise ConfigError(e.field, f"{e.message} (in {file})") from None
    except UnicodeDecodeError:
        raise ConfigError("CONFIG", f"{file} is not a text (TOML) file") from None
    return parsed.config, parsed.ignored


def with_overrides(cfg: TrainConfig, args: argparse.Namespace) -> TrainConfig:
    """``cfg`` with the command line's values in place of the file's."""
    save: dict[str, Any] = {}
    if args.output_dir:
        save["output_dir"] = args.output_dir
    if args.output_name:
        save["output_name"] = args.output_name
    if args.overwrite:
        save["overwrite"] = True
    cfg = dataclasses.replace(cfg, save=dataclasses.replace(cfg.save, **save))
    if not cfg.save.output_dir:
        raise ConfigError("save.output_dir", "no output folder: pass --output-dir DIR or set output_dir in the config")
    output_dir = str(Path(cfg.save.output_dir).expanduser().resolve())
    return dataclasses.replace(cfg, save=dataclasses.replace(cfg.save, output_dir=output_dir))


def _existing_file(option: str, value: str) -> Path:
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(option, f"no file at {path}")
    return path.resolve()


def processes(device: str | None) -> Processes:
    """One process (``device`` or the first GPU, else the CPU), or this one of several started by
    ``accelerate launch`` (its own GPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Processes(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    from accelerate import PartialState

    state = PartialState(cpu=device == "cpu")
    if state.num_processes <= 1:
        return Processes(str(state.device))
    try:
        parallel = from_torch_distributed()
    except RuntimeError as e:
        raise LoraTrainerError(f"{state.num_processes} processes were started, but {e}") from None
    return Processes(str(state.device), bool(state.is_main_process), parallel)


def _dtype(name: str, device: str) -> torch.dtype:
    """``auto``: float32 on the CPU, float16 on a GPU (as the WebUI holds a model)."""
    if name == "auto":
        return torch.float32 if device == "cpu" else torch.float16
    return DTYPES[name]


def _load(args: argparse.Namespace, checkpoint: Path, ignored: dict[str, Any], where: Processes) -> Any:
    vae = args.vae or ignored.get("vae")
    v_param = True if args.v_parameterization or ignored.get("v_parameterization") is True else None
    try:
        return load_checkpoint(
            checkpoint,
            vae_path=_existing_file("--vae", vae) if vae else None,
            device=where.device,
            dtype=_dtype(args.dtype, where.device),
            v_parameterization=v_param,
            allow_pickle=args.allow_pickle,
        )
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in _EXTRA_MODULES:
            raise
        raise LoraTrainerError(
            f"the train command needs the 'train' extra ({e.name} is missing): pip install \".[train]\" from a clone"
        ) from None


def run(args: argparse.Namespace) -> int:
    """The ``train`` command; returns its exit code (LoraTrainerError is left to the caller to print)."""
    cfg, ignored = read_config(args.config, ignore_unknown=args.ignore_unknown)
    cfg = with_overrides(cfg, args)
    cfg.validate()
    check_dataset(cfg)
    checkpoint_arg = args.checkpoint or ignored.get("pretrained_model_name_or_path")
    if not checkpoint_arg:
        raise ConfigError("--checkpoint", "no checkpoint: pass --checkpoint MODEL.safetensors")
    checkpoint = _existing_file("--checkpoint", str(checkpoint_arg))
    output_dir = Path(cfg.save.output_dir or ".")  # always set by with_overrides
    work_dir = Path(args.work_dir).expanduser().resolve() if args.work_dir else output_dir / ".lora-train"
    if args.resume:
        check_resume(cfg, "", work_dir)
    where = processes(args.device)
    log = _open_log(work_dir, cfg, checkpoint) if where.is_main else None
    callbacks = TerminalCallbacks(log, main=where.is_main)
    try:
        callbacks.on_status(f"Loading {checkpoint} on {where.device}")
        adapter = _load(args, checkpoint, ignored, where)
        with StopOnInterrupt(callbacks):
            result = train(cfg, adapter, callbacks, work_dir=work_dir, resume=args.resume, parallel=where.parallel)
    except OutOfMemory as e:
        raise OutOfMemory(e.phase, e.advice or OOM_ADVICE, e.saved) from None
    except KeyboardInterrupt:
        print("aborted: nothing more was saved", file=sys.stderr)
        return EXIT_ABORTED
    finally:
        callbacks.close()
        if log:
            log.close()
    if where.is_main:
        _report(cfg, result, checkpoint, log)
    return 0


def _open_log(work_dir: Path, cfg: TrainConfig, checkpoint: Path) -> LogFile:
    log = LogFile(work_dir / "logs" / f"{cfg.save.output_name}-{time.strftime('%Y%m%d-%H%M%S')}.log")
    log.write(f"checkpoint: {checkpoint}")
    log.write("config:\n" + cfg.to_toml())
    return log


def _report(cfg: TrainConfig, result: Any, checkpoint: Path, log: LogFile | None) -> None:
    if result.output_path is None:
        print("Stopped before the first step: nothing was saved.")
        return
    toml_path = result.output_path.with_suffix(".toml")
    text = cfg.to_toml(description=f"Trained on {checkpoint.name}")
    atomic_write_bytes(toml_path, text.encode("utf-8"), overwrite=True)  # the settings of the file beside it
    for path in (*result.saved, toml_path):
        print(f"wrote {path}")
    if log:
        print(f"log: {log.path}")
    if result.stopped_early:
        print(f"Stopped after {result.steps} steps; continue with the same command and --resume.")
