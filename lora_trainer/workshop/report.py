"""Report building blocks shared by the workshop: :class:`Problem` and JSON conversion.

Every workshop operation returns a small dataclass report. ``report.to_dict()`` gives plain
JSON types only (str, int, float, bool, None, list, dict with str keys), so the UI and the
HTTP API can pass it on as is. Paths in reports are workspace-relative posix strings for
files in the workspace, and the path as the user gave it for source files.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

__all__ = ["Problem", "Report", "jsonable"]

SEVERITIES = ("info", "warning", "error")


@dataclass
class Problem:
    """One thing that went wrong (or was changed) with one file.

    code: a stable machine-readable identifier (``"corrupt"``, ``"zip_slip"``, ...), for the UI
        to group or translate. message: a sentence for people, naming the file and what to do.
    path: the file concerned. severity: ``"info"`` (we fixed it), ``"warning"`` (skipped or
        flagged; worth a look) or ``"error"`` (the file could not be used).
    """

    code: str
    path: str
    message: str
    severity: str = "warning"

    def __post_init__(self):
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, not {self.severity!r}")
        self.path = _path_str(self.path)


def _path_str(p: Any) -> str:
    if isinstance(p, PurePath):
        return p.as_posix()
    if isinstance(p, os.PathLike):
        return os.fspath(p)
    return str(p)


def jsonable(value: Any) -> Any:
    """``value`` converted to JSON types: dataclasses to dicts, paths to posix strings,
    tuples and sets to lists, (w, h) dict keys to ``"WxH"``."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, PurePath):
        return value.as_posix()
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if isinstance(k, tuple) and len(k) == 2:
                k = f"{k[0]}x{k[1]}"
            out[str(k)] = jsonable(v)
        return out
    if isinstance(value, (set, frozenset)):
        return sorted(jsonable(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


@dataclass
class Report:
    """Base of the workshop reports: a list of :class:`Problem` and ``to_dict()``."""

    problems: list[Problem] = field(default_factory=list)

    def add(self, code: str, path: Any, message: str, severity: str = "warning") -> Problem:
        p = Problem(code, path, message, severity)
        self.problems.append(p)
        return p

    def problems_with(self, code: str) -> list[Problem]:
        return [p for p in self.problems if p.code == code]

    def codes(self) -> set[str]:
        return {p.code for p in self.problems}

    def problem_paths(self, code: str) -> list[str]:
        return [p.path for p in self.problems if p.code == code]

    def to_dict(self) -> dict:
        """The report as JSON types (see :func:`jsonable`)."""
        return jsonable(self)


def some(items: Iterable[str], n: int = 5) -> str:
    """The first ``n`` items joined by ", ", with "and K more" after them."""
    items = list(items)
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")
