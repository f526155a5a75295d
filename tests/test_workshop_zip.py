"""Zip imports, friendly and hostile: zip-slip names, symlinks, bombs, too many members."""

from __future__ import annotations

import io
import os
import stat
import zipfile
from pathlib import Path

import pytest

from lora_trainer.errors import DatasetError
from lora_trainer.workshop import ImportLimits, Workspace
from tests.fixtures.images import pattern


def png_bytes(seed=0, size=(48, 32)) -> bytes:
    buf = io.BytesIO()
    pattern(size, seed).save(buf, "PNG")
    return buf.getvalue()


def make_zip(path: Path, members: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
    return path


def all_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def ws(tmp_path) -> Workspace:
    return Workspace.create(tmp_path / "sandbox" / "workspaces", "ds")


def test_friendly_zip(ws, tmp_path):
    z = make_zip(
        tmp_path / "set.zip",
        {
            "set/5_cat/a.png": png_bytes(1),
            "set/5_cat/a.caption": b"a cat",
            "set/other/b.png": png_bytes(2),
            "__MACOSX/set/5_cat/._a.png": b"resource fork",
            "set/readme.md": b"hello",
        },
    )
    before = z.read_bytes()
    report = ws.import_zip(z, repeats=2)
    assert z.read_bytes() == before
    assert {f.path for f in report.imported} == {"5_cat/a.png", "2_set/b.png"}
    assert (ws.path / "5_cat" / "a.txt").read_text(encoding="utf-8") == "a cat"
    assert (ws.path / "5_cat" / "a.png").read_bytes() == png_bytes(1)
    assert {"hidden", "not_image", "caption_converted"} <= report.codes()
    assert report.source == "set.zip"


@pytest.mark.parametrize(
    "name",
    [
        "../evil.png",
        "ok/../../evil.png",
        "..\\evil.png",
        "/abs/evil.png",
        "\\abs\\evil.png",
        "C:/evil.png",
        "c:\\windows\\evil.png",
    ],
)
def test_zip_slip_members_are_rejected(ws, tmp_path, name):
    z = make_zip(tmp_path / "in" / "evil.zip", {name: png_bytes(1), "good.png": png_bytes(2)})
    sandbox = tmp_path / "sandbox"
    before = all_files(tmp_path)
    report = ws.import_zip(z)
    assert [f.path for f in report.imported] == ["1_evil/good.png"]
    [p] = report.problems_with("zip_slip")
    assert name in p.path
    assert p.severity == "error"
    # nothing new anywhere but inside the workspace
    new = all_files(tmp_path) - before
    assert all((tmp_path / f).resolve().is_relative_to(ws.path.resolve()) for f in new), new
    assert not any("evil.png" in f for f in all_files(sandbox))


def test_symlink_member_is_rejected(ws, tmp_path):
    z = tmp_path / "link.zip"
    with zipfile.ZipFile(z, "w") as zf:
        info = zipfile.ZipInfo("link.png")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
        zf.writestr("real.png", png_bytes(3))
    report = ws.import_zip(z)
    assert report.problem_paths("zip_symlink") == ["link.zip:link.png"]
    assert [f.path for f in report.imported] == ["1_link/real.png"]
    assert not (ws.path / "1_link" / "link.png").exists()


def test_zip_bomb_ratio_is_refused_before_writing(ws, tmp_path):
    z = make_zip(tmp_path / "bomb.zip", {"ok.png": png_bytes(1), "huge.bmp": b"\0" * (40 << 20)})
    assert z.stat().st_size < 200_000  # 40 MiB of zeros squeezed small
    with pytest.raises(DatasetError) as e:
        ws.import_zip(z)
    msg = str(e.value)
    assert "bomb.zip" in msg
    assert "huge.bmp" in msg
    assert "zip bomb" in msg
    assert all_files(ws.path) == {".workshop/state.json"}


def test_zip_total_size_and_member_count_limits(ws, tmp_path):
    z = make_zip(tmp_path / "many.zip", {f"{i}.png": png_bytes(i) for i in range(6)})
    with pytest.raises(DatasetError, match="6 entries, more than the limit of 5"):
        ws.import_zip(z, limits=ImportLimits(max_members=5))
    with pytest.raises(DatasetError, match="would unpack to"):
        ws.import_zip(z, limits=ImportLimits(max_total_bytes=1000))
    assert all_files(ws.path) == {".workshop/state.json"}
    assert len(ws.import_zip(z).imported) == 6


def test_per_member_size_limit_skips_member(ws, tmp_path):
    z = make_zip(tmp_path / "sizes.zip", {"big.png": png_bytes(1, (256, 256)), "small.png": png_bytes(2, (8, 8))})
    report = ws.import_zip(z, limits=ImportLimits(max_file_bytes=5000))
    assert [f.path for f in report.imported] == ["1_sizes/small.png"]
    assert report.problem_paths("too_large") == ["sizes.zip:big.png"]


def test_corrupt_member_is_reported_not_written(ws, tmp_path):
    """A member whose data does not match its CRC is reported; its partial copy is removed."""
    z = make_zip(tmp_path / "liar.zip", {"a.png": png_bytes(1), "b.png": png_bytes(2)}, zipfile.ZIP_STORED)
    data = bytearray(z.read_bytes())
    # corrupt the stored data so the CRC check fails
    idx = data.find(b"IHDR")
    data[idx + 8] ^= 0xFF
    z.write_bytes(bytes(data))
    report = ws.import_zip(z)
    assert [f.path for f in report.imported] == ["1_liar/b.png"]
    [p] = report.problems_with("corrupt_member")
    assert p.path == "liar.zip:a.png"
    assert "CRC" in p.message
    assert {f for f in all_files(ws.path) if not f.startswith(".workshop")} == {"1_liar/b.png"}


def test_not_a_zip(ws, tmp_path):
    p = tmp_path / "fake.zip"
    p.write_bytes(b"PK but not really")
    with pytest.raises(DatasetError, match=r"fake\.zip.*not a readable zip"):
        ws.import_zip(p)
    with pytest.raises(DatasetError, match="does not exist"):
        ws.import_zip(tmp_path / "missing.zip")


def test_empty_zip(ws, tmp_path):
    z = make_zip(tmp_path / "empty.zip", {"notes.txt": b"x"})
    with pytest.raises(DatasetError, match=r"No images could be imported from zip empty\.zip"):
        ws.import_zip(z)


def test_uploaded_zip_among_files(ws, tmp_path):
    z = make_zip(tmp_path / "upload_123", {"10_dog/rex.png": png_bytes(1)})
    img = tmp_path / "upload_456"
    img.write_bytes(png_bytes(2))
    report = ws.import_files([z, img], ["dogs.zip", "solo.png"], concept="misc")
    assert {f.path for f in report.imported} == {"10_dog/rex.png", "1_misc/solo.png"}
    assert os.path.exists(z)
    assert os.path.exists(img)


def zeros_zip(path: Path, members: int, size: int) -> Path:
    """A zip of ``members`` flat BMP-named files of ``size`` zeros each: a bomb made of many small members."""
    return make_zip(path, {f"z{i:02d}.bmp": b"\0" * size for i in range(members)})


def test_zip_of_many_small_bombs_is_refused_before_writing(ws, tmp_path):
    z = zeros_zip(tmp_path / "many.zip", 40, 64 << 10)  # 2.5 MiB of zeros, each member under ratio_min_bytes
    limits = ImportLimits(ratio_min_bytes=256 << 10)
    with pytest.raises(DatasetError) as e:
        ws.import_zip(z, limits=limits)
    msg = str(e.value)
    assert "many.zip" in msg
    assert "2.5 MiB" in msg
    assert "zip bombs" in msg
    assert "Nothing from it was imported" in msg
    assert all_files(ws.path) == {".workshop/state.json"}
    with pytest.raises(DatasetError, match="would unpack to 2 MiB, more than the limit of 1 MiB"):
        ws.import_zip(z, limits=ImportLimits(max_total_bytes=1 << 20, ratio_min_bytes=256 << 10, max_ratio=1e9))
    assert all_files(ws.path) == {".workshop/state.json"}


def test_zip_that_unpacks_past_its_declared_sizes_is_stopped_and_cleaned_up(ws, tmp_path, monkeypatch):
    import lora_trainer.workshop.import_sources as sources

    # Declared sizes that pass the check but lie: the bytes actually written are counted and stop the import.
    monkeypatch.setattr(sources, "_check_zip_limits", lambda *a, **k: None)
    z = make_zip(tmp_path / "liar.zip", {**{f"a{i}.png": png_bytes(i) for i in range(3)}, "a3.txt": b"cap"})
    with zipfile.ZipFile(z, "a", zipfile.ZIP_DEFLATED) as zf:
        for i in range(40):
            zf.writestr(f"z{i:02d}.bmp", b"\0" * (64 << 10))
    with pytest.raises(DatasetError, match="unpack to more than they declare") as e:
        ws.import_zip(z, limits=ImportLimits(max_total_bytes=1 << 20))
    assert "liar.zip" in str(e.value)
    assert "more than the limit of 1 MiB in all" in str(e.value)
    with pytest.raises(DatasetError, match="times its own size"):
        ws.import_zip(z, limits=ImportLimits(ratio_min_bytes=256 << 10, max_ratio=5))
    assert all_files(ws.path) == {".workshop/state.json"}  # the images written before the stop are gone
    assert not any(p.is_dir() for p in ws.path.iterdir() if p.name != ".workshop")


def test_zip_members_read_twice_are_counted_once(ws, tmp_path):
    z = make_zip(tmp_path / "again.zip", {f"{i}.png": png_bytes(i) for i in range(4)})
    total = sum(i.file_size for i in zipfile.ZipFile(z).infolist())
    limits = ImportLimits(max_total_bytes=total, ratio_min_bytes=0)
    assert len(ws.import_zip(z, limits=limits).imported) == 4
    report = ws.import_zip(z, limits=limits)  # compares every member with its copy: read, not written
    assert report.imported == []
