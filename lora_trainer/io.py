"""LoRA files and resume state on disk: kohya metadata, ``sshs_*`` hashes, atomic writes.

* :class:`TrainingInfo` + :func:`build_metadata`: what a training run knows, turned into
  kohya's ``ss_*`` keys (``train_network.py``'s legacy-dataset branch, so A1111 shows
  ``ss_resolution``/``ss_tag_frequency``) plus kohya's ``modelspec.*`` keys.
* :func:`compute_hashes`: ``sshs_model_hash`` / ``sshs_legacy_hash`` exactly as kohya's
  ``precalculate_safetensors_hashes``.
* :func:`save_lora` / :func:`load_lora`: safetensors only, written atomically (temp file in
  the target folder, fsync, rename); never a partial file, never an existing file clobbered
  unless asked. Pickles (``.pt``/``.ckpt``) are refused.
* :func:`flatten_tensors` / :func:`unflatten_tensors`, :func:`save_state_dict_and_json` /
  :func:`load_state_dict_and_json`, :func:`save_state` / :func:`load_state`: resume state
  (optimizer, scheduler, RNG states) as safetensors + JSON, never pickle.
"""

from __future__ import annotations

import collections
import datetime
import hashlib
import json
import math
import os
import random
import re
import struct
import tempfile
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch

from . import __version__
from .errors import ConfigError, LoraFileError
from .log import logger

__all__ = [
    "FAMILIES",
    "LORA_KEY_PREFIXES",
    "PICKLE_SUFFIXES",
    "SAVE_DTYPES",
    "SafetensorsHeader",
    "StateFileError",
    "TrainingInfo",
    "atomic_write_bytes",
    "base_model_version",
    "build_metadata",
    "compute_hashes",
    "file_data_sha256",
    "file_legacy_hash",
    "flatten_tensors",
    "free_path",
    "hashes_from_bytes",
    "is_lora_key",
    "load_lora",
    "load_state",
    "load_state_dict_and_json",
    "modelspec_metadata",
    "optimizer_string",
    "read_safetensors_header",
    "require_lora_keys",
    "resolve_save_dtype",
    "save_lora",
    "save_state",
    "save_state_dict_and_json",
    "unflatten_tensors",
]

FAMILIES = ("sd1", "sd2", "sdxl")
IMPLEMENTATION_VERSION = f"sd-webui-lora-train/{__version__}"
# Keys of ours that are not kohya's: a separate namespace, so no ss_* key means something kohya didn't mean.
OWN_KEY_PREFIX = "lora_train."

# Prefixes of the kohya-style module names A1111/ComfyUI/kohya load (LoRA, LoCon and LyCORIS alike).
LORA_KEY_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")

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

_LEGACY_OFFSET = 0x100000
_LEGACY_LENGTH = 0x10000
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


class StateFileError(LoraFileError):
    """A resume-state file pair that cannot be read back (missing, damaged, mismatched)."""


# --------------------------------------------------------------------------------------------
# metadata
# --------------------------------------------------------------------------------------------


