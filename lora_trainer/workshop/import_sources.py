"""What an import reads: folders, zips and uploads as one flat list of source entries, read safely.

Sources are only ever read. Zip members and upload names with unsafe paths (``../x``, absolute
paths, drive letters, NUL), symbolic links and encrypted members are rejected and reported;
a zip over :class:`ImportLimits` (members, total size, compression ratio: zip bombs) is refused
as a whole with a :class:`~lora_trainer.errors.DatasetError` before anything is read from it;
the bytes members actually unpack to are counted too (declared sizes can lie), and reading stops
with the same error once they pass those limits.
Copies go through a hidden temporary file, stop at a byte limit and give the source's SHA-256;
:class:`FolderIndex` finds an earlier copy of a source in a concept folder by name and bytes.
What the entries become in a workspace is :mod:`lora_trainer.workshop.importer`'s business.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import re
import stat
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from lora_trainer.data.layout import is_hidden_entry, special_file_kind
from lora_trainer.errors import DatasetError

__all__ = [
    "FolderIndex",
    "ImportLimits",
    "ImportNotes",
    "MiB",
    "SourceEntry",
    "TooLarge",
    "copy_limited",
    "folder_entries",
    "is_inside",
    "member_problem",
    "open_regular",
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
    max_ratio: a zip member, or the whole zip (all its members together, against the zip's
        size), that expands more than this many times (and to more than ``ratio_min_bytes``)
        makes the zip refused: the signature of a zip bomb. Images are already compressed
        (ratio near 1); only flat uncompressed files (BMP) come near it.

    Both the sizes a zip declares (checked before anything is written) and the bytes actually
    unpacked (counted while writing: declared sizes can lie) are held to ``max_total_bytes`` and
    ``max_ratio``.
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


def open_regular(path: str | os.PathLike, follow_links: bool = False) -> IO[bytes]:
    """``path`` opened for reading when it is a regular file; :class:`OSError` otherwise.

    A link is not followed unless ``follow_links`` (``O_NOFOLLOW``, so a link swapped in after
    the folder was listed is refused too); a FIFO, device or socket is refused without waiting
    on it (``O_NONBLOCK``; the type is checked on the opened file itself).
    """
    flags = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0)
    if not follow_links:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


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


@dataclass
class _FolderWalk:
    """What :func:`folder_entries` checks for each file: regular files only; links only with
    ``follow_links`` and then only to regular files inside ``root``."""

    root: Path
    report: ImportNotes
    follow_links: bool

    def _skip(self, code: str, path: Path, message: str, severity: str = "warning") -> None:
        self.report.add(code, path, message, severity)
        self.report.skipped += 1

    def _link_target(self, path: Path) -> os.stat_result | None:
        """The stat of the regular file inside ``root`` that the link ``path`` leads to; None (reported) otherwise."""
        if not self.follow_links:
            self._skip(
                "symlink",
                path,
                f"Skipped {path}: it is a link (links are not followed; copy the file itself into the folder, "
                "or turn on following links for links to files inside the imported folder).",
            )
            return None
        if not is_inside(path, self.root):
            self._skip("symlink_outside", path, f"Skipped {path}: it is a link to a file outside {self.root}.")
            return None
        try:
            st = os.stat(path)
        except OSError as e:
            self._skip("unreadable", path, f"Skipped {path}: a broken link ({e.strerror or e}).")
            return None
        return st

    def entry(self, entry: os.DirEntry, path: Path, rel: tuple[str, ...]) -> SourceEntry | None:
        """The file ``entry`` as a source entry; None (reported) for links and special files not taken."""
        try:
            st = entry.stat(follow_symlinks=False)
            link_st = self._link_target(path) if stat.S_ISLNK(st.st_mode) else st
        except OSError as e:
            self._skip("unreadable", path, f"Cannot read {path} ({e.strerror or e}); it was skipped.", "error")
            return None
        if link_st is None:
            return None
        kind = special_file_kind(link_st.st_mode)
        if kind is not None:
            self._skip("special_file", path, f"Skipped {path}: it is {kind}, not a file; only regular files are read.")
            return None
        opener = functools.partial(open_regular, path, stat.S_ISLNK(st.st_mode))
        return SourceEntry((*rel, entry.name), str(path), link_st.st_size, opener)


def folder_entries(
    src: Path, report: ImportNotes, exclude: Sequence[Path], *, follow_links: bool = False
) -> list[SourceEntry]:
    """Every regular file under ``src`` (depth-first, in name order), leaving out hidden entries,
    links to folders, FIFOs, devices and sockets, and the ``exclude`` folders (all reported).
    Links to files are left out (reported) unless ``follow_links``, and then taken only when
    they lead to a regular file inside ``src``: nothing from outside the source gets in."""
    out: list[SourceEntry] = []
    excluded = {os.path.realpath(p) for p in exclude}
    walk = _FolderWalk(src, report, follow_links)
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
                found = walk.entry(entry, path, rel)
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


def _expansion_cap(archive_bytes: int, limits: ImportLimits) -> int:
    """The most bytes a zip of ``archive_bytes`` may unpack to in all."""
    return min(limits.max_total_bytes, max(limits.ratio_min_bytes, int(limits.max_ratio * max(archive_bytes, 1))))


def _archive_size(zf: zipfile.ZipFile, infos: list[zipfile.ZipInfo]) -> int:
    """The zip file's size on disk (its declared compressed sizes when that cannot be read)."""
    try:
        fp = zf.fp
        if fp is not None:
            return os.fstat(fp.fileno()).st_size
    except (AttributeError, OSError, ValueError):
        pass
    return sum(i.compress_size for i in infos)


