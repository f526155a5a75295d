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
    "MAX_CAPTION_BYTES",
    "MAX_STEM",
    "atomic_write_json",
    "atomic_write_text",
    "caption_text",
    "fix_undecodable",
    "is_undecodable",
    "rename_reason",
    "safe_name",
    "unique_stem",
]

# The longest name safe_name() returns, in UTF-8 bytes (file systems count bytes: 255 on
# ext4/APFS/NTFS-in-UTF-16 is ~255 chars, but a CJK character is 3 bytes). It leaves room under
# 255 bytes for an extension, a ``_<n>`` collision suffix and the hidden temp names writers use
# (``.<name>.<random>.tmp``, ``.<name>.import.tmp``).
MAX_STEM_BYTES = 150
MAX_CAPTION_BYTES = 1 << 20  # a caption file above this is not a caption (import skips it, clean sets it aside)
MAX_STEM = MAX_STEM_BYTES  # former name (it was a character count)


def is_undecodable(name: str) -> bool:
    """True for a name read from a file system that was not valid UTF-8 (Python keeps its bad
    bytes as lone surrogates, which cannot be written to JSON, logs or web pages)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _byte_char(ch: str) -> str:
    """A lone surrogate ``\\udcXX`` (the undecodable byte XX) read as cp1252, the usual encoding
    of such names (``caf\\xe9`` -> ``café``); ``_`` for bytes cp1252 has no character for."""
    code = ord(ch)
    if not 0xDC80 <= code <= 0xDCFF:
        return "_" if 0xD800 <= code <= 0xDFFF else ch
    try:
        return bytes([code - 0xDC00]).decode("cp1252")
    except UnicodeDecodeError:
        return "_"


def fix_undecodable(name: str) -> str:
    """``name`` with every undecodable byte replaced by its cp1252 character (or ``_``)."""
    return "".join(_byte_char(c) for c in name) if is_undecodable(name) else name


def _cap_bytes(name: str, limit: int) -> str:
    """``name`` cut to at most ``limit`` UTF-8 bytes, on a character boundary."""
    data = name.encode("utf-8")
    if len(data) <= limit:
        return name
    return data[:limit].decode("utf-8", errors="ignore").rstrip(". ")


def safe_name(name: str, fallback: str = "image") -> str:
    """``name`` made safe as one file or folder name on Windows, macOS and Linux.

    Bytes that were not valid UTF-8 are read as cp1252 (or become ``_``); path separators,
    ``<>:"|?*`` and control characters become ``_``; trailing dots and spaces go; reserved
    Windows names get a ``_`` prefix; at most :data:`MAX_STEM_BYTES` UTF-8 bytes. Unicode
    letters are kept (NFC-normalised, so macOS and Linux agree on the bytes).
    """
    name = unicodedata.normalize("NFC", fix_undecodable(name))
    name = replace_bad_chars(name).strip().rstrip(". ")
    if name in ("", ".", ".."):
        name = fallback
    if is_windows_reserved(name):
        name = "_" + name
    return _cap_bytes(name, MAX_STEM_BYTES) or fallback


def rename_reason(name: str) -> str:
    """Why :func:`safe_name` changes ``name``, for the import report."""
    if is_undecodable(name):
        return "because its name was not valid UTF-8 (its odd bytes were read as cp1252 or became '_')"
    if len(unicodedata.normalize("NFC", name).encode("utf-8")) > MAX_STEM_BYTES:
        return (
            f"because its name was longer than {MAX_STEM_BYTES} bytes (UTF-8); it was shortened "
            "to fit the 255-byte file-name limit with room for the workshop's own files"
        )
    return "to make the name safe on every system"


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
    """``obj`` as UTF-8 JSON; as ASCII JSON (``\\u`` escapes, which read back the same) when it
    holds a name that is not valid UTF-8, so no file name can make a workshop store unwritable."""
    text = json.dumps(obj, ensure_ascii=False, indent=1, sort_keys=True)
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        data = json.dumps(obj, ensure_ascii=True, indent=1, sort_keys=True).encode("ascii")
    atomic_write_bytes(path, data)


def caption_text(text: str) -> tuple[str, bool]:
    """(one-line caption, had several lines). Lines are joined with ", " (training reads only the
    first line of a caption file, so a multi-line file would otherwise lose its other lines)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return ", ".join(lines), len(lines) > 1
