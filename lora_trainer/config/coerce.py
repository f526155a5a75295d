"""Type coercion: a raw value (from JSON, TOML, a form) to a setting's canonical Python value.

Only types and forms are checked here (``"512,768"`` is a resolution, ``3.0`` an int); ranges and
rules are ``lora_trainer.config.validate``'s. Failures raise ``ConfigError`` naming the dotted field.
``CoercedGroup`` is the base of the setting groups: it coerces their values on construction.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

from lora_trainer.config.meta import Leaf
from lora_trainer.errors import ConfigError

__all__ = ["CoercedGroup", "bind_leaves", "coerce", "coerce_resolution", "request_number", "short", "unknown"]

_KIND_TEXT = {
    "bool": "true or false",
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "str_list": "a list of strings",
    "dict": "an object of name: value pairs",
    "resolution": "a size like 512 or 'width,height' like '512,768'",
}


def coerce_resolution(value: Any) -> int | tuple[int, int]:
    """512, "512", "512,768", [512, 768] -> 512 or (512, 768); (512, 512) -> 512. ValueError if not a size."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
        if len(parts) not in (1, 2) or not all(re.fullmatch(r"\d+", p) for p in parts):
            raise ValueError(value)
        value = [int(p) for p in parts]
    if isinstance(value, (list, tuple)):
        if len(value) == 1:
            value = value[0]
        elif len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            w, h = value
            return w if w == h else (w, h)
        else:
            raise ValueError(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ValueError(value)


def _coerce_dict(value: Mapping) -> dict[str, Any]:
    out = {}
    for k, v in value.items():
        if not isinstance(k, str):
            raise ValueError(k)
        out[k] = _coerce_arg_value(v)
    return out


def _coerce_value(kind: str, value: Any) -> Any:
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "int" and not isinstance(value, bool):
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    if kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind == "str" and isinstance(value, str):
        return value
    if kind == "str" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # a network arg read as a number ("mid_lr_weight=0.5"): kohya keeps its text
    if kind == "str_list" and isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    if kind == "dict" and isinstance(value, Mapping):
        return _coerce_dict(value)
    if kind == "resolution":
        return coerce_resolution(value)
    raise ValueError(value)


def _coerce_arg_value(value: Any) -> Any:
    """An optimizer argument: bool, number, string, or a list of those (tuples become lists)."""
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float, str)) for v in value):
        return list(value)
    raise ValueError(value)


def coerce(leaf: Leaf, value: Any) -> Any:
    """``value`` as ``leaf``'s canonical type, or ``ConfigError(leaf.path, ...)`` saying what it must be."""
    if value is None and leaf.optional:
        return None
    try:
        return _coerce_value(leaf.kind, value)
    except ValueError:
        pass
    expected = _KIND_TEXT[leaf.kind] + (" or null (unset)" if leaf.optional else "")
    if leaf.kind == "dict" and isinstance(value, Mapping):
        expected = "an object of name: value pairs whose values are true/false, numbers, strings or lists of those"
    raise ConfigError(leaf.path, f"must be {expected}, got {type(value).__name__} {short(value)}")


def short(value: Any) -> str:
    """``repr(value)``, cut to 60 characters for messages."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def unknown(name: str, known: Iterable[str], what: str) -> str:
    """'unknown setting; did you mean 'x'?' for a name not in ``known``."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown {what}{hint}"


class CoercedGroup:
    """Base of the six setting groups: canonical values after construction."""

    _leaves: ClassVar[tuple[Leaf, ...]] = ()  # set by bind_leaves once TrainConfig names the groups

    def __post_init__(self) -> None:
        for leaf in self._leaves:
            with contextlib.suppress(ConfigError):  # a bad value stays as given; errors() reports it
                setattr(self, leaf.name, coerce(leaf, getattr(self, leaf.name)))


def bind_leaves(group_classes: Mapping[str, type], leaves: Iterable[Leaf]) -> None:
    """Give each group class its leaves, which ``__post_init__`` coerces (called once TrainConfig exists)."""
    leaves = tuple(leaves)
    for group, cls in group_classes.items():
        if issubclass(cls, CoercedGroup):
            cls._leaves = tuple(leaf for leaf in leaves if leaf.group == group)


def request_number(data: Mapping[str, Any], key: str, default: float, low: float, high: float, *, whole: bool) -> Any:
    """``data[key]`` (``default`` when absent or empty) as a number in [low, high], a whole one with
    ``whole``; a number's text (from a UI box) is read too. ConfigError(key) otherwise."""
    value = data.get(key, default)
    if value is None or value == "":
        value = default
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(key, f"must be a number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(number) or (whole and number != int(number)):
        raise ConfigError(key, f"must be a {'whole ' if whole else ''}number, got {value!r}")
    if not low <= number <= high:
        raise ConfigError(key, f"must be between {low:g} and {high:g}, got {value!r}")
    return int(number) if whole else number
