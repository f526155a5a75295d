"""Make every image in a workspace a plain, upright, 8-bit RGB PNG or JPEG that training can read.

Per image (decoded fully, so truncated files are caught):

* Already fine (PNG or JPEG with a matching extension, RGB, no transparency, no EXIF rotation,
  one frame): kept byte for byte. JPEGs are never re-encoded just to be re-encoded: a second
  JPEG generation loses detail, and PNG would only make the file larger.
* Everything else is decoded with :func:`lora_trainer.data.images.load_image_rgb` and saved as
  PNG (lossless): WebP, GIF (first frame), BMP, TIFF, TGA ...; RGBA, LA and palette images with
  transparency (composited onto ``background``); palette, CMYK, greyscale, 1-bit and 16-bit
  images (16-bit scaled, not clipped); images with an EXIF orientation (rotated upright);
  files whose content does not match their extension. The old file is replaced.
* Cannot be used (0 bytes, unreadable, damaged or truncated, above ``max_pixels``: by default
  :data:`~lora_trainer.workshop.resources.WORKSHOP_MAX_PIXELS`, checked from the header before
  decoding): moved with its caption to ``.workshop/quarantine/`` and reported.
  Never fatal.

Captions are tidied at the same time: ``.caption`` files without a ``.txt`` become ``.txt``;
non-UTF-8 or multi-line ``.txt`` files are rewritten as one UTF-8 line. Other files are
reported and left alone (training ignores them). Each image's fingerprint (for
:mod:`~lora_trainer.workshop.dedupe`) is computed from the decoded pixels on the way.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from lora_trainer.data.captions import decode_caption_bytes
from lora_trainer.data.images import load_image_rgb
from lora_trainer.data.layout import CAPTION_EXTENSION, CAPTION_EXTENSIONS, is_hidden_name, is_workshop_image
from lora_trainer.errors import DatasetError
from lora_trainer.files.atomic_write import atomic_write_bytes
from lora_trainer.files.hashes import file_sha256
from lora_trainer.workshop.dedupe import Fingerprint, HashCache, fingerprint
from lora_trainer.workshop.fsutil import MAX_CAPTION_BYTES, atomic_write_text, caption_text, unique_stem
from lora_trainer.workshop.layout import caption_path, concept_folders, iter_images, move_aside, rel_path, state_dir
from lora_trainer.workshop.report import Report
from lora_trainer.workshop.resources import WORKSHOP_MAX_PIXELS, megapixels, worker_count

__all__ = ["CleanReport", "CleanedFile", "clean_workspace", "needs_conversion", "probe"]

PNG_COMPRESS_LEVEL = 1  # a working copy: ~15% larger than level 6, 2x faster than 4 and 5x than 6
_ORIENTATION = 0x0112
_KEEP = {"PNG": (".png",), "JPEG": (".jpg", ".jpeg")}
_BOMB_PIXELS_RE = re.compile(r"\((\d+) pixels\)")


@dataclass
class CleanedFile:
    """One image after cleaning. action: ``"kept"``, ``"converted"`` or ``"quarantined"``.
    path: its workspace-relative path now (under ``.workshop/quarantine/`` when quarantined);
    original: its path before. changes: what was done, one short phrase each."""

    path: str
    original: str
    action: str
    changes: list[str] = field(default_factory=list)
    width: int = 0
    height: int = 0


@dataclass
class CleanReport(Report):
    """Per-image results in ``files``; ``problems`` codes: empty, unreadable, too_large, corrupt
    (quarantined images), converted (info), caption_converted, caption_reencoded, caption_multiline,
    orphan_caption, not_image, misplaced (files outside concept folders)."""

    files: list[CleanedFile] = field(default_factory=list)
    kept: int = 0
    converted: int = 0
    quarantined: int = 0

    def summary(self) -> str:
        return f"{self.kept} image(s) fine, {self.converted} converted, {self.quarantined} moved to quarantine."


def probe(path: Path, max_pixels: int | None = WORKSHOP_MAX_PIXELS) -> dict:
    """Header facts of an image file without decoding its pixels: ``format``, ``mode``, ``size``
    (as stored), ``frames``, ``transparency``, ``orientation`` (EXIF, 1 = upright) and
    ``upright_size`` (the size once the orientation is applied). Raises :class:`DatasetError`
    with a problem code (empty, unreadable, too_large, corrupt) in ``args[1]``."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise DatasetError(f"Cannot read {path.name} ({e.strerror or e}).", "unreadable") from None
    if size == 0:
        raise DatasetError(f"{path.name} is empty (0 bytes).", "empty")
    try:
        with Image.open(path) as img:
            w, h = img.size
            orientation = 1
            # Pillow's PNG getexif() decodes the whole image to look for an eXIf chunk after the
            # pixels; read only what the header gave (load_image_rgb still applies the rest).
            if img.format != "PNG" or "exif" in img.info:
                try:
                    orientation = int(img.getexif().get(_ORIENTATION, 1) or 1)
                except Exception:  # noqa: BLE001 - a broken EXIF block (any error): load_image_rgb ignores it too
                    orientation = 1
            facts = {
                "format": img.format or "",
                "mode": img.mode,
                "size": (w, h),
                "frames": int(getattr(img, "n_frames", 1) or 1),
                "transparency": "transparency" in img.info,
                "orientation": orientation,
                "upright_size": (h, w) if orientation in (5, 6, 7, 8) else (w, h),
            }
    except PermissionError as e:
        raise DatasetError(
            f"Cannot read {path.name} ({e.strerror}). Check the file's permissions.", "unreadable"
        ) from None
    except Image.DecompressionBombError as e:
        found = _BOMB_PIXELS_RE.search(str(e))
        size = megapixels(int(found.group(1))) if found else "larger than Pillow opens"
        raise DatasetError(_too_large(path, size, max_pixels), "too_large") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"{path.name} is not a readable image ({e}).", "corrupt") from None
    if max_pixels is not None and w * h > max_pixels:
        raise DatasetError(_too_large(path, f"{w}x{h} ({megapixels(w * h)})", max_pixels), "too_large")
    return facts


