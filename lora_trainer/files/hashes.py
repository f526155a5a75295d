"""File and model hashes: kohya's ``sshs_model_hash`` / ``sshs_legacy_hash``, the old A1111 hash, plain sha256.

:func:`compute_hashes` / :func:`hashes_from_bytes` are kohya's ``precalculate_safetensors_hashes``:
the sha256 of a safetensors buffer's data section, and the short legacy hash of 64 KiB at 1 MiB.
:func:`file_data_sha256` and :func:`file_legacy_hash` hash a file on disk the same way;
:func:`file_sha256` is the sha256 of a whole file's bytes (images, caches).
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Mapping

import safetensors.torch
import torch

from lora_trainer.files.safetensors_format import read_safetensors_header

__all__ = [
    "checkpoint_hashes",
    "compute_hashes",
    "file_data_sha256",
    "file_legacy_hash",
    "file_sha256",
    "hashed_metadata",
    "hashes_from_bytes",
]

_LEGACY_OFFSET = 0x100000
_LEGACY_LENGTH = 0x10000
_CHUNK = 1 << 20


def hashes_from_bytes(buffer: bytes | bytearray | memoryview) -> tuple[str, str]:
    """(addnet model hash, addnet legacy hash) of one serialized safetensors buffer."""
    view = memoryview(buffer)
    if len(view) < 8:
        raise ValueError("not a safetensors buffer: shorter than 8 bytes")
    (n,) = struct.unpack("<Q", view[:8])
    model_hash = hashlib.sha256(view[8 + n :]).hexdigest()
    legacy_hash = hashlib.sha256(view[_LEGACY_OFFSET : _LEGACY_OFFSET + _LEGACY_LENGTH]).hexdigest()[:8]
    return model_hash, legacy_hash


def hashed_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """The metadata kohya serializes for its hashes: the ``ss_*`` keys only."""
    return {k: v for k, v in (metadata or {}).items() if k.startswith("ss_")}


def _cpu_contiguous(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}


def compute_hashes(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> tuple[str, str]:
    """``(sshs_model_hash, sshs_legacy_hash)`` as kohya's ``precalculate_safetensors_hashes``.

    The tensors are hashed as given (pass them in the save dtype). Only the ``ss_*`` metadata
    enters the serialization, so ``modelspec.*`` and ``sshs_*`` keys never change the result.
    """
    buffer = safetensors.torch.save(_cpu_contiguous(state_dict), hashed_metadata(metadata))
    return hashes_from_bytes(buffer)


def file_data_sha256(path: str | os.PathLike) -> str:
    """sha256 of a safetensors file's tensor-data section (what ``sshs_model_hash`` must equal)."""
    header = read_safetensors_header(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(header.data_start)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_legacy_hash(path: str | os.PathLike) -> str:
    """The old A1111/kohya model hash of a file (``ss_sd_model_hash``): 64 KiB at 1 MiB, 8 hex."""
    with open(path, "rb") as f:
        f.seek(_LEGACY_OFFSET)
        return hashlib.sha256(f.read(_LEGACY_LENGTH)).hexdigest()[:8]


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_hashes(
    path: str | os.PathLike | None,
    *,
    sha256: str | None = None,
    legacy: str | None = None,
    read_sha256: bool = True,
) -> tuple[str, str]:
    """``(sha256, legacy 8-hex hash)`` of a base checkpoint file, kohya's ``ss_new_sd_model_hash``
    and ``ss_sd_model_hash``.

    ``sha256`` / ``legacy``: the values the host already has (the WebUI's checkpoint info holds
    both once a model is loaded); each is computed from the file only when not given, so a
    multi-gigabyte checkpoint is not read again; ``read_sha256`` False never reads the whole file
    (the WebUI's ``--no-hashing``). "" for a value that cannot be had (no path, or the file is gone).
    """
    if path is None or not os.path.isfile(path):
        return sha256 or "", legacy or ""
    if not sha256 and read_sha256:
        sha256 = file_sha256(path)
    return sha256 or "", legacy or file_legacy_hash(path)
