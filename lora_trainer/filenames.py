"""Portable file-name rules: the one definition of what a file or folder name may be.

Used by the config (``save.output_name``) and the dataset workshop (names of imported files).
A name that passes here is valid on Windows, macOS and Linux.
"""

from __future__ import annotations

import re

__all__ = ["BAD_NAME_CHARS", "WINDOWS_RESERVED_NAMES", "bad_name_chars", "is_windows_reserved", "replace_bad_chars"]

# Characters no file name may hold on Windows (and "/" on every system); control characters too.
BAD_NAME_CHARS = frozenset('<>:"/\\|?*')
_BAD_CHARS_RE = re.compile(r'[<>:"/\\|?*\x00-\x1f\x7f]')

# Device names Windows reserves whatever the extension ("con.txt" is reserved too), any case.
WINDOWS_RESERVED_NAMES = frozenset(
    {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}
)


def is_windows_reserved(name: str) -> bool:
    """True for ``CON``, ``nul.txt``, ``com1.png`` …: names Windows refuses whatever the case."""
    return name.split(".")[0].strip().lower() in WINDOWS_RESERVED_NAMES


def bad_name_chars(name: str) -> list[str]:
    """The characters of ``name`` that no portable file name may hold, sorted, each once."""
    return sorted(set(_BAD_CHARS_RE.findall(name)))


def replace_bad_chars(name: str, replacement: str = "_") -> str:
    """``name`` with every character :func:`bad_name_chars` reports replaced."""
    return _BAD_CHARS_RE.sub(replacement, name)
