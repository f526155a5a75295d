"""Bring images (and their captions) from a folder, a zip or uploaded files into a workspace.

The source is only ever read: files are copied (never moved, never modified). What lands in the
workspace follows kohya's layout, ``<workspace>/<repeats>_<concept>/<name>.<ext>`` with the
caption in ``<name>.txt`` beside it:

* A source folder that training would take as a subset (``<N>_<name>``, the rule of
  :func:`lora_trainer.data.layout.parse_subset_folder`; at any depth, the nearest one wins) puts
  the images under it into concept ``<name>`` with ``N`` repeats (``<N>_`` with no name sets only
  the repeats); other images go to the ``concept`` and ``repeats`` given to the import (default:
  the source's name, 1 repeat). Subfolders are flattened into their concept folder.
* A caption is the source's ``<stem>.txt`` in the image's folder, or else ``<stem>.caption``
  (converted to ``.txt`` and reported: training reads only ``.txt``). Non-UTF-8 captions are
  decoded with a fallback and written as UTF-8; multi-line captions are joined into one line.
* Names that are not valid UTF-8 or longer than :data:`~lora_trainer.workshop.fsutil.MAX_STEM_BYTES`
  bytes get a safe name (reported as ``renamed``, saying why).
* Sources already imported are skipped (``already_present``): same bytes under the same name, or
  a SHA-256 recorded at an earlier import (:func:`~lora_trainer.workshop.store.source_records`,
  kept pointing at the copy whatever Clean or Resize did to it).
* Name collisions (``a.png`` and ``a.jpg`` share the caption ``a.txt``; ``x/a.png`` and
  ``y/a.png`` flatten to one name) get unique names (``a_2.jpg``) and a report line.
* Skipped and reported: hidden files and folders (``.*``, ``__MACOSX``, ``Thumbs.db``),
  links (unless the import follows links, and then only to regular files inside the imported
  folder), FIFOs, devices and sockets (only regular files are opened), 0-byte files, files that are neither images nor captions, unreadable files, files above
  :attr:`ImportLimits.max_file_bytes`.
* Zips: members with unsafe names (``../x``, absolute paths, drive letters, symlinks) are
  rejected and reported and nothing is ever written outside the workspace; an archive over
  :class:`ImportLimits` (members, total size, compression ratio: zip bombs) is refused as a whole
  with a :class:`~lora_trainer.errors.DatasetError` before anything is written. Reading the
  sources safely is :mod:`lora_trainer.workshop.import_sources`.

Images are copied byte for byte; :meth:`Workspace.clean` converts and checks them afterwards.
"""

from __future__ import annotations

import contextlib
import functools
import os
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lora_trainer.data.captions import decode_caption_bytes
from lora_trainer.data.layout import (
    CAPTION_EXTENSION,
    CAPTION_EXTENSIONS,
    IMAGE_EXTENSIONS,
    WORKSHOP_IMAGE_EXTENSIONS,
    WORKSHOP_STATE_DIR,
    is_hidden_name,
    parse_subset_folder,
)
from lora_trainer.errors import DatasetError
from lora_trainer.workshop.fsutil import (
    MAX_CAPTION_BYTES,
    atomic_write_text,
    caption_text,
    rename_reason,
    safe_name,
    unique_stem,
)
from lora_trainer.workshop.import_sources import (
    FolderIndex,
    ImportLimits,
    MiB,
    SourceEntry,
    TooLarge,
    copy_limited,
    folder_entries,
    is_inside,
    member_problem,
    read_limited,
    source_parts,
    upload_entry,
    zip_entries,
)
from lora_trainer.workshop.layout import concept_folder_name
from lora_trainer.workshop.report import Report, some
from lora_trainer.workshop.store import record_sources, source_records

__all__ = [
    "ImportReport",
    "ImportedFile",
    "import_files",
    "import_folder",
    "import_zip",
]

_JPEG_EXTS = (".jpeg", ".jpe", ".jfif")
_MAX_CAPTION_BYTES = MAX_CAPTION_BYTES
# what reading or unpacking one source file can raise besides running past the size limit
_READ_ERRORS = (OSError, zipfile.BadZipFile, RuntimeError, EOFError, NotImplementedError, zlib.error)

