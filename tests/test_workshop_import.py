"""Importing folders and uploaded files into a workspace (zips: test_workshop_zip.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from lora_trainer.errors import DatasetError
from lora_trainer.workshop import ImportLimits, Workspace
from tests.fixtures.files import tree_hashes
from tests.fixtures.images import RED, every_format, pattern, save


@pytest.fixture
def ws(tmp_path) -> Workspace:
    return Workspace.create(tmp_path / "workspaces", "ds")


def files_in(ws: Workspace) -> set[str]:
    out = set()
    for dirpath, dirnames, files in os.walk(ws.path):
        dirnames[:] = [d for d in dirnames if d != ".workshop"]
        for f in files:
            out.add((Path(dirpath) / f).relative_to(ws.path).as_posix())
    return out


@pytest.fixture
def source(tmp_path) -> Path:
    src = tmp_path / "photos"
    save(pattern(seed=1), src / "10_mychar" / "a.png")
    (src / "10_mychar" / "a.txt").write_text("mychar, red_hair", encoding="utf-8")
    save(pattern(seed=2), src / "10_mychar" / "a.jpg", quality=90)  # same stem as a.png
    save(pattern(seed=3), src / "10_mychar" / "deeper" / "b.jpeg")
    (src / "10_mychar" / "deeper" / "b.caption").write_text("blip caption", encoding="utf-8")
    save(pattern(seed=4), src / "3_style" / "c.png")
    (src / "3_style" / "c.txt").write_bytes("caf\xe9, na\xefve".encode("cp1252"))
    save(pattern(seed=5), src / "loose" / "d.webp", "WEBP")
    save(pattern(seed=6), src / "other" / "d.webp", "WEBP")  # same name, other folder
    (src / "other" / "notes.pdf").write_bytes(b"%PDF-1.4")
    (src / "other" / "empty.png").write_bytes(b"")
    (src / ".hidden.png").write_bytes(b"not really")
    (src / ".git").mkdir()
    save(pattern(seed=7), src / ".git" / "inside.png")
    (src / "orphan.txt").write_text("no image", encoding="utf-8")
    (src / "multi.png").write_bytes((src / "3_style" / "c.png").read_bytes())
    (src / "multi.txt").write_text("line one\nline two\n", encoding="utf-8")
    return src


def test_folder_import_layout_captions_and_report(ws, source):
    before = tree_hashes(source)
    report = ws.import_folder(source, repeats=2)
    assert tree_hashes(source) == before  # sources never modified (content and mode bits)

    got = files_in(ws)
    assert got == {
        "10_mychar/a.jpg",
        "10_mychar/a.txt",
        "10_mychar/a_2.png",
        "10_mychar/a_2.txt",
        "10_mychar/b.jpg",  # .jpeg -> .jpg
        "10_mychar/b.txt",  # from b.caption
        "3_style/c.png",
        "3_style/c.txt",
        "2_photos/d.webp",
        "2_photos/d_2.webp",
        "2_photos/multi.png",
        "2_photos/multi.txt",
    }
    ws_path = ws.path
    assert (ws_path / "10_mychar/a.txt").read_text(encoding="utf-8") == "mychar, red_hair"
    assert (ws_path / "10_mychar/a_2.txt").read_text(encoding="utf-8") == "mychar, red_hair"
    assert (ws_path / "10_mychar/b.txt").read_text(encoding="utf-8") == "blip caption"
    assert (ws_path / "3_style/c.txt").read_bytes() == "café, naïve".encode()
    assert (ws_path / "2_photos/multi.txt").read_text(encoding="utf-8") == "line one, line two"
    assert (ws_path / "3_style/c.png").read_bytes() == (source / "3_style/c.png").read_bytes()  # byte copy

    codes = {p.code for p in report.problems}
    assert {
        "hidden",
        "empty",
        "not_image",
        "orphan_caption",
        "renamed",
        "caption_converted",
        "caption_reencoded",
        "caption_multiline",
        "caption_shared",
    } <= codes
    assert report.problem_paths("empty") == [str(source / "other" / "empty.png")]
    assert str(source / ".git") in report.problem_paths("hidden")
    assert report.concept_folders == {"10_mychar": 3, "3_style": 1, "2_photos": 3}
    assert len(report.imported) == 7
    json.dumps(report.to_dict())  # JSON-friendly


def test_reimport_skips_identical_files(ws, source):
    ws.import_folder(source)
    second = ws.import_folder(source)
    assert second.imported == []
    assert len(second.problems_with("already_present")) == 7
    assert len([f for f in files_in(ws) if not f.endswith(".txt")]) == 7


def test_concept_and_repeats_for_plain_folders(ws, tmp_path):
    src = tmp_path / "plain"
    save(pattern(), src / "x.png")
    save(pattern(seed=1), src / "sub" / "y.png")
    report = ws.import_folder(src, concept="my thing", repeats=5)
    assert report.concept_folders == {"5_my thing": 2}
    assert files_in(ws) == {"5_my thing/x.png", "5_my thing/y.png"}


def test_root_folder_named_like_kohya(ws, tmp_path):
    src = tmp_path / "20_hero"
    save(pattern(), src / "x.png")
    assert ws.import_folder(src).concept_folders == {"20_hero": 1}


@pytest.mark.parametrize("content", ["nothing", "hidden_and_empty", "missing"])
def test_empty_source_gives_clear_error_and_writes_nothing(ws, tmp_path, content):
    src = tmp_path / "src"
    if content != "missing":
        src.mkdir()
    if content == "hidden_and_empty":
        (src / ".x.png").write_bytes(b"x")
        (src / "y.png").write_bytes(b"")
    with pytest.raises(DatasetError) as e:
        ws.import_folder(src)
    assert str(src) in str(e.value)
    if content == "hidden_and_empty":
        assert "empty" in str(e.value)
        assert "hidden" in str(e.value)
    assert files_in(ws) == set()


def test_importing_the_workspace_into_itself_is_refused(ws):
    save(pattern(), ws.path / "1_x" / "a.png")
    with pytest.raises(DatasetError, match="inside the workspace"):
        ws.import_folder(ws.path / "1_x")


def test_workspace_inside_source_is_not_imported_again(tmp_path):
    src = tmp_path / "src"
    save(pattern(), src / "a.png")
    ws = Workspace.create(src / "workspaces", "w")
    save(pattern(seed=2), ws.path / "1_old" / "old.png")
    report = ws.import_folder(src)
    assert [f.path for f in report.imported] == ["1_src/a.png"]


@pytest.mark.skipif(os.name == "nt" or os.geteuid() == 0, reason="needs POSIX permissions and a non-root user")
def test_unreadable_file_is_reported_not_fatal(ws, tmp_path):
    src = tmp_path / "src"
    save(pattern(), src / "ok.png")
    bad = save(pattern(seed=1), src / "locked.png")
    bad.chmod(0)
    try:
        report = ws.import_folder(src)
    finally:
        bad.chmod(0o644)
    assert [f.path for f in report.imported] == ["1_src/ok.png"]
    assert report.problem_paths("unreadable") == [str(bad)]
    assert not any(".tmp" in f for f in files_in(ws))


def test_unreadable_file_via_open_failure(ws, tmp_path, monkeypatch):
    """Same as above, for root: make opening one source file fail (sources are opened with os.open)."""
    src = tmp_path / "src"
    save(pattern(), src / "ok.png")
    bad = save(pattern(seed=1), src / "locked.png")
    real_open = os.open

    def fake_open(file, *a, **k):
        if Path(os.fspath(file)) == bad:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr(os, "open", fake_open)
    report = ws.import_folder(src)
    assert [f.path for f in report.imported] == ["1_src/ok.png"]
    [p] = report.problems_with("unreadable")
    assert p.path == str(bad)
    assert "Permission denied" in p.message
    assert p.severity == "error"


def test_per_file_size_limit(ws, tmp_path):
    src = tmp_path / "src"
    save(pattern((256, 256)), src / "big.bmp")
    save(pattern((8, 8)), src / "small.png")
    report = ws.import_folder(src, limits=ImportLimits(max_file_bytes=10_000))
    assert [f.path for f in report.imported] == ["1_src/small.png"]
    assert report.problem_paths("too_large") == [str(src / "big.bmp")]


def test_every_format_is_imported_as_is(ws, tmp_path):
    files = every_format(tmp_path / "src")
    report = ws.import_folder(tmp_path / "src")
    assert len(report.imported) == len(files)


def test_import_files_with_original_names(ws, tmp_path):
    up = tmp_path / "gradio_tmp"
    paths = [
        save(pattern(seed=1), up / "tmp1.png"),
        save(pattern(seed=2), up / "tmp2.png"),
        up / "tmp3",
        save(pattern(seed=3), up / "tmp4.png"),
        save(pattern(seed=4), up / "tmp5.png"),
    ]
    paths[2].write_text("cat, sitting", encoding="utf-8")
    names = ["Cat.png", "cat.PNG", "Cat.txt", "../../evil.png", "10_dog/rex.png"]
    before = tree_hashes(up)
    report = ws.import_files(paths, names, concept="pets", repeats=4)
    assert tree_hashes(up) == before
    assert files_in(ws) == {"4_pets/Cat.png", "4_pets/Cat.txt", "4_pets/cat_2.png", "10_dog/rex.png"}
    assert (ws.path / "4_pets/Cat.txt").read_text(encoding="utf-8") == "cat, sitting"
    assert report.problem_paths("zip_slip") == ["../../evil.png"]
    assert report.problem_paths("renamed") == ["cat.PNG"]  # case-insensitive collision


def test_unsafe_file_names_are_made_safe(ws, tmp_path):
    up = tmp_path / "up"
    p = save(pattern(), up / "x.png")
    report = ws.import_files([p, p], ['a<b>:c|"?.png', "CON.png"])
    assert sorted(f.path for f in report.imported) == ["1_images/_CON.png", "1_images/a_b__c___.png"]


def test_images_are_copied_not_decoded(ws, tmp_path):
    """Import copies bytes; even a broken image arrives (clean() deals with it)."""
    src = tmp_path / "src"
    (src).mkdir()
    (src / "broken.png").write_bytes(b"\x89PNG garbage")
    Image.new("RGB", (8, 8), RED).save(src / "ok.png")
    report = ws.import_folder(src)
    assert len(report.imported) == 2


def test_nul_bytes_in_captions_are_removed_with_a_note(tmp_path):
    src = tmp_path / "src"
    save(pattern((16, 16), 1), src / "a.png")
    (src / "a.txt").write_bytes(b"blue\x00 eyes\x00")
    ws = Workspace.create(tmp_path / "w", "ds")
    report = ws.import_folder(src, "x", 10)
    assert (ws.path / "10_x" / "a.txt").read_text(encoding="utf-8") == "blue eyes"
    assert [p.severity for p in report.problems_with("caption_nul")] == ["info"]


def _reimport_source(tmp_path) -> Path:
    src = tmp_path / "shoot"
    save(pattern(seed=11).convert("RGBA"), src / "5_hero" / "rgba.png")  # Clean flattens it
    save(pattern(seed=12), src / "5_hero" / "pic.webp", "WEBP")  # Clean converts it to .png
    (src / "5_hero" / "pic.txt").write_text("hero, smile", encoding="utf-8")
    save(pattern(seed=13), src / "5_hero" / "photo.jpg", quality=90)
    return src


def test_reimport_after_clean_and_resize_brings_no_second_copy(ws, tmp_path):
    src = _reimport_source(tmp_path)
    first = ws.import_folder(src)
    assert len(first.imported) == 3
    before = {f: (ws.path / f).read_bytes() for f in files_in(ws)}
    clean = ws.clean()
    assert clean.converted >= 2
    ws.resize_fixed(48)  # rewrites every image (photo.jpg becomes photo.png)
    cleaned = {f: (ws.path / f).read_bytes() for f in files_in(ws)}
    assert set(cleaned) != set(before)  # the copies were renamed ...
    assert all(cleaned[f] != before[f] for f in before.keys() & cleaned.keys() if not f.endswith(".txt"))

    second = ws.import_folder(src)
    assert second.imported == []
    assert {f: (ws.path / f).read_bytes() for f in files_in(ws)} == cleaned  # nothing new, nothing changed
    notes = second.problems_with("already_present")
    assert len(notes) == 3
    assert {n.message.split(" as ")[1].split(" ")[0] for n in notes} == {
        "5_hero/rgba.png",
        "5_hero/pic.png",
        "5_hero/photo.png",
    }
    assert "3 already in the workspace" in second.summary()


def test_reimport_record_follows_a_repeats_change_and_a_deleted_copy_comes_back(ws, tmp_path):
    src = _reimport_source(tmp_path)
    ws.import_folder(src)
    ws.clean()
    assert ws.set_repeats("5_hero", 2) == "2_hero"
    (ws.path / "2_hero" / "pic.png").unlink()  # the user deleted one copy: importing again restores it
    again = ws.import_folder(src)
    assert [f.path for f in again.imported] == ["5_hero/pic.webp"]
    assert len(again.problems_with("already_present")) == 2


def test_the_same_source_into_another_concept_is_a_new_copy(ws, tmp_path):
    src = _reimport_source(tmp_path)
    ws.import_folder(src)
    other = ws.import_folder(src / "5_hero", concept="villain")  # the folder's own name sets the concept ...
    assert other.imported == []
    moved = tmp_path / "villain"
    (src / "5_hero").rename(moved)  # ... so the same files under another concept folder name
    again = ws.import_folder(moved)
    assert sorted(f.path for f in again.imported) == ["1_villain/photo.jpg", "1_villain/pic.webp", "1_villain/rgba.png"]


def test_reimport_after_removing_exact_duplicates_brings_none_back(ws, tmp_path):
    src = tmp_path / "twins"
    save(pattern(seed=21), src / "a.png")
    (src / "b.png").write_bytes((src / "a.png").read_bytes())
    ws.import_folder(src)
    report = ws.find_duplicates(remove_exact=True)
    assert len(report.removed) == 1
    again = ws.import_folder(src)
    assert again.imported == []
    assert len([f for f in files_in(ws) if f.endswith(".png")]) == 1
