"""A memory and time plan for a run, before it starts, and what to change when it does not fit.

:func:`profile_model` reads what the plan needs from the loaded model once (parameter counts
and bytes per part, the UNet's blocks with their channels and scale, the LoRA targets);
:func:`estimate` combines it with the settings and the free device memory into a :class:`Plan`.

The peak (what ``torch.cuda.max_memory_allocated`` reports for a step) is modelled as::

    peak = weights            every resident part (UNet, text encoders, VAE) at its dtype
         + lora               LoRA parameters (fp32) + their gradients (fp32) + optimizer state
         + max(activations,   the UNet's saved activations for backward, plus the backward's
               vae_encode)    transients; or the VAE encoding of a batch when latents are not cached
         + text               text-encoder activations when they are trained

Activations are counted per UNet block from the latent size (``H/8 x W/8 / scale^2`` positions)
and its channels, in bytes per position and channel (``_RES``, ``_TRANSFORMER``, ...: the tensors
each block keeps for backward, GroupNorm32's fp32 copies included), times ``batch``. Attention
without a memory-efficient kernel (the WebUI's V1/InvokeAI/Doggettx/none) also keeps the
``heads x n x n`` softmax of every self-attention. Gradient checkpointing keeps only each
top-level block's input and recomputes one block at a time. ``ACTIVATION_SCALE`` is the one
constant fitted to measurements: the tiny models' peaks of live tensors on the CPU
(``bench/bench_memory_plan.py``), to be checked on a GPU with ``bench/gpu_check.py``.

Seconds per step: the UNet's multiply-adds per step (forward, the backward to the inputs only,
since base weights take no gradient, a second forward with checkpointing) over a throughput
measured with a matmul on the device (``train.device.device_throughput``) at an efficiency typical of
UNet training (``_EFFICIENCY``), plus a per-module overhead per pass (``_OVERHEAD_S``). A rough
figure: it says whether a run takes minutes or hours.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from lora_trainer.naming import find_targets, is_diffusers_unet, ldm_top_blocks

if TYPE_CHECKING:
    from lora_trainer.config import TrainConfig
    from lora_trainer.contracts import DeviceMemory, ModelAdapter

GB = 1e9
VAE_PARAMS = 83_653_863
"""AutoencoderKL of SD1/SD2/SDXL (same architecture in all three), when the model gives no VAE module."""
VAE_ENCODER_CHANNELS = 128

# bytes kept for backward per position and channel, in units of the compute dtype's size (a) plus fp32 copies
_RES = (2.0, 8.0)  # (x a, + fp32 bytes): norm output, SiLU output per conv; GroupNorm32's fp32 input copy
_TRANSFORMER = 31.0  # x a per inner channel per token: norms, q/k/v, attention out, residuals, GEGLU (8d+4d+4d)
_CONV = 1.0  # x a: Downsample/Upsample/conv_in/out
_TE_LAYER = 20.0  # x a per width per token of a trained text-encoder layer
_BACKWARD_TRANSIENT = 2.0  # the largest block's activations again, as gradients during backward
ACTIVATION_SCALE = 0.78
"""Fitted: measured / modelled activation bytes of the tiny models (see the module docstring)."""
_EFFICIENT_ATTENTION = ("sdp", "sdp-no-mem", "xformers", "sub-quadratic", "flash", "")
_EFFICIENCY = {"cuda": 0.35, "cpu": 0.25}
_OVERHEAD_S = {"cuda": 30e-6, "cpu": 100e-6}
"""Seconds per UNet leaf module and pass (Python, autograd, LoRA hooks, kernel launches): what small
models and small resolutions spend their time on. CPU: fitted to the tiny models (bench/gpu_check.py
--size tiny --device cpu: 80-160 us); CUDA: a launch-bound guess, to be checked by bench/gpu_check.py."""

OPTIMIZER_STATE_BYTES = {"adamw": 8.0, "adamw8bit": 2.0, "lion": 4.0, "prodigy": 16.0, "adafactor": 4.0}
"""Bytes of optimizer state per LoRA parameter: AdamW two fp32 moments; AdamW8bit two 8-bit moments;
Lion one fp32 moment; Prodigy four fp32 tensors (moments, initial weights, s); Adafactor at most one fp32
second moment (an upper bound: it factors a matrix's second moment into row and column vectors)."""

_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class Block:
    """One UNet unit activations are counted over.

    kind: "res", "transformer", "conv"; top: index of its top-level block (checkpointing's unit);
    scale: spatial downscale against the latent; c_in/c_out: channels; depth: transformer blocks; heads.
    """

    kind: str
    top: int
    scale: int
    c_in: int
    c_out: int
    depth: int = 0
    heads: int = 0


@dataclass(frozen=True)
class Part:
    params: int
    bytes: int
    dtype: str


@dataclass(frozen=True)
class ModelProfile:
    """What the plan needs from a loaded model (read once, no forward pass)."""

    family: str
    dtype: str  # the UNet's
    parts: dict[str, Part]  # "unet", "te"/"te1"/"te2", "vae"
    blocks: tuple[Block, ...]
    top_inputs: tuple[tuple[int, int], ...]  # (channels, scale) of each top-level block's input
    text: dict[str, tuple[int, int]]  # text encoder -> (width, layers)
    targets: dict[str, tuple[tuple[str, int, int, int], ...]]  # "unet"/"unet_conv"/te -> (kind, in, out, k)
    unet_macs: float  # multiply-adds of one UNet forward per latent position at scale 1 (for the time)
    unet_modules: int = 0  # leaf modules of the UNet: the per-call overhead of a step

    def lora_params(self, rank: int, conv_rank: int, train_unet: bool, train_te: bool) -> int:
        groups = [g for g in self.text if train_te]
        if train_unet:
            groups.append("unet_conv" if conv_rank else "unet")
        total = 0
        for group in groups:
            for kind, n_in, n_out, k in self.targets.get(group, ()):
                r = conv_rank if kind == "conv3x3" else rank
                total += r * (n_in * k * k + n_out)
        return total


@dataclass
class Suggestion:
    change: str
    peak_bytes: float
    fits: bool

    def to_dict(self) -> dict[str, Any]:
        return {"change": self.change, "peak_gb": round(self.peak_bytes / GB, 2), "fits": self.fits}


@dataclass
class Plan:
    """The estimate for one run's settings on one model and device."""

    peak_bytes: float
    parts: dict[str, float]  # weights, lora, optimizer, activations, text, vae_encode
    free_bytes: float | None
    total_bytes: float | None
    device: str  # the device's name ("NVIDIA GeForce RTX 3060", "CPU")
    device_type: str  # "cuda", "cpu", ...
    seconds_per_step: float | None
    settings: dict[str, Any]
    suggestions: list[Suggestion] = field(default_factory=list)
    measured_peak_bytes: float | None = None
    inputs: tuple[ModelProfile, Settings] | None = field(default=None, repr=False)

    @property
    def fits(self) -> bool | None:
        return None if self.free_bytes is None else self.peak_bytes <= self.free_bytes

    def summary(self) -> str:
        """One line: "SDXL 1024 px batch 1: ~9.8 GB peak, 8.0 GB free: does not fit; ~1.9 s/step"."""
        s = self.settings
        head = f"{s['family']} {s['width']}x{s['height']} px, batch {s['batch']}, rank {s['rank']}"
        text = f"{head}: estimated peak {format_bytes(self.peak_bytes)}"
        if self.free_bytes is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            text += f" vs {format_bytes(self.free_bytes)} free on {self.device} ({verdict})"
        text += f"; {_seconds(self.seconds_per_step)}/step"
        return text

    def advice(self) -> str:
        """The settings to change, best first, with their estimated peaks ("" when none is needed)."""
        if not self.suggestions:
            return ""
        items = [f"{x.change} (~{format_bytes(x.peak_bytes)}{', fits' if x.fits else ''})" for x in self.suggestions]
        return "Try: " + "; ".join(items) + "."

    def advice_below(self, fraction: float) -> str:
        """Advice for a peak ``fraction`` of the estimate: when a run that should have fit ran out anyway."""
        if self.inputs is None:
            return ""
        profile, settings = self.inputs
        found = suggestions(profile, settings, self.peak_bytes * fraction, self.device_type)
        return replace(self, suggestions=found).advice()

    def to_dict(self) -> dict[str, Any]:
        return {
            "peak_gb": round(self.peak_bytes / GB, 3),
            "parts_gb": {k: round(v / GB, 3) for k, v in self.parts.items()},
            "free_gb": None if self.free_bytes is None else round(self.free_bytes / GB, 3),
            "total_gb": None if self.total_bytes is None else round(self.total_bytes / GB, 3),
            "device": self.device,
            "fits": self.fits,
            "seconds_per_step": self.seconds_per_step,
            "settings": self.settings,
            "suggestions": [x.to_dict() for x in self.suggestions],
            "measured_peak_gb": None if self.measured_peak_bytes is None else round(self.measured_peak_bytes / GB, 3),
            "summary": self.summary(),
            "advice": self.advice(),
        }


def format_bytes(value: float) -> str:
    """ "9.8 GB", "350 MB"."""
    return f"{value / GB:.1f} GB" if value >= GB else f"{value / 1e6:.0f} MB"


def _seconds(value: float | None) -> str:
    if value is None:
        return "unknown s"
    return f"~{value:.2f} s" if value < 10 else f"~{value:.0f} s"


# --------------------------------------------------------------------------------------------
# reading the model


def _part(modules: Iterable[nn.Module]) -> Part:
    tensors = {id(t): t for m in modules for t in [*m.parameters(), *m.buffers()]}.values()
    params = {id(p): p for m in modules for p in m.parameters()}.values()
    dtypes = {p.dtype for p in params}
    dtype = _DTYPE_NAMES.get(next(iter(dtypes)), "fp32") if len(dtypes) == 1 else "mixed"
    return Part(sum(p.numel() for p in params), sum(t.numel() * t.element_size() for t in tensors), dtype)


def _heads(module: nn.Module) -> int:
    for m in module.modules():
        if type(m).__name__ in ("CrossAttention", "Attention"):  # ldm's, diffusers'
            return int(getattr(m, "heads", 8))
    return 8


# ldm/sgm class -> diffusers class of the same layer
_RES_CLASSES, _TRANSFORMER_CLASSES = ("ResBlock", "ResnetBlock2D"), ("SpatialTransformer", "Transformer2DModel")
_DOWN_CLASSES, _UP_CLASSES = ("Downsample", "Downsample2D"), ("Upsample", "Upsample2D")


def _unet_tops(unet: nn.Module) -> tuple[list[list[nn.Module]], int]:
    """The layers of each top-level block in ldm's order, and how many are input blocks.

    A diffusers UNet is grouped as the ldm one, so both give the same profile."""
    if is_diffusers_unet(unet):
        return ldm_top_blocks(unet)
    inputs = list(getattr(unet, "input_blocks", []))
    tops = [*inputs, getattr(unet, "middle_block", None), *getattr(unet, "output_blocks", [])]
    return [list(b.children()) for b in tops if b is not None], len(inputs)


def _res_out(layer: nn.Module) -> int:
    if type(layer).__name__ == "ResnetBlock2D":
        return int(cast("nn.Conv2d", layer.get_submodule("conv2")).out_channels)
    return int(cast("nn.Conv2d", cast("nn.Sequential", layer.out_layers)[-1]).out_channels)


def _walk_unet(unet: nn.Module) -> tuple[list[Block], list[tuple[int, int]]]:
    """Blocks and top-level inputs of an ldm/sgm or diffusers UNet, by class name (ResBlock, SpatialTransformer, ...)."""
    blocks: list[Block] = []
    inputs: list[tuple[int, int]] = []
    scale, channels, skips = 1, 0, []
    groups, n_in = _unet_tops(unet)
    for top, group in enumerate(groups):
        if top > n_in:  # output blocks take the skip concatenated
            channels += skips.pop()[0]
        inputs.append((channels or 4, scale))
        for layer in group:
            name = type(layer).__name__
            if name in _RES_CLASSES:
                c_out = _res_out(layer)
                blocks.append(Block("res", top, scale, channels, c_out))
                channels = c_out
            elif name in _TRANSFORMER_CLASSES:
                depth = len(getattr(layer, "transformer_blocks", []))
                blocks.append(Block("transformer", top, scale, channels, channels, depth, _heads(layer)))
            elif name in (*_DOWN_CLASSES, *_UP_CLASSES):
                scale = scale * 2 if name in _DOWN_CLASSES else scale // 2
                blocks.append(Block("conv", top, scale, channels, channels))
            elif isinstance(layer, nn.Conv2d):
                channels = int(layer.out_channels)
                blocks.append(Block("conv", top, scale, int(layer.in_channels), channels))
        if top < n_in:
            skips.append((channels, scale))
    return blocks, inputs


def _unet_macs(blocks: Iterable[Block], context_tokens: int = 77) -> float:
    """Multiply-adds of one forward per latent position (scale-1 position) of the UNet."""
    macs = 0.0
    for b in blocks:
        positions = 1.0 / (b.scale * b.scale)
        if b.kind == "res":
            macs += positions * 9 * (b.c_in * b.c_out + b.c_out * b.c_out)
        elif b.kind == "transformer":
            d = b.c_out
            per_block = 4 * d * d + 2 * d * d + 8 * d * d + 4 * d * d  # self-attn, cross q/out, GEGLU proj, ff out
            macs += positions * (2 * d * d + b.depth * per_block)
        else:
            macs += positions * 9 * b.c_in * b.c_out
    return macs


def _attention_macs(blocks: Iterable[Block], positions: int) -> float:
    """Self-attention's q k^T and softmax v, which grow with the square of the positions."""
    total = 0.0
    for b in blocks:
        if b.kind == "transformer":
            n = positions / (b.scale * b.scale)
            total += b.depth * 2 * n * n * b.c_out
    return total


def _target_shapes(targets) -> tuple[tuple[str, int, int, int], ...]:
    return tuple((t.kind, t.in_features, t.out_features, t.kernel_size[0]) for t in targets)


def _text_shape(te: nn.Module) -> tuple[int, int]:
    config = getattr(te, "config", None)
    if config is not None and hasattr(config, "hidden_size"):
        return int(config.hidden_size), int(config.num_hidden_layers)
    transformer = getattr(te, "transformer", None)
    return int(getattr(transformer, "width", 768)), int(getattr(transformer, "layers", 12))


def profile_model(
    family: str, unet: nn.Module, text_encoders: Mapping[str, nn.Module], vae: nn.Module | None = None
) -> ModelProfile:
    """Read a model's sizes, UNet blocks and LoRA targets (no forward pass, no copies)."""
    parts = {"unet": _part([unet])}
    parts.update({name: _part([te]) for name, te in text_encoders.items()})
    unet_part = parts["unet"]
    if vae is not None:
        parts["vae"] = _part([vae])
    else:
        size = 2 if unet_part.dtype in ("fp16", "bf16") else 4
        parts["vae"] = Part(VAE_PARAMS, VAE_PARAMS * size, unet_part.dtype)
    blocks, inputs = _walk_unet(unet)
    targets = {
        "unet": _target_shapes(find_targets(family, unet, None)),
        "unet_conv": _target_shapes(find_targets(family, unet, None, conv=True)),
    }
    for name, te in text_encoders.items():
        targets[name] = _target_shapes(find_targets(family, None, {name: te}))
    return ModelProfile(
        family=family,
        dtype=unet_part.dtype,
        parts=parts,
        blocks=tuple(blocks),
        top_inputs=tuple(inputs),
        text={name: _text_shape(te) for name, te in text_encoders.items()},
        targets=targets,
        unet_macs=_unet_macs(blocks),
        unet_modules=sum(1 for m in unet.modules() if next(m.children(), None) is None),
    )


def profile_adapter(adapter: ModelAdapter) -> ModelProfile:
    """:func:`profile_model` of a model adapter; its VAE from an optional ``vae`` attribute, else from the
    WebUI model it wraps (``sd_model.first_stage_model``), else the standard VAE's size."""
    vae = getattr(adapter, "vae", None)
    if vae is None:
        vae = getattr(getattr(adapter, "sd_model", None), "first_stage_model", None)
    return profile_model(adapter.family, adapter.unet, adapter.text_encoders, vae)


# --------------------------------------------------------------------------------------------
# the estimate


@dataclass(frozen=True)
class Settings:
    """The settings the estimate depends on (:func:`settings_from_config` reads them from a config)."""

    width: int = 512
    height: int = 512
    batch: int = 1
    rank: int = 16
    conv_rank: int = 0
    train_unet: bool = True
    train_text_encoder: bool = False
    optimizer: str = "AdamW"
    mixed_precision: str = "fp16"
    gradient_checkpointing: bool = False
    cache_latents: bool = True
    cache_text_encoder_outputs: bool = False
    max_token_length: int = 75
    attention: str = "sdp"
    placement: str = ""  # "", "medvram", "lowvram": parts not in use stay in CPU memory


def settings_from_config(cfg: TrainConfig, *, attention: str = "sdp", placement: str = "") -> Settings:
    ds, net, tr = cfg.dataset, cfg.network, cfg.training
    width, height = ds.resolution_wh
    return Settings(
        width=width,
        height=height,
        batch=tr.train_batch_size,
        rank=net.network_dim,
        conv_rank=net.conv_dim,
        train_unet=net.train_unet,
        train_text_encoder=net.train_text_encoder,
        optimizer=cfg.optim.optimizer_type,
        mixed_precision=tr.mixed_precision,
        gradient_checkpointing=tr.gradient_checkpointing,
        cache_latents=ds.cache_latents,
        cache_text_encoder_outputs=ds.cache_text_encoder_outputs,
        max_token_length=ds.max_token_length,
        attention=attention,
        placement=placement,
    )


def _compute_bytes(profile: ModelProfile, s: Settings, device: str) -> int:
    """Bytes per element of the activations: the autocast dtype, else the UNet's."""
    return 2 if s.mixed_precision in ("fp16", "bf16") or profile.dtype in ("fp16", "bf16") else 4


def _block_bytes(b: Block, positions: float, a: int, efficient: bool) -> float:
    n = positions / (b.scale * b.scale)
    if b.kind == "res":
        per = (b.c_in + b.c_out) * (_RES[0] * a + _RES[1]) + b.c_out * a
        return n * per
    if b.kind == "transformer":
        total = n * b.c_out * a * (2 + _TRANSFORMER * b.depth)
        if not efficient:
            total += b.depth * b.heads * n * n * a
        return total
    return n * b.c_out * a * _CONV


def _activations(profile: ModelProfile, s: Settings, positions: float, a: int) -> float:
    efficient = s.attention.lower() in _EFFICIENT_ATTENTION
    per_block = [(b.top, _block_bytes(b, positions, a, efficient)) for b in profile.blocks]
    largest = max((v for _, v in per_block), default=0.0)
    if not s.gradient_checkpointing:
        return ACTIVATION_SCALE * s.batch * (sum(v for _, v in per_block) + _BACKWARD_TRANSIENT * largest)
    per_top: dict[int, float] = {}
    for top, v in per_block:
        per_top[top] = per_top.get(top, 0.0) + v
    kept = sum(c * positions / (sc * sc) * a for c, sc in profile.top_inputs)
    recomputed = max(per_top.values(), default=0.0)
    return ACTIVATION_SCALE * s.batch * (kept + recomputed + largest)


def _text_bytes(profile: ModelProfile, s: Settings, a: int) -> float:
    if not s.train_text_encoder:
        return 0.0
    tokens = 77 * math.ceil(s.max_token_length / 75)
    return s.batch * sum(tokens * width * layers * _TE_LAYER * a for width, layers in profile.text.values())


def _vae_encode_bytes(profile: ModelProfile, s: Settings) -> float:
    """A batch through the VAE encoder without gradients: a few full-resolution 128-channel maps, fp32 norms."""
    vae = profile.parts["vae"]
    a = 2 if vae.dtype in ("fp16", "bf16") else 4
    return s.batch * s.width * s.height * VAE_ENCODER_CHANNELS * (2 * a + 4)


def _resident_weights(profile: ModelProfile, s: Settings) -> float:
    parts = profile.parts
    weights = float(parts["unet"].bytes)
    te = sum(p.bytes for name, p in parts.items() if name not in ("unet", "vae"))
    # only a host that keeps parts in CPU memory (--medvram/--lowvram) moves the unused ones off the device
    offloading = s.placement in ("medvram", "lowvram")
    if not offloading or s.train_text_encoder or not s.cache_text_encoder_outputs:
        weights += te
    if not offloading or not s.cache_latents:
        weights += parts["vae"].bytes
    return weights


def _breakdown(profile: ModelProfile, s: Settings, device: str) -> dict[str, float]:
    a = _compute_bytes(profile, s, device)
    positions = (s.width // 8) * (s.height // 8)
    lora = profile.lora_params(s.rank, s.conv_rank, s.train_unet, s.train_text_encoder)
    state = OPTIMIZER_STATE_BYTES.get(s.optimizer.lower(), 8.0)
    activations = _activations(profile, s, positions, a)
    vae_encode = 0.0 if s.cache_latents else _vae_encode_bytes(profile, s)
    return {
        "weights": _resident_weights(profile, s),
        "lora": lora * 8.0,  # fp32 weights and gradients
        "optimizer": lora * state,
        "activations": activations,
        "text": _text_bytes(profile, s, a),
        "vae_encode": max(0.0, vae_encode - activations),  # encoding comes before the forward pass
    }


def peak_bytes(profile: ModelProfile, s: Settings, device: str = "cuda") -> float:
    return sum(_breakdown(profile, s, device).values())


def seconds_per_step(profile: ModelProfile, s: Settings, flops_per_s: float | None, device: str) -> float | None:
    if not flops_per_s:
        return None
    positions = (s.width // 8) * (s.height // 8)
    macs = profile.unet_macs * positions + _attention_macs(profile.blocks, positions)
    passes = 2.0 + (1.0 if s.gradient_checkpointing else 0.0)  # forward, backward to inputs, recompute
    flops = 2.0 * macs * passes * s.batch
    if not s.cache_latents:
        flops += 2.0 * s.batch * s.width * s.height * 9 * VAE_ENCODER_CHANNELS**2 * 4
    overhead = profile.unet_modules * passes * _OVERHEAD_S.get(device, 100e-6)
    return flops / (flops_per_s * _EFFICIENCY.get(device, 0.3)) + overhead


def _candidates(s: Settings) -> list[tuple[str, Settings]]:
    """Changes that lower the peak, in the order a user would rather make them (cheap first)."""
    out: list[tuple[str, Settings]] = []
    if not s.gradient_checkpointing:
        out.append(("gradient checkpointing on", replace(s, gradient_checkpointing=True)))
    if not s.cache_latents:
        out.append(("cache latents on", replace(s, cache_latents=True)))
    if s.attention.lower() not in _EFFICIENT_ATTENTION:
        out.append(("the WebUI's SDP or xformers attention (Settings > Optimizations)", replace(s, attention="sdp")))
    if s.mixed_precision == "no":
        out.append(("mixed precision fp16 (bf16 on RTX 30xx and newer)", replace(s, mixed_precision="fp16")))
    offloading = s.placement in ("medvram", "lowvram")
    if offloading and not s.cache_text_encoder_outputs and not s.train_text_encoder:
        out.append(("cache text encoder outputs on", replace(s, cache_text_encoder_outputs=True)))
    if s.train_text_encoder:
        out.append(("train the UNet only (text encoder off)", replace(s, train_text_encoder=False)))
    if s.optimizer.lower() in ("adamw", "prodigy", "lion"):
        out.append(("optimizer AdamW8bit", replace(s, optimizer="AdamW8bit")))
    if s.batch > 1:
        out.append(
            (
                f"batch {max(1, s.batch // 2)} (raise gradient accumulation to match)",
                replace(s, batch=max(1, s.batch // 2)),
            )
        )
    if not offloading and not s.train_text_encoder:
        medvram = replace(s, placement="medvram", cache_latents=True, cache_text_encoder_outputs=True)
        out.append(("start the WebUI with --medvram-sdxl/--medvram, cache text encoder outputs on", medvram))
    if s.rank > 8:
        out.append((f"rank {s.rank // 2}", replace(s, rank=s.rank // 2)))
    if max(s.width, s.height) > 512:
        w, h = max(256, s.width * 3 // 4 // 64 * 64), max(256, s.height * 3 // 4 // 64 * 64)
        out.append((f"resolution {w}x{h}", replace(s, width=w, height=h)))
    return out


def suggestions(profile: ModelProfile, s: Settings, free: float, device: str) -> list[Suggestion]:
    """Cumulative changes, each with the peak after it and before the next, until the run fits."""
    out: list[Suggestion] = []
    current = s
    for change, _ in _candidates(s):
        candidate = dict(_candidates(current)).get(change)
        if candidate is None:
            continue
        peak = peak_bytes(profile, candidate, device)
        if peak >= peak_bytes(profile, current, device) * 0.99:
            continue  # no real effect here
        current = candidate
        out.append(Suggestion(change, peak, peak <= free))
        if peak <= free:
            break
    return out


def estimate(
    profile: ModelProfile,
    settings: Settings,
    memory: DeviceMemory | None = None,
    *,
    flops_per_s: float | None = None,
) -> Plan:
    """The plan for ``settings`` on the profiled model; suggestions when it does not fit ``memory``."""
    device = memory.device if memory is not None else "cuda"
    parts = _breakdown(profile, settings, device)
    peak = sum(parts.values())
    free = memory.free_bytes if memory is not None else None
    plan = Plan(
        peak_bytes=peak,
        parts=parts,
        free_bytes=free,
        total_bytes=memory.total_bytes if memory is not None else None,
        device=memory.name if memory is not None and memory.name else device,
        device_type=device,
        seconds_per_step=seconds_per_step(profile, settings, flops_per_s, device),
        settings={
            "family": profile.family,
            "width": settings.width,
            "height": settings.height,
            "batch": settings.batch,
            "rank": settings.rank,
            "optimizer": settings.optimizer,
            "mixed_precision": settings.mixed_precision,
            "gradient_checkpointing": settings.gradient_checkpointing,
            "cache_latents": settings.cache_latents,
            "attention": settings.attention,
        },
        inputs=(profile, settings),
    )
    if free is not None and peak > free:
        plan.suggestions = suggestions(profile, settings, free, device)
    return plan
