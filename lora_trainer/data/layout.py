"""The dataset folder rules, defined once for training and the dataset workshop.

Training (:mod:`lora_trainer.data.dataset`) and the workshop (:mod:`lora_trainer.workshop`)
both read these; neither defines its own. Torch-free, so the workshop's import-only paths stay light.

Subset folders (kohya's ``<repeats>_<class tokens>``)
    A folder is a training subset when its name is ASCII or Unicode decimal digits, an
    underscore, then anything (``^(\\d+)_(.*)$``) and the number is at least 1. The rest, stripped
    of surrounding spaces, is the folder's class tokens, and may be empty: ``10_`` is a subset with
    10 repeats and no class tokens, as in kohya (``config_util.generate_dreambooth_subsets_config_by_subdirs``
    splits the name at ``_``, reads the first part as the repeat count, joins the rest back, and skips
    counts below 1). So ``10_x`` is (10, ``x``), ``10__x`` is (10, ``_x``), ``0_x`` has 0 repeats
    and is skipped, ``x`` is no subset.
    Stricter than kohya on purpose: kohya reads the count with Python's ``int()``, which also takes
    `` 10_x`` (spaces around the number), ``+10_x`` and a bare ``10`` (no underscore). Those are
    not subsets here; training reports them as skipped folders with a rename hint, and the
    workshop lists them as misplaced, so the user sees them instead of training on a typo.

Images
    :data:`IMAGE_EXTENSIONS` are the files training reads (kohya's list). The workshop also accepts
    :data:`CONVERTIBLE_IMAGE_EXTENSIONS`: formats Pillow decodes that training does not read; the
    importer names the JPEG aliases ``.jpg`` and ``Workspace.clean()`` saves the rest as PNG.

Captions
    :data:`CAPTION_EXTENSIONS` are the caption files read beside an image (training prefers its
    ``caption_extension``); :data:`CAPTION_EXTENSION` (``.txt``) is the one the workshop writes.

Hidden entries and the workshop's state
    :func:`is_hidden_name` / :func:`is_hidden_entry` name what both skip. :data:`WORKSHOP_STATE_DIR`
    (``.workshop``) holds a workspace's own state; it is hidden, and training skips it silently.
"""

from __future__ import annotations

import os
import re
import stat

__all__ = [
    "CAPTION_EXTENSION",
    "CAPTION_EXTENSIONS",
    "CONVERTIBLE_IMAGE_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "WORKSHOP_IMAGE_EXTENSIONS",
    "WORKSHOP_STATE_DIR",
    "is_hidden_entry",
    "is_hidden_name",
    "is_image_file",
    "is_workshop_image",
    "parse_subset_folder",
    "special_file_kind",
    "split_subset_folder",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CONVERTIBLE_IMAGE_EXTENSIONS = (".jfif", ".jpe", ".tga", ".ppm", ".pgm", ".pbm", ".pnm", ".dib")
WORKSHOP_IMAGE_EXTENSIONS = (*IMAGE_EXTENSIONS, *CONVERTIBLE_IMAGE_EXTENSIONS)

CAPTION_EXTENSIONS = (".txt", ".caption")
CAPTION_EXTENSION = ".txt"

WORKSHOP_STATE_DIR = ".workshop"

_SUBSET_RE = re.compile(r"^(\d+)_(.*)$", re.DOTALL)
_FILE_ATTRIBUTE_HIDDEN = 0x2


def is_image_file(path: str | os.PathLike) -> bool:
    """True when ``path`` has one of :data:`IMAGE_EXTENSIONS` (any letter case): training reads it."""
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_EXTENSIONS


def is_workshop_image(path: str | os.PathLike) -> bool:
    """True when ``path`` has one of :data:`WORKSHOP_IMAGE_EXTENSIONS` (any letter case)."""
    return os.path.splitext(os.fspath(path))[1].lower() in WORKSHOP_IMAGE_EXTENSIONS


def split_subset_folder(name: str) -> tuple[int, str] | None:
    """(repeats, class tokens) of a ``<digits>_<rest>`` folder name, repeats possibly 0; None for
    any other name. See the module doc."""
    m = _SUBSET_RE.match(name)
    if m is None:
        return None
    return int(m.group(1)), m.group(2).strip()


def parse_subset_folder(name: str) -> tuple[int, str] | None:
    """(repeats, class tokens) of a folder training uses as a subset; None otherwise (0 repeats too)."""
    parsed = split_subset_folder(name)
    if parsed is None or parsed[0] < 1:
        return None
    return parsed


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


def special_file_kind(mode: int) -> str | None:
    """What a file that is not a regular file is, in words (for a "skipped" note); None for a regular file.
    Only regular files are ever opened: a FIFO would block the reader, a device never ends."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"
