"""The "Dataset workshop" tab (gradio 3.41): from a pile of images to a captioned training set.

``create_tab(..., workshop=...)`` calls :func:`build` inside its "Dataset workshop" tab with the
tab's training images-folder textbox. Layout::

    Workspace ▾ [↻]   New workspace [Create]
    message
    summary (images, captions, <repeats>_<concept> folders, undo, training folder)   [Use for training]
    Import | Clean & size | Captions | Tags | Advice
      Import        concept, repeats; a folder path, a .zip (upload or path), uploaded images; report
      Clean & size  clean (background for transparency), duplicates, bucket report or fixed size
      Captions      captioner, threshold, formatting, mode, trigger words; Run (progress), Stop
      Tags          tag frequency (click a tag to filter), bulk remove/replace/add, Undo;
                    thumbnails of the filtered images; the clicked one's caption, editable, Save
      Advice        steps per image, total steps, warnings and suggestions

The handlers (:class:`WorkshopActions`) are thin: they open the workspace named by the dropdown
(``<workspaces_root>/<name>``, see :class:`lora_trainer.workshop.Workspace`), call one method and
render its report with the small renderers below (plain HTML, everything escaped). Every
``LoraTrainerError`` (``DatasetError``, ``ConfigError``, ``CaptionerUnavailable`` ...) becomes a
red message box, any other exception a one-line message (the log has the trace). Only the
workspace is ever written: imports copy from the sources, and the core keeps it that way.

Opening or creating a workspace puts its folder into the images-folder textbox, so training
reads exactly what the workshop produced. Operations on one workspace run one at a time (a
second one is refused with a message: the WebUI's queue runs events concurrently).

The module imports without gradio (the core's import rule); gradio is imported in :func:`build`
and when a handler returns an update. Thumbnails are cached JPEGs in ``thumb_dir`` (the system
temp folder by default), never in the workspace.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import math
import os
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageOps

from lora_trainer.data.captions import split_tags
from lora_trainer.errors import ConfigError, DatasetError, LoraTrainerError
from lora_trainer.log import logger
from lora_trainer.webui.render import message_html
from lora_trainer.workshop import (
    Advice,
    BucketPlanReport,
    CaptionerUnavailable,
    CaptionOptions,
    CaptionReport,
    CleanReport,
    DuplicateReport,
    ImportReport,
    Problem,
    ResizeReport,
    TagEditReport,
    TagStats,
    UndoReport,
    WD14Captioner,
    Workspace,
    WorkspaceSummary,
)
from lora_trainer.workshop.captioning import CAPTION_MODES, Captioner

if TYPE_CHECKING:
    import gradio as gr

__all__ = [
    "CaptionerSpec",
    "WorkshopActions",
    "WorkshopUI",
    "build",
    "default_captioners",
    "wd14_spec",
]

GALLERY_LIMIT = 240  # thumbnails shown at most (filter by a tag to see others)
THUMB_SIZE = 256
PREVIEW_SIZE = 512
PROBLEM_ROWS = 200  # problem lines shown per report
RESULT_ROWS = 60  # caption results shown per report


# --------------------------------------------------------------------------------------------
# Captioners offered in the dropdown
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaptionerSpec:
    """One choice of the captioner dropdown. ``make(threshold)`` builds the captioner when a run
    starts (so nothing loads before it is used) and may raise ``CaptionerUnavailable``.
    ``threshold``: the default score threshold, None for free-text captioners (BLIP)."""

    make: Callable[[float], Captioner]
    threshold: float | None = 0.35
    note: str = ""


def wd14_spec(model_dir: str | os.PathLike | None, *, allow_download: bool = True) -> CaptionerSpec:
    """WD14 (the core's ONNX tagger) with its model in ``model_dir`` (downloaded there if missing)."""

    def make(threshold: float) -> Captioner:
        if importlib.util.find_spec("onnxruntime") is None:  # say so before downloading a model
            raise CaptionerUnavailable(
                "The WD14 tagger needs onnxruntime: pip install onnxruntime (or onnxruntime-gpu for CUDA) "
                "in the WebUI's Python environment, then restart the WebUI. DeepBooru and BLIP work without it."
            )
        return WD14Captioner(model_dir=model_dir, general_threshold=threshold, allow_download=allow_download)

    model = "downloaded on first use" if allow_download else f"model files in {model_dir}"
    return CaptionerSpec(make, 0.35, f"SmilingWolf's WD14 tagger (needs onnxruntime; {model}).")


def default_captioners(
    backend: Callable[[], Any], wd14_dir: str | os.PathLike | None = None
) -> dict[str, CaptionerSpec]:
    """DeepBooru and BLIP from the WebUI (``backend()`` returns ``lora_trainer.backends.webui``,
    imported only when a run starts) and WD14."""
    return {
        "DeepBooru": CaptionerSpec(
            lambda t: backend().DeepBooruCaptioner(threshold=t), 0.5, "The WebUI's DeepBooru tagger (anime tags)."
        ),
        "BLIP": CaptionerSpec(lambda t: backend().BlipCaptioner(), None, "The WebUI's BLIP: one sentence per image."),
        "WD14": wd14_spec(wd14_dir),
    }


# --------------------------------------------------------------------------------------------
# Renderers: reports -> HTML (no gradio)
# --------------------------------------------------------------------------------------------

_SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}
_SEVERITY_LABEL = {"error": "error", "warning": "warning", "info": "note"}


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


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
    groups = (
        _table(("Kind", "Files (bold: the one to keep)", ""), rows)
        if rows
        else '<div class="lora_train_ws_note">No duplicates found.</div>'
    )
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
    undo = '<div class="lora_train_ws_note">Tags › Undo reverts this run.</div>' if r.written else ""
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
        '<div class="lora_train_ws_note">Undo reverts it.</div>' if r.changed else "",
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
        f'<div class="lora_train_ws_note">{_e(note)}</div>' if note else "",
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
    note_html = "".join(f'<div class="lora_train_ws_note">{_e(n)}</div>' for n in notes)
    return (
        f'<div class="lora_train_ws_summary" data-workspace="{_e(s.name)}">'
        f'<div class="lora_train_ws_report_title">Workspace <b>{_e(s.name)}</b> <code>{_e(s.path)}</code></div>'
        f"{_counts([('images', s.images), ('captioned', s.captioned), ('folders', len(s.concepts))])}"
        f"{folders}{note_html}</div>"
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


# --------------------------------------------------------------------------------------------
# Handlers
# --------------------------------------------------------------------------------------------


Progress = Callable[..., Any]
"""gradio's ``gr.Progress`` (called as ``progress((done, total), desc=...)``); the tab passes it."""


def _update(**kwargs: Any) -> Any:
    """``gr.update(...)``; gradio is imported only when a handler runs (the module imports without it)."""
    import gradio

    return gradio.update(**kwargs)


def _ticker(progress: Progress | None, desc: str) -> Callable[[int, int], None] | None:
    """The core's ``progress(done, total)`` callback feeding gradio's progress bar."""
    if progress is None:
        return None
    return lambda done, total: progress((done, total), desc=desc, unit="images")


def _guard(n_out: int, message_at: int = 0):
    """Never let an exception reach the page: typed errors become a red box in output
    ``message_at``, the other outputs stay as they are."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except LoraTrainerError as exc:
                html = error_html(exc)
            except Exception as exc:  # the page gets one line, the log the trace
                logger.exception("dataset workshop: %s failed", fn.__name__)
                html = error_html(exc)
            if n_out == 1:
                return html
            out: list[Any] = [_update()] * n_out
            out[message_at] = html
            return out

        return run

    return wrap


def _optional_int(value: Any, name: str, minimum: int = 1) -> int | None:
    """A blank text/number box is None; otherwise a whole number >= minimum (ConfigError if not)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(str(value).strip())
    except ValueError:
        raise ConfigError(name, f"must be a whole number, got {value!r}") from None
    if not math.isfinite(number) or number != int(number) or number < minimum:
        raise ConfigError(name, f"must be a whole number of at least {minimum}, got {value!r}")
    return int(number)


def _required_int(value: Any, name: str, minimum: int = 1) -> int:
    number = _optional_int(value, name, minimum)
    if number is None:
        raise ConfigError(name, "is required")
    return number


def _hex_color(value: str | None) -> tuple[int, int, int]:
    text = (value or "#ffffff").strip().lstrip("#")
    if len(text) == 3:
        text = "".join(c * 2 for c in text)
    try:
        if len(text) != 6:
            raise ValueError
        return int(text[0:2], 16), int(text[2:4], 16), int(text[4:6], 16)
    except ValueError:
        raise ConfigError("workshop.clean.background", f"must be a colour like #ffffff, got {value!r}") from None


def _upload_path(upload: Any) -> tuple[str, str] | None:
    """(temporary path, original file name) of a gr.File value (a tempfile wrapper, a dict or a path)."""
    if upload is None:
        return None
    path = upload.get("name") if isinstance(upload, dict) else getattr(upload, "name", upload)
    if not path:
        return None
    name = (upload.get("orig_name") if isinstance(upload, dict) else getattr(upload, "orig_name", None)) or path
    return str(path), os.path.basename(str(name))


def thumbnail(path: Path, size: int, cache_dir: Path) -> str | None:
    """A JPEG of ``path`` at most ``size`` px on a side, cached by path, size and mtime; None if unreadable."""
    try:
        st = path.stat()
        key = hashlib.sha1(f"{path.resolve()}|{st.st_mtime_ns}|{st.st_size}|{size}".encode()).hexdigest()
        out = cache_dir / f"{key}.jpg"
        if not out.is_file():
            cache_dir.mkdir(parents=True, exist_ok=True)
            with Image.open(path) as img:
                img.draft("RGB", (size, size))
                thumb = ImageOps.exif_transpose(img)
                thumb.thumbnail((size, size))
                if thumb.mode != "RGB":
                    background = Image.new("RGB", thumb.size, (255, 255, 255))
                    rgba = thumb.convert("RGBA")
                    background.paste(rgba, mask=rgba.getchannel("A"))
                    thumb = background
                tmp = out.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
                thumb.save(tmp, "JPEG", quality=85)
                os.replace(tmp, out)
        return str(out)
    except Exception:  # a broken file has no thumbnail; clean() sets it aside
        return None


@dataclass
class WorkshopActions:
    """The workshop's event handlers; each returns what its outputs show (see :func:`build`)."""

    workspaces_root: Path
    captioners: Mapping[str, CaptionerSpec] = field(default_factory=dict)
    thumb_dir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()) / "lora_train_thumbs")

    def __post_init__(self):
        self.workspaces_root = Path(self.workspaces_root)
        self.thumb_dir = Path(self.thumb_dir)
        self._locks: dict[str, threading.Lock] = {}
        self._running: dict[str, str] = {}
        self._stops: dict[str, threading.Event] = {}
        self._guard_lock = threading.Lock()

    # -- helpers ----------------------------------------------------------------------------------

    def workspace(self, name: str | None) -> Workspace:
        """The workspace named in the dropdown (only names listed under the root are accepted)."""
        name = (name or "").strip()
        if not name:
            raise DatasetError("Pick a workspace above, or create one.")
        if name not in Workspace.list_workspaces(self.workspaces_root):
            raise DatasetError(f"There is no workspace {name!r} in {self.workspaces_root}; press ↻ to reload the list.")
        return Workspace.open(self.workspaces_root / name)

    @contextlib.contextmanager
    def busy(self, ws: Workspace, what: str) -> Iterator[None]:
        """One operation at a time per workspace; a second is refused with a message."""
        key = str(ws.path)
        with self._guard_lock:
            lock = self._locks.setdefault(key, threading.Lock())
        if not lock.acquire(blocking=False):
            raise DatasetError(
                f"Workspace {ws.name} is busy ({self._running.get(key, 'another operation')}); "
                "try again when it has finished."
            )
        self._running[key] = what
        try:
            yield
        finally:
            self._running.pop(key, None)
            lock.release()

    def names(self) -> list[str]:
        return Workspace.list_workspaces(self.workspaces_root)

    # -- workspace --------------------------------------------------------------------------------

    @_guard(2)
    def refresh_list(self, current: str | None) -> list[Any]:
        names = self.names()
        return ["", _update(choices=names, value=current if current in names else None)]

    @_guard(4)
    def create(self, new_name: str, training_dir: str) -> list[Any]:
        """Create (or reopen) a workspace; select it and point training at it."""
        ws = Workspace.create(self.workspaces_root, (new_name or "").strip())
        return [
            message_html(f"Workspace {ws.name} is ready; training now reads {ws.train_data_dir}.", "info"),
            _update(choices=self.names(), value=ws.name),
            "",
            ws.train_data_dir,
        ]

    @_guard(2)
    def use_for_training(self, name: str) -> list[Any]:
        """Put the workspace's folder into the training images-folder box."""
        ws = self.workspace(name)
        return [message_html(f"Training reads {ws.train_data_dir}.", "info"), ws.train_data_dir]

    @_guard(2)
    def open(self, name: str) -> list[Any]:
        """On picking a workspace: point training at it."""
        ws = self.workspace(name)
        return [message_html(f"Opened {ws.name}; training now reads {ws.train_data_dir}.", "info"), ws.train_data_dir]

    def summary(self, name: str, training_dir: str | None = None) -> str:
        if not name:
            return (
                '<div class="lora_train_ws_note">No workspace open: create one (a name, then Create) or pick one.</div>'
            )
        try:
            return summary_html(self.workspace(name).summary(), training_dir)
        except LoraTrainerError as exc:
            return error_html(exc)

    # -- import -----------------------------------------------------------------------------------

    def _import(self, name: str, what: str, run: Callable[[Workspace], ImportReport]) -> str:
        ws = self.workspace(name)
        with self.busy(ws, f"importing {what}"):
            return import_html(run(ws))

    @_guard(1)
    def import_folder(self, name: str, folder: str, concept: str, repeats: Any) -> str:
        folder = (folder or "").strip()
        if not folder:
            raise DatasetError("Type the path of the folder to import (on the machine running the WebUI).")
        reps = _optional_int(repeats, "workshop.import.repeats")
        return self._import(name, folder, lambda ws: ws.import_folder(folder, (concept or "").strip() or None, reps))

    @_guard(1)
    def import_zip(self, name: str, upload: Any, zip_path: str, concept: str, repeats: Any) -> str:
        reps = _optional_int(repeats, "workshop.import.repeats")
        concept = (concept or "").strip() or None
        uploaded = _upload_path(upload)
        if uploaded is not None:
            path, label = uploaded
        elif (zip_path or "").strip():
            path = zip_path.strip()
            label = os.path.basename(path)
        else:
            raise DatasetError("Upload a .zip, or type the path of one.")
        return self._import(name, label, lambda ws: ws.import_zip(path, concept, reps, name=label))

    @_guard(1)
    def import_files(self, name: str, uploads: Any, concept: str, repeats: Any) -> str:
        files = [u for u in (_upload_path(x) for x in (uploads or [])) if u is not None]
        if not files:
            raise DatasetError("Choose some images to upload first (captions .txt may come along).")
        reps = _optional_int(repeats, "workshop.import.repeats")
        concept = (concept or "").strip() or "images"
        return self._import(
            name,
            f"{len(files)} file(s)",
            lambda ws: ws.import_files([p for p, _ in files], [n for _, n in files], concept, reps),
        )

    # -- clean, duplicates, sizes -----------------------------------------------------------------

    @_guard(1)
    def clean(self, name: str, background: str, progress: Progress | None = None) -> str:
        color = _hex_color(background)
        ws = self.workspace(name)
        with self.busy(ws, "cleaning"):
            report = ws.clean(color, progress=_ticker(progress, "Cleaning"))
        return clean_html(report)

    @_guard(1)
    def duplicates(self, name: str, threshold: Any, remove_exact: bool) -> str:
        bits = _required_int(threshold, "workshop.duplicates.threshold", 0)
        ws = self.workspace(name)
        with self.busy(ws, "looking for duplicates"):
            return duplicates_html(ws.find_duplicates(bits, remove_exact=bool(remove_exact)))

    @_guard(1)
    def buckets(self, name: str, resolution: str, min_reso: Any, max_reso: Any, step: Any, no_upscale: bool) -> str:
        parts = [p for p in str(resolution or "").replace("x", ",").split(",") if p.strip()]
        if len(parts) not in (1, 2):
            raise ConfigError(
                "workshop.buckets.resolution", f"must be one size (512) or width,height, got {resolution!r}"
            )
        res = [_required_int(p, "workshop.buckets.resolution", 64) for p in parts]
        ws = self.workspace(name)
        report = ws.bucket_report(
            res[0] if len(res) == 1 else (res[0], res[1]),
            min_bucket_reso=_required_int(min_reso, "workshop.buckets.min_bucket_reso", 1),
            max_bucket_reso=_required_int(max_reso, "workshop.buckets.max_bucket_reso", 1),
            bucket_reso_steps=_required_int(step, "workshop.buckets.bucket_reso_steps", 1),
            bucket_no_upscale=bool(no_upscale),
        )
        return buckets_html(report)

    @_guard(1)
    def resize(
        self, name: str, width: Any, height: Any, crop: str, upscale: bool, progress: Progress | None = None
    ) -> str:
        w = _required_int(width, "workshop.resize.width", 8)
        h = _optional_int(height, "workshop.resize.height", 8) or w
        ws = self.workspace(name)
        with self.busy(ws, "resizing"):
            report = ws.resize_fixed(
                w,
                h,
                crop=crop or "center",
                upscale=bool(upscale),
                progress=_ticker(progress, "Resizing"),
            )
        return resize_html(report)

    # -- captions ---------------------------------------------------------------------------------

    def captioner_changed(self, choice: str) -> list[Any]:
        """[the dropdown's note, the threshold slider]: the slider takes the captioner's default
        threshold, and is off for free-text captioners."""
        spec = self.captioners.get(choice)
        if spec is None:
            return [_update(), _update()]
        if spec.threshold is None:
            slider = _update(interactive=False, info="Not used: this captioner writes sentences, not scored tags.")
        else:
            slider = _update(value=spec.threshold, interactive=True, info="Tags scored below this are dropped.")
        return [_update(info=spec.note), slider]

    @_guard(1)
    def caption(
        self,
        name: str,
        captioner: str,
        threshold: float,
        underscores: bool,
        escape_parens: bool,
        sort: str,
        max_tags: Any,
        mode: str,
        trigger_words: str,
        exclude: str,
        progress: Progress | None = None,
    ) -> str:
        ws = self.workspace(name)
        spec = self.captioners.get(captioner or "")
        if spec is None:
            raise ConfigError("workshop.caption.captioner", f"pick one of {', '.join(self.captioners) or '(none)'}")
        options = CaptionOptions.from_dict(
            {
                "mode": mode,
                "threshold": float(threshold or 0.0) if spec.threshold is not None else 0.0,
                "replace_underscores": bool(underscores),
                "escape_parentheses": bool(escape_parens),
                "sort": sort,
                "max_tags": _optional_int(max_tags, "workshop.caption.max_tags", 0) or 0,
                "trigger_words": split_tags(trigger_words or ""),
                "exclude_tags": split_tags(exclude or ""),
            }
        )
        with self.busy(ws, f"captioning with {captioner}"):
            stop = self._stops.setdefault(str(ws.path), threading.Event())
            stop.clear()
            if progress is not None:
                progress(0.0, desc=f"Loading {captioner}")
            made = spec.make(float(options.threshold))
            report = ws.caption(
                made,
                options,
                progress=_ticker(progress, f"Captioning with {captioner}"),
                should_stop=stop.is_set,
            )
        return caption_html(report)

    @_guard(1)
    def stop_caption(self, name: str) -> str:
        ws = self.workspace(name)
        key = str(ws.path)
        if self._running.get(key, "").startswith("captioning") and key in self._stops:
            self._stops[key].set()
            return message_html("Stopping after the current image; the captions computed so far are written.", "info")
        return message_html("No caption run is going on in this workspace.", "info")

    # -- tags -------------------------------------------------------------------------------------

    def tag_table(self, name: str, filter_tags: str) -> Any:
        if not name:
            return _update(value=[])
        try:
            return _update(value=tag_rows(self.workspace(name).tags(split_tags(filter_tags or ""))))
        except LoraTrainerError:
            return _update(value=[])

    def gallery(self, name: str, filter_tags: str) -> list[Any]:
        """[gallery items, their image ids, a line saying what is shown]."""
        if not name:
            return [[], [], ""]
        try:
            ws = self.workspace(name)
            listing = ws.images(split_tags(filter_tags or ""))
        except LoraTrainerError as exc:
            return [[], [], error_html(exc)]
        items, ids = [], []
        for entry in listing.images[:GALLERY_LIMIT]:
            thumb = thumbnail(ws.path / entry.path, THUMB_SIZE, self.thumb_dir)
            if thumb is not None:
                items.append((thumb, Path(entry.path).name))
                ids.append(entry.path)
        shown = f"{len(listing)} of {listing.total} image(s)"
        if filter_tags and filter_tags.strip():
            shown += f" have {filter_tags.strip()}"
        if len(listing) > GALLERY_LIMIT:
            shown += f"; the first {GALLERY_LIMIT} are shown (filter by a tag to see others)"
        if len(ids) < min(len(listing), GALLERY_LIMIT):
            shown += f"; {min(len(listing), GALLERY_LIMIT) - len(ids)} unreadable (run Clean)"
        return [items, ids, f'<div class="lora_train_ws_note">{_e(shown)}. Click one to edit its caption.</div>']

    def view(self, name: str, filter_tags: str, training_dir: str | None = None) -> list[Any]:
        """Everything that shows the workspace: summary, tag table, gallery, its ids, its line."""
        return [self.summary(name, training_dir), self.tag_table(name, filter_tags), *self.gallery(name, filter_tags)]

    def pick_tag(self, table: Any, evt: Any) -> Any:
        """Clicking a row of the frequency table filters by its tag."""
        try:
            row = evt.index[0] if isinstance(evt.index, (list, tuple)) else int(evt.index)
            rows = table.values.tolist() if hasattr(table, "values") else list(table or [])
            return str(rows[row][0])
        except Exception:
            return _update()

    def _bulk(self, name: str, what: str, run: Callable[[Workspace], TagEditReport]) -> str:
        ws = self.workspace(name)
        with self.busy(ws, what):
            return tag_edit_html(run(ws))

    @_guard(1)
    def bulk_remove(self, name: str, tags: str, filter_tags: str) -> str:
        only = split_tags(filter_tags or "") or None
        return self._bulk(name, "removing tags", lambda ws: ws.bulk_remove(split_tags(tags or ""), filter_tags=only))

    @_guard(1)
    def bulk_replace(self, name: str, old: str, new: str, filter_tags: str) -> str:
        olds = split_tags(old or "")
        if not olds:
            raise ConfigError("workshop.tags.replace", "name the tag(s) to replace")
        mapping = dict.fromkeys(olds, new or "")
        only = split_tags(filter_tags or "") or None
        return self._bulk(name, "replacing tags", lambda ws: ws.bulk_replace(mapping, filter_tags=only))

    @_guard(1)
    def bulk_add(self, name: str, tags: str, position: str, filter_tags: str) -> str:
        only = split_tags(filter_tags or "") or None
        return self._bulk(
            name,
            "adding tags",
            lambda ws: ws.bulk_add(split_tags(tags or ""), position=position or "start", filter_tags=only),
        )

    @_guard(1)
    def undo(self, name: str) -> str:
        ws = self.workspace(name)
        with self.busy(ws, "undoing"):
            return undo_html(ws.undo())

    @_guard(4, message_at=3)
    def select_image(self, name: str, ids: list[str], evt: Any) -> list[Any]:
        """A click on a thumbnail: [its preview, its id, its caption, message]."""
        index = evt.index if isinstance(evt.index, int) else int(evt.index[0])
        if not ids or not 0 <= index < len(ids):
            raise DatasetError("That image is no longer listed; the list was reloaded.")
        ws = self.workspace(name)
        image = ids[index]
        text = ws.get_caption(image)
        return [thumbnail(ws.path / image, PREVIEW_SIZE, self.thumb_dir), image, text, ""]

    @_guard(2, message_at=1)
    def save_caption(self, name: str, image: str, text: str) -> list[Any]:
        if not image:
            raise DatasetError("Click an image first.")
        ws = self.workspace(name)
        with self.busy(ws, "saving a caption"):
            stored = ws.set_caption(image, text or "")
        return [stored, message_html(f"Saved the caption of {image}.", "info")]

    # -- advice -----------------------------------------------------------------------------------

    @_guard(4)
    def advise(self, name: str, epochs: Any, batch: Any, max_steps: Any, use_training: bool) -> list[Any]:
        """[advice, the epochs, batch size and max steps used]. With max steps set, training stops
        there whatever the epochs: the advice uses the epochs those steps make."""
        ep = _required_int(epochs, "training.max_train_epochs")
        bs = _required_int(batch, "training.train_batch_size")
        steps = _optional_int(max_steps, "training.max_train_steps")
        ws = self.workspace(name)
        note = ""
        if steps is not None:
            per_epoch = ws.advise(1, bs).steps_per_epoch
            if per_epoch:
                ep = max(1, math.ceil(steps / per_epoch))
                note = (
                    f"Max steps is {steps}: training stops there whatever the epochs, so the advice uses the "
                    f"{ep} epoch(s) that takes ({per_epoch} steps each)."
                )
        if use_training:
            note = (note + " " if note else "") + "Epochs, batch size and max steps come from the Training tab."
        return [
            advice_html(ws.advise(ep, bs), note),
            ep if steps is None else _update(),
            bs,
            "" if steps is None else steps,
        ]


