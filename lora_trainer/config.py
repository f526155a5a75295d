"""The one typed training config, shared by the UI, the REST API and the CLI.

``TrainConfig`` groups its settings in six stdlib dataclasses (no pydantic: the WebUI pins
pydantic 1.x)::

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
``validate()``, ``json_schema()`` and the UI table ``FIELDS`` all read the same numbers.

Conventions:

* ``None`` means "unset" and every optional field defaults to ``None`` (what unset means is in its
  help). TOML has no null, so an unset field is simply absent from a TOML file.
* Loaders (``from_dict``, ``from_flat``, ``from_toml``) check types and names only and raise
  ``ConfigError`` naming the dotted field or key. Limits are ``validate()``'s job (first problem)
  and ``errors()``'s (all problems, in display order), so a UI can load, then show every problem.

TOML layout (``to_toml``/``from_toml``): kohya's own argument names in kohya-style
``[*_arguments]`` tables (kohya flattens tables, so the file is also a kohya ``--config_file``),
and the settings kohya lacks under ``[lora_train.<group>]``. A file *with* a ``[lora_train]``
table was written by us (or is a preset): absent settings take our defaults. A file *without* it is
read as a kohya config: absent kohya settings take kohya's defaults (``metadata["kohya_default"]``),
so it means what it meant to kohya.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import dataclasses
import difflib
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple, Union, get_args, get_origin, get_type_hints

from lora_trainer.errors import ConfigError
from lora_trainer.log import logger

try:  # Python >= 3.11
    import tomllib as _tomllib
except ModuleNotFoundError:  # Python 3.10 (the WebUI's): the toml package, which kohya uses too
    _tomllib = None

FORMAT_VERSION = 1
"""Version of our TOML layout, written as ``[lora_train] format``."""

OPTIMIZERS = ("AdamW", "AdamW8bit", "Lion", "Prodigy", "Adafactor")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
SAVE_PRECISIONS = ("fp16", "bf16", "float")
MAX_TOKEN_LENGTHS = (75, 150, 225)
NETWORK_MODULES = {"networks.lora": "lora"}
"""kohya ``network_module`` -> our algorithm name (``lora_trainer.networks`` registry)."""

MIN_RESOLUTION = 64  # tiny test models train at 64 px; real use starts at 256
MAX_RESOLUTION = 4096
RESOLUTION_MULTIPLE = 64
MAX_SEED = 2**32 - 1
WIDGETS = ("text", "int", "float", "checkbox", "dropdown", "lines", "kv")
"""Widget kinds in ``FIELDS``: text box, integer, number, checkbox, dropdown (``choices``),
one string per line (``list[str]``), key=value pairs (``dict``)."""

_NO_DEFAULT = object()


def _meta(
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
    widget: str | None = None,
) -> dict[str, Any]:
    """Field metadata: label and help (always), kohya's name and default, limits, UI widget."""
    meta: dict[str, Any] = {"label": label, "help": help}
    for key, value in (
        ("kohya", kohya),
        ("choices", choices),
        ("ge", ge),
        ("gt", gt),
        ("le", le),
        ("lt", lt),
        ("widget", widget),
    ):
        if value is not None:
            meta[key] = value
    if kohya_default is not _NO_DEFAULT:
        meta["kohya_default"] = kohya_default
    if network_arg:
        meta["kohya_network_arg"] = True
    if inverted:
        meta["kohya_inverted"] = True
    return meta


def _f(default: Any, **meta: Any) -> Any:
    """A field with an immutable default and ``_meta(**meta)``."""
    return field(default=default, metadata=_meta(**meta))


class _Group:
    """Shared behaviour of the six groups: canonical values after construction."""

    def __post_init__(self) -> None:
        for leaf in _LEAVES_BY_CLASS.get(type(self), ()):
            with contextlib.suppress(ConfigError):  # a bad value stays as given; errors() reports it
                setattr(self, leaf.name, _coerce(leaf, getattr(self, leaf.name)))


# --------------------------------------------------------------------------------------------
# The groups
# --------------------------------------------------------------------------------------------


@dataclass
class DatasetConfig(_Group):
    """Training images and captions: where they are and how they are read."""

    train_data_dir: str = _f(
        "",
        label="Training images folder",
        kohya="train_data_dir",
        help="Folder holding one subfolder per concept named '<repeats>_<name>' (kohya's layout, e.g. "
        "'10_mychar'), with images and their caption files. Required.",
    )
    trigger_words: list[str] = field(
        default_factory=list,
        metadata=_meta(
            label="Trigger words",
            help="Words that call up the LoRA in a prompt (e.g. the character's name), one per entry. Stored in "
            "the saved file's metadata; your captions should contain them.",
        ),
    )
    caption_extension: str = _f(
        ".txt",
        label="Caption file extension",
        kohya="caption_extension",
        kohya_default=".caption",
        help="Extension of the caption file beside each image ('.txt' for 'img.png' -> 'img.txt').",
    )
    resolution: int | tuple[int, int] = _f(
        512,
        label="Resolution",
        kohya="resolution",
        widget="text",
        help="Training resolution: one size (512) or 'width,height' (512,768). A multiple of 64 from 64 to "
        "4096. 512 for SD1.x, 768 for SD2-768, 1024 for SDXL.",
    )
    enable_bucket: bool = _f(
        True,
        label="Aspect-ratio buckets",
        kohya="enable_bucket",
        kohya_default=False,
        help="Group images by aspect ratio instead of cropping them all square (kohya's default is off; "
        "on is better for mixed image shapes).",
    )
    min_bucket_reso: int = _f(
        256,
        label="Smallest bucket side",
        kohya="min_bucket_reso",
        ge=64,
        le=MAX_RESOLUTION,
        help="Smallest side of a bucket, in pixels; a multiple of the bucket step and at most the resolution.",
    )
    max_bucket_reso: int = _f(
        1024,
        label="Largest bucket side",
        kohya="max_bucket_reso",
        ge=64,
        le=2 * MAX_RESOLUTION,
        help="Largest side of a bucket, in pixels; a multiple of the bucket step and at least the resolution.",
    )
    bucket_reso_steps: int = _f(
        64,
        label="Bucket step",
        kohya="bucket_reso_steps",
        ge=8,
        le=512,
        help="Bucket sizes go up in steps of this many pixels (a multiple of 8; 64 is kohya's default).",
    )
    bucket_no_upscale: bool = _f(
        False,
        label="Never upscale into a bucket",
        kohya="bucket_no_upscale",
        help="Give small images a smaller bucket instead of upscaling them.",
    )
    flip_aug: bool = _f(
        False,
        label="Random horizontal flip",
        kohya="flip_aug",
        help="Flip images left-right at random (doubles variety; avoid for asymmetric subjects or text).",
    )
    shuffle_caption: bool = _f(
        False,
        label="Shuffle caption tags",
        kohya="shuffle_caption",
        help="Shuffle the comma-separated tags of each caption every step (for tag-style captions).",
    )
    keep_tokens: int = _f(
        0,
        label="Keep first N tags",
        kohya="keep_tokens",
        ge=0,
        le=100,
        help="Keep the first N comma-separated tags in place when shuffling or dropping tags (e.g. 1 to "
        "keep a leading trigger word).",
    )
    caption_dropout_rate: float = _f(
        0.0,
        label="Caption dropout rate",
        kohya="caption_dropout_rate",
        ge=0.0,
        lt=1.0,
        help="Chance of training an image with an empty caption (0 = never).",
    )
    caption_tag_dropout_rate: float = _f(
        0.0,
        label="Tag dropout rate",
        kohya="caption_tag_dropout_rate",
        ge=0.0,
        lt=1.0,
        help="Chance of dropping each comma-separated tag (tags kept by 'Keep first N tags' excepted).",
    )
    caption_dropout_every_n_epochs: int = _f(
        0,
        label="Drop all captions every N epochs",
        kohya="caption_dropout_every_n_epochs",
        ge=0,
        le=10000,
        help="Train every Nth epoch without captions (0 = never).",
    )
    max_token_length: int = _f(
        225,
        label="Max caption tokens",
        kohya="max_token_length",
        kohya_default=75,
        choices=MAX_TOKEN_LENGTHS,
        help="Caption length in CLIP tokens: 75, 150 or 225 (longer captions are split into 75-token chunks "
        "as the WebUI does). kohya's default is 75.",
    )
    cache_latents: bool = _f(
        True,
        label="Cache latents",
        kohya="cache_latents",
        kohya_default=False,
        help="Encode every image with the VAE once before training (faster, less VRAM).",
    )
    cache_latents_to_disk: bool = _f(
        False,
        label="Cache latents to disk",
        kohya="cache_latents_to_disk",
        help="Keep the latent cache in files (in the extension's work folder, never beside your images) so the next run reuses it (needs 'Cache latents').",
    )

    @property
    def resolution_wh(self) -> tuple[int, int]:
        """The resolution as (width, height)."""
        res = _coerce_resolution(self.resolution)
        return (res, res) if isinstance(res, int) else res


