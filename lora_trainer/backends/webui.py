"""The AUTOMATIC1111 WebUI (v1.10.x) as the trainer's host.

This is the only module that imports the WebUI (``modules.*``) and its builtin Lora
extension (``networks``, from ``extensions-builtin/Lora``). It provides:

* :class:`WebUIAdapter`: the loaded ``shared.sd_model`` (SD1, SD2, SDXL) as a
  :class:`~lora_trainer.contracts.ModelAdapter`. Text goes through the WebUI's own
  conditioning code (its chunking, emphasis, textual-inversion embeddings and clip skip),
  images through its VAE helper, the denoiser through ``sd_model.apply_model``.
* :class:`WebUIHost`: the :class:`~lora_trainer.jobs.Host` the JobManager runs on. A run holds
  the WebUI's queue lock (generation waits meanwhile), shows in ``shared.state`` (progress bar,
  Interrupt button) and leaves the model as it found it.
* :func:`register_settings`, :func:`api_enabled`, :func:`api_auth`, and captioning helpers
  (:func:`deepbooru_tags`, :func:`blip_caption`) for the dataset workshop, also as workshop
  captioners (:class:`DeepBooruCaptioner`, :class:`BlipCaptioner`).

What the WebUI does that matters here (read in its v1.10.1 source):

* ``modules/call_queue.py``: ``queue_lock`` (a FIFO lock) is held by every UI generation
  (``wrap_gradio_gpu_call``) and API generation (``modules/api/api.py``), which then call
  ``shared.state.begin()``; so our run holds it and ends its ``shared.state`` job before
  letting go of it.
* ``extensions-builtin/Lora/networks.py`` patches ``forward`` of Linear/Conv2d/GroupNorm/
  LayerNorm/MultiheadAttention; a generation with ``<lora:...>`` merges deltas into the base
  weights and leaves ``loaded_networks`` populated. A session takes them off first the way
  the WebUI itself does (``load_networks([])``, then ``network_apply_weights`` restores each
  layer from ``network_weights_backup``); the next generation re-applies whatever its prompt asks.
* SDXL: ``GeneralConditioner`` runs an embedder under ``torch.no_grad()`` unless its
  ``is_trainable`` is set, and ``sd_models_xl.get_learned_conditioning`` fixes the size
  conditioning at the generation size, so :class:`WebUIAdapter` builds the conditioner batch
  itself with ``is_trainable`` on for the two text embedders.
* SD2: the ldm OpenCLIP embedder ignores the WebUI's clip skip option (it stops
  ``layer_idx`` blocks early, 1 = penultimate), so a configured clip skip sets ``layer_idx``.
* ``processing.process_images`` may reload the checkpoint named in the settings and caches
  conditionings across calls (``StableDiffusionProcessing.cached_c``); samples pin the
  loaded checkpoint and clear that cache before and after.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import random
import re
import sys
import threading
import weakref
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from modules import call_queue, devices, sd_hijack, sd_models, sd_samplers_common, sd_vae, shared
from torch import nn

from ..config import TrainConfig, list_presets
from ..contracts import Conditioning, ModelInfo, SizeCond
from ..errors import IncompatibleModelError, LoraFileError
from ..io import load_lora, read_safetensors_header
from ..log import logger, warning_once
from ..networks import network_from_weights
from ..text import WINDOW_LENGTH, num_chunks

if TYPE_CHECKING:
    from PIL import Image

    from ..jobs import Job

__all__ = [
    "SETTINGS",
    "BlipCaptioner",
    "DeepBooruCaptioner",
    "WebUIAdapter",
    "WebUIHost",
    "api_auth",
    "api_enabled",
    "blip_caption",
    "blip_captions",
    "deepbooru_tags",
    "deepbooru_tags_many",
    "default_work_dir",
    "detect_model",
    "register_settings",
    "sample_defaults",
    "setting",
]

# --------------------------------------------------------------------------------------------
# settings ("LoRA Train" section of the WebUI's Settings tab)

SETTINGS_SECTION = ("lora_train", "LoRA Train")
OPT_SUBFOLDER = "lora_train_output_subfolder"
OPT_PRESET = "lora_train_default_preset"
OPT_SAMPLER = "lora_train_sample_sampler"
OPT_STEPS = "lora_train_sample_steps"
SETTINGS = {OPT_SUBFOLDER: "", OPT_PRESET: "", OPT_SAMPLER: "Euler a", OPT_STEPS: 20}
"""Our settings and their defaults."""

CLIP_SKIP_OPTION = "CLIP_stop_at_last_layers"
MAX_SEED = 2**32 - 1

# class names of the WebUI's hijacked text-encoder wrappers (modules/sd_hijack_clip.py, sd_hijack_open_clip.py)
_SD1_WRAPPER = "FrozenCLIPEmbedderWithCustomWords"
_SD2_WRAPPER = "FrozenOpenCLIPEmbedderWithCustomWords"
_SDXL_WRAPPERS = ("FrozenCLIPEmbedderForSDXLWithCustomWords", "FrozenOpenCLIPEmbedder2WithCustomWords")


def setting(key: str) -> Any:
    """One of our settings (``SETTINGS``), its default before :func:`register_settings` ran."""
    value = getattr(shared.opts, "data", {}).get(key) if shared.opts is not None else None
    return SETTINGS[key] if value is None else value


def sample_defaults() -> dict[str, Any]:
    """Preview defaults from the settings, as ``SampleConfig`` fields (for the tab and the API)."""
    return {"sample_sampler": str(setting(OPT_SAMPLER)), "sample_steps": int(setting(OPT_STEPS))}


def default_work_dir() -> Path:
    """``<WebUI data dir>/lora_train``: latent caches, resume states, previews, user presets.

    Outside ``models/Lora``, whose subfolders the Lora list scans for .safetensors files."""
    data_dir = getattr(shared.cmd_opts, "data_dir", None) or os.getcwd()
    return Path(data_dir) / "lora_train"


def register_settings() -> None:
    """Add the "LoRA Train" settings section (call from ``script_callbacks.on_ui_settings``)."""
    import gradio as gr  # only here: the WebUI's settings need gradio components
    from modules import sd_samplers

    preset_dir = default_work_dir() / "presets"

    def option(key: str, label: str, component=None, component_args=None, info: str | None = None):
        opt = shared.OptionInfo(
            SETTINGS[key], label, component, component_args, section=SETTINGS_SECTION, category_id="training"
        )
        shared.opts.add_option(key, opt.info(info) if info else opt)

    option(
        OPT_SUBFOLDER,
        "Save trained LoRAs in this subfolder of the Lora folder",
        info="empty = the Lora folder itself; e.g. 'trained'",
    )
    option(
        OPT_PRESET,
        "Preset the training tab starts with",
        gr.Dropdown,
        lambda: {"choices": ["", *list_presets(preset_dir)]},
        info="empty = the built-in defaults",
    )
    option(
        OPT_SAMPLER,
        "Default sampler for training previews",
        gr.Dropdown,
        lambda: {"choices": list(sd_samplers.visible_sampler_names())},
    )
    option(OPT_STEPS, "Default steps for training previews", gr.Slider, {"minimum": 1, "maximum": 150, "step": 1})


def api_enabled() -> bool:
    """True when the WebUI serves its API (``--api`` or ``--nowebui``)."""
    cmd_opts = shared.cmd_opts
    return bool(getattr(cmd_opts, "api", False) or getattr(cmd_opts, "nowebui", False))


def api_auth() -> dict[str, str] | None:
    """``--api-auth user:pass[,user2:pass2]`` as {user: password}, None when not set."""
    from ..webui.api import parse_credentials

    return parse_credentials(getattr(shared.cmd_opts, "api_auth", None))


# --------------------------------------------------------------------------------------------
# the loaded model


def _loaded_model() -> nn.Module | None:
    """The loaded model, without loading one (``shared.sd_model`` loads on first access)."""
    data = getattr(sd_models, "model_data", None)
    if data is not None:
        return data.sd_model
    return shared.sd_model


def _checkpoint_label(sd_model: nn.Module) -> str:
    info = getattr(sd_model, "sd_checkpoint_info", None)
    return str(getattr(info, "title", None) or getattr(info, "name", None) or "unknown checkpoint")


def _vae_label() -> str:
    return sd_vae.get_loaded_vae_name() or "built into the checkpoint"


def _unet_in_channels(unet: nn.Module) -> int:
    try:
        return int(unet.input_blocks[0][0].in_channels)
    except (AttributeError, IndexError, TypeError):
        return int(getattr(unet, "in_channels", 4))


def detect_model(sd_model: nn.Module | None) -> tuple[str, str]:
    """``(family, prediction_type)`` of a WebUI model; IncompatibleModelError says why not."""
    if sd_model is None:
        raise IncompatibleModelError("no model is loaded: pick a Stable Diffusion checkpoint at the top of the page")
    name = _checkpoint_label(sd_model)
    if getattr(sd_model, "is_sd3", False):
        raise IncompatibleModelError(f"{name} is a Stable Diffusion 3 model; only SD1.x, SD2.x and SDXL can be trained")
    unet = getattr(getattr(sd_model, "model", None), "diffusion_model", None)
    if unet is None:
        raise IncompatibleModelError(f"{name} has no UNet the trainer knows (model.diffusion_model)")
    in_channels = _unet_in_channels(unet)
    inpainting = in_channels == 9 or getattr(sd_model, "is_sdxl_inpaint", False)
    special = "an inpainting" if inpainting else f"a {in_channels}-channel"

    if getattr(sd_model, "is_sdxl", False):
        if inpainting or in_channels != 4:
            raise IncompatibleModelError(f"{name} is {special} SDXL model; only text-to-image models can be trained")
        embedders = list(getattr(getattr(sd_model, "conditioner", None), "embedders", []))
        kinds = tuple(type(e).__name__ for e in embedders if hasattr(e, "wrapped"))
        if kinds != _SDXL_WRAPPERS:
            if kinds == _SDXL_WRAPPERS[1:]:
                raise IncompatibleModelError(
                    f"{name} is an SDXL refiner; LoRAs are trained on an SDXL base model (two text encoders)"
                )
            raise IncompatibleModelError(f"{name}: unexpected SDXL text encoders {kinds or 'none'}")
        family = "sdxl"
    else:
        if getattr(sd_model, "cond_stage_key", "txt") == "edit":
            raise IncompatibleModelError(
                f"{name} is an instruct-pix2pix model; only text-to-image models can be trained"
            )
        conditioning_key = getattr(sd_model.model, "conditioning_key", "crossattn")
        if in_channels != 4 or conditioning_key not in (None, "crossattn"):
            kind = special if in_channels != 4 else f"a '{conditioning_key}'-conditioned (unCLIP/depth)"
            raise IncompatibleModelError(f"{name} is {kind} model; only text-to-image models can be trained")
        wrapper = type(getattr(sd_model, "cond_stage_model", None)).__name__
        if wrapper == _SD1_WRAPPER and not getattr(sd_model, "is_sd2", False):
            family = "sd1"
        elif wrapper == _SD2_WRAPPER:
            family = "sd2"
        else:
            raise IncompatibleModelError(
                f"{name}: its text encoder ({wrapper}) is not one the trainer supports "
                "(SD1 CLIP ViT-L or SD2 OpenCLIP ViT-H, as the WebUI wraps them)"
            )

    parameterization = getattr(sd_model, "parameterization", "eps")
    if parameterization not in ("eps", "v"):
        raise IncompatibleModelError(
            f"{name} predicts {parameterization!r}; only epsilon and v-prediction are supported"
        )
    return family, "v_prediction" if parameterization == "v" else "epsilon"


def _environment_problem(sd_model: nn.Module) -> str | None:
    """Why the WebUI's current setup cannot train on ``sd_model`` (None if it can)."""
    cmd_opts = shared.cmd_opts
    flags = [f"--{name}" for name in ("lowvram", "medvram") if getattr(cmd_opts, name, False)]
    if getattr(cmd_opts, "medvram_sdxl", False) and getattr(sd_model, "is_sdxl", False):
        flags.append("--medvram-sdxl")
    if flags or getattr(sd_model, "lowvram", False):
        which = " / ".join(flags) or "--medvram or --lowvram"
        return (
            f"the WebUI runs with {which}: it keeps parts of the model in CPU memory and moves them to the GPU "
            "with hooks during each forward pass, which training (backward passes through those parts) cannot "
            "work with. Restart the WebUI without that option to train"
            + (" (--medvram-sdxl alone still lets you train SD1/SD2 models)" if "--medvram-sdxl" in flags else "")
        )
    if getattr(devices, "fp8", False):
        return "FP8 weight storage is on (Settings > Optimizations > FP8 weight); turn it off to train"
    try:
        from modules import sd_unet
    except ImportError:
        return None
    if getattr(sd_unet, "current_unet", None) is not None:
        return "an alternative UNet (e.g. TensorRT) is active: set 'SD Unet' to None in the settings to train"
    return None


