"""Atomic file writes: a hidden temp file in the target folder, fsync, then a rename or a no-clobber link.

Readers see the old or the new content, never half a file; nothing is left behind when a write
fails. Without ``overwrite`` an existing file is never replaced: the first free ``name_N.ext``
(:func:`free_path`) is taken instead, race-free where the file system has hard links.
"""

from __future__ import annotations

import errno
import functools
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import cast

from lora_trainer.errors import LoraTrainerError
from lora_trainer.log import logger

__all__ = [
    "FolderNotWritable",
    "atomic_write_bytes",
    "folder_not_writable",
    "free_path",
    "publish",
    "unlink_quietly",
    "write_temp",
]

_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_NO_WRITE = {errno.EACCES, errno.EPERM, errno.EROFS}


class FolderNotWritable(LoraTrainerError, OSError):
    """A write failed because its folder is read-only or its disk is full; the message names the
    folder and what to do (never the hidden temp file). Still an :class:`OSError` (same ``errno``)."""


def folder_not_writable(exc: OSError, folder: str | os.PathLike) -> FolderNotWritable | None:
    """``exc`` as a :class:`FolderNotWritable` about ``folder`` when it is a permission or full-disk
    error; None for other errors."""
    if isinstance(exc, FolderNotWritable):
        return exc
    if exc.errno in _NO_SPACE:
        why, todo = "the disk is full", "Free some space there (or move it to a disk with room)"
    elif exc.errno in _NO_WRITE:
        why = "it is read-only or the WebUI's user may not write there"
        todo = "Make it writable (check its permissions, and that its disk is not mounted read-only)"
    else:
        return None
    err = FolderNotWritable(f"Cannot write to the folder {os.fspath(folder)}: {why}. {todo}, then try again.")
    err.errno = exc.errno
    return err


def free_path(path: str | os.PathLike) -> Path:
    """``path`` if nothing exists there, else the first free ``stem_1.ext``, ``stem_2.ext`` ..."""
    path = Path(path)
    if not os.path.lexists(path):
        return path
    suffix = "".join(path.suffixes[-1:])
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    i = 1
    while True:
        candidate = path.with_name(f"{stem}_{i}{suffix}")
        if not os.path.lexists(candidate):
            return candidate
        i += 1


def _fsync_dir(directory: Path) -> None:
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@functools.cache
def _new_file_mode() -> int:
    """The mode ``open()`` gives a new file (0o666 less the umask). ``mkstemp`` makes its files
    0o600, which would leave a finished LoRA unreadable to other users of the machine."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            umask = next((int(line.split()[1], 8) for line in f if line.startswith("Umask:")), 0o022)
    except (OSError, ValueError):
        umask = 0o022
    return 0o666 & ~umask


def _temp_stem(stem: str, limit: int = 100) -> str:
    """``stem`` cut to ``limit`` bytes for a temp name: names near the 255-byte limit of file
    systems (long CJK names) must still get a temp file beside them."""
    data = os.fsencode(stem)
    return stem if len(data) <= limit else os.fsdecode(data[:limit].decode("utf-8", "ignore").encode("utf-8"))


def write_temp(directory: Path, stem: str, chunks: Iterable[bytes | memoryview], durable: bool = True) -> Path:
    """Write ``chunks`` to a fresh hidden temp file in ``directory`` (fsync'ed if ``durable``); removed on failure."""
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{_temp_stem(stem)}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        if hasattr(os, "fchmod"):  # POSIX: the mode a plain open() would have given the file
            os.fchmod(fd, _new_file_mode())
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            if durable:
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        unlink_quietly(tmp)
        raise
    return tmp


def unlink_quietly(path: Path) -> None:
    """Remove ``path`` if it is there; a failure is logged, not raised."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as e:
        logger.warning("could not remove temporary file %s: %s", path, e)


def publish(tmp: Path, target: Path, overwrite: bool) -> Path:
    """Move the finished temp file to ``target`` (or the first free ``target_N`` name)."""
    try:
        if overwrite:
            os.replace(tmp, target)
            final = target
        else:
            final = _publish_no_clobber(tmp, target)
    except BaseException:
        unlink_quietly(tmp)
        raise
    _fsync_dir(target.parent)
    return final


def _publish_no_clobber(tmp: Path, target: Path) -> Path:
    candidate = free_path(target)
    while True:
        try:
            # a hard link fails if the name exists: no race with another writer picking the same name
            os.link(tmp, candidate)
        except FileExistsError:
            candidate = free_path(target)
            continue
        except (OSError, NotImplementedError):
            # file system without hard links: check-then-rename (a tiny race window remains)
            candidate = free_path(target)
            os.replace(tmp, candidate)
            return candidate
        unlink_quietly(tmp)
        return candidate


def atomic_write_bytes(
    path: str | os.PathLike,
    chunks: Iterable[bytes | memoryview] | bytes,
    *,
    overwrite: bool = True,
    durable: bool = True,
) -> Path:
    """Write a file atomically (hidden temp in the same folder, fsync, rename). Returns the path written.

    Readers see the old or the new content, never half a file. ``durable=False`` skips the
    fsync (for bulk copies whose loss on power failure is harmless).
    """
    path = Path(path)
    parts: Iterable[bytes | memoryview]
    if isinstance(chunks, (bytes, bytearray, memoryview)):
        parts = [cast("bytes | memoryview", chunks)]
    else:
        parts = chunks
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = write_temp(path.parent, path.name, parts, durable)
        return publish(tmp, path, overwrite)
    except OSError as e:
        err = folder_not_writable(e, path.parent)
        if err is None:
            raise
        raise err from e
