"""HTML of the Dataset workshop: the workshop's reports, the workspace summary and errors.

Plain functions of the core's report dataclasses (:mod:`lora_trainer.workshop`), no gradio, so
they are tested without a browser; everything user- or file-derived is escaped. Boxed messages
come from :func:`lora_trainer.webui.render.message_html`, as on the rest of the tab.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from html import escape
from pathlib import Path
from typing import Any

from lora_trainer.errors import ConfigError, LoraTrainerError
from lora_trainer.webui.render import message_html
from lora_trainer.workshop import (
    Advice,
    BucketPlanReport,
    CaptionReport,
    CleanReport,
    DuplicateReport,
    ImportReport,
    Problem,
    ResizeReport,
    TagEditReport,
    TagStats,
    UndoReport,
    WorkspaceSummary,
)

__all__ = [
    "PROBLEM_ROWS",
    "RESULT_ROWS",
    "advice_html",
    "buckets_html",
    "caption_html",
    "clean_html",
    "duplicates_html",
    "error_html",
    "gallery_info_html",
    "import_html",
    "no_workspace_html",
    "note_html",
    "problems_html",
    "resize_html",
    "summary_html",
    "tag_edit_html",
    "tag_rows",
    "undo_html",
]

PROBLEM_ROWS = 200  # problem lines shown per report
RESULT_ROWS = 60  # caption results shown per report

_SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}
_SEVERITY_LABEL = {"error": "error", "warning": "warning", "info": "note"}


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def note_html(text: str) -> str:
    """One grey line of explanation under a report."""
    return f'<div class="lora_train_ws_note">{_e(text)}</div>'


def no_workspace_html() -> str:
    """The summary while no workspace is picked."""
    return note_html("No workspace open: create one (a name, then Create) or pick one.")


def gallery_info_html(listed: int, total: int, filter_tags: str, shown: int, limit: int) -> str:
    """The line above the thumbnails: ``listed`` of ``total`` images match ``filter_tags``, the
    first ``limit`` are offered and ``shown`` of those had a thumbnail."""
    line = f"{listed} of {total} image(s)"
    if filter_tags and filter_tags.strip():
        line += f" have {filter_tags.strip()}"
    if listed > limit:
        line += f"; the first {limit} are shown (filter by a tag to see others)"
    if shown < min(listed, limit):
        line += f"; {min(listed, limit) - shown} unreadable (run Clean)"
    return note_html(f"{line}. Click one to edit its caption.")


def error_html(exc: BaseException) -> str:
    """A typed error as a red box (a ConfigError by its setting's short name); anything else by type."""
    if isinstance(exc, ConfigError):
        name = exc.field.rsplit(".", 1)[-1].replace("_", " ")
        return message_html(f"{name[:1].upper()}{name[1:]}: {exc.message}")
    if isinstance(exc, LoraTrainerError):
        return message_html(str(exc))
    return message_html(f"Unexpected error: {type(exc).__name__}: {exc}")


def _counts(items: Iterable[tuple[str, Any]]) -> str:
    cells = "".join(f"<span><b>{_e(v)}</b> {_e(k)}</span>" for k, v in items)
    return f'<div class="lora_train_ws_counts">{cells}</div>'


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    thead = f"<thead><tr>{head}</tr></thead>" if any(headers) else ""
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="lora_train_ws_table {cls}">{thead}<tbody>{body}</tbody></table>'


def _report(title: str, kind: str, counts: Iterable[tuple[str, Any]], *parts: str) -> str:
    """A report box: title (kind: ok, warning, error), counts, then the given HTML parts."""
    return (
        f'<div class="lora_train_ws_report lora_train_ws_report_{kind}">'
        f'<div class="lora_train_ws_report_title">{_e(title)}</div>{_counts(counts)}{"".join(parts)}</div>'
    )


def problems_html(problems: Sequence[Problem], limit: int = PROBLEM_ROWS) -> str:
    """Per-file problems, errors first: severity, file, what happened. Open unless all are notes."""
    if not problems:
        return ""
    ordered = sorted(problems, key=lambda p: _SEVERITY_ORDER.get(p.severity, 3))
    by_sev: dict[str, int] = {}
    for p in problems:
        by_sev[p.severity] = by_sev.get(p.severity, 0) + 1
    summary = ", ".join(
        f"{n} {_SEVERITY_LABEL[s]}{'s' if n != 1 else ''}" for s in ("error", "warning", "info") if (n := by_sev.get(s))
    )
    rows = [
        (
            f'<span class="lora_train_ws_sev lora_train_ws_sev_{_e(p.severity)}">{_e(_SEVERITY_LABEL[p.severity])}</span>',
            f"<code>{_e(p.path)}</code>" if p.path else "",
            _e(p.message),
        )
        for p in ordered[:limit]
    ]
    more = f'<div class="lora_train_ws_more">… and {len(ordered) - limit} more</div>' if len(ordered) > limit else ""
    is_open = " open" if by_sev.get("error") or by_sev.get("warning") else ""
    return (
        f'<details class="lora_train_ws_problems"{is_open}><summary>Per file: {_e(summary)}</summary>'
        f"{_table(('', 'File', 'What happened'), rows)}{more}</details>"
    )


def _kind(problems: Sequence[Problem]) -> str:
    sev = {p.severity for p in problems}
    return "error" if "error" in sev else "warning" if "warning" in sev else "ok"


def import_html(r: ImportReport) -> str:
    folders = _table(
        ("Folder", "Images imported"), ((f"<code>{_e(k)}</code>", v) for k, v in r.concept_folders.items())
    )
    return _report(
        r.summary(),
        _kind(r.problems),
        [("imported", len(r.imported)), ("skipped", r.skipped), ("notes", len(r.problems))],
        folders if r.concept_folders else "",
        problems_html(r.problems),
    )


def clean_html(r: CleanReport) -> str:
    return _report(
        f"Clean: {r.summary()}",
        _kind(r.problems),
        [("fine", r.kept), ("converted", r.converted), ("quarantined", r.quarantined)],
        problems_html(r.problems),
    )


def duplicates_html(r: DuplicateReport) -> str:
    def files(g) -> str:
        return ", ".join(f"<b><code>{_e(f)}</code></b>" if f == g.keep else f"<code>{_e(f)}</code>" for f in g.files)

    rows = [("exact", files(g), "same file content") for g in r.exact]
    rows += [("near", files(g), f"distance {g.distance} of 128 bits") for g in r.near]
    groups = _table(("Kind", "Files (bold: the one to keep)", ""), rows) if rows else note_html("No duplicates found.")
    removed = ""
    if r.removed:
        removed = _table(
            ("Removed", "Duplicate of", "Moved to"),
            (
                (
                    f"<code>{_e(d['path'])}</code>",
                    f"<code>{_e(d['duplicate_of'])}</code>",
                    f"<code>{_e(d['moved_to'])}</code>",
                )
                for d in r.removed
            ),
        )
    kind = "warning" if rows and not r.removed else _kind(r.problems)
    return _report(
        f"Duplicates among {r.images} image(s) (near: at most {r.threshold} bits apart)",
        kind,
        [("exact groups", len(r.exact)), ("near groups", len(r.near)), ("removed", len(r.removed))],
        groups,
        removed,
        problems_html(r.problems),
    )


def buckets_html(r: BucketPlanReport) -> str:
    rows = [(f"{b.width}×{b.height}", b.images, b.images_with_repeats) for b in r.buckets]
    res = f"{r.resolution[0]}×{r.resolution[1]}"
    return _report(
        f"Buckets at {res}: {r.images} image(s) in {len(r.buckets)} bucket(s)",
        _kind(r.problems),
        [
            ("buckets", len(r.buckets)),
            ("enlarged", len(r.upscaled)),
            ("too small", len(r.too_small)),
            ("mean aspect error", f"{r.mean_ar_error:.3f}"),
        ],
        _table(("Bucket", "Images", "With repeats"), rows) if rows else "",
        problems_html(r.problems),
    )


def resize_html(r: ResizeReport) -> str:
    upscaled = sum(1 for x in r.resized if x.upscaled)
    return _report(
        f"Resized to {r.width}×{r.height} ({r.crop} crop); full-size originals kept in .workshop/originals",
        _kind(r.problems),
        [("resized", len(r.resized)), ("left as they were", r.skipped), ("enlarged", upscaled)],
        problems_html(r.problems),
    )


def caption_html(r: CaptionReport) -> str:
    title = f"Captions by {r.captioner}" + (
        " (stopped: the captions computed so far were written)" if r.stopped else ""
    )
    shown = [x for x in r.results if x.action != "skipped"][:RESULT_ROWS]
    rows = [(f"<code>{_e(x.path)}</code>", _e(x.action), _e(x.caption)) for x in shown]
    table = (
        f'<details class="lora_train_ws_results"><summary>Captions ({len(shown)} shown)</summary>'
        f"{_table(('Image', 'Result', 'Caption'), rows)}</details>"
        if rows
        else ""
    )
    undo = note_html("Tags › Undo reverts this run.") if r.written else ""
    return _report(
        title,
        "warning" if r.stopped and not r.problems else _kind(r.problems),
        [("written", r.written), ("unchanged", r.unchanged), ("kept", r.skipped), ("failed", r.failed)],
        undo,
        table,
        problems_html(r.problems),
    )


def tag_edit_html(r: TagEditReport) -> str:
    title = f"{r.operation[:1].upper()}{r.operation[1:]}: {len(r.changed)} caption(s) changed"
    if not r.changed:
        title += " (nothing to change; the undo still reverts the previous edit)"
    return _report(
        title,
        "ok" if r.changed else "warning",
        [("images matched", r.matched), ("changed", len(r.changed))],
        note_html("Undo reverts it.") if r.changed else "",
        problems_html(r.problems),
    )


def undo_html(r: UndoReport) -> str:
    if not r.undone:
        return message_html("There is no bulk edit to undo.", "info")
    return _report(
        f"Undone: {r.operation}", _kind(r.problems), [("captions restored", len(r.restored))], problems_html(r.problems)
    )


def advice_html(a: Advice, note: str = "") -> str:
    rows = [
        ("Images", a.images),
        ("Repeats (average)", f"{a.repeats:g}"),
        ("Images × repeats per epoch", a.samples_per_epoch),
        ("Batch size", a.batch_size),
        ("Steps per epoch", a.steps_per_epoch),
        ("Epochs", a.epochs),
        ("Total steps", a.total_steps),
        ("Steps per image", f"{a.steps_per_image:g}"),
    ]
    if a.validation_images:
        rows.insert(1, ("Held out for validation", a.validation_images))
    numbers = _table(("", ""), ((_e(k), f"<b>{_e(v)}</b>") for k, v in rows), "lora_train_ws_numbers")
    warnings = "".join(
        f'<li class="lora_train_ws_sev_{_e(w.severity)}" data-code="{_e(w.code)}">{_e(w.message)}</li>'
        for w in a.warnings
    )
    suggestions = _table(
        ("Try", "Repeats", "Epochs", "Steps per epoch", "Total steps", "Steps per image"),
        (
            (_e(s.note), s.repeats, s.epochs, s.steps_per_epoch, s.total_steps, f"{s.steps_per_image:g}")
            for s in a.suggestions
        ),
    )
    title = "Looks good: enough images and steps." if a.ok else f"{len(a.warnings)} thing(s) to look at"
    return _report(
        title,
        "ok" if a.ok else "warning",
        [("steps per image", f"{a.steps_per_image:g}"), ("total steps", a.total_steps)],
        note_html(note) if note else "",
        numbers,
        f'<ul class="lora_train_ws_warnings">{warnings}</ul>' if warnings else "",
        suggestions if a.suggestions else "",
    )


def summary_html(s: WorkspaceSummary, training_dir: str | None = None) -> str:
    rows = [(f"<code>{_e(c.folder)}</code>", _e(c.concept), c.repeats, c.images, c.captioned) for c in s.concepts]
    folders = _table(("Folder", "Concept", "Repeats", "Images", "Captioned"), rows) if rows else ""
    notes = []
    if not s.images:
        notes.append("No images yet: import a folder, a zip or images.")
    if s.undo:
        notes.append(f"Undo available: {s.undo.get('description') or s.undo.get('operation')}.")
    if s.quarantined:
        notes.append(f"{s.quarantined} unusable file(s) set aside in .workshop/quarantine.")
    if training_dir is not None:
        same = _same_path(training_dir, s.path)
        notes.append(
            "Training reads this workspace (Dataset › Training images folder)."
            if same
            else "Training reads another folder: press “Use for training” to train on this workspace."
        )
    notes_html = "".join(note_html(n) for n in notes)
    return (
        f'<div class="lora_train_ws_summary" data-workspace="{_e(s.name)}">'
        f'<div class="lora_train_ws_report_title">Workspace <b>{_e(s.name)}</b> <code>{_e(s.path)}</code></div>'
        f"{_counts([('images', s.images), ('captioned', s.captioned), ('folders', len(s.concepts))])}"
        f"{folders}{notes_html}</div>"
    )


def _same_path(a: str, b: str) -> bool:
    if not a or not a.strip():
        return False
    try:
        return Path(a.strip()).resolve() == Path(b).resolve()
    except OSError:
        return False


def tag_rows(stats: TagStats) -> list[list[Any]]:
    """The frequency table's rows: [tag, images having it], most common first."""
    return [[t.tag, t.count] for t in stats.tags]
