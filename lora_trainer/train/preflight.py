"""What a run is checked against before it starts (:meth:`lora_trainer.jobs.JobManager.start`).

* :func:`resolve_output_dir`: where the LoRA may be written. A relative ``save.output_dir`` is placed
  under the host's Lora folder; an absolute one must lie inside the folders the host allows (the
  Lora folder), unless the host's own settings allow any folder. A request alone never widens this.
* :func:`check_dataset`: the dataset folder exists and every image in it can be read.
* :func:`check_resume`: a resume has a stopped run to continue, with the same settings.

Each refusal is a :class:`ConfigError` naming the field to change.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lora_trainer.config import TrainConfig
from lora_trainer.data.images import read_image_size
from lora_trainer.data.scan import scan_dataset
from lora_trainer.errors import ConfigError, DatasetError
from lora_trainer.files.resume_state import StateFileError, load_state_info
from lora_trainer.train.loop import config_hash, shaping_settings, state_dir_for

__all__ = ["DatasetRefused", "check_dataset", "check_resume", "resolve_output_dir"]

ALLOW_ANY_SETTING = 'Settings > LoRA Train > "Allow training runs to write LoRAs outside the Lora folder"'


class DatasetRefused(ConfigError, DatasetError):
    """A dataset folder refused at start: a DatasetError that names ``dataset.train_data_dir``."""

    def __init__(self, message: str):
        super().__init__("dataset.train_data_dir", message)


def _inside(path: str, root: str) -> bool:
    path, root = os.path.normcase(path), os.path.normcase(root)
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:  # another drive (Windows)
        return False


def resolve_output_dir(output_dir: str | None, lora_dir: Path, allowed: Sequence[Path] | None) -> Path:
    """The folder the LoRA goes to: ``lora_dir`` when unset, relative paths under ``lora_dir``.

    ``allowed``: the folders it must lie in (links resolved), None for anywhere (the host's setting)."""
    path = Path(lora_dir) if output_dir is None else Path(output_dir)
    if not path.is_absolute():
        path = Path(lora_dir) / path
    if allowed is None:
        return path
    real = os.path.realpath(path)
    if any(_inside(real, os.path.realpath(root)) for root in allowed):
        return path
    roots = ", ".join(str(root) for root in allowed)
    raise ConfigError(
        "save.output_dir",
        f"{output_dir or path} is outside the WebUI's Lora folder ({roots}), where trained LoRAs are written: "
        "leave it empty for the Lora folder, or give a folder inside it (a relative path such as 'characters' "
        f"is placed there); to write elsewhere, turn on {ALLOW_ANY_SETTING}",
    )


def check_dataset(cfg: TrainConfig) -> None:
    """Refuse a missing or empty dataset folder, or one holding an image that cannot be read (header only)."""
    ds = cfg.dataset
    try:
        items = scan_dataset(ds.train_data_dir, ds.caption_extension, flat_repeats=ds.dataset_repeats)
    except DatasetRefused:
        raise
    except DatasetError as e:
        raise DatasetRefused(str(e)) from None
    bad: list[str] = []
    for item in items:
        try:
            read_image_size(item.path)
        except DatasetError as e:
            bad.append(str(e))
    if len(bad) == len(items):
        raise DatasetRefused(
            f"no image in {ds.train_data_dir} can be read ({len(bad)} file(s) tried; first: {bad[0]}) "
            "Put readable PNG, JPEG or WebP images there, or pick another folder."
        )
    if bad:
        raise DatasetRefused(
            f"{len(bad)} of {len(items)} images in {ds.train_data_dir} cannot be read and training would stop "
            f"at them. First: {bad[0]}"
        )


def _differing(saved: Any, now: dict[str, Any]) -> str | None:
    if not isinstance(saved, dict):
        return None
    return next((key for key in sorted(set(saved) | set(now)) if saved.get(key) != now.get(key)), None)


def check_resume(cfg: TrainConfig, family: str, work_dir: Path) -> None:
    """Refuse a resume without a readable stopped run of ``save.output_name``, or with other settings."""
    name = cfg.save.output_name
    directory = state_dir_for(work_dir, name)
    try:
        info = load_state_info(directory)
    except StateFileError as e:
        raise ConfigError(
            "resume",
            f"there is no stopped run of '{name}' to resume ({e}): press Start for a new run, "
            "or set save.output_name to the name of the stopped run",
        ) from None
    if not isinstance(info, dict):
        raise ConfigError("resume", f"the saved state of '{name}' in {directory} is damaged: press Start for a new run")
    if family and info.get("family") != family:
        raise ConfigError(
            "resume",
            f"the stopped run of '{name}' trained a {info.get('family')} model, but a {family} model is loaded: "
            "load the run's checkpoint to resume, or press Start for a new run",
        )
    if info.get("config_hash") == config_hash(cfg):
        return
    now = shaping_settings(cfg)
    key = _differing(info.get("settings"), now)
    if key is None:
        raise ConfigError(
            "resume",
            f"the settings differ from those of the stopped run of '{name}': resume with the same settings "
            "(only the number of steps or epochs, the seed, the output and the samples may change), "
            "or press Start for a new run",
        )
    was = info["settings"].get(key)
    raise ConfigError(
        key,
        f"differs from the stopped run of '{name}' ({was!r} then, {now.get(key)!r} now): set it back to resume "
        "(only the number of steps or epochs, the seed, the output and the samples may change), "
        "or press Start for a new run",
    )
