"""A single-file SD1/SD2/SDXL checkpoint (the WebUI's layout) as a :class:`CheckpointAdapter`.

``load_checkpoint`` reads the file (``.safetensors``; a pickled ``.ckpt``/``.pt`` only when the
caller allows it, since unpickling can run code), tells the family from its keys, renames the
denoiser and the VAE into diffusers' modules (:mod:`.unet`, :mod:`.vae`), builds the text encoders
(:mod:`.text_encoders`) and frees the file's tensors once the modules hold them.

A ``<checkpoint>.yaml`` beside the file is the model's config, as in the WebUI: its ``num_heads`` /
``num_head_channels`` give the denoiser's heads (which no tensor shows; else the family's rule) and
its ``parameterization`` the prediction type.

Prediction type: ``v_parameterization`` when given; else the yaml's ``parameterization: "v"``; else, for
SD2, the WebUI's own test: the denoiser on a fixed input (all 0.5, timestep 999) predicts
``mean(out - x) < -1`` only when it was trained for v; else epsilon. kohya reads only its
``--v_parameterization`` flag; these are the WebUI's rules, so a LoRA trains for the prediction the
model is used with in the WebUI.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lora_trainer.backends.checkpoint.unet import convert_unet_state, unet_config_from_state
from lora_trainer.backends.checkpoint.vae import convert_vae_state, vae_config_from_state
from lora_trainer.errors import CheckpointError, IncompatibleModelError, LoraFileError
from lora_trainer.files.hashes import checkpoint_hashes
from lora_trainer.files.safetensors_format import PICKLE_SUFFIXES, read_safetensors_header

__all__ = ["detect_family", "load_checkpoint", "read_state_dict"]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
_SUPPORTED = "Supported: SD1.x, SD2.x (epsilon or v) and SDXL base single-file checkpoints."
_VAE_PARTS = ("encoder", "decoder", "quant_conv", "post_quant_conv")


def read_state_dict(
    path: str | os.PathLike, *, allow_pickle: bool = False, what: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` file (or, with ``allow_pickle``, a pickled one) on the CPU."""
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"{what} file not found: {file}")
    if file.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise CheckpointError(
                f"{file} is a pickled {what} ({file.suffix}); loading one can run code hidden in it. "
                "Convert it to .safetensors, or pass --allow-pickle if you trust where it comes from."
            )
        return _read_pickle(file, what)
    try:  # the header first: a truncated file, a pickle under another name, a header that lies, named
        read_safetensors_header(file)
    except LoraFileError as exc:
        raise CheckpointError(f"{file} is not a readable .safetensors {what}: {exc}") from None
    import safetensors
    from safetensors.torch import load_file

    header_error = getattr(safetensors, "SafetensorError", OSError)  # not in the package's type stubs
    try:
        return load_file(str(file), device="cpu")
    except (header_error, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{file} is not a readable .safetensors {what} (damaged or truncated?): {exc}") from exc


def _read_pickle(file: Path, what: str) -> dict[str, torch.Tensor]:
    try:
        obj: Any = torch.load(str(file), map_location="cpu", weights_only=False)
    except Exception as exc:  # any unpickling failure means the same to the user
        raise CheckpointError(f"{file} is not a readable {what} (damaged or truncated?): {exc}") from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{file} holds no state dict")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _looks_like(state: dict[str, torch.Tensor]) -> str:
    keys = list(state)
    if any(".joint_blocks." in k or k.startswith("joint_blocks.") for k in keys):
        return "an SD3 checkpoint"
    if any("double_blocks." in k for k in keys):
        return "a Flux checkpoint"
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        return "an SDXL refiner checkpoint"
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        return "a file without an SD denoiser (model.diffusion_model.*): a LoRA, a VAE or an embedding?"
    return "an unknown model"


def detect_family(state: dict[str, torch.Tensor], path: str | os.PathLike = "checkpoint") -> str:
    """The family ("sd1", "sd2" or "sdxl") from a checkpoint's keys; IncompatibleModelError for anything else."""
    if "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in state:
        family = "sdxl"
    elif "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in state:
        family = "sd2"
    elif any(k.startswith("cond_stage_model.transformer.") for k in state):
        family = "sd1"
    else:
        raise IncompatibleModelError(f"{path} looks like {_looks_like(state)}. {_SUPPORTED}")
    conv_in = state.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None:
        raise IncompatibleModelError(f"{path} has no SD denoiser (model.diffusion_model.*). {_SUPPORTED}")
    if conv_in.shape[1] != 4:
        kind = "an inpainting" if conv_in.shape[1] == 9 else f"a {conv_in.shape[1]}-channel"
        raise IncompatibleModelError(
            f"{path} looks like {kind} {family} model; only 4-channel models train here. {_SUPPORTED}"
        )
    return family


def _take(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Pop the tensors under ``prefix`` out of ``state``, without the prefix."""
    return {k[len(prefix) :]: state.pop(k) for k in [k for k in state if k.startswith(prefix)]}


def model_yaml(path: Path) -> dict[str, Any]:
    """The ``model.params`` of a ``<checkpoint>.yaml`` beside the file (the WebUI loads a checkpoint with
    that config when it is there), or {} when there is none or it is not a readable config."""
    config = path.with_suffix(".yaml")
    if not config.is_file():
        return {}
    import yaml  # PyYAML: a dependency of accelerate (the train extra) and of the WebUI

    try:
        data = yaml.safe_load(config.read_text(encoding="utf-8", errors="replace"))
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{config} (the config beside the checkpoint) is not valid YAML: {exc}") from exc
    params = data.get("model", {}).get("params") if isinstance(data, dict) else None
    return params if isinstance(params, dict) else {}


def _yaml_says_v(params: dict[str, Any]) -> bool:
    return params.get("parameterization") == "v"


def yaml_heads(params: dict[str, Any]) -> Callable[[int], int] | None:
    """The denoiser's heads per width from the yaml's ``num_head_channels`` (> 0) or ``num_heads`` (ldm's
    ``unet_config``, sgm's ``network_config``), or None to use the family's rule."""
    unet = params.get("unet_config") or params.get("network_config") or {}
    args = unet.get("params", {}) if isinstance(unet, dict) else {}
    head_channels, heads = int(args.get("num_head_channels", -1) or -1), int(args.get("num_heads", -1) or -1)
    if head_channels > 0:
        return lambda width: max(1, width // head_channels)
    if heads > 0:
        return lambda width: heads
    return None


@torch.no_grad()
def uses_v_prediction(unet: Any) -> bool:
    """The WebUI's SD2 test (``is_using_v_parameterization_for_sd2``) on a diffusers denoiser:
    all-0.5 latents and context, timestep 999; a v model's output is far below its input."""
    param = next(unet.parameters())
    x = torch.full((1, 4, 8, 8), 0.5, device=param.device, dtype=param.dtype)
    context = torch.full((1, 2, unet.config.cross_attention_dim), 0.5, device=param.device, dtype=param.dtype)
    out = unet(x, torch.tensor([999], device=param.device), encoder_hidden_states=context).sample
    return (out - x).float().mean().item() < -1


def _build(cls: Any, config: dict[str, Any], state: dict[str, torch.Tensor], path: Path, part: str) -> Any:
    with torch.device("meta"):
        module = cls(**config)
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise IncompatibleModelError(f"{path}: the {part} does not fit an SD {part}: {exc}") from exc
    return module  # in the file's dtype: the adapter casts each tensor once, to where it trains


def build_unet(
    state: dict[str, torch.Tensor], family: str, path: Path, heads: Callable[[int], int] | None = None
) -> Any:
    """diffusers' denoiser from the ldm tensors (keys without ``model.diffusion_model.``); ``heads``:
    the yaml's (:func:`yaml_heads`), else the family's rule."""
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

    config = unet_config_from_state(state, family, heads=heads)
    return _build(UNet2DConditionModel, config, convert_unet_state(state), path, "denoiser")


def build_vae(state: dict[str, torch.Tensor], family: str, path: Path) -> Any:
    """diffusers' VAE from ldm (or diffusers) tensors without the ``first_stage_model.`` prefix."""
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

    # VAE files from training runs can carry more (``loss.*``, ``model_ema.*``): only the autoencoder's own parts
    converted = convert_vae_state({k: v for k, v in state.items() if k.split(".", 1)[0] in _VAE_PARTS})
    try:
        config = vae_config_from_state(converted, family)
    except KeyError as exc:
        raise IncompatibleModelError(f"{path} has no complete VAE (missing {exc})") from exc
    return _build(AutoencoderKL, config, converted, path, "VAE")


def load_checkpoint(
    path: str | os.PathLike,
    *,
    vae_path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    v_parameterization: bool | None = None,
    allow_pickle: bool = False,
) -> Any:
    """The checkpoint at ``path`` as a ``CheckpointAdapter`` (a ``ModelAdapter``).

    ``vae_path``: a VAE file (WebUI layout, with or without ``first_stage_model.``, or diffusers
    names) replacing the checkpoint's VAE. Raises CheckpointError (unreadable or missing files) or
    IncompatibleModelError (not an SD1/SD2/SDXL base model); both name the file.
    """
    file = Path(path)
    state = read_state_dict(file, allow_pickle=allow_pickle)
    family = detect_family(state, file)
    vae_state = read_state_dict(vae_path, allow_pickle=allow_pickle, what="VAE") if vae_path is not None else None
    params = model_yaml(file)
    unet = build_unet(_take(state, UNET_PREFIX), family, file, yaml_heads(params))
    checkpoint_vae = _take(state, VAE_PREFIX)
    if vae_state is not None:
        checkpoint_vae = _take(vae_state, VAE_PREFIX) or vae_state
    vae = build_vae(checkpoint_vae, family, Path(vae_path) if vae_path is not None else file)
    if v_parameterization is None and _yaml_says_v(params):
        v_parameterization = True
    adapter = _assemble(
        family, "v_prediction" if v_parameterization else "epsilon", unet, vae, state, file, vae_path, device, dtype
    )
    if v_parameterization is None and family == "sd2":  # the test runs where the model now is, in its dtype
        adapter.prediction_type = "v_prediction" if uses_v_prediction(adapter.unet) else "epsilon"
    return adapter


def _assemble(
    family: str,
    prediction_type: str,
    unet: Any,
    vae: Any,
    state: dict[str, torch.Tensor],
    file: Path,
    vae_path: str | os.PathLike | None,
    device: str | torch.device,
    dtype: torch.dtype,
) -> Any:
    """Text encoders and tokenizer, then the adapter; ``state`` (the text encoders' tensors) is emptied."""
    from lora_trainer.backends.checkpoint.adapter import CheckpointAdapter
    from lora_trainer.backends.checkpoint.text_encoders import build_text_encoders
    from lora_trainer.backends.checkpoint.tokenizer import clip_tokenizer

    text_encoders = build_text_encoders(state, family)
    state.clear()
    sha256, legacy = checkpoint_hashes(file)
    return CheckpointAdapter(
        family,
        prediction_type,
        unet,
        vae,
        text_encoders,
        clip_tokenizer(),
        model_name=file.name,
        model_hash=sha256,
        model_legacy_hash=legacy,
        vae_name=Path(vae_path).name if vae_path is not None else "",
        device=device,
        dtype=dtype,
    )