_CaptionKey = tuple[tuple[str, ...], str]  # (folder parts, stem) of a source file


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
    (codes: hidden, symlink, symlink_outside, symlink_folder, special_file, empty, not_image, unreadable, too_large, renamed, already_present,
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
        present = len(self.problems_with("already_present"))
        return (
            f"Imported {len(self.imported)} image(s) from {self.source} into "
            f"{len(self.concept_folders)} folder(s); {self.skipped} file(s) skipped"
            + (f" ({present} already in the workspace)" if present else "")
            + f", {len(self.problems)} note(s)."
        )


# -- the workspace side ----------------------------------------------------------------------------


def _concept_key(folder: str) -> str | None:
    parsed = parse_subset_folder(folder)
    return parsed[1].lower() if parsed is not None else None


def _target_ext(ext: str) -> str:
    return ".jpg" if ext in _JPEG_EXTS else ext


def _read_caption(entry: SourceEntry, report: ImportReport) -> str | None:
    try:
        if entry.size > _MAX_CAPTION_BYTES:
            raise TooLarge
        data = read_limited(entry, _MAX_CAPTION_BYTES)
    except TooLarge:
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
    if text and "\x00" in text:
        text = text.replace("\x00", "")
        report.add("caption_nul", entry.display, f"Caption {entry.display} held NUL bytes; they were removed.", "info")
    text, multi = caption_text(text or "")
    if multi:
        report.add(
            "caption_multiline",
            entry.display,
            f"Caption {entry.display} had several lines; they were joined into one (training reads one line).",
            "info",
        )
    return text


# -- the import engine -----------------------------------------------------------------------------


class _ImportRun:
    """One import of a list of source entries into ``workspace`` (see the module doc)."""

    def __init__(
        self,
        workspace: Path,
        *,
        root_name: str,
        default_concept: str,
        default_repeats: int,
        limits: ImportLimits,
        report: ImportReport,
    ):
        self.workspace = workspace
        self.root_name = root_name
        self.default_concept = default_concept
        self.default_repeats = default_repeats
        self.limits = limits
        self.report = report
        self.images: list[SourceEntry] = []
        self.captions: dict[_CaptionKey, dict[str, SourceEntry]] = {}
        self.by_key: dict[_CaptionKey, list[SourceEntry]] = {}
        self.caption_cache: dict[_CaptionKey, tuple[str | None, str | None]] = {}
        self.indexes: dict[Path, FolderIndex] = {}
        self.created: list[Path] = []
        self.known = source_records(workspace)  # the sources of earlier imports, by SHA-256
        self.recorded: dict[str, str] = {}  # this run's: SHA-256 -> workspace-relative path

    def run(self, entries: Iterable[SourceEntry]) -> None:
        for e in entries:
            self._sort(e)
        for e in self.images:
            self.by_key.setdefault((e.parts[:-1], e.stem), []).append(e)
        self._report_orphan_captions()
        for e in sorted(self.images, key=lambda x: x.parts):
            self._import_image(e)
        record_sources(self.workspace, self.recorded)
        for folder in self.created:  # folders whose every image failed
            with contextlib.suppress(OSError):
                folder.rmdir()

    def undo(self) -> None:
        """Remove what this run wrote (after it stopped half-way: a zip that unpacks past its limits)."""
        for f in self.report.imported:
            path = self.workspace / f.path
            for p in (path, path.with_suffix(CAPTION_EXTENSION)):
                with contextlib.suppress(OSError):
                    p.unlink()
        self.report.imported.clear()
        self.report.concept_folders.clear()
        for folder in reversed(self.created):
            with contextlib.suppress(OSError):
                folder.rmdir()

    # -- sorting the entries

    def _skip(self, code: str, e: SourceEntry, message: str, severity: str = "warning") -> None:
        self.report.add(code, e.display, message, severity)
        self.report.skipped += 1

    def _sort(self, e: SourceEntry) -> None:
        """File ``e`` as an image or a caption, or skip it (reported)."""
        if any(is_hidden_name(p) for p in e.parts):
            self._skip("hidden", e, f"Skipped hidden file {e.display}.", "info")
        elif e.ext in WORKSHOP_IMAGE_EXTENSIONS:
            if e.size == 0:
                self._skip("empty", e, f"Skipped {e.display}: the file is empty (0 bytes).")
            elif e.size > self.limits.max_file_bytes:
                self._skip(
                    "too_large",
                    e,
                    f"Skipped {e.display}: {e.size / MiB:.0f} MiB is above the "
                    f"{self.limits.max_file_bytes / MiB:.0f} MiB limit per file. Scale it down or save it as JPEG.",
                )
            else:
                self.images.append(e)
        elif e.ext in CAPTION_EXTENSIONS:
            self.captions.setdefault((e.parts[:-1], e.stem), {})[e.ext] = e
        else:
            self._skip(
                "not_image",
                e,
                f"Skipped {e.display}: not an image or caption (image types: {' '.join(WORKSHOP_IMAGE_EXTENSIONS)}).",
                "info",
            )

    def _report_orphan_captions(self) -> None:
        for key, caps in self.captions.items():
            if key not in self.by_key:
                for c in caps.values():
                    self._skip("orphan_caption", c, f"Skipped caption {c.display}: no image of the same name.", "info")

    # -- one image

    def _concept_of(self, e: SourceEntry) -> tuple[int, str]:
        """(repeats, concept): the nearest subset-named folder above ``e``, else the defaults."""
        for name in (*reversed(e.parts[:-1]), self.root_name):
            parsed = parse_subset_folder(name)
            if parsed is not None:
                return parsed[0], parsed[1] or self.default_concept
        return self.default_repeats, self.default_concept

    def _folder_index(self, folder: Path) -> FolderIndex:
        if not folder.is_dir():
            folder.mkdir(parents=True)
            self.created.append(folder)
        index = self.indexes.get(folder)
        if index is None:
            index = self.indexes[folder] = FolderIndex(folder)
        return index

    def _import_image(self, e: SourceEntry) -> None:
        folder_name = concept_folder_name(*self._concept_of(e))
        folder = self.workspace / folder_name
        if not is_inside(folder, self.workspace):  # defence in depth: safe_name already prevents it
            self.report.add(
                "zip_slip", e.display, f"Rejected {e.display}: its folder would be outside the workspace.", "error"
            )
            return
        index = self._folder_index(folder)
        text, source = self._caption(e)
        ext = _target_ext(e.ext)
        stem = safe_name(e.stem)
        existing = index.already_present(e, stem, ext)
        if existing is not None:
            self._skip(
                "already_present",
                e,
                f"{e.display} is already in the workspace as {folder_name}/{existing.name}.",
                "info",
            )
            return
        new_stem = unique_stem(stem, index.stems)
        dest = folder / (new_stem + ext)
        rel = f"{folder_name}/{dest.name}"
        if not self._copy(e, dest, rel):
            index.stems.discard(new_stem.lower())
            return
        index.add(dest.name)
        if new_stem != e.stem:
            why = "to avoid a name collision" if new_stem != stem else rename_reason(e.stem)
            self.report.add("renamed", e.display, f"{e.display} was saved as {rel} {why}.", "info")
        if text is not None:
            atomic_write_text(dest.with_suffix(CAPTION_EXTENSION), text)
        self.report.imported.append(ImportedFile(e.display, rel, folder_name, source))
        self.report.concept_folders[folder_name] = self.report.concept_folders.get(folder_name, 0) + 1

    def _new_source(self, digest: str, folder: str) -> bool:
        """False when an earlier import left a copy of a source with this SHA-256, still there, in a
        folder of the same concept as ``folder`` (any repeats; also when set aside in ``.workshop/``)."""
        rel = self.known.get(digest)
        if rel is None or not os.path.isfile(self.workspace / rel):
            return True
        parts = rel.split("/")
        other = parts[2] if parts[0] == WORKSHOP_STATE_DIR and len(parts) > 3 else parts[0]
        return _concept_key(other) != _concept_key(folder)

    def _copy(self, e: SourceEntry, dest: Path, rel: str) -> bool:
        """Copy ``e`` to ``dest`` (``rel`` in the workspace) and record its source; False (reported,
        skipped) when it cannot be read, is too large, or an earlier import already brought it in."""
        try:
            keep = functools.partial(self._new_source, folder=rel.split("/")[0])
            digest, written = copy_limited(e, dest, self.limits.max_file_bytes, keep=keep)
        except TooLarge:
            self._skip("too_large", e, f"Skipped {e.display}: larger than the limit per file.")
            return False
        except _READ_ERRORS as e2:
            code = "unreadable" if isinstance(e2, OSError) else "corrupt_member"
            why = e2.strerror if isinstance(e2, OSError) and e2.strerror else str(e2)
            self._skip(
                code,
                e,
                f"Cannot read {e.display} ({why}); it was skipped. Check its permissions or re-create it.",
                "error",
            )
            return False
        if not written:
            self._skip(
                "already_present",
                e,
                f"{e.display} is already in the workspace as {self.known[digest]} (imported before).",
                "info",
            )
            return False
        self.recorded[digest] = rel
        return True

    # -- captions

    def _caption(self, e: SourceEntry) -> tuple[str | None, str | None]:
        """(caption text, caption source) of image ``e``: read once per source name."""
        key = (e.parts[:-1], e.stem)
        if key not in self.caption_cache:
            text, source = self._pick_caption(self.captions.get(key, {}))
            self.caption_cache[key] = (text, source)
            same_name = self.by_key[key]
            if source is not None and len(same_name) > 1:
                self.report.add(
                    "caption_shared",
                    source,
                    f"Caption {source} belongs to {len(same_name)} images of the same name "
                    f"({some(x.parts[-1] for x in same_name)}); each got a copy.",
                    "info",
                )
        return self.caption_cache[key]

    def _pick_caption(self, caps: dict[str, SourceEntry]) -> tuple[str | None, str | None]:
        """The ``.txt`` caption, else the ``.caption`` one (reported as converted); a differing
        ``.caption`` beside a ``.txt`` is reported as a conflict."""
        text = source = None
        txt, cap = caps.get(".txt"), caps.get(".caption")
        if txt is not None:
            text = _read_caption(txt, self.report)
            source = txt.display if text is not None else None
        if cap is None:
            return text, source
        cap_text = _read_caption(cap, self.report)
        if source is None and cap_text is not None:
            self.report.add(
                "caption_converted",
                cap.display,
                f"Caption {cap.display} (.caption) was saved as .txt, the caption file training reads.",
                "info",
            )
            return cap_text, cap.display
        if cap_text is not None and cap_text != text:
            self.report.add(
                "caption_conflict",
                cap.display,
                f"{cap.display} differs from the .txt caption beside it; the .txt caption was used.",
            )
        return text, source


# -- the public entry points -----------------------------------------------------------------------


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


def _check_imported(report: ImportReport, what: str) -> ImportReport:
    if not report.imported and not report.problems_with("already_present"):
        raise _no_images_error(what, report)
    return report


def _name_concept(name: str) -> str:
    """The concept a source named ``name`` stands for: its subset concept, else the name itself."""
    parsed = parse_subset_folder(name)
    return parsed[1] if parsed is not None else name


def import_folder(
    workspace: str | os.PathLike,
    src: str | os.PathLike,
    *,
    concept: str | None = None,
    repeats: int | None = None,
    limits: ImportLimits = ImportLimits(),
    exclude: Sequence[Path] = (),
    follow_links: bool = False,
) -> ImportReport:
    """Copy the images and captions under ``src`` (recursively) into ``workspace``; see the module doc.
    Links to files are skipped (reported) unless ``follow_links``, and then followed only to
    regular files inside ``src``.

    Raises :class:`DatasetError` when ``src`` is not a readable folder, lies inside the workspace,
    or holds no importable image (nothing is written then).
    """
    workspace, src = Path(workspace), Path(src)
    if not src.is_dir():
        raise DatasetError(
            f"Cannot import {src}: it is not a folder (or does not exist). Pick the folder with your images."
        )
    if is_inside(src, workspace):
        raise DatasetError(f"Cannot import {src}: it is inside the workspace {workspace}. Pick a folder outside it.")
    report = ImportReport(source=str(src))
    entries = folder_entries(src, report, [workspace, *exclude], follow_links=follow_links)
    root_name = src.resolve().name
    _ImportRun(
        workspace,
        root_name=root_name,
        default_concept=concept or _name_concept(root_name) or "images",
        default_repeats=repeats or 1,
        limits=limits,
        report=report,
    ).run(entries)
    return _check_imported(report, f"folder {src}")


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
        entries = zip_entries(zf, label, limits, report)
        run = _ImportRun(
            workspace,
            root_name=stem,
            default_concept=concept or _name_concept(stem),
            default_repeats=repeats or 1,
            limits=limits,
            report=report,
        )
        try:
            run.run(entries)
        except DatasetError:  # it unpacked past the limits while being written: keep nothing of it
            run.undo()
            raise
    return _check_imported(report, f"zip {label}")


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
    entries: list[SourceEntry] = []
    for p, name in zip(paths, names, strict=True):
        problem = member_problem(zipfile.ZipInfo(name))  # reuse the zip-member name checks
        if problem is not None:
            report.add(problem[0], name, f"Rejected upload {name!r}: {problem[1]}.", "error")
            report.skipped += 1
            continue
        parts = source_parts(name)
        if not parts:
            continue
        if parts[-1].lower().endswith(".zip"):
            try:
                report.merge(import_zip(workspace, p, concept=concept, repeats=repeats, limits=limits, label=name))
            except DatasetError as e:
                report.add("bad_zip", name, str(e), "error")
            continue
        entry = upload_entry(p, name, parts, report)
        if entry is not None:
            entries.append(entry)
    _ImportRun(
        workspace,
        root_name="",
        default_concept=concept,
        default_repeats=repeats or 1,
        limits=limits,
        report=report,
    ).run(entries)
    return _check_imported(report, "the uploaded files")
