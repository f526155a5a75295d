"""The caption pipeline with stand-in captioners: post-processing, merge modes, trigger words, undo."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from lora_trainer.data.scan import scan_dataset
from lora_trainer.errors import ConfigError
from lora_trainer.workshop import CaptionerUnavailable, CaptionOptions, Workspace
from lora_trainer.workshop.captioning import Captioner, merge_caption, postprocess
from tests.fixtures.images import pattern, save


class FakeTagger:
    """Scores depend on the image's top-left pixel, so we can tell that each image was seen."""

    name = "fake-tagger"

    def __init__(self, tags=None):
        self.seen: list[tuple[int, int]] = []
        self.tags = tags or {"long_hair": 0.9, "smile_(expression)": 0.6, "^_^": 0.5, "blurry": 0.2}

    def caption(self, image: Image.Image):
        assert image.mode == "RGB"
        self.seen.append(image.size)
        return dict(self.tags)


class FakeBlip:
    name = "fake-blip"

    def caption(self, image):
        return "a photo of a cat"


@pytest.fixture
def ws(tmp_path):
    ws = Workspace.create(tmp_path / "w", "ds")
    d = ws.path / "5_cat"
    save(pattern((40, 30), 1), d / "has.png")
    (d / "has.txt").write_text("cat, long hair, indoors", encoding="utf-8")
    save(pattern((50, 30), 2), d / "none.png")
    save(pattern((60, 30), 3), d / "empty.png")
    (d / "empty.txt").write_text("", encoding="utf-8")
    return ws


def cap(ws, name):
    p = ws.path / "5_cat" / f"{name}.txt"
    return p.read_text(encoding="utf-8") if p.exists() else None


def test_protocol():
    assert isinstance(FakeTagger(), Captioner)
    assert isinstance(FakeBlip(), Captioner)
    assert not isinstance(object(), Captioner)


def test_postprocess_options():
    out = {"long_hair": 0.9, "smile_(expression)": 0.6, "^_^": 0.5, "blurry": 0.2, "Long Hair": 0.1}
    assert postprocess(out, CaptionOptions()) == ["long hair", "smile (expression)", "^_^", "blurry"]
    assert postprocess(out, CaptionOptions(threshold=0.55)) == ["long hair", "smile (expression)"]
    assert postprocess(out, CaptionOptions(replace_underscores=False, max_tags=2)) == [
        "long_hair",
        "smile_(expression)",
    ]
    assert postprocess(out, CaptionOptions(escape_parentheses=True, threshold=0.5)) == [
        "long hair",
        "smile \\(expression\\)",
        "^_^",
    ]
    assert postprocess(out, CaptionOptions(sort="alpha", threshold=0.3)) == ["^_^", "long hair", "smile (expression)"]
    assert postprocess([("b", 0.2), ("a", 0.9)], CaptionOptions(sort="none")) == ["b", "a"]
    assert postprocess(out, CaptionOptions(exclude_tags=["blurry", "smile (expression)"])) == ["long hair", "^_^"]
    assert postprocess("a photo, of a cat", CaptionOptions(threshold=0.9)) == ["a photo", "of a cat"]
    # escaping twice does not double the backslashes
    assert postprocess(["x \\(y\\)"], CaptionOptions(escape_parentheses=True)) == ["x \\(y\\)"]


def test_merge_modes_and_triggers():
    new = ["long hair", "smile"]
    o = CaptionOptions
    assert merge_caption("cat, long_hair", new, o(mode="overwrite")) == "long hair, smile"
    assert merge_caption("cat, long_hair", new, o(mode="append")) == "cat, long_hair, smile"
    assert merge_caption("cat, long_hair", new, o(mode="keep")) == "cat, long_hair"
    assert merge_caption(None, new, o(mode="keep")) == "long hair, smile"
    assert merge_caption("", new, o(mode="keep")) == "long hair, smile"
    trig = o(mode="append", trigger_words=["sks cat", "Smile"])
    assert merge_caption("cat, SKS_cat", new, trig) == "sks cat, Smile, cat, long hair"


def test_pipeline_keep_mode_fills_missing_only(ws):
    tagger = FakeTagger()
    report = ws.caption(tagger, {"mode": "keep", "threshold": 0.35})
    assert sorted(tagger.seen) == [(50, 30), (60, 30)]  # the captioned image was not run
    assert cap(ws, "has") == "cat, long hair, indoors"
    assert cap(ws, "none") == "long hair, smile (expression), ^_^"
    assert cap(ws, "empty") == "long hair, smile (expression), ^_^"
    actions = {r.path: r.action for r in report.results}
    assert actions == {"5_cat/has.png": "skipped", "5_cat/none.png": "written", "5_cat/empty.png": "written"}
    assert (report.written, report.skipped, report.failed) == (2, 1, 0)
    json.dumps(report.to_dict())


