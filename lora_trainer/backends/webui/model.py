"""The WebUI's loaded model (``shared.sd_model``: SD1, SD2, SDXL) as the trainer's model adapter.

Owns: finding the loaded model without loading one, telling its family and prediction type
(:func:`detect_model`) and whether the WebUI's setup can train it (:func:`environment_problem`),
its text encoders as the hijack wraps them, and :class:`WebUIAdapter`, the
:class:`~lora_trainer.contracts.ModelAdapter` over it. Text goes through the WebUI's own
conditioning code (its chunking and clip skip; its emphasis syntax and textual-inversion
embeddings only with ``weighted_captions``, else captions are plain text as in kohya), images
through its VAE helper, the denoiser through ``sd_model.apply_model``. Also the helpers that
change an attribute or a WebUI option for a session and register putting it back.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any

import torch
from modules import devices, sd_models, sd_samplers_common, sd_vae, shared
from torch import nn

from lora_trainer.backends.webui.placement import LowVramPlacement
from lora_trainer.contracts import Conditioning, SizeCond
from lora_trainer.errors import IncompatibleModelError
from lora_trainer.files.hashes import checkpoint_hashes
from lora_trainer.text import WINDOW_LENGTH, num_chunks

__all__ = [
    "CLIP_SKIP_OPTION",
    "SDXL_CLIP_L_SKIP_OPTION",
    "SDModel",
    "WebUIAdapter",
    "checkpoint_label",
    "detect_model",
    "environment_problem",
    "loaded_model",
    "set_attr",
    "set_option_for_session",
    "shadow_method",
    "text_encoders",
    "vae_label",
]

CLIP_SKIP_OPTION = "CLIP_stop_at_last_layers"
SDXL_CLIP_L_SKIP_OPTION = "sdxl_clip_l_skip"  # "Clip skip SDXL": CLIP-L uses CLIP_stop_at_last_layers
EMPHASIS_OPTION = "emphasis"
OLD_EMPHASIS_OPTION = "use_old_emphasis_implementation"

SDModel = Any
"""The WebUI's loaded model (an ldm ``LatentDiffusion`` or sgm ``DiffusionEngine`` nn.Module, with
the attributes the WebUI sets on it), read duck-typed: which attributes it has depends on its kind."""

# class names of the WebUI's hijacked text-encoder wrappers (modules/sd_hijack_clip.py, sd_hijack_open_clip.py)
_SD1_WRAPPER = "FrozenCLIPEmbedderWithCustomWords"
_SD2_WRAPPER = "FrozenOpenCLIPEmbedderWithCustomWords"
_SDXL_WRAPPERS = ("FrozenCLIPEmbedderForSDXLWithCustomWords", "FrozenOpenCLIPEmbedder2WithCustomWords")


def loaded_model() -> SDModel | None:
    """The loaded model, without loading one (``shared.sd_model`` loads on first access)."""
    data = getattr(sd_models, "model_data", None)
    if data is not None:
        return data.sd_model
    return shared.sd_model


def checkpoint_label(sd_model: SDModel) -> str:
    info = getattr(sd_model, "sd_checkpoint_info", None)
    return str(getattr(info, "title", None) or getattr(info, "name", None) or "unknown checkpoint")


def vae_label() -> str:
    return sd_vae.get_loaded_vae_name() or "built into the checkpoint"


# --------------------------------------------------------------------------------------------
# what the model is


def _unet_in_channels(unet: Any) -> int:
    try:
        return int(unet.input_blocks[0][0].in_channels)
    except (AttributeError, IndexError, TypeError):
        return int(getattr(unet, "in_channels", 4))


def _sdxl_family(sd_model: SDModel, name: str, in_channels: int, inpainting: bool, special: str) -> str:
    """ "sdxl" for an SDXL base text-to-image model, else IncompatibleModelError."""
    if inpainting or in_channels != 4:
        raise IncompatibleModelError(f"{name} is {special} SDXL model; only text-to-image models can be trained")
    embedders = list(getattr(getattr(sd_model, "conditioner", None), "embedders", []))
    kinds = tuple(type(e).__name__ for e in embedders if hasattr(e, "wrapped"))
    if kinds == _SDXL_WRAPPERS:
        return "sdxl"
    if kinds == _SDXL_WRAPPERS[1:]:
        raise IncompatibleModelError(
            f"{name} is an SDXL refiner; LoRAs are trained on an SDXL base model (two text encoders)"
        )
    raise IncompatibleModelError(f"{name}: unexpected SDXL text encoders {kinds or 'none'}")


def _sd_family(sd_model: SDModel, name: str, in_channels: int, special: str) -> str:
    """ "sd1" or "sd2" for an SD1.x/SD2.x text-to-image model, else IncompatibleModelError."""
    if getattr(sd_model, "cond_stage_key", "txt") == "edit":
        raise IncompatibleModelError(f"{name} is an instruct-pix2pix model; only text-to-image models can be trained")
    conditioning_key = getattr(sd_model.model, "conditioning_key", "crossattn")
    if in_channels != 4 or conditioning_key not in (None, "crossattn"):
        kind = special if in_channels != 4 else f"a '{conditioning_key}'-conditioned (unCLIP/depth)"
        raise IncompatibleModelError(f"{name} is {kind} model; only text-to-image models can be trained")
    wrapper = type(getattr(sd_model, "cond_stage_model", None)).__name__
    if wrapper == _SD1_WRAPPER and not getattr(sd_model, "is_sd2", False):
        return "sd1"
    if wrapper == _SD2_WRAPPER:
        return "sd2"
    raise IncompatibleModelError(
        f"{name}: its text encoder ({wrapper}) is not one the trainer supports "
        "(SD1 CLIP ViT-L or SD2 OpenCLIP ViT-H, as the WebUI wraps them)"
    )


def detect_model(sd_model: SDModel | None) -> tuple[str, str]:
    """``(family, prediction_type)`` of a WebUI model; IncompatibleModelError says why not."""
    if sd_model is None:
        raise IncompatibleModelError("no model is loaded: pick a Stable Diffusion checkpoint at the top of the page")
    name = checkpoint_label(sd_model)
    if getattr(sd_model, "is_sd3", False):
        raise IncompatibleModelError(f"{name} is a Stable Diffusion 3 model; only SD1.x, SD2.x and SDXL can be trained")
    unet = getattr(getattr(sd_model, "model", None), "diffusion_model", None)
    if unet is None:
        raise IncompatibleModelError(f"{name} has no UNet the trainer knows (model.diffusion_model)")
    in_channels = _unet_in_channels(unet)
    inpainting = in_channels == 9 or getattr(sd_model, "is_sdxl_inpaint", False)
    special = "an inpainting" if inpainting else f"a {in_channels}-channel"
    if getattr(sd_model, "is_sdxl", False):
        family = _sdxl_family(sd_model, name, in_channels, inpainting, special)
    else:
        family = _sd_family(sd_model, name, in_channels, special)

    parameterization = getattr(sd_model, "parameterization", "eps")
    if parameterization not in ("eps", "v"):
        raise IncompatibleModelError(
            f"{name} predicts {parameterization!r}; only epsilon and v-prediction are supported"
        )
    return family, "v_prediction" if parameterization == "v" else "epsilon"


def environment_problem(sd_model: SDModel) -> str | None:
    """Why the WebUI's current setup cannot train on ``sd_model`` (None if it can)."""
    # --medvram/--lowvram are fine: a run places the parts itself (backends/webui/placement.py)
    if getattr(devices, "fp8", False):
        return "FP8 weight storage is on (Settings > Optimizations > FP8 weight); turn it off to train"
    try:
        from modules import sd_unet
    except ImportError:
        return None
    if getattr(sd_unet, "current_unet", None) is not None:
        return "an alternative UNet (e.g. TensorRT) is active: set 'SD Unet' to None in the settings to train"
    return None


