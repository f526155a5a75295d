"""The tab's "Results" section: compare a run's saved files in an epoch x strength grid and keep one.

Layout (``results_section``)::

    Run ▾ [Refresh]            (runs with saved files, this session's and earlier ones)
    files ☑ (the suggestion, lowest validation loss, marked ★)
    prompts · strengths · seed · width · height · steps · sampler   [Make grid]
    grid image (rows = files, columns = strengths) · message
    Keep ▾ (a file) · final name · replace · remove the others      [Keep]

The work is :mod:`lora_trainer.grid`'s; this module only turns the widgets into its calls and
its errors into a red message.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import gradio as gr

from lora_trainer.errors import ConfigError, LoraTrainerError
from lora_trainer.grid import best_file, files_of_job, keep_file, make_grid, settings_from_dict
from lora_trainer.jobs import Job, JobManager

__all__ = ["ResultActions", "results_section"]

STAR = "★ "


def _message(text: str, *, error: bool = False) -> str:
    kind = "lora_train_error" if error else "lora_train_ok"
    return f'<div class="{kind}">{html.escape(text)}</div>'


def _label(file: Path, best: str | None) -> str:
    return (STAR if str(file) == best else "") + file.name


class ResultActions:
    """What the section's buttons do, over a :class:`JobManager` (and its host)."""

    def __init__(self, manager: JobManager):
        self.manager = manager

    def runs(self) -> list[str]:
        """``id · name`` of every finished run that has saved files, newest first."""
        jobs = [j for j in reversed(self.manager.list()) if not j.active and files_of_job(j)]
        return [f"{j.id} · {j.config.save.output_name}" for j in jobs]

    def _job(self, run: str | None) -> Job | None:
        if not run:
            return None
        try:
            return self.manager.get(run.split(" · ")[0])
        except LoraTrainerError:
            return None

    def refresh(self, run: str | None) -> list[Any]:
        runs = self.runs()
        chosen = run if run in runs else (runs[0] if runs else None)
        return [gr.update(choices=runs, value=chosen), *self.select(chosen)]

    def select(self, run: str | None) -> list[Any]:
        """The run's files (all checked), the suggestion line, the keep choices and the final name."""
        job = self._job(run)
        if job is None:
            return [gr.update(choices=[], value=[]), "", gr.update(choices=[], value=None), ""]
        files = files_of_job(job)
        best = best_file(job, files)
        labels = [_label(f, best["file"] if best else None) for f in files]
        if best:
            info = _message(f"{STAR}lowest validation loss: {Path(best['file']).name} (step {best['step']})")
        else:
            info = _message("no validation loss at a saved file's step: compare the grid")
        keep_value = next((label for label in labels if label.startswith(STAR)), labels[-1] if labels else None)
        return [
            gr.update(choices=labels, value=labels),
            info,
            gr.update(choices=labels, value=keep_value),
            job.config.save.output_name,
        ]

    def _files(self, job: Job | None, labels: list[str] | None) -> list[Path]:
        files = files_of_job(job) if job is not None else []
        wanted = {label.removeprefix(STAR) for label in labels or []}
        return [f for f in files if f.name in wanted]

    def grid(self, run, labels, prompts, strengths, seed, width, height, steps, sampler) -> list[Any]:
        """The grid image (or None) and a message."""
        job = self._job(run)
        try:
            if job is None:
                raise ConfigError("run", "choose a run with saved files")
            if self.manager.current() is not None:
                raise LoraTrainerError("a training run is using the model; make the grid when it has ended")
            settings = settings_from_dict(
                {
                    "prompts": prompts or "",
                    "strengths": strengths or "",
                    "seed": int(seed or 0),
                    "size": [int(width or 0), int(height or 0)],
                    "steps": int(steps or 0),
                    "sampler": sampler or "",
                }
            )
            result = make_grid(self.manager.host, [str(f) for f in self._files(job, labels)], settings)
        except ConfigError as e:
            return [None, _message(f"{e.field}: {e.message}", error=True)]
        except LoraTrainerError as e:
            return [None, _message(str(e), error=True)]
        done = "" if result.complete else " (interrupted: the blank cells were not generated)"
        return [result.path, _message(f"{len(result.cells)} images; saved as {result.path}{done}")]

    def keep(self, run, label, name, replace, remove_others) -> str:
        job = self._job(run)
        files = self._files(job, [label] if label else [])
        if job is None or not files:
            return _message("choose a run and the file to keep", error=True)
        others = [str(f) for f in files_of_job(job)] if remove_others else []
        try:
            kept = keep_file(files[0], str(name or "").strip(), work_dir=self.manager.host.work_dir,
                             replace=bool(replace), remove=others)  # fmt: skip
        except ConfigError as e:
            return _message(f"{e.field}: {e.message}", error=True)
        except (LoraTrainerError, OSError) as e:
            return _message(str(e), error=True)
        self.manager.host.publish_lora(Path(kept.path))
        removed = f"; removed {len(kept.removed)} other file(s)" if kept.removed else ""
        return _message(f"kept {Path(kept.path).name}{' (replaced)' if kept.replaced else ''}{removed}")