@dataclass
class NetworkConfig(_Group):
    """The LoRA network: its shape, dropouts and which model parts it trains."""

    network_module: str = _f(
        "networks.lora",
        label="Network type",
        kohya="network_module",
        choices=tuple(NETWORK_MODULES),
        help="Network kind, by kohya's module name: 'networks.lora' = LoRA, plus LoCon when 'Conv rank' is set "
        "(algorithm 'lora' in lora_trainer.networks).",
    )
    network_dim: int = _f(
        16,
        label="Rank (network_dim)",
        kohya="network_dim",
        kohya_default=4,
        ge=1,
        le=1024,
        help="LoRA rank: 16 suits most characters and styles, 32-64 for complex subjects (bigger file). Our "
        "default is 16; kohya's is 4.",
    )
    network_alpha: float = _f(
        8.0,
        label="Alpha (network_alpha)",
        kohya="network_alpha",
        kohya_default=1.0,
        gt=0.0,
        le=1024.0,
        help="Scales the LoRA's output by alpha/rank; half the rank is usual. Our default is 8; kohya's is 1.",
    )
    conv_dim: int = _f(
        0,
        label="Conv rank (LoCon)",
        kohya="conv_dim",
        network_arg=True,
        ge=0,
        le=1024,
        help="Rank for the UNet's 3x3 convolutions (LoCon); 0 = off (plain LoRA).",
    )
    conv_alpha: float = _f(
        1.0,
        label="Conv alpha",
        kohya="conv_alpha",
        network_arg=True,
        gt=0.0,
        le=1024.0,
        help="Alpha for the 3x3 convolutions; used only when 'Conv rank' is set (kohya's default is 1).",
    )
    network_dropout: float = _f(
        0.0,
        label="Dropout",
        kohya="network_dropout",
        ge=0.0,
        lt=1.0,
        help="Dropout on the LoRA's hidden activations (0 = off; 0.1 is typical).",
    )
    rank_dropout: float = _f(
        0.0,
        label="Rank dropout",
        kohya="rank_dropout",
        network_arg=True,
        ge=0.0,
        lt=1.0,
        help="Chance of dropping each rank of the LoRA per step (0 = off).",
    )
    module_dropout: float = _f(
        0.0,
        label="Module dropout",
        kohya="module_dropout",
        network_arg=True,
        ge=0.0,
        lt=1.0,
        help="Chance of skipping a whole LoRA module per step (0 = off).",
    )
    train_unet: bool = _f(
        True,
        label="Train the UNet",
        kohya="network_train_text_encoder_only",
        inverted=True,
        help="Put LoRA on the UNet (kohya: off = network_train_text_encoder_only).",
    )
    train_text_encoder: bool = _f(
        True,
        label="Train the text encoder(s)",
        kohya="network_train_unet_only",
        inverted=True,
        help="Put LoRA on the text encoder(s) too (kohya: off = network_train_unet_only; usually off for SDXL).",
    )

    @property
    def algorithm(self) -> str:
        """Our algorithm name for ``network_module`` ("lora")."""
        return NETWORK_MODULES.get(self.network_module, self.network_module)


@dataclass
class OptimConfig(_Group):
    """Optimizer, learning rates and schedule."""

    optimizer_type: str = _f(
        "AdamW",
        label="Optimizer",
        kohya="optimizer_type",
        choices=OPTIMIZERS,
        help="AdamW (default), AdamW8bit (less VRAM; needs bitsandbytes), Lion (use ~1/3 of the AdamW rate), "
        "Prodigy (sets its own rate: use learning rate 1.0), Adafactor (least memory).",
    )
    optimizer_args: dict[str, Any] = field(
        default_factory=dict,
        metadata=_meta(
            label="Optimizer arguments",
            kohya="optimizer_args",
            help="Extra optimizer keyword arguments, e.g. weight_decay=0.01, betas=[0.9, 0.99]. "
            "In kohya's TOML these are 'key=value' strings.",
        ),
    )
    learning_rate: float = _f(
        1e-4,
        label="Learning rate",
        kohya="learning_rate",
        kohya_default=2e-6,
        gt=0.0,
        le=10.0,
        help="Base learning rate (1e-4 is a good start for LoRA with AdamW; 1.0 with Prodigy). Must be below "
        "1, except for Prodigy (up to 10). Our default is 1e-4; kohya's is 2e-6.",
    )
    unet_lr: float | None = _f(
        None,
        label="UNet learning rate",
        kohya="unet_lr",
        gt=0.0,
        le=10.0,
        help="Learning rate for the UNet's LoRA; unset = the base learning rate.",
    )
    text_encoder_lr: float | None = _f(
        None,
        label="Text encoder learning rate",
        kohya="text_encoder_lr",
        gt=0.0,
        le=10.0,
        help="Learning rate for the text encoders' LoRA; unset = the base learning rate (half of it is common).",
    )
    lr_scheduler: str = _f(
        "cosine",
        label="LR scheduler",
        kohya="lr_scheduler",
        kohya_default="constant",
        choices=LR_SCHEDULERS,
        help="How the learning rate changes over the run. Our default is cosine; kohya's is constant.",
    )
    lr_warmup_steps: int = _f(
        0,
        label="Warmup steps",
        kohya="lr_warmup_steps",
        ge=0,
        le=100_000,
        help="Steps over which the learning rate ramps up from 0 (not with 'constant': use 'constant_with_warmup').",
    )
    lr_scheduler_num_cycles: int = _f(
        1,
        label="Restarts (cosine_with_restarts)",
        kohya="lr_scheduler_num_cycles",
        ge=1,
        le=1000,
        help="Number of cosine cycles for 'cosine_with_restarts'.",
    )
    lr_scheduler_power: float = _f(
        1.0,
        label="Power (polynomial)",
        kohya="lr_scheduler_power",
        gt=0.0,
        le=10.0,
        help="Exponent of the 'polynomial' schedule (1 = linear).",
    )
    max_grad_norm: float = _f(
        1.0,
        label="Gradient clipping norm",
        kohya="max_grad_norm",
        ge=0.0,
        le=100.0,
        help="Clip gradients to this norm (0 = no clipping).",
    )

    @property
    def resolved_unet_lr(self) -> float:
        """The UNet's learning rate (``unet_lr``, or ``learning_rate`` when unset)."""
        return self.learning_rate if self.unet_lr is None else self.unet_lr

    @property
    def resolved_text_encoder_lr(self) -> float:
        """The text encoders' learning rate (``text_encoder_lr``, or ``learning_rate`` when unset)."""
        return self.learning_rate if self.text_encoder_lr is None else self.text_encoder_lr


