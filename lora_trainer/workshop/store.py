"""The caption store: one ``<image stem>.txt`` beside each image, read and written atomically,
plus the one-level undo of bulk caption edits (``.workshop/undo.json``) and the record of the
imported sources (``.workshop/sources.json``: the SHA-256 of each source file -> the workspace
file it became, kept pointing at that file when the workshop converts, renames or moves it, so a
re-import recognises its sources whatever was done to their copies since).

Every writer in the workshop (captioners, the tag editor, imports) goes through here, so there
is exactly one caption store, the one kohya's training reads.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lora_trainer.data.captions import decode_caption_bytes, split_tags
from lora_trainer.errors import DatasetError
from lora_trainer.workshop.fsutil import atomic_write_json, atomic_write_text, caption_text
from lora_trainer.workshop.layout import caption_path, rel_path, resolve_image, state_dir
from lora_trainer.workshop.report import Report

__all__ = [
    "UndoReport",
    "caption_file",
    "has_both_captions",
    "join_tags",
    "move_source_records",
    "read_caption",
    "record_sources",
    "save_undo",
    "source_records",
    "tag_key",
    "undo_info",
    "undo_last",
    "write_caption",
]

UNDO_FILE = "undo.json"
SOURCES_FILE = "sources.json"
_SPACES = re.compile(r"\s+")


def tag_key(tag: str) -> str:
    """How tags are compared: case, surrounding spaces, ``_`` versus space and ``\\(`` versus ``(``
    do not matter (``Long_Hair`` = ``long hair``; ``smile \\(x\\)`` = ``smile (x)``)."""
    t = tag.replace("\\(", "(").replace("\\)", ")").replace("_", " ")
    return _SPACES.sub(" ", t).strip().lower()


def join_tags(tags: Iterable[str]) -> str:
    """Tags joined kohya's way, ", ", with empty tags and repeats (by :func:`tag_key`) dropped."""
    seen: set[str] = set()
    out = []
    for t in tags:
        t = t.strip()
        k = tag_key(t)
        if k and k not in seen:
            seen.add(k)
            out.append(t)
    return ", ".join(out)


def caption_tags(caption: str) -> list[str]:
    return split_tags(caption)


def caption_file(image: Path) -> Path | None:
    """The file holding ``image``'s caption: its ``.txt``, else its ``.caption`` (as kohya-trainer's
    BLIP step writes them; the ``.txt`` wins where both exist, as in training), else None."""
    txt = caption_path(image)
    if os.path.isfile(txt):  # not Path.is_file(): a name too long for a .caption must read as "none"
        return txt
    other = image.with_suffix(".caption")
    return other if os.path.isfile(other) else None


def has_both_captions(image: Path) -> bool:
    """Whether ``image`` has a ``.caption`` beside its ``.txt`` (the ``.caption`` is then unused)."""
    return os.path.isfile(caption_path(image)) and os.path.isfile(image.with_suffix(".caption"))


def read_caption(image: Path) -> str | None:
    """The caption of ``image`` (one line, whitespace collapsed, NUL bytes dropped) from its ``.txt``
    or else its ``.caption`` (:func:`caption_file`), or None when it has neither.
    Non-UTF-8 files are decoded with a fallback (clean() rewrites them as UTF-8)."""
    path = caption_file(image)
    if path is None:
        return None
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise DatasetError(f"Cannot read caption {path} ({e.strerror or e}). Check its permissions.") from None
    text, _ = decode_caption_bytes(data)
    return caption_text((text or "").replace("\x00", ""))[0]


def clean_caption_text(text: str) -> str:
    """One line, runs of whitespace collapsed, no NUL bytes (what a caption file holds)."""
    return _SPACES.sub(" ", text.replace("\x00", "")).strip()


def write_caption(image: Path, text: str) -> None:
    """Write ``image``'s ``.txt`` atomically (UTF-8, one line)."""
    atomic_write_text(caption_path(image), clean_caption_text(text))


def remove_caption(image: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        caption_path(image).unlink()


# -- undo ------------------------------------------------------------------------------------------


def save_undo(root: Path, operation: str, before: Mapping[str, str | None], description: str = "") -> None:
    """Remember the captions ``before`` (workspace-relative image -> caption, None = no file) a
    bulk edit, replacing the previous snapshot (one level of undo)."""
    path = state_dir(root, UNDO_FILE)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        path,
        {
            "version": 1,
            "operation": operation,
            "description": description,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "captions": dict(before),
        },
    )


def undo_info(root: Path) -> dict | None:
    """``{"operation", "description", "time", "files"}`` of the edit :func:`undo_last` would undo, or None."""
    data = _load_undo(root)
    if data is None:
        return None
    return {
        "operation": data.get("operation", ""),
        "description": data.get("description", ""),
        "time": data.get("time", ""),
        "files": len(data.get("captions", {})),
    }


def _load_undo(root: Path) -> dict | None:
    path = state_dir(root, UNDO_FILE)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise DatasetError(f"The undo file {path} is damaged ({e}); delete it to go on.") from None
    if not isinstance(data, dict) or not isinstance(data.get("captions"), dict):
        raise DatasetError(f"The undo file {path} is damaged; delete it to go on.")
    return data


@dataclass
class UndoReport(Report):
    """undone: whether there was something to undo; operation: what was undone; restored: the
    images whose captions were put back; ``problems``: images no longer in the workspace."""

    undone: bool = False
    operation: str = ""
    restored: list[str] = field(default_factory=list)


def undo_last(root: Path) -> UndoReport:
    """Put back the captions saved before the last bulk edit, then forget the snapshot."""
    report = UndoReport()
    data = _load_undo(root)
    if data is None:
        report.add("nothing_to_undo", "", "There is no bulk edit to undo.", "info")
        return report
    report.operation = str(data.get("operation", ""))
    for rel, text in sorted(data["captions"].items()):
        try:
            image = resolve_image(root, rel)
        except DatasetError:
            report.add("missing", rel, f"{rel} is no longer in the workspace; its caption was not restored.")
            continue
        if text is None:
            remove_caption(image)
        else:
            write_caption(image, str(text))
        report.restored.append(rel_path(root, image))
    state_dir(root, UNDO_FILE).unlink()
    report.undone = True
    return report


# -- imported sources ------------------------------------------------------------------------------


def source_records(root: Path) -> dict[str, str]:
    """The imported sources: SHA-256 of a source file -> workspace-relative path of its copy now.
    An unreadable or damaged record reads as empty (a re-import then finds copies by name only)."""
    try:
        data = json.loads(state_dir(root, SOURCES_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict):
        return {}
    return {str(k): v for k, v in files.items() if isinstance(v, str)}


def _save_sources(root: Path, files: Mapping[str, str]) -> None:
    path = state_dir(root, SOURCES_FILE)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"version": 1, "files": dict(sorted(files.items()))})


def record_sources(root: Path, new: Mapping[str, str]) -> None:
    """Add imported sources (SHA-256 -> workspace-relative path) to the record."""
    if new:
        _save_sources(root, {**source_records(root), **new})


def move_source_records(
    root: Path, moves: Mapping[str, str] | None = None, folders: Mapping[str, str] | None = None
) -> None:
    """Keep the record pointing at the copies after they moved: ``moves`` maps old to new
    workspace-relative file paths, ``folders`` old to new concept folder names."""
    moves, folders = moves or {}, folders or {}
    files = source_records(root)
    changed = False
    for digest, rel in files.items():
        head, sep, tail = rel.partition("/")
        new = moves.get(rel) or (folders[head] + sep + tail if sep and head in folders else None)
        if new is not None and new != rel:
            files[digest] = new
            changed = True
    if changed:
        _save_sources(root, files)
