"""Latent cache: VAE latents of training images, in memory and optionally on disk.

An entry's key is the sha256 of the image file's content hash, the bucket size, the
resize size, the crop, the flip, the VAE identity and a format version; so an edited image,
a new resolution or another VAE misses and is encoded again. On disk each entry is one
safetensors file ``<cache_dir>/<key>.safetensors`` (a single ``latents`` tensor, float32,
(C, h, w), and string metadata repeating what went into the key). Nothing is pickled.
A damaged or mismatching file is logged, encoded again and replaced.

Only deterministic crops can be cached: a random crop raises :class:`DatasetError`, as
kohya refuses ``--random_crop`` with ``--cache_latents``. Flip augmentation is supported by
caching the flipped image too (``flip=True`` entries).

Latents are checked when encoded (:func:`encode_finite`, also used by the training loop for
uncached batches): an image the VAE turns into NaN/inf (a half-precision VAE overflowing, as
SDXL's does in fp16) is encoded again with the VAE in float32 (the model adapter's optional
``encode_images_fp32``, the WebUI's automatic VAE precision fallback done on encode); if that is
still not finite, :class:`DatasetError` names the image and nothing is cached for it.

The cache never writes anywhere but ``cache_dir`` (None keeps everything in memory).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import ImageOps

from lora_trainer.data.images import load_image_rgb, pil_to_tensor, resize_and_crop
from lora_trainer.errors import DatasetError
from lora_trainer.files.hashes import file_sha256
from lora_trainer.log import logger

CACHE_FORMAT = "lora_trainer.latent_cache"
CACHE_VERSION = "1"


@dataclass(frozen=True)
class LatentRequest:
    """One latent to get: the image at ``path`` scaled to ``resized_size`` (w, h; None = the
    smallest size covering ``size``), centre-cropped to ``size`` (w, h), mirrored if ``flip``.

    ``variant`` is any extra string that changes the pixels (for example the background
    colour used for transparent images); it is part of the key.
    """

    path: Path
    size: tuple[int, int]
    resized_size: tuple[int, int] | None = None
    crop: str = "center"
    flip: bool = False
    variant: str = ""


def cache_key(content_hash: str, request: LatentRequest, vae_id: str) -> str:
    """The entry key (hex sha256) of ``request`` for an image whose bytes hash to ``content_hash``."""
    parts = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "content": content_hash,
        "size": list(request.size),
        "resized": list(request.resized_size) if request.resized_size else None,
        "crop": request.crop,
        "flip": bool(request.flip),
        "variant": request.variant,
        "vae": vae_id,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()


def default_pixels(request: LatentRequest) -> torch.Tensor:
    """(3, H, W) pixels in [-1, 1] for ``request``, loaded the way the training dataset loads them."""
    img = load_image_rgb(request.path)
    out = resize_and_crop(img, request.size[0], request.size[1], "center", resized_size=request.resized_size).image
    if request.flip:
        out = ImageOps.mirror(out)
    return pil_to_tensor(out)


def _check_requests(items: Sequence[LatentRequest], batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    for r in items:
        if r.crop != "center":
            raise DatasetError(
                "Latent caching needs a fixed crop: random crop changes the pixels every epoch, so cached "
                "latents would be wrong. Turn off random crop or turn off latent caching."
            )


EncodeFn = Callable[[torch.Tensor], torch.Tensor]


def _checked_shape(latents: object, n: int) -> torch.Tensor:
    if not isinstance(latents, torch.Tensor) or latents.dim() != 4 or latents.shape[0] != n:
        raise ValueError(
            f"encode_fn returned {getattr(latents, 'shape', type(latents))} for {n} images; expected (B, C, h, w)"
        )
    return latents


def _nonfinite_rows(latents: torch.Tensor) -> list[int]:
    return [i for i, ok in enumerate(torch.isfinite(latents).flatten(1).all(dim=1).tolist()) if not ok]


def encode_finite(
    pixels: torch.Tensor, encode_fn: EncodeFn, names: Sequence[str | os.PathLike], *, upcast_fn: EncodeFn | None = None
) -> tuple[torch.Tensor, int]:
    """``(latents, re-encoded)``: float32 latents of ``pixels`` (one image per name in ``names``), all finite.

    Images whose latents hold NaN/inf are encoded again with ``upcast_fn`` (the VAE in float32) when
    given; ``re-encoded`` counts them. Raises :class:`DatasetError` naming the images still not finite.
    """
    with torch.no_grad():
        latents = _checked_shape(encode_fn(pixels), len(names)).float()
        bad = _nonfinite_rows(latents)
        if not bad:
            return latents, 0
        if upcast_fn is not None:
            logger.warning(
                "The VAE gave NaN/inf latents for %s; encoding again with the VAE in float32.",
                ", ".join(str(names[i]) for i in bad),
            )
            again = _checked_shape(upcast_fn(pixels[bad]), len(bad)).float()
            latents = latents.clone()
            latents[bad] = again.to(latents.device)
            still = [bad[j] for j in _nonfinite_rows(again)]
        else:
            still = bad
    if still:
        listed = ", ".join(str(names[i]) for i in still)
        how = "even with the VAE in float32" if upcast_fn is not None else "and the model cannot re-encode in float32"
        raise DatasetError(
            f"The VAE turns {listed} into NaN/inf latents {how}: training would learn nothing from "
            "it and could damage the LoRA. Remove or re-save the image, or use another VAE."
        )
    return latents, len(bad)


class _EncodeRun:
    """One :meth:`LatentCache.get_or_encode` call: its requests, their keys and content hashes,
    and how to turn requests into latents."""

    def __init__(
        self,
        items: Sequence[LatentRequest],
        encode_fn: EncodeFn,
        pixels_fn: Callable[[LatentRequest], torch.Tensor],
        vae_id: str,
        upcast_fn: EncodeFn | None = None,
    ):
        self.items = items
        self.encode_fn = encode_fn
        self.upcast_fn = upcast_fn
        self.pixels_fn = pixels_fn
        self.vae_id = vae_id
        self.keys: list[str] = []
        self.hashes: dict[Path, str] = {}

    def content_hash(self, path: Path) -> str:
        if path not in self.hashes:
            try:
                self.hashes[path] = file_sha256(path)
            except OSError as e:
                raise DatasetError(f"Cannot read image {path}: {e}. Check that it still exists.") from None
        return self.hashes[path]

    def encode(self, todo: list[int]) -> tuple[torch.Tensor, int]:
        """(B, C, h, w) float32 CPU latents of the requests ``todo``, all finite, and how many were
        encoded again in float32 (:func:`encode_finite`)."""
        pixels = torch.stack([self.pixels_fn(self.items[i]) for i in todo]).float()
        names = [self.items[i].path for i in todo]
        latents, again = encode_finite(pixels, self.encode_fn, names, upcast_fn=self.upcast_fn)
        return latents.detach().to("cpu", torch.float32), again


class LatentCache:
    """Latents by key, in memory and (when ``cache_dir`` is set) on disk.

    ``stats`` counts ``memory_hits``, ``disk_hits``, ``encoded``, ``corrupt`` entries and the
    entries encoded again in float32 (``upcast``) because the VAE gave NaN/inf.
    """

    def __init__(self, cache_dir: str | os.PathLike | None = None):
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._memory: dict[str, torch.Tensor] = {}
        self.stats = {"memory_hits": 0, "disk_hits": 0, "encoded": 0, "corrupt": 0, "upcast": 0}

    def __len__(self) -> int:
        return len(self._memory)

    def clear_memory(self) -> None:
        """Drop the in-memory latents (disk files stay)."""
        self._memory.clear()

    def path_for(self, key: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / f"{key}.safetensors"

    # -- disk ------------------------------------------------------------------------------

    def _metadata(self, key: str, request: LatentRequest, vae_id: str, content_hash: str) -> dict[str, str]:
        return {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "key": key,
            "content_sha256": content_hash,
            "source_name": request.path.name,
            "size": f"{request.size[0]}x{request.size[1]}",
            "crop": request.crop,
            "flip": str(bool(request.flip)),
            "vae_id": vae_id,
        }

    def _read(self, path: Path, key: str) -> torch.Tensor | None:
        """The latent stored at ``path``, or None if missing; raises ValueError if unusable."""
        from safetensors import safe_open

        if not path.is_file():
            return None
        # safetensors 0.4.2 ships no stub for safe_open's context-manager methods.
        with safe_open(str(path), framework="pt", device="cpu") as f:  # pyright: ignore[reportGeneralTypeIssues]
            meta = f.metadata() or {}
            if meta.get("format") != CACHE_FORMAT or meta.get("version") != CACHE_VERSION:
                raise ValueError("not a latent-cache file of this version")
            if meta.get("key") != key:
                raise ValueError("key in the file does not match its name")
            if list(f.keys()) != ["latents"]:
                raise ValueError("unexpected tensors")
            t = f.get_tensor("latents")
        if t.dim() != 3 or not torch.isfinite(t).all():
            raise ValueError("latents are not a finite (C, h, w) tensor")
        return t

    def _write(self, path: Path, latents: torch.Tensor, metadata: dict[str, str]) -> None:
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem[:16]}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file({"latents": latents.contiguous()}, tmp, metadata=metadata)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    # -- main entry ------------------------------------------------------------------------

    def get_or_encode(
        self,
        items: Sequence[LatentRequest],
        encode_fn: EncodeFn,
        *,
        vae_id: str,
        batch_size: int = 1,
        pixels_fn: Callable[[LatentRequest], torch.Tensor] | None = None,
        progress: Callable[[int, int], None] | None = None,
        upcast_fn: EncodeFn | None = None,
    ) -> list[torch.Tensor]:
        """Latents for ``items``, in order: (C, h, w) float32 CPU tensors.

        Found in memory, else on disk, else encoded: misses are grouped by size, loaded with
        ``pixels_fn`` (default: :func:`default_pixels`) and passed to ``encode_fn`` in batches
        of up to ``batch_size`` as (B, 3, H, W) float32 CPU pixels in [-1, 1]; it returns
        (B, C, H/8, W/8) latents (a model adapter's ``encode_images``). ``vae_id`` names the
        VAE (name + hash); a different one never reuses latents. ``progress(done, total)`` is
        called as items are resolved. Latents with NaN/inf are encoded again with ``upcast_fn`` (the
        VAE in float32) when given; still not finite: :class:`DatasetError` naming the image.
        """
        _check_requests(items, batch_size)
        run = _EncodeRun(items, encode_fn, pixels_fn or default_pixels, vae_id, upcast_fn)
        total = len(items)
        results: list[torch.Tensor | None] = [None] * total
        misses: dict[tuple[int, int], list[int]] = {}
        done = 0
        for i, r in enumerate(items):
            key = cache_key(run.content_hash(Path(r.path)), r, vae_id)
            run.keys.append(key)
            hit = self._cached(key, Path(r.path))
            if hit is None:
                misses.setdefault((r.size[0], r.size[1]), []).append(i)
            else:
                results[i] = hit
                done += 1
        if progress is not None:
            progress(done, total)

        for indices in misses.values():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                self._encode(run, chunk)
                for i in chunk:
                    results[i] = self._memory[run.keys[i]]
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
        return results  # type: ignore[return-value]

    def _cached(self, key: str, image: Path) -> torch.Tensor | None:
        """The latent of ``key`` from memory, else from disk (kept in memory then); None if neither
        has a usable one (a damaged file is logged and counted)."""
        hit = self._memory.get(key)
        if hit is not None:
            self.stats["memory_hits"] += 1
            return hit
        disk = self.path_for(key)
        if disk is None:
            return None
        try:
            hit = self._read(disk, key)
        except Exception as e:  # noqa: BLE001 - any failure to read a cache file means: encode it again
            self.stats["corrupt"] += 1
            logger.warning("Latent cache file %s is damaged (%s); encoding %s again.", disk, e, image)
            return None
        if hit is not None:
            self.stats["disk_hits"] += 1
            self._memory[key] = hit
        return hit

    def _encode(self, run: _EncodeRun, chunk: list[int]) -> None:
        """Encode the requests ``chunk`` (indices into ``run.items``) not in memory yet, and keep
        their latents in memory and on disk."""
        # the same image and size can be requested twice: encode it once
        todo, seen = [], set()
        for i in chunk:
            if run.keys[i] not in self._memory and run.keys[i] not in seen:
                seen.add(run.keys[i])
                todo.append(i)
        if not todo:
            return
        latents, again = run.encode(todo)
        self.stats["upcast"] += again
        for j, i in enumerate(todo):
            lat = latents[j].clone()
            key = run.keys[i]
            self._memory[key] = lat
            self.stats["encoded"] += 1
            disk = self.path_for(key)
            if disk is not None:
                r = run.items[i]
                self._write(disk, lat, self._metadata(key, r, run.vae_id, run.hashes[Path(r.path)]))