def text_encoders(sd_model: SDModel, family: str) -> dict[str, nn.Module]:
    """The kohya-relevant text encoder modules (HF CLIPTextModel / OpenCLIP model) after the hijack."""
    if family == "sdxl":
        embedders = sd_model.conditioner.embedders
        return {"te1": embedders[0].wrapped.transformer, "te2": embedders[1].wrapped.model}
    wrapped = sd_model.cond_stage_model.wrapped
    return {"te": wrapped.transformer if family == "sd1" else wrapped.model}


# --------------------------------------------------------------------------------------------
# changes for one session, undone at its end


def set_attr(undo: contextlib.ExitStack, obj: Any, name: str, value: Any) -> None:
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


def shadow_method(undo: contextlib.ExitStack, obj: Any, name: str, func: Any) -> None:
    """Give ``obj`` its own ``name`` (``func``, called without ``self``) over its class's method, and
    register removing it again (an attribute it had of its own is put back)."""
    missing = object()
    own = vars(obj).get(name, missing)
    setattr(obj, name, func)

    def restore() -> None:
        if own is missing:
            with contextlib.suppress(AttributeError):
                delattr(obj, name)
        else:
            setattr(obj, name, own)

    undo.callback(restore)


def set_option_for_session(undo: contextlib.ExitStack, key: str, value: Any) -> None:
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


