"""The checkpoint's text encoders as transformers' ``CLIPTextModel`` / ``CLIPTextModelWithProjection``.

Where each family keeps them in a single-file checkpoint, and what they become::

    family  checkpoint prefix                                  model (key)
    sd1     cond_stage_model.transformer.text_model.           CLIP-L, HF names already ("te")
    sd2     cond_stage_model.model.                            OpenCLIP-H -> CLIPTextModel ("te"),
                                                               without its last block
    sdxl    conditioner.embedders.0.transformer.text_model.    CLIP-L ("te1")
            conditioner.embedders.1.model.                     OpenCLIP-bigG -> CLIPTextModelWithProjection ("te2")

OpenCLIP's blocks are the same computation as HF CLIP's with GELU: the fused ``attn.in_proj``
splits into q/k/v projections, ``ln_1``/``ln_2``/``mlp.c_fc``/``mlp.c_proj`` become
``layer_norm1``/``layer_norm2``/``fc1``/``fc2``, ``ln_final`` the final layer norm, and the
projection (``x @ text_projection``) a bias-free linear layer with the transposed matrix.
SD2 is conditioned on OpenCLIP-H's penultimate block through ``ln_final`` (the WebUI's and kohya's
default), so its last block is left out and the model's output is that conditioning.

Sizes (width, blocks, MLP width, vocabulary, positions) are read from the tensors; heads, which
no tensor shows, are 64 channels each as in every CLIP text tower (``num_heads`` overrides).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lora_trainer.backends.checkpoint.configs import text_encoder_config
from lora_trainer.errors import IncompatibleModelError

__all__ = ["TEXT_ENCODER_PREFIXES", "build_text_encoders", "openclip_to_hf"]

TEXT_ENCODER_PREFIXES = {
    "sd1": {"te": "cond_stage_model.transformer."},
    "sd2": {"te": "cond_stage_model.model."},
    "sdxl": {"te1": "conditioner.embedders.0.transformer.", "te2": "conditioner.embedders.1.model."},
}
"""Per family and text encoder: the prefix of its tensors in a checkpoint."""

_KINDS = {
    ("sd1", "te"): "clip_l",
    ("sd2", "te"): "openclip_h",
    ("sdxl", "te1"): "clip_l",
    ("sdxl", "te2"): "openclip_bigg",
}
_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.")
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
_BLOCK_RENAMES = {
    "ln_1.": "layer_norm1.",
    "ln_2.": "layer_norm2.",
    "attn.out_proj.": "self_attn.out_proj.",
    "mlp.c_fc.": "mlp.fc1.",
    "mlp.c_proj.": "mlp.fc2.",
}
_IGNORED = ("text_model.embeddings.position_ids",)  # a buffer; some checkpoints hold damaged copies


def _sub_state(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _clip_state(sub: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF CLIP names under the embedder's ``transformer.``; old files lack the ``text_model.`` level."""
    return {(k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in sub.items()}


def _openclip_block(index: int, rest: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    base = f"text_model.encoder.layers.{index}."
    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
        kind = rest.rsplit("_", 1)[1]
        q, k, v = value.chunk(3, dim=0)
        return {f"{base}self_attn.{n}_proj.{kind}": t for n, t in zip("qkv", (q, k, v), strict=True)}
    for old, new in _BLOCK_RENAMES.items():
        if rest.startswith(old):
            return {base + new + rest[len(old) :]: value}
    return {}


def openclip_to_hf(sub: Mapping[str, torch.Tensor], *, blocks: int | None = None) -> dict[str, torch.Tensor]:
    """An OpenCLIP text tower's tensors (names under its ``model.``) in HF CLIP names.

    ``blocks``: keep only resblocks 0..blocks-1 (all by default). ``text_projection`` (width, embed)
    becomes ``text_projection.weight`` (embed, width); the attention mask, ``logit_scale`` and
    anything outside the text tower are left out.
    """
    out: dict[str, torch.Tensor] = {}
    fixed = {
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "ln_final.weight": "text_model.final_layer_norm.weight",
        "ln_final.bias": "text_model.final_layer_norm.bias",
    }
    for key, value in sub.items():
        if key in fixed:
            out[fixed[key]] = value
        elif key == "text_projection":
            out["text_projection.weight"] = value.t().contiguous()
        elif (match := _RESBLOCK.fullmatch(key)) and (blocks is None or int(match[1]) < blocks):
            out.update(_openclip_block(int(match[1]), match[2], value))
    return out


def _num_layers(hf_state: Mapping[str, torch.Tensor]) -> int:
    found = {int(m[1]) for k in hf_state if (m := _LAYER.match(k))}
    return max(found) + 1 if found else 0


def _default_heads(hidden: int) -> int:
    if hidden % 64 == 0:
        return hidden // 64
    return next(h for h in (4, 2, 1) if hidden % h == 0)  # narrow test models


def _config(kind: str, hf_state: Mapping[str, torch.Tensor], heads: int | None) -> CLIPTextConfig:
    tokens = hf_state["text_model.embeddings.token_embedding.weight"]
    positions = hf_state["text_model.embeddings.position_embedding.weight"]
    cfg = text_encoder_config(kind)
    vocab, hidden = tokens.shape
    cfg.update(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=_num_layers(hf_state),
        intermediate_size=hf_state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        max_position_embeddings=positions.shape[0],
        num_attention_heads=heads or _default_heads(hidden),
        bos_token_id=vocab - 2,  # CLIP's vocabulary ends with start and end of text
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 1 if kind == "clip_l" else 0,
    )
    if "text_projection.weight" in hf_state:
        cfg["projection_dim"] = hf_state["text_projection.weight"].shape[0]
    return CLIPTextConfig(**cfg)


def _build(kind: str, hf_state: dict[str, torch.Tensor], heads: int | None, where: str) -> nn.Module:
    hf_state = {k: v for k, v in hf_state.items() if k not in _IGNORED}
    try:
        config = _config(kind, hf_state, heads)
    except KeyError as exc:
        raise IncompatibleModelError(f"the text encoder under {where!r} lacks {exc.args[0]!r}") from exc
    model_cls = CLIPTextModelWithProjection if "text_projection.weight" in hf_state else CLIPTextModel
    with torch.device("meta"):
        model = model_cls(config)
    missing = {n for n, _ in model.named_parameters()} - hf_state.keys()
    unexpected = hf_state.keys() - {n for n, _ in model.named_parameters()}
    if missing or unexpected:
        raise IncompatibleModelError(
            f"the text encoder under {where!r} does not match a CLIP text model: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    model.load_state_dict(hf_state, strict=False, assign=True)
    positions = torch.arange(config.max_position_embeddings).unsqueeze(0)
    model.text_model.embeddings.register_buffer("position_ids", positions)
    return model.float().eval().requires_grad_(False)


def build_text_encoders(
    state: Mapping[str, torch.Tensor], family: str, *, num_heads: Mapping[str, int] | None = None
) -> dict[str, nn.Module]:
    """The family's text encoders from a whole checkpoint state dict (ldm/sgm names).

    Returns ``{"te": ...}`` (SD1, SD2) or ``{"te1": ..., "te2": ...}`` (SDXL), in float32 on the CPU,
    frozen and in eval mode. ``num_heads`` (per key) replaces the 64-channel heads (test models).
    Raises IncompatibleModelError when a text encoder is missing or does not fit its model.
    """
    if family not in TEXT_ENCODER_PREFIXES:
        raise IncompatibleModelError(f"unknown model family {family!r}")
    out: dict[str, nn.Module] = {}
    for key, prefix in TEXT_ENCODER_PREFIXES[family].items():
        kind = _KINDS[family, key]
        sub = _sub_state(state, prefix)
        if not sub:
            raise IncompatibleModelError(f"the checkpoint has no text encoder under {prefix!r}")
        if kind == "clip_l":
            hf_state = _clip_state(sub)
        else:
            blocks = {int(m[1]) for k in sub if (m := _RESBLOCK.fullmatch(k))}
            # SD2: the penultimate block's output is the conditioning; SDXL te2 keeps all (pooled output)
            keep = len(blocks) - 1 if family == "sd2" else None
            hf_state = openclip_to_hf(sub, blocks=keep)
            if family == "sd2":
                hf_state.pop("text_projection.weight", None)
        out[key] = _build(kind, hf_state, (num_heads or {}).get(key), prefix)
    return out
