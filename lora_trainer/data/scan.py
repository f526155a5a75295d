"""The training-folder scan: which images of a kohya-style dataset folder train, with which captions.

Layout (kohya's ``--train_data_dir``)::

    train_data_dir/
        10_mychar/          <- 10 repeats; "10_mychar" is the subset name (ss_tag_frequency key)
            img1.png
            img1.txt        <- caption (or img1.caption)
            more/img2.jpg   <- subfolders are scanned too
        3_background/ ...

Which folders are subsets, which files are images or captions and which are hidden is decided
by :mod:`lora_trainer.data.layout` (the rules the dataset workshop uses too). Folders whose
name does not start with ``<number>_`` are reported and skipped, as kohya does. A folder with
no such subfolders is taken as one flat subset (scanned recursively), which is friendlier for a
plain folder of images; it gets ``flat_repeats`` repeats (1 by default; the config's
``dataset_repeats``, kohya's repeat count for a dataset without ``N_name`` folders).

Captions: ``<stem><caption_extension>`` beside the image; if absent, ``.txt`` or
``.caption`` (whichever was not asked for) so no caption file is silently ignored. The
first line is the caption (kohya's rule; read by
:func:`lora_trainer.data.captions.read_caption_file`). An image without a caption file
gets the folder's class tokens (``10_sks dog`` -> ``sks dog``), as kohya does, or "" in a
flat folder; it is listed in the scan report either way.

Links and special files: only regular files are read, so a FIFO, device or socket named like
an image or caption is skipped (reported), never opened. A subset folder may itself be a link
(to a dataset kept elsewhere), but inside a subset a link, to a file or a folder, is used only
when it leads inside that subset folder or the dataset folder (real paths compared); others are
skipped and reported. So a ``leak.txt -> /etc/passwd`` is never read as a caption, and nothing
from outside the dataset reaches a LoRA's metadata (``ss_tag_frequency``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lora_trainer.data.captions import read_caption_file, tag_frequency_by_dir
from lora_trainer.data.layout import (
    CAPTION_EXTENSIONS,
    IMAGE_EXTENSIONS,
    WORKSHOP_STATE_DIR,
    is_hidden_entry,
    is_image_file,
    special_file_kind,
    split_subset_folder,
)
from lora_trainer.errors import DatasetError
from lora_trainer.log import logger

__all__ = [
    "ImageItem",
    "ScanReport",
    "ScanResult",
    "SubsetInfo",
    "dataset_dirs_info",
    "dataset_tag_frequency",
    "scan_dataset",
]


@dataclass(frozen=True)
class ImageItem:
    """One training image.

    path: the image file. caption: its raw caption. repeats: times per epoch.
    subset_name: the subset folder's name (kohya's ``ss_tag_frequency``/``ss_dataset_dirs`` key).
    key: a stable id, ``<subset_name>/<path relative to the subset folder>`` (posix); defaults
    to the path.
    """

    path: Path
    caption: str
    repeats: int
    subset_name: str
    key: str = ""

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))
        if not self.key:
            object.__setattr__(self, "key", self.path.as_posix())


@dataclass
class SubsetInfo:
    folder: Path
    repeats: int
    image_count: int = 0
    class_tokens: str | None = None


@dataclass
class ScanReport:
    """What :func:`scan_dataset` found besides the images.

    flat: True when the folder itself was the (1-repeat) subset.
    subsets: subset name -> :class:`SubsetInfo`.
    skipped_folders: (folder, reason) for folders left out.
    ignored_files: images directly in the root, left out because subset folders exist (kohya).
    hidden_files / empty_files: skipped images (hidden names or attributes; 0 bytes).
    missing_captions: images with no caption file. class_token_captions: those of them
        that got the folder's class tokens as caption.
    non_utf8_captions: caption files that were not UTF-8 (decoded with a fallback).
    multiline_captions: caption files with text after the first line (only the first line is used).
    other_files: count of files that are neither images nor captions.
    skipped_files: (file, reason) for images and captions not read: special files (FIFOs,
        devices, sockets) and links that lead outside the subset and dataset folders.
    """

    root: Path
    flat: bool = False
    subsets: dict[str, SubsetInfo] = field(default_factory=dict)
    skipped_folders: list[tuple[Path, str]] = field(default_factory=list)
    ignored_files: list[Path] = field(default_factory=list)
    hidden_files: list[Path] = field(default_factory=list)
    empty_files: list[Path] = field(default_factory=list)
    missing_captions: list[Path] = field(default_factory=list)
    class_token_captions: list[Path] = field(default_factory=list)
    non_utf8_captions: list[Path] = field(default_factory=list)
    multiline_captions: list[Path] = field(default_factory=list)
    other_files: int = 0
    skipped_files: list[tuple[Path, str]] = field(default_factory=list)

    def warnings(self) -> list[str]:
        """One human-readable line per kind of problem."""
        out = []

        def some(paths) -> str:
            shown = ", ".join(str(p) for p in paths[:5])
            return shown + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")

        for folder, reason in self.skipped_folders:
            out.append(f"Skipped folder {folder}: {reason}")
        if self.ignored_files:
            out.append(
                f"{len(self.ignored_files)} image(s) directly in {self.root} are not used, because it has "
                f"'<repeats>_<name>' subfolders; move them into one: {some(self.ignored_files)}"
            )
        for path, reason in self.skipped_files:
            out.append(f"Skipped {path}: {reason}")
        if self.hidden_files:
            out.append(f"Skipped {len(self.hidden_files)} hidden file(s)/folder(s): {some(self.hidden_files)}")
        if self.empty_files:
            out.append(f"Skipped {len(self.empty_files)} empty (0-byte) image file(s): {some(self.empty_files)}")
        if self.missing_captions:
            n_cls = len(self.class_token_captions)
            n_missing = len(self.missing_captions)
            if n_cls == n_missing:
                how = "they use their folder's name as caption"
            elif n_cls:
                how = f"{n_cls} use their folder's name as caption, the rest an empty caption"
            else:
                how = "they use an empty caption"
            out.append(
                f"No caption file for {len(self.missing_captions)} image(s) ({how}): {some(self.missing_captions)}"
            )
        if self.non_utf8_captions:
            out.append(
                f"{len(self.non_utf8_captions)} caption file(s) are not UTF-8 and were read with a fallback "
                f"encoding; check them and save as UTF-8: {some(self.non_utf8_captions)}"
            )
        if self.multiline_captions:
            out.append(
                f"{len(self.multiline_captions)} caption file(s) have several lines; only the first is used: "
                f"{some(self.multiline_captions)}"
            )
        return out


class ScanResult(list):
    """The list of :class:`ImageItem` that :func:`scan_dataset` returns, with its ``report``."""

    def __init__(self, items: Sequence[ImageItem], report: ScanReport):
        super().__init__(items)
        self.report = report


def _caption_flags(path: Path) -> tuple[bool, bool]:
    """(not UTF-8, several non-empty lines) of a caption file, for the scan report."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
        not_utf8 = False
    except UnicodeDecodeError:
        text = data.decode("latin-1")
        not_utf8 = True
    lines = text.splitlines()
    return not_utf8, any(line.strip() for line in lines[1:])


