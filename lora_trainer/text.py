"""Long captions the WebUI way: 75-token chunks, each encoded as its own 77-token window.

CLIP text encoders see 77 positions: a start token, 75 content tokens and an end token.
The WebUI (``modules/sd_hijack_clip.py``) handles longer prompts by cutting the token ids
into chunks of 75, wrapping each chunk as ``bos + chunk + eos`` padded to 77, encoding every
window on its own and concatenating the outputs along the sequence axis, so the context is
``(B, 77 * n_chunks, C)``. Both the test adapter and the WebUI adapter use this module, so
the trainer conditions the UNet exactly as the WebUI does at generation time. (kohya's
sd-scripts differ here on purpose: for ``max_token_length`` 225 they build one bos + 225 + eos
sequence, padded, for every caption; this layout is the one the LoRA is used with.)

Window layout (what the WebUI's ``process_tokens`` ends up with)::

    [bos, t1 .. tk, eos, pad, pad, ..., pad]      k <= 75, 77 ids in all

SD1/SDXL-te1 CLIP pads with the eos id itself; OpenCLIP (SD2, SDXL te2) pads with 0, and
there the WebUI rewrites everything after the first eos to pad, which is this layout too.

Deliberate differences from the WebUI, as kohya does them:
  * ``max_token_length`` (75, 150 or 225) caps the length; longer captions are truncated.
  * No "comma padding backtrack" (the WebUI may move the last words of a full chunk to the next
    chunk when a comma is close); chunks are cut every 75 tokens.
Captions with fewer chunks than the longest one in the batch get empty windows
(``[bos, eos, pad ...]``), like the WebUI's ``empty_chunk``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

CHUNK_LENGTH = 75
"""Content tokens per window."""
WINDOW_LENGTH = CHUNK_LENGTH + 2
"""Ids per window: bos + 75 + eos."""


def num_chunks(max_token_length: int) -> int:
    """Chunks allowed by ``max_token_length``; it must be a positive multiple of 75."""
    if max_token_length <= 0 or max_token_length % CHUNK_LENGTH:
        raise ValueError(f"max_token_length must be a positive multiple of {CHUNK_LENGTH}, got {max_token_length}")
    return max_token_length // CHUNK_LENGTH


def chunk_token_ids(
    token_ids: Sequence[Sequence[int]],
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int | None = None,
    max_token_length: int = CHUNK_LENGTH,
) -> torch.Tensor:
    """Cut token id lists (without bos/eos) into 77-id windows.

    Args:
        token_ids: one list of content ids per caption, without start/end tokens.
        bos_id, eos_id: the tokenizer's start and end ids.
        pad_id: the padding id; None means ``eos_id`` (HF CLIP as the WebUI uses it).
            OpenCLIP pads with 0.
        max_token_length: 75, 150 or 225; ids beyond it are dropped.

    Returns:
        A (B, n_chunks, 77) int64 tensor, ``n_chunks`` = the most chunks any caption needs,
        at least 1 and at most ``max_token_length // 75``.
    """
    max_chunks = num_chunks(max_token_length)
    pad = eos_id if pad_id is None else pad_id
    clipped = [list(ids)[:max_token_length] for ids in token_ids]
    n = max([1, *((len(ids) + CHUNK_LENGTH - 1) // CHUNK_LENGTH for ids in clipped)])
    n = min(n, max_chunks)

    out = torch.full((len(clipped), n, WINDOW_LENGTH), pad, dtype=torch.long)
    for b, ids in enumerate(clipped):
        for c in range(n):
            part = ids[c * CHUNK_LENGTH : (c + 1) * CHUNK_LENGTH]
            window = [bos_id, *part, eos_id]
            out[b, c, : len(window)] = torch.tensor(window, dtype=torch.long)
    return out


def encode_chunks(
    encode_fn: Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
    chunk_ids: torch.Tensor,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Encode every 77-id window and join the outputs along the sequence axis.

    Args:
        encode_fn: maps (N, 77) ids to (N, 77, C) hidden states, or to a tuple
            ``(hidden (N, 77, C), pooled (N, D))`` for encoders with a pooled output (SDXL te2).
            Windows are independent, so all B * n windows go through it in one call.
        chunk_ids: (B, n, 77) from :func:`chunk_token_ids`.

    Returns:
        (B, 77 * n, C) hidden states; with a pooled output, ``(hidden, pooled (B, D))`` where
        pooled comes from each caption's first window (the WebUI's ``zs[0].pooled``; kohya too).
    """
    b, n, length = chunk_ids.shape
    out = encode_fn(chunk_ids.reshape(b * n, length))
    hidden, pooled = out if isinstance(out, tuple) else (out, None)
    hidden = hidden.reshape(b, n * length, hidden.shape[-1])
    if pooled is None:
        return hidden
    return hidden, pooled.reshape(b, n, -1)[:, 0]
