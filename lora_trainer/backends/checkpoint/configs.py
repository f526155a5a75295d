"""Model configurations of the three families, as diffusers and transformers take them.

Full-size values of the WebUI's own configs (``v1-inference.yaml``, ``v2-inference(-v).yaml``,
``sd_xl_base.yaml``), in the argument names of ``UNet2DConditionModel``, ``AutoencoderKL`` and
``CLIPTextConfig``. A checkpoint's own sizes (read from its tensors) replace these where they differ.

SDXL's denoiser takes the sgm ``y`` vector (pooled text embedding + size embeddings, 2816 wide) as a
projection class embedding: ``class_embedding.linear_1/linear_2`` are sgm's ``label_emb.0.0/0.2``
and it is added to the time embedding as sgm adds ``label_emb(y)``, so a conditioning built the way
the WebUI builds it goes in unchanged.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SCALING_FACTORS", "text_encoder_config", "unet_config", "vae_config"]

SCALING_FACTORS = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}
"""The VAE latent scale of each family (the WebUI's ``scale_factor``)."""

_SD1_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,  # diffusers' name for the number of heads here: SD1 has 8 heads per level
    "use_linear_projection": False,
    "transformer_layers_per_block": 1,
}
_SD2_UNET: dict[str, Any] = {
    **_SD1_UNET,
    "sample_size": 96,
    "cross_attention_dim": 1024,
    "attention_head_dim": [5, 10, 20, 20],  # heads of 64 channels
    "use_linear_projection": True,
}
_SDXL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 2048,
    "attention_head_dim": [5, 10, 20],
    "use_linear_projection": True,
    "transformer_layers_per_block": [1, 2, 10],
    "class_embed_type": "projection",
    "projection_class_embeddings_input_dim": 2816,
}
_UNETS = {"sd1": _SD1_UNET, "sd2": _SD2_UNET, "sdxl": _SDXL_UNET}

_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
}

# CLIP ViT-L/14 (SD1, SDXL's first), OpenCLIP ViT-H/14 (SD2: the penultimate layer is the output, so
# 23 of its 24 layers), OpenCLIP ViT-bigG/14 (SDXL's second). Heads of 64 channels throughout.
_TEXT: dict[str, dict[str, Any]] = {
    "clip_l": {
        "vocab_size": 49408,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "projection_dim": 768,
    },
    "openclip_h": {
        "vocab_size": 49408,
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 23,
        "num_attention_heads": 16,
        "max_position_embeddings": 77,
        "hidden_act": "gelu",
        "projection_dim": 1024,
    },
    "openclip_bigg": {
        "vocab_size": 49408,
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_hidden_layers": 32,
        "num_attention_heads": 20,
        "max_position_embeddings": 77,
        "hidden_act": "gelu",
        "projection_dim": 1280,
    },
}


def unet_config(family: str) -> dict[str, Any]:
    """``UNet2DConditionModel(**unet_config(family))`` is the family's full-size denoiser."""
    return {k: list(v) if isinstance(v, list) else v for k, v in _UNETS[family].items()}


def vae_config(family: str) -> dict[str, Any]:
    """``AutoencoderKL(**vae_config(family))``: the same architecture for all three, only the scale differs."""
    return {
        **{k: list(v) if isinstance(v, list) else v for k, v in _VAE.items()},
        "scaling_factor": SCALING_FACTORS[family],
    }


def text_encoder_config(kind: str) -> dict[str, Any]:
    """``CLIPTextConfig(**text_encoder_config(kind))``; kind: "clip_l", "openclip_h" or "openclip_bigg"."""
    return dict(_TEXT[kind])
