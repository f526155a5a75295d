"""LoRA ``.safetensors`` files: what a LoRA key is, :func:`load_lora` and :func:`save_lora`.

Saving is kohya's: every floating tensor cast to the save precision, ``sshs_model_hash`` /
``sshs_legacy_hash`` added, written atomically (:mod:`lora_trainer.files.atomic_write`) and read
back before it is published; an existing file is not clobbered unless asked. Loading refuses
pickles and files without kohya-style LoRA keys.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from lora_trainer.errors import ConfigError, LoraFileError, NonFiniteError
from lora_trainer.files.atomic_write import publish, unlink_quietly, write_temp
from lora_trainer.files.hashes import hashed_metadata, hashes_from_bytes
from lora_trainer.files.safetensors_format import prepare_tensors, read_safetensors_header, splice_header
from lora_trainer.log import logger

__all__ = [
    "LORA_KEY_PREFIXES",
    "SAVE_DTYPES",
    "is_lora_key",
    "load_lora",
    "require_lora_keys",
    "resolve_save_dtype",
    "save_lora",
]

# Prefixes of the kohya-style module names A1111/ComfyUI/kohya load (LoRA, LoCon and LyCORIS alike).
LORA_KEY_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")

SAVE_DTYPES: dict[str, torch.dtype] = {
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}


def is_lora_key(key: str) -> bool:
    """True for kohya-style LoRA/LyCORIS tensor names (``lora_unet_...``, ``lora_te_...``)."""
    return key.startswith(LORA_KEY_PREFIXES)


def require_lora_keys(names: Iterable[str], path: str | os.PathLike) -> None:
    """Raise :class:`LoraFileError` unless some of ``names`` are kohya-style LoRA keys."""
    names = list(names)
    if any(is_lora_key(k) for k in names):
        return
    name = Path(path).name
    if not names:
        raise LoraFileError(f"{name}: contains no tensors, so it is not a LoRA")
    example = ", ".join(repr(k) for k in sorted(names)[:3])
    raise LoraFileError(
        f"{name}: not a LoRA: no kohya-style LoRA keys (lora_unet_*/lora_te*_*) among its {len(names)} "
        f"tensors (e.g. {example})"
    )


def load_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a LoRA ``.safetensors`` file: ``(state_dict, metadata)`` on the CPU, dtypes as stored.

    Raises :class:`LoraFileError` for a missing, empty, damaged, truncated or pickle file, or one
    with no LoRA keys.
    """
    header = read_safetensors_header(path)
    require_lora_keys(header.tensors, path)
    try:
        state_dict = safetensors.torch.load_file(str(header.path))
    except Exception as e:  # SafetensorError, OSError, ... -> one typed error
        raise LoraFileError(f"{header.path.name}: cannot read tensors ({e})") from e
    return state_dict, header.metadata


def resolve_save_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """torch.float16/bfloat16/float32 or "fp16"/"bf16"/"fp32" (and long names) -> torch dtype."""
    if isinstance(dtype, str):
        resolved = SAVE_DTYPES.get(dtype.lower())
        if resolved is None:
            raise ConfigError("save_precision", f"unknown save precision {dtype!r}; use fp16, bf16 or fp32")
        return resolved
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ConfigError("save_precision", f"cannot save a LoRA as {dtype}; use fp16, bf16 or fp32")
    return dtype


def _to_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _stringify_metadata(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    result: dict[str, str] = {}
    for k, v in (metadata or {}).items():
        if not isinstance(k, str):
            raise TypeError(f"metadata keys must be str, got {k!r}")
        result[k] = _to_str(v)
    return result


def _refuse_nonfinite(
    name: str, state_dict: Mapping[str, torch.Tensor], tensors: dict[str, torch.Tensor], dtype: torch.dtype
) -> None:
    """Raise :class:`NonFiniteError` if a tensor to be written holds NaN/inf (as given, or after the cast)."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if not bad:
        return
    overflow = [k for k in bad if bool(torch.isfinite(state_dict[k]).all())]
    listed = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    if len(overflow) == len(bad):
        raise NonFiniteError(
            f"{name}: not saved: {listed} overflow the save precision {dtype} "
            "(values beyond its range); save in bf16 or fp32"
        )
    raise NonFiniteError(f"{name}: not saved: the LoRA weights hold NaN/inf ({listed}); nothing was written")


def save_lora(
    path: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any] | None = None,
    *,
    dtype: torch.dtype | str = torch.float16,
    overwrite: bool = False,
) -> Path:
    """Save a LoRA as kohya does, atomically. Returns the path actually written.

    Every floating tensor (0-dim ``.alpha`` included) is cast to ``dtype``; ``sshs_model_hash``
    and ``sshs_legacy_hash`` are computed and added. If ``path`` exists and ``overwrite`` is
    False, the first free ``name_N.safetensors`` is used instead: report the returned path.
    Nothing is left behind if writing fails. A state dict holding NaN/inf (or values the cast to
    ``dtype`` overflows) is refused with :class:`NonFiniteError` before anything is written.
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise LoraFileError(f"{path.name}: a LoRA is saved as .safetensors")
    if not state_dict:
        raise LoraFileError(f"{path.name}: refusing to save an empty state dict")
    save_dtype = resolve_save_dtype(dtype)
    tensors = prepare_tensors(state_dict, save_dtype)
    _refuse_nonfinite(path.name, state_dict, tensors, save_dtype)
    meta = _stringify_metadata(metadata)
    buffer = safetensors.torch.save(tensors, hashed_metadata(meta))
    model_hash, legacy_hash = hashes_from_bytes(buffer)
    meta["sshs_model_hash"] = model_hash
    meta["sshs_legacy_hash"] = legacy_hash
    head, data = splice_header(buffer, meta)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = write_temp(path.parent, path.name, (head, data))
    try:
        written = read_safetensors_header(tmp)  # never publish a file we cannot read back
        if written.metadata.get("sshs_model_hash") != model_hash or set(written.tensors) != set(tensors):
            raise LoraFileError(f"{path.name}: the written file does not read back as saved")
    except BaseException:
        unlink_quietly(tmp)
        raise
    final = publish(tmp, path, overwrite)
    if final != path:
        logger.info("%s exists; saved as %s", path.name, final.name)
    return final
