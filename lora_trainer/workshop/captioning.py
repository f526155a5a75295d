"""Automatic captions: the :class:`Captioner` protocol and the caption pipeline.

A captioner turns a PIL image into a caption. Free-text captioners (BLIP) return a string;
taggers (WD14, DeepBooru) return tags with scores, as a ``{tag: score}`` mapping or a list of
``(tag, score)`` pairs. DeepBooru and BLIP come from the WebUI through the host adapter; the
core ships :class:`lora_trainer.workshop.wd14.WD14Captioner`.

The pipeline (:func:`caption_workspace`), per image:

1. ``mode="keep"`` and the image already has a non-empty caption: the captioner is not run.
2. Otherwise the captioner runs on the image (RGB, upright), and its output is post-processed
   (:func:`postprocess`): score ``threshold``, ``exclude_tags``, order (``sort``: by score,
   alphabetical, or as returned), ``max_tags``, ``replace_underscores`` (kaomoji such as ``^_^``
   are left alone) and ``escape_parentheses`` (``(`` -> ``\\(``, the WebUI DeepBooru option).
3. The result is merged with the existing caption (:func:`merge_caption`): ``overwrite``
   replaces it, ``append`` adds the tags it lacks at the end, ``keep`` keeps a non-empty one.
4. ``trigger_words`` go first, each once (an existing copy elsewhere in the caption moves to the front).
5. The caption is written to ``<image>.txt`` (atomically), the only caption file training reads.

All writes happen after all captions are computed, in one step that first saves the old captions
to ``.workshop/undo.json``, so :meth:`Workspace.undo` reverts a whole caption run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Protocol, Union, runtime_checkable

from PIL import Image

from lora_trainer.data.captions import split_tags
from lora_trainer.data.images import load_image_rgb
from lora_trainer.errors import ConfigError, DatasetError, LoraTrainerError
from lora_trainer.workshop.layout import iter_images, rel_path, resolve_image
from lora_trainer.workshop.report import Report
from lora_trainer.workshop.store import join_tags, read_caption, save_undo, tag_key, write_caption

__all__ = [
    "CAPTION_MODES",
    "KAOMOJIS",
    "CaptionOptions",
    "CaptionOutput",
    "CaptionReport",
    "CaptionResult",
    "Captioner",
    "CaptionerUnavailable",
    "caption_workspace",
    "merge_caption",
    "postprocess",
]

CaptionOutput = Union[str, Mapping[str, float], Sequence[tuple[str, float]]]
CAPTION_MODES = ("overwrite", "append", "keep")
SORT_MODES = ("score", "alpha", "none")

# Tags whose underscore is part of the face, kept as is by replace_underscores (the WD14 tagger
# extension and kohya's tagger script keep the same ones).
KAOMOJIS = frozenset(
    {
        "0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o", "@_@",
        "^_^", "o_o", "u_u", "x_x", "|_|", "||_||",
    }
)  # fmt: skip


class CaptionerUnavailable(LoraTrainerError):
    """A captioner cannot run at all (a missing package or model); the message says what to do."""


@runtime_checkable
class Captioner(Protocol):
    """Anything with a ``name`` and ``caption(image) -> str | {tag: score} | [(tag, score)]``.

    ``image`` is an RGB PIL image, EXIF orientation applied. Raise :class:`CaptionerUnavailable`
    when the captioner cannot work at all (the pipeline stops); any other exception is reported
    for that image and the run goes on.
    """

    name: str

    def caption(self, image: Image.Image) -> CaptionOutput: ...


@dataclass
class CaptionOptions:
    """How captions are post-processed, merged and written. Plain JSON-friendly fields;
    :meth:`from_dict` builds one from the UI's values and :meth:`validate` checks them."""

    mode: str = field(default="keep", metadata={"help": "overwrite | append | keep (only fill missing captions)"})
    threshold: float = field(default=0.0, metadata={"help": "drop tags scored below this (taggers only)"})
    replace_underscores: bool = field(default=True, metadata={"help": "long_hair -> long hair (not kaomoji)"})
    escape_parentheses: bool = field(
        default=False,
        metadata={"help": "( -> \\( as in WebUI prompts; off by default: training reads captions literally"},
    )
    sort: str = field(default="score", metadata={"help": "score | alpha | none (as the captioner returned them)"})
    max_tags: int = field(default=0, metadata={"help": "keep at most this many tags (0 = all)"})
    trigger_words: list[str] = field(default_factory=list, metadata={"help": "put first in every caption, once"})
    exclude_tags: list[str] = field(default_factory=list, metadata={"help": "never write these tags"})

    @classmethod
    def from_dict(cls, d: Mapping) -> CaptionOptions:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError("workshop.caption", f"unknown option(s): {', '.join(sorted(unknown))}")
        opts = cls(**{k: v for k, v in d.items() if k in names})
        opts.validate()
        return opts

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        if isinstance(self.trigger_words, str):
            self.trigger_words = split_tags(self.trigger_words)
        if isinstance(self.exclude_tags, str):
            self.exclude_tags = split_tags(self.exclude_tags)
        if self.mode not in CAPTION_MODES:
            raise ConfigError("workshop.caption.mode", f"must be one of {', '.join(CAPTION_MODES)}, not {self.mode!r}")
        if self.sort not in SORT_MODES:
            raise ConfigError("workshop.caption.sort", f"must be one of {', '.join(SORT_MODES)}, not {self.sort!r}")
        if not 0.0 <= float(self.threshold) <= 1.0:
            raise ConfigError("workshop.caption.threshold", f"must be between 0 and 1, got {self.threshold!r}")
        if int(self.max_tags) != self.max_tags or self.max_tags < 0:
            raise ConfigError("workshop.caption.max_tags", f"must be a whole number >= 0, got {self.max_tags!r}")


