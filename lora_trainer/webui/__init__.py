"""The WebUI face of the trainer: the "LoRA Train" tab and the REST API.

* :mod:`lora_trainer.webui.api`: FastAPI router under ``/lora-train/v1`` over a ``JobManager``
  (imports neither gradio nor the WebUI's ``modules``, so it is tested without the WebUI).
* :mod:`lora_trainer.webui.ui`: the gradio tab (the only module here that imports gradio).
* :mod:`lora_trainer.webui.runtime`: the process's one host and job manager, and the callbacks
  ``scripts/lora_train.py`` registers.

Importing this package imports nothing else: each of those is imported on its own.
"""
