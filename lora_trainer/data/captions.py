"""Caption files and per-step caption processing, with the behaviour of kohya-ss/sd-scripts.

* :func:`read_caption_file` reads the first line of a caption file (kohya uses only the first line).
* :func:`process_caption` is kohya's per-step processing: whole-caption dropout, ``keep_tokens``
  (or ``keep_tokens_separator``), ``shuffle_caption`` and tag dropout, in kohya's order and with the
  same draws from the given :class:`random.Random`.
* :func:`tag_frequency` / :func:`tag_frequency_by_dir` build the ``ss_tag_frequency`` metadata.
* :func:`unescape_caption`: the WebUI's prompt escapes (``\\(`` ...) as the literal characters, for
  literal captions (``weighted_captions`` off, kohya's default).
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Iterable, Mapping

from lora_trainer.errors import DatasetError
from lora_trainer.log import logger

__all__ = [
    "CAPTION_ENCODINGS",
    "add_tag_frequency",
    "normalize_caption",
    "process_caption",
    "read_caption_file",
    "split_tags",
    "tag_frequency",
    "tag_frequency_by_dir",
    "unescape_caption",
]

CAPTION_ENCODINGS = ("utf-8-sig", "cp1252", "latin-1")

_WHITESPACE = re.compile(r"\s+")


_ESCAPES = {"\\(": "(", "\\)": ")", "\\[": "[", "\\]": "]", "\\\\": "\\"}
_ESCAPED = re.compile(r"\\[()\[\]\\]")
_CLOSES = {")": "(", "]": "["}


def unescape_caption(caption: str) -> str:
    """``caption`` with the WebUI's prompt escapes (``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\``, as its DeepBooru
    writes them) turned into the characters themselves: what a literal caption (``weighted_captions``
    off) means by them. Other backslashes stay."""
    return _ESCAPED.sub(lambda m: _ESCAPES[m.group(0)], caption)


def _weighted_pieces(caption: str, separator: str) -> list[str]:
    """``caption`` split on ``separator`` where no bracket of the WebUI's emphasis syntax is open.

    Brackets count as the WebUI's prompt parser reads them: ``(`` and ``[`` open, ``)`` and ``]``
    close the latest open one of their kind (with none open they are text), an escaped bracket
    (``\\(``) is text, and a bracket left open groups the rest of the caption (the WebUI emphasises
    the rest of it)."""
    pieces: list[str] = []
    open_kinds: list[str] = []
    start = i = 0
    while i < len(caption):
        char = caption[i]
        if char == "\\" and _ESCAPED.match(caption, i):
            i += 2
            continue
        if char in "([":
            open_kinds.append(char)
        elif char in _CLOSES and _CLOSES[char] in open_kinds:
            del open_kinds[len(open_kinds) - 1 - open_kinds[::-1].index(_CLOSES[char])]
        elif not open_kinds and caption.startswith(separator, i):
            pieces.append(caption[start:i])
            start = i = i + len(separator)
            continue
        i += 1
    return [*pieces, caption[start:]]


def split_tags(caption: str, separator: str = ",", *, weighted: bool = False) -> list[str]:
    """The tags of a caption: split on ``separator``, whitespace stripped, empty tags dropped.

    ``weighted`` (``weighted_captions``): the caption is in the WebUI's prompt syntax, so a separator
    inside an emphasis group such as ``(red, blue:1.2)`` does not split it (see :func:`_weighted_pieces`)."""
    pieces = _weighted_pieces(caption, separator) if weighted else caption.split(separator)
    return [t.strip() for t in pieces if t.strip()]


def normalize_caption(caption: str, separator: str = ",") -> str:
    """Collapse runs of whitespace (newlines included) to one space, strip, and re-join the tags with ", "."""
    return ", ".join(split_tags(_WHITESPACE.sub(" ", caption), separator))


def process_caption(
    caption: str,
    rng: random.Random,
    *,
    shuffle: bool = False,
    keep_tokens: int = 0,
    keep_tokens_separator: str = "",
    caption_dropout_rate: float = 0.0,
    caption_tag_dropout_rate: float = 0.0,
    drop_caption_this_epoch: bool = False,
    separator: str = ",",
    weighted: bool = False,
) -> str:
    """The caption a sample is trained with this step (kohya's ``process_caption``).

    1. Whole-caption dropout: ``""`` if ``drop_caption_this_epoch`` (the caller's
       ``caption_dropout_every_n_epochs`` test) or with probability ``caption_dropout_rate``.
    2. The caption is split into tags on ``separator``. The first ``keep_tokens`` tags stay in place.
       With ``keep_tokens_separator`` (kohya's ``|||``) present in the caption, the tags before it stay
       in front instead, and tags after a second separator stay at the end.
    3. The other tags are shuffled (``shuffle``), then each is dropped with ``caption_tag_dropout_rate``.
    4. The tags are joined with ", " (kohya joins with ", " whatever the separator).

    ``weighted`` (``weighted_captions``): tags are split as the WebUI's prompt syntax groups them
    (:func:`split_tags`), so an emphasis group moves and drops as one tag.

    A caption that needs none of step 2-3 (no shuffle, no tag dropout, no keep_tokens_separator in it)
    comes back unchanged but stripped, as in kohya. ``rng`` draws: one ``random()`` for caption dropout
    (only when its rate > 0), one ``shuffle``, then one ``random()`` per shuffled tag (only when the tag
    dropout rate > 0).
    """
    for name, rate in (
        ("caption_dropout_rate", caption_dropout_rate),
        ("caption_tag_dropout_rate", caption_tag_dropout_rate),
    ):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {rate}")
    if keep_tokens < 0:
        raise ValueError(f"keep_tokens must be >= 0, got {keep_tokens}")
    if not separator:
        raise ValueError("separator must not be empty")

    dropped = caption_dropout_rate > 0 and rng.random() < caption_dropout_rate
    if drop_caption_this_epoch or dropped:
        return ""

    has_keep_separator = bool(keep_tokens_separator) and keep_tokens_separator in caption
    if not (shuffle or caption_tag_dropout_rate > 0 or has_keep_separator):
        return caption.strip()

    suffix: list[str] = []
    if has_keep_separator:
        head, rest = caption.split(keep_tokens_separator, 1)
        if keep_tokens_separator in rest:
            rest, tail = rest.split(keep_tokens_separator, 1)
            suffix = split_tags(tail, separator, weighted=weighted)
        fixed, flex = split_tags(head, separator, weighted=weighted), split_tags(rest, separator, weighted=weighted)
    else:
        tags = split_tags(caption, separator, weighted=weighted)
        fixed, flex = tags[:keep_tokens], tags[keep_tokens:]

    if shuffle:
        rng.shuffle(flex)
    if caption_tag_dropout_rate > 0:
        flex = [t for t in flex if rng.random() >= caption_tag_dropout_rate]
    return ", ".join(fixed + flex + suffix)


def decode_caption_bytes(data: bytes, encodings: Iterable[str] = CAPTION_ENCODINGS) -> tuple[str | None, str | None]:
    """(text, the fallback encoding used or None): the first of ``encodings`` that decodes ``data``."""
    for i, encoding in enumerate(encodings):
        try:
            return data.decode(encoding), (encoding if i else None)
        except UnicodeDecodeError:
            continue
    return None, None


def read_caption_file(
    path: str | os.PathLike, encodings: Iterable[str] = CAPTION_ENCODINGS, *, warn: bool = True
) -> str:
    """The caption in a text file: its first line, stripped (kohya uses only the first line).

    Decoded as UTF-8 (a byte-order mark is skipped); if that fails, with the next encodings
    (cp1252, then latin-1, which always decodes) and a warning naming the file; text after the first line
    is ignored with a warning too (``warn=False`` silences both, for callers that report them together).
    An empty file gives "". Unreadable files raise :class:`DatasetError`.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DatasetError(f"cannot read caption file {os.fspath(path)}: {e}") from e

    text, fallback = decode_caption_bytes(data, encodings)
    if text is None:
        raise DatasetError(f"caption file {os.fspath(path)} cannot be decoded with any of {', '.join(encodings)}")
    if fallback and warn:
        logger.warning(f"caption file {os.fspath(path)} is not UTF-8; read it as {fallback}. Save it as UTF-8.")

    lines = text.splitlines()
    if not lines:
        return ""
    if warn and any(line.strip() for line in lines[1:]):
        logger.warning(f"caption file {os.fspath(path)} has several lines; only the first one is used")
    return lines[0].strip()


def tag_frequency(captions: Iterable[str], separator: str = ",") -> dict[str, int]:
    """How often each tag occurs in ``captions``: tags split on ``separator``, stripped and lower-cased,
    empty ones skipped (kohya's counting for ``ss_tag_frequency``)."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in split_tags(caption, separator):
            tag = tag.lower()
            counts[tag] = counts.get(tag, 0) + 1
    return counts


def add_tag_frequency(
    nested: dict[str, dict[str, int]], dir_name: str, captions: Iterable[str], separator: str = ","
) -> dict[str, dict[str, int]]:
    """Add the tags of ``captions`` to ``nested[dir_name]`` in place (a folder seen twice is merged); returns ``nested``."""
    inner = nested.setdefault(dir_name, {})
    for tag, n in tag_frequency(captions, separator).items():
        inner[tag] = inner.get(tag, 0) + n
    return nested


def tag_frequency_by_dir(
    captions_by_dir: Mapping[str, Iterable[str]], separator: str = ","
) -> dict[str, dict[str, int]]:
    """kohya's ``ss_tag_frequency``: ``{dir_name: {tag: count}}``. ``dir_name`` is the image folder's
    base name (e.g. ``"10_mychar"``); the captions are the raw captions of its images."""
    nested: dict[str, dict[str, int]] = {}
    for dir_name, captions in captions_by_dir.items():
        add_tag_frequency(nested, dir_name, captions, separator)
    return nested
