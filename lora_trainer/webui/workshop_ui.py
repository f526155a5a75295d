"""The "Dataset workshop" tab's gradio layout and events: from a pile of images to a captioned training set.

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

The handlers are :class:`lora_trainer.webui.workshop_actions.WorkshopActions`, the reports'
HTML :mod:`lora_trainer.webui.workshop_render`, the captioner choices
:mod:`lora_trainer.webui.workshop_captioners`. Opening or creating a workspace puts its folder
into the images-folder textbox, so training reads exactly what the workshop produced.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from lora_trainer.webui.workshop_actions import WorkshopActions
from lora_trainer.webui.workshop_captioners import CaptionerSpec
from lora_trainer.workshop.captioning import CAPTION_MODES

__all__ = ["WorkshopUI", "build"]


@dataclass
class WorkshopUI:
    """What :func:`build` made: the handlers and the components by short name (for tests)."""

    actions: WorkshopActions
    components: dict[str, Any]


_ADVICE_JS = (
    "(name, epochs, batch, steps, use, split, count) => (use && window.loraTrain && loraTrain.trainingValues) "
    "? [name, ...loraTrain.trainingValues(epochs, batch, steps), use, ...loraTrain.validationValues(split, count)] "
    ": [name, epochs, batch, steps, use, split, count]"
)

_TOOL = ["lora_train_ws_tool"]
_SOURCE = ["lora_train_ws_source"]
_BOX = ["lora_train_ws_box"]


class _Parts(dict[str, Any]):
    """The components by short name; :meth:`add` makes one with the id ``lora_train_ws_<name>``."""

    def add(self, key: str, make: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self[key] = make(*args, elem_id=_eid(key), **kwargs)
        return self[key]

    def tool(self, key: str, text: str, *, scale: int = 1, min_width: int = 120, **kwargs: Any) -> Any:
        """A button beside the fields it acts on."""
        return self.add(key, gr.Button, text, scale=scale, min_width=min_width, elem_classes=_TOOL, **kwargs)


def _eid(key: str) -> str:
    return f"lora_train_ws_{key}"


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
    choices (default: none; the WebUI passes
    :func:`lora_trainer.webui.workshop_captioners.default_captioners`)."""
    kwargs: dict[str, Any] = {"workspaces_root": Path(workspaces_root), "captioners": dict(captioners or {})}
    if thumb_dir is not None:
        kwargs["thumb_dir"] = Path(thumb_dir)
    act = WorkshopActions(**kwargs)
    c = _Parts()
    with gr.Column(elem_id="lora_train_workshop"):
        _workspace_bar(c, act)
        with gr.Tabs(elem_id=_eid("steps")):
            with gr.Tab("Import", elem_id=_eid("tab_import")):
                _import_tab(c)
            with gr.Tab("Clean & size", elem_id=_eid("tab_clean")):
                _clean_tab(c)
            with gr.Tab("Captions", elem_id=_eid("tab_captions")):
                _captions_tab(c, act)
            with gr.Tab("Tags", elem_id=_eid("tab_tags")):
                _tags_tab(c)
            with gr.Tab("Advice", elem_id=_eid("tab_advice")):
                _advice_tab(c)
    _wire(act, c, images_dir)
    return WorkshopUI(act, dict(c))


# --------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------


def _workspace_bar(c: _Parts, act: WorkshopActions) -> None:
    with gr.Row(equal_height=False, elem_id=_eid("bar")):
        c.add("select", gr.Dropdown, act.names(), value=None, label="Workspace", scale=3)
        c.tool("refresh", "↻", scale=0, min_width=44)
        c.add("new_name", gr.Textbox, label="New workspace", placeholder="a name, e.g. mychar", scale=3)
        c.tool("create", "Create", variant="primary", scale=0, min_width=80)
    c.add("message", gr.HTML, "")
    with gr.Row(equal_height=False):
        c.add("summary", gr.HTML, act.summary(""))
        c.tool("use", "Use for training", scale=0)


