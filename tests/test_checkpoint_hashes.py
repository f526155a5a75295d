"""The base checkpoint's hashes for ``ss_sd_model_hash`` / ``ss_new_sd_model_hash``."""

import hashlib

import pytest

from lora_trainer.files import hashes


@pytest.fixture
def checkpoint(tmp_path):
    data = bytes(range(256)) * (5 * 4096 + 7)  # about 5 MiB, not a whole number of chunks
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    return path, data


def test_hashes_of_the_file(checkpoint):
    path, data = checkpoint
    sha, legacy = hashes.checkpoint_hashes(path)
    assert sha == hashlib.sha256(data).hexdigest()
    # the WebUI's old hash: sha256 of the 64 KiB at offset 1 MiB, first 8 hex digits
    assert legacy == hashlib.sha256(data[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    assert len(legacy) == 8


def test_the_hosts_hashes_are_used_without_reading_the_file(checkpoint, monkeypatch):
    path, _ = checkpoint

    def refuse(_path):
        raise AssertionError("the checkpoint was read again")

    monkeypatch.setattr(hashes, "file_sha256", refuse)
    monkeypatch.setattr(hashes, "file_legacy_hash", refuse)
    assert hashes.checkpoint_hashes(path, sha256="ab" * 32, legacy="0123abcd") == ("ab" * 32, "0123abcd")
    # --no-hashing: the whole file is not read; the legacy hash (64 KiB) still is
    monkeypatch.undo()
    sha, legacy = hashes.checkpoint_hashes(path, read_sha256=False)
    assert sha == ""
    assert len(legacy) == 8


def test_missing_file_gives_what_the_host_knows(tmp_path):
    assert hashes.checkpoint_hashes(None) == ("", "")
    assert hashes.checkpoint_hashes(tmp_path / "gone.safetensors", sha256="x") == ("x", "")
