"""JSON schema (draft 2020-12) of ``TrainConfig.to_dict()``, generated from the same field metadata.

Types, defaults, enums, limits, labels and help come from each setting's ``Leaf``; ``x-kohya`` names
kohya's argument (``network_args:<name>`` for those kohya passes in ``network_args``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lora_trainer.config.meta import Leaf
from lora_trainer.config.model import LEAVES, TrainConfig

__all__ = ["json_schema"]

_JSON_TYPES = {"bool": "boolean", "int": "integer", "float": "number", "str": "string"}
_BOUNDS = (("ge", "minimum"), ("gt", "exclusiveMinimum"), ("le", "maximum"), ("lt", "exclusiveMaximum"))


def _type_schema(leaf: Leaf) -> dict[str, Any]:
    if leaf.kind in _JSON_TYPES:
        return {"type": _JSON_TYPES[leaf.kind]}
    if leaf.kind == "str_list":
        return {"type": "array", "items": {"type": "string"}}
    if leaf.kind == "dict":
        return {"type": "object", "additionalProperties": {"type": ["boolean", "number", "string", "array"]}}
    # resolution
    return {
        "oneOf": [
            {"type": "integer"},
            {"type": "string", "pattern": r"^\s*\d+\s*(,\s*\d+\s*)?$"},
            {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2},
        ]
    }


def _leaf_schema(leaf: Leaf) -> dict[str, Any]:
    meta = leaf.meta
    schema: dict[str, Any] = {"title": meta["label"], "description": meta["help"], **_type_schema(leaf)}
    if leaf.optional:
        schema["type"] = [schema["type"], "null"]
    for key, name in _BOUNDS:
        if key in meta:
            schema[name] = meta[key]
    if "choices" in meta:
        schema["enum"] = list(meta["choices"]) + ([None] if leaf.optional else [])
    schema["default"] = leaf.json_default
    if "kohya" in meta:
        schema["x-kohya"] = ("network_args:" if meta.get("kohya_network_arg") else "") + meta["kohya"]
    return schema


def json_schema() -> dict[str, Any]:
    """JSON schema (draft 2020-12) of ``TrainConfig.to_dict()``: types, defaults, enums, limits, help.

    Extra per setting: ``x-kohya`` (kohya's argument name).
    """
    properties = {}
    for f in dataclasses.fields(TrainConfig):
        leaves = [leaf for leaf in LEAVES if leaf.group == f.name]
        properties[f.name] = {
            "title": f.metadata["label"],
            "description": f.metadata["help"],
            "type": "object",
            "additionalProperties": False,
            "properties": {leaf.name: _leaf_schema(leaf) for leaf in leaves},
        }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "TrainConfig",
        "description": "sd-webui-lora-train training settings. Missing settings take their defaults.",
        "type": "object",
        "additionalProperties": False,
        "properties": properties,
    }
