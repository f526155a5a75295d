"""The kohya metadata of a training run (``TrainingInfo``), read off the loop's run state."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lora_trainer.data.scan import dataset_dirs_info, dataset_tag_frequency
from lora_trainer.files.kohya_metadata import TrainingInfo, optimizer_string
from lora_trainer.train.network_setup import block_network_args

if TYPE_CHECKING:
    from lora_trainer.train.loop import _Run


def _clip_skip(run: _Run) -> int | None:
    """``ss_clip_skip``: the config's clip skip as kohya writes it ("None" when unset). Unset here means
    the WebUI's own "Clip skip" setting (SD1/SD2), so a setting other than 1 is written as the
    value trained with, which is what a reader of the Lora card needs to reproduce it."""
    if run.cfg.training.clip_skip is not None:
        return run.cfg.training.clip_skip
    if run.adapter.family == "sdxl" or run.clip_skip == 1:
        return None
    return run.clip_skip


def _validation_info(run: _Run) -> dict:
    """The validation settings kohya writes (``ss_validation_*``) and the losses measured so far (ours)."""
    v = run.cfg.validation
    return {
        "validation_seed": v.validation_seed,
        "validation_split": v.validation_split,
        "max_validation_steps": v.max_validation_steps,
        "validate_every_n_epochs": v.validate_every_n_epochs,
        "validate_every_n_steps": v.validate_every_n_steps,
        "val_losses": [p.to_dict() for p in run.validator.points] if run.validator else None,
    }


def training_info(run: _Run, epoch: int, stopped_early: bool) -> TrainingInfo:
    """The run's kohya metadata (``ss_*``) at ``epoch``."""
    cfg, a = run.cfg, run.adapter
    ds, net, opt, tr = cfg.dataset, cfg.network, cfg.optim, cfg.training
    comment = cfg.save.training_comment
    if comment is None and run.trigger_words:
        comment = "trigger words: " + ", ".join(run.trigger_words)
    report = run.dataset.bucket_report
    return TrainingInfo(
        family=a.family,
        output_name=cfg.save.output_name,
        v_prediction=a.prediction_type == "v_prediction",
        network_dim=net.network_dim,
        network_alpha=net.network_alpha,
        conv_dim=net.conv_dim or None,
        conv_alpha=net.conv_alpha if net.conv_dim else None,
        network_dropout=net.network_dropout or None,
        rank_dropout=net.rank_dropout or None,
        module_dropout=net.module_dropout or None,
        network_module=net.network_module,
        lycoris_args=net.lycoris_args,
        block_args=block_network_args(net),
        resolution=ds.resolution_wh,
        num_train_images=run.dataset.num_train_images,
        num_validation_images=len(run.validator.items) if run.validator else 0,
        **_validation_info(run),
        num_batches_per_epoch=len(run.dataset),
        tag_frequency=dataset_tag_frequency(run.items),
        dataset_dirs=dataset_dirs_info(run.items),
        bucket_info=report.to_metadata() if report is not None else None,
        enable_bucket=ds.enable_bucket,
        bucket_no_upscale=ds.bucket_no_upscale,
        min_bucket_reso=ds.min_bucket_reso,
        max_bucket_reso=ds.max_bucket_reso,
        shuffle_caption=ds.shuffle_caption,
        keep_tokens=ds.keep_tokens,
        caption_dropout_rate=ds.caption_dropout_rate,
        caption_dropout_every_n_epochs=ds.caption_dropout_every_n_epochs,
        caption_tag_dropout_rate=ds.caption_tag_dropout_rate,
        flip_aug=ds.flip_aug,
        cache_latents=ds.cache_latents,
        max_train_steps=run.total_steps,
        num_epochs=run.total_epochs,
        steps=run.step,
        epoch=epoch,
        learning_rate=opt.learning_rate,
        # kohya writes the arguments as given: "None" when unset (learning_rate applies then)
        unet_lr=opt.unet_lr,
        text_encoder_lr=opt.text_encoder_lr,
        optimizer=optimizer_string(run.optimizer, opt.optimizer_args),
        lr_scheduler=opt.lr_scheduler,
        lr_warmup_steps=opt.lr_warmup_steps,
        batch_size=tr.train_batch_size,
        num_processes=run.parallel.world_size,
        gradient_accumulation_steps=tr.gradient_accumulation_steps,
        gradient_checkpointing=tr.gradient_checkpointing,
        max_grad_norm=opt.max_grad_norm,
        mixed_precision=run.precision.name,
        seed=run.seed,
        clip_skip=_clip_skip(run),
        max_token_length=ds.max_token_length,
        noise_offset=tr.noise_offset or None,
        min_snr_gamma=tr.min_snr_gamma or None,
        training_comment=comment,
        sd_model_name=a.model_name or None,
        new_sd_model_hash=a.model_hash or None,
        sd_model_hash=getattr(a, "model_legacy_hash", "") or None,
        vae_name=a.vae_name or None,
        session_id=run.session_id,
        training_started_at=run.started_at,
        stopped_early=stopped_early,
        title=cfg.save.metadata_title,
        author=cfg.save.metadata_author,
        description=cfg.save.metadata_description,
        tags=cfg.save.metadata_tags,
    )