def _import_tab(c: _Parts) -> None:
    with gr.Row():
        c.add(
            "concept",
            gr.Textbox,
            label="Concept",
            placeholder="the folder's or zip's name",
            info="For images not in a '<repeats>_<name>' folder.",
        )
        c.add(
            "repeats",
            gr.Textbox,
            label="Repeats",
            placeholder="from '<N>_name' folders, else 1",
            info="How often each image is shown per epoch.",
        )
    with gr.Row(equal_height=False, elem_classes=_SOURCE):
        c.add(
            "folder",
            gr.Textbox,
            label="A folder",
            placeholder="/path/to/images",
            scale=4,
            info="Read recursively, never changed; '<N>_<name>' folders set concept and repeats.",
        )
        c.tool("import_folder", "Import folder")
    with gr.Row(equal_height=False, elem_classes=_SOURCE):
        c.add("zip_upload", gr.File, label="A .zip", file_types=[".zip"], height=110, scale=2)
        c.add("zip_path", gr.Textbox, label="or the path of one", placeholder="/path/to/set.zip", scale=2)
        c.tool("import_zip", "Import zip")
    with gr.Row(equal_height=False, elem_classes=_SOURCE):
        c.add(
            "files",
            gr.File,
            label="Images (and their .txt captions)",
            file_count="multiple",
            height=110,
            scale=4,
            file_types=["image", ".txt", ".caption"],
        )
        c.tool("import_files", "Import uploaded")
    c.add("import_report", gr.HTML, "")


def _clean_tab(c: _Parts) -> None:
    with gr.Row(equal_height=False):
        with gr.Column(min_width=200):
            c.add("background", gr.ColorPicker, "#ffffff", label="Background for transparency")
            c.add("clean", gr.Button, "Clean")
        with gr.Column(min_width=200):
            c.add("dup_threshold", gr.Slider, 0, 32, value=10, step=1, label="Near-duplicate distance (bits of 128)")
            c.add("remove_exact", gr.Checkbox, False, label="Move exact duplicates aside")
            c.add("duplicates", gr.Button, "Find duplicates")
    number = {"precision": 0, "min_width": 100}
    with gr.Row(equal_height=False):
        with gr.Column(min_width=260, elem_classes=_BOX):
            gr.HTML('<div class="lora_train_ws_box_title">Buckets (training resizes)</div>')
            with gr.Row():
                c.add("resolution", gr.Textbox, "512", label="Resolution", min_width=100)
                c.add("bucket_step", gr.Number, 64, label="Step", **number)
            with gr.Row():
                c.add("min_bucket", gr.Number, 256, label="Min side", **number)
                c.add("max_bucket", gr.Number, 1024, label="Max side", **number)
            c.add("no_upscale", gr.Checkbox, False, label="No upscaling")
            c.add("buckets", gr.Button, "Bucket report")
        with gr.Column(min_width=260, elem_classes=_BOX):
            gr.HTML('<div class="lora_train_ws_box_title">Fixed size (rewrites the images)</div>')
            with gr.Row():
                c.add("width", gr.Number, 512, label="Width", **number)
                c.add("height", gr.Number, 512, label="Height", **number)
            c.add("crop", gr.Radio, ["center", "focal"], value="center", label="Crop")
            c.add("upscale", gr.Checkbox, True, label="Enlarge smaller images")
            c.add("resize", gr.Button, "Resize all")
    c.add("clean_report", gr.HTML, "")


def _captions_tab(c: _Parts, act: WorkshopActions) -> None:
    first = next(iter(act.captioners), None)
    spec = act.captioners.get(first) if first else None
    with gr.Row(equal_height=False):
        c.add(
            "captioner",
            gr.Dropdown,
            list(act.captioners),
            value=first,
            label="Captioner",
            info=spec.note if spec else "No captioner is available.",
        )
        c.add(
            "threshold",
            gr.Slider,
            0.0,
            1.0,
            value=(spec.threshold if spec and spec.threshold is not None else 0.35),
            step=0.01,
            label="Threshold",
            info="Tags scored below this are dropped.",
            interactive=not (spec and spec.threshold is None),
        )
        c.add(
            "mode",
            gr.Radio,
            list(CAPTION_MODES),
            value="keep",
            label="Existing captions",
            info="keep: only caption images without one.",
        )
    with gr.Row(equal_height=False):
        c.add("sort", gr.Radio, ["score", "alpha", "none"], value="score", label="Sort tags")
        c.add("max_tags", gr.Number, 0, precision=0, label="Max tags (0 = all)")
        with gr.Column(min_width=180):
            c.add("underscores", gr.Checkbox, True, label="Underscores → spaces")
            c.add("escape", gr.Checkbox, False, label="Escape parentheses")
    with gr.Row(equal_height=False):
        c.add(
            "triggers",
            gr.Textbox,
            label="Trigger words",
            placeholder="mychar",
            info="Comma-separated; put first in every caption.",
        )
        c.add("exclude", gr.Textbox, label="Never write these tags", placeholder="simple background")
    with gr.Row():
        c.add("caption", gr.Button, "Caption images", variant="primary")
        c.add("caption_stop", gr.Button, "Stop")
    c.add("caption_report", gr.HTML, "")


