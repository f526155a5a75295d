"""``TrainConfig``: the six groups together, their leaf tables, validation and dict forms.

The TOML and JSON-schema methods delegate to ``lora_trainer.config.kohya_toml`` and
``lora_trainer.config.schema``, which build on this module (hence their imports inside the methods).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from lora_trainer.config.coerce import bind_leaves, coerce, unknown
from lora_trainer.config.groups import (
    DatasetConfig,
    NetworkConfig,
    OptimConfig,
    SampleConfig,
    SaveConfig,
    TrainingConfig,
)
from lora_trainer.config.meta import Leaf, build_leaves, jsonable
from lora_trainer.config.validate import FIELD_CHECKS, check_limits, cross_checks
from lora_trainer.config.validation_group import ValidationConfig
from lora_trainer.errors import ConfigError

__all__ = ["GROUPS", "GROUP_CLASSES", "LEAF_BY_PATH", "LEAVES", "TrainConfig", "config_from_groups"]


@dataclass
class TrainConfig:
    """A whole training run's settings. Build it, ``validate()`` it, then hand it to the trainer."""

    dataset: DatasetConfig = field(
        default_factory=DatasetConfig, metadata={"label": "Dataset", "help": DatasetConfig.__doc__}
    )
    network: NetworkConfig = field(
        default_factory=NetworkConfig, metadata={"label": "Network", "help": NetworkConfig.__doc__}
    )
    optim: OptimConfig = field(
        default_factory=OptimConfig, metadata={"label": "Optimizer", "help": OptimConfig.__doc__}
    )
    training: TrainingConfig = field(
        default_factory=TrainingConfig, metadata={"label": "Training", "help": TrainingConfig.__doc__}
    )
    save: SaveConfig = field(default_factory=SaveConfig, metadata={"label": "Saving", "help": SaveConfig.__doc__})
    sample: SampleConfig = field(
        default_factory=SampleConfig, metadata={"label": "Previews", "help": SampleConfig.__doc__}
    )
    validation: ValidationConfig = field(
        default_factory=ValidationConfig, metadata={"label": "Validation loss", "help": ValidationConfig.__doc__}
    )

    # -- validation ----------------------------------------------------------------------------

    def errors(self) -> list[ConfigError]:
        """Every problem, one ``ConfigError`` per problem, in display (``LEAVES``) order."""
        found: list[ConfigError] = []
        values: dict[str, Any] = {}
        for leaf in LEAVES:
            raw = getattr(getattr(self, leaf.group, None), leaf.name, None)
            try:
                value = coerce(leaf, raw)
                check_limits(leaf, value)
                check = FIELD_CHECKS.get(leaf.path)
                message = check(value) if check is not None and value is not None else None
                if message:
                    raise ConfigError(leaf.path, message)
            except ConfigError as exc:
                found.append(exc)
                continue
            values[leaf.path] = value
        found.extend(cross_checks(values))
        return sorted(found, key=lambda e: _ORDER.get(e.field, len(_ORDER)))

    def validate(self) -> TrainConfig:
        """Raise ``ConfigError`` for the first invalid field (display order); return self when all is well."""
        problems = self.errors()
        if problems:
            raise problems[0]
        return self

    # -- dict / JSON ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Nested, JSON-safe dict ({"network": {"network_dim": 16, ...}, ...}); types are checked."""
        out: dict[str, dict[str, Any]] = {group: {} for group in GROUPS}
        for leaf, value in self.leaf_values():
            out[leaf.group][leaf.name] = jsonable(value)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Build from a nested dict; missing settings take defaults. Names and types are checked."""
        if not isinstance(data, Mapping):
            raise ConfigError("config", f"must be an object of setting groups, got {type(data).__name__}")
        flat: dict[str, Any] = {}
        for group, section in data.items():
            if group not in GROUPS:
                raise ConfigError(str(group), unknown(str(group), GROUPS, "setting group"))
            if not isinstance(section, Mapping):
                raise ConfigError(group, f"must be an object of settings, got {type(section).__name__}")
            for name, value in section.items():
                flat[f"{group}.{name}"] = value
        return cls.from_flat(flat)

    def to_flat(self) -> dict[str, Any]:
        """{"network.network_dim": 16, ...} in ``LEAVES`` order, JSON-safe (handy for UI rows)."""
        return {leaf.path: jsonable(value) for leaf, value in self.leaf_values()}

    @classmethod
    def from_flat(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Build from dotted keys ({"network.network_dim": 16}); missing settings take defaults."""
        kwargs: dict[str, dict[str, Any]] = {group: {} for group in GROUPS}
        for path, value in data.items():
            leaf = LEAF_BY_PATH.get(path)
            if leaf is None:
                raise ConfigError(str(path), unknown(str(path), LEAF_BY_PATH, "setting"))
            kwargs[leaf.group][leaf.name] = coerce(leaf, value)
        return config_from_groups(kwargs)

    def leaf_values(self) -> list[tuple[Leaf, Any]]:
        """Every setting with its coerced value, in ``LEAVES`` order (``ConfigError`` for a wrong type)."""
        return [(leaf, coerce(leaf, getattr(getattr(self, leaf.group), leaf.name))) for leaf in LEAVES]

    # -- kohya / TOML / schema (see kohya_toml and schema) ---------------------------------------

    def to_kohya_args(self) -> dict[str, Any]:
        """kohya ``train_network.py`` arguments for the settings kohya has, in kohya's value forms.

        ``resolution`` becomes "W,H", ``optimizer_args`` and ``network_args`` lists of "key=value"
        strings, ``train_unet``/``train_text_encoder`` the two ``*_only`` flags. Unset settings are left out.
        """
        from lora_trainer.config.kohya_toml import kohya_and_ours

        return kohya_and_ours(self)[0]

    def to_toml(self, *, description: str | None = None) -> str:
        """TOML text: kohya arguments in ``[*_arguments]`` tables, our extras under ``[lora_train.*]``.

        ``from_toml(cfg.to_toml()) == cfg`` for any config whose types are right (limits need not hold).
        ``description`` is stored as ``[lora_train] description`` (used by presets).
        """
        from lora_trainer.config.kohya_toml import to_toml

        return to_toml(self, description=description)

    @classmethod
    def from_toml(cls, text: str, *, strict: bool = True) -> TrainConfig:
        """Read our TOML or a kohya ``--config_file`` TOML (see ``parse_toml``)."""
        from lora_trainer.config.kohya_toml import parse_toml

        return parse_toml(text, strict=strict).config

    @staticmethod
    def json_schema() -> dict[str, Any]:
        """JSON schema of ``to_dict()``'s shape (see ``lora_trainer.config.schema.json_schema``)."""
        from lora_trainer.config.schema import json_schema

        return json_schema()


GROUPS = tuple(f.name for f in dataclasses.fields(TrainConfig))
"""The group names, in order: dataset, network, optim, training, save, sample, validation."""
GROUP_CLASSES: dict[str, type] = {f.name: cast(type, f.default_factory) for f in dataclasses.fields(TrainConfig)}
LEAVES: tuple[Leaf, ...] = build_leaves(GROUP_CLASSES)
"""Every setting in display order (groups in ``TrainConfig`` order, fields in class order)."""
LEAF_BY_PATH: dict[str, Leaf] = {leaf.path: leaf for leaf in LEAVES}
_ORDER = {leaf.path: i for i, leaf in enumerate(LEAVES)}
bind_leaves(GROUP_CLASSES, LEAVES)


def config_from_groups(kwargs: Mapping[str, Mapping[str, Any]]) -> TrainConfig:
    """A ``TrainConfig`` from keyword arguments per group ({"network": {"network_dim": 16}, ...})."""
    return TrainConfig(**{group: GROUP_CLASSES[group](**kw) for group, kw in kwargs.items()})
