"""Resume state on disk (optimizer, scheduler, RNG states ...) as safetensors + JSON, never pickle.

:func:`flatten_tensors` / :func:`unflatten_tensors` turn a nested structure into a flat tensor
dict and a JSON-able skeleton and back; :func:`save_state_dict_and_json` /
:func:`load_state_dict_and_json` store such a pair atomically (the JSON file is the commit
point); :func:`save_state` / :func:`load_state` do both steps.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from lora_trainer.errors import LoraFileError
from lora_trainer.files.atomic_write import atomic_write_bytes, unlink_quietly
from lora_trainer.files.safetensors_format import prepare_tensors, read_safetensors_header

__all__ = [
    "StateFileError",
    "flatten_tensors",
    "load_state",
    "load_state_dict_and_json",
    "load_state_info",
    "save_state",
    "save_state_dict_and_json",
    "unflatten_tensors",
]


class StateFileError(LoraFileError):
    """A resume-state file pair that cannot be read back (missing, damaged, mismatched)."""


# --------------------------------------------------------------------------------------------
# nested structures <-> flat tensors + JSON skeleton
# --------------------------------------------------------------------------------------------

_TAGS = (
    "$tensor",
    "$ndarray",
    "$npscalar",
    "$tuple",
    "$dict",
    "$odict",
    "$float",
    "$dtype",
    "$device",
    "$size",
)
_NOT_SIMPLE = object()  # _encode_simple's "not a value of mine"


def _encode_simple(obj: Any) -> Any:
    """The skeleton node of a scalar, str, None or torch dtype/device/Size; ``_NOT_SIMPLE`` for anything else."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else {"$float": repr(float(obj))}
    if isinstance(obj, torch.dtype):
        return {"$dtype": str(obj).removeprefix("torch.")}
    if isinstance(obj, torch.device):
        return {"$device": str(obj)}
    if isinstance(obj, torch.Size):
        return {"$size": list(obj)}
    return _NOT_SIMPLE


class _Flattener:
    """One :func:`flatten_tensors` run: the tensors collected so far and the skeleton encoder."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._by_id: dict[int, str] = {}
        self._keep_alive: list[Any] = []  # keep encoded objects alive so their ids stay unique

    def encode(self, obj: Any, where: str) -> Any:
        if isinstance(obj, torch.Tensor):
            return self._tensor(obj)
        if isinstance(obj, np.ndarray):
            return self._ndarray(obj, where)
        if isinstance(obj, np.generic):
            return _npscalar(obj, where)
        simple = _encode_simple(obj)
        if simple is not _NOT_SIMPLE:
            return simple
        return self._container(obj, where)

    def _tensor(self, obj: torch.Tensor) -> Any:
        key = self._by_id.get(id(obj))
        if key is None:
            key = f"t{len(self.tensors)}"
            self._by_id[id(obj)] = key
            self._keep_alive.append(obj)
            self.tensors[key] = obj
        return {"$tensor": key}

    def _ndarray(self, obj: np.ndarray, where: str) -> Any:
        if obj.dtype.hasobject or obj.dtype.fields is not None:
            raise TypeError(f"{where}: numpy arrays of dtype {obj.dtype} cannot be stored")
        key = f"t{len(self.tensors)}"
        raw = np.ascontiguousarray(obj).tobytes()
        self.tensors[key] = (
            torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        )
        return {"$ndarray": key, "dtype": obj.dtype.str, "shape": list(obj.shape)}

    def _container(self, obj: Any, where: str) -> Any:
        if isinstance(obj, tuple):
            return {"$tuple": [self.encode(v, f"{where}[{i}]") for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [self.encode(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        if isinstance(obj, dict):
            tag = "$odict" if isinstance(obj, collections.OrderedDict) else "$dict"
            return {tag: [[self.encode(k, f"{where} key"), self.encode(v, f"{where}[{k!r}]")] for k, v in obj.items()]}
        raise TypeError(f"{where}: cannot store a {type(obj).__module__}.{type(obj).__qualname__} without pickle")


def _npscalar(obj: np.generic, where: str) -> Any:
    if obj.dtype.hasobject or obj.dtype.fields is not None:
        raise TypeError(f"{where}: numpy scalars of dtype {obj.dtype} cannot be stored")
    return {"$npscalar": obj.dtype.str, "hex": obj.tobytes().hex()}


def flatten_tensors(nested: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested structure into ``(tensors, skeleton)``: a flat tensor dict and a JSON-able skeleton.

    Handles dict (any hashable keys of supported types, order kept), OrderedDict, list, tuple,
    None, bool, int (any size), float (nan/inf too), str, torch.Tensor (dtype kept; the same
    tensor object twice is stored once), numpy arrays and scalars (raw bytes + dtype),
    torch.dtype, torch.device and torch.Size. Anything else raises ``TypeError`` - never pickle.
    Tensors come back on the CPU without ``requires_grad``.
    """
    flattener = _Flattener()
    skeleton = flattener.encode(nested, "state")
    return flattener.tensors, skeleton


