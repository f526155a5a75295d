"""Presets: named configs as our TOML, built in (``lora_trainer/presets/*.toml``) or in a user folder."""

from __future__ import annotations

import copy
import os
import re
from importlib import resources
from pathlib import Path
from typing import NamedTuple

from lora_trainer.config.kohya_toml import parse_toml
from lora_trainer.config.model import TrainConfig
from lora_trainer.errors import ConfigError
from lora_trainer.files.atomic_write import atomic_write_bytes

__all__ = ["PRESETS", "Preset", "get_preset", "list_presets", "load_preset", "save_preset"]


class Preset(NamedTuple):
    """A named config with a one-line description, and where it was read from."""

    name: str
    description: str
    config: TrainConfig  # shared: use load_preset() for a copy you may change
    source: str  # "builtin" or the file's path


_PRESET_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


def _read_preset(name: str, text: str, source: str) -> Preset:
    try:
        parsed = parse_toml(text)
    except ConfigError as exc:
        raise ConfigError(exc.field, f"{exc.message} (in preset {name!r}, {source})") from None
    return Preset(name, parsed.description or "", parsed.config, source)


def _builtin_presets() -> dict[str, Preset]:
    folder = resources.files("lora_trainer").joinpath("presets")
    presets = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml"):
            name = entry.name[: -len(".toml")]
            presets[name] = _read_preset(name, entry.read_text(encoding="utf-8"), "builtin")
    return presets


PRESETS: dict[str, Preset] = _builtin_presets()
"""Built-in presets (``lora_trainer/presets/*.toml``) by name."""


def _user_preset_files(user_dir: str | os.PathLike | None) -> dict[str, Path]:
    if user_dir is None or not Path(user_dir).is_dir():
        return {}
    return {p.stem: p for p in sorted(Path(user_dir).glob("*.toml")) if _PRESET_NAME.fullmatch(p.stem)}


def list_presets(user_dir: str | os.PathLike | None = None) -> list[str]:
    """Preset names: the built-in ones, then those in ``user_dir`` (``<name>.toml``) not shadowing one."""
    users = _user_preset_files(user_dir)
    return list(PRESETS) + [name for name in users if name not in PRESETS]


def get_preset(name: str, user_dir: str | os.PathLike | None = None) -> Preset:
    """A preset by name; a file in ``user_dir`` takes precedence over a built-in of the same name."""
    path = _user_preset_files(user_dir).get(name)
    if path is not None:
        return _read_preset(name, path.read_text(encoding="utf-8"), str(path))
    if name in PRESETS:
        return PRESETS[name]
    raise ConfigError("preset", f"unknown preset {name!r}; available: {', '.join(list_presets(user_dir))}")


def load_preset(name: str, user_dir: str | os.PathLike | None = None) -> TrainConfig:
    """A fresh copy of the preset's config (settings it leaves out have our defaults)."""
    return copy.deepcopy(get_preset(name, user_dir).config)


def save_preset(
    config: TrainConfig,
    name: str,
    user_dir: str | os.PathLike,
    *,
    description: str = "",
    overwrite: bool = False,
) -> Path:
    """Write ``config`` as ``user_dir/<name>.toml`` (our TOML); returns the path."""
    if not _PRESET_NAME.fullmatch(name):
        raise ConfigError("preset", f"names are lowercase letters, digits, '-' and '_' (up to 64), got {name!r}")
    path = Path(user_dir) / f"{name}.toml"
    if path.exists() and not overwrite:
        raise ConfigError("preset", f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(path, config.to_toml(description=description).encode("utf-8"))
