"""File helpers of the workshop: safe file names, unique stems, text/JSON atomic writes, one-line captions.

The portable-name rules themselves live in :mod:`lora_trainer.filenames`; the dataset folder
rules (extensions, hidden files) in :mod:`lora_trainer.data.layout`.
"""

from __future__ import annotations

import json
import os
import unicodedata
from typing import Any

from lora_trainer.filenames import is_windows_reserved, replace_bad_chars
from lora_trainer.files.atomic_write import atomic_write_bytes

__all__ = [
    "MAX_STEM",
    "atomic_write_json",
    "atomic_write_text",
    "caption_text",
    "safe_name",
    "unique_stem",
]

MAX_STEM = 100


def safe_name(name: str, fallback: str = "image") -> str:
    """``name`` made safe as one file or folder name on Windows, macOS and Linux.

    Path separators, ``<>:"|?*`` and control characters become ``_``; trailing dots and spaces
    go; reserved Windows names get a ``_`` prefix; at most 100 characters. Unicode letters are
    kept (NFC-normalised, so macOS and Linux agree on the bytes).
    """
    name = unicodedata.normalize("NFC", name)
    name = replace_bad_chars(name).strip().rstrip(". ")
    if name in ("", ".", ".."):
        name = fallback
    if is_windows_reserved(name):
        name = "_" + name
    return name[:MAX_STEM]


def unique_stem(stem: str, taken: set[str]) -> str:
    """``stem``, or ``stem_2``, ``stem_3`` ... : the first not in ``taken`` (compared lower-case,
    since Windows and macOS file names ignore case). Adds the result to ``taken``."""
    candidate, n = stem, 1
    while candidate.lower() in taken:
        n += 1
        candidate = f"{stem}_{n}"
    taken.add(candidate.lower())
    return candidate


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`~lora_trainer.files.atomic_write.atomic_write_bytes` of ``text`` as UTF-8 (no BOM)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, ensure_ascii=False, indent=1, sort_keys=True).encode("utf-8"))


def caption_text(text: str) -> tuple[str, bool]:
    """(one-line caption, had several lines). Lines are joined with ", " (training reads only the
    first line of a caption file, so a multi-line file would otherwise lose its other lines)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return ", ".join(lines), len(lines) > 1
