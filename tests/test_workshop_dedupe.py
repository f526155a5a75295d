"""Exact and near duplicates: flagged, not removed, unless remove_exact."""

from __future__ import annotations

import io
import json
import shutil

import pytest
from PIL import Image

from lora_trainer.errors import DatasetError
from lora_trainer.workshop import Workspace
from lora_trainer.workshop.dedupe import dhash, hamming
from tests.fixtures.images import pattern, save


@pytest.fixture
def ws(tmp_path):
    ws = Workspace.create(tmp_path / "w", "ds")
    d = ws.path / "1_c"
    base = save(pattern((256, 192), seed=1), d / "base.png")
    shutil.copyfile(base, d / "exact_copy.png")
    (d / "exact_copy.txt").write_text("different caption", encoding="utf-8")
    (d / "base.txt").write_text("base caption", encoding="utf-8")
    buf = io.BytesIO()
    pattern((256, 192), seed=1).resize((200, 150), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=70)
    (d / "smaller_reencoded.jpg").write_bytes(buf.getvalue())
    save(pattern((256, 192), seed=2), d / "different.png")
    save(Image.new("RGB", (64, 64), (250, 250, 250)), d / "flat_white.png")
    save(Image.new("RGB", (64, 64), (20, 20, 20)), d / "flat_black.png")
    return ws


def test_hash_distances():
    a = pattern((256, 192), seed=1)
    b = a.resize((128, 96), Image.Resampling.BILINEAR)
    assert hamming(dhash(a), dhash(b)) <= 4
    assert hamming(dhash(a), dhash(pattern((256, 192), seed=2))) > 20


def test_exact_and_near_are_flagged_not_removed(ws):
    files_before = sorted(p.name for p in (ws.path / "1_c").iterdir())
    report = ws.find_duplicates()
    assert sorted(p.name for p in (ws.path / "1_c").iterdir()) == files_before
    assert [g.files for g in report.exact] == [["1_c/base.png", "1_c/exact_copy.png"]]
    assert [g.files for g in report.near] == [["1_c/base.png", "1_c/smaller_reencoded.jpg"]]
    assert report.near[0].keep == "1_c/base.png"  # the larger one
    flagged = report.flagged()
    assert "1_c/different.png" not in flagged
    assert "1_c/flat_white.png" not in flagged
    assert "1_c/flat_black.png" not in flagged
    assert report.images == 6
    json.dumps(report.to_dict())


def test_threshold_zero_only_identical_hashes(ws):
    report = ws.find_duplicates(threshold=0)
    assert report.exact
    assert all(g.distance == 0 for g in report.near)


def test_bad_threshold(ws):
    with pytest.raises(DatasetError, match="between 0 and 128"):
        ws.find_duplicates(threshold=200)


def test_remove_exact_moves_copy_aside(ws):
    report = ws.find_duplicates(remove_exact=True)
    assert report.removed == [
        {
            "path": "1_c/exact_copy.png",
            "moved_to": ".workshop/removed/1_c/exact_copy.png",
            "duplicate_of": "1_c/base.png",
        }
    ]
    assert not (ws.path / "1_c/exact_copy.png").exists()
    assert (ws.path / ".workshop/removed/1_c/exact_copy.txt").read_text(encoding="utf-8") == "different caption"
    assert report.problem_paths("caption_differs") == ["1_c/exact_copy.png"]
    again = ws.find_duplicates()
    assert again.exact == []
    assert again.images == 5


def test_fingerprints_are_cached(ws, monkeypatch):
    ws.find_duplicates()
    from lora_trainer.workshop import dedupe

    def boom(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(dedupe, "load_image_rgb", boom)
    assert ws.find_duplicates().images == 6
    # a changed file is decoded again (and only that one)
    save(pattern((256, 192), seed=9), ws.path / "1_c" / "different.png")
    report = ws.find_duplicates()
    assert report.problem_paths("unreadable") == ["1_c/different.png"]
    assert "decoded again" in report.problems[0].message


def test_unreadable_image_reported(ws):
    (ws.path / "1_c" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    report = ws.find_duplicates()
    assert report.problem_paths("unreadable") == ["1_c/broken.png"]
    assert report.images == 6


def test_near_groups_do_not_chain(tmp_path):
    """A morph from one picture to another: each step near the next, the ends far apart."""
    import numpy as np

    from lora_trainer.workshop.dedupe import DEFAULT_THRESHOLD, color_signature

    a = np.asarray(pattern((96, 64), seed=1).convert("L"), dtype=np.float32)
    b = np.asarray(pattern((96, 64), seed=2).convert("L"), dtype=np.float32)
    n = 24
    chain = [
        Image.fromarray(((1 - k / (n - 1)) * a + k / (n - 1) * b).astype(np.uint8)).convert("RGB") for k in range(n)
    ]
    hashes = [dhash(img) for img in chain]
    colors = [np.frombuffer(color_signature(img), dtype=np.uint8).astype(int) for img in chain]
    # The premise: every step is a near pair, the distance from the first grows, the ends are far apart.
    steps = [hamming(hashes[k], hashes[k + 1]) for k in range(n - 1)]
    assert max(steps) <= DEFAULT_THRESHOLD
    assert all(np.abs(colors[k] - colors[k + 1]).mean() <= 24 for k in range(n - 1))
    assert hamming(hashes[0], hashes[-1]) > 4 * DEFAULT_THRESHOLD
    assert hamming(hashes[0], hashes[n // 2]) > DEFAULT_THRESHOLD
    ws = Workspace.create(tmp_path / "w", "ds")
    for k, img in enumerate(chain):
        save(img, ws.path / "1_c" / f"step{k:02d}.png")

    report = ws.find_duplicates()
    assert len(report.near) > 1  # transitively, all 24 would be one group
    by_name = {f"1_c/step{k:02d}.png": hashes[k] for k in range(n)}
    grouped = [f for g in report.near for f in g.files]
    assert len(grouped) == len(set(grouped))  # no image in two groups
    for g in report.near:
        assert g.keep in g.files
        far = [f for f in g.files if hamming(by_name[f], by_name[g.keep]) > DEFAULT_THRESHOLD]
        assert far == [], f"{far} grouped with {g.keep} though not near it"
        assert g.distance == max(hamming(by_name[f], by_name[g.keep]) for f in g.files)
        assert g.distance <= DEFAULT_THRESHOLD