def _as_scored(output: CaptionOutput) -> list[tuple[str, float | None]]:
    if isinstance(output, str):
        return [(t, None) for t in split_tags(output)]
    if isinstance(output, Mapping):
        return [(str(t), float(s)) for t, s in output.items()]
    out = []
    for item in output:
        if isinstance(item, str):
            out.append((item, None))
        else:
            t, s = item
            out.append((str(t), None if s is None else float(s)))
    return out


def _format_tag(tag: str, opts: CaptionOptions) -> str:
    tag = tag.strip()
    if opts.replace_underscores and tag not in KAOMOJIS:
        tag = tag.replace("_", " ")
    if opts.escape_parentheses:
        tag = tag.replace("\\(", "(").replace("\\)", ")").replace("(", "\\(").replace(")", "\\)")
    return tag


def postprocess(output: CaptionOutput, opts: CaptionOptions) -> list[str]:
    """The captioner's ``output`` as the list of tags to write (steps 2 of the module doc).
    A free-text caption is one "tag" per comma-separated part; the threshold applies to scored tags only."""
    scored = _as_scored(output)
    excluded = {tag_key(t) for t in opts.exclude_tags}
    scored = [
        (t, s) for t, s in scored if t.strip() and (s is None or s >= opts.threshold) and tag_key(t) not in excluded
    ]
    if opts.sort == "score":
        scored.sort(key=lambda ts: -(ts[1] if ts[1] is not None else float("inf")))  # stable: unscored keep order
    elif opts.sort == "alpha":
        scored.sort(key=lambda ts: tag_key(ts[0]))
    tags = []
    seen: set[str] = set()
    for t, _ in scored:
        k = tag_key(t)
        if k not in seen:
            seen.add(k)
            tags.append(_format_tag(t, opts))
    if opts.max_tags:
        tags = tags[: opts.max_tags]
    return tags


def merge_caption(existing: str | None, new_tags: Sequence[str] | None, opts: CaptionOptions) -> str:
    """The caption to write, from the ``existing`` one (None or "" = none) and the post-processed
    ``new_tags`` (None = the captioner was not run), by ``opts.mode``, trigger words first."""
    old = split_tags(existing or "")
    new = list(new_tags or [])
    if opts.mode == "overwrite" and new_tags is not None:
        tags = new
    elif opts.mode == "append":
        keys = {tag_key(t) for t in old}
        tags = old + [t for t in new if tag_key(t) not in keys]
    else:  # keep (or overwrite without a new caption)
        tags = old if old else new
    triggers = [t.strip() for t in opts.trigger_words if t.strip()]
    if triggers:
        tkeys = {tag_key(t) for t in triggers}
        tags = triggers + [t for t in tags if tag_key(t) not in tkeys]
    return join_tags(tags)


@dataclass
class CaptionResult:
    """One image: action ``"written"`` (caption changed), ``"unchanged"``, ``"skipped"`` (kept,
    the captioner did not run) or ``"failed"``; caption: the caption now."""

    path: str
    action: str
    caption: str = ""


