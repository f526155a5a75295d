"""Resume states: where a run's state lives, and the settings a resumed run must share with it."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from lora_trainer.config import TrainConfig
from lora_trainer.files.resume_state import StateFileError, load_state

__all__ = ["config_hash", "load_resume_state", "shaping_settings", "state_dir_for"]


def state_dir_for(work_dir: str | os.PathLike, output_name: str) -> Path:
    return Path(work_dir) / "states" / output_name


def load_resume_state(cfg: TrainConfig, family: str, work_dir: Path) -> tuple[dict, dict]:
    """The state a stopped run left for ``cfg.save.output_name``, checked against ``cfg``."""
    directory = state_dir_for(work_dir, cfg.save.output_name)
    state, info = load_state(directory)
    if info.get("family") != family:
        raise StateFileError(
            f"the saved state in {directory} is from a {info.get('family')} model, but the loaded model is {family}"
        )
    if info.get("config_hash") != config_hash(cfg):
        raise StateFileError(
            f"the settings differ from those of the run saved in {directory}: resume with the same settings "
            "(only the number of steps or epochs, the output and the samples may change)"
        )
    return state, info


def _shaping(cfg: TrainConfig) -> dict[str, dict[str, Any]]:
    data = cfg.to_dict()
    shaping = {group: data[group] for group in ("dataset", "network", "optim", "training")}
    shaping["training"] = {k: v for k, v in shaping["training"].items() if k not in _LENGTH_AND_SEED}
    return shaping


def config_hash(cfg: TrainConfig) -> str:
    """Hash of the settings that shape the optimisation: not its length, seed, output or samples."""
    return hashlib.sha256(json.dumps(_shaping(cfg), sort_keys=True, default=str).encode()).hexdigest()


def shaping_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The settings :func:`config_hash` covers, by dotted name, as JSON gives them back (kept in a resume
    state, so a resume with other settings can name the one that differs)."""
    flat = {f"{group}.{key}": value for group, values in _shaping(cfg).items() for key, value in values.items()}
    return json.loads(json.dumps(flat, default=str))


_LENGTH_AND_SEED = ("max_train_epochs", "max_train_steps", "seed")