@dataclass
class TrainingConfig(_Group):
    """Length, batch, precision and the training objective's knobs."""

    max_train_epochs: int = _f(
        10,
        label="Epochs",
        kohya="max_train_epochs",
        ge=1,
        le=10_000,
        help="Number of passes over the dataset (with folder repeats). Ignored when 'Max steps' is set.",
    )
    max_train_steps: int | None = _f(
        None,
        label="Max steps",
        kohya="max_train_steps",
        kohya_default=1600,
        ge=1,
        le=1_000_000,
        help="Stop after this many optimizer steps; unset = from the epochs. (In a kohya file without "
        "[lora_train], epochs win over steps, as in kohya.)",
    )
    train_batch_size: int = _f(
        1,
        label="Batch size",
        kohya="train_batch_size",
        ge=1,
        le=64,
        help="Images per step; raise it only if VRAM allows (the WebUI's model is loaded too).",
    )
    gradient_accumulation_steps: int = _f(
        1,
        label="Gradient accumulation",
        kohya="gradient_accumulation_steps",
        ge=1,
        le=256,
        help="Add up gradients over N batches before each optimizer step (a bigger batch without more VRAM).",
    )
    gradient_checkpointing: bool = _f(
        False,
        label="Gradient checkpointing",
        kohya="gradient_checkpointing",
        help="Recompute activations in the backward pass: much less VRAM, about 20-30% slower.",
    )
    mixed_precision: str = _f(
        "fp16",
        label="Mixed precision",
        kohya="mixed_precision",
        kohya_default="no",
        choices=MIXED_PRECISIONS,
        help="Autocast precision: fp16 (most GPUs), bf16 (RTX 30xx and newer), no (fp32, e.g. on CPU). "
        "kohya's default is 'no'.",
    )
    seed: int | None = _f(
        None,
        label="Seed",
        kohya="seed",
        ge=0,
        le=MAX_SEED,
        help="Random seed for a reproducible run; unset = a random seed each run (as kohya).",
    )
    clip_skip: int | None = _f(
        None,
        label="CLIP skip",
        kohya="clip_skip",
        kohya_default=1,
        ge=1,
        le=12,
        help="Use the text encoder's Nth layer from the end (2 for anime models); unset = the WebUI's "
        "'Clip skip' setting. SDXL ignores it.",
    )
    noise_offset: float = _f(
        0.0,
        label="Noise offset",
        kohya="noise_offset",
        ge=0.0,
        le=1.0,
        help="Offset noise strength for darker darks / brighter brights (0 = off; 0.05-0.1 is typical).",
    )
    min_snr_gamma: float | None = _f(
        None,
        label="Min-SNR gamma",
        kohya="min_snr_gamma",
        ge=0.0,
        le=100.0,
        help="Min-SNR loss weighting; 5 is the paper's value. Unset or 0 = off.",
    )


@dataclass
class SaveConfig(_Group):
    """Where and how the LoRA file is written."""

    output_name: str = _f(
        "my_lora",
        label="File name",
        kohya="output_name",
        kohya_default="last",
        help="File name without extension; the LoRA is then used as <lora:NAME:1>. Letters, digits, spaces, "
        "'-', '_' and '.', no path separators.",
    )
    output_dir: str | None = _f(
        None,
        label="Output folder",
        kohya="output_dir",
        help="Folder to write the LoRA to; unset = the WebUI's Lora folder (models/Lora).",
    )
    overwrite: bool = _f(
        False,
        label="Overwrite an existing file",
        help="Replace a file of the same name; off = stop with an error before training.",
    )
    save_precision: str = _f(
        "fp16",
        label="Save precision",
        kohya="save_precision",
        kohya_default="float",
        choices=SAVE_PRECISIONS,
        help="Weight precision in the file: fp16 (usual), bf16, or float (fp32, twice the size).",
    )
    save_every_n_epochs: int | None = _f(
        None,
        label="Save every N epochs",
        kohya="save_every_n_epochs",
        ge=1,
        le=10_000,
        help="Also save a numbered file every N epochs; unset = only the final file.",
    )
    save_every_n_steps: int | None = _f(
        None,
        label="Save every N steps",
        kohya="save_every_n_steps",
        ge=1,
        le=1_000_000,
        help="Also save a numbered file every N steps; unset = off.",
    )
    save_state: bool = _f(
        False,
        label="Save resume state",
        kohya="save_state",
        help="Also write the optimizer state (safetensors + JSON) with each save, so training can resume.",
    )
    training_comment: str | None = _f(
        None,
        label="Training comment",
        kohya="training_comment",
        help="Free text stored in the file's metadata (ss_training_comment).",
    )
    metadata_title: str | None = _f(
        None,
        label="Title",
        kohya="metadata_title",
        help="Title in the file's metadata (modelspec.title); unset = the file name.",
    )
    metadata_author: str | None = _f(
        None,
        label="Author",
        kohya="metadata_author",
        help="Author in the file's metadata (modelspec.author).",
    )
    metadata_description: str | None = _f(
        None,
        label="Description",
        kohya="metadata_description",
        help="Description in the file's metadata (modelspec.description).",
    )
    metadata_tags: str | None = _f(
        None,
        label="Tags",
        kohya="metadata_tags",
        help="Comma-separated tags in the file's metadata (modelspec.tags).",
    )


@dataclass
class SampleConfig(_Group):
    """Preview images generated during training."""

    sample_every_n_steps: int | None = _f(
        None,
        label="Preview every N steps",
        kohya="sample_every_n_steps",
        ge=1,
        le=1_000_000,
        help="Generate previews every N steps; unset = off.",
    )
    sample_every_n_epochs: int | None = _f(
        None,
        label="Preview every N epochs",
        kohya="sample_every_n_epochs",
        ge=1,
        le=1_000_000,
        help="Generate previews every N epochs; unset = off.",
    )
    sample_prompts: list[str] = field(
        default_factory=list,
        metadata=_meta(
            label="Preview prompts",
            help="Prompts for the previews, one per entry. (kohya's sample_prompts is a file path instead and is "
            "not read.)",
        ),
    )
    sample_sampler: str = _f(
        "Euler a",
        label="Preview sampler",
        help="WebUI sampler name for previews, e.g. 'Euler a' or 'DPM++ 2M'.",
    )
    sample_steps: int = _f(20, label="Preview steps", ge=1, le=150, help="Sampling steps per preview.")
    sample_cfg: float = _f(7.0, label="Preview CFG scale", ge=1.0, le=30.0, help="CFG scale for previews.")
    sample_seed: int | None = _f(
        None,
        label="Preview seed",
        ge=0,
        le=MAX_SEED,
        help="Seed of every preview, so they can be compared; unset = one random seed for the whole run.",
    )
    sample_width: int | None = _f(
        None,
        label="Preview width",
        ge=64,
        le=MAX_RESOLUTION,
        help="Preview width in pixels (a multiple of 8); unset = the training resolution.",
    )
    sample_height: int | None = _f(
        None,
        label="Preview height",
        ge=64,
        le=MAX_RESOLUTION,
        help="Preview height in pixels (a multiple of 8); unset = the training resolution.",
    )


