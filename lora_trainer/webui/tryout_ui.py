"""The tab's test panel: a trained file at one seed beside the same seed without it (``lora_trainer.tryout``).

Layout (in the Run column, under "Send to txt2img")::

    ▸ Test the LoRA
        LoRA file ▾ [Refresh]
        prompt (<lora:NAME:1.0> + the run's trigger words)
        strength 0-2 · seed · width · height
        [Generate] [Interrupt]   message
        [with <lora:NAME:S>] [without]

The file list is the runs' files (the jobs kept, those of earlier sessions included), newest first;
choosing one fills the prompt. The strength slider sets the tag's strength in the prompt.
Generate goes through the host's own txt2img under its queue lock (``tryout.make_pair``); Interrupt
presses the WebUI's own txt2img Interrupt button, which stops the pair as it stops any generation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from lora_trainer.errors import ConfigError, LoraTrainerError
from lora_trainer.jobs import Job, JobManager
from lora_trainer.tryout import make_pair, request_from_dict, with_strength
from lora_trainer.webui.fields import lora_prompt
from lora_trainer.webui.render import message_html

__all__ = ["TryoutActions", "tryout_section"]

# The WebUI's own Interrupt (txt2img's button): it stops the pair as it stops any generation.
_INTERRUPT_JS = "() => { const b = gradioApp().querySelector('#txt2img_interrupt'); if (b) b.click(); return []; }"


class TryoutActions:
    """What the panel's events do, over the job manager (no gradio objects but updates)."""

    def __init__(self, manager: JobManager):
        self.manager = manager

    def _runs(self) -> list[Job]:
        jobs = [j for j in self.manager.list() if j.output_file and Path(j.output_file).is_file()]
        return sorted(jobs, key=lambda j: j.created_at, reverse=True)

    def files(self) -> list[str]:
        return list(dict.fromkeys(str(j.output_file) for j in self._runs()))

    def prompt_for(self, file: str | None) -> str:
        """``<lora:NAME:1.0>`` and the trigger words of the run that saved ``file``."""
        if not file:
            return ""
        job = next((j for j in self._runs() if j.output_file == file), None)
        return lora_prompt(Path(file).stem, job.config.dataset.trigger_words if job is not None else ())

    def refresh(self, current: str | None) -> list[Any]:
        """[the file list (the current choice kept, else the newest run's), its prompt when the choice changed]."""
        files = self.files()
        chosen = current if current in files else (files[0] if files else None)
        prompt = gr.update() if chosen == current else self.prompt_for(chosen)
        return [gr.update(choices=files, value=chosen), prompt]

    def strength(self, file: str | None, prompt: str, strength: float) -> str:
        return with_strength(prompt or "", Path(file).stem, float(strength)) if file else prompt

    def generate(self, file: str | None, prompt: str, strength: Any, seed: Any, width: Any, height: Any) -> list[Any]:
        """[the two images with labels, message]."""
        data = {"file": file or "", "prompt": prompt or "", "strength": strength, "seed": seed}
        data.update(width=width, height=height)
        try:
            request = request_from_dict(data)
            if self.manager.current() is not None:
                raise LoraTrainerError("A training run is using the model: generate when it has ended.")
            result = make_pair(self.manager.host, request)
        except ConfigError as e:
            return [gr.update(), message_html(f"{e.field}: {e.message}")]
        except LoraTrainerError as e:
            return [gr.update(), message_html(str(e))]
        images = [
            (image, label)
            for image, label in (
                (result.with_lora, f"with: {result.with_prompt}"),
                (result.without_lora, f"without: {result.without_prompt}"),
            )
            if image is not None
        ]
        note = "" if len(images) == 2 else message_html("Interrupted: not every image was made.", "warning")
        return [gr.update(value=images, visible=True), note]


def tryout_section(manager: JobManager) -> TryoutActions:
    """Build the panel where it is called (inside a Blocks context) and wire its events."""
    actions = TryoutActions(manager)
    files = actions.files()
    with gr.Accordion("Test the LoRA", open=False, elem_id="lora_train_test_panel"):
        with gr.Row(equal_height=True):
            file = gr.Dropdown(
                files,
                value=files[0] if files else None,
                label="LoRA file",
                elem_id="lora_train_test_file",
                scale=4,
            )
            refresh = gr.Button("Refresh", elem_id="lora_train_test_refresh", scale=0, min_width=90)
        prompt = gr.Textbox(
            actions.prompt_for(files[0] if files else None), lines=2, label="Prompt", elem_id="lora_train_test_prompt"
        )
        with gr.Row():
            strength = gr.Slider(0, 2, value=1.0, step=0.05, label="Strength", elem_id="lora_train_test_strength")
            seed = gr.Number(1234, precision=0, label="Seed", elem_id="lora_train_test_seed")
            width = gr.Number(512, precision=0, label="Width", elem_id="lora_train_test_width")
            height = gr.Number(512, precision=0, label="Height", elem_id="lora_train_test_height")
        with gr.Row():
            generate = gr.Button("Generate", variant="primary", elem_id="lora_train_test_generate")
            interrupt = gr.Button("Interrupt", elem_id="lora_train_test_interrupt", scale=0, min_width=110)
        message = gr.HTML("", elem_id="lora_train_test_message")
        images = gr.Gallery(
            [],
            label="With and without the LoRA",
            columns=2,
            height=300,
            elem_id="lora_train_test_images",
            visible=False,
        )
    refresh.click(actions.refresh, inputs=[file], outputs=[file, prompt], api_name=False)
    file.input(actions.prompt_for, inputs=[file], outputs=[prompt], api_name=False)
    strength.release(actions.strength, inputs=[file, prompt, strength], outputs=[prompt], api_name=False)
    generate.click(
        actions.generate,
        inputs=[file, prompt, strength, seed, width, height],
        outputs=[images, message],
        api_name=False,
    )
    interrupt.click(None, _js=_INTERRUPT_JS, inputs=[], outputs=[], api_name=False)
    # A fresh page lists the runs as they are now (not when the UI was built).
    root = gr.context.Context.root_block  # pyright: ignore[reportAttributeAccessIssue]
    if root is not None:
        root.load(actions.refresh, inputs=[file], outputs=[file, prompt], show_progress=False, api_name=False)
    return actions