def _text_encoders(sd_model: nn.Module, family: str) -> dict[str, nn.Module]:
    """The kohya-relevant text encoder modules (HF CLIPTextModel / OpenCLIP model) after the hijack."""
    if family == "sdxl":
        embedders = sd_model.conditioner.embedders
        return {"te1": embedders[0].wrapped.transformer, "te2": embedders[1].wrapped.model}
    wrapped = sd_model.cond_stage_model.wrapped
    return {"te": wrapped.transformer if family == "sd1" else wrapped.model}


def _set_attr(undo: contextlib.ExitStack, obj: Any, name: str, value: Any) -> None:
    """Set ``obj.name`` and register putting the old value (or its absence) back."""
    missing = object()
    old = getattr(obj, name, missing)  # through properties too (sgm's embedders have ucg_rate as one)
    setattr(obj, name, value)

    def restore() -> None:
        if old is missing:
            with contextlib.suppress(AttributeError):
                delattr(obj, name)
        else:
            setattr(obj, name, old)

    undo.callback(restore)


class WebUIAdapter:
    """The WebUI's loaded model as a :class:`~lora_trainer.contracts.ModelAdapter`.

    Temporary changes it makes for training (the SDXL text embedders' ``is_trainable``, a
    configured clip skip) are undone by ``undo`` (an ExitStack the host's session closes),
    or by :meth:`close` when the adapter made its own.
    """

    def __init__(
        self,
        sd_model: nn.Module,
        *,
        undo: contextlib.ExitStack | None = None,
        family: str | None = None,
        prediction_type: str | None = None,
    ):
        if family is None or prediction_type is None:
            family, prediction_type = detect_model(sd_model)
        self.sd_model = sd_model
        self.family = family
        self.prediction_type = prediction_type
        self._own_undo = undo is None
        self._undo = undo if undo is not None else contextlib.ExitStack()
        self.unet = sd_model.model.diffusion_model
        self.text_encoders = _text_encoders(sd_model, family)
        param = next(self.unet.parameters())
        self.device, self.dtype = param.device, param.dtype
        # the schedule as loaded: processing may swap in a zero-terminal-SNR or fp16 copy for sampling
        alphas = getattr(sd_model, "alphas_cumprod_original", None)
        if alphas is None:
            alphas = sd_model.alphas_cumprod
        self.alphas_cumprod = alphas.detach().to(torch.float32)
        info = getattr(sd_model, "sd_checkpoint_info", None)
        filename = getattr(info, "filename", None)
        self.model_name = os.path.basename(filename) if filename else ""
        self.model_hash = str(getattr(info, "sha256", None) or "")
        self.vae_name = sd_vae.get_loaded_vae_name() or ""
        if family == "sd2":
            self.default_clip_skip = max(1, int(getattr(sd_model.cond_stage_model.wrapped, "layer_idx", 1) or 1))
        else:
            self.default_clip_skip = int(getattr(shared.opts, CLIP_SKIP_OPTION, 1) or 1)
        self._clip_skip = self.default_clip_skip
        if family == "sdxl":
            for embedder in sd_model.conditioner.embedders:
                # as get_learned_conditioning does; the WebUI's wrappers have no ucg_rate until then
                _set_attr(self._undo, embedder, "ucg_rate", 0.0)
            for embedder in sd_model.conditioner.embedders[:2]:
                _set_attr(self._undo, embedder, "is_trainable", True)  # else run under no_grad

    def close(self) -> None:
        """Undo the adapter's changes (only when it made its own undo stack)."""
        if self._own_undo:
            self._undo.close()

    # -- images

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        images01 = ((pixels.float() + 1.0) / 2.0).clamp(0.0, 1.0)
        # approximation 0 = the full VAE (not TAESD), whatever the UI's encode method is
        return sd_samplers_common.images_tensor_to_samples(images01, 0, self.sd_model)

    # -- text

    def _use_clip_skip(self, clip_skip: int) -> None:
        """Make the WebUI's conditioning use ``clip_skip`` (for the rest of the session)."""
        if clip_skip == self._clip_skip or self.family == "sdxl":
            return
        if clip_skip < 1:
            raise ValueError(f"clip_skip must be >= 1, got {clip_skip}")
        if self.family == "sd2":
            _set_attr(self._undo, self.sd_model.cond_stage_model.wrapped, "layer_idx", int(clip_skip))
        else:
            _set_option_for_session(self._undo, CLIP_SKIP_OPTION, int(clip_skip))
        self._clip_skip = clip_skip

    def encode_text(
        self,
        captions: Sequence[str],
        *,
        clip_skip: int = 1,
        max_token_length: int = 75,
        size_cond: Sequence[SizeCond] | None = None,
    ) -> Conditioning:
        texts = [str(c) for c in captions]
        width = num_chunks(max_token_length) * WINDOW_LENGTH
        if self.family == "sdxl":
            out = self.sd_model.conditioner(self._sdxl_batch(texts, size_cond))
            return Conditioning(out["crossattn"][:, :width], out["vector"])
        self._use_clip_skip(clip_skip)
        context = self.sd_model.cond_stage_model(texts)
        return Conditioning(context[:, :width])  # the WebUI encodes every chunk; keep max_token_length's

    def _sdxl_batch(self, texts: list[str], size_cond: Sequence[SizeCond] | None) -> dict[str, Any]:
        if size_cond is None:
            size_cond = [SizeCond((1024, 1024), (0, 0), (1024, 1024))] * len(texts)
        if len(size_cond) != len(texts):
            raise ValueError(f"{len(size_cond)} size_cond for {len(texts)} captions")

        def rows(field: str) -> torch.Tensor:
            values = [list(getattr(s, field)) for s in size_cond]
            return torch.tensor(values, device=devices.device, dtype=devices.dtype)

        return {
            "txt": texts,
            "original_size_as_tuple": rows("original_size"),
            "crop_coords_top_left": rows("crop_top_left"),
            "target_size_as_tuple": rows("target_size"),
        }

    # -- denoiser

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        if self.family == "sdxl":
            return self.sd_model.apply_model(
                noisy_latents, timesteps, {"crossattn": cond.context, "vector": cond.vector}
            )
        return self.sd_model.apply_model(noisy_latents, timesteps, cond.context)


