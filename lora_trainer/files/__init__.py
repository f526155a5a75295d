"""Files on disk: LoRA ``.safetensors`` files, their kohya metadata and hashes, resume state.

One module per concern; import from the module that owns a name:

* :mod:`lora_trainer.files.kohya_metadata`: :class:`TrainingInfo` -> kohya's ``ss_*`` and ``modelspec.*`` keys.
* :mod:`lora_trainer.files.hashes`: ``sshs_model_hash`` / ``sshs_legacy_hash`` and plain file hashes.
* :mod:`lora_trainer.files.safetensors_format`: reading and validating a safetensors header (pickles
  refused), preparing tensors and rewriting the header for a write.
* :mod:`lora_trainer.files.atomic_write`: atomic, never-clobbering file writes.
* :mod:`lora_trainer.files.lora_file`: :func:`load_lora` / :func:`save_lora` and what a LoRA key is.
* :mod:`lora_trainer.files.resume_state`: resume state (optimizer, scheduler, RNG) as safetensors + JSON.
* :mod:`lora_trainer.files.inspection`: the report of ``python -m lora_trainer inspect FILE``.
"""
