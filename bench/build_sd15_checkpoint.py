"""A full-size SD1.5-architecture checkpoint with random weights, for benchmarks in a real WebUI.

Run with the WebUI's Python (it needs the WebUI's ``ldm`` sources, omegaconf and transformers):

    /path/to/venv/bin/python bench/build_sd15_checkpoint.py --webui /path/to/stable-diffusion-webui \\
        --tokenizer /path/to/clip-tokenizer-dir --out /path/to/webui/models/Stable-diffusion/bench_sd15.safetensors

The UNet and the VAE are built from the WebUI's own ``configs/v1-inference.yaml`` (ldm's
``UNetModel`` and ``AutoencoderKL``); the text encoder is transformers' ``CLIPTextModel`` with
CLIP ViT-L/14's text configuration (12 layers, width 768), which is what ldm's
``FrozenCLIPEmbedder`` wraps (building it from the config avoids a download). Keys are the
WebUI's (``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.transformer.*``).
Layers that SD initialises to zero (UNet out convs, ``proj_out``) get small random values so the
UNet output and the LoRA gradients are not zero. Weights are saved in fp16 (half the file; the
WebUI and kohya's scripts cast them on load).

Next to the checkpoint, a ``.yaml`` of the same name points the text encoder's ``version`` at a
folder holding a full-size ``config.json`` plus the tokenizer files given by ``--tokenizer``, so a
WebUI that reads its CLIP configuration offline builds the full-size text encoder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

CLIP_L_TEXT = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
TOKENIZER_FILES = ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json")


def build_state_dict(webui: Path, seed: int) -> dict[str, torch.Tensor]:
    sys.path.insert(0, str(webui / "repositories" / "stable-diffusion-stability-ai"))
    from ldm.util import instantiate_from_config  # the WebUI's sources, by path
    from omegaconf import OmegaConf
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    params = OmegaConf.load(webui / "configs" / "v1-inference.yaml").model.params
    parts = {
        "model.diffusion_model.": instantiate_from_config(params.unet_config),
        "first_stage_model.": instantiate_from_config(params.first_stage_config),
        "cond_stage_model.transformer.": CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT)),
    }
    state: dict[str, torch.Tensor] = {}
    for prefix, module in parts.items():
        for key, value in module.state_dict().items():
            if value.is_floating_point() and value.dim() > 1 and not value.any():
                value = torch.randn_like(value) * 0.02
            state[prefix + key] = value.detach().to(torch.float16 if value.is_floating_point() else value.dtype)
    return state


def write_config(out: Path, webui: Path, tokenizer: Path) -> None:
    """``<out>.yaml``: the WebUI's v1-inference.yaml with the text encoder read from a local folder."""
    from omegaconf import OmegaConf

    clip_dir = out.with_suffix("").with_name(out.stem + "_clip")
    clip_dir.mkdir(parents=True, exist_ok=True)
    (clip_dir / "config.json").write_text(json.dumps(CLIP_L_TEXT, indent=1))
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer / name, clip_dir / name)
    config = OmegaConf.load(webui / "configs" / "v1-inference.yaml")
    config.model.params.cond_stage_config.params = {"version": str(clip_dir.resolve())}
    OmegaConf.save(config, out.with_suffix(".yaml"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--webui", type=Path, required=True, help="the WebUI's folder (its ldm sources and configs)")
    parser.add_argument("--tokenizer", type=Path, required=True, help="a folder with CLIP's tokenizer files")
    parser.add_argument("--out", type=Path, required=True, help="the .safetensors to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from safetensors.torch import save_file

    state = build_state_dict(args.webui, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.out))
    write_config(args.out, args.webui, args.tokenizer)
    params = sum(v.numel() for v in state.values())
    print(f"{args.out}: {len(state)} tensors, {params / 1e6:.0f}M parameters")


if __name__ == "__main__":
    main()