def _set_option_for_session(undo: contextlib.ExitStack, key: str, value: Any) -> None:
    """Set a WebUI option in memory (not saved) and put the old value back at the end of the session,
    unless someone changed it meanwhile. Written to ``opts.data`` directly, as the WebUI does for
    its own internal changes, so no onchange callback runs and frozen settings do not block it."""
    data = shared.opts.data
    missing = object()
    old = data.get(key, missing)
    data[key] = value

    def restore() -> None:
        if data.get(key, missing) != value:
            return  # changed by the user during the run: keep theirs
        if old is missing:
            data.pop(key, None)
        else:
            data[key] = old

    undo.callback(restore)


# --------------------------------------------------------------------------------------------
# leaving the model as found


def _lora_extension():
    """The builtin Lora extension's ``networks`` module, or None when it is not loaded."""
    module = sys.modules.get("networks")
    if module is None:
        try:
            module = importlib.import_module("networks")
        except ImportError:
            module = None
    needed = ("loaded_networks", "load_networks", "load_network", "network_apply_weights", "list_available_networks")
    if module is None or not all(hasattr(module, name) for name in needed):
        warning_once("the WebUI's builtin Lora extension is not loaded: files are checked by our own loader only")
        return None
    return module


def _take_networks_off(sd_model: nn.Module) -> int:
    """Take ``<lora:...>`` networks a generation left applied off the model, the WebUI's way.

    ``load_networks([])`` (what a generation without LoRAs does: empties ``loaded_networks`` and
    unregisters bundled embeddings), then ``network_apply_weights`` on each layer still holding
    merged deltas restores it from ``network_weights_backup``. Returns how many layers were restored.
    """
    networks = _lora_extension()
    if networks is None:
        return 0
    active = [getattr(net, "name", "?") for net in networks.loaded_networks]
    if active:
        logger.info("taking active Lora network(s) off the model for training: %s", ", ".join(active))
    networks.load_networks([])
    restored = 0
    with torch.no_grad():
        for module in sd_model.modules():
            if getattr(module, "network_current_names", ()):
                networks.network_apply_weights(module)
                restored += 1
    return restored


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks_with_kwargs",
)