def _tags_tab(c: _Parts) -> None:
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=220):
            c.add(
                "filter",
                gr.Textbox,
                label="Only images with",
                placeholder="tag, tag",
                info="Filters the table, the images and the bulk edits. Click a tag to use it.",
            )
            c.add(
                "tag_table",
                gr.Dataframe,
                [],
                headers=["tag", "images"],
                datatype=["str", "number"],
                type="array",
                interactive=False,
                height=330,
                max_rows=None,
                label="Tag frequency",
            )
        with gr.Column(scale=3, min_width=300):
            _bulk_edits(c)
    c.add("gallery_info", gr.HTML, "")
    with gr.Row(equal_height=False):
        c.add(
            "gallery",
            gr.Gallery,
            [],
            label="Images",
            columns=4,
            height=360,
            allow_preview=False,
            object_fit="contain",
            show_download_button=False,
            scale=3,
        )
        with gr.Column(scale=2, min_width=240, elem_id=_eid("editor")):
            c.add(
                "selected_image",
                gr.Image,
                None,
                type="filepath",
                label="Selected",
                interactive=False,
                height=200,
                show_download_button=False,
            )
            c.add("selected_id", gr.Textbox, label="Image", interactive=False)
            c.add("caption_text", gr.Textbox, label="Caption", lines=4)
            c.add("save_caption", gr.Button, "Save caption")
            c.add("editor_message", gr.HTML, "")
    c["ids"] = gr.State([])


def _bulk_edits(c: _Parts) -> None:
    """Remove, replace, add (each a row: its fields, then its button) and Undo."""
    with gr.Row(equal_height=True):
        c.add("remove_tags", gr.Textbox, label="Remove tags", placeholder="blue eyes", scale=3)
        c.add("remove", gr.Button, "Remove", scale=1, min_width=90)
    with gr.Row(equal_height=True):
        c.add("replace_old", gr.Textbox, label="Replace", placeholder="old tag", scale=2)
        c.add("replace_new", gr.Textbox, label="with", placeholder="new tag; blank removes", scale=2)
        c.add("replace", gr.Button, "Replace", scale=1, min_width=90)
    with gr.Row(equal_height=True):
        c.add("add_tags", gr.Textbox, label="Add tags", placeholder="mychar", scale=2)
        c.add("add_position", gr.Radio, ["start", "end"], value="start", label="at", scale=2)
        c.add("add", gr.Button, "Add", scale=1, min_width=90)
    c.add("undo", gr.Button, "Undo last bulk edit")
    c.add("tag_report", gr.HTML, "")


def _advice_tab(c: _Parts) -> None:
    with gr.Row(equal_height=False):
        c.add(
            "use_training",
            gr.Checkbox,
            True,
            label="Use the Training tab's epochs, batch size, max steps and validation split",
        )
        c.add("epochs", gr.Number, 10, precision=0, label="Epochs")
        c.add("batch", gr.Number, 1, precision=0, label="Batch size")
        c.add("max_steps", gr.Textbox, "", label="Max steps", placeholder="unset")
        c.add("val_split", gr.Number, 0, label="Validation split (fraction)")
        c.add("val_count", gr.Textbox, "", label="Validation images (count)", placeholder="unset")
    c.add("advise", gr.Button, "Check the training length")
    c.add("advice", gr.HTML, "")


# --------------------------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------------------------

_NO_API: dict[str, Any] = {"api_name": False}

# Buttons that change the workspace and show a report: (button, handler, inputs after the
# workspace, report). The handler is an adapter of :func:`_adapters` or else a WorkshopActions
# method. Each is followed by a refresh of what shows the workspace.
_EDITS: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    ("import_folder", "import_folder", ("folder", "concept", "repeats"), "import_report"),
    ("import_zip", "import_zip", ("zip_upload", "zip_path", "concept", "repeats"), "import_report"),
    ("import_files", "import_files", ("files", "concept", "repeats"), "import_report"),
    ("clean", "clean", ("background",), "clean_report"),
    ("duplicates", "duplicates", ("dup_threshold", "remove_exact"), "clean_report"),
    ("resize", "resize", ("width", "height", "crop", "upscale"), "clean_report"),
    (
        "caption",
        "caption",
        ("captioner", "threshold", "underscores", "escape", "sort", "max_tags", "mode", "triggers", "exclude"),
        "caption_report",
    ),
    ("remove", "bulk_remove", ("remove_tags", "filter"), "tag_report"),
    ("replace", "bulk_replace", ("replace_old", "replace_new", "filter"), "tag_report"),
    ("add", "bulk_add", ("add_tags", "add_position", "filter"), "tag_report"),
    ("undo", "undo", (), "tag_report"),
)


