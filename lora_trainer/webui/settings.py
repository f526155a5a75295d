"""The "LoRA Train" section of the WebUI's Settings tab: labels and widgets of our settings.

:func:`register_settings` runs from ``script_callbacks.on_ui_settings``. The settings' keys,
defaults and the ``shared.opts`` entries belong to the backend
(:mod:`lora_trainer.backends.webui.options`); this module adds the gradio side (which widget,
with which choices). Both gradio and the backend are imported inside the call: the WebUI is
running by then, and importing this module needs neither.
"""

from __future__ import annotations

from lora_trainer.config import list_presets

__all__ = ["register_settings"]


def register_settings() -> None:
    """Add the "LoRA Train" settings section (call from ``script_callbacks.on_ui_settings``)."""
    import gradio as gr

    from lora_trainer.backends.webui import options

    preset_dir = options.default_work_dir() / "presets"
    options.add_option(
        options.OPT_SUBFOLDER,
        "Save trained LoRAs in this subfolder of the Lora folder",
        info="empty = the Lora folder itself; e.g. 'trained'",
    )
    options.add_option(
        options.OPT_PRESET,
        "Preset the training tab starts with",
        gr.Dropdown,
        lambda: {"choices": ["", *list_presets(preset_dir)]},
        info="empty = the built-in defaults",
    )
    options.add_option(
        options.OPT_SAMPLER,
        "Default sampler for training previews",
        gr.Dropdown,
        lambda: {"choices": options.sampler_names()},
    )
    options.add_option(
        options.OPT_STEPS, "Default steps for training previews", gr.Slider, {"minimum": 1, "maximum": 150, "step": 1}
    )
    options.add_option(
        options.OPT_ANY_OUTPUT_DIR,
        "Allow training runs to write LoRAs outside the Lora folder",
        gr.Checkbox,
        info="off = save.output_dir must be inside the Lora folder (the tab and the API); "
        "on = any folder the WebUI can write, also for API clients",
    )
