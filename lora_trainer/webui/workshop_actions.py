"""The Dataset workshop's event handlers (:class:`WorkshopActions`): what its buttons call.

The handlers are thin: they open the workspace named by the dropdown
(``<workspaces_root>/<name>``, see :class:`lora_trainer.workshop.Workspace`), check the form's
values, call one method and render its report (:mod:`lora_trainer.webui.workshop_render`).
Every ``LoraTrainerError`` (``DatasetError``, ``ConfigError``, ``CaptionerUnavailable`` ...)
becomes a red message box, any other exception a one-line message (the log has the trace). Only
the workspace is ever written: imports copy from the sources, and the core keeps it that way.

Operations that change a workspace hold :meth:`Workspace.busy`, so they run one at a time per
workspace (a second is refused with a message: the WebUI's queue runs events concurrently).
Thumbnails are cached JPEGs in ``thumb_dir`` (the system temp folder by default), never in the
workspace. The module imports without gradio; a handler imports it only to return an update.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_trainer.data.captions import split_tags
from lora_trainer.data.images import load_image_rgb
from lora_trainer.errors import ConfigError, DatasetError, LoraTrainerError
from lora_trainer.files.atomic_write import atomic_write_bytes, folder_not_writable
from lora_trainer.log import logger
from lora_trainer.webui.render import message_html
from lora_trainer.webui.workshop_captioners import CaptionerSpec
from lora_trainer.webui.workshop_render import (
    advice_html,
    buckets_html,
    caption_html,
    clean_html,
    duplicates_html,
    error_html,
    gallery_info_html,
    import_html,
    no_workspace_html,
    resize_html,
    summary_html,
    tag_edit_html,
    tag_rows,
    undo_html,
)
from lora_trainer.workshop import CaptionOptions, ImportReport, TagEditReport, Workspace

__all__ = ["GALLERY_LIMIT", "PREVIEW_SIZE", "THUMB_SIZE", "WorkshopActions", "thumbnail"]

GALLERY_LIMIT = 240  # thumbnails shown at most (filter by a tag to see others)
THUMB_SIZE = 256
PREVIEW_SIZE = 512


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


def _os_error_html(action: str, exc: OSError) -> str:
    """A read-only folder or a full disk named by its folder (never a hidden temp file's name)."""
    folder = Path(os.fsdecode(exc.filename)).parent if exc.filename else Path("the workspace")
    err = folder_not_writable(exc, folder)
    if err is not None:
        return error_html(err)
    logger.exception("dataset workshop: %s failed", action)
    return error_html(exc)


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
            except OSError as exc:
                html = _os_error_html(fn.__name__, exc)
            except Exception as exc:  # noqa: BLE001 - the page's edge: one line for the page, the trace for the log
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


_VAL_COUNT = "validation.validation_count"
_VAL_SPLIT = "validation.validation_split"


def _fraction(value: Any) -> float:
    """The validation split box: blank is 0; otherwise a number in [0, 1) (ConfigError if not)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return 0.0
    try:
        number = float(str(value).strip())
    except ValueError:
        raise ConfigError(_VAL_SPLIT, f"must be a number, got {value!r}") from None
    if not 0.0 <= number < 1.0:
        raise ConfigError(_VAL_SPLIT, f"must be at least 0 and below 1, got {value!r}")
    return number


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
    """A JPEG of ``path`` at most ``size`` px on a side (upright, transparency on white), cached
    by path, size and mtime; None if unreadable."""
    try:
        st = path.stat()
        key = hashlib.sha1(f"{path.resolve()}|{st.st_mtime_ns}|{st.st_size}|{size}".encode()).hexdigest()
        out = cache_dir / f"{key}.jpg"
        if not out.is_file():
            with load_image_rgb(path) as img:
                img.thumbnail((size, size))
                data = io.BytesIO()
                img.save(data, "JPEG", quality=85)
            atomic_write_bytes(out, data.getvalue(), durable=False)
        return str(out)
    except (DatasetError, OSError):  # a broken file has no thumbnail; clean() sets it aside
        return None


@dataclass
class WorkshopActions:
    """The workshop's event handlers; each returns what its outputs show (see
    :func:`lora_trainer.webui.workshop_ui.build`)."""

    workspaces_root: Path
    captioners: Mapping[str, CaptionerSpec] = field(default_factory=dict)
    thumb_dir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()) / "lora_train_thumbs")

    def __post_init__(self):
        self.workspaces_root = Path(self.workspaces_root)
        self.thumb_dir = Path(self.thumb_dir)

    # -- helpers ----------------------------------------------------------------------------------

    def workspace(self, name: str | None) -> Workspace:
        """The workspace named in the dropdown (only names listed under the root are accepted)."""
        name = (name or "").strip()
        if not name:
            raise DatasetError("Pick a workspace above, or create one.")
        if name not in Workspace.list_workspaces(self.workspaces_root):
            raise DatasetError(f"There is no workspace {name!r} in {self.workspaces_root}; press ↻ to reload the list.")
        return Workspace.open(self.workspaces_root / name)

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
            return no_workspace_html()
        try:
            return summary_html(self.workspace(name).summary(), training_dir)
        except LoraTrainerError as exc:
            return error_html(exc)

    # -- import -----------------------------------------------------------------------------------

    def _import(self, name: str, what: str, run: Callable[[Workspace], ImportReport]) -> str:
        ws = self.workspace(name)
        with ws.busy(f"importing {what}"):
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
        concept_name = (concept or "").strip() or None
        uploaded = _upload_path(upload)
        if uploaded is not None:
            path, label = uploaded
        elif (zip_path or "").strip():
            path = zip_path.strip()
            label = os.path.basename(path)
        else:
            raise DatasetError("Upload a .zip, or type the path of one.")
        return self._import(name, label, lambda ws: ws.import_zip(path, concept_name, reps, name=label))

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
        with ws.busy("cleaning"):
            report = ws.clean(color, progress=_ticker(progress, "Cleaning"))
        return clean_html(report)

    @_guard(1)
    def duplicates(self, name: str, threshold: Any, remove_exact: bool) -> str:
        bits = _required_int(threshold, "workshop.duplicates.threshold", 0)
        ws = self.workspace(name)
        with ws.busy("looking for duplicates"):
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
        with ws.busy("resizing"):
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
        with ws.busy(f"captioning with {captioner}") as stop:
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
        if self.workspace(name).request_stop("captioning"):
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
        return [items, ids, gallery_info_html(len(listing), listing.total, filter_tags, len(ids), GALLERY_LIMIT)]

    def view(self, name: str, filter_tags: str, training_dir: str | None = None) -> list[Any]:
        """Everything that shows the workspace: summary, tag table, gallery, its ids, its line."""
        return [self.summary(name, training_dir), self.tag_table(name, filter_tags), *self.gallery(name, filter_tags)]

    def pick_tag(self, table: Any, evt: Any) -> Any:
        """Clicking a row of the frequency table filters by its tag."""
        try:
            row = evt.index[0] if isinstance(evt.index, (list, tuple)) else int(evt.index)
            rows = table.values.tolist() if hasattr(table, "values") else list(table or [])
            return str(rows[row][0])
        except (AttributeError, IndexError, KeyError, TypeError, ValueError):  # not a row of tags: keep the filter
            return _update()

    def _bulk(self, name: str, what: str, run: Callable[[Workspace], TagEditReport]) -> str:
        ws = self.workspace(name)
        with ws.busy(what):
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
        with ws.busy("undoing"):
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
        with ws.busy("saving a caption"):
            stored = ws.set_caption(image, text or "")
        return [stored, message_html(f"Saved the caption of {image}.", "info")]

    # -- advice -----------------------------------------------------------------------------------

    @_guard(4)
    def advise(
        self,
        name: str,
        epochs: Any,
        batch: Any,
        max_steps: Any,
        use_training: bool,
        val_split: Any = 0.0,
        val_count: Any = "",
    ) -> list[Any]:
        """[advice, the epochs, batch size and max steps used]. With max steps set, training stops
        there whatever the epochs: the advice uses the epochs those steps make. ``val_split`` (a
        fraction) or ``val_count`` (images) is the validation split the run holds out of training."""
        ep = _required_int(epochs, "training.max_train_epochs")
        bs = _required_int(batch, "training.train_batch_size")
        steps = _optional_int(max_steps, "training.max_train_steps")
        split = {"validation_split": _fraction(val_split), "validation_count": _optional_int(val_count, _VAL_COUNT)}
        ws = self.workspace(name)
        note = ""
        if steps is not None:
            per_epoch = ws.advise(1, bs, **split).steps_per_epoch
            if per_epoch:
                ep = max(1, math.ceil(steps / per_epoch))
                note = (
                    f"Max steps is {steps}: training stops there whatever the epochs, so the advice uses the "
                    f"{ep} epoch(s) that takes ({per_epoch} steps each)."
                )
        if use_training:
            note = (note + " " if note else "") + (
                "Epochs, batch size, max steps and the validation split come from the Training tab."
            )
        return [
            advice_html(ws.advise(ep, bs, **split), note),
            ep if steps is None else _update(),
            bs,
            "" if steps is None else steps,
        ]
