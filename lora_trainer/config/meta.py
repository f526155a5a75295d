"""What a setting is: the field-metadata helpers, the choice lists and the ``Leaf`` record.

Every setting is a dataclass field whose ``metadata`` holds its label and help, kohya's name and
default, and its limits (``ge``/``gt``/``le``/``lt``/``choices``). ``Leaf`` is the flat record of one
such field (``"network.network_dim"``) that validation, TOML, the JSON schema and the UI all read.
The choice lists come from where they are implemented (optimizers and schedulers from
``lora_trainer.train.names``, network modules and LyCORIS algorithms from ``lora_trainer.networks.registry``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import field
from typing import Any, NamedTuple, Union, get_args, get_origin, get_type_hints

from lora_trainer.networks.registry import LYCORIS_ALGOS, LYCORIS_MODULE, NETWORK_MODULES
from lora_trainer.train.names import LR_SCHEDULERS, OPTIMIZERS

__all__ = [
    "FORMAT_VERSION",
    "LR_SCHEDULERS",
    "LYCORIS_ALGOS",
    "LYCORIS_MODULE",
    "MAX_RESOLUTION",
    "MAX_SEED",
    "MAX_TOKEN_LENGTHS",
    "MIN_RESOLUTION",
    "MIXED_PRECISIONS",
    "NETWORK_MODULES",
    "OPTIMIZERS",
    "RESOLUTION_MULTIPLE",
    "SAVE_PRECISIONS",
    "Leaf",
    "build_leaves",
    "field_meta",
    "jsonable",
    "setting",
]

FORMAT_VERSION = 1
"""Version of our TOML layout, written as ``[lora_train] format``."""

MIXED_PRECISIONS = ("no", "fp16", "bf16")
SAVE_PRECISIONS = ("fp16", "bf16", "float")
MAX_TOKEN_LENGTHS = (75, 150, 225)

MIN_RESOLUTION = 64  # tiny test models train at 64 px; real use starts at 256
MAX_RESOLUTION = 4096
RESOLUTION_MULTIPLE = 64
MAX_SEED = 2**32 - 1

_NO_DEFAULT = object()


def field_meta(
    *,
    label: str,
    help: str,
    kohya: str | None = None,
    kohya_default: Any = _NO_DEFAULT,
    network_arg: bool = False,
    inverted: bool = False,
    choices: tuple | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> dict[str, Any]:
    """Field metadata: label and help (always), kohya's name and default, limits."""
    meta: dict[str, Any] = {"label": label, "help": help}
    for key, value in (("kohya", kohya), ("choices", choices), ("ge", ge), ("gt", gt), ("le", le), ("lt", lt)):
        if value is not None:
            meta[key] = value
    if kohya_default is not _NO_DEFAULT:
        meta["kohya_default"] = kohya_default
    if network_arg:
        meta["kohya_network_arg"] = True
    if inverted:
        meta["kohya_inverted"] = True
    return meta


def setting(default: Any, **meta: Any) -> Any:
    """A field with an immutable default and ``field_meta(**meta)``."""
    return field(default=default, metadata=field_meta(**meta))


def jsonable(value: Any) -> Any:
    """A setting's value in JSON form (tuples become lists)."""
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    return value


class Leaf(NamedTuple):
    """One setting: where it lives, its value kind, its default and its field metadata."""

    path: str  # "network.network_dim"
    group: str
    name: str
    kind: str  # bool | int | float | str | str_list | dict | resolution
    optional: bool
    default: Any
    meta: Mapping[str, Any]

    @property
    def json_default(self) -> Any:
        """The default in JSON form."""
        return jsonable(self.default)


def _kind_of(tp: Any) -> tuple[str, bool]:
    optional = False
    if get_origin(tp) in (Union, type(int | None)):
        args = [a for a in get_args(tp) if a is not type(None)]
        optional = len(args) < len(get_args(tp))
        if len(args) == 2 and int in args:  # int | tuple[int, int]
            return "resolution", optional
        tp = args[0]
    origin = get_origin(tp)
    if origin is list:
        return "str_list", optional
    if origin is dict:
        return "dict", optional
    return {bool: "bool", int: "int", float: "float", str: "str"}[tp], optional


def build_leaves(group_classes: Mapping[str, type]) -> tuple[Leaf, ...]:
    """One ``Leaf`` per field of each group dataclass, groups and fields in declaration order."""
    leaves = []
    for group, cls in group_classes.items():
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kind, optional = _kind_of(hints[f.name])
            default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            leaves.append(Leaf(f"{group}.{f.name}", group, f.name, kind, optional, default, f.metadata))
    return tuple(leaves)