class ParsedToml(NamedTuple):
    """What ``parse_toml`` read: the config, the kohya settings it did not use, and a preset description."""

    config: TrainConfig
    ignored: dict[str, Any]
    description: str | None


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

    # -- validation ----------------------------------------------------------------------------

    def errors(self) -> list[ConfigError]:
        """Every problem, one ``ConfigError`` per problem, in display (``FIELDS``) order."""
        found: list[ConfigError] = []
        values: dict[str, Any] = {}
        for leaf in _LEAVES:
            raw = getattr(getattr(self, leaf.group, None), leaf.name, None)
            try:
                value = _coerce(leaf, raw)
                _check_limits(leaf, value)
                check = _FIELD_CHECKS.get(leaf.path)
                message = check(value) if check is not None and value is not None else None
                if message:
                    raise ConfigError(leaf.path, message)
            except ConfigError as exc:
                found.append(exc)
                continue
            values[leaf.path] = value
        found.extend(_cross_checks(values))
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
        for leaf, value in self._values():
            out[leaf.group][leaf.name] = _jsonable(value)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Build from a nested dict; missing settings take defaults. Names and types are checked."""
        if not isinstance(data, Mapping):
            raise ConfigError("config", f"must be an object of setting groups, got {type(data).__name__}")
        flat: dict[str, Any] = {}
        for group, section in data.items():
            if group not in GROUPS:
                raise ConfigError(str(group), _unknown(str(group), GROUPS, "setting group"))
            if not isinstance(section, Mapping):
                raise ConfigError(group, f"must be an object of settings, got {type(section).__name__}")
            for name, value in section.items():
                flat[f"{group}.{name}"] = value
        return cls.from_flat(flat)

    def to_flat(self) -> dict[str, Any]:
        """{"network.network_dim": 16, ...} in ``FIELDS`` order, JSON-safe (handy for UI rows)."""
        return {leaf.path: _jsonable(value) for leaf, value in self._values()}

    @classmethod
    def from_flat(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Build from dotted keys ({"network.network_dim": 16}); missing settings take defaults."""
        kwargs: dict[str, dict[str, Any]] = {group: {} for group in GROUPS}
        for path, value in data.items():
            leaf = _LEAF_BY_PATH.get(path)
            if leaf is None:
                raise ConfigError(str(path), _unknown(str(path), _LEAF_BY_PATH, "setting"))
            kwargs[leaf.group][leaf.name] = _coerce(leaf, value)
        return cls(**{group: _GROUP_CLASSES[group](**kw) for group, kw in kwargs.items()})

    # -- kohya / TOML --------------------------------------------------------------------------

    def to_kohya_args(self) -> dict[str, Any]:
        """kohya ``train_network.py`` arguments for the settings kohya has, in kohya's value forms.

        ``resolution`` becomes "W,H", ``optimizer_args`` and ``network_args`` lists of "key=value"
        strings, ``train_unet``/``train_text_encoder`` the two ``*_only`` flags. Unset settings are left out.
        """
        return self._kohya_and_ours()[0]

    def to_toml(self, *, description: str | None = None) -> str:
        """TOML text: kohya arguments in ``[*_arguments]`` tables, our extras under ``[lora_train.*]``.

        ``from_toml(cfg.to_toml()) == cfg`` for any config whose types are right (limits need not hold).
        ``description`` is stored as ``[lora_train] description`` (used by presets).
        """
        kohya, ours = self._kohya_and_ours()
        lines = [
            "# sd-webui-lora-train training config.",
            "# The [*_arguments] tables hold kohya-ss/sd-scripts train_network.py arguments under kohya's names",
            "# (kohya flattens tables, so this also works as its --config_file); [lora_train.*] holds the rest.",
        ]
        for group in GROUPS:
            section = {k: v for k, v in kohya.items() if _KOHYA_KEY_GROUP[k] == group}
            if section:
                lines += ["", f"[{_KOHYA_SECTIONS[group]}]"]
                lines += [f"{key} = {_toml_value(value)}" for key, value in section.items()]
        lines += ["", "[lora_train]", f"format = {FORMAT_VERSION}"]
        if description is not None:
            lines.append(f"description = {_toml_value(description)}")
        for group in GROUPS:
            if ours[group]:
                lines += ["", f"[lora_train.{group}]"]
                lines += [f"{key} = {_toml_value(value)}" for key, value in ours[group].items()]
        return "\n".join(lines) + "\n"

    @classmethod
    def from_toml(cls, text: str, *, strict: bool = True) -> TrainConfig:
        """Read our TOML or a kohya ``--config_file`` TOML (see ``parse_toml``)."""
        return parse_toml(text, strict=strict).config

    @staticmethod
    def json_schema() -> dict[str, Any]:
        """JSON schema of ``to_dict()``'s shape (see the module function)."""
        return json_schema()

    # -- helpers -------------------------------------------------------------------------------

    def _values(self) -> list[tuple[_Leaf, Any]]:
        return [(leaf, _coerce(leaf, getattr(getattr(self, leaf.group), leaf.name))) for leaf in _LEAVES]

    def _kohya_and_ours(self) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        values = {leaf.path: value for leaf, value in self._values()}
        kohya: dict[str, Any] = {}
        ours: dict[str, dict[str, Any]] = {group: {} for group in GROUPS}
        network_args: list[str] = []
        for leaf in _LEAVES:
            value = values[leaf.path]
            kohya_name = leaf.meta.get("kohya")
            if value is None:
                continue
            if kohya_name is None or (
                leaf.path == "training.max_train_epochs" and values["training.max_train_steps"] is not None
            ):
                # kohya lacks it, or (epochs while steps is set) kohya would let it override steps.
                ours[leaf.group][leaf.name] = _jsonable(value)
            elif leaf.meta.get("kohya_network_arg"):
                kohya.setdefault("network_args", network_args)
                if value != leaf.default:  # absent = the default, in kohya (None/1.0) and here alike
                    network_args.append(f"{kohya_name}={value}")
            elif leaf.meta.get("kohya_inverted"):
                kohya[kohya_name] = not value
            elif leaf.kind == "resolution":
                w, h = (value, value) if isinstance(value, int) else value
                kohya[kohya_name] = f"{w},{h}"
            elif kohya_name == "optimizer_args":
                kohya[kohya_name] = [f"{k}={_py_literal(v)}" for k, v in value.items()]
            else:
                kohya[kohya_name] = _jsonable(value)
        if not network_args:
            kohya.pop("network_args", None)
        return kohya, ours


GROUPS = tuple(f.name for f in dataclasses.fields(TrainConfig))
_GROUP_CLASSES: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(TrainConfig)}
_KOHYA_SECTIONS = {
    "dataset": "dataset_arguments",
    "network": "additional_network_arguments",
    "optim": "optimizer_arguments",
    "training": "training_arguments",
    "save": "saving_arguments",
    "sample": "sample_prompt_arguments",
}


# --------------------------------------------------------------------------------------------
# Leaves: one record per field, built from the dataclasses
# --------------------------------------------------------------------------------------------


class _Leaf(NamedTuple):
    path: str  # "network.network_dim"
    group: str
    name: str
    kind: str  # bool | int | float | str | str_list | dict | resolution
    optional: bool
    default: Any
    meta: Mapping[str, Any]


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


def _build_leaves() -> tuple[_Leaf, ...]:
    leaves = []
    for group, cls in _GROUP_CLASSES.items():
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kind, optional = _kind_of(hints[f.name])
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            leaves.append(_Leaf(f"{group}.{f.name}", group, f.name, kind, optional, default, f.metadata))
    return tuple(leaves)


_LEAVES = _build_leaves()
_LEAF_BY_PATH = {leaf.path: leaf for leaf in _LEAVES}
_LEAVES_BY_CLASS: dict[type, tuple[_Leaf, ...]] = {
    cls: tuple(leaf for leaf in _LEAVES if leaf.group == group) for group, cls in _GROUP_CLASSES.items()
}
_ORDER = {leaf.path: i for i, leaf in enumerate(_LEAVES)}
_KOHYA_TO_LEAF = {
    leaf.meta["kohya"]: leaf for leaf in _LEAVES if "kohya" in leaf.meta and not leaf.meta.get("kohya_network_arg")
}
_NETWORK_ARG_LEAVES = {leaf.meta["kohya"]: leaf for leaf in _LEAVES if leaf.meta.get("kohya_network_arg")}
_KOHYA_KEY_GROUP = {name: leaf.group for name, leaf in _KOHYA_TO_LEAF.items()} | {"network_args": "network"}


# --------------------------------------------------------------------------------------------
# Types
# --------------------------------------------------------------------------------------------

_KIND_TEXT = {
    "bool": "true or false",
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "str_list": "a list of strings",
    "dict": "an object of name: value pairs",
    "resolution": "a size like 512 or 'width,height' like '512,768'",
}


def _coerce_resolution(value: Any) -> int | tuple[int, int]:
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
    if kind == "str_list" and isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    if kind == "dict" and isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(k)
            out[k] = _coerce_arg_value(v)
        return out
    if kind == "resolution":
        return _coerce_resolution(value)
    raise ValueError(value)


