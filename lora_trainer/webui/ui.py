"""The "LoRA Train" tab (gradio 3.41, as in WebUI v1.10.x). No training logic lives here.

Layout (``create_tab``)::

    model line: checkpoint · VAE · family (red when the model cannot be trained)
    ┌ settings ─────────────────────────────────┐ ┌ Run ──────────────────────────┐
    │ Preset ▾   Save settings as preset [Save] │ │ [Start] [Resume] [Stop]       │
    │ Dataset | Network & optimizer | Training  │ │ message (red: what to fix)    │
    │   | Save & samples  (+ Dataset workshop)  │ │ status: state, phase, steps   │
    │ one component per fields.FIELDS row       │ │ loss plot (inline SVG)        │
    │ ▸ Export / import TOML (export_ui)        │ │ preview images                │
    └───────────────────────────────────────────┘ │ [Send to txt2img]             │
                                                   └───────────────────────────────┘

The components are generated from ``fields.FIELDS`` (``_field_component``); Start reads them all,
builds a ``TrainConfig`` with ``fields.build_config`` and shows every ``ConfigError`` by field, or
calls ``JobManager.start``. What the Run column shows comes from the manager alone
(``current()``/``latest()``), polled once a second by a ``load(..., every=1)`` event (the WebUI
runs gradio's queue), so a reloaded page reconnects to a running job; ``restore_fields`` fills
the settings from that job once on load.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import gradio as gr

from lora_trainer.config import PRESETS, get_preset, list_presets, save_preset
from lora_trainer.contracts import Host, ModelInfo
from lora_trainer.errors import ConfigError, LoraTrainerError
from lora_trainer.jobs import JobManager
from lora_trainer.log import logger, warning_once
from lora_trainer.webui import render
from lora_trainer.webui.export_ui import export_section
from lora_trainer.webui.fields import (
    FIELDS,
    GROUP_LABELS,
    SECTIONS,
    WIDE,
    FieldSpec,
    Section,
    build_config,
    elem_id,
    lora_prompt,
    preset_values,
    section_fields,
    short_help,
    to_widget,
    widget_values,
)
from lora_trainer.webui.results_ui import results_section
from lora_trainer.webui.tryout_ui import tryout_section

TAB_TITLE = "LoRA Train"
TAB_ID = "lora_train"  # the WebUI gives the tab elem_id "tab_lora_train"
ROW_SIZE = 3  # narrow fields per row
RESYNC_EVERY = 5  # polls between full refreshes of the run panel
POLL_OUTPUTS = 9  # model line, status, plot, previews, start, resume, stop, send, send text

WorkshopHook = Callable[[gr.Textbox], object]
"""Builds the dataset workshop UI inside its tab; gets the images-folder textbox to read and fill."""

StartValues = Callable[[], tuple[str | None, dict[str, Any]]]
"""What a page shows on load when no job has run: (preset to select or None, {dotted path: value})
for the settings to set (JSON form, as ``TrainConfig.to_flat()``); the others keep their values."""


def create_tab(
    manager: JobManager,
    host: Host,
    *,
    preset_dir: str | Path | None = None,
    workshop: WorkshopHook | None = None,
    start_values: StartValues | None = None,
    poll_every: float = 1.0,
) -> gr.Blocks:
    """The whole tab as a ``gr.Blocks``; render it into the WebUI (``on_ui_tabs``) or a test app.

    ``preset_dir``: where user presets are read and saved (default: ``host.work_dir/presets``).
    ``workshop``: the dataset workshop's UI builder, shown as a tab after "Dataset" when given.
    ``start_values``: the settings a fresh page starts with (the WebUI's "LoRA Train" settings).
    """
    preset_dir = Path(preset_dir) if preset_dir is not None else Path(host.work_dir) / "presets"
    actions = _Actions(manager, host, preset_dir, start_values)

    with gr.Blocks(analytics_enabled=False) as tab:
        poll_state = gr.State({})
        live = ["lora_train_live"]  # updated by the poll: no progress overlay (style.css)
        model_info = gr.HTML(
            render.model_html(actions.model_info()), elem_id="lora_train_model_info", elem_classes=live
        )

        with gr.Row(equal_height=False, elem_id="lora_train_main"):
            with gr.Column(scale=3, elem_id="lora_train_settings"):
                with gr.Row(elem_id="lora_train_presets", equal_height=False):
                    preset = gr.Dropdown(
                        list_presets(preset_dir),
                        value=None,
                        label="Preset",
                        elem_id="lora_train_preset",
                        info="Fills the settings; your images folder and file name stay unless the preset sets them.",
                        scale=2,
                    )
                    preset_name = gr.Textbox(
                        label="Save settings as preset",
                        placeholder="my-preset",
                        elem_id="lora_train_preset_name",
                        info="Lowercase letters, digits, - and _.",
                        scale=2,
                    )
                    save_preset_btn = gr.Button("Save preset", elem_id="lora_train_save_preset", scale=0, min_width=140)
                preset_info = gr.HTML("", elem_id="lora_train_preset_info")

                components: dict[str, gr.components.Component] = {}
                with gr.Tabs(elem_id="lora_train_sections"):
                    for section in SECTIONS:
                        with gr.Tab(section.title, elem_id=f"lora_train_section_{section.key}"):
                            components.update(_section(section))
                        if section.key == "dataset" and workshop is not None:
                            # ── Dataset workshop ─────────────────────────────────────────────
                            # The workshop's own UI (lora_trainer/workshop) plugs in here. It gets
                            # the images-folder textbox so it can read it and point it at what it
                            # prepares. Keep training settings out of it: they are the fields.
                            with gr.Tab("Dataset workshop", elem_id="lora_train_section_workshop"):
                                workshop(cast(gr.Textbox, components["dataset.train_data_dir"]))
                tab.lora_train_export = export_section(host, [components[spec.path] for spec in FIELDS])  # pyright: ignore[reportAttributeAccessIssue]

            with gr.Column(scale=2, elem_id="lora_train_run"):
                gr.HTML('<div class="lora_train_run_title">Run</div>' + _help_json())
                with gr.Row(elem_id="lora_train_buttons"):
                    start = gr.Button("Start", variant="primary", elem_id="lora_train_start")
                    resume = gr.Button("Resume", elem_id="lora_train_resume")
                    stop = gr.Button("Stop", variant="stop", elem_id="lora_train_stop", interactive=False)
                    plan_btn = gr.Button("Plan memory", elem_id="lora_train_plan_button")
                message = gr.HTML("", elem_id="lora_train_message")
                plan = gr.HTML("", elem_id="lora_train_plan")
                status = gr.HTML(render.status_html(None), elem_id="lora_train_status", elem_classes=live)
                plot = gr.HTML(render.loss_svg([]), elem_id="lora_train_loss_plot", elem_classes=live)
                samples = gr.Gallery(
                    [],
                    label="Preview images",
                    elem_id="lora_train_samples",
                    elem_classes=live,
                    columns=4,
                    height=220,
                    preview=False,
                    visible=False,  # until there are previews
                )
                send = gr.Button("Send to txt2img", elem_id="lora_train_send_to_txt2img", interactive=False)
                send_text = gr.Textbox("", visible=False, elem_id="lora_train_send_text")
                tab.lora_train_tryout = tryout_section(manager)  # pyright: ignore[reportAttributeAccessIssue]

        tab.lora_train_results = results_section(manager)  # pyright: ignore[reportAttributeAccessIssue]

        fields = [components[spec.path] for spec in FIELDS]

        preset.input(actions.apply_preset, inputs=[preset, *fields], outputs=[preset_info, *fields], api_name=False)
        save_preset_btn.click(
            actions.save_preset, inputs=[preset_name, *fields], outputs=[preset_info, preset], api_name=False
        )
        start.click(actions.start, inputs=fields, outputs=[message], api_name=False)
        resume.click(actions.resume, inputs=fields, outputs=[message], api_name=False)
        stop.click(actions.stop, outputs=[message], api_name=False)
        plan_btn.click(actions.plan, inputs=fields, outputs=[plan], api_name=False)
        send.click(
            None,
            _js="(text) => { if (window.loraTrain) loraTrain.sendToTxt2img(text); return []; }",
            inputs=[send_text],
            outputs=[],
            api_name=False,
        )
        tab.load(actions.restore_fields, inputs=[preset], outputs=[preset, *fields], api_name=False)
        tab.load(
            actions.poll,
            inputs=[poll_state],
            outputs=[model_info, status, plot, samples, start, resume, stop, send, send_text],
            every=poll_every,
            show_progress=False,  # pyright: ignore[reportArgumentType] (gradio 3.41 takes False for "hidden")
            api_name=False,
        )
    tab.lora_train_components = components  # pyright: ignore[reportAttributeAccessIssue]  # for tests and the workshop: dotted path -> component
    return tab


# --------------------------------------------------------------------------------------------
# Components from the field table
# --------------------------------------------------------------------------------------------


def _field_component(spec: FieldSpec) -> gr.components.Component:
    """The one component for one ``FIELDS`` row: its label, short help, default and elem_id."""
    common: dict[str, Any] = {
        "label": spec.label,
        "elem_id": elem_id(spec.path),
        "elem_classes": ["lora_train_field"],
        "value": to_widget(spec, spec.default),
    }
    info = short_help(spec.help)
    widget = spec.widget
    if widget == "text":
        placeholder = "unset" if spec.optional else None
        return gr.Textbox(lines=1, max_lines=1, info=info, placeholder=placeholder, **common)
    if widget in ("int", "float") and spec.optional:  # blank = unset (see fields.py)
        return gr.Textbox(lines=1, max_lines=1, info=info, placeholder="unset", **common)
    if widget in ("int", "float"):
        return gr.Number(precision=0 if widget == "int" else None, info=info, **common)
    if widget == "checkbox":
        return gr.Checkbox(info=info, **common)
    if widget == "dropdown":
        choices = [str(c) for c in spec.choices or ()] + ([""] if spec.optional else [])
        return gr.Dropdown(choices, info=info, **common)
    if widget == "lines":
        info = info.replace("one per entry", "one per line")
        return gr.Textbox(lines=3, info=info if "per line" in info else info + " One per line.", **common)
    if widget == "kv":
        return gr.Textbox(lines=2, info=info + " One name=value per line.", **common)
    raise ValueError(f"unknown widget {widget!r} for {spec.path}")


def _section(section: Section) -> dict[str, gr.components.Component]:
    """One settings tab: a heading per config group, narrow fields ROW_SIZE to a row, wide ones alone."""
    out: dict[str, gr.components.Component] = {}
    for group in section.groups:
        specs = [s for s in section_fields(section) if s.path.startswith(group + ".")]
        if len(section.groups) > 1:
            gr.HTML(f'<div class="lora_train_group_title">{GROUP_LABELS[group]}</div>')
        row: list[FieldSpec] = []

        def flush(row: list[FieldSpec]) -> None:
            if row:
                with gr.Row(variant="compact"):
                    for spec in row:
                        out[spec.path] = _field_component(spec)
                row.clear()

        for spec in specs:
            if spec.widget in WIDE or spec.path == "dataset.train_data_dir":
                flush(row)
                out[spec.path] = _field_component(spec)
                continue
            row.append(spec)
            if len(row) == ROW_SIZE:
                flush(row)
        flush(row)
    return out


def _help_json() -> str:
    """Full help texts for the tooltips (javascript/lora_train.js puts them on the fields)."""
    data = json.dumps({elem_id(s.path): s.help for s in FIELDS}).replace("</", "<\\/")
    return f'<script type="application/json" id="lora_train_help_data">{data}</script>'


# --------------------------------------------------------------------------------------------
# Event handlers: read widgets, call the manager, return HTML; never raise a trace to the page
# --------------------------------------------------------------------------------------------


class _Actions:
    def __init__(self, manager: JobManager, host: Host, preset_dir: Path, start_values: StartValues | None = None):
        self.manager, self.host, self.preset_dir = manager, host, preset_dir
        self.start_values = start_values

    # presets -------------------------------------------------------------------------------

    def apply_preset(self, name: str | None, *values: Any) -> list[Any]:
        current = dict(zip((s.path for s in FIELDS), values, strict=True))
        if not name:
            return [gr.update()] * (1 + len(FIELDS))
        try:
            preset = get_preset(name, self.preset_dir)
        except ConfigError as exc:
            return [render.message_html(str(exc)), *[gr.update()] * len(FIELDS)]
        where = "built-in" if preset.source == "builtin" else preset.source
        info = render.message_html(f"{name} ({where}): {preset.description or 'no description'}", "info")
        return [info, *preset_values(preset.config, current)]

    def save_preset(self, name: str, *values: Any) -> list[Any]:
        name = (name or "").strip()
        if name in PRESETS:
            return [render.message_html(f"'{name}' is a built-in preset; choose another name"), gr.update()]
        cfg, errors = build_config(values)
        if cfg is None:
            return [render.errors_html(errors, "Cannot save these settings:"), gr.update()]
        try:
            path = save_preset(cfg, name, self.preset_dir, overwrite=True)
        except (ConfigError, OSError) as exc:
            return [render.message_html(f"Cannot save the preset: {exc}"), gr.update()]
        note = f" ({len(errors)} setting(s) still need fixing before training)" if errors else ""
        return [
            render.message_html(f"Saved preset '{name}' to {path}{note}", "info"),
            gr.update(choices=list_presets(self.preset_dir), value=name),
        ]

    # run -------------------------------------------------------------------------------------

    def start(self, *values: Any) -> str:
        return self._start(values, resume=False)

    def resume(self, *values: Any) -> str:
        return self._start(values, resume=True)

    def _start(self, values: tuple[Any, ...], *, resume: bool) -> str:
        cfg, errors = build_config(values)
        if errors or cfg is None:
            return render.errors_html(errors)
        try:
            job = self.manager.start(cfg, resume=resume)
        except LoraTrainerError as exc:
            return render.exception_html(exc)
        except Exception as exc:  # noqa: BLE001 - the page's edge: a message for the page, the trace for the log
            logger.exception("could not start training")
            return render.exception_html(exc)
        verb = "Resuming" if resume else "Started"
        return render.message_html(f"{verb} '{cfg.save.output_name}' ({job.id}).", "info")

    def plan(self, *values: Any) -> str:
        """The memory and time plan of the settings on the loaded model and the free device memory."""
        cfg, errors = build_config(values)
        if errors or cfg is None:
            return render.errors_html(errors, "Fix these settings to plan:")
        try:
            plan = self.manager.plan(cfg)
        except Exception as exc:  # noqa: BLE001 - the page's edge: a message for the page, the trace for the log
            logger.exception("could not make a memory plan")
            return render.exception_html(exc)
        return render.plan_html(None if plan is None else plan.to_dict(), self.host.model_info().problem or "")

    def stop(self) -> str:
        job = self.manager.current()
        if job is None:
            return render.message_html("Nothing is running.", "info")
        self.manager.cancel(job.id)
        return render.message_html(
            f"Stopping '{job.config.save.output_name}' after the current step; what was trained so far is saved.",
            "info",
        )

    # reconnect -------------------------------------------------------------------------------

    def restore_fields(self, selected: str | None) -> list[Any]:
        """On page load: the preset list as on disk, and the settings of the running (or last) job,
        so a reloaded page shows what runs; with no job yet, the start values."""
        names = list_presets(self.preset_dir)
        job = self.manager.current() or self.manager.latest()
        if job is not None:
            shown = job.submitted or job.config  # an unset output folder stays unset (the host's Lora folder)
            return [gr.update(choices=names, value=selected if selected in names else None), *widget_values(shown)]
        name, values = None, {}
        if self.start_values is not None:
            try:
                name, values = self.start_values()
            except Exception as exc:  # noqa: BLE001 - the WebUI's settings callback; a broken setting must not break the page
                warning_once(f"LoRA Train tab: could not read the start settings: {type(exc).__name__}: {exc}")
        chosen = name if name in names else (selected if selected in names else None)
        fields = [to_widget(spec, values[spec.path]) if spec.path in values else gr.update() for spec in FIELDS]
        return [gr.update(choices=names, value=chosen), *fields]

    def poll(self, seen: dict[str, Any]) -> list[Any]:
        """The Run column's state; only what changed since this page's last poll is sent.

        Never raises: an exception would end the page's polling for good (it is one long generator).
        """
        try:
            return self._poll(seen)
        except Exception as exc:  # noqa: BLE001 - an escaping exception would end the page's polling for good
            warning_once(f"LoRA Train tab: status update failed: {type(exc).__name__}: {exc}")
            return [gr.update()] * POLL_OUTPUTS

    def model_info(self) -> ModelInfo:
        try:
            return self.host.model_info()
        except Exception as exc:  # noqa: BLE001 - the WebUI's model state is outside our control; shown, not raised
            return ModelInfo(None, "?", "?", problem=f"cannot read the loaded model ({type(exc).__name__}: {exc})")

    def _poll(self, seen: dict[str, Any]) -> list[Any]:
        job = self.manager.current() or self.manager.latest()
        data = job.to_dict() if job is not None else None
        info = self.model_info()
        active = bool(job is not None and job.active)
        can_start = not active and not info.problem
        prompt = ""
        if job is not None and job.output_file:
            prompt = lora_prompt(Path(job.output_file).stem, job.config.dataset.trigger_words)
        values: list[tuple[str, Any, Callable[[Any], Any]]] = [
            ("model", render.model_html(info), lambda v: v),
            ("status", render.status_html(data), lambda v: v),
            ("plot", render.loss_svg(data["losses"], data["val_losses"]) if data else render.loss_svg([]), lambda v: v),
            ("samples", list(data["samples"]) if data else [], lambda v: gr.update(value=v, visible=bool(v))),
            ("start", can_start, lambda v: gr.update(interactive=v)),
            ("resume", can_start, lambda v: gr.update(interactive=v)),
            ("stop", active, lambda v: gr.update(interactive=v)),
            ("send", bool(prompt), lambda v: gr.update(interactive=v)),
            ("send_text", prompt, lambda v: v),
        ]
        # Send only what changed, but everything again every RESYNC_EVERY polls: an update the
        # page never received (a poll cancelled by the next tick, a dropped socket) heals itself.
        resync = seen.get("_polls", 0) % RESYNC_EVERY == 0
        seen["_polls"] = seen.get("_polls", 0) + 1
        out = []
        for key, value, update in values:
            if not resync and key in seen and seen[key] == value:
                out.append(gr.update())
            else:
                seen[key] = value
                out.append(update(value))
        return out


__all__ = ["TAB_ID", "TAB_TITLE", "WorkshopHook", "create_tab"]
