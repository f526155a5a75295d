"""sd-webui-lora-train: kohya-compatible LoRA training inside the AUTOMATIC1111 WebUI.

The package core (everything except :mod:`lora_trainer.backends.webui` and
:mod:`lora_trainer.webui`) is plain torch: it never imports the WebUI's
``modules`` nor gradio, so it runs and is tested on a CPU with tiny models.
"""

__version__ = "0.1.0"
