"""How much of the machine the workshop's image workers may use.

Each worker decodes one whole image at a time. Its peak memory grows with the image's pixel
count: the decoded pixels, a converted copy (RGBA composited to RGB, 16-bit scaled to 8-bit,
rotated), and the encoded PNG, about :data:`PEAK_BYTES_PER_PIXEL` bytes per pixel in all.

* :data:`WORKSHOP_MAX_PIXELS` (8192 x 8192, 67 megapixels: beyond a 50-megapixel camera, far
  beyond any training size) bounds one worker's peak at about 1 GiB. Larger images are read
  only as far as their header and set aside with a note; Pillow's own decompression-bomb limit
  (about 179 megapixels) is far too high for that.
* :func:`worker_count` runs no more workers than the CPUs and the memory available can carry.
"""

from __future__ import annotations

import os

from lora_trainer.meminfo import MEMINFO, meminfo_bytes

__all__ = [
    "PEAK_BYTES_PER_PIXEL",
    "WORKSHOP_MAX_PIXELS",
    "available_memory",
    "megapixels",
    "worker_count",
    "worker_peak_bytes",
]

WORKSHOP_MAX_PIXELS = 8192 * 8192
PEAK_BYTES_PER_PIXEL = 16
MAX_WORKERS = 4
_HEADROOM = 0.5  # share of the available memory the workers may take; the rest for the WebUI and the system


def megapixels(pixels: int) -> str:
    """``pixels`` as a short megapixel figure for messages (``"169.0 megapixels"``)."""
    return f"{pixels / 1e6:.1f} megapixels"


def worker_peak_bytes(max_pixels: int | None) -> int:
    """Peak memory of one worker decoding images of up to ``max_pixels`` (None: the workshop's limit)."""
    return PEAK_BYTES_PER_PIXEL * int(max_pixels if max_pixels is not None else WORKSHOP_MAX_PIXELS)


def available_memory(meminfo: str = MEMINFO) -> int | None:
    """Bytes of memory available to new work (``MemAvailable`` of ``/proc/meminfo``); None where
    it cannot be read (not Linux, a restricted container)."""
    return meminfo_bytes("MemAvailable", meminfo)


def worker_count(requested: int | None = None, *, max_pixels: int | None = WORKSHOP_MAX_PIXELS) -> int:
    """How many image workers to run: ``requested`` when given, else one per CPU up to
    :data:`MAX_WORKERS`, and never more than half the available memory carries at
    :func:`worker_peak_bytes` each (at least one; the CPU bound alone when the memory is unknown)."""
    if requested is not None:
        return max(1, int(requested))
    n = min(MAX_WORKERS, os.cpu_count() or 1)
    free = available_memory()
    if free is not None:
        n = min(n, int(free * _HEADROOM) // max(1, worker_peak_bytes(max_pixels)))
    return max(1, n)
