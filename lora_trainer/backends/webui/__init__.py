"""The AUTOMATIC1111 WebUI (v1.10.x) as the trainer's host: the only package that imports the
WebUI (``modules.*``) and its builtin Lora extension (``networks``, from ``extensions-builtin/Lora``).

Importing this package imports nothing; each module is imported on its own, once the WebUI runs:

* :mod:`~lora_trainer.backends.webui.options`: our settings' keys and defaults read through
  ``shared.opts``, adding option entries to our Settings section, the data dir (work folder),
  the Lora folder and the API switches.
* :mod:`~lora_trainer.backends.webui.model`: the loaded ``shared.sd_model`` as a
  :class:`~lora_trainer.contracts.ModelAdapter` (``WebUIAdapter``, ``detect_model``).
* :mod:`~lora_trainer.backends.webui.guard`: taking active Lora networks off and putting back
  everything a run might disturb on the model.
* :mod:`~lora_trainer.backends.webui.host`: ``WebUIHost``, the :class:`~lora_trainer.contracts.Host`
  the JobManager runs on (queue lock, ``shared.state`` progress, previews, Lora files).
* :mod:`~lora_trainer.backends.webui.captioners`: the WebUI's DeepBooru and BLIP for the workshop.

The gradio widgets of the settings section live in :mod:`lora_trainer.webui.settings` (the UI
layer): nothing here imports gradio or :mod:`lora_trainer.webui`.

What the WebUI does that matters here (read in its v1.10.1 source):

* ``modules/call_queue.py``: ``queue_lock`` (a FIFO lock) is held by every UI generation
  (``wrap_gradio_gpu_call``) and API generation (``modules/api/api.py``), which then call
  ``shared.state.begin()``; so our run holds it and ends its ``shared.state`` job before
  letting go of it.
* ``extensions-builtin/Lora/networks.py`` patches ``forward`` of Linear/Conv2d/GroupNorm/
  LayerNorm/MultiheadAttention; a generation with ``<lora:...>`` merges deltas into the base
  weights and leaves ``loaded_networks`` populated. A session takes them off first the way
  the WebUI itself does (``load_networks([])``, then ``network_apply_weights`` restores each
  layer from ``network_weights_backup``); the next generation re-applies whatever its prompt asks.
* SDXL: ``GeneralConditioner`` runs an embedder under ``torch.no_grad()`` unless its
  ``is_trainable`` is set, and ``sd_models_xl.get_learned_conditioning`` fixes the size
  conditioning at the generation size, so ``WebUIAdapter`` builds the conditioner batch
  itself with ``is_trainable`` on for the two text embedders.
* SD2: the ldm OpenCLIP embedder ignores the WebUI's clip skip option (it stops
  ``layer_idx`` blocks early, 1 = penultimate), so a configured clip skip sets ``layer_idx``.
* ``processing.process_images`` may reload the checkpoint named in the settings and caches
  conditionings across calls (``StableDiffusionProcessing.cached_c``); samples pin the
  loaded checkpoint and clear that cache before and after.
"""
