"""The one typed training config, shared by the UI, the REST API and the CLI.

``TrainConfig`` groups its settings in six stdlib dataclasses::

    TrainConfig
      .dataset   DatasetConfig   where the images are, captions, resolution and buckets, latent cache
      .network   NetworkConfig   the LoRA itself: rank, alpha, conv layers, dropouts, what to train
      .optim     OptimConfig     optimizer, learning rates, scheduler, gradient clipping
      .training  TrainingConfig  length, batch, precision, seed, noise offset, min-SNR, clip skip
      .save      SaveConfig      file name and folder, precision, intermediate saves, metadata
      .sample    SampleConfig    preview images during training

Every field carries ``metadata["help"]`` and a ``metadata["label"]``; where kohya-ss/sd-scripts
(``train_network.py`` with ``networks.lora``) has the same setting, ``metadata["kohya"]`` is kohya's
argument name (``metadata["kohya_network_arg"]`` marks those kohya passes in ``network_args``).
Range and choice limits live in the metadata too (``ge``/``gt``/``le``/``lt``/``choices``), so
``validate()``, ``json_schema()`` and the UI's field table (``lora_trainer.webui.fields``, built from
``LEAVES``) all read the same numbers.

Conventions:

* ``None`` means "unset" and every optional field defaults to ``None`` (what unset means is in its
  help). TOML has no null, so an unset field is simply absent from a TOML file.
* Loaders (``from_dict``, ``from_flat``, ``from_toml``) check types and names only and raise
  ``ConfigError`` naming the dotted field or key. Limits are ``validate()``'s job (first problem)
  and ``errors()``'s (all problems, in display order), so a UI can load, then show every problem.

Modules: ``meta`` (field metadata, choice lists, the ``Leaf`` record), ``coerce`` (types),
``groups`` (the six dataclasses), ``validate`` (limits and rules; it also says why this is not
pydantic), ``model`` (``TrainConfig`` and the leaf tables), ``kohya_toml`` (our TOML and kohya's
``--config_file``), ``schema`` (JSON schema), ``presets``.
"""

from __future__ import annotations

from lora_trainer.config.groups import (
    DatasetConfig,
    NetworkConfig,
    OptimConfig,
    SampleConfig,
    SaveConfig,
    TrainingConfig,
)
from lora_trainer.config.kohya_toml import KOHYA_UNMAPPED, ParsedToml, from_toml, parse_toml
from lora_trainer.config.meta import (
    FORMAT_VERSION,
    LR_SCHEDULERS,
    MAX_TOKEN_LENGTHS,
    MIXED_PRECISIONS,
    NETWORK_MODULES,
    OPTIMIZERS,
    SAVE_PRECISIONS,
    Leaf,
)
from lora_trainer.config.model import GROUPS, LEAF_BY_PATH, LEAVES, TrainConfig
from lora_trainer.config.presets import PRESETS, Preset, get_preset, list_presets, load_preset, save_preset
from lora_trainer.config.schema import json_schema
from lora_trainer.errors import ConfigError

__all__ = [
    "FORMAT_VERSION",
    "GROUPS",
    "KOHYA_UNMAPPED",
    "LEAF_BY_PATH",
    "LEAVES",
    "LR_SCHEDULERS",
    "MAX_TOKEN_LENGTHS",
    "MIXED_PRECISIONS",
    "NETWORK_MODULES",
    "OPTIMIZERS",
    "PRESETS",
    "SAVE_PRECISIONS",
    "ConfigError",
    "DatasetConfig",
    "Leaf",
    "NetworkConfig",
    "OptimConfig",
    "ParsedToml",
    "Preset",
    "SampleConfig",
    "SaveConfig",
    "TrainConfig",
    "TrainingConfig",
    "from_toml",
    "get_preset",
    "json_schema",
    "list_presets",
    "load_preset",
    "parse_toml",
    "save_preset",
]
