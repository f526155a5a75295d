"""The six setting groups of ``TrainConfig``, one stdlib dataclass each, with every field's metadata
(``NetworkConfig`` and ``SampleConfig`` are defined in :mod:`lora_trainer.config.network_group` and
:mod:`lora_trainer.config.sample_group` and re-exported here).

Each field's ``metadata`` (``lora_trainer.config.meta.field_meta``) holds its label, help, kohya's
name and default, and its limits; everything else (validation, TOML, JSON schema, the UI) reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lora_trainer.config.coerce import CoercedGroup, coerce_resolution
from lora_trainer.config.meta import (
    LR_SCHEDULERS,
    MAX_RESOLUTION,
    MAX_SEED,
    MAX_TOKEN_LENGTHS,
    MIXED_PRECISIONS,
    OPTIMIZERS,
    SAVE_PRECISIONS,
    field_meta,
    setting,
)
from lora_trainer.config.network_group import NetworkConfig
from lora_trainer.config.sample_group import SampleConfig

__all__ = ["DatasetConfig", "NetworkConfig", "OptimConfig", "SampleConfig", "SaveConfig", "TrainingConfig"]


@dataclass
class DatasetConfig(CoercedGroup):
    """Training images and captions: where they are and how they are read."""

    train_data_dir: str = setting(
        "",
        label="Training images folder",
        kohya="train_data_dir",
        help="Folder of one subfolder per concept, '<repeats>_<name>' (e.g. '10_mychar'), with images and captions.",
    )
    trigger_words: list[str] = field(
        default_factory=list,
        metadata=field_meta(
            label="Trigger words",
            help="Words that call up the LoRA in a prompt (e.g. the character's name), one per entry. Stored in "
            "the saved file's metadata; your captions should contain them.",
        ),
    )
    dataset_repeats: int = setting(
        1,
        label="Repeats of a flat folder",
        kohya="dataset_repeats",
        ge=1,
        le=10000,
        help="Repeats per epoch for a training folder with its images directly in it (no '<repeats>_<name>' "
        "subfolders); subfolders give their own count. kohya's dataset_repeats (for a dataset without "
        "such folders); the kohya-trainer notebook uses 10.",
    )
    caption_extension: str = setting(
        ".txt",
        label="Caption file extension",
        kohya="caption_extension",
        kohya_default=".caption",
        help="Extension of the caption file beside each image ('.txt' for 'img.png' -> 'img.txt').",
    )
    resolution: int | tuple[int, int] = setting(
        512,
        label="Resolution",
        kohya="resolution",
        help="Training resolution: one size (512) or 'width,height' (512,768). A multiple of 64 from 64 to "
        "4096. 512 for SD1.x, 768 for SD2-768, 1024 for SDXL.",
    )
    enable_bucket: bool = setting(
        True,
        label="Aspect-ratio buckets",
        kohya="enable_bucket",
        kohya_default=False,
        help="Group images by aspect ratio instead of cropping them square (better for mixed shapes; kohya: off).",
    )
    min_bucket_reso: int = setting(
        256,
        label="Smallest bucket side",
        kohya="min_bucket_reso",
        ge=64,
        le=MAX_RESOLUTION,
        help="Smallest side of a bucket, in pixels; a multiple of the bucket step and at most the resolution.",
    )
    max_bucket_reso: int = setting(
        1024,
        label="Largest bucket side",
        kohya="max_bucket_reso",
        ge=64,
        le=2 * MAX_RESOLUTION,
        help="Largest side of a bucket, in pixels; a multiple of the bucket step and at least the resolution.",
    )
    bucket_reso_steps: int = setting(
        64,
        label="Bucket step",
        kohya="bucket_reso_steps",
        ge=8,
        le=512,
        help="Bucket sizes go up in steps of this many pixels (a multiple of 8; 64 is kohya's default).",
    )
    bucket_no_upscale: bool = setting(
        False,
        label="Never upscale into a bucket",
        kohya="bucket_no_upscale",
        help="Give small images a smaller bucket instead of upscaling them.",
    )
    flip_aug: bool = setting(
        False,
        label="Random horizontal flip",
        kohya="flip_aug",
        help="Flip images left-right at random (doubles variety; avoid for asymmetric subjects or text).",
    )
    shuffle_caption: bool = setting(
        False,
        label="Shuffle caption tags",
        kohya="shuffle_caption",
        help="Shuffle the comma-separated tags of each caption every step (for tag-style captions).",
    )
    keep_tokens: int = setting(
        0,
        label="Keep first N tags",
        kohya="keep_tokens",
        ge=0,
        le=100,
        help="Keep the first N tags in place when shuffling or dropping tags (e.g. 1 for a leading trigger word).",
    )
    caption_dropout_rate: float = setting(
        0.0,
        label="Caption dropout rate",
        kohya="caption_dropout_rate",
        ge=0.0,
        lt=1.0,
        help="Chance of training an image with an empty caption (0 = never).",
    )
    caption_tag_dropout_rate: float = setting(
        0.0,
        label="Tag dropout rate",
        kohya="caption_tag_dropout_rate",
        ge=0.0,
        lt=1.0,
        help="Chance of dropping each comma-separated tag (tags kept by 'Keep first N tags' excepted).",
    )
    caption_dropout_every_n_epochs: int = setting(
        0,
        label="Drop all captions every N epochs",
        kohya="caption_dropout_every_n_epochs",
        ge=0,
        le=10000,
        help="Train every Nth epoch without captions (0 = never).",
    )
    max_token_length: int = setting(
        225,
        label="Max caption tokens",
        kohya="max_token_length",
        kohya_default=75,
        choices=MAX_TOKEN_LENGTHS,
        help="Caption length in CLIP tokens: 75, 150 or 225. Captions are split into 75-token chunks, each "
        "encoded as its own 77-token window with its own start and end token, as the WebUI encodes prompts "
        "(so the LoRA is trained as it is used); kohya instead builds one start + 225 + end sequence. "
        "kohya's default is 75.",
    )
    weighted_captions: bool = setting(
        False,
        label="Weighted captions",
        kohya="weighted_captions",
        help="Read captions in the WebUI's prompt syntax: (word:1.2) and [word] emphasis, BREAK, "
        "textual-inversion names. Off (kohya's default): captions are plain text, and an escaped \\( "
        "(as DeepBooru writes) is the character (.",
    )
    cache_latents: bool = setting(
        True,
        label="Cache latents",
        kohya="cache_latents",
        kohya_default=False,
        help="Encode every image with the VAE once before training (faster, less VRAM).",
    )
    cache_latents_to_disk: bool = setting(
        False,
        label="Cache latents to disk",
        kohya="cache_latents_to_disk",
        help="Keep the latent cache in files (in the extension's work folder, never beside your images) so the next run reuses it (needs 'Cache latents').",
    )
    cache_text_encoder_outputs: bool = setting(
        False,
        label="Cache text encoder outputs",
        kohya="cache_text_encoder_outputs",
        help="Encode captions once; the text encoders then leave the GPU. Not with shuffle/dropout or TE training.",
    )

    @property
    def resolution_wh(self) -> tuple[int, int]:
        """The resolution as (width, height)."""
        res = coerce_resolution(self.resolution)
        return (res, res) if isinstance(res, int) else res


@dataclass
class OptimConfig(CoercedGroup):
    """Optimizer, learning rates and schedule."""

    optimizer_type: str = setting(
        "AdamW",
        label="Optimizer",
        kohya="optimizer_type",
        choices=OPTIMIZERS,
        help="AdamW (default), AdamW8bit (less VRAM; needs bitsandbytes), Lion (use ~1/3 of the AdamW rate), "
        "Prodigy (sets its own rate: use learning rate 1.0), Adafactor (least memory; as in kohya it sets its "
        "own step size, relative_step=True, so the learning rate is only its initial value and the scheduler "
        "is Adafactor's own; for a fixed rate set optimizer arguments relative_step=False scale_parameter=False "
        "warmup_init=False).",
    )
    optimizer_args: dict[str, Any] = field(
        default_factory=dict,
        metadata=field_meta(
            label="Optimizer arguments",
            kohya="optimizer_args",
            help="Extra optimizer keyword arguments, e.g. weight_decay=0.01, betas=[0.9, 0.99]. "
            "In kohya's TOML these are 'key=value' strings.",
        ),
    )
    learning_rate: float = setting(
        1e-4,
        label="Learning rate",
        kohya="learning_rate",
        kohya_default=2e-6,
        gt=0.0,
        le=10.0,
        help="Base learning rate (1e-4 is a good start for LoRA with AdamW; 1.0 with Prodigy). Must be below "
        "1, except for Prodigy (up to 10). Our default is 1e-4; kohya's is 2e-6.",
    )
    unet_lr: float | None = setting(
        None,
        label="UNet learning rate",
        kohya="unet_lr",
        gt=0.0,
        le=10.0,
        help="Learning rate for the UNet's LoRA; unset = the base learning rate.",
    )
    text_encoder_lr: float | None = setting(
        None,
        label="Text encoder learning rate",
        kohya="text_encoder_lr",
        gt=0.0,
        le=10.0,
        help="Learning rate for the text encoders' LoRA; unset = the base learning rate (half of it is common).",
    )
    lr_scheduler: str = setting(
        "cosine",
        label="LR scheduler",
        kohya="lr_scheduler",
        kohya_default="constant",
        choices=LR_SCHEDULERS,
        help="How the learning rate changes over the run. Our default is cosine; kohya's is constant.",
    )
    lr_warmup_steps: int = setting(
        0,
        label="Warmup steps",
        kohya="lr_warmup_steps",
        ge=0,
        le=100_000,
        help="Steps over which the learning rate ramps up from 0 (not with 'constant': use 'constant_with_warmup').",
    )
    lr_scheduler_num_cycles: int = setting(
        1,
        label="Restarts (cosine_with_restarts)",
        kohya="lr_scheduler_num_cycles",
        ge=1,
        le=1000,
        help="Number of cosine cycles for 'cosine_with_restarts'.",
    )
    lr_scheduler_power: float = setting(
        1.0,
        label="Power (polynomial)",
        kohya="lr_scheduler_power",
        gt=0.0,
        le=10.0,
        help="Exponent of the 'polynomial' schedule (1 = linear).",
    )
    max_grad_norm: float = setting(
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
class TrainingConfig(CoercedGroup):
    """Length, batch, precision and the training objective's knobs."""

    max_train_epochs: int = setting(
        10,
        label="Epochs",
        kohya="max_train_epochs",
        ge=1,
        le=10_000,
        help="Number of passes over the dataset (with folder repeats). Ignored when 'Max steps' is set.",
    )
    max_train_steps: int | None = setting(
        None,
        label="Max steps",
        kohya="max_train_steps",
        kohya_default=1600,
        ge=1,
        le=1_000_000,
        help="Stop after this many optimizer steps; unset = from the epochs. (In a kohya file without "
        "[lora_train], epochs win over steps, as in kohya.)",
    )
    train_batch_size: int = setting(
        1,
        label="Batch size",
        kohya="train_batch_size",
        ge=1,
        le=64,
        help="Images per step; raise it only if VRAM allows (the WebUI's model is loaded too).",
    )
    gradient_accumulation_steps: int = setting(
        1,
        label="Gradient accumulation",
        kohya="gradient_accumulation_steps",
        ge=1,
        le=256,
        help="Add up gradients over N batches before each optimizer step (a bigger batch without more VRAM).",
    )
    gradient_checkpointing: bool = setting(
        False,
        label="Gradient checkpointing",
        kohya="gradient_checkpointing",
        help="Recompute activations in the backward pass: much less VRAM, about 20-30% slower.",
    )
    mixed_precision: str = setting(
        "fp16",
        label="Mixed precision",
        kohya="mixed_precision",
        kohya_default="no",
        choices=MIXED_PRECISIONS,
        help="Autocast of an fp32 model (--no-half): fp16, bf16 (RTX 30xx+) or no; an fp16/bf16 model keeps its dtype.",
    )
    seed: int | None = setting(
        None,
        label="Seed",
        kohya="seed",
        ge=0,
        le=MAX_SEED,
        help="Random seed for a reproducible run; unset = a random seed each run (as kohya).",
    )
    clip_skip: int | None = setting(
        None,
        label="CLIP skip",
        kohya="clip_skip",
        kohya_default=1,
        ge=1,
        le=12,
        help="Text encoder layer N from the end (2 for anime models); unset = the WebUI's. SDXL ignores it.",
    )
    noise_offset: float = setting(
        0.0,
        label="Noise offset",
        kohya="noise_offset",
        ge=0.0,
        le=1.0,
        help="Offset noise strength for darker darks / brighter brights (0 = off; 0.05-0.1 is typical).",
    )
    min_snr_gamma: float | None = setting(
        None,
        label="Min-SNR gamma",
        kohya="min_snr_gamma",
        ge=0.0,
        le=100.0,
        help="Min-SNR loss weighting; 5 is the paper's value. Unset or 0 = off.",
    )