@contextlib.contextmanager
def _model_guard(sd_model: nn.Module):
    """Freeze the whole model for a run, then put back what a run might disturb.

    Puts back: each parameter's ``requires_grad``, dtype and device (buffers too), every
    module's train/eval mode, hooks and instance ``forward`` overrides, the classes' ``forward``
    (where attention optimisations live) and ``sd_hijack.model_hijack.optimization_method``;
    drops every gradient on the model. Never copies or writes weights.
    """
    modules = list(sd_model.modules())
    params = list(sd_model.parameters())
    flags = [(p, p.requires_grad, p.dtype, p.device) for p in params]
    buffers = [(m, name, b.dtype, b.device) for m in modules for name, b in m._buffers.items() if b is not None]
    training = [(m, m.training) for m in modules]
    hooks = [(m, {name: set(getattr(m, name, {})) for name in _HOOK_DICTS}) for m in modules]
    forwards = [(m, m.__dict__.get("forward")) for m in modules]
    classes = {type(m) for m in modules}
    class_forwards = {cls: cls.__dict__.get("forward") for cls in classes}
    hijack = sd_hijack.model_hijack
    optimization = getattr(hijack, "optimization_method", None)
    try:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        yield
    finally:
        for p, requires_grad, dtype, device in flags:
            if p.dtype != dtype or p.device != device:
                p.data = p.data.to(device=device, dtype=dtype)
            p.requires_grad_(requires_grad)
            p.grad = None
        for m, name, dtype, device in buffers:
            b = m._buffers.get(name)
            if b is not None and (b.dtype != dtype or b.device != device):
                m._buffers[name] = b.to(device=device, dtype=dtype)
        for m, flag in training:
            m.training = flag
        for m, before in hooks:
            for name, keys in before.items():
                table = getattr(m, name, None)
                for key in [k for k in (table or {}) if k not in keys]:
                    del table[key]
        for m, forward in forwards:
            if m.__dict__.get("forward") is not forward:
                if forward is None:
                    m.__dict__.pop("forward", None)
                else:
                    m.forward = forward
        for cls, forward in class_forwards.items():
            if cls.__dict__.get("forward") is not forward and forward is not None:
                logger.warning("%s.forward changed during training; putting the original back", cls.__name__)
                cls.forward = forward
        if getattr(hijack, "optimization_method", None) != optimization:
            hijack.optimization_method = optimization


