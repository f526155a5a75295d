"""Bring images (and their captions) from a folder, a zip or uploaded files into a workspace.

The source is only ever read: files are copied (never moved, never modified). What lands in the
workspace follows kohya's layout, ``<workspace>/<repeats>_<concept>/<name>.<ext>`` with the
caption in ``<name>.txt`` beside it:

* A source folder named ``<N>_<name>`` (at any depth, the nearest one wins) puts the images
  under it into concept ``<name>`` with ``N`` repeats; other images go to the ``concept`` and
  ``repeats`` given to the import (default: the source's name, 1 repeat). Subfolders are
  flattened into their concept folder.
* A caption is the source's ``<stem>.txt`` in the image's folder, or else ``<stem>.caption``
  (converted to ``.txt`` and reported: training reads only ``.txt``). Non-UTF-8 captions are
  decoded with a fallback and written as UTF-8; multi-line captions are joined into one line.
* Name collisions (``a.png`` and ``a.jpg`` share the caption ``a.txt``; ``x/a.png`` and
  ``y/a.png`` flatten to one name) get unique names (``a_2.jpg``) and a report line.
* Skipped and reported: hidden files and folders (``.*``, ``__MACOSX``, ``Thumbs.db``),
  0-byte files, files that are neither images nor captions, unreadable files, files above
  :attr:`ImportLimits.max_file_bytes`.
* Zips: members with unsafe names (``../x``, absolute paths, drive letters, symlinks) are
  rejected and reported and nothing is ever written outside the workspace; an archive over
  :class:`ImportLimits` (members, total size, compression ratio: zip bombs) is refused as a whole
  with a :class:`~lora_trainer.errors.DatasetError` before anything is written.

Images are copied byte for byte; :meth:`Workspace.clean` converts and checks them afterwards.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import stat
import zipfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from lora_trainer.data.images import IMAGE_EXTENSIONS
from lora_trainer.errors import DatasetError
from lora_trainer.workshop.fsutil import (
    CAPTION_EXT,
    atomic_write_text,
    caption_text,
    decode_caption_bytes,
    is_hidden_entry,
    is_hidden_name,
    safe_name,
    unique_stem,
)
from lora_trainer.workshop.report import Report, some

__all__ = [
    "SOURCE_CAPTION_EXTENSIONS",
    "SOURCE_IMAGE_EXTENSIONS",
    "ImportLimits",
    "ImportReport",
    "ImportedFile",
    "concept_folder_name",
    "import_files",
    "import_folder",
    "import_zip",
    "parse_concept_folder",
]

# Training reads IMAGE_EXTENSIONS; these few more are imported and turned into PNG by clean().
SOURCE_IMAGE_EXTENSIONS = (*IMAGE_EXTENSIONS, ".jfif", ".jpe", ".tga", ".ppm", ".pgm", ".pbm", ".pnm", ".dib")
SOURCE_CAPTION_EXTENSIONS = (".txt", ".caption")
_JPEG_EXTS = (".jpeg", ".jpe", ".jfif")
_CONCEPT_RE = re.compile(r"^(\d+)_(.+)$", re.DOTALL)
_DRIVE_RE = re.compile(r"^[A-Za-z]:")
_MAX_CAPTION_BYTES = 1 << 20
_CHUNK = 1 << 20

MiB = 1 << 20


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


@dataclass
class ImportedFile:
    """One image copied into the workspace.

    source: where it came from (path, or ``archive.zip:member``). path: workspace-relative
    posix path of the copy. caption_source: the caption file it got its ``.txt`` from, if any.
    """

    source: str
    path: str
    concept_folder: str
    caption_source: str | None = None


@dataclass
class ImportReport(Report):
    """What an import did. ``imported`` lists the new images; ``concept_folders`` counts them per
    ``<repeats>_<concept>`` folder; ``problems`` has one line per skipped, renamed or converted file
    (codes: hidden, empty, not_image, unreadable, too_large, renamed, already_present,
    caption_converted, caption_reencoded, caption_multiline, caption_conflict, caption_shared,
    orphan_caption, zip_slip, zip_symlink, zip_encrypted, corrupt_member)."""

    source: str = ""
    imported: list[ImportedFile] = field(default_factory=list)
    concept_folders: dict[str, int] = field(default_factory=dict)
    skipped: int = 0

    def merge(self, other: ImportReport) -> None:
        self.problems.extend(other.problems)
        self.imported.extend(other.imported)
        for k, v in other.concept_folders.items():
            self.concept_folders[k] = self.concept_folders.get(k, 0) + v
        self.skipped += other.skipped

    def summary(self) -> str:
        return (
            f"Imported {len(self.imported)} image(s) from {self.source} into "
            f"{len(self.concept_folders)} folder(s); {self.skipped} file(s) skipped, {len(self.problems)} note(s)."
        )


# -- concept folders -----------------------------------------------------------------------------


def parse_concept_folder(name: str) -> tuple[int, str] | None:
    """(repeats, concept) of a kohya ``<N>_<name>`` folder name, or None (also for 0 repeats)."""
    m = _CONCEPT_RE.match(name)
    if m is None or int(m.group(1)) < 1 or not m.group(2).strip():
        return None
    return int(m.group(1)), m.group(2).strip()


def concept_folder_name(repeats: int, concept: str) -> str:
    """``<repeats>_<concept>`` with the concept made a safe folder name."""
    if int(repeats) != repeats or repeats < 1:
        raise DatasetError(f"Repeats must be a whole number of at least 1, got {repeats!r}.")
    return f"{int(repeats)}_{safe_name(concept, 'images')}"


# -- sources ---------------------------------------------------------------------------------------


@dataclass
class _Entry:
    parts: tuple[str, ...]  # path below the import root, as components
    display: str
    size: int
    open: Callable[[], BinaryIO]

    @property
    def ext(self) -> str:
        return os.path.splitext(self.parts[-1])[1].lower()

    @property
    def stem(self) -> str:
        return os.path.splitext(self.parts[-1])[0]


def _is_inside(child: Path, parent: Path) -> bool:
    try:
        Path(os.path.realpath(child)).relative_to(os.path.realpath(parent))
        return True
    except ValueError:
        return False


def _walk_folder(src: Path, report: ImportReport, exclude: Sequence[Path]) -> list[_Entry]:
    out: list[_Entry] = []
    excluded = {os.path.realpath(p) for p in exclude}
    stack: list[tuple[Path, tuple[str, ...]]] = [(src, ())]
    while stack:
        folder, rel = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            report.add(
                "unreadable", folder, f"Cannot read folder {folder} ({e.strerror or e}); it was skipped.", "error"
            )
            continue
        subdirs = []
        for entry in entries:
            path = Path(entry.path)
            try:
                is_dir = entry.is_dir()
                is_link = entry.is_symlink()
            except OSError:
                is_dir = is_link = False
            if is_hidden_entry(entry):
                report.add("hidden", path, f"Skipped hidden {'folder' if is_dir else 'file'} {path}.", "info")
                report.skipped += 1
                continue
            if is_dir:
                if is_link:
                    report.add("symlink_folder", path, f"Skipped {path}: a link to a folder (copy its files instead).")
                elif os.path.realpath(path) in excluded:
                    report.add("workspace_folder", path, f"Skipped {path}: it is a workshop folder.", "info")
                else:
                    subdirs.append((path, (*rel, entry.name)))
                continue
            try:
                size = entry.stat().st_size
            except OSError as e:
                report.add("unreadable", path, f"Cannot read {path} ({e.strerror or e}); it was skipped.", "error")
                report.skipped += 1
                continue
            out.append(_Entry((*rel, entry.name), str(path), size, functools.partial(open, path, "rb")))
        stack.extend(reversed(subdirs))
    return out


def _member_problem(info: zipfile.ZipInfo) -> tuple[str, str] | None:
    """(code, reason) when a zip member must not be extracted, else None."""
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


def _zip_entries(zf: zipfile.ZipFile, label: str, limits: ImportLimits, report: ImportReport) -> list[_Entry]:
    infos = zf.infolist()
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
    out: list[_Entry] = []
    for info in infos:
        if info.is_dir():
            continue
        where = f"{label}:{info.filename}"
        problem = _member_problem(info)
        if problem is not None:
            code, why = problem
            report.add(
                code, where, f"Rejected zip member {info.filename!r}: {why}. Nothing was written for it.", "error"
            )
            report.skipped += 1
            continue
        parts = tuple(p for p in info.filename.replace("\\", "/").split("/") if p not in ("", "."))
        if not parts:
            continue
        out.append(_Entry(parts, where, info.file_size, lambda i=info: zf.open(i, "r")))
    return out


# -- the import engine -----------------------------------------------------------------------------


def _read_limited(entry: _Entry, limit: int) -> bytes:
    with entry.open() as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise _TooLarge
    return data


class _TooLarge(Exception):
    pass


def _copy_limited(entry: _Entry, dest: Path, limit: int) -> None:
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
                    raise _TooLarge
                out.write(chunk)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _same_content(entry: _Entry, path: Path) -> bool:
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


class _FolderIndex:
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

    def already_present(self, entry: _Entry, stem: str, ext: str) -> Path | None:
        """An earlier import of ``entry``: same bytes, named ``stem`` or ``stem_<n>`` (a collision
        rename). Identical files under other names are not matched: those are duplicates for
        find_duplicates() to flag, not re-imports."""
        for name in self.by_key.get((stem.lower(), ext.lower()), []):
            if _same_content(entry, self.folder / name):
                return self.folder / name
        return None


def _target_ext(ext: str) -> str:
    return ".jpg" if ext in _JPEG_EXTS else ext


def _read_caption(entry: _Entry, report: ImportReport) -> str | None:
    if entry.size > _MAX_CAPTION_BYTES:
        report.add("too_large", entry.display, f"Skipped caption {entry.display}: larger than 1 MiB.")
        return None
    try:
        data = _read_limited(entry, _MAX_CAPTION_BYTES)
    except _TooLarge:
        report.add("too_large", entry.display, f"Skipped caption {entry.display}: larger than 1 MiB.")
        return None
    except (OSError, zipfile.BadZipFile, RuntimeError, NotImplementedError, zlib.error) as e:
        report.add("unreadable", entry.display, f"Cannot read caption {entry.display} ({e}); it was skipped.", "error")
        return None
    text, fallback = decode_caption_bytes(data)
    if fallback:
        report.add(
            "caption_reencoded",
            entry.display,
            f"Caption {entry.display} was not UTF-8; read it as {fallback} and saved it as UTF-8. Check its accents.",
            "info",
        )
    text, multi = caption_text(text)
    if multi:
        report.add(
            "caption_multiline",
            entry.display,
            f"Caption {entry.display} had several lines; they were joined into one (training reads one line).",
            "info",
        )
    return text


def _import_entries(
    workspace: Path,
    entries: Iterable[_Entry],
    *,
    root_name: str,
    default_concept: str,
    default_repeats: int,
    limits: ImportLimits,
    report: ImportReport,
) -> None:
    images: list[_Entry] = []
    captions: dict[tuple[tuple[str, ...], str], dict[str, _Entry]] = {}
    for e in entries:
        if any(is_hidden_name(p) for p in e.parts):
            report.add("hidden", e.display, f"Skipped hidden file {e.display}.", "info")
            report.skipped += 1
        elif e.ext in SOURCE_IMAGE_EXTENSIONS:
            if e.size == 0:
                report.add("empty", e.display, f"Skipped {e.display}: the file is empty (0 bytes).")
                report.skipped += 1
            elif e.size > limits.max_file_bytes:
                report.add(
                    "too_large",
                    e.display,
                    f"Skipped {e.display}: {e.size / MiB:.0f} MiB is above the {limits.max_file_bytes / MiB:.0f} MiB "
                    "limit per file. Scale it down or save it as JPEG.",
                )
                report.skipped += 1
            else:
                images.append(e)
        elif e.ext in SOURCE_CAPTION_EXTENSIONS:
            captions.setdefault((e.parts[:-1], e.stem), {})[e.ext] = e
        else:
            report.add(
                "not_image",
                e.display,
                f"Skipped {e.display}: not an image or caption (image types: {' '.join(SOURCE_IMAGE_EXTENSIONS)}).",
                "info",
            )
            report.skipped += 1

    by_key: dict[tuple[tuple[str, ...], str], list[_Entry]] = {}
    for e in images:
        by_key.setdefault((e.parts[:-1], e.stem), []).append(e)
    caption_cache: dict[tuple[tuple[str, ...], str], tuple[str | None, str | None]] = {}
    for key, caps in captions.items():
        if key not in by_key:
            for c in caps.values():
                report.add(
                    "orphan_caption", c.display, f"Skipped caption {c.display}: no image of the same name.", "info"
                )
                report.skipped += 1

    taken: dict[Path, _FolderIndex] = {}
    created: list[Path] = []
    for e in sorted(images, key=lambda x: x.parts):
        repeats, concept = default_repeats, default_concept
        for name in (*reversed(e.parts[:-1]), root_name):
            parsed = parse_concept_folder(name)
            if parsed is not None:
                repeats, concept = parsed
                break
        folder_name = concept_folder_name(repeats, concept)
        folder = workspace / folder_name
        if not _is_inside(folder, workspace):  # defence in depth: safe_name already prevents it
            report.add(
                "zip_slip", e.display, f"Rejected {e.display}: its folder would be outside the workspace.", "error"
            )
            continue
        if not folder.is_dir():
            folder.mkdir(parents=True)
            created.append(folder)
        index = taken.get(folder)
        if index is None:
            index = taken[folder] = _FolderIndex(folder)

        key = (e.parts[:-1], e.stem)
        if key not in caption_cache:
            caps = captions.get(key, {})
            text = source = None
            txt, cap = caps.get(".txt"), caps.get(".caption")
            if txt is not None:
                text, source = _read_caption(txt, report), txt.display
                if text is None:
                    source = None
            if cap is not None:
                cap_text = _read_caption(cap, report)
                if source is None and cap_text is not None:
                    text, source = cap_text, cap.display
                    report.add(
                        "caption_converted",
                        cap.display,
                        f"Caption {cap.display} (.caption) was saved as .txt, the caption file training reads.",
                        "info",
                    )
                elif cap_text is not None and cap_text != text:
                    report.add(
                        "caption_conflict",
                        cap.display,
                        f"{cap.display} differs from the .txt caption beside it; the .txt caption was used.",
                    )
            caption_cache[key] = (text, source)
            if source is not None and len(by_key[key]) > 1:
                report.add(
                    "caption_shared",
                    source,
                    f"Caption {source} belongs to {len(by_key[key])} images of the same name "
                    f"({some(x.parts[-1] for x in by_key[key])}); each got a copy.",
                    "info",
                )
        text, source = caption_cache[key]

        ext = _target_ext(e.ext)
        stem = safe_name(e.stem)
        existing = index.already_present(e, stem, ext)
        if existing is not None:
            report.add(
                "already_present",
                e.display,
                f"{e.display} is already in the workspace as {folder_name}/{existing.name}.",
                "info",
            )
            report.skipped += 1
            continue
        new_stem = unique_stem(stem, index.stems)
        dest = folder / (new_stem + ext)
        try:
            _copy_limited(e, dest, limits.max_file_bytes)
        except _TooLarge:
            index.stems.discard(new_stem.lower())
            report.add("too_large", e.display, f"Skipped {e.display}: larger than the limit per file.")
            report.skipped += 1
            continue
        except (OSError, zipfile.BadZipFile, RuntimeError, EOFError, NotImplementedError, zlib.error) as e2:
            index.stems.discard(new_stem.lower())
            code = "unreadable" if isinstance(e2, OSError) else "corrupt_member"
            why = e2.strerror if isinstance(e2, OSError) and e2.strerror else str(e2)
            report.add(
                code,
                e.display,
                f"Cannot read {e.display} ({why}); it was skipped. Check its permissions or re-create it.",
                "error",
            )
            report.skipped += 1
            continue
        index.add(dest.name)
        rel = f"{folder_name}/{dest.name}"
        if new_stem != e.stem:
            why = "to avoid a name collision" if new_stem != stem else "to make the name safe on every system"
            report.add("renamed", e.display, f"{e.display} was saved as {rel} {why}.", "info")
        if text is not None:
            atomic_write_text(dest.with_suffix(CAPTION_EXT), text)
        report.imported.append(ImportedFile(e.display, rel, folder_name, source))
        report.concept_folders[folder_name] = report.concept_folders.get(folder_name, 0) + 1
    for folder in created:  # folders whose every image failed
        with contextlib.suppress(OSError):
            folder.rmdir()


def _no_images_error(what: str, report: ImportReport) -> DatasetError:
    counts: dict[str, int] = {}
    for p in report.problems:
        counts[p.code] = counts.get(p.code, 0) + 1
    found = "; ".join(f"{n} {code.replace('_', ' ')}" for code, n in sorted(counts.items()))
    return DatasetError(
        f"No images could be imported from {what}" + (f" (found: {found})" if found else " (it is empty)") + ". "
        f"Add image files ({' '.join(IMAGE_EXTENSIONS)}), optionally with a .txt caption of the same name, "
        "or pick another folder."
    )


def import_folder(
    workspace: str | os.PathLike,
    src: str | os.PathLike,
    *,
    concept: str | None = None,
    repeats: int | None = None,
    limits: ImportLimits = ImportLimits(),
    exclude: Sequence[Path] = (),
) -> ImportReport:
    """Copy the images and captions under ``src`` (recursively) into ``workspace``; see the module doc.

    Raises :class:`DatasetError` when ``src`` is not a readable folder, lies inside the workspace,
    or holds no importable image (nothing is written then).
    """
    workspace, src = Path(workspace), Path(src)
    if not src.is_dir():
        raise DatasetError(
            f"Cannot import {src}: it is not a folder (or does not exist). Pick the folder with your images."
        )
    if _is_inside(src, workspace):
        raise DatasetError(f"Cannot import {src}: it is inside the workspace {workspace}. Pick a folder outside it.")
    report = ImportReport(source=str(src))
    entries = _walk_folder(src, report, [workspace, *exclude])
    root_name = src.resolve().name
    _import_entries(
        workspace,
        entries,
        root_name=root_name,
        default_concept=concept or (parse_concept_folder(root_name) or (0, root_name))[1] or "images",
        default_repeats=repeats or 1,
        limits=limits,
        report=report,
    )
    if not report.imported and not report.problems_with("already_present"):
        raise _no_images_error(f"folder {src}", report)
    return report


def import_zip(
    workspace: str | os.PathLike,
    path: str | os.PathLike,
    *,
    concept: str | None = None,
    repeats: int | None = None,
    limits: ImportLimits = ImportLimits(),
    label: str | None = None,
) -> ImportReport:
    """Import the images and captions of the zip at ``path`` (a local or uploaded file).

    ``label`` names the zip in reports (an uploaded file's original name). Raises
    :class:`DatasetError` for an unreadable zip, one over ``limits`` (nothing written), or one
    without any importable image.
    """
    workspace, path = Path(workspace), Path(path)
    label = label or path.name
    stem = os.path.splitext(os.path.basename(label))[0] or "images"
    report = ImportReport(source=label)
    try:
        zf = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise DatasetError(f"Cannot import {label}: the file does not exist.") from None
    except (zipfile.BadZipFile, OSError) as e:
        raise DatasetError(f"Cannot import {label}: it is not a readable zip file ({e}). Re-create the zip.") from None
    with zf:
        entries = _zip_entries(zf, label, limits, report)
        _import_entries(
            workspace,
            entries,
            root_name=stem,
            default_concept=concept or (parse_concept_folder(stem) or (0, stem))[1],
            default_repeats=repeats or 1,
            limits=limits,
            report=report,
        )
    if not report.imported and not report.problems_with("already_present"):
        raise _no_images_error(f"zip {label}", report)
    return report


def import_files(
    workspace: str | os.PathLike,
    paths: Sequence[str | os.PathLike],
    names: Sequence[str] | None = None,
    *,
    concept: str = "images",
    repeats: int | None = None,
    limits: ImportLimits = ImportLimits(),
) -> ImportReport:
    """Import uploaded files: ``paths`` are the (temporary) files, ``names`` their original names
    (default: the paths' names). Captions uploaded with the images pair up by name; ``.zip``
    files are imported as zips. Names with folders (``10_char/a.png``) are honoured like a
    folder import; unsafe names (``../a.png``) are rejected.
    """
    workspace = Path(workspace)
    paths = [Path(p) for p in paths]
    names = list(names) if names is not None else [p.name for p in paths]
    if len(names) != len(paths):
        raise ValueError("names must have one entry per path")
    report = ImportReport(source=f"{len(paths)} uploaded file(s)")
    entries: list[_Entry] = []
    for p, name in zip(paths, names, strict=True):
        info = zipfile.ZipInfo(name)  # reuse the zip-member name checks
        problem = _member_problem(info)
        if problem is not None:
            report.add(problem[0], name, f"Rejected upload {name!r}: {problem[1]}.", "error")
            report.skipped += 1
            continue
        parts = tuple(x for x in name.replace("\\", "/").split("/") if x not in ("", "."))
        if not parts:
            continue
        if parts[-1].lower().endswith(".zip"):
            try:
                report.merge(import_zip(workspace, p, concept=concept, repeats=repeats, limits=limits, label=name))
            except DatasetError as e:
                report.add("bad_zip", name, str(e), "error")
            continue
        try:
            size = p.stat().st_size
        except OSError as e:
            report.add("unreadable", name, f"Cannot read upload {name} ({e.strerror or e}); it was skipped.", "error")
            report.skipped += 1
            continue
        entries.append(_Entry(parts, name, size, functools.partial(open, p, "rb")))
    _import_entries(
        workspace,
        entries,
        root_name="",
        default_concept=concept,
        default_repeats=repeats or 1,
        limits=limits,
        report=report,
    )
    if not report.imported and not report.problems_with("already_present"):
        raise _no_images_error("the uploaded files", report)
    return report