@dataclass
class TrainingInfo:
    """What a training run knows that ends up in the LoRA's metadata.

    Defaults are kohya's argparse defaults, so an unset field is written as kohya writes it
    when the option is not given. Update ``steps``, ``epoch`` and ``training_finished_at``
    (``dataclasses.replace``) at each save; ``training_finished_at=None`` means "now".
    ``resolution`` is (width, height), one int, or None for the family's native size
    (512; 768 for SD2-v; 1024 for SDXL). ``tag_frequency`` is
    ``{dataset_dir_name: {tag: count}}``; ``dataset_dirs`` is
    ``{dir_name: {"n_repeats": n, "img_count": m}}``.
    """

    family: str
    output_name: str
    v_prediction: bool = False
    # network
    network_dim: int = 4
    network_alpha: float = 1.0
    conv_dim: int | None = None
    conv_alpha: float | None = None
    network_dropout: float | None = None
    rank_dropout: float | None = None
    module_dropout: float | None = None
    network_module: str = "networks.lora"
    # data
    resolution: int | tuple[int, int] | None = None  # None: the family's native size
    num_train_images: int = 0
    num_reg_images: int = 0
    num_validation_images: int = 0
    num_batches_per_epoch: int = 0
    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)
    dataset_dirs: dict[str, dict[str, int]] = field(default_factory=dict)
    reg_dataset_dirs: dict[str, dict[str, int]] = field(default_factory=dict)
    bucket_info: dict[str, Any] | None = None
    enable_bucket: bool = False
    bucket_no_upscale: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    color_aug: bool = False
    flip_aug: bool = False
    random_crop: bool = False
    face_crop_aug_range: Any = None
    cache_latents: bool = False
    # schedule / optimisation
    max_train_steps: int = 0
    num_epochs: int = 1
    steps: int = 0
    epoch: int = 0
    learning_rate: float = 1e-4
    unet_lr: float | None = None
    text_encoder_lr: float | list[float] | None = None
    optimizer: str = "torch.optim.adamw.AdamW"
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    full_fp16: bool = False
    fp8_base: bool = False
    lowram: bool = False
    seed: int | None = None
    clip_skip: int | None = None
    max_token_length: int | None = None
    noise_offset: float | None = None
    noise_offset_random_strength: bool = False
    multires_noise_iterations: int | None = None
    multires_noise_discount: float = 0.3
    adaptive_noise_scale: float | None = None
    ip_noise_gamma: float | None = None
    ip_noise_gamma_random_strength: bool = False
    zero_terminal_snr: bool = False
    min_snr_gamma: float | None = None
    debiased_estimation: bool = False
    scale_weight_norms: float | None = None
    prior_loss_weight: float = 1.0
    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_scale: float = 1.0
    huber_c: float = 0.1
    training_comment: str | None = None
    # base model
    sd_model_name: str | None = None
    sd_model_hash: str | None = None  # old-style 8-hex hash (A1111 checkpoint_info.hash)
    new_sd_model_hash: str | None = None  # sha256 of the checkpoint file
    vae_name: str | None = None
    vae_hash: str | None = None
    new_vae_hash: str | None = None
    # run
    session_id: int = field(default_factory=lambda: random.randint(0, 2**32))
    training_started_at: float = field(default_factory=time.time)
    training_finished_at: float | None = None
    stopped_early: bool = False
    # modelspec extras (kohya's --metadata_*)
    title: str | None = None
    author: str | None = None
    description: str | None = None
    license: str | None = None
    tags: str | list[str] | None = None


def base_model_version(family: str, v_prediction: bool = False) -> str:
    """kohya's ``ss_base_model_version``: sd_v1, sd_v1_v, sd_v2, sd_v2_v or sdxl_base_v1-0."""
    _check_family(family)
    if family == "sdxl":
        return "sdxl_base_v1-0"
    return ("sd_v2" if family == "sd2" else "sd_v1") + ("_v" if v_prediction else "")