def _no_block_checkpointing(unet: nn.Module, undo: contextlib.ExitStack) -> None:
    """Turn ldm/sgm's own activation checkpointing off for the run.

    Blocks built with ``use_checkpoint`` run through their ``CheckpointFunction``, whose backward
    computes gradients for the block's inputs and own parameters only: a LoRA hooked inside gets
    none. The WebUI builds its models without it ("Do not use checkpoint for inference" in
    ``sd_models.py``); this makes sure. (Our ``gradient_checkpointing`` uses torch's own.)
    """
    for module in unet.modules():
        for name in ("use_checkpoint", "checkpoint"):
            if getattr(module, name, None) is True:
                _set_attr(undo, module, name, False)


def _torch_gc() -> None:
    devices.torch_gc()


def _clear_cond_cache() -> None:
    """Forget the conditionings processing keeps across generations (``opts.persistent_cond_cache``):
    ours carry the text encoder LoRA being trained."""
    from modules import processing

    for cls in (processing.StableDiffusionProcessing, processing.StableDiffusionProcessingTxt2Img):
        for name in ("cached_c", "cached_uc", "cached_hr_c", "cached_hr_uc"):
            if name in cls.__dict__:
                setattr(cls, name, [None, None])


# --------------------------------------------------------------------------------------------
# the host

_STATE_FIELDS = ("job", "job_count", "job_no", "sampling_step", "sampling_steps", "textinfo")