def results_section(manager: JobManager) -> ResultActions:
    """Build the section inside the current gradio context; returns its actions (for tests)."""
    actions = ResultActions(manager)
    with gr.Accordion("Results: compare epochs and strengths, keep one", open=False, elem_id="lora_train_results"):
        with gr.Row():
            run = gr.Dropdown([], label="Run", elem_id="lora_train_results_run", scale=3)
            refresh = gr.Button("Refresh", elem_id="lora_train_results_refresh", scale=0, min_width=100)
        files = gr.CheckboxGroup([], label="Files (rows)", elem_id="lora_train_results_files")
        best = gr.HTML("", elem_id="lora_train_results_best")
        prompts = gr.Textbox("", label="Prompts (one per line)", lines=2, elem_id="lora_train_results_prompts")
        with gr.Row():
            strengths = gr.Textbox(
                "0, 0.5, 0.75, 1", label="Strengths (columns)", elem_id="lora_train_results_strengths"
            )
            seed = gr.Number(1234, label="Seed", precision=0, elem_id="lora_train_results_seed")
            sampler = gr.Textbox("Euler a", label="Sampler", elem_id="lora_train_results_sampler")
        with gr.Row():
            width = gr.Number(512, label="Width", precision=0, elem_id="lora_train_results_width")
            height = gr.Number(512, label="Height", precision=0, elem_id="lora_train_results_height")
            steps = gr.Number(20, label="Steps", precision=0, elem_id="lora_train_results_steps")
        make = gr.Button("Make grid", variant="primary", elem_id="lora_train_results_make")
        image = gr.Image(None, type="filepath", label="Grid", interactive=False, elem_id="lora_train_results_grid")
        message = gr.HTML("", elem_id="lora_train_results_message")
        with gr.Row():
            keep_choice = gr.Dropdown([], label="Keep", elem_id="lora_train_results_keep_file", scale=2)
            name = gr.Textbox("", label="Final name", elem_id="lora_train_results_name", scale=2)
            replace = gr.Checkbox(False, label="Replace an existing file", elem_id="lora_train_results_replace")
            remove = gr.Checkbox(False, label="Remove the other files", elem_id="lora_train_results_remove")
        keep = gr.Button("Keep", elem_id="lora_train_results_keep")
        kept = gr.HTML("", elem_id="lora_train_results_kept")

    selected = [files, best, keep_choice, name]
    refresh.click(actions.refresh, inputs=[run], outputs=[run, *selected], api_name=False)
    run.input(actions.select, inputs=[run], outputs=selected, api_name=False)
    make.click(
        actions.grid,
        inputs=[run, files, prompts, strengths, seed, width, height, steps, sampler],
        outputs=[image, message],
        api_name=False,
    )
    keep.click(actions.keep, inputs=[run, keep_choice, name, replace, remove], outputs=[kept], api_name=False)
    return actions
