"""What an import reads: folders, zips and uploads as one flat list of source entries, read safely.

Sources are only ever read. Zip members and upload names with unsafe paths (``../x``, absolute
paths, drive letters, NUL), symbolic links and encrypted members are rejected and reported;
a zip over :class:`ImportLimits` (members, total size, compression ratio: zip bombs) is refused
as a whole with a :class:`~lora_trainer.errors.DatasetError` before anything is read from it.
Copies go through a hidden temporary file and stop at a byte limit. What the entries become in
a workspace is :mod:`lora_trainer.workshop.importer`'s business.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import stat
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from lora_trainer.data.layout import is_hidden_entry
from lora_trainer.errors import DatasetError

__all__ = [
    "ImportLimits",
    "ImportNotes",
    "MiB",
    "SourceEntry",
    "TooLarge",
    "copy_limited",
    "folder_entries",
    "is_inside",
    "member_problem",
    "read_limited",
    "same_content",
    "source_parts",
    "upload_entry",
    "zip_entries",
]

MiB = 1 << 20
_CHUNK = 1 << 20
_DRIVE_RE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class ImportLimits:
    """Limits that protect the disk and the process from hostile or broken input.

    max_file_bytes: largest single file (uncompressed) imported; bigger files are skipped.
    max_members / max_total_bytes: a zip with more members, or more uncompressed bytes in all,
        is refused as a whole.
    max_ratio: a zip member that expands more than this many times (and to more than
        ``ratio_min_bytes``) makes the zip refused: the signature of a zip bomb. Images are
        already compressed (ratio near 1); only flat uncompressed files (BMP) come near it.
    """

    max_file_bytes: int = 256 * MiB
    max_members: int = 20_000
    max_total_bytes: int = 8 * 1024 * MiB
    max_ratio: float = 200.0
    ratio_min_bytes: int = 16 * MiB


class ImportNotes(Protocol):
    """Where the source readers note what they skipped (the import's report)."""

    skipped: int

    def add(self, code: str, path: Any, message: str, severity: str = "warning") -> Any: ...


@dataclass
class SourceEntry:
    """One source file: its path below the import root as components, how reports name it,
    its size, and how to open it for reading."""

    parts: tuple[str, ...]
    display: str
    size: int
    open: Callable[[], IO[bytes]]

    @property
    def ext(self) -> str:
        return os.path.splitext(self.parts[-1])[1].lower()

    @property
    def stem(self) -> str:
        return os.path.splitext(self.parts[-1])[0]


def is_inside(child: Path, parent: Path) -> bool:
    """True when ``child`` (links resolved) lies in ``parent`` or is it."""
    try:
        Path(os.path.realpath(child)).relative_to(os.path.realpath(parent))
        return True
    except ValueError:
        return False


def source_parts(name: str) -> tuple[str, ...]:
    """A zip member's or upload's name as path components (``\\`` counts as ``/``; empty and ``.`` dropped)."""
    return tuple(p for p in name.replace("\\", "/").split("/") if p not in ("", "."))


# -- folders ---------------------------------------------------------------------------------------


def _is_dir_and_link(entry: os.DirEntry) -> tuple[bool, bool]:
    try:
        return entry.is_dir(), entry.is_symlink()
    except OSError:
        return False, False


def _scan_folder(folder: Path, report: ImportNotes) -> list[os.DirEntry] | None:
    try:
        return sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        report.add("unreadable", folder, f"Cannot read folder {folder} ({e.strerror or e}); it was skipped.", "error")
        return None


def _folder_subdir(path: Path, is_link: bool, excluded: set[str], report: ImportNotes) -> bool:
    """True when the sub-folder at ``path`` is walked; reports why not otherwise."""
    if is_link:
        report.add("symlink_folder", path, f"Skipped {path}: a link to a folder (copy its files instead).")
    elif os.path.realpath(path) in excluded:
        report.add("workspace_folder", path, f"Skipped {path}: it is a workshop folder.", "info")
    else:
        return True
    return False


def _file_entry(entry: os.DirEntry, path: Path, rel: tuple[str, ...], report: ImportNotes) -> SourceEntry | None:
    try:
        size = entry.stat().st_size
    except OSError as e:
        report.add("unreadable", path, f"Cannot read {path} ({e.strerror or e}); it was skipped.", "error")
        report.skipped += 1
        return None
    return SourceEntry((*rel, entry.name), str(path), size, functools.partial(open, path, "rb"))


def folder_entries(src: Path, report: ImportNotes, exclude: Sequence[Path]) -> list[SourceEntry]:
    """Every file under ``src`` (depth-first, in name order), leaving out hidden entries, links to
    folders and the ``exclude`` folders (all reported)."""
    out: list[SourceEntry] = []
    excluded = {os.path.realpath(p) for p in exclude}
    stack: list[tuple[Path, tuple[str, ...]]] = [(src, ())]
    while stack:
        folder, rel = stack.pop()
        entries = _scan_folder(folder, report)
        if entries is None:
            continue
        subdirs = []
        for entry in entries:
            path = Path(entry.path)
            is_dir, is_link = _is_dir_and_link(entry)
            if is_hidden_entry(entry):
                report.add("hidden", path, f"Skipped hidden {'folder' if is_dir else 'file'} {path}.", "info")
                report.skipped += 1
            elif is_dir:
                if _folder_subdir(path, is_link, excluded, report):
                    subdirs.append((path, (*rel, entry.name)))
            else:
                found = _file_entry(entry, path, rel, report)
                if found is not None:
                    out.append(found)
        stack.extend(reversed(subdirs))
    return out


# -- zips and uploads ------------------------------------------------------------------------------


def member_problem(info: zipfile.ZipInfo) -> tuple[str, str] | None:
    """(code, reason) when a zip member (or an upload's name) must not be extracted, else None."""
    name = info.filename
    mode = info.external_attr >> 16
    if "\x00" in name:
        return "zip_slip", "its name contains a NUL character"
    norm = name.replace("\\", "/")
    if norm.startswith("/"):
        return "zip_slip", "it has an absolute path"
    if _DRIVE_RE.match(norm):
        return "zip_slip", "its path starts with a drive letter"
    if any(p == ".." for p in norm.split("/")):
        return "zip_slip", "its path leads outside the archive folder ('..')"
    if stat.S_ISLNK(mode):
        return "zip_symlink", "it is a symbolic link"
    if info.flag_bits & 0x1:
        return "zip_encrypted", "it is encrypted (password-protected zips are not supported; unzip it first)"
    return None


def _check_zip_limits(infos: list[zipfile.ZipInfo], label: str, limits: ImportLimits) -> None:
    """Refuse the whole zip (:class:`DatasetError`) when it is over ``limits``."""
    if len(infos) > limits.max_members:
        raise DatasetError(
            f"Refused {label}: it has {len(infos)} entries, more than the limit of {limits.max_members}. "
            "Split it into smaller zips or unpack it and import the folder."
        )
    total = sum(i.file_size for i in infos)
    if total > limits.max_total_bytes:
        raise DatasetError(
            f"Refused {label}: it would unpack to {total / MiB:.0f} MiB, more than the limit of "
            f"{limits.max_total_bytes / MiB:.0f} MiB. Split it, or unpack it yourself and import the folder."
        )
    for i in infos:
        if i.file_size > limits.ratio_min_bytes and i.file_size > limits.max_ratio * max(i.compress_size, 1):
            raise DatasetError(
                f"Refused {label}: member {i.filename!r} expands from {i.compress_size} bytes to {i.file_size} bytes "
                f"({i.file_size / max(i.compress_size, 1):.0f} times, limit {limits.max_ratio:.0f}); that is how "
                "zip bombs look. If it is a real file, unpack the zip yourself and import the folder."
            )


def zip_entries(zf: zipfile.ZipFile, label: str, limits: ImportLimits, report: ImportNotes) -> list[SourceEntry]:
    """The zip's file members as entries; unsafe members are rejected and reported."""
    infos = zf.infolist()
    _check_zip_limits(infos, label, limits)
    out: list[SourceEntry] = []
    for info in infos:
        if info.is_dir():
            continue
        where = f"{label}:{info.filename}"
        problem = member_problem(info)
        if problem is not None:
            code, why = problem
            report.add(
                code, where, f"Rejected zip member {info.filename!r}: {why}. Nothing was written for it.", "error"
            )
            report.skipped += 1
            continue
        parts = source_parts(info.filename)
        if not parts:
            continue
        out.append(SourceEntry(parts, where, info.file_size, lambda i=info: zf.open(i, "r")))
    return out


def upload_entry(path: Path, name: str, parts: tuple[str, ...], report: ImportNotes) -> SourceEntry | None:
    """The uploaded file at ``path`` (originally ``name``) as an entry; None (reported) if unreadable."""
    try:
        size = path.stat().st_size
    except OSError as e:
        report.add("unreadable", name, f"Cannot read upload {name} ({e.strerror or e}); it was skipped.", "error")
        report.skipped += 1
        return None
    return SourceEntry(parts, name, size, functools.partial(open, path, "rb"))


# -- reading and copying ---------------------------------------------------------------------------


class TooLarge(Exception):
    """A source turned out larger than the limit while being read."""


def read_limited(entry: SourceEntry, limit: int) -> bytes:
    """The entry's bytes; :class:`TooLarge` past ``limit`` bytes."""
    with entry.open() as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise TooLarge
    return data


def copy_limited(entry: SourceEntry, dest: Path, limit: int) -> None:
    """Copy ``entry`` to ``dest`` through a hidden temporary file; at most ``limit`` bytes."""
    tmp = dest.with_name(f".{dest.name}.import.tmp")
    n = 0
    try:
        with entry.open() as src, open(tmp, "wb") as out:
            while True:
                chunk = src.read(_CHUNK)
                if not chunk:
                    break
                n += len(chunk)
                if n > limit:
                    raise TooLarge
                out.write(chunk)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def same_content(entry: SourceEntry, path: Path) -> bool:
    """True when the file at ``path`` holds exactly the entry's bytes."""
    try:
        if path.stat().st_size != entry.size:
            return False
        with entry.open() as a, open(path, "rb") as b:
            while True:
                x, y = a.read(_CHUNK), b.read(_CHUNK)
                if x != y:
                    return False
                if not x:
                    return True
    except (OSError, zipfile.BadZipFile):
        return False