def _format_eta(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _clean_subfolder(value: Any) -> str:
    text = str(value or "").strip().replace("\\", "/")
    if not text:
        return ""
    parts = text.rstrip("/").split("/")
    if text.startswith("/") or ":" in text or any(part in ("", ".", "..") for part in parts):
        warning_once(f"ignoring the LoRA output subfolder setting {value!r}: use a plain relative folder name")
        return ""
    return "/".join(parts)


class WebUIHost:
    """The WebUI as the :class:`~lora_trainer.jobs.Host` training jobs run on."""

    def __init__(self, work_dir: str | os.PathLike | None = None):
        self._work_dir = Path(work_dir) if work_dir is not None else None
        self._state_owner: str | None = None  # id of the job whose shared.state job is running
        self._state_lock = threading.Lock()
        self._sample_seed = random.randint(0, MAX_SEED)
        self._trained: tuple[weakref.ref, str] | None = None  # the model of the last run, and its checkpoint

    # -- folders

    @property
    def lora_dir(self) -> Path:
        """The WebUI's Lora folder (``--lora-dir``), plus the subfolder setting."""
        cmd_opts = shared.cmd_opts
        base = getattr(cmd_opts, "lora_dir", None)  # defined by the Lora extension's preload.py
        if not base:
            data_dir = getattr(cmd_opts, "data_dir", None) or os.getcwd()
            base = Path(getattr(cmd_opts, "models_dir", None) or Path(data_dir) / "models") / "Lora"
        base = Path(base)
        sub = _clean_subfolder(setting(OPT_SUBFOLDER))
        return base / sub if sub else base

    @property
    def work_dir(self) -> Path:
        return self._work_dir or default_work_dir()

    @staticmethod
    def task_id(job: Job) -> str:
        """The WebUI progress task id of a job (``/internal/progress`` reports on it while it runs)."""
        return f"task(lora_train-{job.id})"

    # -- the model

    def model_info(self) -> ModelInfo:
        sd_model = _loaded_model()
        if sd_model is None:
            return ModelInfo(None, "", "", "no model is loaded yet: pick a checkpoint at the top of the page")
        checkpoint, vae = _checkpoint_label(sd_model), _vae_label()
        try:
            family, _ = detect_model(sd_model)
        except IncompatibleModelError as e:
            return ModelInfo(None, checkpoint, vae, str(e))
        return ModelInfo(family, checkpoint, vae, _environment_problem(sd_model))

    @contextlib.contextmanager
    def training_session(self) -> Iterator[WebUIAdapter]:
        """The loaded model for one run: active Lora networks taken off, base frozen; on exit every
        setting, flag, hook and mode is put back, gradients dropped and the GPU cache emptied."""
        sd_model = _loaded_model()
        family, prediction_type = detect_model(sd_model)
        problem = _environment_problem(sd_model)
        if problem:
            raise IncompatibleModelError(problem)
        with contextlib.ExitStack() as stack:
            stack.callback(_torch_gc)
            _take_networks_off(sd_model)
            stack.enter_context(_model_guard(sd_model))
            _no_block_checkpointing(sd_model.model.diffusion_model, stack)
            self._sample_seed = random.randint(0, MAX_SEED)
            self._trained = (weakref.ref(sd_model), _checkpoint_label(sd_model))
            yield WebUIAdapter(sd_model, undo=stack, family=family, prediction_type=prediction_type)

    # -- the queue and shared.state

    @contextlib.contextmanager
    def gpu_lock(self) -> Iterator[None]:
        """The WebUI's queue lock: UI and API generations wait while a run holds it. Our
        ``shared.state`` job ends before it is released, so the next generation's begins clean."""
        with call_queue.queue_lock:
            try:
                yield
            finally:
                self._end_state()

    def on_job_start(self, job: Job) -> None:
        state = shared.state
        with self._state_lock:
            state.begin(job=self.task_id(job))
            state.job_count, state.job_no = 1, 0
            state.sampling_step, state.sampling_steps = 0, 0
            state.textinfo = self._textinfo(job)
            self._state_owner = job.id
        with contextlib.suppress(Exception):  # progress reporting is a nicety
            from modules import progress

            progress.start_task(self.task_id(job))

    def on_job_progress(self, job: Job) -> None:
        with self._state_lock:
            if self._state_owner != job.id:
                return
            state = shared.state
            state.sampling_steps = max(int(job.total_steps or 0), 0)
            state.sampling_step = min(int(job.step or 0), state.sampling_steps)
            state.textinfo = self._textinfo(job)

    def on_job_end(self, job: Job) -> None:
        self._end_state(job.id)
        with contextlib.suppress(Exception):
            from modules import progress

            progress.finish_task(self.task_id(job))

    def _end_state(self, job_id: str | None = None) -> None:
        with self._state_lock:
            if self._state_owner is None or (job_id is not None and job_id != self._state_owner):
                return
            state = shared.state
            state.end()
            # as wrap_gradio_call does after a UI job: an Interrupt meant for us must not outlive us
            state.interrupted = state.skipped = state.stopping_generation = False
            self._state_owner = None

    @staticmethod
    def _textinfo(job: Job) -> str:
        name = job.config.save.output_name
        if job.step and job.total_steps:
            loss = f", loss {job.avg_loss:.4f}" if job.avg_loss is not None else ""
            rate = f", {job.steps_per_s:.2f} it/s" if job.steps_per_s else ""
            return (
                f"Training LoRA '{name}': step {job.step}/{job.total_steps}{loss}{rate}, ETA {_format_eta(job.eta_s)}"
            )
        return f"Training LoRA '{name}': {job.phase or 'starting'}"

    def interrupted(self) -> bool:
        """The WebUI's Interrupt button (also its "stop after current" variant). Skip is not a stop."""
        state = shared.state
        return bool(state.interrupted or getattr(state, "stopping_generation", False))

    # -- files

    def verify_lora(self, path: str | os.PathLike) -> list[str]:
        """Load ``path`` with the WebUI's own Lora loader; return the file's modules that would not
        land on the model: keys it matches to no layer, fused-attention layers missing one of
        q/k/v/out (the WebUI then skips the whole layer) and deltas whose shape does not fit."""
        path = Path(path)
        trained, self._trained = self._trained, None  # the check right after a run is against that run's model
        if _model_changed(trained):
            logger.warning("the model changed after training; %s was not checked against it", path.name)
            return []
        networks = _lora_extension()
        if networks is None:
            return self._verify_ourselves(path)
        header = read_safetensors_header(path)
        file_modules = {key.partition(".")[0] for key in header.tensors}
        try:
            on_disk = networks.network.NetworkOnDisk(path.stem, str(path))
            net = networks.load_network(path.stem, on_disk)
        except Exception as e:
            raise LoraFileError(f"the WebUI's Lora loader cannot load {path.name}: {type(e).__name__}: {e}") from e
        sd_model = _loaded_model()
        mapping = getattr(sd_model, "network_layer_mapping", None) or {}
        placed = {str(getattr(m, "network_key", "")).partition(".")[0]: m for m in net.modules.values()}
        problems = sorted(file_modules - set(placed) - {"bundle_emb"})

        attention: dict[str, dict[str, str]] = defaultdict(dict)
        for file_key, module in placed.items():
            match = re.fullmatch(r"(.+)_(q|k|v|out)_proj", str(getattr(module, "sd_key", "")))
            if match and isinstance(mapping.get(match.group(1)), nn.MultiheadAttention):
                attention[match.group(1)][match.group(2)] = file_key
        for parts in attention.values():
            missing = [p for p in ("q", "k", "v", "out") if p not in parts]
            if missing:
                lacking = "/".join(f"{p}_proj" for p in missing)
                problems += [
                    f"{key} (its attention layer lacks {lacking}: the WebUI skips it)" for key in parts.values()
                ]

        for file_key, module in placed.items():
            mismatch = _shape_mismatch(module, mapping)
            if mismatch:
                problems.append(f"{file_key} ({mismatch})")
        if _model_changed(trained or (weakref.ref(sd_model), _checkpoint_label(sd_model))):
            logger.warning("the model changed while %s was being checked; its result is not used", path.name)
            return []
        return sorted(problems)

    def _verify_ourselves(self, path: Path) -> list[str]:
        sd_model = _loaded_model()
        family, _ = detect_model(sd_model)
        state, _ = load_lora(path)
        unet = sd_model.model.diffusion_model
        _, unplaced = network_from_weights(state, family, unet, _text_encoders(sd_model, family))
        return unplaced

    def publish_lora(self, path: str | os.PathLike) -> None:
        """Refresh the WebUI's Lora list (as ``/sdapi/v1/refresh-loras``) so the file shows in
        ``/sdapi/v1/loras`` and in the Lora tab (after the tab's own refresh)."""
        networks = _lora_extension()
        if networks is None:
            return
        networks.list_available_networks()
        if Path(path).stem not in getattr(networks, "available_networks", {}):
            logger.info("%s is outside the WebUI's Lora folder, so the Lora tab does not list it", path)

    # -- previews

    def sample_images(self, prompts: Sequence[str], cfg: TrainConfig, step: int) -> list[Image.Image]:
        """txt2img with the network being trained attached (its hooks are on the model), through
        the WebUI's own processing, inside the running job (the queue lock is already ours)."""
        from modules import processing

        prompts = [str(p) for p in prompts]
        if not prompts:
            return []
        sd_model = _loaded_model()
        s = cfg.sample
        width, height = cfg.dataset.resolution_wh
        title = getattr(getattr(sd_model, "sd_checkpoint_info", None), "title", None)
        # a checkpoint picked in the UI during the run must not be loaded by this call: pin the loaded one
        pin = title and shared.opts.data.get("sd_model_checkpoint") != title
        state = shared.state
        saved = {name: getattr(state, name, None) for name in _STATE_FIELDS}
        _clear_cond_cache()
        try:
            p = processing.StableDiffusionProcessingTxt2Img(
                sd_model=sd_model,
                prompt=prompts,
                negative_prompt="",
                sampler_name=s.sample_sampler,
                steps=s.sample_steps,
                cfg_scale=s.sample_cfg,
                seed=s.sample_seed if s.sample_seed is not None else self._sample_seed,
                width=s.sample_width or width,
                height=s.sample_height or height,
                batch_size=1,
                n_iter=len(prompts),
                do_not_save_samples=True,
                do_not_save_grid=True,
                do_not_reload_embeddings=True,
                override_settings={"sd_model_checkpoint": title} if pin else {},
                override_settings_restore_afterwards=True,
            )
            p.disable_extra_networks = True  # <lora:...> in a preview prompt would merge into the weights
            with contextlib.closing(p):
                processed = processing.process_images(p)
            first = int(getattr(processed, "index_of_first_image", 0) or 0)
            images = list(processed.images)[first:]
        finally:
            _clear_cond_cache()
            _take_networks_off(sd_model)
            for name, value in saved.items():
                setattr(state, name, value)
        if images:
            with contextlib.suppress(Exception):
                state.assign_current_image(images[0])
        return images


def _model_changed(trained: tuple[weakref.ref, str] | None) -> bool:
    """True when ``trained`` (a model and its checkpoint label) is no longer the loaded model: a
    checkpoint change queued behind a run loads as soon as the run lets go of the queue lock."""
    if trained is None:
        return False
    ref, label = trained
    current = _loaded_model()
    return current is None or ref() is not current or _checkpoint_label(current) != label


def _shape_mismatch(module: Any, mapping: Mapping[str, nn.Module]) -> str | None:
    """Why a loaded LoRA module's delta would not fit its layer (LoRA modules only), else None."""
    up, down = getattr(module, "up_model", None), getattr(module, "down_model", None)
    if up is None or down is None or getattr(module, "mid_model", None) is not None:
        return None
    up_w, down_w = up.weight, down.weight
    numel = up_w.shape[0] * down_w.shape[1] * int(np.prod(down_w.shape[2:], dtype=np.int64))
    layer = module.sd_module
    if isinstance(layer, nn.MultiheadAttention):
        e = layer.embed_dim
        shape: tuple[int, ...] = (e, e)
    else:
        weight = getattr(layer, "weight", None)
        if weight is None:
            return None
        shape = tuple(weight.shape)
    expected = int(np.prod(shape, dtype=np.int64))
    if numel != expected:
        got = (up_w.shape[0], down_w.shape[1], *down_w.shape[2:])
        return f"delta {tuple(got)} does not fit the layer's weight {shape}"
    return None


# --------------------------------------------------------------------------------------------
# captioning helpers for the dataset workshop (the WebUI's own DeepBooru and BLIP)


def deepbooru_tags(
    image: Image.Image, threshold: float = 0.5, *, include_ratings: bool = False
) -> list[tuple[str, float]]:
    """DeepBooru tags of one image with their scores, best first, raw (``long_hair``, unescaped)."""
    return deepbooru_tags_many([image], threshold, include_ratings=include_ratings)[0]


def deepbooru_tags_many(
    images: Iterable[Image.Image], threshold: float = 0.5, *, include_ratings: bool = False
) -> list[list[tuple[str, float]]]:
    """:func:`deepbooru_tags` for many images, loading the model to the GPU once.

    As the WebUI's interrogator: ``deepbooru.model.start()`` (downloads the model on first use,
    moves it to the GPU), then ``stop()`` (back to RAM unless "Keep models in VRAM" is set).
    """
    from modules import deepbooru
    from modules import images as webui_images

    model = deepbooru.model
    model.start()
    try:
        results = []
        for image in images:
            picture = webui_images.resize_image(2, image.convert("RGB"), 512, 512)  # 2 = resize and fill
            array = np.expand_dims(np.asarray(picture, dtype=np.float32), 0) / 255
            with torch.no_grad(), devices.autocast():
                x = torch.from_numpy(array).to(devices.device, devices.dtype)
                scores = model.model(x)[0].detach().float().cpu().numpy()
            pairs = [
                (str(tag), float(score))
                for tag, score in zip(model.model.tags, scores, strict=False)
                if score >= threshold and (include_ratings or not str(tag).startswith("rating:"))
            ]
            pairs.sort(key=lambda pair: -pair[1])
            results.append(pairs)
        return results
    finally:
        model.stop()


def blip_caption(image: Image.Image) -> str:
    """A BLIP caption of one image, through the WebUI's interrogator."""
    return blip_captions([image])[0]


def blip_captions(images: Iterable[Image.Image]) -> list[str]:
    """BLIP captions, loading only BLIP (not the interrogator's CLIP) to the GPU once.

    Follows ``InterrogateModels.interrogate``: low-VRAM parts to the CPU first, BLIP loaded
    (downloaded on first use) and halved unless ``--no-half``, moved back to RAM after (unless
    "Keep models in VRAM" is set).
    """
    from modules import lowvram

    interrogator = shared.interrogator
    lowvram.send_everything_to_cpu()
    devices.torch_gc()
    if interrogator.blip_model is None:
        blip = interrogator.load_blip_model()
        if not shared.cmd_opts.no_half and not interrogator.running_on_cpu:
            blip = blip.half()
        interrogator.blip_model = blip
    interrogator.blip_model = interrogator.blip_model.to(devices.device_interrogate)
    interrogator.dtype = next(interrogator.blip_model.parameters()).dtype  # generate_caption casts images to it
    try:
        return [str(interrogator.generate_caption(image.convert("RGB"))) for image in images]
    finally:
        interrogator.send_blip_to_ram()
        devices.torch_gc()


class _WebUICaptioner:
    """Shared by the workshop captioners below: one image at a time under the WebUI's queue lock,
    so a caption run and a generation (or a training run) never share the GPU.

    The first image of a run does not wait: if the lock is held (a training run holds it for
    its whole length) :class:`~lora_trainer.workshop.CaptionerUnavailable` says so before anything
    is written. Later images wait their turn, as the WebUI's own Interrogate button does.
    """

    name = ""
    label = ""

    def __init__(self) -> None:
        self._started = False

    def _locked(self, run):
        from ..workshop.captioning import CaptionerUnavailable

        lock = call_queue.queue_lock
        if not self._started:
            if not lock.acquire(False):
                raise CaptionerUnavailable(
                    f"The WebUI is busy (a generation or a LoRA training run holds the GPU); {self.label} "
                    "captions can run when it is free."
                )
            self._started = True
        else:
            lock.acquire()
        try:
            return run()
        finally:
            lock.release()


class DeepBooruCaptioner(_WebUICaptioner):
    """The WebUI's DeepBooru as a :class:`lora_trainer.workshop.Captioner`: ``(tag, score)`` pairs
    at or above ``threshold``, best first, ratings left out (the workshop formats and merges them)."""

    name = "deepbooru"
    label = "DeepBooru"

    def __init__(self, threshold: float = 0.5, *, include_ratings: bool = False) -> None:
        super().__init__()
        self.threshold = float(threshold)
        self.include_ratings = include_ratings

    def caption(self, image: Image.Image) -> list[tuple[str, float]]:
        return self._locked(lambda: deepbooru_tags(image, self.threshold, include_ratings=self.include_ratings))


class BlipCaptioner(_WebUICaptioner):
    """The WebUI's BLIP interrogator as a :class:`lora_trainer.workshop.Captioner` (a sentence)."""

    name = "blip"
    label = "BLIP"

    def caption(self, image: Image.Image) -> str:
        return self._locked(lambda: blip_caption(image))