@dataclass
class CaptionReport(Report):
    """captioner: its name; results: one per image; stopped: the run was cancelled (captions
    computed so far were written). problems codes: caption_failed, unreadable."""

    captioner: str = ""
    options: dict = field(default_factory=dict)
    results: list[CaptionResult] = field(default_factory=list)
    written: int = 0
    unchanged: int = 0
    skipped: int = 0
    failed: int = 0
    stopped: bool = False


def _options(options: CaptionOptions | Mapping | None) -> CaptionOptions:
    if options is None:
        opts = CaptionOptions()
    elif isinstance(options, Mapping):
        opts = CaptionOptions.from_dict(options)
    else:
        opts = options
    opts.validate()
    return opts


_Planned = tuple[Path, str | None, str, bool]  # path, old caption, new caption, captioner ran


def _fail(report: CaptionReport, rel: str, code: str, message: str, caption: str = "") -> None:
    report.add(code, rel, message, "error")
    report.results.append(CaptionResult(rel, "failed", caption))
    report.failed += 1


def _plan_image(
    root: Path, path: Path, captioner: Captioner, opts: CaptionOptions, report: CaptionReport
) -> _Planned | None:
    """The caption ``path`` gets (the captioner runs unless "keep" finds one); None when the
    image failed (reported)."""
    rel = rel_path(root, path)
    try:
        existing = read_caption(path)
    except DatasetError as e:
        _fail(report, rel, "unreadable", str(e))
        return None
    new_tags = None
    if not (opts.mode == "keep" and existing):
        try:
            img = load_image_rgb(path)
        except DatasetError as e:
            _fail(report, rel, "unreadable", f"{e} Run clean() to move such files aside.", existing or "")
            return None
        try:
            new_tags = postprocess(captioner.caption(img), opts)
        except CaptionerUnavailable:
            raise
        except Exception as e:  # noqa: BLE001 - a captioner may raise anything; one bad image must not stop a long run
            _fail(
                report,
                rel,
                "caption_failed",
                f"{captioner.name} failed on {rel}: {type(e).__name__}: {e}",
                existing or "",
            )
            return None
        finally:
            img.close()
    return path, existing, merge_caption(existing, new_tags, opts), new_tags is not None


def _write_planned(root: Path, planned: list[_Planned], captioner: Captioner, report: CaptionReport) -> None:
    """Write the changed captions (after saving the old ones for undo) and record every result."""
    # an image without a caption file that would get an empty caption is left without one
    changed = {rel_path(root, p): old for p, old, new, _ in planned if (old or "") != new}
    if changed:
        save_undo(root, f"caption:{captioner.name}", changed, f"{len(changed)} caption(s) by {captioner.name}")
    for path, _old, new, ran in planned:
        rel = rel_path(root, path)
        if rel in changed:
            write_caption(path, new)
            report.results.append(CaptionResult(rel, "written", new))
            report.written += 1
        elif ran:
            report.results.append(CaptionResult(rel, "unchanged", new))
            report.unchanged += 1
        else:
            report.results.append(CaptionResult(rel, "skipped", new))
            report.skipped += 1


def caption_workspace(
    root: Path,
    captioner: Captioner,
    options: CaptionOptions | Mapping | None = None,
    *,
    images: Sequence[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> CaptionReport:
    """Caption the workspace's images (or the workspace-relative ``images``); see the module doc.

    ``progress(done, total)`` is called after each image; ``should_stop()`` is polled before
    each one. Raises :class:`CaptionerUnavailable` if the captioner cannot run (nothing is
    written then), :class:`ConfigError` for bad options.
    """
    opts = _options(options)
    if not isinstance(captioner, Captioner):
        raise TypeError("captioner must have a name and a caption(image) method")
    paths = [resolve_image(root, r) for r in images] if images is not None else iter_images(root)
    report = CaptionReport(captioner=str(captioner.name), options=opts.to_dict())

    planned: list[_Planned] = []
    for n, path in enumerate(paths):
        if should_stop is not None and should_stop():
            report.stopped = True
            break
        plan = _plan_image(root, path, captioner, opts, report)
        if plan is None:
            continue
        planned.append(plan)
        if progress is not None:
            progress(n + 1, len(paths))

    _write_planned(root, planned, captioner, report)
    report.results.sort(key=lambda r: r.path)
    return report
