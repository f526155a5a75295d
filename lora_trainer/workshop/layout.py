"""Where things are in a workspace.

::

    <workspace>/
        10_mychar/              <- kohya concept folder: <repeats>_<concept>
            img1.png
            img1.txt            <- its caption, the one caption store training reads
        .workshop/              <- our state (hidden: the dataset scan skips it)
            state.json          <- name, creation time, import history
            hashes.json         <- cached content and perceptual hashes
            undo.json           <- captions before the last bulk edit
            quarantine/<rel>    <- files clean() could not use (corrupt, too large ...)
            removed/<rel>       <- exact duplicates removed by find_duplicates(remove_exact=True)
            originals/<rel>     <- full-size images before resize_fixed()

Nothing is ever deleted for good: files the workshop takes out of the dataset are moved under
``.workshop/`` with their captions.

A concept folder, subfolder or image whose name is not valid UTF-8 (put into the workspace by
hand; imports never write one) is renamed to a safe name, with its captions, the first time the
workshop lists it (logged as a warning): such names cannot be written to the workshop's JSON
files, logs or web pages, so every later step would fail on them.

Which folders are concept folders, which files are images and captions, what is hidden and the
name of ``.workshop/`` are the dataset rules of :mod:`lora_trainer.data.layout`, the ones training
applies; this module only says where the workshop keeps things.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from lora_trainer.data.layout import (
    CAPTION_EXTENSION,
    CAPTION_EXTENSIONS,
    WORKSHOP_STATE_DIR,
    is_hidden_entry,
    is_hidden_name,
    is_workshop_image,
    parse_subset_folder,
)
from lora_trainer.errors import DatasetError
from lora_trainer.log import logger
from lora_trainer.workshop.fsutil import is_undecodable, safe_name, unique_stem

__all__ = [
    "caption_path",
    "concept_folder_name",
    "concept_folders",
    "iter_images",
    "move_aside",
    "rel_path",
    "resolve_image",
    "state_dir",
    "whole_repeats",
]


def state_dir(root: Path, *sub: str) -> Path:
    return root.joinpath(WORKSHOP_STATE_DIR, *sub)


def caption_path(image: Path) -> Path:
    """The ``.txt`` caption file of ``image``."""
    return image.with_suffix(CAPTION_EXTENSION)


def whole_repeats(repeats: int) -> int:
    """``repeats`` as an int; :class:`DatasetError` unless it is a whole number of at least 1."""
    if int(repeats) != repeats or repeats < 1:
        raise DatasetError(f"Repeats must be a whole number of at least 1, got {repeats!r}.")
    return int(repeats)


def concept_folder_name(repeats: int, concept: str) -> str:
    """``<repeats>_<concept>`` with the concept made a safe folder name (``images`` if empty)."""
    return f"{whole_repeats(repeats)}_{safe_name(concept, 'images')}"


def _decodable(path: Path) -> Path:
    """``path``, renamed first (with its captions) when its name is not valid UTF-8 (see the module doc)."""
    if not is_undecodable(path.name):
        return path
    stem, ext = os.path.splitext(path.name)
    ext = ext if not is_undecodable(ext) else ""
    taken = {os.path.splitext(n)[0].lower() for n in os.listdir(path.parent) if not is_undecodable(n)}
    new = path.with_name(unique_stem(safe_name(stem, "renamed"), taken) + ext)
    try:
        os.rename(path, new)
        if not path.is_dir() and ext:
            for cap_ext in CAPTION_EXTENSIONS:
                cap = path.with_name(stem + cap_ext)
                if cap.is_file():
                    os.rename(cap, new.with_suffix(cap_ext))
    except OSError as e:
        logger.warning("Could not rename %s (a name that is not valid UTF-8): %s", ascii(str(path)), e.strerror or e)
        return path
    logger.warning("Renamed %s to %s: its name was not valid UTF-8.", ascii(str(path)), new)
    return new


def _sorted_entries(folder: Path) -> list[os.DirEntry]:
    """The entries of ``folder`` by name, with names that are not valid UTF-8 fixed first."""
    entries = list(os.scandir(folder))
    if any(is_undecodable(e.name) for e in entries):
        # images before captions: an image takes its captions along
        for e in sorted(entries, key=lambda e: os.path.splitext(e.name)[1].lower() in CAPTION_EXTENSIONS):
            if is_undecodable(e.name) and not is_hidden_entry(e) and os.path.lexists(e.path):
                _decodable(Path(e.path))
        entries = list(os.scandir(folder))
    return sorted(entries, key=lambda e: e.name)


def concept_folders(root: Path) -> list[tuple[Path, int, str]]:
    """(folder, repeats, concept) of the workspace's concept folders, by name: the folders
    training uses as subsets (:func:`lora_trainer.data.layout.parse_subset_folder`)."""
    out = []
    if not root.is_dir():
        return out
    for entry in _sorted_entries(root):
        if is_hidden_entry(entry) or not entry.is_dir():
            continue
        parsed = parse_subset_folder(entry.name)
        if parsed is not None:
            out.append((Path(entry.path), parsed[0], parsed[1]))
    return out


def iter_images(root: Path) -> list[Path]:
    """Every image in the concept folders (subfolders included, hidden ones skipped), sorted.
    Only files are listed: a FIFO or device with an image's name is left alone."""
    out: list[Path] = []
    for folder, _, _ in concept_folders(root):
        stack = [folder]
        while stack:
            current = stack.pop()
            try:
                entries = _sorted_entries(current)
            except OSError:
                continue
            for entry in entries:
                if is_hidden_entry(entry):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif is_workshop_image(entry.name) and entry.is_file():  # no FIFO or device
                    out.append(Path(entry.path))
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def rel_path(root: Path, path: Path) -> str:
    """``path`` relative to the workspace, posix style (the id the UI uses for an image)."""
    return path.relative_to(root).as_posix()


def resolve_image(root: Path, rel: str) -> Path:
    """The image file for a workspace-relative id; :class:`DatasetError` for ids that point
    outside the workspace, into ``.workshop/``, or at no image."""
    pure = PurePosixPath(str(rel).replace("\\", "/"))
    if pure.is_absolute() or not pure.parts or any(p in ("..", "") for p in pure.parts) or ":" in pure.parts[0]:
        raise DatasetError(f"{rel!r} is not an image of this workspace (use the ids that images() returns).")
    if is_hidden_name(pure.parts[0]):
        raise DatasetError(f"{rel!r} is not an image of this workspace (use the ids that images() returns).")
    path = root.joinpath(*pure.parts)
    if not is_workshop_image(path.name) or not path.is_file():
        raise DatasetError(f"No image {rel!r} in workspace {root}; reload the image list.")
    return path


def move_aside(root: Path, image: Path, area: str) -> str:
    """Move ``image`` and its caption to ``.workshop/<area>/<same relative path>`` (a unique name
    there); return the new workspace-relative path of the image."""
    rel = image.relative_to(root)
    dest_dir = state_dir(root, area, *rel.parent.parts)
    dest_dir.mkdir(parents=True, exist_ok=True)
    taken = {os.path.splitext(n)[0].lower() for n in os.listdir(dest_dir)}
    stem = unique_stem(image.stem, taken)
    dest = dest_dir / (stem + image.suffix)
    os.replace(image, dest)
    for cap_ext in CAPTION_EXTENSIONS:  # a .caption goes along too: it may be the image's only caption
        cap = image.with_suffix(cap_ext)
        if os.path.exists(cap):  # not Path.exists(): a name too long for a .caption reads as "none"
            os.replace(cap, dest.with_suffix(cap_ext))
    return dest.relative_to(root).as_posix()
