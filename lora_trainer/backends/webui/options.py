"""The WebUI's options and command line as the trainer reads them.

Owns our settings' keys and defaults (the "LoRA Train" section of the Settings tab) and reads
them through ``shared.opts``; adds option entries to that section (the widgets themselves are
built by :mod:`lora_trainer.webui.settings`); and reads ``shared.cmd_opts``: the data dir (the
work folder), the Lora folder, and the API switches (``--api``, ``--nowebui``, ``--api-auth``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from modules import shared

from lora_trainer.credentials import parse_credentials
from lora_trainer.log import warning_once

__all__ = [
    "OPT_ANY_OUTPUT_DIR",
    "OPT_PRESET",
    "OPT_SAMPLER",
    "OPT_STEPS",
    "OPT_SUBFOLDER",
    "SETTINGS",
    "SETTINGS_SECTION",
    "add_option",
    "allowed_output_roots",
    "api_auth",
    "api_enabled",
    "default_work_dir",
    "lora_dir",
    "sample_defaults",
    "sampler_names",
    "setting",
]

SETTINGS_SECTION = ("lora_train", "LoRA Train")
SETTINGS_CATEGORY = "training"
OPT_SUBFOLDER = "lora_train_output_subfolder"
OPT_PRESET = "lora_train_default_preset"
OPT_SAMPLER = "lora_train_sample_sampler"
OPT_STEPS = "lora_train_sample_steps"
OPT_ANY_OUTPUT_DIR = "lora_train_allow_any_output_dir"
SETTINGS = {OPT_SUBFOLDER: "", OPT_PRESET: "", OPT_SAMPLER: "Euler a", OPT_STEPS: 20, OPT_ANY_OUTPUT_DIR: False}
"""Our settings and their defaults."""


def setting(key: str) -> Any:
    """One of our settings (``SETTINGS``), its default before the settings section was registered."""
    value = getattr(shared.opts, "data", {}).get(key) if shared.opts is not None else None
    return SETTINGS[key] if value is None else value


def sample_defaults() -> dict[str, Any]:
    """Preview defaults from the settings, as ``SampleConfig`` fields (for the tab and the API)."""
    return {"sample_sampler": str(setting(OPT_SAMPLER)), "sample_steps": int(setting(OPT_STEPS))}


def add_option(
    key: str, label: str, component: Any = None, component_args: Any = None, info: str | None = None
) -> None:
    """Add one of our settings (``SETTINGS[key]`` its default) to our section of the Settings tab.

    ``component``/``component_args``: the widget, as ``shared.OptionInfo`` takes them (None: a textbox)."""
    opt = shared.OptionInfo(
        SETTINGS[key], label, component, component_args, section=SETTINGS_SECTION, category_id=SETTINGS_CATEGORY
    )
    shared.opts.add_option(key, opt.info(info) if info else opt)


def sampler_names() -> list[str]:
    """The samplers the WebUI's own sampler menus offer."""
    from modules import sd_samplers

    return list(sd_samplers.visible_sampler_names())


def _data_dir() -> Path:
    return Path(getattr(shared.cmd_opts, "data_dir", None) or os.getcwd())


def default_work_dir() -> Path:
    """``<WebUI data dir>/lora_train``: latent caches, resume states, previews, user presets.

    Outside ``models/Lora``, whose subfolders the Lora list scans for .safetensors files."""
    return _data_dir() / "lora_train"


def _clean_subfolder(value: Any) -> str:
    text = str(value or "").strip().replace("\\", "/")
    if not text:
        return ""
    parts = text.rstrip("/").split("/")
    if text.startswith("/") or ":" in text or any(part in ("", ".", "..") for part in parts):
        warning_once(f"ignoring the LoRA output subfolder setting {value!r}: use a plain relative folder name")
        return ""
    return "/".join(parts)


def _lora_root() -> Path:
    """The WebUI's Lora folder itself (``--lora-dir``, else ``<models dir>/Lora``)."""
    cmd_opts = shared.cmd_opts
    base = getattr(cmd_opts, "lora_dir", None)  # defined by the Lora extension's preload.py
    if not base:
        base = Path(getattr(cmd_opts, "models_dir", None) or _data_dir() / "models") / "Lora"
    return Path(base)


def lora_dir() -> Path:
    """The WebUI's Lora folder (``--lora-dir``), plus our output subfolder setting."""
    base = _lora_root()
    sub = _clean_subfolder(setting(OPT_SUBFOLDER))
    return base / sub if sub else base


def allowed_output_roots() -> list[Path] | None:
    """The folders a run may write its LoRA under: the Lora folder; None (anywhere) only when the
    "allow any output folder" setting is on. A request field alone never widens this."""
    return None if setting(OPT_ANY_OUTPUT_DIR) is True else [_lora_root()]


def api_enabled() -> bool:
    """True when the WebUI serves its API (``--api`` or ``--nowebui``)."""
    cmd_opts = shared.cmd_opts
    return bool(getattr(cmd_opts, "api", False) or getattr(cmd_opts, "nowebui", False))


def api_auth() -> dict[str, str] | None:
    """``--api-auth user:pass[,user2:pass2]`` as {user: password}, None when not set."""
    return parse_credentials(getattr(shared.cmd_opts, "api_auth", None))