# --------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------


@dataclass
class WorkshopUI:
    """What :func:`build` made: the handlers and the components by short name (for tests)."""

    actions: WorkshopActions
    components: dict[str, Any]


_ADVICE_JS = (
    "(name, epochs, batch, steps, use) => (use && window.loraTrain && loraTrain.trainingValues) "
    "? [name, ...loraTrain.trainingValues(epochs, batch, steps), use] : [name, epochs, batch, steps, use]"
)


def build(
    images_dir: gr.Textbox,
    *,
    workspaces_root: str | os.PathLike,
    captioners: Mapping[str, CaptionerSpec] | None = None,
    thumb_dir: str | os.PathLike | None = None,
) -> WorkshopUI:
    """The workshop inside the current gradio context (``create_tab``'s "Dataset workshop" tab).

    ``images_dir``: the training images-folder textbox, read and set. ``workspaces_root``: where
    workspaces live (the WebUI's: ``<work dir>/datasets``). ``captioners``: the dropdown's
    choices (default: none; the WebUI passes :func:`default_captioners`)."""
    import gradio as gr

    kwargs: dict[str, Any] = {"workspaces_root": Path(workspaces_root), "captioners": dict(captioners or {})}
    if thumb_dir is not None:
        kwargs["thumb_dir"] = Path(thumb_dir)
    act = WorkshopActions(**kwargs)
    c: dict[str, Any] = {}
    names = act.names()
    first = next(iter(act.captioners), None)
    first_spec = act.captioners.get(first) if first else None

    def eid(key: str) -> str:
        return f"lora_train_ws_{key}"

    with gr.Column(elem_id="lora_train_workshop"):
        with gr.Row(equal_height=False, elem_id=eid("bar")):
            c["select"] = gr.Dropdown(names, value=None, label="Workspace", elem_id=eid("select"), scale=3)
            c["refresh"] = gr.Button(
                "↻", elem_id=eid("refresh"), scale=0, min_width=44, elem_classes=["lora_train_ws_tool"]
            )
            c["new_name"] = gr.Textbox(
                label="New workspace", placeholder="a name, e.g. mychar", elem_id=eid("new_name"), scale=3
            )
            c["create"] = gr.Button(
                "Create",
                variant="primary",
                elem_id=eid("create"),
                scale=0,
                min_width=80,
                elem_classes=["lora_train_ws_tool"],
            )
        c["message"] = gr.HTML("", elem_id=eid("message"))
        with gr.Row(equal_height=False):
            c["summary"] = gr.HTML(act.summary(""), elem_id=eid("summary"))
            c["use"] = gr.Button(
                "Use for training", elem_id=eid("use"), scale=0, min_width=120, elem_classes=["lora_train_ws_tool"]
            )

        with gr.Tabs(elem_id=eid("steps")):
            with gr.Tab("Import", elem_id=eid("tab_import")):
                with gr.Row():
                    c["concept"] = gr.Textbox(
                        label="Concept",
                        placeholder="the folder's or zip's name",
                        elem_id=eid("concept"),
                        info="For images not in a '<repeats>_<name>' folder.",
                    )
                    c["repeats"] = gr.Textbox(
                        label="Repeats",
                        placeholder="from '<N>_name' folders, else 1",
                        elem_id=eid("repeats"),
                        info="How often each image is shown per epoch.",
                    )
                with gr.Row(equal_height=False, elem_classes=["lora_train_ws_source"]):
                    c["folder"] = gr.Textbox(
                        label="A folder",
                        placeholder="/path/to/images",
                        elem_id=eid("folder"),
                        scale=4,
                        info="Read recursively, never changed; '<N>_<name>' folders set concept and repeats.",
                    )
                    c["import_folder"] = gr.Button(
                        "Import folder",
                        elem_id=eid("import_folder"),
                        scale=1,
                        min_width=120,
                        elem_classes=["lora_train_ws_tool"],
                    )
                with gr.Row(equal_height=False, elem_classes=["lora_train_ws_source"]):
                    c["zip_upload"] = gr.File(
                        label="A .zip", file_types=[".zip"], elem_id=eid("zip_upload"), height=110, scale=2
                    )
                    c["zip_path"] = gr.Textbox(
                        label="or the path of one", placeholder="/path/to/set.zip", elem_id=eid("zip_path"), scale=2
                    )
                    c["import_zip"] = gr.Button(
                        "Import zip",
                        elem_id=eid("import_zip"),
                        scale=1,
                        min_width=120,
                        elem_classes=["lora_train_ws_tool"],
                    )
                with gr.Row(equal_height=False, elem_classes=["lora_train_ws_source"]):
                    c["files"] = gr.File(
                        label="Images (and their .txt captions)",
                        file_count="multiple",
                        elem_id=eid("files"),
                        height=110,
                        scale=4,
                        file_types=["image", ".txt", ".caption"],
                    )
                    c["import_files"] = gr.Button(
                        "Import uploaded",
                        elem_id=eid("import_files"),
                        scale=1,
                        min_width=120,
                        elem_classes=["lora_train_ws_tool"],
                    )
                c["import_report"] = gr.HTML("", elem_id=eid("import_report"))

            with gr.Tab("Clean & size", elem_id=eid("tab_clean")):
                with gr.Row(equal_height=False):
                    with gr.Column(min_width=200):
                        c["background"] = gr.ColorPicker(
                            "#ffffff",
                            label="Background for transparency",
                            elem_id=eid("background"),
                        )
                        c["clean"] = gr.Button("Clean", elem_id=eid("clean"))
                    with gr.Column(min_width=200):
                        c["dup_threshold"] = gr.Slider(
                            0,
                            32,
                            value=10,
                            step=1,
                            label="Near-duplicate distance (bits of 128)",
                            elem_id=eid("dup_threshold"),
                        )
                        c["remove_exact"] = gr.Checkbox(
                            False,
                            label="Move exact duplicates aside",
                            elem_id=eid("remove_exact"),
                        )
                        c["duplicates"] = gr.Button("Find duplicates", elem_id=eid("duplicates"))
                with gr.Row(equal_height=False):
                    with gr.Column(min_width=260, elem_classes=["lora_train_ws_box"]):
                        gr.HTML('<div class="lora_train_ws_box_title">Buckets (training resizes)</div>')
                        with gr.Row():
                            c["resolution"] = gr.Textbox(
                                "512", label="Resolution", elem_id=eid("resolution"), min_width=100
                            )
                            c["bucket_step"] = gr.Number(
                                64, precision=0, label="Step", elem_id=eid("bucket_step"), min_width=100
                            )
                        with gr.Row():
                            c["min_bucket"] = gr.Number(
                                256, precision=0, label="Min side", elem_id=eid("min_bucket"), min_width=100
                            )
                            c["max_bucket"] = gr.Number(
                                1024, precision=0, label="Max side", elem_id=eid("max_bucket"), min_width=100
                            )
                        c["no_upscale"] = gr.Checkbox(False, label="No upscaling", elem_id=eid("no_upscale"))
                        c["buckets"] = gr.Button("Bucket report", elem_id=eid("buckets"))
                    with gr.Column(min_width=260, elem_classes=["lora_train_ws_box"]):
                        gr.HTML('<div class="lora_train_ws_box_title">Fixed size (rewrites the images)</div>')
                        with gr.Row():
                            c["width"] = gr.Number(512, precision=0, label="Width", elem_id=eid("width"), min_width=100)
                            c["height"] = gr.Number(
                                512, precision=0, label="Height", elem_id=eid("height"), min_width=100
                            )
                        c["crop"] = gr.Radio(["center", "focal"], value="center", label="Crop", elem_id=eid("crop"))
                        c["upscale"] = gr.Checkbox(True, label="Enlarge smaller images", elem_id=eid("upscale"))
                        c["resize"] = gr.Button("Resize all", elem_id=eid("resize"))
                c["clean_report"] = gr.HTML("", elem_id=eid("clean_report"))

            with gr.Tab("Captions", elem_id=eid("tab_captions")):
                with gr.Row(equal_height=False):
                    c["captioner"] = gr.Dropdown(
                        list(act.captioners),
                        value=first,
                        label="Captioner",
                        elem_id=eid("captioner"),
                        info=first_spec.note if first_spec else "No captioner is available.",
                    )
                    c["threshold"] = gr.Slider(
                        0.0,
                        1.0,
                        value=(first_spec.threshold if first_spec and first_spec.threshold is not None else 0.35),
                        step=0.01,
                        label="Threshold",
                        elem_id=eid("threshold"),
                        info="Tags scored below this are dropped.",
                        interactive=not (first_spec and first_spec.threshold is None),
                    )
                    c["mode"] = gr.Radio(
                        list(CAPTION_MODES),
                        value="keep",
                        label="Existing captions",
                        elem_id=eid("mode"),
                        info="keep: only caption images without one.",
                    )
                with gr.Row(equal_height=False):
                    c["sort"] = gr.Radio(
                        ["score", "alpha", "none"], value="score", label="Sort tags", elem_id=eid("sort")
                    )
                    c["max_tags"] = gr.Number(0, precision=0, label="Max tags (0 = all)", elem_id=eid("max_tags"))
                    with gr.Column(min_width=180):
                        c["underscores"] = gr.Checkbox(True, label="Underscores → spaces", elem_id=eid("underscores"))
                        c["escape"] = gr.Checkbox(False, label="Escape parentheses", elem_id=eid("escape"))
                with gr.Row(equal_height=False):
                    c["triggers"] = gr.Textbox(
                        label="Trigger words",
                        placeholder="mychar",
                        elem_id=eid("triggers"),
                        info="Comma-separated; put first in every caption.",
                    )
                    c["exclude"] = gr.Textbox(
                        label="Never write these tags",
                        placeholder="simple background",
                        elem_id=eid("exclude"),
                    )
                with gr.Row():
                    c["caption"] = gr.Button("Caption images", variant="primary", elem_id=eid("caption"))
                    c["caption_stop"] = gr.Button("Stop", elem_id=eid("caption_stop"))
                c["caption_report"] = gr.HTML("", elem_id=eid("caption_report"))

            with gr.Tab("Tags", elem_id=eid("tab_tags")):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=2, min_width=220):
                        c["filter"] = gr.Textbox(
                            label="Only images with",
                            placeholder="tag, tag",
                            elem_id=eid("filter"),
                            info="Filters the table, the images and the bulk edits. Click a tag to use it.",
                        )
                        c["tag_table"] = gr.Dataframe(
                            [],
                            headers=["tag", "images"],
                            datatype=["str", "number"],
                            type="array",
                            interactive=False,
                            elem_id=eid("tag_table"),
                            height=330,
                            max_rows=None,
                            label="Tag frequency",
                        )
                    with gr.Column(scale=3, min_width=300):
                        with gr.Row(equal_height=True):
                            c["remove_tags"] = gr.Textbox(
                                label="Remove tags", placeholder="blue eyes", elem_id=eid("remove_tags"), scale=3
                            )
                            c["remove"] = gr.Button("Remove", elem_id=eid("remove"), scale=1, min_width=90)
                        with gr.Row(equal_height=True):
                            c["replace_old"] = gr.Textbox(
                                label="Replace", placeholder="old tag", elem_id=eid("replace_old"), scale=2
                            )
                            c["replace_new"] = gr.Textbox(
                                label="with", placeholder="new tag; blank removes", elem_id=eid("replace_new"), scale=2
                            )
                            c["replace"] = gr.Button("Replace", elem_id=eid("replace"), scale=1, min_width=90)
                        with gr.Row(equal_height=True):
                            c["add_tags"] = gr.Textbox(
                                label="Add tags", placeholder="mychar", elem_id=eid("add_tags"), scale=2
                            )
                            c["add_position"] = gr.Radio(
                                ["start", "end"], value="start", label="at", elem_id=eid("add_position"), scale=2
                            )
                            c["add"] = gr.Button("Add", elem_id=eid("add"), scale=1, min_width=90)
                        c["undo"] = gr.Button("Undo last bulk edit", elem_id=eid("undo"))
                        c["tag_report"] = gr.HTML("", elem_id=eid("tag_report"))
                c["gallery_info"] = gr.HTML("", elem_id=eid("gallery_info"))
                with gr.Row(equal_height=False):
                    c["gallery"] = gr.Gallery(
                        [],
                        label="Images",
                        elem_id=eid("gallery"),
                        columns=4,
                        height=360,
                        allow_preview=False,
                        object_fit="contain",
                        show_download_button=False,
                        scale=3,
                    )
                    with gr.Column(scale=2, min_width=240, elem_id=eid("editor")):
                        c["selected_image"] = gr.Image(
                            None,
                            type="filepath",
                            label="Selected",
                            interactive=False,
                            height=200,
                            elem_id=eid("selected_image"),
                            show_download_button=False,
                        )
                        c["selected_id"] = gr.Textbox(label="Image", interactive=False, elem_id=eid("selected_id"))
                        c["caption_text"] = gr.Textbox(label="Caption", lines=4, elem_id=eid("caption_text"))
                        c["save_caption"] = gr.Button("Save caption", elem_id=eid("save_caption"))
                        c["editor_message"] = gr.HTML("", elem_id=eid("editor_message"))
                c["ids"] = gr.State([])

            with gr.Tab("Advice", elem_id=eid("tab_advice")):
                with gr.Row(equal_height=False):
                    c["use_training"] = gr.Checkbox(
                        True,
                        label="Use the Training tab's epochs, batch size and max steps",
                        elem_id=eid("use_training"),
                    )
                    c["epochs"] = gr.Number(10, precision=0, label="Epochs", elem_id=eid("epochs"))
                    c["batch"] = gr.Number(1, precision=0, label="Batch size", elem_id=eid("batch"))
                    c["max_steps"] = gr.Textbox("", label="Max steps", placeholder="unset", elem_id=eid("max_steps"))
                c["advise"] = gr.Button("Check the training length", elem_id=eid("advise"))
                c["advice"] = gr.HTML("", elem_id=eid("advice"))

    _wire(act, c, images_dir)
    return WorkshopUI(act, c)


