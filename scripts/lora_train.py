"""sd-webui-lora-train's WebUI entry: registers the tab, the settings and the REST API, nothing else.

Everything else lives in the ``lora_trainer`` package beside this folder (the WebUI puts the
extension's folder on ``sys.path`` while it loads this file; the package keeps its own path).
"""

from modules import script_callbacks

from lora_trainer.webui import runtime as lora_train_runtime

script_callbacks.on_ui_tabs(lora_train_runtime.on_ui_tabs)
script_callbacks.on_ui_settings(lora_train_runtime.on_ui_settings)
script_callbacks.on_app_started(lora_train_runtime.on_app_started)
