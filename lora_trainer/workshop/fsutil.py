"""File helpers of the workshop: atomic writes, safe file names, caption decoding, hashing."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import unicodedata
from pathlib import Path
from typing import Any

__all__ = [
    "CAPTION_EXT",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "decode_caption_bytes",
    "file_sha256",
    "is_hidden_name",
    "safe_name",
    "unique_stem",
]

CAPTION_EXT = ".txt"  # the one caption store training reads

_FILE_ATTRIBUTE_HIDDEN = 0x2
_BAD_CHARS = re.compile(r'[<>:"/\\|?*\x00-\x1f\x7f]')
_WIN_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
MAX_STEM = 100


def is_hidden_name(name: str) -> bool:
    """Dot-files, macOS resource forks (``__MACOSX``) and Windows ``Thumbs.db``/``desktop.ini``."""
    return name.startswith(".") or name == "__MACOSX" or name.lower() in ("thumbs.db", "desktop.ini")


def is_hidden_entry(entry: os.DirEntry) -> bool:
    """:func:`is_hidden_name`, or the Windows hidden attribute."""
    if is_hidden_name(entry.name):
        return True
    try:
        attrs = getattr(entry.stat(follow_symlinks=False), "st_file_attributes", 0)
    except OSError:
        return False
    return bool(attrs & _FILE_ATTRIBUTE_HIDDEN)


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


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to a hidden temporary file beside ``path``, then rename it over ``path``.

    Readers see the old or the new content, never half a file; a crash leaves at most a hidden
    ``.<name>.*.tmp`` file, which the dataset scan ignores. ``durable`` flushes the data to disk
    before the rename (fsync).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` as UTF-8 (no BOM)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, ensure_ascii=False, indent=1, sort_keys=True).encode("utf-8"))


def decode_caption_bytes(data: bytes) -> tuple[str, str | None]:
    """(text, fallback encoding or None): UTF-8 (BOM skipped), else cp1252, else latin-1."""
    with contextlib.suppress(UnicodeDecodeError):
        return data.decode("utf-8-sig"), None
    try:
        return data.decode("cp1252"), "cp1252"
    except UnicodeDecodeError:
        return data.decode("latin-1"), "latin-1"


def caption_text(text: str) -> tuple[str, bool]:
    """(one-line caption, had several lines). Lines are joined with ", " (training reads only the
    first line of a caption file, so a multi-line file would otherwise lose its other lines)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return ", ".join(lines), len(lines) > 1


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()
