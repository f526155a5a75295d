"""The Dataset workshop tab without a browser: its handlers over a temporary workspace root with
generated images and stand-in captioners (import -> clean -> duplicates -> sizes -> caption ->
tag edits -> undo -> advice -> the training folder box), its error messages, the renderers, the
tab it builds inside ``create_tab``, the WebUI wiring (``runtime.on_ui_tabs``) and the WebUI
captioners of ``lora_trainer.backends.webui`` on the stand-in WebUI."""

from __future__ import annotations

import errno
import threading
import types
import zipfile
from pathlib import Path

import gradio as gr
import pytest
from PIL import Image

from lora_trainer.errors import DatasetError
from lora_trainer.files import atomic_write
from lora_trainer.jobs import JobManager
from lora_trainer.webui import workshop_actions, workshop_render, workshop_ui
from lora_trainer.webui.ui import create_tab
from lora_trainer.webui.workshop_actions import WorkshopActions
from lora_trainer.webui.workshop_captioners import CaptionerSpec, wd14_spec
from lora_trainer.workshop import Captioner, CaptionerUnavailable, Problem, Workspace
from tests.fixtures.files import tree_hashes
from tests.fixtures.host import FakeHost
from tests.fixtures.images import COLOURS, make_image, pattern, save
from tests.fixtures.ui_app import StubTagger


