"""HTML for the tab's read-only parts: the model line, job status, the loss plot and messages.

Plain functions of plain data (``Job.to_dict()``, ``ModelInfo``, ``ConfigError``), no gradio, so
they are tested without a browser. Everything user- or file-derived is escaped.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from html import escape
from typing import Any

from lora_trainer.contracts import ModelInfo
from lora_trainer.errors import ConfigError, LoraTrainerError
from lora_trainer.webui.fields import FIELD_BY_PATH, field_label

FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}


def message_html(text: str, kind: str = "error") -> str:
    """A boxed message; ``kind`` is error (red), warning or info."""
    if not text:
        return ""
    role = ' role="alert"' if kind == "error" else ""
    return f'<div class="lora_train_msg lora_train_msg_{kind}"{role}>{escape(text, quote=False)}</div>'


def _field_link(path: str) -> str:
    label = escape(field_label(path))
    if path not in FIELD_BY_PATH:
        return f"<b>{label}</b>"
    p = escape(path, quote=True)
    return (
        f'<a href="#" class="lora_train_field_link" data-field="{p}" '
        f"onclick=\"return window.loraTrain ? loraTrain.showField('{p}') : false\">{label}</a>"
        f" <code>{escape(path)}</code>"
    )


def errors_html(errors: Sequence[ConfigError], title: str = "Fix these settings first:") -> str:
    """Every settings problem, each naming its field (a link that shows the field)."""
    if not errors:
        return ""
    items = "".join(f"<li>{_field_link(e.field)}: {escape(e.message)}</li>" for e in errors)
    return f'<div class="lora_train_msg lora_train_msg_error" role="alert"><b>{escape(title)}</b><ul>{items}</ul></div>'


def exception_html(exc: BaseException) -> str:
    """Our typed errors as the user should read them; anything else by its type and text, no trace."""
    if isinstance(exc, ConfigError):
        return errors_html([exc], title="Cannot start:")
    if isinstance(exc, LoraTrainerError):
        return message_html(f"Cannot start: {exc}")
    return message_html(f"Cannot start: {type(exc).__name__}: {exc}")


def model_html(info: ModelInfo) -> str:
    """The loaded checkpoint, VAE and family; a red box when it cannot be trained."""
    family = FAMILY_NAMES.get(info.family or "", info.family or "unknown")
    parts = [
        f"<span>Checkpoint <b>{escape(info.checkpoint or 'none')}</b></span>",
        f"<span>VAE <b>{escape(info.vae or 'none')}</b></span>",
        f"<span>Family <b>{escape(family)}</b></span>",
    ]
    bad = " lora_train_model_bad" if info.problem else ""
    html = f'<div class="lora_train_model{bad}">{"".join(parts)}</div>'
    if info.problem:
        html += message_html(f"Cannot train on the loaded model: {info.problem}")
    return html


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "–"
    s = round(seconds)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _num(x: float | None, fmt: str = ".4f") -> str:
    return "–" if x is None or not math.isfinite(x) else format(x, fmt)


def status_html(job: dict[str, Any] | None) -> str:
    """A job's state: badge, phase, progress bar, step/epoch/loss/speed/ETA, error or saved file."""
    if job is None:
        return (
            '<div class="lora_train_status lora_train_state_idle" data-state="idle">'
            '<div class="lora_train_status_head"><span class="lora_train_badge">idle</span> '
            "No training in this session yet: pick a preset, set the images folder and press Start.</div></div>"
        )
    state = job["state"]
    step, total = job["step"], job["total_steps"]
    pct = 100.0 if state == "done" else (100.0 * step / total if total else 0.0)
    stats = [
        f'<span class="lora_train_step">Step <b>{step}</b> / {total or "?"}</span>',
        f"<span>Epoch <b>{job['epoch']}</b> / {job['total_epochs'] or '?'}</span>",
        f"<span>Loss <b>{_num(job['loss'])}</b> (avg {_num(job['avg_loss'])})</span>",
        f"<span>{_num(job['steps_per_s'], '.2f')} steps/s</span>",
        f"<span>ETA <b>{format_duration(job['eta_s']) if state == 'running' else '–'}</b></span>",
    ]
    if job.get("skipped_steps"):
        stats.append(f'<span class="lora_train_skipped">{job["skipped_steps"]} skipped (NaN/inf)</span>')
    if job.get("finished_at") and job.get("created_at"):
        stats.append(f"<span>took {format_duration(job['finished_at'] - job['created_at'])}</span>")
    busy = " lora_train_bar_busy" if state in ("queued", "running") and not total else ""
    html = [
        # data-job / data-file: the page refreshes the WebUI's Lora panes once when a run ends with a file
        f'<div class="lora_train_status lora_train_state_{escape(state)}" data-state="{escape(state)}" '
        f'data-job="{escape(str(job.get("id", "")))}" data-file="{"1" if job.get("output_file") else ""}">',
        '<div class="lora_train_status_head">',
        "" if state in ("queued", "running") else '<span class="lora_train_last">Last run:</span> ',
        f'<span class="lora_train_badge">{escape(state)}</span> ',
        f'<b>{escape(job["output_name"])}</b> · <span class="lora_train_phase">{escape(job["phase"] or "")}</span>',
        "</div>",
        f'<div class="lora_train_bar{busy}"><div class="lora_train_bar_fill" style="width:{pct:.1f}%"></div></div>',
        f'<div class="lora_train_stats">{"".join(stats)}</div>',
    ]
    memory = job.get("memory") or {}
    if memory.get("estimated_peak_gb") is not None or memory.get("measured_peak_gb") is not None:
        html.append(f'<div class="lora_train_memory">{escape(memory_line(memory))}</div>')
    if job.get("error"):
        html.append(message_html(job["error"]))
    if job.get("output_file"):
        html.append(f'<div class="lora_train_saved">Saved <code>{escape(job["output_file"])}</code></div>')
    if job.get("restored"):
        again = " The settings above are its settings: press Resume to continue it." if job.get("resumable") else ""
        html.append(f'<div class="lora_train_restored">This run is from before the WebUI restarted.{again}</div>')
    html.append("</div>")
    return "".join(html)