def _too_large(path: Path, size: str, max_pixels: int | None) -> str:
    if max_pixels is None:  # our limit is off: Pillow's decompression-bomb guard refused it
        return f"{path.name} is {size}, above what Pillow opens safely. Scale it down with an image editor."
    return (
        f"{path.name} is {size}, above the workshop's limit of {megapixels(max_pixels)} ({max_pixels} pixels), "
        "which keeps the memory each worker needs to decode an image bounded (and guards against "
        "decompression bombs). Scale it down with an image editor."
    )


def needs_conversion(path: Path, facts: dict) -> list[str]:
    """Why ``path`` (with the header ``facts`` of :func:`probe`) must be re-saved; [] if it is fine."""
    why = []
    fmt, ext = facts["format"], path.suffix.lower()
    if ext not in _KEEP.get(fmt, ()):
        why.append(f"{fmt or 'unknown format'} ({ext or 'no extension'}) saved as PNG")
    mode = facts["mode"]
    if facts["transparency"] or mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        why.append(f"{mode} transparency composited onto the background colour")
    elif mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        why.append(f"{mode} (16-bit) scaled to 8-bit RGB")
    elif mode != "RGB":
        why.append(f"{mode} converted to RGB")
    if facts["orientation"] != 1:
        why.append(f"EXIF orientation {facts['orientation']} applied (image turned upright)")
    if facts["frames"] > 1:
        why.append(f"first of {facts['frames']} frames kept")
    return why