def make_source(root: Path) -> Path:
    """A user's folder: a kohya ``10_mychar`` folder (one image captioned, one transparent), a loose
    folder, an exact duplicate, a broken image and a file that is no image."""
    src = root / "photos"
    for i, colour in enumerate(COLOURS[:4]):
        make_image(src / "10_mychar" / f"img{i}.png", colour, seed=i)
    (src / "10_mychar" / "img0.txt").write_text("mychar, old caption", encoding="utf-8")
    make_image(src / "10_mychar" / "clear.png", (10, 10, 10), mode="RGBA", seed=7)
    make_image(src / "extra" / "e0.png", COLOURS[4], seed=4)
    (src / "extra" / "copy.png").write_bytes((src / "10_mychar" / "img1.png").read_bytes())
    (src / "extra" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (src / "extra" / "notes.md").write_text("not an image", encoding="utf-8")
    return src


class Recorder:
    """A captioner that records how many images it saw; optional hook per image."""

    name = "recorder"

    def __init__(self, on_image=None):
        self.seen = 0
        self.on_image = on_image

    def caption(self, image):
        self.seen += 1
        if self.on_image is not None:
            self.on_image(self.seen)
        return [("1girl", 0.9), ("long_hair", 0.7), ("smile_(happy)", 0.5), ("blush", 0.1)]


def broken_captioner(threshold):
    raise RuntimeError("model file exploded")


def unavailable_captioner(threshold):
    raise CaptionerUnavailable("The tagger needs onnxruntime: pip install onnxruntime.")


@pytest.fixture
def actions(tmp_path):
    captioners = {
        "Stub": CaptionerSpec(lambda t: StubTagger(), 0.35, "stand-in"),
        "Recorder": CaptionerSpec(lambda t: Recorder(), 0.35),
        "Sentences": CaptionerSpec(lambda t: types.SimpleNamespace(name="s", caption=lambda im: "a photo"), None),
        "Broken": CaptionerSpec(broken_captioner),
        "Missing": CaptionerSpec(unavailable_captioner),
    }
    return WorkshopActions(tmp_path / "datasets", captioners, tmp_path / "thumbs")


def caption_args(captioner="Stub", *, threshold=0.35, mode="overwrite", triggers="mychar", **kw):
    """The caption handler's inputs in order, as the tab sends them."""
    values = {
        "underscores": True,
        "escape": False,
        "sort": "score",
        "max_tags": 0,
        "exclude": "",
        **kw,
    }
    return (
        captioner,
        threshold,
        values["underscores"],
        values["escape"],
        values["sort"],
        values["max_tags"],
        mode,
        triggers,
        values["exclude"],
    )


def tag_dict(update) -> dict[str, int]:
    return dict(update["value"])


def is_error(html: str) -> bool:
    return "lora_train_msg_error" in html and "Traceback" not in html


# --------------------------------------------------------------------------------------------
# The whole walk
# --------------------------------------------------------------------------------------------


def test_import_clean_caption_edit_undo_advise(actions, tmp_path):
    src = make_source(tmp_path)
    before = tree_hashes(src)

    # Create: the dropdown selects it, the training folder box points at it.
    msg, dropdown, new_name, folder_box = actions.create("mychar", "/some/other/folder")
    ws = Workspace.open(tmp_path / "datasets" / "mychar")
    assert "ready" in msg
    assert dropdown["value"] == "mychar"
    assert dropdown["choices"] == ["mychar"]
    assert new_name == ""
    assert folder_box == ws.train_data_dir == str(tmp_path / "datasets" / "mychar")
    assert "Training reads this workspace" in actions.summary("mychar", folder_box)
    assert "press “Use for training”" in actions.summary("mychar", "/elsewhere")

    # Import a folder: 10_mychar keeps its repeats, the rest goes to the concept given, 2 repeats.
    html = actions.import_folder("mychar", str(src), "extra stuff", "2")
    assert "Imported 8 image(s)" in html, html
    assert "<code>10_mychar</code>" in html
    assert "<code>2_extra stuff</code>" in html
    assert "notes.md" in html
    assert "skipped" in html
    summary = ws.summary()
    assert {c.folder: (c.repeats, c.images) for c in summary.concepts} == {
        "10_mychar": (10, 5),
        "2_extra stuff": (2, 3),
    }

    # Clean onto a green background: the transparent image converted, the broken one set aside.
    html = actions.clean("mychar", "#00ff00")
    assert "1 moved to quarantine" in html
    assert "broken.png" in html
    assert "lora_train_ws_report_error" in html
    clear = Image.open(ws.path / "10_mychar" / "clear.png")
    assert clear.mode == "RGB"
    assert clear.getpixel((1, 1)) == (0, 255, 0)

    # Duplicates: copy.png is img1.png; remove it.
    html = actions.duplicates("mychar", 10, False)
    assert "exact groups" in html
    assert "copy.png" in html
    assert "img1.png" in html
    html = actions.duplicates("mychar", 10, True)
    assert "Moved to" in html
    assert ws.summary().images == 6

    # Sizes: a bucket report (reads only), then a fixed size.
    html = actions.buckets("mychar", "64", 32, 128, 32, False)
    assert "Buckets at 64×64" in html
    assert "6 image(s)" in html
    html = actions.resize("mychar", 64, "", "focal", True)
    assert "Resized to 64×64 (focal crop)" in html
    assert "6</b> resized" in html
    assert Image.open(ws.path / "10_mychar" / "img2.png").size == (64, 64)

    # Captions: keep mode leaves img0's caption, the stand-in tags the others, trigger first.
    html = actions.caption("mychar", *caption_args(mode="keep"))
    assert "Captions by stub" in html, html
    assert "<b>5</b> written" in html, html
    assert ws.get_caption("10_mychar/img0.png") == "mychar, old caption"
    assert ws.get_caption("10_mychar/img2.png") == "mychar, 1girl, solo, blue background, simple background"
    table = tag_dict(actions.tag_table("mychar", ""))
    assert table["mychar"] == 6
    assert table["1girl"] == 5
    assert "blush" not in table

    # Bulk remove "solo": the frequency table changes; undo brings it back.
    html = actions.bulk_remove("mychar", "solo", "")
    assert "5 caption(s) changed" in html
    assert "solo" not in tag_dict(actions.tag_table("mychar", ""))
    assert "Undo available: remove solo" in actions.summary("mychar")
    html = actions.undo("mychar")
    assert "Undone: remove solo" in html
    assert "5</b> captions restored" in html
    assert tag_dict(actions.tag_table("mychar", ""))["solo"] == 5
    assert "no bulk edit to undo" in actions.undo("mychar")

    # Replace and add, only on images having a filter tag.
    html = actions.bulk_replace("mychar", "blue background", "night sky, stars", "blue background")
    assert "1 caption(s) changed" in html
    assert "images matched" in html
    assert ws.get_caption("10_mychar/img2.png") == "mychar, 1girl, solo, night sky, stars, simple background"
    html = actions.bulk_add("mychar", "outdoors", "end", "night sky")
    assert ws.get_caption("10_mychar/img2.png").endswith("simple background, outdoors")
    shown = ("mychar", "1girl", "solo", "night sky", "stars", "simple background", "outdoors")
    assert tag_dict(actions.tag_table("mychar", "night sky")) == dict.fromkeys(shown, 1)

    # Advice: 6 images, 5 x 10 + 1 x 2 = 52 per epoch, 26 steps of 2.
    advice, epochs, batch, steps = actions.advise("mychar", 2, 2, "", True)
    assert (epochs, batch, steps) == (2, 2, "")
    assert "<td>Total steps</td><td><b>52</b></td>" in advice
    assert 'data-code="too_few_images"' in advice
    assert 'data-code="too_few_total_steps"' in advice
    assert "keep 2 epochs" in advice
    assert "come from the Training tab" in advice
    advice, epochs, _, steps = actions.advise("mychar", 2, 1, "1800", False)
    assert steps == 1800
    assert epochs == gr.update()
    assert "35 epoch(s)" in advice
    assert "Held out for validation" not in advice

    # The validation split the Training tab holds out (here 2 of the 6 images) is left out of the steps.
    advice, *_ = actions.advise("mychar", 2, 2, "", True, 0, "2")
    assert "<td>Held out for validation</td><td><b>2</b></td>" in advice
    assert "<td>Total steps</td><td><b>52</b></td>" not in advice
    assert "validation split come from the Training tab" in advice
    held, *_ = actions.advise("mychar", 2, 2, "", False, 0.5, "")
    assert "<td>Held out for validation</td><td><b>3</b></td>" in held
    assert "Validation split: must be at least 0 and below 1" in actions.advise("mychar", 2, 2, "", False, 1.5)[0]

    # The training folder box, and the user's folder untouched.
    assert actions.use_for_training("mychar")[1] == ws.train_data_dir
    assert actions.open("mychar")[1] == ws.train_data_dir
    assert tree_hashes(src) == before


def test_zip_and_uploads(actions, tmp_path):
    actions.create("set", "")
    src = make_source(tmp_path)
    archive = tmp_path / "5_zipped.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(src / "10_mychar" / "img0.png", "img0.png")
        zf.write(src / "10_mychar" / "img0.txt", "img0.txt")
        zf.writestr("../evil.png", b"x")
    before = archive.read_bytes()

    html = actions.import_zip("set", None, str(archive), "", "")
    assert "Imported 1 image(s)" in html
    assert "<code>5_zipped</code>" in html
    assert "evil.png" in html
    assert "lora_train_ws_sev_error" in html  # the unsafe member, clearly an error
    assert archive.read_bytes() == before

    upload = types.SimpleNamespace(name=str(archive), orig_name="/tmp/gradio/abc/3_uploaded.zip")
    html = actions.import_zip("set", upload, "", "", "")
    assert "<code>3_uploaded</code>" in html

    ups = [types.SimpleNamespace(name=str(p)) for p in (src / "extra" / "e0.png", src / "10_mychar" / "img3.png")]
    html = actions.import_files("set", ups, "uploads", "4")
    assert "Imported 2 image(s)" in html
    assert "<code>4_uploads</code>" in html
    ws = Workspace.open(tmp_path / "datasets" / "set")
    assert ws.summary().images == 4

    assert is_error(actions.import_files("set", [], "", ""))
    assert is_error(actions.import_zip("set", None, "", "", ""))
    assert "not a readable zip" in actions.import_zip("set", None, str(src / "extra" / "e0.png"), "", "")


def test_gallery_select_and_save_caption(actions, tmp_path):
    actions.create("g", "")
    src = make_source(tmp_path)
    actions.import_folder("g", str(src / "10_mychar"), "", "")
    actions.caption("g", *caption_args("Stub"))
    items, ids, info = actions.gallery("g", "")
    assert len(items) == len(ids) == 5
    assert "5 of 5 image(s)" in info
    assert all(Path(thumb).is_file() and Path(thumb).parent == tmp_path / "thumbs" for thumb, _ in items)
    assert [label for _, label in items] == [Path(i).name for i in ids]
    assert max(Image.open(items[0][0]).size) <= workshop_actions.THUMB_SIZE

    items, ids, info = actions.gallery("g", "green background")
    assert ids == ["10_mychar/img1.png"]
    assert "1 of 5 image(s) have green background" in info

    preview, image, caption, message = actions.select_image("g", ids, types.SimpleNamespace(index=0))
    assert image == "10_mychar/img1.png"
    assert caption.startswith("mychar, 1girl")
    assert message == ""
    assert Path(preview).is_file()
    text, msg = actions.save_caption("g", image, "mychar,   new  caption\nsecond line")
    assert text == "mychar, new caption second line"
    assert "Saved" in msg
    assert (Path(actions.workspace("g").path) / "10_mychar" / "img1.txt").read_text() == text

    stale = actions.select_image("g", ids, types.SimpleNamespace(index=5))
    assert stale[:3] == [gr.update()] * 3
    assert is_error(stale[3])
    assert is_error(actions.save_caption("g", "", "x")[1])
    assert is_error(actions.save_caption("g", "../../etc/passwd.png", "x")[1])

    df = types.SimpleNamespace(values=types.SimpleNamespace(tolist=lambda: [["mychar", 5], ["solo", 5]]))
    assert actions.pick_tag(df, types.SimpleNamespace(index=[1, 1])) == "solo"
    assert actions.pick_tag([["mychar", 5]], types.SimpleNamespace(index=[0, 0])) == "mychar"


def test_caption_options_and_captioners(actions, tmp_path):
    actions.create("c", "")
    make_image(tmp_path / "src" / "a.png", COLOURS[0])
    make_image(tmp_path / "src" / "b.png", COLOURS[1])
    actions.import_folder("c", str(tmp_path / "src"), "", "")
    ws = actions.workspace("c")
    html = actions.caption("c", *caption_args("Recorder", threshold=0.4, triggers="", sort="alpha", escape=True))
    assert "<b>2</b> written" in html
    assert ws.get_caption("1_src/a.png") == "1girl, long hair, smile \\(happy\\)"
    actions.caption("c", *caption_args("Recorder", threshold=0.0, max_tags=2, triggers="x, y", underscores=False))
    assert ws.get_caption("1_src/a.png") == "x, y, 1girl, long_hair"
    html = actions.caption("c", *caption_args("Sentences", threshold=0.9, triggers="", mode="append"))
    assert ws.get_caption("1_src/a.png") == "x, y, 1girl, long_hair, a photo"  # threshold unused for sentences

    # The threshold follows the captioner.
    note, slider = actions.captioner_changed("Stub")
    assert note["info"] == "stand-in"
    assert slider["value"] == 0.35
    assert slider["interactive"] is True
    assert actions.captioner_changed("Sentences")[1]["interactive"] is False
    assert actions.captioner_changed("nope") == [gr.update(), gr.update()]

    # Errors: clear messages, nothing written.
    before = ws.get_caption("1_src/a.png")
    missing = actions.caption("c", *caption_args("Missing"))
    assert is_error(missing)
    assert "pip install onnxruntime" in missing
    broken = actions.caption("c", *caption_args("Broken"))
    assert "Unexpected error: RuntimeError: model file exploded" in broken
    assert "Traceback" not in broken
    assert "Captioner: pick one of" in actions.caption("c", *caption_args("Nope"))
    assert "Threshold: must be between 0 and 1" in actions.caption("c", *caption_args(threshold=1.5))
    assert "Max tags: must be a whole number" in actions.caption("c", *caption_args(max_tags=-1))
    assert ws.get_caption("1_src/a.png") == before


def test_wd14_without_onnxruntime_or_model_says_what_to_do(actions, tmp_path):
    actions.captioners = {"WD14": wd14_spec(tmp_path / "wd14", allow_download=False)}
    actions.create("w", "")
    make_image(tmp_path / "src" / "a.png", COLOURS[0])
    actions.import_folder("w", str(tmp_path / "src"), "", "")
    html = actions.caption("w", *caption_args("WD14"))
    assert is_error(html)
    assert "onnxruntime" in html or "model.onnx" in html  # whichever is missing here
    assert not (tmp_path / "datasets" / "w" / "1_src" / "a.txt").exists()


def test_stop_a_caption_run(actions, tmp_path):
    actions.create("s", "")
    for i, colour in enumerate(COLOURS):
        make_image(tmp_path / "src" / f"{i}.png", colour, seed=i)
    actions.import_folder("s", str(tmp_path / "src"), "", "")
    assert "No caption run" in actions.stop_caption("s")
    stopped = []
    actions.captioners["Stopper"] = CaptionerSpec(
        lambda t: Recorder(on_image=lambda n: n == 2 and stopped.append(actions.stop_caption("s")))
    )
    html = actions.caption("s", *caption_args("Stopper"))
    assert "Stopping after the current image" in stopped[0]
    assert "stopped" in html
    assert "<b>2</b> written" in html


def test_every_error_is_a_message_not_a_trace(actions, tmp_path):
    assert "Pick a workspace" in actions.import_folder("", "/x", "", "")
    assert "no workspace 'ghost'" in actions.bulk_remove("ghost", "x", "")
    assert "cannot be a workspace name" in actions.create("../escape", "")[0]
    assert not (tmp_path / "escape").exists()
    assert actions.create("", "")[1:] == [gr.update()] * 3
    actions.create("e", "")
    assert "is not a folder" in actions.import_folder("e", str(tmp_path / "nope"), "", "")
    assert "Type the path" in actions.import_folder("e", "  ", "", "")
    assert "Repeats: must be a whole number" in actions.import_folder("e", str(tmp_path), "", "two")
    (tmp_path / "empty").mkdir()
    assert "No images could be imported" in actions.import_folder("e", str(tmp_path / "empty"), "", "")
    assert "Background: must be a colour" in actions.clean("e", "green")
    assert "Resolution: must be one size" in actions.buckets("e", "1,2,3", 256, 1024, 64, False)
    assert "Min bucket reso: min_bucket_reso (1024) is above" in actions.buckets("e", "512", 1024, 256, 64, False)
    assert "Width: must be a whole number of at least 8" in actions.resize("e", 4, 4, "center", True)
    assert "Crop: must be one of" in actions.resize("e", 64, 64, "diagonal", True)
    assert "name at least one tag to remove" in actions.bulk_remove("e", " , ", "")
    assert "Replace: name the tag" in actions.bulk_replace("e", "", "x", "")
    assert "Position: must be 'start' or 'end'" in actions.bulk_add("e", "x", "middle", "")
    out = actions.advise("e", 0, 1, "", False)
    assert "Max train epochs: must be a whole number of at least 1" in out[0]
    assert out[1:] == [gr.update()] * 3
    assert "no images" in actions.advise("e", 1, 1, "", False)[0].lower()

    # One operation at a time per workspace.
    ws = actions.workspace("e")
    with ws.busy("captioning with Stub"):
        assert "busy (captioning with Stub)" in actions.bulk_remove("e", "x", "")
    assert "busy" not in actions.bulk_remove("e", "x", "")

    # Anything unexpected: one line, logged, no trace.
    def explode(*args, **kwargs):
        raise OSError("disk on fire")

    ws_cls_method = Workspace.clean
    try:
        Workspace.clean = explode
        html = actions.clean("e", "#fff")
    finally:
        Workspace.clean = ws_cls_method
    assert "Unexpected error: OSError: disk on fire" in html
    assert "Traceback" not in html


def test_refresh_list_and_view(actions, tmp_path):
    assert actions.refresh_list(None)[1]["choices"] == []
    actions.create("b", "")
    actions.create("a", "")
    (tmp_path / "datasets" / "not_a_workspace").mkdir()
    _, update = actions.refresh_list("b")
    assert update == gr.update(choices=["a", "b"], value="b")
    assert actions.refresh_list("gone")[1]["value"] is None
    summary, table, items, ids, info = actions.view("", "", "")
    assert "No workspace open" in summary
    assert table["value"] == []
    assert items == []
    assert ids == []
    summary, table, items, ids, info = actions.view("a", "", "")
    assert 'data-workspace="a"' in summary
    assert "No images yet" in summary
    assert "0 of 0" in info


# --------------------------------------------------------------------------------------------
# Renderers
# --------------------------------------------------------------------------------------------


def test_problems_are_escaped_sorted_and_capped():
    problems = [
        Problem("converted", "a.png", "converted to PNG", "info"),
        Problem("corrupt", "<img src=x onerror=alert(1)>.png", "damaged <b>file</b>", "error"),
        Problem("renamed", "b.png", "renamed", "warning"),
    ]
    html = workshop_render.problems_html(problems)
    assert "<img src=x" not in html
    assert "&lt;img src=x" in html
    assert "&lt;b&gt;file" in html
    assert html.index("damaged") < html.index("renamed") < html.index("converted")
    assert "1 error, 1 warning, 1 note" in html
    assert "<details" in html
    assert " open>" in html
    assert " open>" not in workshop_render.problems_html(problems[:1])  # notes only: folded
    many = workshop_render.problems_html([Problem("x", f"{i}.png", "m") for i in range(250)])
    assert "and 50 more" in many
    assert many.count("<tr>") == workshop_render.PROBLEM_ROWS + 1
    assert workshop_render.problems_html([]) == ""


def test_error_html():
    from lora_trainer.errors import ConfigError

    assert "Max tags: must be &gt;= 0" in workshop_render.error_html(
        ConfigError("workshop.caption.max_tags", "must be >= 0")
    )
    assert "no <such>" not in workshop_render.error_html(DatasetError("no <such> folder"))
    assert "Unexpected error: KeyError" in workshop_render.error_html(KeyError("k"))


# --------------------------------------------------------------------------------------------
# The tab
# --------------------------------------------------------------------------------------------


@pytest.fixture
def host(tmp_path):
    return FakeHost(tmp_path / "host")


def test_workshop_tab_inside_create_tab(host, tmp_path):
    built = []

    def hook(box):
        built.append(workshop_ui.build(box, workspaces_root=tmp_path / "ws", captioners={}))

    tab = create_tab(JobManager(host), host, workshop=hook)
    ids = [b.elem_id for b in tab.blocks.values() if getattr(b, "elem_id", None)]
    assert all(i.startswith("lora_train_") for i in ids), [i for i in ids if not i.startswith("lora_train_")]
    assert len(ids) == len(set(ids))
    ui = built[0]
    assert {"lora_train_workshop", "lora_train_ws_select", "lora_train_ws_gallery", "lora_train_ws_advice"} <= set(ids)
    # Creating, opening and "Use for training" set the training images-folder box.
    box = tab.lora_train_components["dataset.train_data_dir"]
    setters = [d for d in tab.config["dependencies"] if box._id in d["outputs"]]
    triggers = {(t, d["trigger"]) for d in setters for t in d["targets"]}
    for key, event in (("create", "click"), ("use", "click"), ("select", "input")):
        assert (ui.components[key]._id, event) in triggers
    loads = [d for d in tab.config["dependencies"] if d["trigger"] == "load"]
    assert any(d["outputs"] == [ui.components["select"]._id] for d in loads)  # a fresh page lists them anew
    # The adapters hand gradio's progress bar and click data to the plain handlers.
    from gradio.helpers import special_args

    fns = {f.fn.__name__: f.fn for f in tab.fns if f.fn is not None}
    assert special_args(fns["select_image"])[2] == 2
    assert special_args(fns["pick_tag"])[2] == 1
    assert special_args(fns["caption"])[1] is not None
    assert special_args(fns["clean"])[1] == 2
    assert not (tmp_path / "ws").exists()  # building creates nothing
    assert ui.components["captioner"].choices == [] or ui.components["captioner"].value is None


def test_runtime_wires_the_workshop_with_the_webui_captioners(monkeypatch, tmp_path):
    from lora_trainer.webui import runtime
    from tests.fixtures.fake_webui import FakeWebUI

    fake = FakeWebUI(tmp_path / "webui")
    with fake.installed():
        monkeypatch.setattr(runtime, "_manager", None)
        captured = {}
        original = workshop_ui.build

        def spy(box, **kwargs):
            captured.update(kwargs)
            return original(box, **kwargs)

        monkeypatch.setattr(workshop_ui, "build", spy)
        [(tab, _, _)] = runtime.on_ui_tabs()
        assert captured["workspaces_root"] == Path(fake.root) / "lora_train" / "datasets"
        assert list(captured["captioners"]) == ["DeepBooru", "BLIP", "WD14"]
        assert any(getattr(b, "elem_id", None) == "lora_train_ws_select" for b in tab.blocks.values())

        actions = WorkshopActions(captured["workspaces_root"], captured["captioners"], tmp_path / "thumbs")
        actions.create("webui", "")
        make_image(tmp_path / "src" / "bright.png", (250, 250, 250))
        actions.import_folder("webui", str(tmp_path / "src"), "", "")
        html = actions.caption("webui", *caption_args("DeepBooru", threshold=0.5, triggers=""))
        assert "<b>1</b> written" in html, html
        ws = actions.workspace("webui")
        assert ws.get_caption("1_src/bright.png") == "bright, 1girl, long hair"  # best first, no rating
        actions.caption("webui", *caption_args("BLIP", threshold=0.0, triggers=""))
        assert ws.get_caption("1_src/bright.png") == "a picture of 96x64 pixels, mean 250"

        # A training run (or a generation) holds the queue lock: the run says so, writes nothing.
        with fake.queue_lock:
            html = actions.caption("webui", *caption_args("DeepBooru", threshold=0.5, triggers="x"))
        assert is_error(html)
        assert "The WebUI is busy" in html
        assert ws.get_caption("1_src/bright.png") == "a picture of 96x64 pixels, mean 250"


def test_webui_captioners_follow_the_protocol(tmp_path):
    from tests.fixtures.fake_webui import FakeWebUI

    fake = FakeWebUI(tmp_path / "webui")
    with fake.installed():
        be = fake.backend.captioners
        booru, blip = be.DeepBooruCaptioner(threshold=0.8), be.BlipCaptioner()
        assert isinstance(booru, Captioner)
        assert isinstance(blip, Captioner)
        bright = Image.new("RGB", (32, 32), (250, 250, 250))
        assert [t for t, _ in booru.caption(bright)] == ["bright", "1girl"]
        assert [t for t, _ in booru.caption(bright)] == ["bright", "1girl"]  # later images wait their turn
        assert blip.caption(bright) == "a picture of 32x32 pixels, mean 250"
        assert fake.queue_lock.acquire(blocking=False)  # released after each image
        fake.queue_lock.release()

        # After the first image a busy lock is waited for, not refused.
        released = threading.Timer(0.2, fake.queue_lock.release)
        fake.queue_lock.acquire()
        released.start()
        assert blip.caption(bright).startswith("a picture")
        with fake.queue_lock, pytest.raises(CaptionerUnavailable, match="busy"):
            be.DeepBooruCaptioner().caption(bright)


@pytest.mark.parametrize(
    ("error", "says"),
    [
        (PermissionError(errno.EACCES, "Permission denied"), "is read-only or the WebUI"),
        (OSError(errno.ENOSPC, "No space left on device"), "the disk is full"),
    ],
)
def test_unwritable_or_full_workspace_names_the_folder(actions, tmp_path, monkeypatch, error, says):
    """A read-only workspace or a full disk (CI runs as root, so chmod stops nothing: the write is
    made to fail) says which folder and what to do, never the hidden temp file's name."""
    actions.create("ro", "")
    ws = actions.workspace("ro")
    folder = ws.path / "10_mychar"
    save(pattern((16, 16), 1), folder / "a.png")
    (folder / "a.txt").write_text("x", encoding="utf-8")

    def refuse(directory, stem, chunks, durable=True):
        error.filename = str(Path(directory) / f".{stem}.abc123.tmp")
        raise error

    monkeypatch.setattr(atomic_write, "write_temp", refuse)
    for html in (actions.bulk_add("ro", "mychar2", "start", ""), actions.save_caption("ro", "10_mychar/a.png", "y")[1]):
        assert is_error(html)
        assert says in html
        assert f"folder {ws.path}" in html
        assert ".tmp" not in html
        assert "Unexpected" not in html
    assert (folder / "a.txt").read_text(encoding="utf-8") == "x"

    def move_fails(*args, **kwargs):  # a write outside atomic_write (a rename, a mkdir) reaching the page
        raise type(error)(error.errno, error.strerror, str(folder / ".a.png.xyz.tmp"))

    monkeypatch.setattr(Workspace, "clean", move_fails)
    html = actions.clean("ro", "#fff")
    assert is_error(html)
    assert f"{says}" in html
    assert str(folder) in html
    assert ".tmp" not in html