def _coerce_arg_value(value: Any) -> Any:
    """An optimizer argument: bool, number, string, or a list of those (tuples become lists)."""
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float, str)) for v in value):
        return list(value)
    raise ValueError(value)


def _coerce(leaf: _Leaf, value: Any) -> Any:
    if value is None and leaf.optional:
        return None
    try:
        return _coerce_value(leaf.kind, value)
    except ValueError:
        pass
    expected = _KIND_TEXT[leaf.kind] + (" or null (unset)" if leaf.optional else "")
    if leaf.kind == "dict" and isinstance(value, Mapping):
        expected = "an object of name: value pairs whose values are true/false, numbers, strings or lists of those"
    raise ConfigError(leaf.path, f"must be {expected}, got {type(value).__name__} {_short(value)}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _unknown(name: str, known: Iterable[str], what: str) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown {what}{hint}"


# --------------------------------------------------------------------------------------------
# Limits and checks
# --------------------------------------------------------------------------------------------


def _num(x: float) -> str:
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return f"{x:g}" if isinstance(x, float) else str(x)


def _limits_text(kind: str, ge: Any = None, gt: Any = None, le: Any = None, lt: Any = None) -> str:
    noun = "an integer" if kind == "int" else "a number"
    if ge is not None and le is not None:
        return f"{noun} from {_num(ge)} to {_num(le)}"
    parts = []
    if ge is not None:
        parts.append(f"at least {_num(ge)}")
    if gt is not None:
        parts.append(f"greater than {_num(gt)}")
    if le is not None:
        parts.append(f"at most {_num(le)}")
    if lt is not None:
        parts.append(f"less than {_num(lt)}")
    return f"{noun} " + " and ".join(parts)


def _out_of(value: float, ge: Any = None, gt: Any = None, le: Any = None, lt: Any = None) -> bool:
    return (
        not math.isfinite(value)
        or (ge is not None and value < ge)
        or (gt is not None and value <= gt)
        or (le is not None and value > le)
        or (lt is not None and value >= lt)
    )


def _check_limits(leaf: _Leaf, value: Any) -> None:
    if value is None:
        return
    meta = leaf.meta
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        lowered = {str(c).lower(): c for c in choices}
        hint = ""
        if isinstance(value, str) and value.lower() in lowered:
            hint = f" (did you mean {lowered[value.lower()]!r}?)"
        raise ConfigError(leaf.path, f"must be one of {listed}, got {value!r}{hint}")
    bounds = {k: meta[k] for k in ("ge", "gt", "le", "lt") if k in meta}
    if bounds and leaf.kind in ("int", "float") and _out_of(value, **bounds):
        unset = " (or unset)" if leaf.optional else ""
        raise ConfigError(leaf.path, f"must be {_limits_text(leaf.kind, **bounds)}{unset}, got {_num(value)}")


_WINDOWS_RESERVED = {"con", "prn", "aux", "nul"} | {f"{p}{i}" for p in ("com", "lpt") for i in range(1, 10)}
_BAD_NAME_CHARS = set('/\\:*?"<>|')


def _check_output_name(name: str) -> str | None:
    if not name.strip():
        return "must not be empty: give the LoRA a file name, e.g. 'my_character'"
    if len(name) > 200:
        return f"must be at most 200 characters, got {len(name)}"
    bad = sorted({c for c in name if c in _BAD_NAME_CHARS or ord(c) < 32 or ord(c) == 127})
    if bad:
        return f"must be a plain file name without {' '.join(repr(c) for c in bad)} (no folders: use save.output_dir)"
    if name in (".", "..") or name.startswith(".."):
        return f"must be a plain file name, not {name!r}"
    if name != name.strip() or name.endswith("."):
        return f"must not start or end with a space or end with a dot, got {name!r}"
    if name.split(".")[0].lower() in _WINDOWS_RESERVED:
        return f"{name!r} is a reserved file name on Windows; pick another"
    if name.lower().endswith((".safetensors", ".pt", ".ckpt")):
        return f"leave out the extension: {name.rsplit('.', 1)[0]!r} (the file is always .safetensors)"
    return None


def _check_resolution(value: int | tuple[int, int]) -> str | None:
    sides = (value, value) if isinstance(value, int) else value
    if any(s % RESOLUTION_MULTIPLE or not MIN_RESOLUTION <= s <= MAX_RESOLUTION for s in sides):
        shown = str(value) if isinstance(value, int) else f"'{value[0]},{value[1]}'"
        return (
            f"each side must be a multiple of {RESOLUTION_MULTIPLE} from {MIN_RESOLUTION} to {MAX_RESOLUTION} "
            f"(e.g. 512, 768, 1024 or '512,768'), got {shown}"
        )
    return None


def _check_optimizer_args(args: dict[str, Any]) -> str | None:
    for key, value in args.items():
        if not key.isidentifier():
            return f"argument names must be Python identifiers (like weight_decay), got {key!r}"
        if key in ("lr", "params"):
            return f"{key!r} is set by the trainer: use the learning-rate settings instead"
        if isinstance(value, float) and not math.isfinite(value):
            return f"{key} must be a finite number, got {value}"
    return None


def _check_list(what: str, *, no_commas: bool = False) -> Callable[[list[str]], str | None]:
    def check(items: list[str]) -> str | None:
        for i, item in enumerate(items):
            if not item.strip():
                return f"entry {i + 1} is empty: each {what} must have text"
            if no_commas and "," in item:
                return f"{item!r} contains a comma: give each {what} as its own entry"
        return None

    return check


_FIELD_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "dataset.train_data_dir": lambda v: (
        None if v.strip() else "is required: the folder holding '<repeats>_<name>' subfolders of images and captions"
    ),
    "dataset.trigger_words": _check_list("trigger word", no_commas=True),
    "dataset.caption_extension": lambda v: (
        None
        if re.fullmatch(r"\.[A-Za-z0-9_-]{1,15}", v)
        else f"must be a dot and 1-15 letters/digits, like '.txt' or '.caption', got {v!r}"
    ),
    "dataset.resolution": _check_resolution,
    "dataset.bucket_reso_steps": lambda v: None if v % 8 == 0 else f"must be a multiple of 8 (64 is usual), got {v}",
    "optim.optimizer_args": _check_optimizer_args,
    "save.output_name": _check_output_name,
    "save.output_dir": lambda v: (
        None if v.strip() and "\0" not in v else "must be a folder path, or unset for the WebUI's Lora folder"
    ),
    "sample.sample_prompts": _check_list("prompt"),
    "sample.sample_sampler": lambda v: None if v.strip() else "must name a WebUI sampler, e.g. 'Euler a'",
    "sample.sample_width": lambda v: None if v % 8 == 0 else f"must be a multiple of 8, got {v}",
    "sample.sample_height": lambda v: None if v % 8 == 0 else f"must be a multiple of 8, got {v}",
}