def optimizer_string(optimizer: type | object, kwargs: Mapping[str, Any] | Iterable[Any] | None = None) -> str:
    """kohya's ``ss_optimizer``: ``module.Class`` plus ``(k=v,k=v)`` when optimizer args were given.

    ``kwargs``: a mapping, or kohya-style ``["k=v", ...]`` strings, or ``(k, v)`` pairs.
    """
    cls = optimizer if isinstance(optimizer, type) else type(optimizer)
    name = f"{cls.__module__}.{cls.__name__}"
    if kwargs:
        items = kwargs.items() if isinstance(kwargs, Mapping) else kwargs
        args = [item if isinstance(item, str) else f"{item[0]}={item[1]}" for item in items]
        name += "(" + ",".join(args) + ")"
    return name


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ConfigError("family", f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")


def _native_size(family: str, v_prediction: bool) -> int:
    return 1024 if family == "sdxl" else 768 if (family == "sd2" and v_prediction) else 512


def _resolution_tuple(resolution: int | Iterable[int] | str) -> tuple[int, int]:
    """kohya's ``args.resolution`` after parsing: a (width, height) tuple."""
    if isinstance(resolution, str):
        resolution = [int(r) for r in resolution.split(",")]
    if isinstance(resolution, int):
        return (resolution, resolution)
    values = tuple(int(r) for r in resolution)
    if len(values) == 1:
        return (values[0], values[0])
    if len(values) != 2:
        raise ConfigError("resolution", f"expected one or two numbers, got {resolution!r}")
    return values  # type: ignore[return-value]


def _arg_str(value: Any) -> str:
    """A network-arg value as a user would have typed it on kohya's command line (8, 4, 0.1)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _network_args(info: TrainingInfo) -> dict[str, str]:
    args: dict[str, str] = {}
    if info.conv_dim:
        args["conv_dim"] = _arg_str(info.conv_dim)
        if info.conv_alpha is not None:
            args["conv_alpha"] = _arg_str(info.conv_alpha)
    if info.rank_dropout:
        args["rank_dropout"] = _arg_str(info.rank_dropout)
    if info.module_dropout:
        args["module_dropout"] = _arg_str(info.module_dropout)
    return args


def _to_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def modelspec_metadata(
    family: str,
    *,
    v_prediction: bool = False,
    title: str,
    resolution: int | tuple[int, int] | None = None,
    timestamp: float | None = None,
    clip_skip: int | None = None,
    author: str | None = None,
    description: str | None = None,
    license: str | None = None,
    tags: str | list[str] | None = None,
) -> dict[str, str]:
    """The ``modelspec.*`` keys of kohya's ``get_sai_model_spec(..., lora=True)`` for our LoRA."""
    _check_family(family)
    if family == "sdxl":
        arch = "stable-diffusion-xl-v1-base"
    elif family == "sd2":
        arch = "stable-diffusion-v2-768-v" if v_prediction else "stable-diffusion-v2-512"
    else:
        arch = "stable-diffusion-v1"
    if resolution is None:
        resolution = _native_size(family, v_prediction)
    width, height = _resolution_tuple(resolution)
    ts = time.time() if timestamp is None else timestamp
    meta = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{arch}/lora",
        # kohya: Stability's implementation for SDXL LoRAs, diffusers' for SD1/SD2 LoRAs
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models"
        if family == "sdxl"
        else "diffusers",
        "modelspec.implementation_version": IMPLEMENTATION_VERSION,
        "modelspec.title": title,
        "modelspec.date": datetime.datetime.fromtimestamp(int(ts)).isoformat(),
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
    }
    if clip_skip is not None:
        meta["modelspec.encoder_layer"] = str(clip_skip)
    if author is not None:
        meta["modelspec.author"] = author
    if description is not None:
        meta["modelspec.description"] = description
    if license is not None:
        meta["modelspec.license"] = license
    if tags is not None:
        meta["modelspec.tags"] = tags if isinstance(tags, str) else ", ".join(tags)
    return meta