def memory_line(memory: dict[str, Any]) -> str:
    """ "Memory: estimated peak 9.8 GB, measured 9.1 GB (NVIDIA ...)" from ``Job.to_dict()["memory"]``."""
    estimated, measured = memory.get("estimated_peak_gb"), memory.get("measured_peak_gb")
    parts = [f"estimated peak {estimated:.2f} GB" if estimated is not None else "no estimate"]
    parts.append(f"measured {measured:.2f} GB" if measured is not None else "measured peak: not tracked on the CPU")
    device = f" ({memory['device']})" if memory.get("device") else ""
    return "Memory: " + ", ".join(parts) + device


def plan_html(plan: dict[str, Any] | None, problem: str = "") -> str:
    """The memory and time plan (``Plan.to_dict()``): peak against free memory, its parts, what to change."""
    if plan is None:
        return message_html(problem or "No plan: no trainable model is loaded.", "warning")
    kind = "info" if plan["fits"] is not False else "warning"
    parts = ", ".join(f"{name} {gb:.2f}" for name, gb in plan["parts_gb"].items() if gb)
    html = [
        f'<div class="lora_train_plan" data-fits="{str(plan["fits"]).lower()}">',
        message_html(plan["summary"], kind),
        f'<div class="lora_train_plan_parts">GB: {escape(parts)}</div>',
    ]
    if plan["advice"]:
        html.append(f'<div class="lora_train_plan_advice">{escape(plan["advice"])}</div>')
    html.append("</div>")
    return "".join(html)


# --------------------------------------------------------------------------------------------
# Loss plot: a small inline SVG (renders the same everywhere, no plotting library, no flicker)
# --------------------------------------------------------------------------------------------

PLOT_W, PLOT_H, PLOT_POINTS = 600, 150, 300


def _downsample(values: Sequence[float], n: int) -> list[float]:
    if len(values) <= n:
        return list(values)
    size = len(values) / n
    return [
        sum(chunk) / len(chunk)
        for i in range(n)
        if (chunk := values[int(i * size) : max(int((i + 1) * size), int(i * size) + 1)])
    ]


def _ema(values: Iterable[float], alpha: float) -> list[float]:
    out: list[float] = []
    for v in values:
        out.append(v if not out else out[-1] + alpha * (v - out[-1]))
    return out


def _points(values: Sequence[float], lo: float, hi: float) -> str:
    span = hi - lo or 1.0
    last = max(len(values) - 1, 1)
    return " ".join(
        f"{PLOT_W * i / last:.1f},{PLOT_H - (PLOT_H - 8) * (v - lo) / span - 4:.1f}" for i, v in enumerate(values)
    )


def _val_points(val_losses: Sequence[dict], steps: int, lo: float, hi: float) -> str:
    """The validation losses ({"step", "loss"}) placed at their steps on the x axis of a ``steps``-step plot."""
    span, last = hi - lo or 1.0, max(steps - 1, 1)
    return " ".join(
        f"{PLOT_W * (p['step'] - 1) / last:.1f},{PLOT_H - (PLOT_H - 8) * (p['loss'] - lo) / span - 4:.1f}"
        for p in val_losses
    )


def _val_line(points: str) -> str:
    if not points:
        return ""
    return (
        f'<polyline class="lora_train_plot_val" points="{points}" fill="none" stroke="#2563eb" '
        'stroke-width="2" stroke-dasharray="4 2" vector-effect="non-scaling-stroke"><title>validation loss</title>'
        "</polyline>"
    )


def loss_svg(losses: Sequence[float], val_losses: Sequence[dict] = ()) -> str:
    """Loss per step (thin) and its moving average (bold), scaled to the run so far; the validation loss
    (``val_losses``: {"step", "loss"} per measurement) as a third line with a dot per measurement."""
    values = [v for v in losses if v is not None and math.isfinite(v)]
    if len(values) < 2:
        return '<div class="lora_train_plot lora_train_plot_empty">The loss curve appears after two steps.</div>'
    shown = _downsample(values, PLOT_POINTS)
    smooth = _ema(shown, alpha=min(1.0, 10 / len(shown)))
    val = [p for p in val_losses if math.isfinite(p.get("loss", math.nan))]
    lo, hi = min(shown + [p["loss"] for p in val]), max(shown + [p["loss"] for p in val])
    raw_line = _points(shown, lo, hi)
    avg_line = _points(smooth, lo, hi)
    return (
        '<div class="lora_train_plot">'
        f'<div class="lora_train_plot_axis"><span>{hi:.4g}</span><span>loss</span><span>{lo:.4g}</span></div>'
        f'<svg viewBox="0 0 {PLOT_W} {PLOT_H}" preserveAspectRatio="none" role="img" '
        f'aria-label="loss over {len(values)} steps">'
        f'<polyline class="lora_train_plot_raw" points="{raw_line}" fill="none" stroke="#9ca3af" '
        'stroke-width="1" vector-effect="non-scaling-stroke"/>'
        f'<polyline class="lora_train_plot_avg" points="{avg_line}" fill="none" stroke="#f97316" '
        'stroke-width="2" vector-effect="non-scaling-stroke"/>'
        + _val_line(_val_points(val, len(losses), lo, hi))
        + "</svg>"
        f'<div class="lora_train_plot_x"><span>step 1</span><span>step {len(values)}</span></div>'
        "</div>"
    )
