"""Hostile file names and file types (issue 9, points 1-4), each case built here at test time.

Names that are not valid UTF-8, long multi-byte names, links (to files outside the source, to
folders) and special files (FIFOs) in an imported folder, in a workspace and in a training folder.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from lora_trainer.data.scan import dataset_tag_frequency, scan_dataset
from lora_trainer.workshop import Workspace
from lora_trainer.workshop.fsutil import MAX_STEM_BYTES, safe_name
from tests.fixtures.images import pattern, save

posix_only = pytest.mark.skipif(os.name != "posix", reason="needs POSIX file names, links and FIFOs")
SECRET = "root:x:0:0:SECRET-PASSWD-LINE:/root:/bin/bash"


@pytest.fixture
def ws(tmp_path) -> Workspace:
    return Workspace.create(tmp_path / "workspaces", "ds")


@pytest.fixture
def secret(tmp_path) -> Path:
    """A passwd-like file outside every source."""
    p = tmp_path / "outside" / "passwd"
    p.parent.mkdir()
    p.write_text(SECRET + "\n", encoding="utf-8")
    return p


def _bytes_path(folder: Path, name: bytes) -> Path:
    return Path(os.fsdecode(os.path.join(os.fsencode(folder), name)))


def _all_text(root: Path) -> str:
    """Every file's bytes under ``root`` (state included), as one string."""
    out = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            out.append(Path(dirpath, f).read_bytes().decode("utf-8", "replace"))
    return "\n".join(out)


