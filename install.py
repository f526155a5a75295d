"""Installs what sd-webui-lora-train needs beyond the WebUI, and only what is missing.

The WebUI runs this file at start (``python install.py`` with its own folder on PYTHONPATH, so
``launch`` imports) unless it runs with ``--skip-install``. It checks each package with
``launch.is_installed`` and installed versions with importlib.metadata, and calls
``launch.run_pip`` only for a package that is missing or older than our minimum, so a complete
setup starts offline and nothing the WebUI pins is touched: never torch, gradio or transformers,
never a downgrade. bitsandbytes (AdamW8bit) is installed only where it is missing and CUDA works.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
from collections.abc import Callable
from types import ModuleType
from typing import NamedTuple


class Requirement(NamedTuple):
    module: str  # import name, for launch.is_installed
    dist: str  # distribution name, for pip and importlib.metadata
    minimum: str
    needs_cuda: bool = False

    @property
    def spec(self) -> str:
        return f"{self.dist}>={self.minimum}"


REQUIREMENTS = (
    Requirement("toml", "toml", "0.10.2"),  # reads kohya TOML on Python 3.10 (the WebUI's)
    Requirement("lion_pytorch", "lion-pytorch", "0.1.2"),  # optimizer "Lion"
    Requirement("prodigyopt", "prodigyopt", "1.0"),  # optimizer "Prodigy"
    Requirement("bitsandbytes", "bitsandbytes", "0.41.1", needs_cuda=True),  # optimizer "AdamW8bit"
)

NEVER = frozenset({"torch", "torchvision", "gradio", "transformers", "numpy", "safetensors", "pillow"})
"""The WebUI's own pins: never installed or upgraded from here."""


def _version_tuple(text: str) -> tuple[int, ...]:
    """'1.1.2rc1' -> (1, 1, 2), '2.0.0+cu118' -> (2, 0, 0): the leading numbers, enough for a minimum."""
    parts = []
    for piece in text.split("."):
        match = re.match(r"\d+", piece)
        if match is None:
            break
        parts.append(int(match.group()))
        if match.end() < len(piece):
            break
    return tuple(parts)


def installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cuda_available() -> bool:
    """Whether torch sees a CUDA device (only asked when bitsandbytes is missing)."""
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - a broken torch means no CUDA; install must never crash the WebUI's start
        return False


def needed(
    launch: ModuleType,
    *,
    version_of: Callable[[str], str | None] = installed_version,
    has_cuda: Callable[[], bool] = cuda_available,
) -> list[Requirement]:
    """The requirements to install: missing, or installed below our minimum (an upgrade, never a downgrade)."""
    out = []
    for req in REQUIREMENTS:
        if launch.is_installed(req.module):
            current = version_of(req.dist)
            if current is None or _version_tuple(current) >= _version_tuple(req.minimum):
                continue
        elif req.needs_cuda and not has_cuda():
            continue
        out.append(req)
    return out


def install(launch: ModuleType, **kwargs) -> list[str]:
    """Install what ``needed`` lists with ``launch.run_pip``; returns the pip specs it asked for."""
    if getattr(getattr(launch, "args", None), "skip_install", False):
        return []
    done = []
    for req in needed(launch, **kwargs):
        if req.dist.lower() in NEVER:  # a safety net for future edits of REQUIREMENTS
            continue
        try:
            launch.run_pip(f'install "{req.spec}"', f"sd-webui-lora-train requirement: {req.spec}")
        except Exception as exc:  # noqa: BLE001 - never crash the WebUI's start; the optimizer needing it says so
            sys.stderr.write(f"sd-webui-lora-train: could not install {req.spec}: {exc}\n")
        done.append(req.spec)
    return done


if __name__ == "__main__":
    import launch as webui_launch

    install(webui_launch)