def build_metadata(info: TrainingInfo, *, minimal: bool = False, modelspec: bool = True) -> dict[str, str]:
    """kohya's metadata for ``info``: ``ss_*`` keys (all values str), then ``modelspec.*``.

    ``minimal``: only kohya's ``--no_metadata`` key set (family markers and network shape).
    ``sshs_*`` hashes are added by :func:`save_lora`. ``lora_train.stopped_early`` is ours.
    """
    _check_family(info.family)
    family = info.family
    finished = time.time() if info.training_finished_at is None else info.training_finished_at
    resolution = _resolution_tuple(
        info.resolution if info.resolution is not None else _native_size(family, info.v_prediction)
    )
    network_args = _network_args(info)
    # kohya's --max_token_length accepts None (=75), 150, 225
    max_token_length = None if info.max_token_length in (None, 75) else info.max_token_length

    meta: dict[str, Any] = {
        "ss_session_id": info.session_id,
        "ss_training_started_at": info.training_started_at,
        "ss_output_name": info.output_name,
        "ss_learning_rate": info.learning_rate,
        "ss_text_encoder_lr": info.text_encoder_lr,
        "ss_unet_lr": info.unet_lr,
        "ss_num_train_images": info.num_train_images,
        "ss_num_validation_images": info.num_validation_images,
        "ss_num_reg_images": info.num_reg_images,
        "ss_num_batches_per_epoch": info.num_batches_per_epoch,
        "ss_num_epochs": info.num_epochs,
        "ss_gradient_checkpointing": bool(info.gradient_checkpointing),
        "ss_gradient_accumulation_steps": info.gradient_accumulation_steps,
        "ss_max_train_steps": info.max_train_steps,
        "ss_lr_warmup_steps": info.lr_warmup_steps,
        "ss_lr_scheduler": info.lr_scheduler,
        "ss_network_module": info.network_module,
        "ss_network_dim": info.network_dim,
        "ss_network_alpha": float(info.network_alpha),  # kohya's argparse type=float: "8.0"
        "ss_network_dropout": info.network_dropout,
        "ss_mixed_precision": info.mixed_precision,
        "ss_full_fp16": bool(info.full_fp16),
        "ss_v2": family == "sd2",
        "ss_base_model_version": base_model_version(family, info.v_prediction),
        "ss_clip_skip": info.clip_skip,
        "ss_max_token_length": max_token_length,
        "ss_cache_latents": bool(info.cache_latents),
        "ss_seed": info.seed,
        "ss_lowram": bool(info.lowram),
        "ss_noise_offset": info.noise_offset,
        "ss_multires_noise_iterations": info.multires_noise_iterations,
        "ss_multires_noise_discount": info.multires_noise_discount,
        "ss_adaptive_noise_scale": info.adaptive_noise_scale,
        "ss_zero_terminal_snr": bool(info.zero_terminal_snr),
        "ss_training_comment": info.training_comment,
        # we are not an sd-scripts checkout: kohya's get_git_revision_hash() gives "(unknown)" there.
        # Our own version is in modelspec.implementation_version.
        "ss_sd_scripts_commit_hash": "(unknown)",
        "ss_optimizer": info.optimizer,
        "ss_max_grad_norm": info.max_grad_norm,
        "ss_caption_dropout_rate": info.caption_dropout_rate,
        "ss_caption_dropout_every_n_epochs": info.caption_dropout_every_n_epochs,
        "ss_caption_tag_dropout_rate": info.caption_tag_dropout_rate,
        "ss_face_crop_aug_range": info.face_crop_aug_range,
        "ss_prior_loss_weight": info.prior_loss_weight,
        "ss_min_snr_gamma": info.min_snr_gamma,
        "ss_scale_weight_norms": info.scale_weight_norms,
        "ss_ip_noise_gamma": info.ip_noise_gamma,
        "ss_debiased_estimation": bool(info.debiased_estimation),
        "ss_noise_offset_random_strength": bool(info.noise_offset_random_strength),
        "ss_ip_noise_gamma_random_strength": bool(info.ip_noise_gamma_random_strength),
        "ss_loss_type": info.loss_type,
        "ss_huber_schedule": info.huber_schedule,
        "ss_huber_scale": info.huber_scale,
        "ss_huber_c": info.huber_c,
        "ss_fp8_base": bool(info.fp8_base),
        "ss_fp8_base_unet": False,
        "ss_validation_seed": None,
        "ss_validation_split": 0.0,
        "ss_max_validation_steps": None,
        "ss_validate_every_n_epochs": None,
        "ss_validate_every_n_steps": None,
        "ss_resize_interpolation": None,
        # kohya's branch without --dataset_config (one dataset, folder-based): flat keys, not ss_datasets
        "ss_batch_size_per_device": info.batch_size,
        "ss_total_batch_size": info.batch_size * info.gradient_accumulation_steps,
        "ss_resolution": resolution,
        "ss_color_aug": bool(info.color_aug),
        "ss_flip_aug": bool(info.flip_aug),
        "ss_random_crop": bool(info.random_crop),
        "ss_shuffle_caption": bool(info.shuffle_caption),
        "ss_enable_bucket": bool(info.enable_bucket),
        "ss_bucket_no_upscale": bool(info.bucket_no_upscale),
        "ss_min_bucket_reso": info.min_bucket_reso,
        "ss_max_bucket_reso": info.max_bucket_reso,
        "ss_keep_tokens": info.keep_tokens,
        "ss_dataset_dirs": json.dumps(info.dataset_dirs),
        "ss_reg_dataset_dirs": json.dumps(info.reg_dataset_dirs),
        "ss_tag_frequency": json.dumps(info.tag_frequency),
        "ss_bucket_info": json.dumps(info.bucket_info),
    }
    if network_args:
        meta["ss_network_args"] = json.dumps(network_args)
    if info.sd_model_name is not None:
        if info.sd_model_hash:
            meta["ss_sd_model_hash"] = info.sd_model_hash
        if info.new_sd_model_hash:
            meta["ss_new_sd_model_hash"] = info.new_sd_model_hash
        meta["ss_sd_model_name"] = info.sd_model_name
    if info.vae_name:
        if info.vae_hash:
            meta["ss_vae_hash"] = info.vae_hash
        if info.new_vae_hash:
            meta["ss_new_vae_hash"] = info.new_vae_hash
        meta["ss_vae_name"] = info.vae_name
    meta["ss_training_finished_at"] = finished
    meta["ss_steps"] = info.steps
    meta["ss_epoch"] = info.epoch

    metadata = {k: str(v) for k, v in meta.items()}  # kohya: every value str(v); None -> "None"
    if minimal:
        keep = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha")
        metadata = {k: v for k, v in metadata.items() if k in keep or k == "ss_network_args"}
    if modelspec:
        metadata.update(
            modelspec_metadata(
                family,
                v_prediction=info.v_prediction,
                title=info.title if info.title is not None else info.output_name,
                resolution=resolution,
                timestamp=finished,
                clip_skip=info.clip_skip,
                author=info.author,
                description=info.description,
                license=info.license,
                tags=info.tags,
            )
        )
    metadata[OWN_KEY_PREFIX + "stopped_early"] = str(bool(info.stopped_early))
    return metadata


