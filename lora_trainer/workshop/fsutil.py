"""File helpers of the workshop: atomic writes, safe file names, caption decoding, hashing."""

from __future__ import annotations

import json
import os
import re
import unicodedata
from typing import Any

from ..data.cache import file_sha256
from ..data.captions import decode_caption_bytes
from ..data.dataset import is_hidden_entry, is_hidden_name
from ..io import atomic_write_bytes

__all__ = [
    "CAPTION_EXT",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "decode_caption_bytes",
    "file_sha256",
    "is_hidden_entry",
    "is_hidden_name",
    "safe_name",
    "unique_stem",
]

CAPTION_EXT = ".txt"  # the one caption store training reads

_BAD_CHARS = re.compile(r'[<>:"/\\|?*\x00-\x1f\x7f]')
_WIN_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
MAX_STEM = 100


def safe_name(name: str, fallback: str = "image") -> str:
    """``name`` made safe as one file or folder name on Windows, macOS and Linux.

    Path separators, ``<>:"|?*`` and control characters become ``_``; trailing dots and spaces
    go; reserved Windows names get a ``_`` prefix; at most 100 characters. Unicode letters are
    kept (NFC-normalised, so macOS and Linux agree on the bytes).
    """
    name = unicodedata.normalize("NFC", name)
    name = _BAD_CHARS.sub("_", name).strip().rstrip(". ")
    if name in ("", ".", ".."):
        name = fallback
    if name.split(".")[0].upper() in _WIN_RESERVED:
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
    """:func:`atomic_write_bytes` of ``text`` as UTF-8 (no BOM)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, ensure_ascii=False, indent=1, sort_keys=True).encode("utf-8"))


def caption_text(text: str) -> tuple[str, bool]:
    """(one-line caption, had several lines). Lines are joined with ", " (training reads only the
    first line of a caption file, so a multi-line file would otherwise lose its other lines)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return ", ".join(lines), len(lines) > 1
