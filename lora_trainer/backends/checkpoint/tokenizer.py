"""The CLIP tokenizer of all three families, built from open_clip's BPE file (nothing is downloaded).

SD1, SD2 and SDXL share one byte-level BPE vocabulary of 49408 tokens (``<|startoftext|>`` 49406,
``<|endoftext|>`` 49407): the one HF's ``openai/clip-vit-large-patch14`` tokenizer holds and
open_clip's ``bpe_simple_vocab_16e6.txt.gz`` lists as merges. The vocabulary is rebuilt from that
file (256 byte symbols, the same with the end-of-word mark, one token per merge, the two special
tokens) and handed to ``transformers.CLIPTokenizer``, so the ids equal the WebUI's.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import tempfile
from pathlib import Path

from transformers import CLIPTokenizer

from lora_trainer.errors import IncompatibleModelError

__all__ = ["BPE_FILE", "VOCAB_SIZE", "bpe_file", "clip_tokenizer"]

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
_MERGES = VOCAB_SIZE - 2 * 256 - 2  # the vocabulary: bytes, bytes + "</w>", merges, two specials
_WORD_END = "</w>"


def bpe_file() -> Path:
    """open_clip's BPE file, found without importing open_clip (its imports need torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / BPE_FILE
        if path.is_file():
            return path
    raise IncompatibleModelError(
        f"the CLIP tokenizer needs {BPE_FILE} from the open_clip package, which is not installed: "
        "run `pip install open-clip-torch` (or install this package's `train` extra)"
    )


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins of the bytes, in vocabulary order: the printable Latin-1 bytes as
    themselves first, then every other byte mapped to code points from 256 up."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = {b: chr(b) for b in kept}
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in kept] + [symbols[b] for b in range(256) if b not in kept]


def _vocab_and_merges(path: Path) -> tuple[dict[str, int], list[str]]:
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : 1 + _MERGES]  # the first line is a version header
    symbols = _byte_symbols()
    tokens = [*symbols, *(s + _WORD_END for s in symbols), *("".join(m.split()) for m in merges)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    if len(tokens) != VOCAB_SIZE or len(set(tokens)) != VOCAB_SIZE:
        raise IncompatibleModelError(f"{path} is not CLIP's BPE vocabulary ({len(set(tokens))} tokens)")
    return {t: i for i, t in enumerate(tokens)}, merges


@functools.lru_cache(maxsize=1)
def _cached() -> CLIPTokenizer:
    vocab, merges = _vocab_and_merges(bpe_file())
    with tempfile.TemporaryDirectory(prefix="clip-tokenizer-") as tmp:
        vocab_path, merges_path = Path(tmp) / "vocab.json", Path(tmp) / "merges.txt"
        vocab_path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        merges_path.write_text("\n".join(["#version: 0.2", *merges]) + "\n", encoding="utf-8")
        # CLIPTokenizer reads both files while it is built
        return CLIPTokenizer(str(vocab_path), str(merges_path), model_max_length=77)


def clip_tokenizer() -> CLIPTokenizer:
    """The CLIP tokenizer (ids as the WebUI's); built once per process, then shared (it holds no state
    that a call changes)."""
    return _cached()
