"""Tag editor: frequency, filters, bulk remove/replace/add, per-image captions, undo, atomic writes."""

from __future__ import annotations

import json
import os

import pytest

from lora_trainer.errors import ConfigError, DatasetError
from lora_trainer.workshop import Workspace, fsutil
from tests.fixtures.images import pattern, save

CAPTIONS = {
    "a": "mychar, blue eyes, long hair, smile",
    "b": "mychar, Blue_Eyes, short hair",
    "c": "mychar, red eyes, long hair",
    "d": None,  # no caption file
}


@pytest.fixture
def ws(tmp_path):
    ws = Workspace.create(tmp_path / "w", "ds")
    for i, (stem, text) in enumerate(CAPTIONS.items()):
        save(pattern((16, 16), i), ws.path / "10_mychar" / f"{stem}.png")
        if text is not None:
            (ws.path / "10_mychar" / f"{stem}.txt").write_text(text, encoding="utf-8")
    return ws


def captions(ws) -> dict[str, str | None]:
    out = {}
    for stem in CAPTIONS:
        p = ws.path / "10_mychar" / f"{stem}.txt"
        out[stem] = p.read_text(encoding="utf-8") if p.exists() else None
    return out


def test_tag_frequency(ws):
    stats = ws.tags()
    assert stats.images == 4
    assert stats.captioned == 3
    assert stats.as_dict() == {
        "mychar": 3,
        "blue eyes": 2,  # Blue_Eyes counts as the same tag
        "long hair": 2,
        "red eyes": 1,
        "short hair": 1,
        "smile": 1,
    }
    assert [t.tag for t in stats.tags][:1] == ["mychar"]  # most common first
    assert ws.tags(filter_tags=["long hair"]).as_dict()["long hair"] == 2
    json.dumps(stats.to_dict())


def test_list_images_with_filters(ws):
    assert ws.images().paths() == [f"10_mychar/{s}.png" for s in "abcd"]
    assert ws.images(filter_tags=["blue eyes"]).paths() == ["10_mychar/a.png", "10_mychar/b.png"]
    assert ws.images(filter_tags="blue eyes, long hair").paths() == ["10_mychar/a.png"]
    assert ws.images(without_tags=["mychar"]).paths() == ["10_mychar/d.png"]
    entry = ws.images(filter_tags=["smile"]).images[0]
    assert (entry.folder, entry.repeats, entry.concept, entry.has_caption) == ("10_mychar", 10, "mychar", True)
    d = ws.images(without_tags=["mychar"]).images[0]
    assert d.caption == ""
    assert not d.has_caption
    json.dumps(ws.images().to_dict())


def test_bulk_remove_binds_trait_and_undo(ws):
    before = captions(ws)
    report = ws.bulk_remove(["blue eyes"])
    assert report.changed == ["10_mychar/a.png", "10_mychar/b.png"]
    assert report.matched == 4
    assert captions(ws)["a"] == "mychar, long hair, smile"
    assert captions(ws)["b"] == "mychar, short hair"
    assert captions(ws)["d"] is None  # untouched, no file created
    assert ws.summary().undo["operation"] == "remove blue eyes"
    undo = ws.undo()
    assert undo.undone
    assert sorted(undo.restored) == ["10_mychar/a.png", "10_mychar/b.png"]
    assert captions(ws) == before
    assert not ws.undo().undone  # one level only


def test_bulk_remove_with_filter(ws):
    ws.bulk_remove(["long hair"], filter_tags=["red eyes"])
    assert captions(ws)["a"] == CAPTIONS["a"]
    assert captions(ws)["c"] == "mychar, red eyes"


def test_bulk_replace(ws):
    report = ws.bulk_replace({"long hair": "very long hair, ponytail", "smile": ""})
    assert captions(ws)["a"] == "mychar, blue eyes, very long hair, ponytail"
    assert captions(ws)["c"] == "mychar, red eyes, very long hair, ponytail"
    assert len(report.changed) == 2
    ws.bulk_replace({"blue eyes": "mychar"})  # replacement already present: not repeated
    assert captions(ws)["b"] == "mychar, short hair"