def _refuse_expansion(label: str, total: int, archive_bytes: int, limits: ImportLimits, what: str) -> DatasetError:
    ratio = total / max(archive_bytes, 1)
    if total > limits.max_total_bytes:
        why = f"more than the limit of {limits.max_total_bytes / MiB:.0f} MiB in all"
    else:
        why = f"{ratio:.0f} times its own size (limit {limits.max_ratio:.0f}); that is how zip bombs look"
    return DatasetError(
        f"Refused {label}: {what} {total / MiB:.1f} MiB from a {archive_bytes / MiB:.1f} MiB zip, {why}. "
        "Nothing from it was imported. If its files are real, unpack the zip yourself and import the folder, "
        "or split it into smaller zips."
    )


def _check_zip_limits(infos: list[zipfile.ZipInfo], label: str, limits: ImportLimits, archive_bytes: int) -> None:
    """Refuse the whole zip (:class:`DatasetError`) when its declared sizes are over ``limits``."""
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
    if total > _expansion_cap(archive_bytes, limits):  # many members, each small enough on its own
        raise _refuse_expansion(label, total, archive_bytes, limits, "its members would unpack to")


class _ArchiveBudget:
    """Counts the bytes actually unpacked from one zip (each member's bytes once, however often it
    is read); :class:`DatasetError` past the zip's cap."""

    def __init__(self, label: str, archive_bytes: int, limits: ImportLimits):
        self.label, self.archive_bytes, self.limits = label, archive_bytes, limits
        self.cap = _expansion_cap(archive_bytes, limits)
        self.used = 0
        self.seen: dict[int, int] = {}

    def reached(self, member: int, pos: int) -> None:
        """Member number ``member`` has been read up to byte ``pos``."""
        before = self.seen.get(member, 0)
        if pos <= before:
            return
        self.seen[member] = pos
        self.used += pos - before
        if self.used > self.cap:
            raise _refuse_expansion(
                self.label,
                self.used,
                self.archive_bytes,
                self.limits,
                "its members unpack to more than they declare, at least",
            )


