"""The tab's "Export / import": the settings as TOML with the command line that trains them without the
WebUI, and a TOML read back into the form.

Layout (in the settings column, under the presets)::

    ▸ Export / import TOML
        [Export] [Load into the form]   message
        TOML (editable: paste one here, or upload a file)     [upload .toml]
        command line (python -m lora_trainer train ...)

Export writes the settings to ``<work folder>/exports/<output name>.toml`` (our TOML: kohya's
argument names, so it is also a kohya ``--config_file``) and shows the command that trains the same
LoRA on the checkpoint and VAE files the WebUI has loaded (``README``: "Train without the WebUI").
Load reads our TOML, kohya's, or the one the command line writes beside each LoRA; an unknown key is
named in the message and nothing changes; kohya settings this trainer does not use are listed.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

import gradio as gr

import lora_trainer
from lora_trainer.config.kohya_toml import parse_toml
from lora_trainer.contracts import Host, ModelInfo
from lora_trainer.errors import ConfigError, LoraTrainerError
from lora_trainer.files.atomic_write import atomic_write_bytes
from lora_trainer.webui import render
from lora_trainer.webui.fields import FIELDS, build_config, preset_values

__all__ = ["ExportActions", "export_section", "train_command"]

PACKAGE_ROOT = Path(lora_trainer.__file__).resolve().parent.parent
"""The folder ``python -m lora_trainer`` runs from (the extension's folder)."""


def _quote(value: str | Path) -> str:
    """A shell word for the user's platform (cmd.exe takes double quotes, not POSIX single quotes)."""
    text = str(value)
    if sys.platform == "win32":
        return f'"{text}"' if any(c in text for c in ' &()^%!"') else text
    return shlex.quote(text)


def train_command(config_path: str | Path, info: ModelInfo, *, root: str | Path = PACKAGE_ROOT) -> str:
    """``python -m lora_trainer train CONFIG --checkpoint FILE [--vae FILE] [--v-parameterization]``, run from
    ``root``; the checkpoint and VAE are the files the host has loaded (``ModelInfo``'s paths)."""
    words = ["python", "-m", "lora_trainer", "train", _quote(config_path)]
    words += ["--checkpoint", _quote(info.checkpoint_path or "MODEL.safetensors")]
    if info.vae_path:
        words += ["--vae", _quote(info.vae_path)]
    if info.prediction_type == "v_prediction":
        words.append("--v-parameterization")
    return f"cd {_quote(root)} && " + " ".join(words)


class ExportActions:
    """What the section's buttons do (no gradio objects but updates)."""

    def __init__(self, host: Host):
        self.host = host

    def export(self, *values: Any) -> list[Any]:
        """[message, TOML text, command line]: the settings written to the work folder's ``exports``."""
        cfg, errors = build_config(values)
        if cfg is None:
            return [render.errors_html(errors, "Cannot export these settings:"), gr.update(), gr.update()]
        text = cfg.to_toml()
        path = Path(self.host.work_dir) / "exports" / f"{cfg.save.output_name}.toml"
        try:
            atomic_write_bytes(path, text.encode("utf-8"), overwrite=True)
        except (OSError, LoraTrainerError) as exc:
            return [render.message_html(f"Cannot write {path}: {exc}"), text, ""]
        info = self.host.model_info()
        note = f" ({len(errors)} setting(s) still need fixing before training)" if errors else ""
        message = render.message_html(f"Wrote {path}{note}. The command trains it without the WebUI.", "info")
        return [message, text, train_command(path, info)]

    def load(self, text: str, *values: Any) -> list[Any]:
        """[message, *field values]: ``text`` read as our TOML or kohya's; on an error the fields stay."""
        keep = [gr.update()] * len(FIELDS)
        if not (text or "").strip():
            return [render.message_html("Paste a TOML or upload a .toml file first."), *keep]
        try:
            parsed = parse_toml(text, strict=True)
        except ConfigError as exc:
            return [render.message_html(f"Cannot load this TOML: {exc}"), *keep]
        current = dict(zip((s.path for s in FIELDS), values, strict=True))
        note = ""
        if parsed.ignored:
            note = " Not used by this trainer (ignored): " + ", ".join(sorted(parsed.ignored)) + "."
        return [
            render.message_html("Loaded the TOML into the settings." + note, "info"),
            *preset_values(parsed.config, current),
        ]

    @staticmethod
    def read_upload(data: bytes | None) -> str | Any:
        """An uploaded file's text, for the TOML box."""
        if not data:
            return gr.update()
        return data.decode("utf-8", errors="replace")


def export_section(host: Host, fields: list[gr.components.Component]) -> ExportActions:
    """The accordion and its events; ``fields`` are the settings' components in ``FIELDS`` order."""
    actions = ExportActions(host)
    with gr.Accordion("Export / import TOML", open=False, elem_id="lora_train_export"):
        with gr.Row():
            export_btn = gr.Button("Export", elem_id="lora_train_export_button", scale=0, min_width=120)
            load_btn = gr.Button("Load into the form", elem_id="lora_train_import_button", scale=0, min_width=160)
            message = gr.HTML("", elem_id="lora_train_export_message")
        toml_box = gr.Textbox(
            label="TOML (kohya's argument names; paste one here to load it)",
            lines=12,
            max_lines=40,
            elem_id="lora_train_export_toml",
            show_copy_button=True,
        )
        upload = gr.File(
            label="Or upload a .toml", file_types=[".toml"], type="binary", elem_id="lora_train_import_file"
        )
        command = gr.Textbox(
            label="Train it without the WebUI (needs the package's train extra, see the README)",
            lines=2,
            interactive=False,
            elem_id="lora_train_export_command",
            show_copy_button=True,
        )
    export_btn.click(actions.export, inputs=fields, outputs=[message, toml_box, command], api_name=False)
    load_btn.click(actions.load, inputs=[toml_box, *fields], outputs=[message, *fields], api_name=False)
    upload.upload(actions.read_upload, inputs=[upload], outputs=[toml_box], api_name=False).then(
        actions.load, inputs=[toml_box, *fields], outputs=[message, *fields], api_name=False
    )
    return actions