# --------------------------------------------------------------------------------------------
# hashes
# --------------------------------------------------------------------------------------------


def hashes_from_bytes(buffer: bytes | bytearray | memoryview) -> tuple[str, str]:
    """(addnet model hash, addnet legacy hash) of one serialized safetensors buffer."""
    view = memoryview(buffer)
    if len(view) < 8:
        raise ValueError("not a safetensors buffer: shorter than 8 bytes")
    (n,) = struct.unpack("<Q", view[:8])
    model_hash = hashlib.sha256(view[8 + n :]).hexdigest()
    legacy_hash = hashlib.sha256(view[_LEGACY_OFFSET : _LEGACY_OFFSET + _LEGACY_LENGTH]).hexdigest()[:8]
    return model_hash, legacy_hash


def _ss_only(metadata: Mapping[str, str] | None) -> dict[str, str]:
    return {k: v for k, v in (metadata or {}).items() if k.startswith("ss_")}


def _cpu_contiguous(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}


def compute_hashes(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> tuple[str, str]:
    """``(sshs_model_hash, sshs_legacy_hash)`` as kohya's ``precalculate_safetensors_hashes``.

    The tensors are hashed as given (pass them in the save dtype). Only the ``ss_*`` metadata
    enters the serialization, so ``modelspec.*`` and ``sshs_*`` keys never change the result.
    """
    buffer = safetensors.torch.save(_cpu_contiguous(state_dict), _ss_only(metadata))
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


# --------------------------------------------------------------------------------------------
# reading safetensors
# --------------------------------------------------------------------------------------------


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
    if not path.exists():
        raise LoraFileError(f"{path}: file not found")
    if not path.is_file():
        raise LoraFileError(f"{path}: not a file")
    size = path.stat().st_size
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise _pickle_refusal(path, f"a {path.suffix} file")
    if size == 0:
        raise LoraFileError(f"{path.name}: file is empty (0 bytes)")
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

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise LoraFileError(f"{path.name}: damaged safetensors header (__metadata__ is not a str -> str map)")

    data_size = size - 8 - n
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
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
            ok = False
        if not ok:
            raise LoraFileError(f"{path.name}: damaged safetensors header (bad entry for tensor {name!r})")
        if end - begin != numel * _DTYPE_SIZES[dtype]:
            raise LoraFileError(
                f"{path.name}: damaged safetensors header (tensor {name!r}: {dtype}{list(shape)} needs "
                f"{numel * _DTYPE_SIZES[dtype]} bytes, offsets give {end - begin})"
            )
        spans.append((begin, end, name))
    spans.sort()
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
    return SafetensorsHeader(path, size, n, header, dict(metadata))


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


# --------------------------------------------------------------------------------------------
# atomic writing
# --------------------------------------------------------------------------------------------


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


def free_path(path: str | os.PathLike) -> Path:
    """``path`` if nothing exists there, else the first free ``stem_1.ext``, ``stem_2.ext`` ..."""
    path = Path(path)
    if not os.path.lexists(path):
        return path
    suffix = "".join(path.suffixes[-1:])
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    i = 1
    while True:
        candidate = path.with_name(f"{stem}_{i}{suffix}")
        if not os.path.lexists(candidate):
            return candidate
        i += 1


def _fsync_dir(directory: Path) -> None:
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_temp(directory: Path, stem: str, chunks: Iterable[bytes | memoryview], durable: bool = True) -> Path:
    """Write ``chunks`` to a fresh hidden temp file in ``directory`` (fsync'ed if ``durable``); removed on failure."""
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{stem}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            if durable:
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return tmp


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as e:
        logger.warning("could not remove temporary file %s: %s", path, e)


def _publish(tmp: Path, target: Path, overwrite: bool) -> Path:
    """Move the finished temp file to ``target`` (or the first free ``target_N`` name)."""
    try:
        if overwrite:
            os.replace(tmp, target)
            final = target
        else:
            final = _publish_no_clobber(tmp, target)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    _fsync_dir(target.parent)
    return final


def _publish_no_clobber(tmp: Path, target: Path) -> Path:
    candidate = free_path(target)
    while True:
        try:
            # a hard link fails if the name exists: no race with another writer picking the same name
            os.link(tmp, candidate)
        except FileExistsError:
            candidate = free_path(target)
            continue
        except (OSError, NotImplementedError):
            # file system without hard links: check-then-rename (a tiny race window remains)
            candidate = free_path(target)
            os.replace(tmp, candidate)
            return candidate
        _unlink_quietly(tmp)
        return candidate


def atomic_write_bytes(
    path: str | os.PathLike,
    chunks: Iterable[bytes | memoryview] | bytes,
    *,
    overwrite: bool = True,
    durable: bool = True,
) -> Path:
    """Write a file atomically (hidden temp in the same folder, fsync, rename). Returns the path written.

    Readers see the old or the new content, never half a file. ``durable=False`` skips the
    fsync (for bulk copies whose loss on power failure is harmless).
    """
    path = Path(path)
    if isinstance(chunks, (bytes, bytearray, memoryview)):
        chunks = [chunks]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _write_temp(path.parent, path.name, chunks, durable)
    return _publish(tmp, path, overwrite)


def _prepare_tensors(state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
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


def _stringify_metadata(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    result: dict[str, str] = {}
    for k, v in (metadata or {}).items():
        if not isinstance(k, str):
            raise TypeError(f"metadata keys must be str, got {k!r}")
        result[k] = _to_str(v)
    return result


def _splice_header(buffer: bytes, metadata: Mapping[str, str]) -> tuple[bytes, memoryview]:
    """(new length + header with ``metadata``, the unchanged data section of ``buffer``)."""
    (n,) = struct.unpack("<Q", buffer[:8])
    header = json.loads(buffer[8 : 8 + n])
    header.pop("__metadata__", None)
    header = {"__metadata__": dict(metadata), **header} if metadata else header
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header so the data starts 8-aligned
    return struct.pack("<Q", len(raw)) + raw, memoryview(buffer)[8 + n :]


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
    Nothing is left behind if writing fails.
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise LoraFileError(f"{path.name}: a LoRA is saved as .safetensors")
    if not state_dict:
        raise LoraFileError(f"{path.name}: refusing to save an empty state dict")
    save_dtype = resolve_save_dtype(dtype)
    tensors = _prepare_tensors(state_dict, save_dtype)
    meta = _stringify_metadata(metadata)
    buffer = safetensors.torch.save(tensors, _ss_only(meta))
    model_hash, legacy_hash = hashes_from_bytes(buffer)
    meta["sshs_model_hash"] = model_hash
    meta["sshs_legacy_hash"] = legacy_hash
    head, data = _splice_header(buffer, meta)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _write_temp(path.parent, path.name, (head, data))
    try:
        written = read_safetensors_header(tmp)  # never publish a file we cannot read back
        if written.metadata.get("sshs_model_hash") != model_hash or set(written.tensors) != set(tensors):
            raise LoraFileError(f"{path.name}: the written file does not read back as saved")
    except BaseException:
        _unlink_quietly(tmp)
        raise
    final = _publish(tmp, path, overwrite)
    if final != path:
        logger.info("%s exists; saved as %s", path.name, final.name)
    return final


# --------------------------------------------------------------------------------------------
# resume state: nested structures <-> flat tensors + JSON
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


def flatten_tensors(nested: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested structure into ``(tensors, skeleton)``: a flat tensor dict and a JSON-able skeleton.

    Handles dict (any hashable keys of supported types, order kept), OrderedDict, list, tuple,
    None, bool, int (any size), float (nan/inf too), str, torch.Tensor (dtype kept; the same
    tensor object twice is stored once), numpy arrays and scalars (raw bytes + dtype),
    torch.dtype, torch.device and torch.Size. Anything else raises ``TypeError`` - never pickle.
    Tensors come back on the CPU without ``requires_grad``.
    """
    tensors: dict[str, torch.Tensor] = {}
    by_id: dict[int, str] = {}
    keep_alive: list[Any] = []  # keep encoded objects alive so their ids stay unique

    def encode(obj: Any, where: str) -> Any:
        if isinstance(obj, torch.Tensor):
            key = by_id.get(id(obj))
            if key is None:
                key = f"t{len(tensors)}"
                by_id[id(obj)] = key
                keep_alive.append(obj)
                tensors[key] = obj
            return {"$tensor": key}
        if isinstance(obj, np.ndarray):
            if obj.dtype.hasobject or obj.dtype.fields is not None:
                raise TypeError(f"{where}: numpy arrays of dtype {obj.dtype} cannot be stored")
            key = f"t{len(tensors)}"
            raw = np.ascontiguousarray(obj).tobytes()
            tensors[key] = (
                torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
            )
            return {"$ndarray": key, "dtype": obj.dtype.str, "shape": list(obj.shape)}
        if isinstance(obj, np.generic):
            if obj.dtype.hasobject or obj.dtype.fields is not None:
                raise TypeError(f"{where}: numpy scalars of dtype {obj.dtype} cannot be stored")
            return {"$npscalar": obj.dtype.str, "hex": obj.tobytes().hex()}
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
        if isinstance(obj, tuple):
            return {"$tuple": [encode(v, f"{where}[{i}]") for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [encode(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        if isinstance(obj, dict):
            tag = "$odict" if isinstance(obj, collections.OrderedDict) else "$dict"
            return {tag: [[encode(k, f"{where} key"), encode(v, f"{where}[{k!r}]")] for k, v in obj.items()]}
        raise TypeError(f"{where}: cannot store a {type(obj).__module__}.{type(obj).__qualname__} without pickle")

    skeleton = encode(nested, "state")
    return tensors, skeleton


def unflatten_tensors(tensors: Mapping[str, torch.Tensor], skeleton: Any) -> Any:
    """Inverse of :func:`flatten_tensors`. Raises ``ValueError`` for a skeleton that does not fit."""
    cache: dict[str, torch.Tensor] = {}

    def tensor(key: Any) -> torch.Tensor:
        if not isinstance(key, str) or key not in tensors:
            raise ValueError(f"state refers to tensor {key!r}, which is missing")
        return tensors[key]

    def decode(node: Any) -> Any:
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if isinstance(node, list):
            return [decode(v) for v in node]
        if not isinstance(node, dict) or len(node) == 0:
            raise ValueError(f"malformed state skeleton node {node!r}")
        tag = next((t for t in _TAGS if t in node), None)
        if tag == "$tensor":
            key = node["$tensor"]
            if key not in cache:
                cache[key] = tensor(key)
            return cache[key]
        if tag == "$ndarray":
            raw = tensor(node["$ndarray"]).numpy().tobytes()
            return np.frombuffer(raw, dtype=np.dtype(node["dtype"])).reshape(node["shape"]).copy()
        if tag == "$npscalar":
            return np.frombuffer(bytes.fromhex(node["hex"]), dtype=np.dtype(node["$npscalar"]))[0]
        if tag == "$tuple":
            return tuple(decode(v) for v in node["$tuple"])
        if tag in ("$dict", "$odict"):
            items = [(_hashable(decode(k)), decode(v)) for k, v in node[tag]]
            return collections.OrderedDict(items) if tag == "$odict" else dict(items)
        if tag == "$float":
            return float(node["$float"])
        if tag == "$dtype":
            dtype = getattr(torch, node["$dtype"], None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"unknown torch dtype {node['$dtype']!r}")
            return dtype
        if tag == "$device":
            return torch.device(node["$device"])
        if tag == "$size":
            return torch.Size(node["$size"])
        raise ValueError(f"malformed state skeleton node {node!r}")

    try:
        return decode(skeleton)
    except (KeyError, TypeError) as e:
        raise ValueError(f"malformed state skeleton: {e}") from e


def _hashable(key: Any) -> Any:
    try:
        hash(key)
    except TypeError as e:
        raise ValueError(f"state skeleton has an unhashable dict key {key!r}") from e
    return key


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
    prepared = _prepare_tensors(tensors, None)
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
        _unlink_quietly(directory / tensor_file)
        raise
    pattern = re.compile(re.escape(name) + r"-[0-9a-f]{32}\.safetensors")
    for old in directory.iterdir():
        if old.name != tensor_file and pattern.fullmatch(old.name):
            _unlink_quietly(old)
    return json_path


def load_state_dict_and_json(
    directory: str | os.PathLike, *, name: str = "state"
) -> tuple[dict[str, torch.Tensor], Any]:
    """Read what :func:`save_state_dict_and_json` wrote: ``(tensors, info)``; :class:`StateFileError` if unreadable."""
    directory = Path(directory)
    json_path = directory / f"{name}.json"
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