class _CountedReader:
    """A zip member's stream whose reads are charged to the archive's :class:`_ArchiveBudget`."""

    def __init__(self, raw: IO[bytes], budget: _ArchiveBudget, member: int):
        self.raw, self.budget, self.member, self.pos = raw, budget, member, 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.pos += len(data)
        self.budget.reached(self.member, self.pos)
        return data

    def close(self) -> None:
        self.raw.close()

    def __enter__(self) -> _CountedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def zip_entries(zf: zipfile.ZipFile, label: str, limits: ImportLimits, report: ImportNotes) -> list[SourceEntry]:
    """The zip's file members as entries; unsafe members are rejected and reported."""
    infos = zf.infolist()
    archive_bytes = _archive_size(zf, infos)
    _check_zip_limits(infos, label, limits, archive_bytes)
    budget = _ArchiveBudget(label, archive_bytes, limits)
    out: list[SourceEntry] = []
    for number, info in enumerate(infos):
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
        out.append(SourceEntry(parts, where, info.file_size, _member_opener(zf, info, budget, number)))
    return out


def _member_opener(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, budget: _ArchiveBudget, number: int
) -> Callable[[], IO[bytes]]:
    def opener() -> IO[bytes]:
        return _CountedReader(zf.open(info, "r"), budget, number)  # type: ignore[return-value]

    return opener


def upload_entry(path: Path, name: str, parts: tuple[str, ...], report: ImportNotes) -> SourceEntry | None:
    """The uploaded file at ``path`` (originally ``name``) as an entry; None (reported) if unreadable."""
    try:
        size = path.stat().st_size
    except OSError as e:
        report.add("unreadable", name, f"Cannot read upload {name} ({e.strerror or e}); it was skipped.", "error")
        report.skipped += 1
        return None
    return SourceEntry(parts, name, size, functools.partial(open_regular, path, True))


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


def copy_limited(
    entry: SourceEntry, dest: Path, limit: int, keep: Callable[[str], bool] | None = None
) -> tuple[str, bool]:
    """Copy ``entry`` to ``dest`` through a hidden temporary file; at most ``limit`` bytes.
    Returns (SHA-256 of the bytes, whether ``dest`` was written): when ``keep`` is given and
    says no for the digest, the copy is dropped and nothing is written."""
    tmp = dest.with_name(f".{dest.name}.import.tmp")
    n = 0
    digest = hashlib.sha256()
    try:
        with entry.open() as src, open(tmp, "wb") as out:
            while True:
                chunk = src.read(_CHUNK)
                if not chunk:
                    break
                n += len(chunk)
                if n > limit:
                    raise TooLarge
                digest.update(chunk)
                out.write(chunk)
        if keep is not None and not keep(digest.hexdigest()):
            os.unlink(tmp)
            return digest.hexdigest(), False
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return digest.hexdigest(), True


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


# -- the workspace side: earlier copies ---------------------------------------------------------


class FolderIndex:
    """The names in a concept folder, by lower-case (stem, ext) and by stem without a ``_<n>``
    suffix, for finding earlier imports of a file."""

    _SUFFIX = re.compile(r"_\d+$")

    def __init__(self, folder: Path):
        self.folder = folder
        self.by_key: dict[tuple[str, str], list[str]] = {}
        self.stems: set[str] = set()
        if folder.is_dir():
            for name in sorted(os.listdir(folder)):
                self.add(name)

    def add(self, name: str) -> None:
        stem, ext = os.path.splitext(name)
        self.stems.add(stem.lower())
        keys = {(stem.lower(), ext.lower()), (self._SUFFIX.sub("", stem).lower(), ext.lower())}
        for k in keys:
            self.by_key.setdefault(k, []).append(name)

    def already_present(self, entry: SourceEntry, stem: str, ext: str) -> Path | None:
        """An earlier import of ``entry``: same bytes, named ``stem`` or ``stem_<n>`` (a collision
        rename). Identical files under other names are not matched: those are duplicates for
        find_duplicates() to flag, not re-imports."""
        for name in self.by_key.get((stem.lower(), ext.lower()), []):
            if same_content(entry, self.folder / name):
                return self.folder / name
        return None