def test_pipeline_overwrite_append_and_triggers(ws):
    ws.caption(FakeTagger(), CaptionOptions(mode="overwrite", threshold=0.5, trigger_words=["mycat"]))
    assert cap(ws, "has") == "mycat, long hair, smile (expression), ^_^"
    ws.caption(FakeBlip(), {"mode": "append", "trigger_words": ["mycat"]})
    assert cap(ws, "has") == "mycat, long hair, smile (expression), ^_^, a photo of a cat"
    again = ws.caption(FakeBlip(), {"mode": "append", "trigger_words": ["mycat"]})
    assert again.written == 0
    assert again.unchanged == 3


def test_keep_mode_still_adds_trigger_words(ws):
    report = ws.caption(FakeTagger(), {"mode": "keep", "trigger_words": ["mycat", "cat"]})
    assert cap(ws, "has") == "mycat, cat, long hair, indoors"
    assert report.results[1].path == "5_cat/has.png"
    assert report.results[1].action == "written"


def test_caption_run_is_undoable(ws):
    ws.caption(FakeTagger(), {"mode": "overwrite"})
    assert cap(ws, "none") is not None
    undo = ws.undo()
    assert undo.undone
    assert undo.operation == "caption:fake-tagger"
    assert cap(ws, "has") == "cat, long hair, indoors"
    assert cap(ws, "none") is None  # had no caption file: removed again
    assert cap(ws, "empty") == ""
    assert not ws.undo().undone


def test_failures_are_per_image(ws):
    class Flaky:
        name = "flaky"

        def caption(self, image):
            if image.size == (50, 30):
                raise RuntimeError("GPU hiccup")
            return "ok"

    (ws.path / "5_cat" / "broken.png").write_bytes(b"garbage")
    report = ws.caption(Flaky(), {"mode": "overwrite"})
    assert report.failed == 2
    assert report.written == 2
    assert report.problem_paths("caption_failed") == ["5_cat/none.png"]
    assert "GPU hiccup" in report.problems_with("caption_failed")[0].message
    assert report.problem_paths("unreadable") == ["5_cat/broken.png"]
    assert cap(ws, "none") is None
    assert cap(ws, "has") == "ok"


def test_unavailable_captioner_stops_without_writing(ws):
    class Missing:
        name = "missing"

        def caption(self, image):
            raise CaptionerUnavailable("install it")

    before = {n: cap(ws, n) for n in ("has", "none", "empty")}
    with pytest.raises(CaptionerUnavailable, match="install it"):
        ws.caption(Missing(), {"mode": "overwrite"})
    assert {n: cap(ws, n) for n in ("has", "none", "empty")} == before


def test_progress_and_stop(ws):
    seen = []
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 2

    report = ws.caption(FakeBlip(), {"mode": "overwrite"}, progress=lambda d, t: seen.append((d, t)), should_stop=stop)
    assert report.stopped
    assert report.written == 2
    assert seen == [(1, 3), (2, 3)]


def test_subset_of_images(ws):
    report = ws.caption(FakeBlip(), {"mode": "overwrite"}, images=["5_cat/none.png"])
    assert [r.path for r in report.results] == ["5_cat/none.png"]
    assert cap(ws, "has") == "cat, long hair, indoors"


def test_training_reads_what_the_pipeline_wrote(ws):
    ws.caption(FakeBlip(), {"mode": "overwrite", "trigger_words": "mycat"})
    items = scan_dataset(ws.path)
    assert {it.caption for it in items} == {"mycat, a photo of a cat"}
    assert not list(ws.path.rglob("*.caption"))


def test_bad_options():
    with pytest.raises(ConfigError, match="mode"):
        CaptionOptions.from_dict({"mode": "merge"})
    with pytest.raises(ConfigError, match="unknown"):
        CaptionOptions.from_dict({"treshold": 0.3})
    with pytest.raises(ConfigError, match="threshold"):
        CaptionOptions.from_dict({"threshold": 3})
    with pytest.raises(ConfigError, match="sort"):
        CaptionOptions.from_dict({"sort": "random"})