class _Unflattener:
    """One :func:`unflatten_tensors` run: a skeleton decoder over ``tensors``, one handler per tag."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._tensors = tensors
        self._cache: dict[str, torch.Tensor] = {}
        self._handlers: dict[str, Callable[[dict[str, Any], str], Any]] = {
            "$tensor": self._tensor_node,
            "$ndarray": self._ndarray_node,
            "$npscalar": _decode_npscalar,
            "$tuple": self._tuple_node,
            "$dict": self._dict_node,
            "$odict": self._dict_node,
            "$float": _decode_float,
            "$dtype": _decode_dtype,
            "$device": _decode_device,
            "$size": _decode_size,
        }

    def tensor(self, key: Any) -> torch.Tensor:
        if not isinstance(key, str) or key not in self._tensors:
            raise ValueError(f"state refers to tensor {key!r}, which is missing")
        return self._tensors[key]

    def decode(self, node: Any) -> Any:
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if isinstance(node, list):
            return [self.decode(v) for v in node]
        if not isinstance(node, dict) or len(node) == 0:
            raise ValueError(f"malformed state skeleton node {node!r}")
        tag = next((t for t in _TAGS if t in node), None)
        if tag is None:
            raise ValueError(f"malformed state skeleton node {node!r}")
        return self._handlers[tag](node, tag)

    def _tensor_node(self, node: dict[str, Any], tag: str) -> torch.Tensor:
        key = node["$tensor"]
        if key not in self._cache:
            self._cache[key] = self.tensor(key)
        return self._cache[key]

    def _ndarray_node(self, node: dict[str, Any], tag: str) -> np.ndarray:
        raw = self.tensor(node["$ndarray"]).numpy().tobytes()
        return np.frombuffer(raw, dtype=np.dtype(node["dtype"])).reshape(node["shape"]).copy()

    def _tuple_node(self, node: dict[str, Any], tag: str) -> tuple:
        return tuple(self.decode(v) for v in node["$tuple"])

    def _dict_node(self, node: dict[str, Any], tag: str) -> dict:
        items = [(_hashable(self.decode(k)), self.decode(v)) for k, v in node[tag]]
        return collections.OrderedDict(items) if tag == "$odict" else dict(items)


def _decode_npscalar(node: dict[str, Any], tag: str) -> Any:
    return np.frombuffer(bytes.fromhex(node["hex"]), dtype=np.dtype(node["$npscalar"]))[0]


def _decode_float(node: dict[str, Any], tag: str) -> float:
    return float(node["$float"])


def _decode_dtype(node: dict[str, Any], tag: str) -> torch.dtype:
    dtype = getattr(torch, node["$dtype"], None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown torch dtype {node['$dtype']!r}")
    return dtype


def _decode_device(node: dict[str, Any], tag: str) -> torch.device:
    return torch.device(node["$device"])


def _decode_size(node: dict[str, Any], tag: str) -> torch.Size:
    return torch.Size(node["$size"])


def unflatten_tensors(tensors: Mapping[str, torch.Tensor], skeleton: Any) -> Any:
    """Inverse of :func:`flatten_tensors`. Raises ``ValueError`` for a skeleton that does not fit."""
    try:
        return _Unflattener(tensors).decode(skeleton)
    except (KeyError, TypeError) as e:
        raise ValueError(f"malformed state skeleton: {e}") from e


def _hashable(key: Any) -> Any:
    try:
        hash(key)
    except TypeError as e:
        raise ValueError(f"state skeleton has an unhashable dict key {key!r}") from e
    return key


# --------------------------------------------------------------------------------------------
# the state file pair
# --------------------------------------------------------------------------------------------

_STATE_FORMAT = "lora_trainer.state"
_STATE_VERSION = 1


def _state_tensor_name(name: str, token: str) -> str:
    return f"{name}-{token}.safetensors"


def save_state_dict_and_json(
    directory: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    info: Mapping[str, Any],
    *,
    name: str = "state",
) -> Path:
    """Save ``tensors`` (safetensors) and ``info`` (JSON) as one resume-state unit. Returns the JSON path.

    The tensors go to ``<name>-<token>.safetensors``; ``<name>.json`` holds ``info`` and names
    that file, and is written last (atomically), so it is the commit point: a save interrupted at
    any moment leaves the previous pair intact and readable. Older tensor files of the same
    ``name`` are removed afterwards.
    """
    directory = Path(directory)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"state name {name!r}: use letters, digits, '_', '-', '.'")
    try:
        info_text = json.dumps(
            {"format": _STATE_FORMAT, "version": _STATE_VERSION, "tensors_file": None, "info": info},
            ensure_ascii=False,
        )
    except (TypeError, ValueError) as e:
        raise TypeError(f"state info is not JSON-serializable: {e}") from e
    directory.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    tensor_file = _state_tensor_name(name, token)
    prepared = prepare_tensors(tensors, None)
    buffer = safetensors.torch.save(prepared, {"format": _STATE_FORMAT, "token": token})
    atomic_write_bytes(directory / tensor_file, buffer, overwrite=True)
    document = json.loads(info_text)
    document["tensors_file"] = tensor_file
    document["token"] = token
    try:
        json_path = atomic_write_bytes(
            directory / f"{name}.json", json.dumps(document, ensure_ascii=False, indent=1).encode("utf-8")
        )
    except BaseException:
        unlink_quietly(directory / tensor_file)
        raise
    pattern = re.compile(re.escape(name) + r"-[0-9a-f]{32}\.safetensors")
    for old in directory.iterdir():
        if old.name != tensor_file and pattern.fullmatch(old.name):
            unlink_quietly(old)
    return json_path


def _read_document(json_path: Path) -> dict[str, Any]:
    if not json_path.is_file():
        raise StateFileError(f"{json_path}: no saved state here")
    try:
        document = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StateFileError(f"{json_path.name}: damaged state file ({e})") from e
    if not isinstance(document, dict) or document.get("format") != _STATE_FORMAT:
        raise StateFileError(f"{json_path.name}: not a lora_trainer state file")
    if document.get("version") != _STATE_VERSION:
        raise StateFileError(f"{json_path.name}: state format version {document.get('version')!r} is not supported")
    return document


def load_state_info(directory: str | os.PathLike, *, name: str = "state") -> Any:
    """The ``info`` :func:`save_state` stored (JSON only, its tensors unread); :class:`StateFileError` if unreadable."""
    saved = _read_document(Path(directory) / f"{name}.json").get("info")
    return saved.get("info") if isinstance(saved, dict) else None


def load_state_dict_and_json(
    directory: str | os.PathLike, *, name: str = "state"
) -> tuple[dict[str, torch.Tensor], Any]:
    """Read what :func:`save_state_dict_and_json` wrote: ``(tensors, info)``; :class:`StateFileError` if unreadable."""
    directory = Path(directory)
    json_path = directory / f"{name}.json"
    document = _read_document(json_path)
    tensor_file = document.get("tensors_file")
    if not isinstance(tensor_file, str) or Path(tensor_file).name != tensor_file:
        raise StateFileError(f"{json_path.name}: damaged state file (bad tensors_file entry)")
    tensor_path = directory / tensor_file
    try:
        header = read_safetensors_header(tensor_path)
    except LoraFileError as e:
        raise StateFileError(f"state tensors: {e}") from e
    if header.metadata.get("token") != document.get("token"):
        raise StateFileError(f"{tensor_file}: does not belong to {json_path.name} (different save)")
    try:
        tensors = safetensors.torch.load_file(str(tensor_path))
    except Exception as e:
        raise StateFileError(f"{tensor_file}: cannot read tensors ({e})") from e
    return tensors, document.get("info")


def save_state(directory: str | os.PathLike, state: Any, *, name: str = "state", info: Any = None) -> Path:
    """:func:`flatten_tensors` + :func:`save_state_dict_and_json`: any supported nested structure."""
    tensors, skeleton = flatten_tensors(state)
    return save_state_dict_and_json(directory, tensors, {"skeleton": skeleton, "info": info}, name=name)


def load_state(directory: str | os.PathLike, *, name: str = "state") -> tuple[Any, Any]:
    """Inverse of :func:`save_state`: ``(state, info)``."""
    tensors, document = load_state_dict_and_json(directory, name=name)
    if not isinstance(document, dict) or "skeleton" not in document:
        raise StateFileError(f"{name}.json: was not written by save_state")
    try:
        state = unflatten_tensors(tensors, document["skeleton"])
    except ValueError as e:
        raise StateFileError(f"{name}.json: {e}") from e
    return state, document.get("info")