@dataclass
class SaveConfig(CoercedGroup):
    """Where and how the LoRA file is written."""

    output_name: str = setting(
        "my_lora",
        label="File name",
        kohya="output_name",
        kohya_default="last",
        help="File name without extension; the LoRA is then used as <lora:NAME:1>. Letters, digits, spaces, "
        "'-', '_' and '.', no path separators.",
    )
    output_dir: str | None = setting(
        None,
        label="Output folder",
        kohya="output_dir",
        help="Folder to write the LoRA to; unset = the WebUI's Lora folder (models/Lora).",
    )
    overwrite: bool = setting(
        False,
        label="Overwrite an existing file",
        help="Replace a file of the same name; off = keep it and save as the first free name (NAME_1 ...).",
    )
    save_precision: str = setting(
        "fp16",
        label="Save precision",
        kohya="save_precision",
        kohya_default="float",
        choices=SAVE_PRECISIONS,
        help="Weight precision in the file: fp16 (usual), bf16, or float (fp32, twice the size).",
    )
    save_every_n_epochs: int | None = setting(
        None,
        label="Save every N epochs",
        kohya="save_every_n_epochs",
        ge=1,
        le=10_000,
        help="Also save a numbered file every N epochs; unset = only the final file.",
    )
    save_every_n_steps: int | None = setting(
        None,
        label="Save every N steps",
        kohya="save_every_n_steps",
        ge=1,
        le=1_000_000,
        help="Also save a numbered file every N steps; unset = off.",
    )
    save_state: bool = setting(
        False,
        label="Save resume state",
        kohya="save_state",
        help="Also write the optimizer state (safetensors + JSON) with each save, so training can resume.",
    )
    training_comment: str | None = setting(
        None,
        label="Training comment",
        kohya="training_comment",
        help="Free text stored in the file's metadata (ss_training_comment).",
    )
    metadata_title: str | None = setting(
        None,
        label="Title",
        kohya="metadata_title",
        help="Title in the file's metadata (modelspec.title); unset = the file name.",
    )
    metadata_author: str | None = setting(
        None,
        label="Author",
        kohya="metadata_author",
        help="Author in the file's metadata (modelspec.author).",
    )
    metadata_description: str | None = setting(
        None,
        label="Description",
        kohya="metadata_description",
        help="Description in the file's metadata (modelspec.description).",
    )
    metadata_tags: str | None = setting(
        None,
        label="Tags",
        kohya="metadata_tags",
        help="Comma-separated tags in the file's metadata (modelspec.tags).",
    )