def _adapters(act: WorkshopActions) -> dict[str, Callable[..., Any]]:
    """gradio finds its progress bar by a ``gr.Progress()`` default and click data by a
    ``gr.SelectData`` annotation: these adapters give the plain handlers both."""

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
    return {f.__name__: f for f in (clean, resize, caption, pick_tag, select_image)}


def _wire(act: WorkshopActions, c: _Parts, images_dir: gr.Textbox) -> None:
    """Events. Every change to the workspace is followed by a refresh of what shows it."""
    ad = _adapters(act)
    ws = c["select"]
    view_in = [ws, c["filter"], images_dir]
    view_out = [c["summary"], c["tag_table"], c["gallery"], c["ids"], c["gallery_info"]]

    def then_view(event) -> None:
        event.then(act.view, view_in, view_out, show_progress=False, **_NO_API)

    c["refresh"].click(act.refresh_list, [ws], [c["message"], ws], **_NO_API).then(
        act.view, view_in, view_out, **_NO_API
    )
    then_view(
        c["create"].click(
            act.create, [c["new_name"], images_dir], [c["message"], ws, c["new_name"], images_dir], **_NO_API
        )
    )
    then_view(ws.input(act.open, [ws], [c["message"], images_dir], **_NO_API))
    then_view(c["use"].click(act.use_for_training, [ws], [c["message"], images_dir], **_NO_API))

    for button, handler, inputs, report in _EDITS:
        run = ad.get(handler) or getattr(act, handler)
        then_view(c[button].click(run, [ws, *(c[k] for k in inputs)], [c[report]], **_NO_API))
    c["buckets"].click(
        act.buckets,
        [ws, c["resolution"], c["min_bucket"], c["max_bucket"], c["bucket_step"], c["no_upscale"]],
        [c["clean_report"]],
        **_NO_API,
    )
    c["captioner"].change(act.captioner_changed, [c["captioner"]], [c["captioner"], c["threshold"]], **_NO_API)
    c["caption_stop"].click(act.stop_caption, [ws], [c["caption_report"]], queue=False, **_NO_API)

    _wire_tags(act, c, ad)
    c["advise"].click(
        act.advise,
        [ws, c["epochs"], c["batch"], c["max_steps"], c["use_training"], c["val_split"], c["val_count"]],
        [c["advice"], c["epochs"], c["batch"], c["max_steps"]],
        _js=_ADVICE_JS,
        **_NO_API,
    )

    # A fresh page lists the workspaces as they are on disk now (not when the UI was built).
    root = gr.context.Context.root_block  # pyright: ignore[reportAttributeAccessIssue]
    if root is not None:
        root.load(lambda: gr.update(choices=act.names()), None, [ws], show_progress=False, **_NO_API)


def _wire_tags(act: WorkshopActions, c: _Parts, ad: Mapping[str, Callable[..., Any]]) -> None:
    """The filter, the frequency table, the thumbnails and the caption editor."""
    ws = c["select"]
    tags_out = [c["tag_table"], c["gallery"], c["ids"], c["gallery_info"]]

    def tags_view(name, filter_tags):
        return [act.tag_table(name, filter_tags), *act.gallery(name, filter_tags)]

    c["filter"].submit(tags_view, [ws, c["filter"]], tags_out, **_NO_API)
    c["tag_table"].select(ad["pick_tag"], [c["tag_table"]], [c["filter"]], **_NO_API).then(
        tags_view, [ws, c["filter"]], tags_out, **_NO_API
    )
    c["gallery"].select(
        ad["select_image"],
        [ws, c["ids"]],
        [c["selected_image"], c["selected_id"], c["caption_text"], c["editor_message"]],
        **_NO_API,
    )
    c["save_caption"].click(
        act.save_caption, [ws, c["selected_id"], c["caption_text"]], [c["caption_text"], c["editor_message"]], **_NO_API
    ).then(act.tag_table, [ws, c["filter"]], [c["tag_table"]], show_progress=False, **_NO_API)