def _tidy_captions(root: Path, folder: Path, report: Report) -> None:
    """Convert .caption files, re-encode non-UTF-8 and join multi-line .txt files in ``folder``."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not is_hidden_name(d)]
        names = set(filenames)
        stems = {os.path.splitext(n)[0] for n in filenames if is_workshop_image(n)}
        for name in sorted(filenames):
            if not is_hidden_name(name) and not is_workshop_image(name):
                _tidy_caption_file(root, Path(dirpath) / name, names, stems, report)


def _tidy_caption_file(root: Path, path: Path, names: set[str], stems: set[str], report: Report) -> None:
    """One non-image file of a concept folder: report it, or tidy it as a caption."""
    stem, ext = os.path.splitext(path.name)
    ext = ext.lower()
    rel = rel_path(root, path)
    if ext not in CAPTION_EXTENSIONS:
        report.add("not_image", rel, f"{rel} is not an image or caption; training ignores it.", "info")
    elif stem not in stems:
        report.add("orphan_caption", rel, f"Caption {rel} has no image of the same name; training ignores it.", "info")
    elif _set_aside_if_too_large(root, path, rel, report):
        return
    elif ext == ".caption":
        if stem + CAPTION_EXTENSION in names:
            report.add("caption_ignored", rel, f"{rel} is ignored: training reads the .txt caption beside it.", "info")
        else:
            _convert_caption_file(path, rel, report)
    else:
        _rewrite_txt_caption(path, rel, report)


def _set_aside_if_too_large(root: Path, path: Path, rel: str, report: Report) -> bool:
    """Move a caption file above :data:`MAX_CAPTION_BYTES` (the limit imports apply) to
    ``.workshop/quarantine/``; True when it was (reported)."""
    try:
        if path.stat().st_size <= MAX_CAPTION_BYTES:
            return False
    except OSError:
        return False
    dest_dir = state_dir(root, "quarantine", *Path(rel).parent.parts)
    dest_dir.mkdir(parents=True, exist_ok=True)
    taken = {os.path.splitext(n)[0].lower() for n in os.listdir(dest_dir)}
    dest = dest_dir / (unique_stem(path.stem, taken) + path.suffix)
    os.replace(path, dest)
    report.add(
        "too_large",
        rel,
        f"Caption {rel} is larger than 1 MiB, too large to be a caption; it was moved to "
        f"{rel_path(root, dest)}. Write a short caption for its image.",
    )
    return True


def _caption_without_nul(text: str, rel: str, report: Report) -> str:
    if "\x00" not in text:
        return text
    report.add("caption_nul", rel, f"Caption {rel} held NUL bytes; they were removed.", "info")
    return text.replace("\x00", "")


def _convert_caption_file(path: Path, rel: str, report: Report) -> None:
    """A ``.caption`` file without a ``.txt`` beside it becomes that ``.txt`` (one UTF-8 line)."""
    data = path.read_bytes()
    text, _ = decode_caption_bytes(data)
    text, _ = caption_text(_caption_without_nul(text or "", rel, report))
    atomic_write_text(path.with_suffix(CAPTION_EXTENSION), text)
    os.unlink(path)
    report.add("caption_converted", rel, f"Caption {rel} was saved as .txt, the file training reads.", "info")


def _rewrite_txt_caption(path: Path, rel: str, report: Report) -> None:
    """Rewrite a non-UTF-8, BOM-prefixed or multi-line ``.txt`` caption as one UTF-8 line."""
    try:
        data = path.read_bytes()
    except OSError as e:
        report.add("unreadable", rel, f"Cannot read caption {rel} ({e.strerror or e}).", "error")
        return
    text, fallback = decode_caption_bytes(data)
    one, multi = caption_text(_caption_without_nul(text or "", rel, report))
    if not (fallback or multi or data.startswith(b"\xef\xbb\xbf") or b"\x00" in data):
        return
    atomic_write_text(path, one)
    if fallback:
        report.add(
            "caption_reencoded",
            rel,
            f"Caption {rel} was not UTF-8; read it as {fallback}, saved as UTF-8.",
            "info",
        )
    if multi:
        report.add("caption_multiline", rel, f"Caption {rel} had several lines; joined into one.", "info")


@dataclass
class _Analysis:
    """What a worker found out about one image (no file changed yet)."""

    why: list[str] = field(default_factory=list)
    png: bytes | None = None  # the converted image, when ``why``
    fp: Fingerprint | None = None
    size: tuple[int, int] = (0, 0)
    error: str = ""
    code: str = ""


def _analyse(path: Path, background: tuple[int, int, int], max_pixels: int | None) -> _Analysis:
    try:
        facts = probe(path, max_pixels)
        why = needs_conversion(path, facts)
        img = load_image_rgb(path, background=background, max_pixels=max_pixels)
    except DatasetError as e:
        return _Analysis(error=str(e.args[0]), code=e.args[1] if len(e.args) > 1 else "corrupt")
    except Exception as e:  # noqa: BLE001 - Pillow's plugins raise assorted errors on hostile files; never fatal
        return _Analysis(error=f"Cannot decode it ({type(e).__name__}: {e}).", code="corrupt")
    try:
        if not why and img.size != facts["size"] and facts["format"] == "PNG":
            why.append("EXIF orientation applied (image turned upright)")  # an eXIf chunk after the pixels
        if why:
            buf = io.BytesIO()
            img.save(buf, "PNG", compress_level=PNG_COMPRESS_LEVEL)
            png = buf.getvalue()
            sha = hashlib.sha256(png).hexdigest()
        else:
            png, sha = None, file_sha256(path)
        return _Analysis(why, png, fingerprint(img, sha), img.size)
    except OSError as e:
        return _Analysis(error=f"Cannot read it ({e.strerror or e}).", code="unreadable")
    except Exception as e:  # noqa: BLE001 - as above: a hostile file must not stop the clean
        return _Analysis(error=f"Cannot process it ({type(e).__name__}: {e}).", code="corrupt")
    finally:
        img.close()


def _commit(root: Path, path: Path, res: _Analysis, report: CleanReport, cache: HashCache) -> None:
    rel = rel_path(root, path)
    if res.error:
        try:
            moved = move_aside(root, path, "quarantine")
        except OSError as e2:
            report.add(
                res.code, rel, f"{rel} cannot be used ({res.error}), and could not be moved aside ({e2}).", "error"
            )
            report.files.append(CleanedFile(rel, rel, "quarantined"))
            report.quarantined += 1
            return
        cache.forget(path)
        report.add(
            res.code,
            rel,
            f"{rel} cannot be used: {res.error} It was moved to {moved} (with its caption); "
            "replace it with a good copy, or leave it out.",
            "error",
        )
        report.files.append(CleanedFile(moved, rel, "quarantined"))
        report.quarantined += 1
        return
    w, h = res.size
    assert res.fp is not None  # _analyse sets a fingerprint whenever there is no error
    if not res.why:
        cache.put(path, res.fp)
        report.files.append(CleanedFile(rel, rel, "kept", [], w, h))
        report.kept += 1
        return
    dest = path.with_suffix(".png")
    if dest != path and dest.exists():  # another image already has this name: pick a new stem
        taken = {os.path.splitext(x)[0].lower() for x in os.listdir(path.parent)}
        dest = path.with_name(unique_stem(path.stem, taken) + ".png")
        cap = caption_path(path)
        if cap.exists():  # the caption was shared by both images: each keeps a copy
            shutil.copyfile(cap, caption_path(dest))
    assert res.png is not None  # _analyse encodes the PNG whenever there is a reason to convert
    atomic_write_bytes(dest, res.png, durable=False)
    if dest != path:
        os.unlink(path)
        cache.forget(path)
    cache.put(dest, res.fp)
    new_rel = rel_path(root, dest)
    report.files.append(CleanedFile(new_rel, rel, "converted", res.why, w, h))
    report.add("converted", rel, f"{rel}: " + "; ".join(res.why) + (f" -> {new_rel}" if new_rel != rel else ""), "info")
    report.converted += 1


def clean_workspace(
    root: Path,
    *,
    background: tuple[int, int, int] = (255, 255, 255),
    max_pixels: int | None = WORKSHOP_MAX_PIXELS,
    cache: HashCache | None = None,
    progress: Callable[[int, int], None] | None = None,
    workers: int | None = None,
) -> CleanReport:
    """Clean every image of the workspace at ``root`` in place; see the module doc.

    ``workers`` threads decode and encode images (default: up to 4, one per CPU, and no more
    than the available memory carries at ``max_pixels`` each: :func:`~lora_trainer.workshop.
    resources.worker_count`); files are renamed and reports written in order by the calling thread.
    """
    root = Path(root)
    background = (int(background[0]), int(background[1]), int(background[2]))
    report = CleanReport()
    cache = cache or HashCache(root)

    concept_paths = {str(f) for f, _, _ in concept_folders(root)}
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if is_hidden_name(entry.name):
            continue
        if entry.is_file() and is_workshop_image(entry.name):
            report.add(
                "misplaced",
                entry.name,
                f"{entry.name} is not in a '<repeats>_<concept>' folder, so training does not see it; move it into one.",
            )
        elif entry.is_dir() and entry.path not in concept_paths:
            report.add(
                "misplaced",
                entry.name,
                f"Folder {entry.name} is not named '<repeats>_<concept>' (like 10_{entry.name}), so training skips it.",
            )
    for folder, _, _ in concept_folders(root):
        _tidy_captions(root, folder, report)

    images = iter_images(root)
    workers = worker_count(workers, max_pixels=max_pixels)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # Pillow releases the GIL while decoding/encoding
        chunk = 4 * workers  # bounds the encoded images held in memory
        for start in range(0, len(images), chunk):
            batch = images[start : start + chunk]
            results = pool.map(lambda p: _analyse(p, background, max_pixels), batch)
            for n, (path, res) in enumerate(zip(batch, results, strict=True), start=start):
                _commit(root, path, res, report, cache)
                if progress:
                    progress(n + 1, len(images))
    cache.prune({f.path for f in report.files if f.action != "quarantined"})
    cache.save()
    return report
