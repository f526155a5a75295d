"""The training loop: one readable function over a model adapter.

``train(cfg, adapter, callbacks)`` validates the config, scans the dataset, builds the
LoRA network on the adapter's modules, then runs kohya's recipe (noise, timesteps,
epsilon or v target, optional noise offset and min-SNR weighting, gradient
accumulation and clipping, mixed precision) and writes the LoRA file with kohya's
keys and metadata. The base model is frozen for the run and left exactly as found.

Precision and the non-finite guard (:mod:`lora_trainer.train.guards`, the same code on a CPU
and a GPU): a model held in fp16/bf16 runs under autocast to its own dtype, an fp32 one under the
``mixed_precision`` setting's; a GradScaler (on the model's device type, the CPU included) scales
the loss whenever fp16 is involved (fp16 weights or fp16 autocast), never for bf16 or fp32. The
LoRA weights, gradients and optimizer state are float32 whatever the model's dtype. Latents are
checked when encoded (cached or not): NaN/inf ones are encoded again with the VAE in float32,
and an image still not finite stops the run (DatasetError naming it). A step with a NaN/inf loss
or gradient is skipped and counted (``StepInfo.skipped_steps``); too many in a row stop the run
(NonFiniteError) and no file with NaN/inf weights is ever written.

Randomness is derived from the seed and the batch's position (epoch, batch index), and
the data order from (seed, epoch), so a run resumed from its saved state continues
exactly as the uninterrupted run would have. Latent caching and previews (the WebUI's VAE samples
with torch's global generator, its previews seed it) run on forked generators; a resumed run caches
its latents from the seed, as the uninterrupted run did, and only then takes the saved generator
state for the steps.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import random
import time
from pathlib import Path

import torch

from lora_trainer import __version__
from lora_trainer.config import TrainConfig
from lora_trainer.contracts import FAMILIES, Conditioning, ModelAdapter, SizeCond, placement
from lora_trainer.data.buckets import BucketSettings
from lora_trainer.data.cache import LatentCache, encode_finite
from lora_trainer.data.captions import process_caption, split_tags, unescape_caption
from lora_trainer.data.dataset import TrainDataset
from lora_trainer.data.scan import scan_dataset
from lora_trainer.errors import ConfigError, IncompatibleModelError
from lora_trainer.files.kohya_metadata import build_metadata
from lora_trainer.files.lora_file import save_lora
from lora_trainer.files.resume_state import save_state
from lora_trainer.naming import find_targets
from lora_trainer.networks.network import LoRANetwork
from lora_trainer.train import objectives
from lora_trainer.train.callbacks import Callbacks, ProgressMeter, TrainResult
from lora_trainer.train.cpu_conv import direct_small_convs
from lora_trainer.train.guard import checkpointed, frozen_base, unet_blocks
from lora_trainer.train.guards import LOSS_SKIP, SCALE_FLOOR, StepGuard, grads_finite, precision_plan
from lora_trainer.train.network_setup import block_plan_for, network_groups, rank_alpha_for
from lora_trainer.train.oom import oom_phase, train_steps
from lora_trainer.train.optim import build_optimizer, build_scheduler, current_lrs
from lora_trainer.train.parallel import ListeningCallbacks, Parallel, single_process
from lora_trainer.train.phases import TextOutputCache, cache_text_outputs, step_parts
from lora_trainer.train.resume import config_hash, load_resume_state, shaping_settings, state_dir_for
from lora_trainer.train.run_info import training_info
from lora_trainer.train.validation import Validator, split_for_run

TE_GROUPS = ("te", "te1", "te2")


def train(
    cfg: TrainConfig,
    adapter: ModelAdapter,
    callbacks: Callbacks | None = None,
    *,
    work_dir: str | os.PathLike,
    resume: bool = False,
    parallel: Parallel | None = None,
) -> TrainResult:
    """Train a LoRA on ``adapter``'s model as ``cfg`` says; returns where it went.

    ``work_dir``: latent caches and resume states (the host's ``work_dir``; the loop has no folder of its own).
    ``resume``: continue from the state saved under ``work_dir`` for ``cfg.save.output_name``
    (written when ``save.save_state`` is on, and always when a run is stopped).
    ``parallel``: data parallel training (:mod:`lora_trainer.train.parallel`); each of the processes calls
    ``train`` with the same settings. The batch size is per process: N processes with batch B train as one
    process with batch N*B (the same batches, captions, noise and timesteps; the gradients are summed
    across the processes before each step). Only the main process reports to ``callbacks`` (the others'
    only ``should_stop`` is asked) and writes files (the LoRA, resume states, the disk latent cache; the
    others' result names the files it writes; they return once it has). Validation runs on every process (the
    same numbers, no exchange). Random numbers that are not the batch's own (network dropout, the VAE's
    sampling of uncached latents) are drawn per process: equal in distribution, not in value.
    Raises ConfigError / DatasetError / IncompatibleModelError before touching the model.
    """
    cfg.validate()
    work_dir = Path(work_dir)
    resume_state = load_resume_state(cfg, adapter.family, work_dir) if resume else None
    seed = resume_state[1]["seed"] if resume_state else cfg.training.seed
    run = _Run(cfg, adapter, callbacks or Callbacks(), work_dir, seed, parallel or single_process())
    result = run.execute(resume_state)
    run.parallel.barrier()  # every process returns once the main one has written the files
    return result


class _Run:
    def __init__(
        self,
        cfg: TrainConfig,
        adapter: ModelAdapter,
        callbacks: Callbacks,
        work_dir: Path,
        seed: int | None,
        parallel: Parallel | None = None,
    ):
        if adapter.family not in FAMILIES:
            raise IncompatibleModelError(f"model family {adapter.family!r} is not supported (only {FAMILIES})")
        if not cfg.save.output_dir:
            raise ConfigError("save.output_dir", "no output folder set: name the folder the LoRA is written to")
        self.parallel = parallel = parallel or single_process()
        if not parallel.is_main:
            callbacks = ListeningCallbacks(callbacks)
        self.cfg, self.adapter, self.callbacks, self.work_dir = cfg, adapter, callbacks, work_dir
        self.output_dir = Path(cfg.save.output_dir)
        self.state_dir = state_dir_for(work_dir, cfg.save.output_name)
        self.device = adapter.device
        self.seed = int(seed) if seed is not None else random.randint(0, 2**31 - 1)
        if parallel.distributed:  # every process trains from the main one's seed
            self.seed = int(parallel.sum([self.seed if parallel.is_main else 0])[0])
        self.session_id = random.randint(0, 2**32)
        self.started_at = time.time()
        self.step = 0
        self.position = (1, 0)  # (epoch, next batch index) the run continues from
        self.resumed_file: Path | None = None  # the file a stopped run wrote, when resuming it

        ds = cfg.dataset
        found = scan_dataset(ds.train_data_dir, ds.caption_extension, flat_repeats=ds.dataset_repeats)
        self.items, val_items = split_for_run(cfg, found, self.seed)  # held-out images are never trained
        buckets = BucketSettings(
            resolution=ds.resolution_wh,
            enable_bucket=ds.enable_bucket,
            min_bucket_reso=ds.min_bucket_reso,
            max_bucket_reso=ds.max_bucket_reso,
            bucket_reso_steps=ds.bucket_reso_steps,
            bucket_no_upscale=ds.bucket_no_upscale,
        )
        self.dataset = TrainDataset(
            self.items,
            buckets,
            batch_size=cfg.training.train_batch_size * parallel.world_size,  # the batch of all processes
            flip_aug=ds.flip_aug,
            seed=self.seed,
        )
        accum = cfg.training.gradient_accumulation_steps
        self.steps_per_epoch = math.ceil(len(self.dataset) / accum)
        if cfg.training.max_train_steps:
            self.total_steps = cfg.training.max_train_steps
        else:
            self.total_steps = cfg.training.max_train_epochs * self.steps_per_epoch
        self.total_epochs = math.ceil(self.total_steps / self.steps_per_epoch)

        self.precision = precision_plan(adapter.dtype, cfg.training.mixed_precision)
        self.scaler = self.precision.make_scaler(self.device.type)
        self.guard = StepGuard()
        self.upcast_latents = 0  # images re-encoded with the VAE in float32 (cached and uncached)
        self.trigger_words = [w.strip() for w in ds.trigger_words if w.strip()]
        self.cache_text = not cfg.network.train_text_encoder and not (
            ds.shuffle_caption
            or ds.caption_dropout_rate
            or ds.caption_tag_dropout_rate
            or ds.caption_dropout_every_n_epochs
        )
        self._text_cache: dict = {}
        self.step_parts = step_parts(cfg)  # on the device for the steps (contracts.placement)
        self.text_outputs: TextOutputCache | None = None  # cache_text_encoder_outputs, filled before the steps
        self.alphas = adapter.alphas_cumprod.to(self.device, torch.float32)
        self.clip_skip = cfg.training.clip_skip or getattr(adapter, "default_clip_skip", 1)
        self.validator = Validator(self, val_items, buckets, self.seed) if val_items else None

    # -- setup

    def _build_network(self) -> None:
        cfg, net = self.cfg, self.cfg.network
        a = self.adapter
        plan = block_plan_for(net, a.family)  # kohya's per-block ranks and lr weights, if set
        targets = find_targets(
            a.family,
            a.unet if net.train_unet else None,
            a.text_encoders if net.train_text_encoder else None,
            conv=net.conv_dim > 0 or bool(plan and plan.conv_dims),
        )
        self.network = LoRANetwork(
            targets,
            rank=net.network_dim,
            alpha=net.network_alpha,
            conv_rank=net.conv_dim,
            conv_alpha=net.conv_alpha,
            dropout=net.network_dropout,
            rank_dropout=net.rank_dropout,
            module_dropout=net.module_dropout,
            algorithm=net.algorithm,
            algorithm_args=net.algorithm_args,
            rank_alpha=rank_alpha_for(plan),
        )
        lrs = (cfg.optim.resolved_unet_lr, cfg.optim.resolved_text_encoder_lr, cfg.optim.learning_rate)
        groups = network_groups(self.network, net, plan, *lrs)
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = build_optimizer(
            cfg.optim.optimizer_type, groups, cfg.optim.learning_rate, cfg.optim.optimizer_args
        )
        self.scheduler = build_scheduler(
            cfg.optim.lr_scheduler,
            self.optimizer,
            num_training_steps=self.total_steps,
            num_warmup_steps=cfg.optim.lr_warmup_steps,
            num_cycles=cfg.optim.lr_scheduler_num_cycles,
            power=cfg.optim.lr_scheduler_power,
        )

    def _cache_latents(self) -> None:
        ds = self.cfg.dataset
        if not ds.cache_latents:
            return
        cache = LatentCache(self.work_dir / "latents" if ds.cache_latents_to_disk else None)

        def progress(done: int, total: int) -> None:
            self.callbacks.on_status(f"Caching latents {done}/{total}")

        # The WebUI's VAE samples the latent distribution with the global generator: encoding on a forked
        # one leaves the steps' random numbers the same whether the latents were encoded or read from disk.
        def fill() -> None:
            with placement(self.adapter, ("vae",)), self._forked_rng():
                self.dataset.cache_latents(
                    cache,
                    self.adapter.encode_images,
                    vae_id=self._vae_id(),
                    progress=progress,
                    upcast_fn=self._upcast_fn(),
                )
            self.upcast_latents += cache.stats["upcast"]

        par = self.parallel
        if not (par.distributed and ds.cache_latents_to_disk):
            fill()  # each process encodes into its own memory
            return
        if par.is_main:  # the main process encodes and writes the disk cache; the others then read it
            fill()
        par.barrier()
        if not par.is_main:
            fill()

    def _cache_text_outputs(self) -> None:
        """kohya's cache_text_encoder_outputs (``train.phases``): every caption encoded once, before the steps."""
        if self.cfg.dataset.cache_text_encoder_outputs:
            self.text_outputs = cache_text_outputs(
                self.adapter,
                self.dataset,
                caption=lambda c: self._caption(c, random.Random(0), 1),
                clip_skip=self.clip_skip,
                max_token_length=self.cfg.dataset.max_token_length,
                weighted_captions=self.cfg.dataset.weighted_captions,
                autocast=lambda: self.precision.autocast_context(self.device.type),
                status=self.callbacks.on_status,
            )

    def _upcast_fn(self):
        """The adapter's float32 VAE encode (optional in the ModelAdapter contract), or None."""
        return getattr(self.adapter, "encode_images_fp32", None)

    def _encode_batch(self, batch: dict) -> torch.Tensor:
        """Finite float32 latents of an uncached batch (see ``encode_finite``)."""
        names = [self.dataset.items[i].path for i in batch["indices"]]
        latents, again = encode_finite(batch["pixels"], self.adapter.encode_images, names, upcast_fn=self._upcast_fn())
        self.upcast_latents += again
        return latents

    def _vae_id(self) -> str:
        a = self.adapter
        return f"{a.family}/{a.model_hash or a.model_name}/{a.vae_name}"

    # -- one batch

    def _caption(self, caption: str, rng: random.Random, epoch: int) -> str:
        ds = self.cfg.dataset
        keep = ds.keep_tokens
        if self.trigger_words:
            rest = [t for t in split_tags(caption, weighted=ds.weighted_captions) if t not in self.trigger_words]
            caption = ", ".join([*self.trigger_words, *rest])
            keep = max(keep, len(self.trigger_words))
        every = ds.caption_dropout_every_n_epochs
        caption = process_caption(
            caption,
            rng,
            shuffle=ds.shuffle_caption,
            keep_tokens=keep,
            caption_dropout_rate=ds.caption_dropout_rate,
            caption_tag_dropout_rate=ds.caption_tag_dropout_rate,
            drop_caption_this_epoch=bool(every) and epoch % every == 0,
            weighted=ds.weighted_captions,
        )
        # literal captions (kohya's default): the WebUI's escapes, e.g. DeepBooru's "\(", are the characters
        return caption if ds.weighted_captions else unescape_caption(caption)

    def _encode_text(self, captions: list[str], size_cond: list[SizeCond] | None) -> Conditioning:
        if self.text_outputs is not None:
            return self.text_outputs.batch(captions, size_cond)
        key = (tuple(captions), tuple(size_cond or ()))
        if self.cache_text and key in self._text_cache:
            return self._text_cache[key]
        with torch.set_grad_enabled(self.cfg.network.train_text_encoder):
            cond = self.adapter.encode_text(
                captions,
                clip_skip=self.clip_skip,
                max_token_length=self.cfg.dataset.max_token_length,
                size_cond=size_cond,
                weighted_captions=self.cfg.dataset.weighted_captions,
            )
        if self.cache_text:
            self._text_cache[key] = cond = cond.detach()
        return cond

    def _loss(self, batch: dict, epoch: int) -> torch.Tensor | None:
        """The batch's loss (the mean over its samples), or, with data parallel training, this process's
        part of it (its samples' sum over the whole batch's size; None for no samples). Captions, noise
        and timesteps are drawn for the whole batch, then this process's part is taken."""
        cfg, a = self.cfg, self.adapter
        seed = _derive(self.seed, epoch, batch["batch_index"])
        rng = random.Random(seed)
        gen = torch.Generator().manual_seed(seed)
        size = batch.get("batch_size")  # set for a part of a batch (data parallel)
        part = self.parallel.shard(size) if size is not None else slice(None)
        captions = [self._caption(c, rng, epoch) for c in batch.get("batch_captions", batch["captions"])][part]
        if not batch["indices"]:
            return None
        if "latents" in batch:
            latents = batch["latents"].to(self.device, torch.float32)
        else:
            latents = self._encode_batch(batch).to(self.device, torch.float32)
        size_cond = None
        if a.family == "sdxl":
            size_cond = [
                SizeCond(tuple(o), tuple(c), tuple(t))
                for o, c, t in zip(batch["original_sizes"], batch["crop_top_lefts"], batch["target_sizes"], strict=True)
            ]
        whole = latents if size is None else latents.new_empty((size, *latents.shape[1:]))
        noise = objectives.sample_noise(whole, gen, cfg.training.noise_offset)[part].to(self.device)
        timesteps = objectives.sample_timesteps(whole.shape[0], gen)[part].to(self.device)
        noisy = objectives.add_noise(latents, noise, timesteps, self.alphas)
        with self.precision.autocast_context(self.device.type):
            cond = self._encode_text(captions, size_cond).to(self.device)
            pred = a.predict(noisy.to(a.dtype), timesteps, cond.to(dtype=a.dtype))
        target = objectives.target_for(a.prediction_type, latents, noise, timesteps, self.alphas)
        weights = None
        if cfg.training.min_snr_gamma:
            weights = objectives.min_snr_weight(
                timesteps, self.alphas, cfg.training.min_snr_gamma, a.prediction_type == "v_prediction"
            )
        per_sample = objectives.loss_per_sample(pred.float(), target, weights)
        return per_sample.mean() if size is None else per_sample.sum() / size

    def _optimizer_step(self, loss_finite: bool) -> None:
        """One optimizer step from the accumulated gradients, or a skipped one (see ``guards``)."""
        step = self.step + 1
        try:
            if not loss_finite:
                self.guard.skip(step, LOSS_SKIP)
            elif self._apply_gradients(step):
                self.scheduler.step()
                self.guard.ok()
        finally:
            self._zero_grad()

    def _apply_gradients(self, step: int) -> bool:
        """Clip and apply the gradients (summed across the processes first, with data parallel training:
        ``Parallel.sum_gradients_``); False when the step was skipped for NaN/inf gradients."""
        self.parallel.sum_gradients_(self.params)
        max_norm = self.cfg.optim.max_grad_norm
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm) if max_norm else None
        if self.scaler is None:
            # clipping already measured the total norm: NaN/inf there means NaN/inf gradients
            finite = bool(torch.isfinite(norm)) if norm is not None else grads_finite(self.params)
            if not finite:
                self.guard.skip(step, "NaN/inf gradients")
                return False
            self.optimizer.step()
            return True
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)  # skips the step itself when the gradients hold NaN/inf
        self.scaler.update()
        new_scale = self.scaler.get_scale()
        if new_scale >= scale:
            return True
        what = f"NaN/inf gradients (loss scale lowered to {new_scale:g})"
        self.guard.skip(step, what, counts=new_scale < SCALE_FLOOR)
        return False

    def _zero_grad(self) -> None:
        # set_to_none, as torch does: a parameter that gets no gradient next step (module dropout,
        # a layer clip skip leaves unused) is skipped by the optimizer, not moved by a zero gradient
        self.optimizer.zero_grad(set_to_none=True)

    # -- run

    def execute(self, resume_state: tuple | None) -> TrainResult:
        a = self.adapter
        modules = [a.unet, *a.text_encoders.values()]
        result = TrainResult(None, 0, 0, False, None, seed=self.seed)
        with self._forked_rng(), frozen_base(*modules):
            torch.manual_seed(self.seed)
            with placement(a, self.step_parts):  # the network is made where it trains (its targets' device)
                self._build_network()
            if resume_state is not None:
                self._restore(result, *resume_state)
            with oom_phase("latent caching"):
                self._cache_latents()
                self._cache_text_outputs()
                if self.validator:
                    self.validator.prepare()
            if resume_state is not None:
                # after the caching: the VAE samples its latents with the global generator (the WebUI's
                # encode), so the cache is built from the seed as in the uninterrupted run, and the steps
                # continue from the generator state the stopped run left
                self._restore_rng(resume_state[0])
            gc = checkpointed(unet_blocks(a.unet)) if self.cfg.training.gradient_checkpointing else None
            convs = direct_small_convs(a.unet)  # entered after placement: on the device the weights train on
            with placement(a, self.step_parts), self.network.applied(), gc or contextlib.nullcontext(), convs:
                self.network.train()
                train_steps(self, result)  # out of memory: keeps what was trained, says so (train/oom.py)
        return result

    def _loop(self, result: TrainResult) -> None:
        cfg = self.cfg
        self.meter = ProgressMeter(self.total_steps)
        self.callbacks.on_start(self.total_steps, self.total_epochs)
        epoch, first_batch = self.position
        while self.step < self.total_steps and self._run_epoch(result, epoch, first_batch):
            if self.validator and self.validator.due_at_epoch(epoch):
                self.validator.run_at(result, epoch)
            if _every(cfg.save.save_every_n_epochs, epoch):
                self._save(result, f"{cfg.save.output_name}-{epoch:06d}", epoch)
            if _every(cfg.sample.sample_every_n_epochs, epoch):
                self._sample(epoch)
            epoch, first_batch = epoch + 1, 0
        result.steps, result.epochs = self.step, min(epoch, self.total_epochs)
        if self.step == 0:
            return
        self.guard.require_progress(self.step)
        if self.validator:
            self.validator.run_at(result, result.epochs)
        result.output_path = self._save(result, cfg.save.output_name, result.epochs, final=True)
        if cfg.save.save_state or result.stopped_early:
            result.state_dir = self._save_state(result)

    def _run_epoch(self, result: TrainResult, epoch: int, first_batch: int) -> bool:
        """Train on one epoch's batches from ``first_batch`` on; False if stopped or all steps are done."""
        cfg = self.cfg
        accum = cfg.training.gradient_accumulation_steps
        last = len(self.dataset) - 1
        loss_sum, micro, finite = 0.0, 0, True
        par = self.parallel
        shard = par.shard if par.distributed else None
        for batch in self.dataset.iter_epoch(epoch, first_batch, shard):
            if par.any(self.callbacks.should_stop()):
                result.stopped_early = True
                self._zero_grad()  # drop a partial accumulation
                return False
            loss = self._loss(batch, epoch)
            value = loss.item() if loss is not None else 0.0
            if loss is not None and math.isfinite(value):  # a NaN/inf loss gets no backward: its step is skipped
                (self.scaler.scale(loss / accum) if self.scaler else loss / accum).backward()
            value = par.sum([value])[0]  # the whole batch's loss: NaN/inf on any process makes it so
            if not math.isfinite(value):
                finite = False
            loss_sum, micro = loss_sum + value, micro + 1
            if micro < accum and batch["batch_index"] < last:
                continue
            self._optimizer_step(finite)
            self.step += 1
            self.position = (epoch, batch["batch_index"] + 1)
            result.losses.append(loss_sum / micro if math.isfinite(loss_sum) else None)
            result.skipped_steps, result.upcast_latents = self.guard.skipped, self.upcast_latents
            lrs = current_lrs(self.optimizer)
            info = self.meter.update(self.step, epoch, self.total_epochs, loss_sum / micro, lrs, self.guard.skipped)
            self.callbacks.on_step(info)
            if self.validator and _every(cfg.validation.validate_every_n_steps, self.step):
                self.validator.run_at(result, epoch)
            loss_sum, micro, finite = 0.0, 0, True
            done = self.step >= self.total_steps
            if done and batch["batch_index"] == last and _every(cfg.sample.sample_every_n_epochs, epoch):
                self._sample(epoch)  # the last epoch's previews, like every other epoch's
            elif _every(cfg.sample.sample_every_n_steps, self.step):
                self._sample(epoch)
            if done:
                return False  # the final file is saved by the caller
            if _every(cfg.save.save_every_n_steps, self.step):
                self._save(result, f"{cfg.save.output_name}-step{self.step:08d}", epoch)
        return True

    def _sample(self, epoch: int) -> None:
        """A preview, on forked generators: the WebUI seeds the global one for each image (``rng.manual_seed``,
        a random seed when the preview's is -1), which must not change the steps' random numbers."""
        self.network.eval()
        try:
            with torch.no_grad(), oom_phase("a preview"), self._forked_rng():
                self.callbacks.on_sample(self.step, epoch)
        finally:
            self.network.train()

    # -- saving and resuming

    def _save(self, result: TrainResult, stem: str, epoch: int, final: bool = False) -> Path:
        target, overwrite = self.output_dir / f"{stem}.safetensors", self.cfg.save.overwrite
        if final and self.resumed_file is not None and self.resumed_file.parent == self.output_dir:
            target, overwrite = self.resumed_file, True  # a resumed run finishes the file it left
        if not self.parallel.is_main:
            return target  # the main process writes the file (the same weights)
        self.callbacks.on_status(f"Saving {stem}.safetensors")
        metadata = build_metadata(training_info(self, epoch, stopped_early=final and result.stopped_early))
        with oom_phase("saving"):
            path = save_lora(
                target, self.network.state_dict(), metadata, dtype=self.cfg.save.save_precision, overwrite=overwrite
            )
        result.saved.append(path)  # save_lora logs it when a taken name made it pick another
        self.callbacks.on_save(path, final)
        return path

    def _save_state(self, result: TrainResult) -> Path:
        epoch, next_batch = self.position
        if next_batch >= len(self.dataset):
            epoch, next_batch = epoch + 1, 0
        state = {
            "network": self.network.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
        }
        info = {
            "version": __version__,
            "family": self.adapter.family,
            "config_hash": config_hash(self.cfg),
            "settings": shaping_settings(self.cfg),
            "seed": self.seed,
            "step": self.step,
            "epoch": epoch,
            "next_batch": next_batch,
            "losses": result.losses,
            "val_losses": result.val_losses,
            "skipped_steps": self.guard.skipped,
            "output_file": str(result.output_path) if result.output_path else None,
        }
        if self.parallel.is_main:  # every process restores the main one's state
            save_state(self.state_dir, state, info=info)
        return self.state_dir

    def _restore(self, result: TrainResult, state: dict, info: dict) -> None:
        self.network.load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        result.losses.extend(info.get("losses", []))
        restored = [p for p in info.get("val_losses", []) if isinstance(p, dict)]
        result.val_losses.extend(restored)
        if self.validator:  # the file's metadata lists every measurement, the stopped run's included
            self.validator.restore(restored)
        self.guard.skipped = result.skipped_steps = int(info.get("skipped_steps", 0))
        self.resumed_file = Path(info["output_file"]) if info.get("output_file") else None
        self.step = int(info["step"])
        self.position = (int(info["epoch"]), int(info["next_batch"]))

    def _forked_rng(self) -> contextlib.AbstractContextManager:
        """torch's generators (and the run's CUDA one) as they are now, put back at the end of the block."""
        return torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])

    def _restore_rng(self, state: dict) -> None:
        """The random generators as the stopped run left them (set once everything before the steps is done)."""
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)


def _every(n: int | None, count: int) -> bool:
    """A periodic action (save, preview) is due at ``count`` when ``n`` is set and divides it."""
    return bool(n) and count % n == 0


def _derive(seed: int, *parts: int) -> int:
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
