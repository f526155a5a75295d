"""Validation loss: the training objective measured on held-out images, the same way every time.

As in kohya-ss/sd-scripts' ``train_network.py``: each held-out image is noised at a fixed set of
timesteps spread over the schedule (4 of them: 200, 400, 600, 800 of 1000) and the loss is the mean
over images and timesteps, measured with the network in eval mode (no dropout) and without autograd.
The noise is fixed per image (drawn once from the validation seed), and the latents and, when the
text encoders are not trained, the text conditioning are computed once before the steps, so the same
network gives the same number at every evaluation. A run measures it every ``validate_every_n_steps``
steps, every ``validate_every_n_epochs`` epochs (every epoch when unset, as kohya), at every epoch that
saves a file, and at the end.

Kept differences from kohya: one image per evaluation batch (kohya uses the training batch size), so
``max_validation_steps`` counts images; captions get the trigger words but no shuffle or dropout.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lora_trainer.contracts import Conditioning, SizeCond, placement
from lora_trainer.data.buckets import BucketSettings
from lora_trainer.data.cache import encode_finite
from lora_trainer.data.captions import split_tags, unescape_caption
from lora_trainer.data.dataset import TrainDataset
from lora_trainer.data.scan import ImageItem, scan_dataset
from lora_trainer.data.split import split_validation
from lora_trainer.train import objectives

__all__ = ["NUM_VALIDATION_TIMESTEPS", "ValPoint", "Validator", "fixed_timesteps", "split_for_run"]

NUM_VALIDATION_TIMESTEPS = 4


@dataclass(frozen=True)
class ValPoint:
    """One evaluation: the validation loss after ``step`` optimizer steps, in ``epoch``."""

    step: int
    epoch: int
    loss: float

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "loss": self.loss}


@dataclass
class _Sample:
    latents: torch.Tensor  # (1, C, h, w) float32, CPU
    noise: torch.Tensor  # same shape, fixed for the run
    caption: str
    size_cond: list[SizeCond] | None
    cond: Conditioning | None = None  # encoded once when the text encoders are not trained


def fixed_timesteps(num_train_timesteps: int, count: int = NUM_VALIDATION_TIMESTEPS) -> list[int]:
    """``count`` timesteps evenly inside (0, num_train_timesteps), ends excluded (kohya's spread)."""
    return [int(t) for t in np.linspace(0, num_train_timesteps, count + 2, dtype=int)[1:-1]]


def split_for_run(cfg: Any, items: list[ImageItem], seed: int) -> tuple[list[ImageItem], list[ImageItem]]:
    """(training items, validation items) for a run: the held-out split of ``items``, or all of them and the
    images of ``validation.validation_data_dir``."""
    v, ds = cfg.validation, cfg.dataset
    if v.validation_data_dir:
        held = scan_dataset(v.validation_data_dir, ds.caption_extension, flat_repeats=1)
        return items, [ImageItem(it.path, it.caption, 1, it.subset_name, it.key) for it in held]
    val_seed = v.validation_seed if v.validation_seed is not None else seed
    return split_validation(items, fraction=v.validation_split, count=v.validation_count, seed=val_seed)


def _derive(seed: int, *parts: int) -> int:
    digest = hashlib.sha256(repr(("validation", seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class Validator:
    """Measures the validation loss of a run (``run``: the loop's ``_Run``, for its adapter, network,
    settings and text encoding) on ``items``."""

    def __init__(self, run: Any, items: list[ImageItem], buckets: BucketSettings, seed: int):
        self.run = run
        limit = run.cfg.validation.max_validation_steps
        self.items = items[:limit] if limit else items
        self.dataset = TrainDataset(self.items, buckets, batch_size=1, seed=seed)
        self.seed = seed
        self.timesteps = fixed_timesteps(len(run.alphas))
        self.samples: list[_Sample] = []
        self.points: list[ValPoint] = []

    def restore(self, points: list[dict[str, Any]]) -> None:
        """Take the measurements of a stopped run (``ValPoint.to_dict`` form) as this run's first ones."""
        self.points = [ValPoint(int(p["step"]), int(p["epoch"]), float(p["loss"])) for p in points] + self.points

    def prepare(self) -> None:
        """Encode the latents (and the conditioning, when fixed) and draw the noise, once."""
        run, a = self.run, self.run.adapter
        sdxl = a.family == "sdxl"
        devices = [run.device] if run.device.type == "cuda" else []
        with placement(a, ("vae",)), torch.no_grad(), torch.random.fork_rng(devices=devices):
            for i in range(len(self.items)):
                self.samples.append(self._sample(i, sdxl))
        if run.cfg.network.train_text_encoder:
            return
        with placement(a, ("text_encoders",)), torch.no_grad(), run.precision.autocast_context(run.device.type):
            for s in self.samples:
                s.cond = self._encode(s).detach()

    def _sample(self, i: int, sdxl: bool) -> _Sample:
        run = self.run
        batch = self.dataset.load_batch([i])
        torch.manual_seed(_derive(self.seed, i, 0))  # the VAE samples its latent with the global generator
        latents, again = encode_finite(
            batch["pixels"], run.adapter.encode_images, [str(self.items[i].path)], upcast_fn=run._upcast_fn()
        )
        run.upcast_latents += again
        latents = latents.float().cpu()
        gen = torch.Generator().manual_seed(_derive(self.seed, i, 1))
        noise = objectives.sample_noise(latents, gen, run.cfg.training.noise_offset)
        size_cond = None
        if sdxl:
            size_cond = [
                SizeCond(tuple(o), tuple(c), tuple(t))
                for o, c, t in zip(batch["original_sizes"], batch["crop_top_lefts"], batch["target_sizes"], strict=True)
            ]
        return _Sample(latents, noise, self._caption(batch["captions"][0]), size_cond)

    def _caption(self, caption: str) -> str:
        run, ds = self.run, self.run.cfg.dataset
        if run.trigger_words:
            rest = [t for t in split_tags(caption, weighted=ds.weighted_captions) if t not in run.trigger_words]
            caption = ", ".join([*run.trigger_words, *rest])
        return caption if ds.weighted_captions else unescape_caption(caption)

    def _encode(self, s: _Sample) -> Conditioning:
        run, ds = self.run, self.run.cfg.dataset
        return run.adapter.encode_text(
            [s.caption],
            clip_skip=run.clip_skip,
            max_token_length=ds.max_token_length,
            size_cond=s.size_cond,
            weighted_captions=ds.weighted_captions,
        )

    def due_at_epoch(self, epoch: int) -> bool:
        """Whether the end of ``epoch`` is measured: every ``validate_every_n_epochs`` epochs (every epoch when
        unset, as kohya) and every epoch that saves a file."""
        cfg = self.run.cfg
        every, save_every = cfg.validation.validate_every_n_epochs or 1, cfg.save.save_every_n_epochs
        return epoch % every == 0 or bool(save_every and epoch % save_every == 0)

    def run_at(self, result: Any, epoch: int) -> None:
        """Measure now (once per step), record it in ``result.val_losses`` and tell the callbacks."""
        run = self.run
        if self.points and self.points[-1].step == run.step:
            return
        run.callbacks.on_status(f"Validation loss at step {run.step}")
        point = self.evaluate(run.step, epoch)
        result.val_losses.append(point.to_dict())
        run.callbacks.on_validation(point.step, point.epoch, point.loss)

    def evaluate(self, step: int, epoch: int) -> ValPoint:
        """The validation loss now (network in eval mode, no autograd, the random state left as it was)."""
        run = self.run
        network = run.network
        was_training = network.training
        network.eval()
        devices = [run.device] if run.device.type == "cuda" else []
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                losses = [self._loss(s, t) for s in self.samples for t in self.timesteps]
        finally:
            network.train(was_training)
        point = ValPoint(step, epoch, sum(losses) / len(losses))
        self.points.append(point)
        return point

    def _loss(self, s: _Sample, timestep: int) -> float:
        run, a = self.run, self.run.adapter
        latents, noise = s.latents.to(run.device), s.noise.to(run.device)
        timesteps = torch.full((latents.shape[0],), timestep, dtype=torch.long, device=run.device)
        noisy = objectives.add_noise(latents, noise, timesteps, run.alphas)
        with run.precision.autocast_context(run.device.type):
            cond = (s.cond if s.cond is not None else self._encode(s)).to(run.device)
            pred = a.predict(noisy.to(a.dtype), timesteps, cond.to(dtype=a.dtype))
        target = objectives.target_for(a.prediction_type, latents, noise, timesteps, run.alphas)
        weights = None
        gamma = run.cfg.training.min_snr_gamma
        if gamma:
            weights = objectives.min_snr_weight(timesteps, run.alphas, gamma, a.prediction_type == "v_prediction")
        return float(objectives.loss_per_sample(pred.float(), target, weights).mean())
