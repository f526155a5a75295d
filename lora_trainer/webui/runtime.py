"""The extension's one WebUIHost and JobManager, and the WebUI callbacks that use them.

``scripts/lora_train.py`` registers ``on_ui_tabs``, ``on_ui_settings`` and ``on_app_started``
from here; ``start_values`` turns the WebUI's "LoRA Train" settings (start preset, preview
sampler and steps) into what a fresh tab shows. The host and manager are made on first use and
live as long as the process, so a job keeps running (and the tab reconnects to it) across the
WebUI's "Reload UI".
Imports of the WebUI (``lora_trainer.backends.webui.*``) and gradio (``lora_trainer.webui.ui``,
``lora_trainer.webui.settings``) happen inside the callbacks, never at import time.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

from lora_trainer.config import TrainConfig, load_preset
from lora_trainer.errors import ConfigError
from lora_trainer.jobs import JobManager
from lora_trainer.log import logger, warning_once

_lock = threading.Lock()
_manager: JobManager | None = None


def _captioners() -> ModuleType:
    """The backend's DeepBooru/BLIP captioners module (imported when a caption run starts)."""
    from lora_trainer.backends.webui import captioners

    return captioners


def manager() -> JobManager:
    """The process's JobManager over the WebUI host (made on the first call)."""
    from lora_trainer.backends.webui.host import WebUIHost

    global _manager
    with _lock:
        if _manager is None:
            _manager = JobManager(WebUIHost())
        return _manager


def preset_dir() -> Path:
    """User presets: ``<work dir>/presets`` (the tab, the API and the settings list read the same)."""
    return Path(manager().host.work_dir) / "presets"


def start_values() -> tuple[str | None, dict[str, Any]]:
    """What a fresh tab shows, from the WebUI settings: the start preset (all its settings) and
    the preview sampler and steps (where that preset leaves them at our defaults)."""
    from lora_trainer.backends.webui.options import OPT_PRESET, sample_defaults, setting

    name = setting(OPT_PRESET) or None
    values: dict[str, Any] = {}
    if name:
        try:
            values = load_preset(name, preset_dir()).to_flat()
        except ConfigError as exc:
            warning_once(f"LoRA Train start preset {name!r} ignored: {exc}")
            name = None
    ours = TrainConfig().to_flat()
    for key, value in sample_defaults().items():
        path = f"sample.{key}"
        if values.get(path, ours[path]) == ours[path]:
            values[path] = value
    return name, values


def workshop_root() -> Path:
    """Dataset workshop workspaces: ``<work dir>/datasets``."""
    return Path(manager().host.work_dir) / "datasets"


def on_ui_tabs() -> list[tuple[Any, str, str]]:
    from lora_trainer.webui import workshop_ui
    from lora_trainer.webui.ui import TAB_ID, TAB_TITLE, create_tab
    from lora_trainer.webui.workshop_captioners import default_captioners

    jobs = manager()
    workshop = functools.partial(
        workshop_ui.build,
        workspaces_root=workshop_root(),
        # DeepBooru and BLIP come from the backend, imported when a caption run starts
        captioners=default_captioners(_captioners, Path(jobs.host.work_dir) / "wd14"),
    )
    tab = create_tab(jobs, jobs.host, preset_dir=preset_dir(), start_values=start_values, workshop=workshop)
    return [(tab, TAB_TITLE, TAB_ID)]


def on_ui_settings() -> None:
    from lora_trainer.webui.settings import register_settings

    register_settings()


def on_app_started(demo: Any, app: Any) -> None:
    """Mount the REST API (``/lora-train/v1/...``) when the WebUI runs with ``--api``."""
    from lora_trainer.backends.webui.options import api_auth, api_enabled

    if not api_enabled():
        return
    from lora_trainer.webui.api import mount

    mount(app, manager(), auth=api_auth(), preset_dir=preset_dir())
    logger.info("REST API mounted under /lora-train/v1")
