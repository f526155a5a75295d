"""The WebUI face of the trainer: the "LoRA Train" tab and the REST API.

* :mod:`lora_trainer.webui.api`: FastAPI router under ``/lora-train/v1`` over a ``JobManager``
  (imports neither gradio nor the WebUI's ``modules``, so it is tested without the WebUI).
* :mod:`lora_trainer.webui.ui`: the gradio tab (it and ``workshop_ui`` import gradio at import time).
* :mod:`lora_trainer.webui.workshop_ui`: the tab's Dataset workshop, its gradio layout and events;
  its handlers, report HTML and captioner choices are :mod:`~lora_trainer.webui.workshop_actions`,
  :mod:`~lora_trainer.webui.workshop_render` and :mod:`~lora_trainer.webui.workshop_captioners`
  (free of gradio).
* :mod:`lora_trainer.webui.fields` / :mod:`lora_trainer.webui.render`: the config field widgets and the
  status/report HTML, free of gradio.
* :mod:`lora_trainer.webui.runtime`: the process's one host and job manager, and the callbacks
  ``scripts/lora_train.py`` registers.
* :mod:`lora_trainer.webui.settings`: the "LoRA Train" Settings section's widgets (gradio and the
  backend imported inside ``register_settings``).

Importing this package imports nothing else: each of those is imported on its own.
"""