def _cross_checks(v: dict[str, Any]) -> list[ConfigError]:
    """Checks between fields; each runs only when the fields it reads are individually valid."""
    out: list[ConfigError] = []

    def ok(*paths: str) -> bool:
        return all(p in v for p in paths)

    # network
    if ok("network.train_unet", "network.train_text_encoder") and not (
        v["network.train_unet"] or v["network.train_text_encoder"]
    ):
        out.append(
            ConfigError(
                "network.train_unet",
                "network.train_unet and network.train_text_encoder are both off, so nothing would be trained; "
                "turn on at least one",
            )
        )
    # learning rates: below 1, except Prodigy (a multiplier of its own estimate, usually 1.0)
    if ok("optim.optimizer_type"):
        prodigy = v["optim.optimizer_type"] == "Prodigy"
        for path in ("optim.learning_rate", "optim.unet_lr", "optim.text_encoder_lr"):
            lr = v.get(path)
            if lr is None or prodigy or lr < 1.0:
                continue
            unset = " (or unset)" if path != "optim.learning_rate" else ""
            out.append(
                ConfigError(
                    path,
                    f"must be a number greater than 0 and less than 1{unset} with {v['optim.optimizer_type']}, "
                    f"got {_num(lr)} (1e-4 is a good start; only Prodigy takes about 1.0)",
                )
            )
    if ok("optim.lr_scheduler", "optim.lr_warmup_steps") and (
        v["optim.lr_scheduler"] == "constant" and v["optim.lr_warmup_steps"] > 0
    ):
        out.append(
            ConfigError(
                "optim.lr_warmup_steps",
                "must be 0 with the 'constant' scheduler; for a warmup choose 'constant_with_warmup'",
            )
        )
    if ok("optim.lr_warmup_steps", "training.max_train_steps") and (
        v["training.max_train_steps"] is not None and v["optim.lr_warmup_steps"] >= v["training.max_train_steps"]
    ):
        out.append(
            ConfigError(
                "optim.lr_warmup_steps",
                f"must be less than training.max_train_steps ({v['training.max_train_steps']}), "
                f"got {v['optim.lr_warmup_steps']}",
            )
        )
    # dataset: latent cache, buckets
    if ok("dataset.cache_latents", "dataset.cache_latents_to_disk") and (
        v["dataset.cache_latents_to_disk"] and not v["dataset.cache_latents"]
    ):
        out.append(
            ConfigError(
                "dataset.cache_latents_to_disk",
                "needs dataset.cache_latents on (or turn this off)",
            )
        )
    bucket_paths = (
        "dataset.enable_bucket",
        "dataset.resolution",
        "dataset.min_bucket_reso",
        "dataset.max_bucket_reso",
        "dataset.bucket_reso_steps",
    )
    if ok(*bucket_paths) and v["dataset.enable_bucket"]:
        res = v["dataset.resolution"]
        w, h = (res, res) if isinstance(res, int) else res
        lo, hi, step = v["dataset.min_bucket_reso"], v["dataset.max_bucket_reso"], v["dataset.bucket_reso_steps"]
        for path, value in (("dataset.min_bucket_reso", lo), ("dataset.max_bucket_reso", hi)):
            if value % step:
                out.append(ConfigError(path, f"must be a multiple of dataset.bucket_reso_steps ({step}), got {value}"))
        if lo > min(w, h):
            out.append(
                ConfigError(
                    "dataset.min_bucket_reso",
                    f"must be at most the resolution's smaller side ({min(w, h)}), got {lo}",
                )
            )
        if hi < max(w, h):
            out.append(
                ConfigError(
                    "dataset.max_bucket_reso",
                    f"must be at least the resolution's larger side ({max(w, h)}), got {hi}",
                )
            )
    # previews
    if ok("sample.sample_every_n_steps", "sample.sample_every_n_epochs", "sample.sample_prompts"):
        on = v["sample.sample_every_n_steps"] is not None or v["sample.sample_every_n_epochs"] is not None
        if on and not v["sample.sample_prompts"]:
            out.append(
                ConfigError(
                    "sample.sample_prompts",
                    "is empty but previews are on (sample.sample_every_n_steps/_epochs): add a prompt, "
                    "or unset both to turn previews off",
                )
            )
    return out


# --------------------------------------------------------------------------------------------
# TOML
# --------------------------------------------------------------------------------------------


def _names(text: str) -> frozenset[str]:
    return frozenset(text.split())


# kohya train_network.py arguments (sd-scripts 48d368f: train_util, train_network, sdxl_train_util,
# custom_train_functions, deepspeed_utils, sai_model_spec, utils) that we do not map. A kohya file
# may hold them; we report them in ParsedToml.ignored instead of failing.
KOHYA_UNMAPPED = _names(
    """
    adaptive_noise_scale alpha_mask async_upload base_weights base_weights_multiplier blocks_to_swap cache_info
    cache_text_encoder_outputs cache_text_encoder_outputs_to_disk caption_prefix caption_separator caption_suffix
    ckpt color_aug conditioning_data_dir config_file console_log_file console_log_level console_log_simple
    cpu_offload_checkpointing dataset_class dataset_config dataset_repeats ddp_gradient_as_bucket_view
    ddp_static_graph ddp_timeout debiased_estimation_loss debug_dataset deepspeed dim_from_weights
    disable_mmap_load_safetensors dynamo_backend enable_wildcard face_crop_aug_range
    fp16_master_weights_and_gradients fp8_base fp8_base_unet full_bf16 full_fp16 fused_backward_pass highvram
    huber_c huber_scale huber_schedule huggingface_path_in_repo huggingface_repo_id huggingface_repo_type
    huggingface_repo_visibility huggingface_token in_json initial_epoch initial_step ip_noise_gamma
    ip_noise_gamma_random_strength keep_tokens_separator log_config log_prefix log_tracker_config
    log_tracker_name log_with logging_dir logit_mean logit_std loss_type lowram lr_decay_steps lr_scheduler_args
    lr_scheduler_min_lr_ratio lr_scheduler_timescale lr_scheduler_type masked_loss max_data_loader_n_workers
    max_timestep max_validation_steps mem_eff_attn metadata_is_negative_embedding metadata_license
    metadata_merged_from metadata_preprocessor metadata_thumbnail metadata_trigger_phrase metadata_usage_hint
    min_timestep mode_scale multires_noise_discount multires_noise_iterations network_weights no_half_vae
    no_metadata noise_offset_random_strength offload_optimizer_device offload_optimizer_nvme_path
    offload_param_device offload_param_nvme_path output_config persistent_data_loader_workers
    pretrained_model_name_or_path prior_loss_weight random_crop reg_data_dir resize_interpolation resume
    resume_from_huggingface sample_at_first sample_prompts sample_sampler save_last_n_epochs
    save_last_n_epochs_state save_last_n_steps save_last_n_steps_state save_model_as save_n_epoch_ratio
    save_state_on_train_end save_state_to_huggingface scale_v_pred_loss_like_noise_pred scale_weight_norms sdpa
    secondary_separator skip_cache_check skip_until_initial_step text_encoder_batch_size token_warmup_min
    token_warmup_step tokenizer_cache_dir torch_compile use_safetensors v2 v_parameterization v_pred_like_loss
    vae vae_batch_size validate_every_n_epochs validate_every_n_steps validation_seed validation_split
    wandb_api_key wandb_run_name weighted_captions weighting_scheme xformers zero3_init_flag
    zero3_save_16bit_model zero_stage zero_terminal_snr
    """
)
# ... of which these only concern the environment, the base model (the WebUI's) or logging: ignored quietly.
_KOHYA_INERT = _names(
    """
    async_upload cache_info ckpt config_file console_log_file console_log_level console_log_simple
    ddp_gradient_as_bucket_view ddp_static_graph ddp_timeout debug_dataset deepspeed disable_mmap_load_safetensors
    dynamo_backend highvram huggingface_path_in_repo huggingface_repo_id huggingface_repo_type
    huggingface_repo_visibility huggingface_token log_config log_prefix log_tracker_config log_tracker_name
    log_with logging_dir lowram max_data_loader_n_workers mem_eff_attn no_half_vae no_metadata
    offload_optimizer_device offload_optimizer_nvme_path offload_param_device offload_param_nvme_path
    output_config persistent_data_loader_workers pretrained_model_name_or_path prior_loss_weight
    resume_from_huggingface sample_sampler save_model_as save_state_to_huggingface sdpa skip_cache_check
    text_encoder_batch_size tokenizer_cache_dir use_safetensors v2 v_parameterization vae vae_batch_size
    wandb_api_key wandb_run_name xformers zero3_init_flag zero3_save_16bit_model zero_stage
    """
)
# networks.lora create_network() keyword arguments we do not support.
_KOHYA_UNMAPPED_NETWORK_ARGS = _names(
    """
    block_dims block_alphas conv_block_dims conv_block_alphas down_lr_weight mid_lr_weight up_lr_weight
    block_lr_zero_threshold loraplus_lr_ratio loraplus_unet_lr_ratio loraplus_text_encoder_lr_ratio
    exclude_patterns include_patterns
    """
)
_KOHYA_ALIASES = {"caption_extention": "caption_extension"}  # kohya's old misspelling, still accepted by kohya
_KOHYA_LEGACY_OPTIMIZER = {"use_8bit_adam": "AdamW8bit", "use_lion_optimizer": "Lion"}


