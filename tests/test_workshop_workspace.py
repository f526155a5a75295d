"""The Workspace as a whole: creation, reopening, summary, the full flow into training, import rules."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lora_trainer.data.scan import scan_dataset
from lora_trainer.errors import DatasetError
from lora_trainer.workshop import Workspace
from tests.fixtures.files import tree_hashes
from tests.fixtures.images import every_format, pattern, save

REPO = Path(__file__).resolve().parents[1]


def test_create_open_list(tmp_path):
    root = tmp_path / "workspaces"
    ws = Workspace.create(root, "My set 1")
    assert ws.path == (root / "My set 1").absolute()
    assert (ws.path / ".workshop" / "state.json").is_file()
    assert Workspace.list_workspaces(root) == ["My set 1"]
    assert Workspace.open(root / "My set 1").name == "My set 1"
    with pytest.raises(DatasetError, match="No workspace"):
        Workspace.open(root / "nope")
    for bad in ("../up", "a/b", ".hidden", "", "x:y", "con?"):
        with pytest.raises(DatasetError, match="cannot be a workspace name"):
            Workspace.create(root, bad)
    assert not (tmp_path / "up").exists()


def test_user_folders_are_never_adopted(tmp_path):
    user = tmp_path / "workspaces" / "photos"
    save(pattern(), user / "10_me" / "a.png")
    before = tree_hashes(user)
    with pytest.raises(DatasetError, match="not a workspace"):
        Workspace.create(tmp_path / "workspaces", "photos")
    with pytest.raises(DatasetError, match="No workspace"):
        Workspace.open(user)
    assert tree_hashes(user) == before
    assert not (user / ".workshop").exists()
    (tmp_path / "workspaces" / "empty").mkdir()
    assert Workspace.create(tmp_path / "workspaces", "empty").summary().images == 0


def test_state_lives_on_disk(tmp_path):
    src = tmp_path / "src"
    save(pattern(), src / "a.png")
    ws = Workspace.create(tmp_path / "w", "ds")
    ws.import_folder(src, repeats=3)
    ws.bulk_add(["x"])
    again = Workspace.open(ws.path)  # a fresh object, as after a UI reload
    s = again.summary()
    assert s.images == 1
    assert s.captioned == 1
    assert [(c.folder, c.repeats, c.images) for c in s.concepts] == [("3_src", 3, 1)]
    assert s.undo["operation"] == "add x"
    assert s.imports[0]["images"] == 1
    json.dumps(s.to_dict())


def test_set_repeats(tmp_path):
    ws = Workspace.create(tmp_path / "w", "ds")
    save(pattern(), ws.path / "3_a" / "x.png")
    save(pattern(), ws.path / "5_b" / "y.png")
    assert ws.set_repeats("3_a", 8) == "8_a"
    assert (ws.path / "8_a" / "x.png").exists()
    assert ws.set_repeats("5_b", 5) == "5_b"  # unchanged
    save(pattern(), ws.path / "5_a" / "z.png")
    with pytest.raises(DatasetError, match="already exists"):
        ws.set_repeats("8_a", 5)
    with pytest.raises(DatasetError, match="No concept folder"):
        ws.set_repeats("../x", 2)
    with pytest.raises(DatasetError, match="at least 1"):
        ws.set_repeats("8_a", 0)


def test_full_flow_feeds_training(tmp_path):
    src = tmp_path / "src"
    every_format(src / "10_hero")
    (src / "10_hero" / "web.caption").write_text("hero, from blip", encoding="utf-8")
    save(pattern(seed=50), src / "2_bg" / "bg.png")
    (src / "2_bg" / "bg.txt").write_bytes("arri\xe8re-plan".encode("cp1252"))
    before = tree_hashes(src)

    ws = Workspace.create(tmp_path / "w", "ds")
    reports = [ws.import_folder(src), ws.clean(), ws.find_duplicates(), ws.bucket_report(256, min_bucket_reso=64)]
    reports.append(ws.bulk_add(["hero"], filter_tags=None, without_tags=["arrière-plan"]))
    reports.append(ws.advise(epochs=10, batch_size=2))
    reports.append(ws.tags())
    reports.append(ws.images())
    for r in reports:
        json.loads(json.dumps(r.to_dict()))
    assert tree_hashes(src) == before

    items = scan_dataset(ws.path)
    by_name = {Path(it.path).name: it for it in items}
    assert len(items) == 16
    assert by_name["web.png"].caption == "hero, from blip"
    assert by_name["web.png"].repeats == 10
    assert by_name["bg.png"].caption == "arrière-plan"
    assert by_name["bg.png"].repeats == 2
    assert by_name["rgb.png"].caption == "hero"
    assert items.report.non_utf8_captions == []
    assert items.report.missing_captions == []
    assert set(items.report.subsets) == {"10_hero", "2_bg"}


_BOUNDARY = """
import sys
for name in ("modules", "gradio", "onnxruntime", "huggingface_hub"):
    sys.modules[name] = None
import lora_trainer.workshop as w
from lora_trainer.workshop import wd14, workspace, captioning, importer, cleaning, dedupe, sizing, tags, advisor
assert w.WD14Captioner(model_dir=".").name == "wd14"
print("ok")
"""


def test_import_boundary():
    """The workshop imports neither the WebUI, gradio, nor the optional WD14 packages at import time."""
    out = subprocess.run(
        [sys.executable, "-c", _BOUNDARY], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_one_operation_at_a_time(tmp_path):
    """busy() holds the folder for every Workspace object of it; a second operation is refused."""
    ws = Workspace.create(tmp_path, "lock")
    same = Workspace.open(tmp_path / "lock")
    other = Workspace.create(tmp_path, "other")
    assert ws.running() is None
    assert not ws.request_stop()
    with ws.busy("captioning with Stub") as stop:
        assert same.running() == "captioning with Stub"
        assert other.running() is None
        with pytest.raises(DatasetError, match=r"busy \(captioning with Stub\)"), same.busy("cleaning"):
            pass
        with other.busy("cleaning"):
            pass
        assert not same.request_stop("cleaning")
        assert not stop.is_set()
        assert same.request_stop("captioning")
        assert stop.is_set()
    assert ws.running() is None
    with same.busy("cleaning") as stop:
        assert not stop.is_set()  # a fresh stop request per operation