def _caption_candidates(caption_extension: str) -> list[str]:
    ext = caption_extension if caption_extension.startswith(".") else "." + caption_extension
    return [ext] + [e for e in CAPTION_EXTENSIONS if e != ext]


def _layout_help(root: Path) -> str:
    return (
        f"Put the images in subfolders named '<repeats>_<name>', for example {root / '10_mychar'} "
        "(10 repeats), with each caption in a .txt file of the same name beside its image, or put the "
        f"images directly in {root} (1 repeat). Image types: {' '.join(IMAGE_EXTENSIONS)}."
    )


def _is_inside(path: str, roots: Sequence[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


@dataclass
class _SubsetWalk:
    """One subset's walk: adds the images under ``folder`` (recursively, but not into ``skip``)."""

    folder: Path
    name: str
    repeats: int
    class_tokens: str | None
    caption_exts: list[str]
    report: ScanReport
    skip: frozenset[Path] = frozenset()

    def run(self, out: list[ImageItem]) -> int:
        """Append the subset's images to ``out`` (depth-first, in name order); return how many."""
        count = 0
        stack = [self.folder]
        visited: set[str] = set()
        while stack:
            current = stack.pop()
            entries = self._read_once(current, visited)
            if entries is None:
                continue
            names = {e.name for e in entries}
            subdirs: list[Path] = []
            for entry in entries:
                path = Path(entry.path)
                if path in self.skip:
                    continue
                if _is_dir(entry):
                    self._add_subdir(entry, path, subdirs)
                elif self._usable_image(entry, path):
                    caption = self._caption(Path(current), os.path.splitext(entry.name)[0], names, path)
                    rel = path.relative_to(self.folder).as_posix()
                    out.append(ImageItem(path, caption, self.repeats, self.name, key=f"{self.name}/{rel}"))
                    count += 1
            stack.extend(reversed(subdirs))
        return count

    def _read_once(self, current: Path, visited: set[str]) -> list[os.DirEntry] | None:
        """The folder's entries by name; None when it was seen already (a symlink loop or two
        links to one folder) or cannot be read (reported)."""
        real = os.path.realpath(current)
        if real in visited:
            return None
        visited.add(real)
        try:
            return sorted(os.scandir(current), key=lambda e: e.name)
        except OSError as e:
            self.report.skipped_folders.append((current, f"cannot be read ({e})"))
            return None

    def _roots(self) -> tuple[str, str]:
        """Where links inside the subset may lead: its folder and the dataset folder (real paths)."""
        return os.path.realpath(self.folder), os.path.realpath(self.report.root)

    def _outside_link(self, path: Path) -> bool:
        return os.path.islink(path) and not _is_inside(os.path.realpath(path), self._roots())

    def _file_problem(self, path: Path) -> str | None:
        """Why the image or caption file ``path`` must not be read; None when it may."""
        try:
            mode = os.stat(path).st_mode
        except OSError as e:
            return f"it cannot be read ({e.strerror or e})"
        kind = special_file_kind(mode)
        if kind is not None:
            return f"it is {kind}, not a file; only regular files are read"
        if self._outside_link(path):
            return "it is a link to a file outside the dataset folder; copy the file into the folder instead"
        return None

    def _add_subdir(self, entry: os.DirEntry, path: Path, subdirs: list[Path]) -> None:
        if entry.name == WORKSHOP_STATE_DIR:
            return
        if is_hidden_entry(entry):
            self.report.hidden_files.append(path)
        elif self._outside_link(path):
            self.report.skipped_folders.append(
                (path, "it is a link to a folder outside the dataset folder; move or copy that folder in instead")
            )
        else:
            subdirs.append(path)

    def _usable_image(self, entry: os.DirEntry, path: Path) -> bool:
        """True for an image file to train on; counts other files, reports hidden and empty images."""
        if not is_image_file(entry.name):
            if os.path.splitext(entry.name)[1].lower() not in CAPTION_EXTENSIONS:
                self.report.other_files += 1
            return False
        if is_hidden_entry(entry):
            self.report.hidden_files.append(path)
            return False
        problem = self._file_problem(path)
        if problem is not None:
            self.report.skipped_files.append((path, problem))
            return False
        try:
            size = entry.stat().st_size
        except OSError:
            size = 0
        if size == 0:
            self.report.empty_files.append(path)
            return False
        return True

    def _caption(self, current: Path, stem: str, names: set[str], image: Path) -> str:
        """The image's caption: its caption file's first line, else the class tokens (or "")."""
        for ext in self.caption_exts:
            if stem + ext in names:
                problem = self._file_problem(current / (stem + ext))
                if problem is None:
                    return self._read_caption(current / (stem + ext))
                self.report.skipped_files.append((current / (stem + ext), problem))
        self.report.missing_captions.append(image)
        if self.class_tokens:
            self.report.class_token_captions.append(image)
            return self.class_tokens
        return ""

    def _read_caption(self, caption_path: Path) -> str:
        caption = read_caption_file(caption_path)  # kohya: the first line, stripped
        try:
            fallback, multi = _caption_flags(caption_path)
        except OSError:
            fallback = multi = False
        if fallback:
            self.report.non_utf8_captions.append(caption_path)
        if multi:
            self.report.multiline_captions.append(caption_path)
        return caption


@dataclass
class _RootEntries:
    """The dataset folder's own entries, sorted out: subset folders (folder, repeats, name,
    class tokens), other folders, and images lying directly in it."""

    subset_dirs: list[tuple[Path, int, str, str]] = field(default_factory=list)
    other_dirs: list[Path] = field(default_factory=list)
    root_images: list[Path] = field(default_factory=list)


def _scan_root(root: Path, report: ScanReport) -> _RootEntries:
    found = _RootEntries()
    try:
        root_entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as e:
        raise DatasetError(f"Cannot read the dataset folder {root}: {e}") from None
    for entry in root_entries:
        path = Path(entry.path)
        is_dir = _is_dir(entry)
        if is_hidden_entry(entry):
            if (is_dir and entry.name != WORKSHOP_STATE_DIR) or is_image_file(entry.name):
                report.hidden_files.append(path)
        elif is_dir:
            _sort_root_dir(entry, path, found, report)
        elif is_image_file(entry.name):
            found.root_images.append(path)
    return found


def _sort_root_dir(entry: os.DirEntry, path: Path, found: _RootEntries, report: ScanReport) -> None:
    parsed = split_subset_folder(entry.name)
    if parsed is None:
        found.other_dirs.append(path)
    elif parsed[0] < 1:
        report.skipped_folders.append((path, "0 repeats; use a number of at least 1 before the '_'"))
    else:
        found.subset_dirs.append((path, parsed[0], entry.name, parsed[1]))


def _scan_subsets(
    found: _RootEntries, caption_exts: list[str], class_tokens_for_missing: bool, report: ScanReport
) -> list[ImageItem]:
    """The kohya layout: each ``<repeats>_<name>`` folder is a subset; the rest is reported."""
    items: list[ImageItem] = []
    for d in found.other_dirs:
        report.skipped_folders.append(
            (d, f"its name does not start with a repeat count; rename it like '10_{d.name}' to use it")
        )
    report.ignored_files.extend(found.root_images)
    for folder, repeats, name, tokens in found.subset_dirs:
        info = SubsetInfo(folder, repeats, class_tokens=tokens or None)
        report.subsets[name] = info
        walk = _SubsetWalk(folder, name, repeats, tokens if class_tokens_for_missing else None, caption_exts, report)
        info.image_count = walk.run(items)
    return items


def _scan_flat(root: Path, caption_exts: list[str], report: ScanReport, repeats: int = 1) -> list[ImageItem]:
    """No subset folders: the folder itself is one subset with ``repeats`` repeats."""
    items: list[ImageItem] = []
    report.flat = True
    name = root.resolve().name or "dataset"
    info = SubsetInfo(root, repeats)
    report.subsets[name] = info
    # the root's hidden entries and skipped folders were reported already: leave them out
    skip = frozenset(report.hidden_files) | frozenset(p for p, _ in report.skipped_folders)
    info.image_count = _SubsetWalk(root, name, repeats, None, caption_exts, report, skip).run(items)
    if info.image_count:
        logger.info(
            "%s has no '<repeats>_<name>' subfolders: using its %d image(s) (subfolders included) with %d repeat(s).",
            root,
            info.image_count,
            repeats,
        )
    return items


def _no_images_error(root: Path, report: ScanReport) -> DatasetError:
    found = []
    if report.skipped_folders:
        found.append("skipped folders: " + ", ".join(f"{p.name} ({r})" for p, r in report.skipped_folders[:5]))
    if report.empty_files or report.hidden_files:
        found.append(f"{len(report.empty_files)} empty and {len(report.hidden_files)} hidden file(s) skipped")
    extra = (" Found: " + "; ".join(found) + ".") if found else ""
    return DatasetError(f"No training images found in {root}.{extra} {_layout_help(root)}")


def scan_dataset(
    train_data_dir: str | os.PathLike,
    caption_extension: str = ".txt",
    *,
    class_tokens_for_missing: bool = True,
    flat_repeats: int = 1,
) -> ScanResult:
    """Find the training images of ``train_data_dir`` (see the module doc for the layout).

    Returns a list of :class:`ImageItem` (subsets in name order, files in path order) with a
    ``.report`` (:class:`ScanReport`); its warnings are also logged. With
    ``class_tokens_for_missing`` False, images without a caption file get "" instead of the
    folder's class tokens. ``flat_repeats``: the repeats of a flat folder (no ``N_name``
    subfolders). Raises :class:`DatasetError` when the folder is missing or holds no usable image.
    """
    root = Path(train_data_dir)
    if not root.is_dir():
        raise DatasetError(f"Dataset folder {root} does not exist or is not a folder. {_layout_help(root)}")
    caption_exts = _caption_candidates(caption_extension)
    report = ScanReport(root=root)
    found = _scan_root(root, report)

    items: list[ImageItem] = []
    if found.subset_dirs:
        items = _scan_subsets(found, caption_exts, class_tokens_for_missing, report)
    elif found.root_images or found.other_dirs:
        items = _scan_flat(root, caption_exts, report, flat_repeats)

    for line in report.warnings():
        logger.warning(line)
    if not items:
        raise _no_images_error(root, report)
    for info in report.subsets.values():
        if info.image_count == 0:
            logger.warning("Skipped folder %s: no images in it.", info.folder)
            report.skipped_folders.append((info.folder, "no images"))
    report.subsets = {n: i for n, i in report.subsets.items() if i.image_count > 0}
    return ScanResult(items, report)


def dataset_dirs_info(items: Sequence[ImageItem]) -> dict[str, dict[str, int]]:
    """kohya's ``ss_dataset_dirs`` value: {subset_name: {"n_repeats": N, "img_count": images}}."""
    out: dict[str, dict[str, int]] = {}
    for it in items:
        d = out.setdefault(it.subset_name, {"n_repeats": it.repeats, "img_count": 0})
        d["img_count"] += 1
    return out


def dataset_tag_frequency(items: Sequence[ImageItem]) -> dict[str, dict[str, int]]:
    """kohya's ``ss_tag_frequency`` value: {subset_name: {tag: count}} over the items' captions
    (lower-cased tags, once per image: repeats are not counted, as in kohya)."""
    by_dir: dict[str, list[str]] = {}
    for it in items:
        by_dir.setdefault(it.subset_name, []).append(it.caption)
    return tag_frequency_by_dir(by_dir)