def _toml_loads(text: str) -> dict[str, Any]:
    try:
        if _tomllib is not None:
            return _tomllib.loads(text)
        import toml

        return toml.loads(text)
    except ValueError as exc:  # tomllib.TOMLDecodeError and toml.TomlDecodeError are ValueErrors
        raise ConfigError("toml", f"is not valid TOML: {exc}") from None


def _toml_str(s: str) -> str:
    out = ['"']
    for ch in s:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return (
            repr(value) if math.isfinite(value) else ("nan" if math.isnan(value) else ("inf" if value > 0 else "-inf"))
        )
    if isinstance(value, str):
        return _toml_str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")  # unreachable for coerced values


def _py_literal(value: Any) -> str:
    """An optimizer argument as kohya's ast.literal_eval reads it (lists as tuples: betas=(0.9, 0.99))."""
    if isinstance(value, list):
        return repr(tuple(value))
    return repr(value)


def _parse_kv_list(path: str, value: Any, *, literal: bool) -> dict[str, Any]:
    """kohya's ["key=value", ...] lists (network_args: strings; optimizer_args: Python literals)."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(path, f"must be a list of 'key=value' strings, got {_short(value)}")
    out: dict[str, Any] = {}
    for item in value:
        key, sep, text = item.partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not key:
            raise ConfigError(path, f"entries must look like 'key=value', got {item!r}")
        if literal:
            try:
                parsed = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                parsed = text  # kohya would fail here; keep the bare word as a string
            out[key] = parsed  # tuples become lists when the field is coerced
        else:
            out[key] = _parse_scalar(text)
    return out


def _parse_scalar(text: str) -> Any:
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def _flatten_kohya(data: dict[str, Any]) -> dict[str, tuple[Any, str]]:
    """kohya's read_config_from_file: top-level keys and one level of tables, later keys winning."""
    flat: dict[str, tuple[Any, str]] = {}
    for key, value in data.items():
        items = value.items() if isinstance(value, dict) else [(key, value)]
        prefix = f"{key}." if isinstance(value, dict) else ""
        for name, item in items:
            if name in flat:
                logger.warning(
                    "kohya setting %r is set twice (%s and %s%s); the later one wins, as in kohya",
                    name,
                    flat[name][1],
                    prefix,
                    name,
                )
            flat[name] = (item, prefix + name)
    return flat


def parse_toml(text: str, *, strict: bool = True) -> ParsedToml:
    """Read our TOML (``to_toml``) or a kohya ``train_network.py --config_file`` TOML.

    kohya settings are read under kohya's names from any table (kohya flattens them); ours come from
    ``[lora_train.<group>]``. Without a ``[lora_train]`` table, absent kohya settings take kohya's own
    defaults. kohya settings we do not use are returned in ``ignored`` (logged when they change training).
    Unknown names raise ``ConfigError`` naming them, or with ``strict=False`` are ignored too.
    Types are checked here; limits are ``validate()``'s job.
    """
    data = _toml_loads(text)
    ours = data.pop("lora_train", None)
    if "datasets" in data:
        raise ConfigError(
            "datasets",
            "this is a kohya --dataset_config file ([general]/[[datasets]]); read the training config "
            "(--config_file) instead and set dataset.train_data_dir to the folder of '<repeats>_<name>' subfolders",
        )
    kohya_file = ours is None
    values: dict[str, Any] = {}  # dotted path -> raw value
    where: dict[str, str] = {}  # dotted path -> where it was set, for duplicate messages
    ignored: dict[str, Any] = {}
    description = None

    def put(path: str, value: Any, source: str) -> None:
        if path in values:
            raise ConfigError(path, f"is set twice: as {where[path]} and as {source}; keep one")
        values[path] = value
        where[path] = source

    def unknown(name: str, value: Any, message: str) -> None:
        if strict:
            raise ConfigError(name, message + " (pass strict=False to ignore unknown settings)")
        ignored[name] = value

    flat = _flatten_kohya(data)
    for raw_name, (value, source) in flat.items():
        name = _KOHYA_ALIASES.get(raw_name, raw_name)
        if name == "network_args":
            for key, arg in _parse_kv_list("network.network_args", value, literal=False).items():
                if key in _NETWORK_ARG_LEAVES:
                    put(_NETWORK_ARG_LEAVES[key].path, arg, f"network_args '{key}'")
                elif key in _KOHYA_UNMAPPED_NETWORK_ARGS:
                    ignored[f"network_args.{key}"] = arg
                else:
                    unknown(f"network_args.{key}", arg, _unknown(key, _NETWORK_ARG_LEAVES, "networks.lora argument"))
        elif name == "optimizer_args":
            put("optim.optimizer_args", _parse_kv_list("optim.optimizer_args", value, literal=True), source)
        elif name in _KOHYA_LEGACY_OPTIMIZER:
            if value is True and "optimizer_type" not in flat:
                put("optim.optimizer_type", _KOHYA_LEGACY_OPTIMIZER[name], source)
        elif name in _KOHYA_TO_LEAF:
            leaf = _KOHYA_TO_LEAF[name]
            if leaf.meta.get("kohya_inverted"):
                if not isinstance(value, bool):
                    raise ConfigError(leaf.path, f"{name} must be true or false, got {_short(value)}")
                value = not value
            elif name == "optimizer_type" and isinstance(value, str):
                value = {o.lower(): o for o in OPTIMIZERS}.get(value.lower(), value) if value else "AdamW"
            elif name == "text_encoder_lr" and isinstance(value, list):  # kohya: one rate per text encoder
                if len(set(value)) > 1:
                    raise ConfigError(leaf.path, f"must be one learning rate for all text encoders, got {value}")
                value = value[0] if value else None
                if value is None:
                    continue
            put(leaf.path, value, source)
        elif name in KOHYA_UNMAPPED:
            ignored[name] = value
        else:
            known = [*_KOHYA_TO_LEAF, "network_args", "optimizer_args"]
            unknown(source, value, _unknown(name, known, "kohya setting"))
    if "max_train_epochs" in flat and "max_train_steps" in flat:  # in kohya, epochs override steps
        logger.warning("kohya settings: max_train_epochs overrides max_train_steps, as in kohya")
        values["training.max_train_steps"] = None
        where["training.max_train_steps"] = "kohya's max_train_epochs (which overrides max_train_steps)"

    if ours is not None:
        if not isinstance(ours, dict):
            raise ConfigError("lora_train", f"must be a table, got {type(ours).__name__}")
        for key, value in ours.items():
            if key == "format":
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise ConfigError(
                        "lora_train.format", f"must be a format number like {FORMAT_VERSION}, got {_short(value)}"
                    )
                if value > FORMAT_VERSION:
                    raise ConfigError(
                        "lora_train.format",
                        f"this file's format {value} is newer than this version reads ({FORMAT_VERSION}); "
                        "update sd-webui-lora-train",
                    )
            elif key == "description":
                if not isinstance(value, str):
                    raise ConfigError("lora_train.description", f"must be a string, got {_short(value)}")
                description = value
            elif key in GROUPS and isinstance(value, dict):
                for name, item in value.items():
                    path = f"{key}.{name}"
                    if path not in _LEAF_BY_PATH:
                        raise ConfigError(path, _unknown(path, _LEAF_BY_PATH, "setting"))
                    put(path, item, f"[lora_train.{key}] {name}")
            else:
                raise ConfigError(f"lora_train.{key}", _unknown(key, (*GROUPS, "format", "description"), "setting"))

    kwargs: dict[str, dict[str, Any]] = {group: {} for group in GROUPS}
    for leaf in _LEAVES:
        if leaf.path in values:
            kwargs[leaf.group][leaf.name] = _coerce(leaf, values[leaf.path])
        elif kohya_file and "kohya_default" in leaf.meta:
            kwargs[leaf.group][leaf.name] = leaf.meta["kohya_default"]
    if kohya_file and "max_train_epochs" in flat:
        kwargs["training"]["max_train_steps"] = None  # epochs given: kohya's 1600-step default does not apply
    config = TrainConfig(**{group: _GROUP_CLASSES[group](**kw) for group, kw in kwargs.items()})

    relevant = {k: v for k, v in ignored.items() if k not in _KOHYA_INERT and v not in (None, False, "", 0, [])}
    if relevant:
        listed = ", ".join(f"{k}={_short(v)}" for k, v in relevant.items())
        logger.warning("these kohya settings are not supported and were ignored: %s", listed)
    return ParsedToml(config, ignored, description)


