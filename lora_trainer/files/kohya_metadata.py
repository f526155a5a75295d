"""kohya's LoRA metadata: what a training run knows (:class:`TrainingInfo`) as ``ss_*`` and ``modelspec.*`` keys.

:func:`build_metadata` writes the keys of kohya's ``train_network.py`` legacy-dataset branch (so
A1111 shows ``ss_resolution``/``ss_tag_frequency``) plus kohya's ``modelspec.*`` keys
(:func:`modelspec_metadata`). ``sshs_*`` hashes are not here: :func:`lora_trainer.files.lora_file.save_lora`
adds them.
"""

from __future__ import annotations

import datetime
import json
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lora_trainer import __version__
from lora_trainer.contracts import FAMILIES
from lora_trainer.errors import ConfigError

__all__ = [
    "IMPLEMENTATION_VERSION",
    "OWN_KEY_PREFIX",
    "TrainingInfo",
    "base_model_version",
    "build_metadata",
    "modelspec_metadata",
    "optimizer_string",
]

IMPLEMENTATION_VERSION = f"sd-webui-lora-train/{__version__}"
# Keys of ours that are not kohya's: a separate namespace, so no ss_* key means something kohya didn't mean.
OWN_KEY_PREFIX = "lora_train."


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
    lycoris_args: dict[str, str] = field(default_factory=dict)  # LyCORIS's own network args ("algo": "loha")
    block_args: dict[str, str] = field(default_factory=dict)  # LoRA+ and per-block network args, as written
    # data
    resolution: int | tuple[int, int] | None = None  # None: the family's native size
    num_train_images: int = 0
    num_reg_images: int = 0
    num_validation_images: int = 0
    # validation loss (kohya's --validation_* arguments, as given; None when unset)
    validation_seed: int | None = None
    validation_split: float = 0.0
    max_validation_steps: int | None = None
    validate_every_n_epochs: int | None = None
    validate_every_n_steps: int | None = None
    val_losses: list[dict] | None = None  # ours: {"step", "epoch", "loss"} per evaluation so far
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
    num_processes: int = 1  # data parallel training: kohya's total batch counts every process's batch
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
    args: dict[str, str] = dict(info.lycoris_args)
    if info.network_module == "lycoris.kohya":  # LyCORIS's conv defaults are the network's: always say them
        args["conv_dim"] = _arg_str(info.conv_dim or 0)
        args["conv_alpha"] = _arg_str(info.conv_alpha if info.conv_alpha is not None else info.network_alpha)
    elif info.conv_dim:
        args["conv_dim"] = _arg_str(info.conv_dim)
        if info.conv_alpha is not None:
            args["conv_alpha"] = _arg_str(info.conv_alpha)
    if info.rank_dropout:
        args["rank_dropout"] = _arg_str(info.rank_dropout)
    if info.module_dropout:
        args["module_dropout"] = _arg_str(info.module_dropout)
    args |= info.block_args
    return args


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
    ``sshs_*`` hashes are added by :func:`save_lora`. ``lora_train.stopped_early`` and ``lora_train.val_losses`` are ours.
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
        "ss_validation_seed": info.validation_seed,
        "ss_validation_split": float(info.validation_split),
        "ss_max_validation_steps": info.max_validation_steps,
        "ss_validate_every_n_epochs": info.validate_every_n_epochs,
        "ss_validate_every_n_steps": info.validate_every_n_steps,
        "ss_resize_interpolation": None,
        # kohya's branch without --dataset_config (one dataset, folder-based): flat keys, not ss_datasets
        "ss_batch_size_per_device": info.batch_size,
        "ss_total_batch_size": info.batch_size * info.num_processes * info.gradient_accumulation_steps,
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
    if info.val_losses:  # kohya keeps no loss values in the file; ours, so the tab can suggest an epoch later
        metadata[OWN_KEY_PREFIX + "val_losses"] = json.dumps(info.val_losses)
    return metadata
