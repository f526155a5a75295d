"""The safetensors file format: reading and validating a header without loading tensors, refusing
pickles, and the pieces a writer needs (CPU copies of the tensors, a header with new metadata).

:func:`read_safetensors_header` raises :class:`LoraFileError` with a specific message for a
missing, empty, truncated or damaged file and for pickle-based files (``.pt``/``.ckpt`` ...),
which are never read.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lora_trainer.errors import LoraFileError

__all__ = [
    "PICKLE_SUFFIXES",
    "SafetensorsHeader",
    "file_metadata",
    "prepare_tensors",
    "read_safetensors_header",
    "splice_header",
]

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")

_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit
_DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


@dataclass
class SafetensorsHeader:
    """A validated safetensors header: per tensor ``{"dtype", "shape", "data_offsets"}``."""

    path: Path
    file_size: int
    header_size: int
    tensors: dict[str, dict[str, Any]]
    metadata: dict[str, str]

    @property
    def data_start(self) -> int:
        return 8 + self.header_size


def _sniff_pickle(head: bytes) -> str | None:
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (PyTorch's torch.save format)"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "a Python pickle"
    return None


def _pickle_refusal(path: Path, what: str) -> LoraFileError:
    return LoraFileError(
        f"{path.name}: is {what}. Pickle-based files (.pt/.ckpt/.pth/.bin) can run arbitrary code when "
        "loaded, so they are not read. Convert it to .safetensors first (for example with a trusted "
        "converter, or safetensors.torch.save_file(torch.load(f, weights_only=True), ...) on a file you trust)."
    )


def read_safetensors_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse and validate a safetensors header without loading tensors.

    Raises :class:`LoraFileError` with a specific message for a missing/empty/truncated file,
    a pickle, a header that is not JSON, or a header that does not match the file's data.
    """
    path = Path(path)
    size = _checked_file_size(path)
    head, n, raw = _read_header_bytes(path, size)
    header = _parse_header_json(path, head, raw)
    metadata = _pop_metadata(path, header)
    _check_tensor_layout(path, header, size - 8 - n)
    return SafetensorsHeader(path, size, n, header, dict(metadata))


def file_metadata(path: str | os.PathLike | None) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (its header only), or {} when there is no file or it
    cannot be read: for listings that skip what they cannot read."""
    if not path:
        return {}
    try:
        return read_safetensors_header(path).metadata
    except (LoraFileError, OSError):
        return {}


def _checked_file_size(path: Path) -> int:
    """The size of ``path``; raises for a missing path, a folder, a pickle suffix or an empty file."""
    if not path.exists():
        raise LoraFileError(f"{path}: file not found")
    if not path.is_file():
        raise LoraFileError(f"{path}: not a file")
    size = path.stat().st_size
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise _pickle_refusal(path, f"a {path.suffix} file")
    if size == 0:
        raise LoraFileError(f"{path.name}: file is empty (0 bytes)")
    return size


def _read_header_bytes(path: Path, size: int) -> tuple[bytes, int, bytes]:
    """(the 8-byte length field, the header length it gives, the raw header bytes)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LoraFileError(f"{path.name}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > size - 8 or n > _MAX_HEADER:
            pickle_kind = _sniff_pickle(head)
            if pickle_kind:
                raise _pickle_refusal(path, pickle_kind)
            if n > _MAX_HEADER:
                raise LoraFileError(f"{path.name}: not a safetensors file (invalid header length {n})")
            raise LoraFileError(
                f"{path.name}: damaged or truncated safetensors file (header says {n} bytes, "
                f"file has {size - 8} after the length field)"
            )
        raw = f.read(n)
    return head, n, raw


def _parse_header_json(path: Path, head: bytes, raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        pickle_kind = _sniff_pickle(head)
        if pickle_kind:
            raise _pickle_refusal(path, pickle_kind) from e
        raise LoraFileError(f"{path.name}: not a safetensors file or damaged header (not valid JSON: {e})") from e
    if not isinstance(header, dict):
        raise LoraFileError(f"{path.name}: damaged safetensors header (JSON is not an object)")
    return header


def _pop_metadata(path: Path, header: dict[str, Any]) -> dict[str, str]:
    """Remove and return ``__metadata__`` (``{}`` if absent); raises unless it is a str -> str map."""
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise LoraFileError(f"{path.name}: damaged safetensors header (__metadata__ is not a str -> str map)")
    return metadata


def _parse_entry(entry: Any) -> tuple[str, list[int], int, int, int] | None:
    """(dtype, shape, begin, end, element count) of a well-formed tensor entry, else None."""
    try:
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        numel = math.prod(int(s) for s in shape)
        ok = (
            dtype in _DTYPE_SIZES
            and all(isinstance(s, int) and s >= 0 for s in shape)
            and isinstance(begin, int)
            and isinstance(end, int)
            and 0 <= begin <= end
        )
    except (TypeError, KeyError, ValueError):
        return None
    return (dtype, shape, begin, end, numel) if ok else None


def _tensor_span(path: Path, name: str, entry: Any) -> tuple[int, int, str]:
    """(begin, end, name) of one tensor's data; raises if the entry is malformed or its size is wrong."""
    parsed = _parse_entry(entry)
    if parsed is None:
        raise LoraFileError(f"{path.name}: damaged safetensors header (bad entry for tensor {name!r})")
    dtype, shape, begin, end, numel = parsed
    if end - begin != numel * _DTYPE_SIZES[dtype]:
        raise LoraFileError(
            f"{path.name}: damaged safetensors header (tensor {name!r}: {dtype}{list(shape)} needs "
            f"{numel * _DTYPE_SIZES[dtype]} bytes, offsets give {end - begin})"
        )
    return begin, end, name


def _check_tensor_layout(path: Path, header: dict[str, Any], data_size: int) -> None:
    """The tensors' data must tile the data section exactly: no gap, no overlap, nothing after."""
    spans = sorted(_tensor_span(path, name, entry) for name, entry in header.items())
    position = 0
    for begin, end, name in spans:
        if begin != position:
            raise LoraFileError(f"{path.name}: damaged safetensors header (tensor {name!r} data is not contiguous)")
        position = end
    if position > data_size:
        raise LoraFileError(
            f"{path.name}: truncated file (header expects {position} bytes of tensor data, file has {data_size})"
        )
    if position < data_size:
        raise LoraFileError(f"{path.name}: damaged file ({data_size - position} unexpected bytes after tensor data)")


def prepare_tensors(state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Own CPU contiguous copies (cast to ``dtype`` if floating point) that share no storage."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise TypeError(f"tensor names must be str, got {key!r}")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{key}: expected a torch.Tensor, got {type(value).__name__}")
        target = dtype if (dtype is not None and value.is_floating_point()) else value.dtype
        out[key] = value.detach().to(device="cpu", dtype=target, copy=True).contiguous()
    return out


def splice_header(buffer: bytes, metadata: Mapping[str, str]) -> tuple[bytes, memoryview]:
    """(new length + header with ``metadata``, the unchanged data section of ``buffer``)."""
    (n,) = struct.unpack("<Q", buffer[:8])
    header = json.loads(buffer[8 : 8 + n])
    header.pop("__metadata__", None)
    header = {"__metadata__": dict(metadata), **header} if metadata else header
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header so the data starts 8-aligned
    return struct.pack("<Q", len(raw)) + raw, memoryview(buffer)[8 + n :]