def _run_with_timeout(fn, seconds: float = 20.0):
    """``fn()`` in a thread; fail (instead of hanging the suite) when it does not return in time."""
    result: dict = {}

    def target():
        try:
            result["value"] = fn()
        except Exception as e:  # noqa: BLE001 - handed to the test thread and re-raised there
            result["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "the call hung (it opened a FIFO?)"
    if "error" in result:
        raise result["error"]
    return result["value"]


# -- 1. names that are not valid UTF-8 --------------------------------------------------------------


@posix_only
def test_undecodable_name_gets_a_safe_name_at_import(ws, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    try:
        save(pattern(), _bytes_path(src, b"caf\xe9.png"))
    except (UnicodeEncodeError, OSError):
        pytest.skip("the file system does not take names that are not UTF-8")
    _bytes_path(src, b"caf\xe9.txt").write_text("cafe, cup", encoding="utf-8")
    report = ws.import_folder(src)
    [img] = report.imported
    assert img.path == "1_src/café.png"
    [note] = report.problems_with("renamed")
    assert "was saved as 1_src/café.png because its name was not valid UTF-8" in note.message
    assert (ws.path / "1_src" / "café.txt").read_text(encoding="utf-8") == "cafe, cup"
    ws.clean()
    ws.find_duplicates()
    ws.bulk_add(["x"])


@posix_only
def test_undecodable_names_placed_in_a_workspace_break_no_step(ws):
    folder = ws.path / "10_a"
    try:
        save(pattern(seed=1), _bytes_path(folder, b"caf\xe9.png"))
        save(pattern(seed=2), _bytes_path(folder, b"\xff\xfe.png"))
        sub = _bytes_path(folder, b"sub\xe9")
        save(pattern(seed=3), sub / "x.png")
    except (UnicodeEncodeError, OSError):
        pytest.skip("the file system does not take names that are not UTF-8")
    _bytes_path(folder, b"caf\xe9.txt").write_text("a, b", encoding="utf-8")
    ws.clean()
    ws.find_duplicates()
    ws.bulk_add(["x"])
    ws.bulk_remove(["a"])
    ws.bulk_replace({"b": "c"})
    ws.undo()
    listed = [i.path for i in ws.images().images]
    for p in listed:
        p.encode("utf-8")  # every name the workshop shows is valid UTF-8
    assert "10_a/café.png" in listed
    assert "10_a/subé/x.png" in listed
    assert (ws.path / "10_a" / "café.txt").is_file()  # the caption went along with its image
    json.dumps(ws.summary().__dict__, default=str).encode("utf-8")


def test_json_stores_take_any_name(tmp_path):
    from lora_trainer.workshop.fsutil import atomic_write_json

    atomic_write_json(tmp_path / "s.json", {"caf\udce9.png": 1})
    assert json.loads((tmp_path / "s.json").read_text(encoding="ascii")) == {"caf\udce9.png": 1}


# -- 2. long multi-byte names -----------------------------------------------------------------------


def test_safe_name_caps_bytes_not_characters():
    name = safe_name("字" * 120)
    assert len(name.encode("utf-8")) <= MAX_STEM_BYTES
    assert name == "字" * (MAX_STEM_BYTES // 3)
    # room for an extension, a collision suffix and the atomic writer's temp name
    temp = f".{name}_999.webp.abcdefgh.tmp"
    assert len(temp.encode("utf-8")) <= 255


@pytest.mark.parametrize("chars", [79, 83])
def test_long_cjk_names_import_clean_and_edit(ws, tmp_path, chars):
    src = tmp_path / "src"
    long = "字" * chars
    save(pattern(), src / f"{long}.png")
    (src / f"{long}.txt").write_text("tag", encoding="utf-8")
    report = ws.import_folder(src)
    [img] = report.imported
    assert len(Path(img.path).name.encode("utf-8")) <= MAX_STEM_BYTES + 4
    [note] = report.problems_with("renamed")
    assert f"longer than {MAX_STEM_BYTES} bytes" in note.message
    assert ws.clean().problems_with("unexpected") == []
    ws.resize_fixed(32, 32)
    ws.bulk_add(["x"])


def test_long_names_placed_in_a_workspace_still_get_temp_files(ws):
    long = "字" * 83  # 249 bytes + ".png": at the 255-byte limit
    save(pattern(), ws.path / "10_a" / f"{long}.png")
    ws.bulk_add(["x"])  # writes <long>.txt through a temp file beside it
    assert (ws.path / "10_a" / f"{long}.txt").read_text(encoding="utf-8") == "x"
    ws.clean()
    ws.find_duplicates()


# -- 3. links ---------------------------------------------------------------------------------------


@posix_only
def test_links_are_skipped_with_a_note(ws, tmp_path, secret):
    src = tmp_path / "src"
    save(pattern(), src / "leak.png")
    os.symlink(secret, src / "leak.txt")
    os.symlink(secret, src / "x.png")
    save(pattern(seed=5), src / "real.png")
    os.symlink(src / "real.png", src / "inside.png")
    report = ws.import_folder(src)
    assert sorted(f.path for f in report.imported) == ["1_src/leak.png", "1_src/real.png"]
    notes = {Path(p.path).name: p.message for p in report.problems_with("symlink")}
    assert set(notes) == {"leak.txt", "x.png", "inside.png"}
    assert "it is a link (links are not followed" in notes["leak.txt"]
    assert SECRET not in _all_text(ws.path)
    assert not (ws.path / "1_src" / "leak.txt").exists()


@posix_only
def test_follow_links_only_to_files_inside_the_source(ws, tmp_path, secret):
    src = tmp_path / "src"
    save(pattern(), src / "leak.png")
    os.symlink(secret, src / "leak.txt")
    os.symlink(secret, src / "x.png")
    save(pattern(seed=5), src / "store" / "real.png")
    (src / "store" / "real.txt").write_text("inside caption", encoding="utf-8")
    os.symlink(src / "store" / "real.png", src / "alias.png")
    os.symlink(src / "store" / "real.txt", src / "alias.txt")
    report = ws.import_folder(src, follow_links=True)
    assert sorted(f.path for f in report.imported) == ["1_src/alias.png", "1_src/leak.png", "1_src/real.png"]
    outside = sorted(Path(p.path).name for p in report.problems_with("symlink_outside"))
    assert outside == ["leak.txt", "x.png"]
    assert all("a link to a file outside" in p.message for p in report.problems_with("symlink_outside"))
    assert (ws.path / "1_src" / "alias.txt").read_text(encoding="utf-8") == "inside caption"
    assert SECRET not in _all_text(ws.path)


@posix_only
def test_training_scan_never_reads_links_outside_the_dataset(tmp_path, secret):
    root = tmp_path / "train"
    save(pattern(), root / "10_sks" / "leak.png")
    os.symlink(secret, root / "10_sks" / "leak.txt")
    os.symlink(secret, root / "10_sks" / "x.png")
    save(pattern(seed=2), root / "10_sks" / "ok.png")
    (root / "10_sks" / "ok.txt").write_text("ok tag", encoding="utf-8")
    os.symlink(root / "10_sks" / "ok.txt", root / "10_sks" / "inside.txt")
    save(pattern(seed=3), root / "10_sks" / "inside.png")
    os.symlink(secret.parent, root / "10_sks" / "linkdir")
    items = scan_dataset(root)
    by_name = {i.path.name: i.caption for i in items}
    assert by_name == {"leak.png": "sks", "ok.png": "ok tag", "inside.png": "ok tag"}
    freq = json.dumps(dataset_tag_frequency(items))
    assert "SECRET" not in freq
    assert "root:x" not in freq
    skipped = {p.name: why for p, why in items.report.skipped_files}
    assert "link to a file outside the dataset folder" in skipped["leak.txt"]
    assert "x.png" in skipped
    assert any("Skipped " in w and "leak.txt" in w for w in items.report.warnings())
    assert any(p.name == "linkdir" for p, _ in items.report.skipped_folders)


@posix_only
def test_training_subset_folder_may_be_a_link(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    save(pattern(), elsewhere / "a.png")
    (elsewhere / "a.txt").write_text("far tag", encoding="utf-8")
    root = tmp_path / "train"
    root.mkdir()
    os.symlink(elsewhere, root / "5_far")
    [item] = scan_dataset(root)
    assert item.caption == "far tag"


# -- 4. special files -------------------------------------------------------------------------------

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")


@needs_fifo
def test_fifo_caption_does_not_hang_the_import(ws, tmp_path):
    src = tmp_path / "src"
    save(pattern(), src / "a.png")
    os.mkfifo(src / "a.txt")
    os.mkfifo(src / "b.png")
    report = _run_with_timeout(lambda: ws.import_folder(src))
    assert [f.path for f in report.imported] == ["1_src/a.png"]
    notes = {Path(p.path).name: p.message for p in report.problems_with("special_file")}
    assert set(notes) == {"a.txt", "b.png"}
    assert "it is a FIFO (named pipe), not a file; only regular files are read" in notes["a.txt"]
    assert ws.running() is None
    follow = _run_with_timeout(lambda: ws.import_folder(src, follow_links=True))
    assert follow.problems_with("special_file")


@needs_fifo
def test_fifo_link_inside_the_source_is_not_opened(ws, tmp_path):
    src = tmp_path / "src"
    save(pattern(), src / "a.png")
    os.mkfifo(src / "pipe")
    os.symlink(src / "pipe", src / "a.txt")
    report = _run_with_timeout(lambda: ws.import_folder(src, follow_links=True))
    assert sorted(Path(p.path).name for p in report.problems_with("special_file")) == ["a.txt", "pipe"]


@needs_fifo
def test_fifo_in_a_workspace_and_a_training_folder_hangs_nothing(ws, tmp_path):
    save(pattern(), ws.path / "10_a" / "a.png")
    os.mkfifo(ws.path / "10_a" / "b.png")
    _run_with_timeout(lambda: ws.clean())
    assert [i.path for i in _run_with_timeout(lambda: ws.images()).images] == ["10_a/a.png"]
    root = tmp_path / "train"
    save(pattern(), root / "3_x" / "a.png")
    os.mkfifo(root / "3_x" / "a.txt")
    os.mkfifo(root / "3_x" / "c.png")
    items = _run_with_timeout(lambda: scan_dataset(root))
    assert [(i.path.name, i.caption) for i in items] == [("a.png", "x")]
    skipped = {p.name: why for p, why in items.report.skipped_files}
    assert skipped["a.txt"] == "it is a FIFO (named pipe), not a file; only regular files are read"
    assert "c.png" in skipped