def _wire(act: WorkshopActions, c: dict[str, Any], images_dir: gr.Textbox) -> None:
    """Events. Every change to the workspace is followed by a refresh of what shows it."""
    import gradio as gr

    # gradio finds its progress bar by a ``gr.Progress()`` default and click data by a
    # ``gr.SelectData`` annotation: these adapters give the plain handlers both.
    def clean(name, background, progress=gr.Progress()):
        return act.clean(name, background, progress)

    def resize(name, width, height, crop, upscale, progress=gr.Progress()):
        return act.resize(name, width, height, crop, upscale, progress)

    def caption(
        name, captioner, threshold, underscores, escape, sort, max_tags, mode, triggers, exclude, progress=gr.Progress()
    ):
        return act.caption(
            name, captioner, threshold, underscores, escape, sort, max_tags, mode, triggers, exclude, progress
        )

    def pick_tag(table, evt):
        return act.pick_tag(table, evt)

    def select_image(name, ids, evt):
        return act.select_image(name, ids, evt)

    pick_tag.__annotations__ = {"evt": gr.SelectData}
    select_image.__annotations__ = {"evt": gr.SelectData}

    ws = c["select"]
    view_in = [ws, c["filter"], images_dir]
    view_out = [c["summary"], c["tag_table"], c["gallery"], c["ids"], c["gallery_info"]]
    no_api: dict[str, Any] = {"api_name": False}

    def then_view(event) -> None:
        event.then(act.view, view_in, view_out, show_progress=False, **no_api)

    c["refresh"].click(act.refresh_list, [ws], [c["message"], ws], **no_api).then(act.view, view_in, view_out, **no_api)
    then_view(
        c["create"].click(
            act.create, [c["new_name"], images_dir], [c["message"], ws, c["new_name"], images_dir], **no_api
        )
    )
    then_view(ws.input(act.open, [ws], [c["message"], images_dir], **no_api))
    then_view(c["use"].click(act.use_for_training, [ws], [c["message"], images_dir], **no_api))

    concept_reps = [c["concept"], c["repeats"]]
    then_view(
        c["import_folder"].click(act.import_folder, [ws, c["folder"], *concept_reps], [c["import_report"]], **no_api)
    )
    then_view(
        c["import_zip"].click(
            act.import_zip, [ws, c["zip_upload"], c["zip_path"], *concept_reps], [c["import_report"]], **no_api
        )
    )
    then_view(
        c["import_files"].click(act.import_files, [ws, c["files"], *concept_reps], [c["import_report"]], **no_api)
    )

    then_view(c["clean"].click(clean, [ws, c["background"]], [c["clean_report"]], **no_api))
    then_view(
        c["duplicates"].click(
            act.duplicates, [ws, c["dup_threshold"], c["remove_exact"]], [c["clean_report"]], **no_api
        )
    )
    c["buckets"].click(
        act.buckets,
        [ws, c["resolution"], c["min_bucket"], c["max_bucket"], c["bucket_step"], c["no_upscale"]],
        [c["clean_report"]],
        **no_api,
    )
    then_view(
        c["resize"].click(resize, [ws, c["width"], c["height"], c["crop"], c["upscale"]], [c["clean_report"]], **no_api)
    )

    c["captioner"].change(act.captioner_changed, [c["captioner"]], [c["captioner"], c["threshold"]], **no_api)
    caption_in = [
        ws,
        c["captioner"],
        c["threshold"],
        c["underscores"],
        c["escape"],
        c["sort"],
        c["max_tags"],
        c["mode"],
        c["triggers"],
        c["exclude"],
    ]
    then_view(c["caption"].click(caption, caption_in, [c["caption_report"]], **no_api))
    c["caption_stop"].click(act.stop_caption, [ws], [c["caption_report"]], queue=False, **no_api)

    tags_out = [c["tag_table"], c["gallery"], c["ids"], c["gallery_info"]]

    def tags_view(name, filter_tags):
        return [act.tag_table(name, filter_tags), *act.gallery(name, filter_tags)]

    c["filter"].submit(tags_view, [ws, c["filter"]], tags_out, **no_api)
    c["tag_table"].select(pick_tag, [c["tag_table"]], [c["filter"]], **no_api).then(
        tags_view, [ws, c["filter"]], tags_out, **no_api
    )
    then_view(c["remove"].click(act.bulk_remove, [ws, c["remove_tags"], c["filter"]], [c["tag_report"]], **no_api))
    then_view(
        c["replace"].click(
            act.bulk_replace, [ws, c["replace_old"], c["replace_new"], c["filter"]], [c["tag_report"]], **no_api
        )
    )
    then_view(
        c["add"].click(act.bulk_add, [ws, c["add_tags"], c["add_position"], c["filter"]], [c["tag_report"]], **no_api)
    )
    then_view(c["undo"].click(act.undo, [ws], [c["tag_report"]], **no_api))
    c["gallery"].select(
        select_image,
        [ws, c["ids"]],
        [c["selected_image"], c["selected_id"], c["caption_text"], c["editor_message"]],
        **no_api,
    )
    c["save_caption"].click(
        act.save_caption, [ws, c["selected_id"], c["caption_text"]], [c["caption_text"], c["editor_message"]], **no_api
    ).then(act.tag_table, [ws, c["filter"]], [c["tag_table"]], show_progress=False, **no_api)

    c["advise"].click(
        act.advise,
        [ws, c["epochs"], c["batch"], c["max_steps"], c["use_training"]],
        [c["advice"], c["epochs"], c["batch"], c["max_steps"]],
        _js=_ADVICE_JS,
        **no_api,
    )

    # A fresh page lists the workspaces as they are on disk now (not when the UI was built).
    root = gr.context.Context.root_block
    if root is not None:
        root.load(lambda: gr.update(choices=act.names()), None, [ws], show_progress=False, **no_api)