def _no_embedding(tokens: Any, offset: int) -> tuple[None, None]:
    """``EmbeddingDatabase.find_embedding_at_position`` that finds nothing (literal captions)."""
    return None, None


# --------------------------------------------------------------------------------------------
# the adapter


class WebUIAdapter:
    """The WebUI's loaded model as a :class:`~lora_trainer.contracts.ModelAdapter`.

    Temporary changes it makes for training (the SDXL text embedders' ``is_trainable``, a
    configured clip skip) are undone by ``undo`` (an ExitStack the host's session closes),
    or by :meth:`close` when the adapter made its own.

    ``placement``: under --medvram/--lowvram, the session's :class:`LowVramPlacement`; the
    adapter's ``device`` is then the WebUI's device and :meth:`place` moves the parts.
    """

    def __init__(
        self,
        sd_model: SDModel,
        *,
        undo: contextlib.ExitStack | None = None,
        family: str | None = None,
        prediction_type: str | None = None,
        placement: LowVramPlacement | None = None,
    ):
        if family is None or prediction_type is None:
            family, prediction_type = detect_model(sd_model)
        self.sd_model = sd_model
        self.family = family
        self.prediction_type = prediction_type
        self._own_undo = undo is None
        self._undo = undo if undo is not None else contextlib.ExitStack()
        self.unet = sd_model.model.diffusion_model
        self.text_encoders = text_encoders(sd_model, family)
        param = next(self.unet.parameters())
        self.device, self.dtype = param.device, param.dtype
        self._placement = placement
        if placement is not None:
            self.device = torch.device(devices.device)  # the parts wait in CPU memory until placed
        # the schedule as loaded: processing may swap in a zero-terminal-SNR or fp16 copy for sampling
        alphas = getattr(sd_model, "alphas_cumprod_original", None)
        if alphas is None:
            alphas = sd_model.alphas_cumprod
        self.alphas_cumprod = alphas.detach().to(torch.float32)
        info = getattr(sd_model, "sd_checkpoint_info", None)
        filename = getattr(info, "filename", None)
        self.model_name = os.path.basename(filename) if filename else ""
        # the WebUI computed both hashes when it loaded the checkpoint (unless --no-hashing)
        self.model_hash, self.model_legacy_hash = checkpoint_hashes(
            filename,
            sha256=getattr(info, "sha256", None),
            legacy=getattr(info, "hash", None),
            read_sha256=not getattr(shared.cmd_opts, "no_hashing", False),
        )
        self.vae_name = sd_vae.get_loaded_vae_name() or ""
        if family == "sd2":
            self.default_clip_skip = max(1, int(getattr(sd_model.cond_stage_model.wrapped, "layer_idx", 1) or 1))
        elif family == "sdxl":
            self.default_clip_skip = 1  # SDXL's own layers (see _use_clip_skip)
            # the WebUI's "Clip skip SDXL" setting must not change what training conditions on
            set_option_for_session(self._undo, SDXL_CLIP_L_SKIP_OPTION, False)
        else:
            self.default_clip_skip = int(getattr(shared.opts, CLIP_SKIP_OPTION, 1) or 1)
        self._clip_skip = self.default_clip_skip
        if family == "sdxl":
            for embedder in sd_model.conditioner.embedders:
                # as get_learned_conditioning does; the WebUI's wrappers have no ucg_rate until then
                set_attr(self._undo, embedder, "ucg_rate", 0.0)
            for embedder in sd_model.conditioner.embedders[:2]:
                set_attr(self._undo, embedder, "is_trainable", True)  # else run under no_grad

    def close(self) -> None:
        """Undo the adapter's changes (only when it made its own undo stack)."""
        if self._own_undo:
            self._undo.close()

    def place(self, parts: frozenset[str]) -> contextlib.AbstractContextManager[None]:
        """The parts named on the device for the block (``contracts.placement``); a no-op unless
        the WebUI runs with --medvram/--lowvram (then everything already is where the WebUI put it)."""
        if self._placement is None:
            return contextlib.nullcontext()
        return self._placement.place(parts)

    # -- images

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        images01 = ((pixels.float() + 1.0) / 2.0).clamp(0.0, 1.0)
        # approximation 0 = the full VAE (not TAESD), whatever the UI's encode method is
        return sd_samplers_common.images_tensor_to_samples(images01, 0, self.sd_model)

    @torch.no_grad()
    def encode_images_fp32(self, pixels: torch.Tensor) -> torch.Tensor:
        """``encode_images`` with the VAE in float32 for this call (what the WebUI's "Automatically revert
        VAE to 32-bit floats" does on decode; here on encode, for images an fp16 VAE turns into NaN/inf),
        then ``devices.dtype_vae`` and the VAE's dtype put back as they were."""
        vae = self.sd_model.first_stage_model
        held = next((t.dtype for t in (*vae.parameters(), *vae.buffers()) if t.is_floating_point()), None)
        dtype_vae = devices.dtype_vae
        devices.dtype_vae = torch.float32
        try:
            return self.encode_images(pixels).float()
        finally:
            devices.dtype_vae = dtype_vae
            if held is not None:
                vae.to(held)

    # -- text

    def _use_clip_skip(self, clip_skip: int) -> None:
        """Make the WebUI's conditioning use ``clip_skip`` (for the rest of the session).

        SDXL: kohya ignores clip_skip there (with a warning). Here 1 (the default) is SDXL's own
        conditioning, "Clip skip SDXL" off; N > 1 means what it means in the WebUI: "Clip skip SDXL"
        on, CLIP-L taking hidden state -N (OpenCLIP-G unchanged), so the LoRA is trained as it is
        then used. 2 is CLIP-L's own penultimate layer, so the usual kohya value trains exactly as
        kohya does. (The WebUI's "Clip skip SDXL" with clip skip 1, CLIP-L's last layer, has no
        config value: 1 keeps kohya's meaning, no skip.)
        """
        if clip_skip == self._clip_skip:
            return
        if clip_skip < 1:
            raise ValueError(f"clip_skip must be >= 1, got {clip_skip}")
        if self.family == "sd2":
            set_attr(self._undo, self.sd_model.cond_stage_model.wrapped, "layer_idx", int(clip_skip))
        else:
            if self.family == "sdxl":
                set_option_for_session(self._undo, SDXL_CLIP_L_SKIP_OPTION, clip_skip > 1)
            set_option_for_session(self._undo, CLIP_SKIP_OPTION, int(clip_skip))
        self._clip_skip = clip_skip

    def encode_text(
        self,
        captions: Sequence[str],
        *,
        clip_skip: int = 1,
        max_token_length: int = 75,
        size_cond: Sequence[SizeCond] | None = None,
        weighted_captions: bool = False,
    ) -> Conditioning:
        texts = [str(c) for c in captions]
        width = num_chunks(max_token_length) * WINDOW_LENGTH
        self._use_clip_skip(clip_skip)
        with contextlib.ExitStack() as call:
            self._keep_generation_params(call)
            # weighted: the WebUI's own prompt reading (kohya's parser has no BREAK or embeddings;
            # the WebUI's is how the LoRA will be prompted)
            if not weighted_captions:
                self._literal_text(call)
            if self.family == "sdxl":
                out = self.sd_model.conditioner(self._sdxl_batch(texts, size_cond))
                return Conditioning(out["crossattn"][:, :width], out["vector"])
            context = self.sd_model.cond_stage_model(texts)
        return Conditioning(context[:, :width])  # the WebUI encodes every chunk; keep max_token_length's

    def _text_wrappers(self) -> list[Any]:
        if self.family == "sdxl":
            return [e for e in self.sd_model.conditioner.embedders if hasattr(e, "tokenize_line")]
        return [self.sd_model.cond_stage_model]

    def _keep_generation_params(self, call: contextlib.ExitStack) -> None:
        """The WebUI's wrappers note in the model hijack what the next generation's infotext should say
        (textual-inversion hashes, a non-default emphasis); training text is not that generation's."""
        for hijack in {id(w.hijack): w.hijack for w in self._text_wrappers() if w.hijack is not None}.values():
            params = getattr(hijack, "extra_generation_params", None)
            if isinstance(params, dict):
                set_attr(call, hijack, "extra_generation_params", dict(params))

    def _literal_text(self, call: contextlib.ExitStack) -> None:
        """Make the WebUI's wrappers tokenize captions as plain text for one call (kohya without
        ``weighted_captions``): emphasis "None" (no ``(x:1.1)``/``[x]`` weights and no ``BREAK``:
        the parser is skipped), the old emphasis implementation off (it has its own parser), and no
        textual-inversion lookup (an embedding's name stays its words). Per call, not per session:
        previews between steps go through txt2img, where the user's prompt syntax must still work."""
        set_option_for_session(call, EMPHASIS_OPTION, "None")
        set_option_for_session(call, OLD_EMPHASIS_OPTION, False)
        dbs = {id(w.hijack.embedding_db): w.hijack.embedding_db for w in self._text_wrappers() if w.hijack is not None}
        for db in dbs.values():
            shadow_method(call, db, "find_embedding_at_position", _no_embedding)

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