def from_toml(text: str, *, strict: bool = True) -> TrainConfig:
    """Module-level alias of ``TrainConfig.from_toml``."""
    return parse_toml(text, strict=strict).config


# --------------------------------------------------------------------------------------------
# JSON schema and the UI field table
# --------------------------------------------------------------------------------------------

_JSON_TYPES = {"bool": "boolean", "int": "integer", "float": "number", "str": "string"}


def _leaf_schema(leaf: _Leaf) -> dict[str, Any]:
    meta = leaf.meta
    schema: dict[str, Any] = {"title": meta["label"], "description": meta["help"]}
    if leaf.kind in _JSON_TYPES:
        schema["type"] = _JSON_TYPES[leaf.kind]
    elif leaf.kind == "str_list":
        schema.update(type="array", items={"type": "string"})
    elif leaf.kind == "dict":
        schema.update(type="object", additionalProperties={"type": ["boolean", "number", "string", "array"]})
    elif leaf.kind == "resolution":
        schema["oneOf"] = [
            {"type": "integer"},
            {"type": "string", "pattern": r"^\s*\d+\s*(,\s*\d+\s*)?$"},
            {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2},
        ]
    if leaf.optional:
        schema["type"] = [schema["type"], "null"]
    for key, name in (("ge", "minimum"), ("gt", "exclusiveMinimum"), ("le", "maximum"), ("lt", "exclusiveMaximum")):
        if key in meta:
            schema[name] = meta[key]
    if "choices" in meta:
        schema["enum"] = list(meta["choices"]) + ([None] if leaf.optional else [])
    schema["default"] = _jsonable(leaf.default)
    if "kohya" in meta:
        schema["x-kohya"] = ("network_args:" if meta.get("kohya_network_arg") else "") + meta["kohya"]
    schema["x-widget"] = _widget(leaf)
    return schema


def json_schema() -> dict[str, Any]:
    """JSON schema (draft 2020-12) of ``TrainConfig.to_dict()``: types, defaults, enums, limits, help.

    Extras per setting: ``x-kohya`` (kohya's argument name) and ``x-widget`` (see ``WIDGETS``).
    """
    properties = {}
    for f in dataclasses.fields(TrainConfig):
        leaves = [leaf for leaf in _LEAVES if leaf.group == f.name]
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


class FieldSpec(NamedTuple):
    """One row of the UI field table."""

    path: str  # dotted attribute, "network.network_dim"
    label: str
    widget: str  # one of WIDGETS
    choices: tuple | None  # for "dropdown"
    help: str
    default: Any  # JSON form
    optional: bool  # blank = None (unset)
    minimum: float | None
    maximum: float | None
    kohya: str | None


def _widget(leaf: _Leaf) -> str:
    if "widget" in leaf.meta:
        return leaf.meta["widget"]
    if "choices" in leaf.meta:
        return "dropdown"
    return {
        "bool": "checkbox",
        "int": "int",
        "float": "float",
        "str": "text",
        "str_list": "lines",
        "dict": "kv",
        "resolution": "text",
    }[leaf.kind]


FIELDS: tuple[FieldSpec, ...] = tuple(
    FieldSpec(
        path=leaf.path,
        label=leaf.meta["label"],
        widget=_widget(leaf),
        choices=leaf.meta.get("choices"),
        help=leaf.meta["help"],
        default=_jsonable(leaf.default),
        optional=leaf.optional,
        minimum=leaf.meta.get("ge", leaf.meta.get("gt")),
        maximum=leaf.meta.get("le", leaf.meta.get("lt")),
        kohya=leaf.meta.get("kohya"),
    )
    for leaf in _LEAVES
)
"""Every leaf setting in display order (groups in ``TrainConfig`` order, fields in class order)."""


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------


class Preset(NamedTuple):
    name: str
    description: str
    config: TrainConfig  # shared: use load_preset() for a copy you may change
    source: str  # "builtin" or the file's path


_PRESET_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


def _read_preset(name: str, text: str, source: str) -> Preset:
    try:
        parsed = parse_toml(text)
    except ConfigError as exc:
        raise ConfigError(exc.field, f"{exc.message} (in preset {name!r}, {source})") from None
    return Preset(name, parsed.description or "", parsed.config, source)


def _builtin_presets() -> dict[str, Preset]:
    folder = resources.files("lora_trainer").joinpath("presets")
    presets = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml"):
            name = entry.name[: -len(".toml")]
            presets[name] = _read_preset(name, entry.read_text(encoding="utf-8"), "builtin")
    return presets


PRESETS: dict[str, Preset] = _builtin_presets()
"""Built-in presets (``lora_trainer/presets/*.toml``) by name."""


def _user_preset_files(user_dir: str | os.PathLike | None) -> dict[str, Path]:
    if user_dir is None or not Path(user_dir).is_dir():
        return {}
    return {p.stem: p for p in sorted(Path(user_dir).glob("*.toml")) if _PRESET_NAME.fullmatch(p.stem)}


def list_presets(user_dir: str | os.PathLike | None = None) -> list[str]:
    """Preset names: the built-in ones, then those in ``user_dir`` (``<name>.toml``) not shadowing one."""
    users = _user_preset_files(user_dir)
    return list(PRESETS) + [name for name in users if name not in PRESETS]


def get_preset(name: str, user_dir: str | os.PathLike | None = None) -> Preset:
    """A preset by name; a file in ``user_dir`` takes precedence over a built-in of the same name."""
    path = _user_preset_files(user_dir).get(name)
    if path is not None:
        return _read_preset(name, path.read_text(encoding="utf-8"), str(path))
    if name in PRESETS:
        return PRESETS[name]
    raise ConfigError("preset", f"unknown preset {name!r}; available: {', '.join(list_presets(user_dir))}")


def load_preset(name: str, user_dir: str | os.PathLike | None = None) -> TrainConfig:
    """A fresh copy of the preset's config (settings it leaves out have our defaults)."""
    return copy.deepcopy(get_preset(name, user_dir).config)


def save_preset(
    config: TrainConfig,
    name: str,
    user_dir: str | os.PathLike,
    *,
    description: str = "",
    overwrite: bool = False,
) -> Path:
    """Write ``config`` as ``user_dir/<name>.toml`` (our TOML); returns the path."""
    if not _PRESET_NAME.fullmatch(name):
        raise ConfigError("preset", f"names are lowercase letters, digits, '-' and '_' (up to 64), got {name!r}")
    path = Path(user_dir) / f"{name}.toml"
    if path.exists() and not overwrite:
        raise ConfigError("preset", f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config.to_toml(description=description), encoding="utf-8")
    return path


__all__ = [
    "FIELDS",
    "FORMAT_VERSION",
    "GROUPS",
    "KOHYA_UNMAPPED",
    "LR_SCHEDULERS",
    "MAX_TOKEN_LENGTHS",
    "MIXED_PRECISIONS",
    "NETWORK_MODULES",
    "OPTIMIZERS",
    "PRESETS",
    "SAVE_PRECISIONS",
    "WIDGETS",
    "ConfigError",
    "DatasetConfig",
    "FieldSpec",
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
