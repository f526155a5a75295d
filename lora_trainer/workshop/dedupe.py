"""Exact and near-duplicate images.

* Exact duplicates: the same file content (SHA-256 of the bytes).
* Near duplicates (a resized, re-encoded or slightly edited copy): a 128-bit difference hash
  (dHash) of a tiny greyscale thumbnail, 64 bits from comparing horizontal neighbours on a
  9x8 thumbnail and 64 from vertical ones on 8x9, compared by Hamming distance (how many bits
  differ). dHash alone calls any two images with no structure (two flat backgrounds) similar,
  so a pair also needs close colours: a 4x4 RGB thumbnail with a mean absolute difference of
  at most ``color_tolerance`` (0-255 scale). A near group is one representative (the largest
  image) and the images near it, so groups never chain through images that are each near the
  next but far from the first.

Duplicates are flagged, not removed; ``remove_exact=True`` moves every exact copy but one (the
first by path) to ``.workshop/removed/`` with its caption. Fingerprints are cached in
``.workshop/hashes.json`` per (path, size, mtime), so a second run decodes nothing.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from lora_trainer.data.images import load_image_rgb
from lora_trainer.errors import DatasetError
from lora_trainer.files.hashes import file_sha256
from lora_trainer.workshop.fsutil import atomic_write_json
from lora_trainer.workshop.layout import caption_path, iter_images, move_aside, rel_path, state_dir
from lora_trainer.workshop.report import Report
from lora_trainer.workshop.resources import WORKSHOP_MAX_PIXELS, worker_count

__all__ = [
    "DuplicateGroup",
    "DuplicateReport",
    "Fingerprint",
    "HashCache",
    "dhash",
    "find_duplicates",
    "fingerprint",
    "fingerprint_file",
    "hamming",
]

DEFAULT_THRESHOLD = 10  # bits of 128
DEFAULT_COLOR_TOLERANCE = 24.0
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
_BOX = Image.Resampling.BOX


def dhash(img: Image.Image) -> int:
    """128-bit difference hash of ``img`` (any mode): 64 horizontal + 64 vertical gradient signs."""
    g = img.convert("L")
    if max(g.size) > 256:  # a cheap pre-shrink; BOX to 9x8 below averages the rest
        g = g.reduce(max(1, max(g.size) // 128))
    wide = np.asarray(g.resize((9, 8), _BOX), dtype=np.int16)
    tall = np.asarray(g.resize((8, 9), _BOX), dtype=np.int16)
    bits = np.concatenate([(wide[:, 1:] > wide[:, :-1]).ravel(), (tall[1:, :] > tall[:-1, :]).ravel()])
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def color_signature(img: Image.Image) -> bytes:
    """48 bytes: a 4x4 RGB thumbnail."""
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    if max(rgb.size) > 256:
        rgb = rgb.reduce(max(1, max(rgb.size) // 128))
    return rgb.resize((4, 4), _BOX).tobytes()


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


@dataclass
class Fingerprint:
    """What dedupe keeps per file: content hash, dHash (32 hex digits), colour thumbnail (hex), size."""

    sha256: str
    dhash: str
    color: str
    width: int
    height: int


def fingerprint(img: Image.Image, data_sha256: str) -> Fingerprint:
    return Fingerprint(data_sha256, f"{dhash(img):032x}", color_signature(img).hex(), img.size[0], img.size[1])


class HashCache:
    """Fingerprints by workspace-relative path, valid while size and mtime are unchanged."""

    VERSION = 1

    def __init__(self, root: Path):
        self.root = Path(root)
        self.path = state_dir(self.root, "hashes.json")
        self.entries: dict[str, dict] = {}
        self.dirty = False
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if data.get("version") == self.VERSION:
                self.entries = dict(data.get("entries", {}))
        except (OSError, ValueError, AttributeError):
            pass  # no cache or a damaged one: recompute

    @staticmethod
    def _stamp(path: Path) -> tuple[int, int]:
        st = path.stat()
        return st.st_size, st.st_mtime_ns

    def get(self, path: Path) -> Fingerprint | None:
        e = self.entries.get(rel_path(self.root, path))
        if e is None:
            return None
        try:
            if (e["size"], e["mtime_ns"]) != self._stamp(path):
                return None
            return Fingerprint(e["sha256"], e["dhash"], e["color"], int(e["width"]), int(e["height"]))
        except (OSError, KeyError, TypeError, ValueError):
            return None

    def put(self, path: Path, fp: Fingerprint) -> None:
        size, mtime = self._stamp(path)
        self.entries[rel_path(self.root, path)] = {
            "size": size,
            "mtime_ns": mtime,
            "sha256": fp.sha256,
            "dhash": fp.dhash,
            "color": fp.color,
            "width": fp.width,
            "height": fp.height,
        }
        self.dirty = True

    def forget(self, path: Path) -> None:
        if self.entries.pop(rel_path(self.root, path), None) is not None:
            self.dirty = True

    def prune(self, keep: set[str]) -> None:
        for k in list(self.entries):
            if k not in keep:
                del self.entries[k]
                self.dirty = True

    def save(self) -> None:
        if self.dirty:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.path, {"version": self.VERSION, "entries": self.entries})
            self.dirty = False


@dataclass
class DuplicateGroup:
    """Files that are the same image. kind: ``"exact"`` or ``"near"``. keep: the one we suggest
    keeping (exact: the first by path; near: the largest in pixels, the group's representative:
    every other member is near it, not only near some member). distance: the largest dHash
    distance (bits of 128) from ``keep`` to another member (0 for exact groups)."""

    kind: str
    files: list[str]
    keep: str
    distance: int = 0


@dataclass
class DuplicateReport(Report):
    """exact / near: the groups found (near groups list one file per distinct content); removed:
    ``{"path", "moved_to", "duplicate_of"}`` per exact copy moved out with ``remove_exact``."""

    images: int = 0
    threshold: int = DEFAULT_THRESHOLD
    exact: list[DuplicateGroup] = field(default_factory=list)
    near: list[DuplicateGroup] = field(default_factory=list)
    removed: list[dict] = field(default_factory=list)

    def flagged(self) -> set[str]:
        """Every file in some group."""
        return {f for g in (*self.exact, *self.near) for f in g.files}


def fingerprint_file(path: Path, *, max_pixels: int | None = WORKSHOP_MAX_PIXELS) -> Fingerprint:
    """The fingerprint of an image file (a full decode). Raises :class:`DatasetError` for files
    that cannot be decoded, OSError for unreadable ones."""
    sha = file_sha256(path)
    img = load_image_rgb(path, max_pixels=max_pixels)
    try:
        return fingerprint(img, sha)
    finally:
        img.close()


def _compute(path: Path, max_pixels: int | None) -> Fingerprint | str:
    try:
        return fingerprint_file(path, max_pixels=max_pixels)
    except DatasetError as e:
        return str(e)
    except OSError as e:
        return f"cannot read it ({e.strerror or e})"
    except Exception as e:  # noqa: BLE001 - Pillow's plugins raise assorted errors on hostile files
        return f"cannot decode it ({type(e).__name__}: {e})"


def near_pairs(
    hashes: list[int], colors: list[bytes], threshold: int, color_tolerance: float, block: int = 256
) -> list[tuple[int, int, int]]:
    """(i, j, distance) for i < j with dHash distance <= threshold and close colours."""
    n = len(hashes)
    if n < 2:
        return []
    h = np.array([[x >> 64, x & ((1 << 64) - 1)] for x in hashes], dtype=np.uint64)
    c = np.frombuffer(b"".join(colors), dtype=np.uint8).reshape(n, -1).astype(np.int16)
    out = []
    for a in range(0, n, block):
        b = min(n, a + block)
        x = (h[a:b, None, :] ^ h[None, :, :]).view(np.uint8)  # (blk, n, 16)
        dist = _POPCOUNT[x].sum(axis=-1, dtype=np.int32)
        ii, jj = np.nonzero(dist <= threshold)
        for i, j in zip(ii.tolist(), jj.tolist(), strict=True):
            i += a
            if j <= i:
                continue
            if float(np.abs(c[i] - c[j]).mean()) <= color_tolerance:
                out.append((i, j, int(dist[i - a, j])))
    return out


def _fingerprints(
    root: Path, cache: HashCache, max_pixels: int | None, workers: int | None, report: DuplicateReport
) -> tuple[list[str], list[Fingerprint]]:
    """(relative paths, fingerprints) of the readable images; computes the missing ones in
    ``workers`` threads and reports the unreadable ones."""
    rels: list[str] = []
    fps: list[Fingerprint] = []
    paths = iter_images(root)
    errors: dict[Path, str] = {}
    missing = [p for p in paths if cache.get(p) is None]
    if missing:
        n = worker_count(workers, max_pixels=max_pixels)
        with ThreadPoolExecutor(max_workers=n) as pool:  # Pillow decodes without the GIL
            for path, res in zip(missing, pool.map(lambda p: _compute(p, max_pixels), missing), strict=True):
                if isinstance(res, str):
                    errors[path] = res
                else:
                    cache.put(path, res)
    for path in paths:
        rel = rel_path(root, path)
        fp = None if path in errors else cache.get(path)
        if fp is None:
            why = errors.get(path, "the file changed while it was read")
            report.add("unreadable", rel, f"{rel} was left out of the duplicate search: {why}", "error")
            continue
        rels.append(rel)
        fps.append(fp)
    return rels, fps


def _near_groups(
    rels: list[str], fps: list[Fingerprint], reps: list[int], threshold: int, color_tolerance: float
) -> list[DuplicateGroup]:
    """Near-duplicate groups among the distinct contents ``reps`` (indices into ``fps``), by first file.

    Groups never chain (a near b, b near c, but a far from c): the largest image not yet in a
    group (fewest pixels last; by path among equals) becomes a group's representative and takes
    every image near *it* that is not in a group yet, so each member is within ``threshold`` of
    the one we suggest keeping.
    """
    pairs = near_pairs(
        [int(fps[i].dhash, 16) for i in reps],
        [bytes.fromhex(fps[i].color) for i in reps],
        threshold,
        color_tolerance,
    )
    near: dict[int, dict[int, int]] = {}
    for a, b, d in pairs:
        near.setdefault(a, {})[b] = d
        near.setdefault(b, {})[a] = d
    order = sorted(near, key=lambda k: (-fps[reps[k]].width * fps[reps[k]].height, reps[k]))
    taken: set[int] = set()
    out = []
    for k in order:
        if k in taken:
            continue
        members = [j for j in near[k] if j not in taken]
        if not members:
            continue
        taken.update(members, (k,))
        files = [reps[j] for j in (k, *members)]
        dist = max(near[k][j] for j in members)
        out.append(DuplicateGroup("near", [rels[i] for i in sorted(files)], rels[reps[k]], dist))
    out.sort(key=lambda g: g.files[0])
    return out


def _caption_of(image: Path) -> str:
    cap = caption_path(image)
    return cap.read_text(encoding="utf-8", errors="replace").strip() if cap.exists() else ""


def _remove_exact(root: Path, cache: HashCache, report: DuplicateReport) -> None:
    """Move every exact copy but the kept one of each group to ``.workshop/removed/``."""
    for g in report.exact:
        keep_text = _caption_of(root / g.keep)
        for rel in g.files:
            if rel == g.keep:
                continue
            path = root / rel
            text = _caption_of(path)
            moved = move_aside(root, path, "removed")
            cache.forget(path)
            report.removed.append({"path": rel, "moved_to": moved, "duplicate_of": g.keep})
            if text and text != keep_text:
                report.add(
                    "caption_differs",
                    rel,
                    f"Removed duplicate {rel} had a different caption than {g.keep}; it is kept in {moved} "
                    "beside the image. Merge the tags by hand if you need them.",
                    "info",
                )


def find_duplicates(
    root: Path,
    *,
    threshold: int = DEFAULT_THRESHOLD,
    color_tolerance: float = DEFAULT_COLOR_TOLERANCE,
    remove_exact: bool = False,
    max_pixels: int | None = WORKSHOP_MAX_PIXELS,
    cache: HashCache | None = None,
    workers: int | None = None,
) -> DuplicateReport:
    """Find exact and near duplicates among the workspace's images (see the module doc).

    ``threshold``: the largest dHash distance, in bits of 128, still called a near duplicate
    (0 = identical hashes only; about 10 catches resizes and JPEG re-encodes, 20+ starts to
    pair different photos of one scene). Unreadable images are reported and left out.
    """
    if not 0 <= int(threshold) <= 128:
        raise DatasetError(f"The near-duplicate threshold must be between 0 and 128 bits, got {threshold}.")
    cache = cache or HashCache(root)
    report = DuplicateReport(threshold=int(threshold))
    rels, fps = _fingerprints(root, cache, max_pixels, workers, report)
    report.images = len(rels)

    by_sha: dict[str, list[int]] = {}
    for i, fp in enumerate(fps):
        by_sha.setdefault(fp.sha256, []).append(i)
    reps = [idx[0] for idx in by_sha.values()]  # one per distinct content
    for idx in by_sha.values():
        if len(idx) > 1:
            report.exact.append(DuplicateGroup("exact", [rels[i] for i in idx], rels[idx[0]]))
    report.near.extend(_near_groups(rels, fps, reps, int(threshold), color_tolerance))

    if remove_exact:
        _remove_exact(root, cache, report)
    cache.prune(set(rels) - {r["path"] for r in report.removed})
    cache.save()
    return report