def test_bulk_add_start_end_and_filter(ws):
    ws.bulk_add(["sks"], filter_tags=["long hair"])
    assert captions(ws)["a"].startswith("sks, mychar")
    assert captions(ws)["c"].startswith("sks, ")
    assert "sks" not in captions(ws)["b"]
    ws.bulk_add("solo", position="end", without_tags=["sks"])
    assert captions(ws)["b"] == "mychar, Blue_Eyes, short hair, solo"
    assert captions(ws)["d"] == "solo"  # an image without caption gets a file
    ws.undo()
    assert captions(ws)["d"] is None
    assert captions(ws)["b"] == CAPTIONS["b"]
    assert captions(ws)["a"].startswith("sks, ")  # the earlier edit stays


def test_edit_that_changes_nothing_keeps_previous_undo(ws):
    ws.bulk_remove(["smile"])
    report = ws.bulk_remove(["not there"])
    assert report.changed == []
    assert ws.undo().operation == "remove smile"


def test_per_image_caption(ws):
    assert ws.get_caption("10_mychar/c.png") == CAPTIONS["c"]
    assert ws.get_caption("10_mychar/d.png") == ""
    assert ws.set_caption("10_mychar/d.png", "  new,\n caption  ") == "new, caption"
    assert captions(ws)["d"] == "new, caption"
    for bad in ("../outside.png", "/etc/passwd", ".workshop/undo.json", "10_mychar/nope.png", "C:/x.png"):
        with pytest.raises(DatasetError):
            ws.get_caption(bad)


def test_writes_are_atomic(ws, monkeypatch):
    """A crash in the middle of writing leaves the old caption, not half a file."""
    real_replace = os.replace

    def crash(*a, **k):
        raise OSError("disk gone")

    monkeypatch.setattr(fsutil.os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        ws.set_caption("10_mychar/a.png", "something else")
    monkeypatch.setattr(fsutil.os, "replace", real_replace)
    assert captions(ws)["a"] == CAPTIONS["a"]
    assert not [p for p in (ws.path / "10_mychar").iterdir() if p.name.startswith(".")]  # temp file removed


def test_undo_file_is_json_in_workshop_dir(ws):
    ws.bulk_remove("smile")
    data = json.loads((ws.path / ".workshop" / "undo.json").read_text(encoding="utf-8"))
    assert data["captions"] == {"10_mychar/a.png": CAPTIONS["a"]}


def test_undo_survives_deleted_image(ws):
    ws.bulk_remove("mychar")
    os.unlink(ws.path / "10_mychar" / "b.png")
    undo = ws.undo()
    assert undo.problem_paths("missing") == ["10_mychar/b.png"]
    assert captions(ws)["a"] == CAPTIONS["a"]


def test_bad_edits(ws):
    with pytest.raises(ConfigError):
        ws.bulk_remove([])
    with pytest.raises(ConfigError):
        ws.bulk_add(["x"], position="middle")
    with pytest.raises(ConfigError):
        ws.bulk_replace({})


def test_caption_files_are_read_everywhere(ws):
    """A ``.caption`` (kohya-trainer's BLIP step) is a caption for counts, stats, edits and "keep"
    captioning; an edit keeps its text in the new ``.txt``; a ``.txt`` beside it wins, with a note."""
    folder = ws.path / "10_mychar"
    (folder / "d.caption").write_text("a girl\x00 in a garden", encoding="utf-8")
    (folder / "a.caption").write_text("stale blip text", encoding="utf-8")
    assert ws.summary().captioned == 4
    assert ws.get_caption("10_mychar/d.png") == "a girl in a garden"
    stats = {t.tag: t.count for t in ws.tags().tags}
    assert stats["a girl in a garden"] == 1
    assert "stale blip text" not in stats
    report = ws.bulk_add("trigger")
    assert (folder / "d.txt").read_text(encoding="utf-8") == "trigger, a girl in a garden"
    assert (folder / "d.caption").exists()
    notes = {p.path: p for p in report.problems}
    assert notes["10_mychar/d.png"].code == "caption_converted"
    assert "d.caption" in notes["10_mychar/d.png"].message
    assert notes["10_mychar/a.png"].code == "caption_ignored"
    assert (folder / "a.txt").read_text(encoding="utf-8").startswith("trigger, mychar")
