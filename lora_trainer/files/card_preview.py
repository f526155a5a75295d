"""The preview image of a LoRA's card in the WebUI's extra-networks pane.

The WebUI (``modules/ui_extra_networks.py``, ``find_preview``) shows ``<stem>.<ext>`` or
``<stem>.preview.<ext>`` beside the file (ext: png, jpg, jpeg, webp, gif); without one the card
says "NO PREVIEW". A finished run writes its last preview image as ``<stem>.preview.png``. A preview
that is already there (one the user made) is kept, unless the run replaced the LoRA file itself.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from lora_trainer.files.atomic_write import atomic_write_bytes, unlink_quietly, write_temp
from lora_trainer.log import logger

__all__ = ["PREVIEW_EXTENSIONS", "card_preview_path", "existing_card_previews", "write_card_preview"]

PREVIEW_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "gif")  # the WebUI's default_allowed_preview_extensions


def card_preview_path(lora_path: str | os.PathLike) -> Path:
    """``<stem>.preview.png`` beside ``lora_path``."""
    path = Path(lora_path)
    return path.with_name(f"{path.stem}.preview.png")


def existing_card_previews(lora_path: str | os.PathLike) -> list[Path]:
    """The preview files the WebUI would show for ``lora_path``, in its order of lookup."""
    path = Path(lora_path)
    names = [n for ext in PREVIEW_EXTENSIONS for n in (f"{path.stem}.{ext}", f"{path.stem}.preview.{ext}")]
    return [path.with_name(n) for n in names if os.path.lexists(path.with_name(n))]


def write_card_preview(lora_path: str | os.PathLike, samples: Sequence[str], *, replace: bool) -> Path | None:
    """Write the last of ``samples`` as the card preview of ``lora_path``; the path written, or None.

    ``replace``: the run wrote over an existing LoRA file, so its old preview goes too. Otherwise an
    existing preview is kept (also one made while this runs: the final step is a no-clobber link).
    Nothing is raised: a card without a preview must not fail a finished run.
    """
    if not samples:
        return None
    target = card_preview_path(lora_path)
    try:
        data = Path(samples[-1]).read_bytes()
        if replace:
            return atomic_write_bytes(target, data, overwrite=True)
        if existing_card_previews(lora_path):
            return None
        tmp = write_temp(target.parent, target.name, [data])
        try:
            os.link(tmp, target)
        except FileExistsError:
            return None
        except (OSError, NotImplementedError):  # no hard links here: check, then rename
            if os.path.lexists(target):
                return None
            os.replace(tmp, target)
        finally:
            unlink_quietly(tmp)
        return target
    except OSError as e:
        logger.warning("no card preview for %s: could not write %s (%s)", Path(lora_path).name, target, e)
        return None
