"""The tag editor: tag frequencies, image lists filtered by tags, bulk edits with undo.

Captions are comma-separated tags (kohya's format); tags are compared with
:func:`~lora_trainer.workshop.store.tag_key` (case, ``_``/space and ``\\(``/``(`` ignored), and
written as given. A bulk edit (remove, replace, add) changes the captions of every image that
passes the filter: ``filter_tags`` (it has all of them) and ``without_tags`` (it has none of
them). Before it writes, it saves the old captions to ``.workshop/undo.json``; :func:`undo_last`
puts them back. One level of undo: each bulk edit replaces the previous snapshot (an edit that
changes nothing keeps it). Single-caption edits (``set_caption``) do not touch the snapshot.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lora_trainer.data.captions import split_tags
from lora_trainer.errors import ConfigError
from lora_trainer.workshop.layout import iter_images, rel_path, resolve_image
from lora_trainer.workshop.report import Report
from lora_trainer.workshop.store import (
    caption_file,
    has_both_captions,
    join_tags,
    read_caption,
    save_undo,
    tag_key,
    write_caption,
)

__all__ = [
    "ImageEntry",
    "ImageList",
    "TagCount",
    "TagEditReport",
    "TagStats",
    "bulk_add",
    "bulk_remove",
    "bulk_replace",
    "get_caption",
    "list_images",
    "set_caption",
    "tag_stats",
]


@dataclass
class ImageEntry:
    """path: the image's id (workspace-relative); folder: its ``<repeats>_<concept>`` folder;
    caption: "" when it has none (has_caption False)."""

    path: str
    folder: str
    repeats: int
    concept: str
    caption: str
    has_caption: bool


@dataclass
class ImageList(Report):
    images: list[ImageEntry] = field(default_factory=list)
    total: int = 0  # images in the workspace before filtering

    def __iter__(self):
        return iter(self.images)

    def __len__(self) -> int:
        return len(self.images)

    def paths(self) -> list[str]:
        return [e.path for e in self.images]


@dataclass
class TagCount:
    tag: str  # the most common spelling
    count: int  # images having it


@dataclass
class TagStats(Report):
    """Tag frequency over the images (each tag counted once per image), most common first."""

    images: int = 0
    captioned: int = 0
    tags: list[TagCount] = field(default_factory=list)

    def as_dict(self) -> dict[str, int]:
        return {t.tag: t.count for t in self.tags}


@dataclass
class TagEditReport(Report):
    """operation: what was done; matched: images passing the filter; changed: the images whose
    caption changed (their old captions are in the undo snapshot)."""

    operation: str = ""
    matched: int = 0
    changed: list[str] = field(default_factory=list)


def _keys(tags: Iterable[str]) -> set[str]:
    return {tag_key(t) for t in tags if tag_key(t)}


def _captions(root: Path) -> list[tuple[Path, str | None]]:
    return [(p, read_caption(p)) for p in iter_images(root)]


def _matches(tags: list[str], need: set[str], avoid: set[str]) -> bool:
    keys = _keys(tags)
    return need <= keys and not (avoid & keys)


def list_images(
    root: Path, filter_tags: Sequence[str] | str | None = None, without_tags: Sequence[str] | str | None = None
) -> ImageList:
    """The images with their captions, those having every ``filter_tags`` and none of ``without_tags``."""
    need, avoid = _keys(_as_list(filter_tags)), _keys(_as_list(without_tags))
    out = ImageList()
    for path, cap in _captions(root):
        out.total += 1
        if not _matches(split_tags(cap or ""), need, avoid):
            continue
        folder = path.relative_to(root).parts[0]
        repeats, _, concept = folder.partition("_")
        out.images.append(ImageEntry(rel_path(root, path), folder, int(repeats), concept, cap or "", cap is not None))
    return out


def tag_stats(root: Path, filter_tags: Sequence[str] | str | None = None) -> TagStats:
    """Tag frequency (of the images having every ``filter_tags``)."""
    need = _keys(_as_list(filter_tags))
    counts: dict[str, int] = {}
    spellings: dict[str, dict[str, int]] = {}
    stats = TagStats()
    for _, cap in _captions(root):
        tags = split_tags(cap or "")
        if not _matches(tags, need, set()):
            continue
        stats.images += 1
        if tags:
            stats.captioned += 1
        for k in _keys(tags):
            counts[k] = counts.get(k, 0) + 1
        for t in tags:
            sp = spellings.setdefault(tag_key(t), {})
            sp[t] = sp.get(t, 0) + 1
    stats.tags = [
        TagCount(max(spellings[k].items(), key=lambda kv: (kv[1], kv[0]))[0], n)
        for k, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    ]
    return stats


def get_caption(root: Path, image: str) -> str:
    """The caption of image ``image`` (an id from :func:`list_images`); "" if it has none."""
    return read_caption(resolve_image(root, image)) or ""


def set_caption(root: Path, image: str, text: str) -> str:
    """Write the caption of ``image``; returns it as stored (one line). Not recorded for undo."""
    path = resolve_image(root, image)
    write_caption(path, text)
    return read_caption(path) or ""


def _as_list(tags: Sequence[str] | str | None) -> list[str]:
    if tags is None:
        return []
    if isinstance(tags, str):
        return split_tags(tags)
    return [t for t in tags if t and t.strip()]


def _bulk(
    root: Path,
    operation: str,
    edit: Callable[[list[str]], list[str]],
    filter_tags: Sequence[str] | str | None,
    without_tags: Sequence[str] | str | None,
) -> TagEditReport:
    need, avoid = _keys(_as_list(filter_tags)), _keys(_as_list(without_tags))
    report = TagEditReport(operation=operation)
    planned: list[tuple[Path, str | None, str]] = []
    for path, cap in _captions(root):
        tags = split_tags(cap or "")
        if not _matches(tags, need, avoid):
            continue
        report.matched += 1
        new = join_tags(edit(list(tags)))
        if new != (cap or ""):
            planned.append((path, cap, new))
    if planned:
        save_undo(root, operation, {rel_path(root, p): old for p, old, _ in planned}, operation)
        for path, _, new in planned:
            _note_caption_source(root, path, report)
            write_caption(path, new)
            report.changed.append(rel_path(root, path))
    return report


def _note_caption_source(root: Path, image: Path, report: Report) -> None:
    """Say where an edited caption came from when a ``.caption`` file is involved, before the ``.txt`` is written."""
    rel = rel_path(root, image)
    source = caption_file(image)
    if source is not None and source.suffix == ".caption":
        report.add(
            "caption_converted",
            rel,
            f"{rel_path(root, source)} was read and written, with the edit, as {rel_path(root, source.with_suffix('.txt'))}"
            " (the caption training reads); the .caption file was kept.",
            "info",
        )
    elif has_both_captions(image):
        report.add(
            "caption_ignored",
            rel,
            f"{rel_path(root, image.with_suffix('.caption'))} was not edited: the .txt caption beside it wins.",
            "info",
        )


def bulk_remove(
    root: Path,
    tags: Sequence[str] | str,
    *,
    filter_tags: Sequence[str] | str | None = None,
    without_tags: Sequence[str] | str | None = None,
) -> TagEditReport:
    """Remove ``tags`` from every matching caption (e.g. drop a trait so the LoRA learns it as
    part of the trigger word)."""
    drop = _keys(_as_list(tags))
    if not drop:
        raise ConfigError("workshop.tags", "name at least one tag to remove")
    return _bulk(
        root,
        f"remove {', '.join(_as_list(tags))}",
        lambda ts: [t for t in ts if tag_key(t) not in drop],
        filter_tags,
        without_tags,
    )


def bulk_replace(
    root: Path,
    mapping: Mapping[str, str],
    *,
    filter_tags: Sequence[str] | str | None = None,
    without_tags: Sequence[str] | str | None = None,
) -> TagEditReport:
    """Replace tags in place: ``{old: new}``; ``new`` may be several comma-separated tags, or ""
    to remove ``old``. A replacement already in the caption is not repeated."""
    table = {tag_key(k): split_tags(v or "") for k, v in mapping.items() if tag_key(k)}
    if not table:
        raise ConfigError("workshop.tags", "give at least one tag to replace")

    def edit(ts: list[str]) -> list[str]:
        out: list[str] = []
        for t in ts:
            out.extend(table.get(tag_key(t), [t]))
        return out

    desc = ", ".join(f"{k} -> {v or '(nothing)'}" for k, v in mapping.items())
    return _bulk(root, f"replace {desc}", edit, filter_tags, without_tags)


def bulk_add(
    root: Path,
    tags: Sequence[str] | str,
    *,
    position: str = "start",
    filter_tags: Sequence[str] | str | None = None,
    without_tags: Sequence[str] | str | None = None,
) -> TagEditReport:
    """Add ``tags`` to every matching caption that lacks them, at the ``"start"`` or the ``"end"``.
    With ``"start"`` a tag already present moves to the front (the trigger-word position)."""
    add = _as_list(tags)
    if not add:
        raise ConfigError("workshop.tags", "name at least one tag to add")
    if position not in ("start", "end"):
        raise ConfigError("workshop.tags.position", f"must be 'start' or 'end', not {position!r}")
    keys = _keys(add)

    def edit(ts: list[str]) -> list[str]:
        if position == "start":
            return add + [t for t in ts if tag_key(t) not in keys]
        have = _keys(ts)
        return ts + [t for t in add if tag_key(t) not in have]

    return _bulk(root, f"add {', '.join(add)}", edit, filter_tags, without_tags)
