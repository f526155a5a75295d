""":class:`CheckpointAdapter`: a checkpoint's diffusers/transformers modules as the trainer's ``ModelAdapter``.

Text is encoded as the WebUI encodes it (``lora_trainer.text``: 75-token chunks, each in its own
77-id window; CLIP-L pads with its end token, OpenCLIP with 0), so a LoRA trained here is used
under the conditioning it was trained on:

* SD1: CLIP-L's last layer; clip skip k > 1 takes hidden state -k through the final layer norm.
* SD2: the text encoder is OpenCLIP-H without its last block, so its output is the WebUI's default
  (penultimate block, then the final norm); clip skip k > 1 goes k - 1 blocks further back.
* SDXL: context = [CLIP-L hidden state -2, OpenCLIP-bigG hidden state -2] (no final norm);
  vector = [bigG's projected pooled output of the first chunk, the 256-wide Fourier embeddings
  of original size, crop top-left and target size (height, width each)], sgm's ``y``. Clip skip 1
  is SDXL's own conditioning; k > 1 is the WebUI's "Clip skip SDXL": CLIP-L takes hidden state -k.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import nn

from lora_trainer.backends.checkpoint.configs import SCALING_FACTORS
from lora_trainer.contracts import FAMILIES, PREDICTION_TYPES, Conditioning, SizeCond
from lora_trainer.errors import ConfigError
from lora_trainer.text import chunk_token_ids, encode_chunks

__all__ = ["SIZE_EMBED_DIM", "CheckpointAdapter", "scaled_linear_alphas_cumprod", "size_embedding"]

SIZE_EMBED_DIM = 256
"""Width of sgm's Fourier embedding of one size number (6 numbers: 1536 of SDXL's 2816-wide ``y``)."""
OPENCLIP_PAD_ID = 0


def scaled_linear_alphas_cumprod(
    steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> torch.Tensor:
    """The families' noise schedule (the WebUI's configs): betas linear in square-root space.

    Returns (steps,) float32 cumulative products of 1 - beta, computed in float64.
    """
    betas = torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float32)


def size_embedding(values: torch.Tensor, dim: int = SIZE_EMBED_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """sgm's embedding of size numbers: (B, d) -> (B, d * dim), per number [cos(v f_i), sin(v f_i)],
    f_i = max_period^(-i / (dim / 2)), float32."""
    b, d = values.shape
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=values.device) / half)
    angles = values.reshape(b * d, 1).float() * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1).reshape(b, d * dim)


class CheckpointAdapter:
    """A loaded checkpoint as a ``ModelAdapter`` (see ``lora_trainer.contracts``).

    ``unet``: diffusers ``UNet2DConditionModel`` (SDXL's with a projection class embedding for ``y``);
    ``vae``: diffusers ``AutoencoderKL``; ``text_encoders``: from :func:`build_text_encoders`;
    ``tokenizer``: an HF CLIP tokenizer (:func:`clip_tokenizer`). Every module is moved to
    ``device`` in ``dtype``; as in the WebUI, the denoiser's weights require grad, the text
    encoders and the VAE are frozen.
    """

    default_clip_skip = 1

    def __init__(
        self,
        family: str,
        prediction_type: str,
        unet: nn.Module,
        vae: nn.Module,
        text_encoders: dict[str, nn.Module],
        tokenizer: Any,
        *,
        model_name: str,
        model_hash: str = "",
        model_legacy_hash: str = "",
        vae_name: str = "",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
        expected = {"te1", "te2"} if family == "sdxl" else {"te"}
        if set(text_encoders) != expected:
            raise ValueError(f"{family} needs text encoders {sorted(expected)}, got {sorted(text_encoders)}")
        self.family = family
        self.prediction_type = prediction_type
        self.device = torch.device(device)
        self.dtype = dtype
        self.alphas_cumprod = scaled_linear_alphas_cumprod()
        self.unet = unet.to(self.device, dtype).eval().requires_grad_(True)
        self.vae: Any = vae.to(self.device, dtype).eval().requires_grad_(False)
        self.text_encoders = {
            k: te.to(self.device, dtype).eval().requires_grad_(False) for k, te in text_encoders.items()
        }
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.model_hash = model_hash
        self.model_legacy_hash = model_legacy_hash
        self.vae_name = vae_name
        config = getattr(vae, "config", None)
        self.scale_factor = float(getattr(config, "scaling_factor", None) or SCALING_FACTORS[family])

    # -- images

    def _encode(self, pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        posterior = self.vae.encode(pixels.to(self.device, dtype)).latent_dist
        return posterior.sample() * self.scale_factor  # torch's global generator, as the trainer seeds it

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Scaled latents of (B, 3, H, W) pixels in [-1, 1], a sample of the VAE's posterior."""
        held = next(self.vae.parameters()).dtype
        return self._encode(pixels, held).to(self.dtype)

    @torch.no_grad()
    def encode_images_fp32(self, pixels: torch.Tensor) -> torch.Tensor:
        """:meth:`encode_images` with the VAE in float32 for this call (then put back)."""
        held = next(self.vae.parameters()).dtype
        self.vae.to(torch.float32)
        try:
            return self._encode(pixels, torch.float32)
        finally:
            self.vae.to(held)

    # -- text

    def _chunks(self, captions: Sequence[str], max_token_length: int, pad_id: int | None) -> torch.Tensor:
        tok = self.tokenizer
        ids = tok(list(captions), add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        chunks = chunk_token_ids(
            ids, bos_id=tok.bos_token_id, eos_id=tok.eos_token_id, pad_id=pad_id, max_token_length=max_token_length
        )
        return chunks.to(self.device)

    @staticmethod
    def _clip_states(te: Any, clip_skip: int, final_norm: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        """Hidden state -clip_skip of an HF CLIP text model (1: its last, normed output), through the
        final layer norm when ``final_norm``."""
        layers = te.config.num_hidden_layers
        if clip_skip > layers:
            raise ValueError(f"clip_skip {clip_skip} exceeds the text encoder's {layers} layers")

        def encode(ids: torch.Tensor) -> torch.Tensor:
            if clip_skip == 1 and final_norm:
                return te(input_ids=ids).last_hidden_state
            hidden = te(input_ids=ids, output_hidden_states=True).hidden_states[-clip_skip]
            return te.text_model.final_layer_norm(hidden) if final_norm else hidden

        return encode

    def encode_text(
        self,
        captions: Sequence[str],
        *,
        clip_skip: int = 1,
        max_token_length: int = 75,
        size_cond: Sequence[SizeCond] | None = None,
        weighted_captions: bool = False,
    ) -> Conditioning:
        if weighted_captions:
            raise ConfigError(
                "dataset.weighted_captions",
                "weighted captions are read in the WebUI's prompt syntax; train in the WebUI tab for them, "
                "or turn the setting off",
            )
        if clip_skip < 1:
            raise ValueError(f"clip_skip must be >= 1, got {clip_skip}")
        if self.family != "sdxl":
            pad = None if self.family == "sd1" else OPENCLIP_PAD_ID
            ids = self._chunks(captions, max_token_length, pad)
            context = encode_chunks(self._clip_states(self.text_encoders["te"], clip_skip, True), ids)
            return Conditioning(cast(torch.Tensor, context))  # an encoder without pooled output: one tensor
        return self._encode_sdxl(captions, max(clip_skip, 2), max_token_length, size_cond)

    def _encode_sdxl(
        self, captions: Sequence[str], te1_skip: int, max_token_length: int, size_cond: Sequence[SizeCond] | None
    ) -> Conditioning:
        te2: Any = self.text_encoders["te2"]
        hidden1 = encode_chunks(  # one tensor: no pooled output
            self._clip_states(self.text_encoders["te1"], te1_skip, False),
            self._chunks(captions, max_token_length, None),
        )

        def encode2(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = te2(input_ids=ids, output_hidden_states=True)
            return out.hidden_states[-2], out.text_embeds

        hidden2, pooled = encode_chunks(encode2, self._chunks(captions, max_token_length, OPENCLIP_PAD_ID))
        if size_cond is None:
            size_cond = [SizeCond((1024, 1024), (0, 0), (1024, 1024))] * len(captions)
        if len(size_cond) != len(captions):
            raise ValueError(f"{len(size_cond)} size_cond for {len(captions)} captions")
        sizes = [
            size_embedding(torch.tensor([getattr(s, f) for s in size_cond], dtype=torch.float32, device=self.device))
            for f in ("original_size", "crop_top_left", "target_size")
        ]
        vector = torch.cat([pooled, *(s.to(pooled.dtype) for s in sizes)], dim=1)
        return Conditioning(torch.cat([cast(torch.Tensor, hidden1), hidden2], dim=2), vector)

    # -- denoiser

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        labels = cond.vector.to(self.device, self.dtype) if self.family == "sdxl" and cond.vector is not None else None
        return self.unet(
            noisy_latents.to(self.device, self.dtype),
            timesteps.to(self.device),
            encoder_hidden_states=cond.context.to(self.device, self.dtype),
            class_labels=labels,
        ).sample
