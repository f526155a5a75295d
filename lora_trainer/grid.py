"""Choosing a run's result: an epoch x strength grid on the loaded model, the suggested epoch, keeping a file.

A grid has one row per LoRA file (for each prompt, a block of rows) and one column per strength.
Each cell is a txt2img generation by the host (:meth:`Host.generate_grid_cells`) with
``<lora:NAME:S>`` added to the prompt, so the host's own Lora loader applies the file as a user's
generation would; strength 0 adds no tag at all, so that column is the base model's image. Cells
share the seed of their prompt. The grid is one PNG with row and column captions and its settings
as JSON in the PNG text chunk ``parameters``.

The suggestion is the saved file whose step had the lowest validation loss. Keeping a file copies
it to ``NAME.safetensors`` beside it, atomically and without replacing an existing file unless
asked (otherwise ``NAME_1`` ...), with its grid image as the Lora card's preview.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from lora_trainer.config.coerce import request_number
from lora_trainer.errors import ConfigError, LoraFileError, LoraTrainerError
from lora_trainer.files.atomic_write import atomic_write_bytes, unlink_quietly
from lora_trainer.files.card_preview import existing_card_previews, write_card_preview
from lora_trainer.files.inspection import family_from_metadata
from lora_trainer.files.safetensors_format import file_metadata, read_safetensors_header

if TYPE_CHECKING:
    from lora_trainer.contracts import Host
    from lora_trainer.jobs import Job

__all__ = [
    "DEFAULT_STRENGTHS",
    "GridCell",
    "GridResult",
    "GridSettings",
    "KeptFile",
    "best_file",
    "check_files",
    "files_of_job",
    "keep_file",
    "make_grid",
    "plan_cells",
    "settings_from_dict",
]

DEFAULT_STRENGTHS = (0.0, 0.5, 0.75, 1.0)
MAX_CELLS = 400


@dataclasses.dataclass(frozen=True)
class GridSettings:
    """What every cell is generated with (the sampler by the host's own name)."""

    prompts: tuple[str, ...]
    strengths: tuple[float, ...] = DEFAULT_STRENGTHS
    seed: int = 1234
    width: int = 512
    height: int = 512
    steps: int = 20
    cfg_scale: float = 7.0
    sampler: str = "Euler a"


@dataclasses.dataclass(frozen=True)
class GridCell:
    """One image of a grid: ``file`` at ``strength`` for prompt ``prompt_index`` with ``seed``."""

    row: int
    column: int
    prompt_index: int
    file: str
    strength: float
    prompt: str
    seed: int

    @property
    def name(self) -> str:
        """The name the host's Lora loader knows the file by (its stem)."""
        return Path(self.file).stem

    @property
    def full_prompt(self) -> str:
        """The prompt with ``<lora:NAME:S>``; strength 0: the prompt alone (the base model)."""
        return self.prompt if self.strength == 0 else f"{self.prompt} <lora:{self.name}:{self.strength:g}>"

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "full_prompt": self.full_prompt}


@dataclasses.dataclass
class GridResult:
    path: str
    cells: list[GridCell]
    settings: GridSettings
    files: list[str]
    complete: bool
    previews: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "image": self.path,
            "cells": [c.to_dict() for c in self.cells],
            "settings": dataclasses.asdict(self.settings),
            "files": self.files,
            "complete": self.complete,
            "previews": self.previews,
        }


def _prompts(data: Mapping[str, Any]) -> tuple[str, ...]:
    prompts = data.get("prompts", data.get("prompt"))
    if isinstance(prompts, str):
        prompts = [p for p in prompts.splitlines() if p.strip()]
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ConfigError("prompts", "give one or more prompts (a list of non-empty strings)")
    if any("<lora:" in p for p in prompts):
        raise ConfigError("prompts", "leave <lora:...> out of the prompts: the grid adds the file at each strength")
    return tuple(p.strip() for p in prompts)


def _strengths(data: Mapping[str, Any]) -> tuple[float, ...]:
    strengths = data.get("strengths", list(DEFAULT_STRENGTHS))
    if isinstance(strengths, str):
        try:
            strengths = [float(s) for s in strengths.replace(",", " ").split()]
        except ValueError:
            raise ConfigError("strengths", "must be numbers, e.g. 0, 0.5, 0.75, 1") from None
    if not isinstance(strengths, list) or not strengths:
        raise ConfigError("strengths", "give one or more strengths, e.g. [0, 0.5, 0.75, 1]")
    ok = all(not isinstance(s, bool) and isinstance(s, (int, float)) and math.isfinite(s) for s in strengths)
    if not ok or not all(-4 <= s <= 4 for s in strengths):
        raise ConfigError("strengths", "each strength must be a number between -4 and 4")
    return tuple(float(s) for s in strengths)


def settings_from_dict(data: Mapping[str, Any]) -> GridSettings:
    """Grid settings from a request body; ConfigError names the bad field."""
    sampler = data.get("sampler", "Euler a")
    if not isinstance(sampler, str) or not sampler.strip():
        raise ConfigError("sampler", "must be the name of one of the WebUI's samplers")
    size = data.get("size")
    width = height = None
    if size is not None:
        if not isinstance(size, list) or len(size) != 2:
            raise ConfigError("size", "must be [width, height]")
        width, height = size
    values = {**data, "width": width if width is not None else data.get("width", 512)}
    values["height"] = height if height is not None else data.get("height", 512)
    return GridSettings(
        prompts=_prompts(data),
        strengths=_strengths(data),
        seed=request_number(data, "seed", 1234, 0, 2**32 - 1, whole=True),
        width=_multiple_of_8(request_number(values, "width", 512, 64, 2048, whole=True), "size"),
        height=_multiple_of_8(request_number(values, "height", 512, 64, 2048, whole=True), "size"),
        steps=request_number(data, "steps", 20, 1, 150, whole=True),
        cfg_scale=request_number(data, "cfg_scale", 7.0, 1.0, 30.0, whole=False),
        sampler=sampler.strip(),
    )


def _multiple_of_8(value: int, field: str) -> int:
    if value % 8:
        raise ConfigError(field, "width and height must be multiples of 8")
    return value


def check_files(files: Sequence[str | os.PathLike], family: str | None, lora_dir: Path | None = None) -> list[Path]:
    """The files as paths, each a LoRA of the loaded model's base model (``ss_base_model_version``);
    ConfigError("files") for one that is missing, unreadable or of another base model."""
    if not files:
        raise ConfigError("files", "choose one or more LoRA files (or a job whose run saved some)")
    paths: list[Path] = []
    for item in files:
        path = Path(item)
        if not path.is_absolute() and lora_dir is not None:
            path = lora_dir / path
        if path.suffix != ".safetensors" or not path.is_file():
            raise ConfigError("files", f"{path} is not a .safetensors file")
        try:
            metadata = read_safetensors_header(path).metadata
        except (LoraFileError, OSError) as e:
            raise ConfigError("files", f"cannot read {path.name}: {e}") from None
        trained_on, _, said_by = family_from_metadata(metadata)
        if family is not None and trained_on is not None and trained_on != family:
            raise ConfigError(
                "files",
                f"{path.name} was trained on a {trained_on} model ({said_by}); "
                f"the loaded model is {family}: load a checkpoint of that base model first",
            )
        if path not in paths:
            paths.append(path)
    return paths


def files_of_job(job: Job) -> list[Path]:
    """The LoRA files a run saved, oldest first: its record, else files beside its output that name
    the run in their metadata (``ss_output_name``), for runs of an earlier session."""
    listed = [Path(p) for p in [*job.saved, *([job.output_file] if job.output_file else [])]]
    found = [p for i, p in enumerate(listed) if p.is_file() and p not in listed[:i]]
    if found:
        return found
    name, folder = job.config.save.output_name, job.config.save.output_dir
    if not folder or not Path(folder).is_dir():
        return []
    mine = []
    for path in sorted(Path(folder).glob(f"{name}*.safetensors")):
        metadata = file_metadata(path)
        if metadata.get("ss_output_name") == name:
            mine.append((int(metadata.get("ss_steps", "0") or 0), path))
    return [p for _, p in sorted(mine)]


def _file_step(path: Path) -> int | None:
    value = file_metadata(path).get("ss_steps")
    return int(value) if value and value.isdigit() else None


def best_file(job: Job, files: Sequence[Path] | None = None) -> dict[str, Any] | None:
    """The saved file whose step had the lowest validation loss: {"file", "step", "epoch", "loss"}; None
    without validation losses at any saved file's step."""
    steps = {step: path for path in (files if files is not None else files_of_job(job)) if (step := _file_step(path))}
    scored = [v for v in job.val_losses if v.get("step") in steps and isinstance(v.get("loss"), (int, float))]
    scored = [v for v in scored if math.isfinite(v["loss"])]
    if not scored:
        return None
    best = min(scored, key=lambda v: (v["loss"], v["step"]))
    return {"file": str(steps[best["step"]]), "step": best["step"], "epoch": best.get("epoch"), "loss": best["loss"]}


def plan_cells(files: Sequence[Path], settings: GridSettings) -> list[GridCell]:
    """Every cell: rows = files (a block per prompt), columns = strengths."""
    cells = [
        GridCell(p_i * len(files) + f_i, s_i, p_i, str(file), strength, prompt, settings.seed + p_i)
        for p_i, prompt in enumerate(settings.prompts)
        for f_i, file in enumerate(files)
        for s_i, strength in enumerate(settings.strengths)
    ]
    if len(cells) > MAX_CELLS:
        raise ConfigError("strengths", f"{len(cells)} images is too many for one grid (at most {MAX_CELLS})")
    return cells


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)  # pyright: ignore[reportCallIssue] (Pillow >= 10.1)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def _captions(cells: Sequence[GridCell], settings: GridSettings) -> tuple[list[str], dict[int, str]]:
    """Column captions (strengths) and row captions (file, and the prompt when there are several)."""
    columns = ["no LoRA (0)" if s == 0 else f"strength {s:g}" for s in settings.strengths]
    several = len(settings.prompts) > 1
    rows = {c.row: f"{c.name}\n{c.prompt[:40]}" if several else c.name for c in cells if c.column == 0}
    return columns, rows


def compose(
    cells: Sequence[GridCell], images: Sequence[Image.Image | None], settings: GridSettings
) -> tuple[Image.Image, list[tuple[int, int, int, int]]]:
    """The grid image and each cell's box (left, top, right, bottom): strength captions above the
    columns, file (and prompt) captions left of the rows; a column is as wide as its caption when
    the images are narrower (each image centred)."""
    font = _font(14)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    column_captions, row_captions = _captions(cells, settings)
    w, h = settings.width, settings.height
    col_w = max([w, *(int(measure.textlength(c, font=font)) + 12 for c in column_captions)])
    label_w = max(
        [
            w // 2,
            *(int(measure.textlength(line, font=font)) + 12 for c in row_captions.values() for line in c.split("\n")),
        ]
    )
    label_h = 28
    rows = max(c.row for c in cells) + 1
    size = (label_w + len(column_captions) * col_w, label_h + rows * max(h, 40))
    sheet = Image.new("RGB", size, (255, 255, 255))  # pyright: ignore[reportArgumentType]
    draw = ImageDraw.Draw(sheet)
    boxes: list[tuple[int, int, int, int]] = []
    for i, caption in enumerate(column_captions):
        draw.text((label_w + i * col_w + 6, 6), caption, fill="black", font=font)
    for cell, image in zip(cells, images, strict=True):
        x, y = label_w + cell.column * col_w + (col_w - w) // 2, label_h + cell.row * max(h, 40)
        boxes.append((x, y, x + w, y + h))
        if image is not None:
            sheet.paste(image.convert("RGB").resize((w, h)), (x, y))
        if cell.row in row_captions and cell.column == 0:
            draw.multiline_text((6, y + 6), row_captions[cell.row], fill="black", font=font)
    return sheet, boxes


def _png_bytes(image: Image.Image, text: str | None = None) -> bytes:
    import io

    info = PngInfo()
    if text is not None:
        info.add_text("parameters", text)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def preview_path(work_dir: str | os.PathLike, file: str | os.PathLike) -> Path:
    """Where the latest grid keeps ``file``'s image at its highest strength (its card preview if kept)."""
    digest = hashlib.sha256(os.fsencode(os.path.abspath(file))).hexdigest()[:16]
    return Path(work_dir) / "grids" / "previews" / f"{Path(file).stem}-{digest}.png"


def make_grid(host: Host, files: Sequence[str | os.PathLike], settings: GridSettings) -> GridResult:
    """Generate and save the grid of ``files`` x ``settings.strengths`` under the host's queue lock.

    An interrupt (the host's own button) ends it early: the cells not generated stay blank and
    ``complete`` is False.
    """
    info = host.model_info()
    if info.family is None or info.problem:
        raise LoraTrainerError(info.problem or "no model is loaded")
    paths = check_files(files, info.family, host.lora_dir)
    cells = plan_cells(paths, settings)
    with host.gpu_lock():
        images: list[Image.Image | None] = list(host.generate_grid_cells(cells, settings))
    complete = len(images) >= len(cells)
    images = (images + [None] * len(cells))[: len(cells)]
    sheet, boxes = compose(cells, images, settings)
    params = {
        "settings": dataclasses.asdict(settings),
        "files": [str(p) for p in paths],
        "model": info.checkpoint,
        "cells": [
            {**c.to_dict(), "box": list(box), "generated": image is not None}
            for c, box, image in zip(cells, boxes, images, strict=True)
        ],
    }
    folder = Path(host.work_dir) / "grids"
    target = folder / f"grid-{time.strftime('%Y%m%d-%H%M%S')}.png"
    written = atomic_write_bytes(target, _png_bytes(sheet, json.dumps(params)), overwrite=False, durable=False)
    previews: dict[str, str] = {}
    top = max(range(len(settings.strengths)), key=lambda i: settings.strengths[i])
    for cell, image in zip(cells, images, strict=True):
        if image is not None and cell.prompt_index == 0 and cell.column == top:
            at = preview_path(host.work_dir, cell.file)
            previews[cell.file] = str(atomic_write_bytes(at, _png_bytes(image), durable=False))
    return GridResult(str(written), cells, settings, [str(p) for p in paths], complete, previews)


@dataclasses.dataclass
class KeptFile:
    path: str
    replaced: bool
    removed: list[str]
    preview: str | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def keep_file(
    source: str | os.PathLike,
    name: str,
    *,
    work_dir: str | os.PathLike,
    replace: bool = False,
    remove: Sequence[str | os.PathLike] = (),
) -> KeptFile:
    """Copy ``source`` to ``NAME.safetensors`` in its folder (atomic; an existing file is replaced only
    with ``replace`` or when it is one of ``remove``, otherwise the copy is ``NAME_1`` ...); then remove
    the files in ``remove`` (and
    their card previews), never the kept one. Its grid image, if any, becomes the card preview."""
    source = Path(source)
    if not source.is_file():
        raise ConfigError("file", f"{source} does not exist")
    if not name or any(c in name for c in "/\\\0") or name in (".", ".."):
        raise ConfigError("name", "must be a file name without a folder")
    target = source.with_name(f"{name}.safetensors")
    # a file at the final name that the user asked to remove anyway is replaced, not kept beside NAME_1
    replace = replace or any(Path(p).resolve() == target.resolve() for p in remove)
    if target == source:
        final = source
    else:
        final = atomic_write_bytes(target, source.read_bytes(), overwrite=replace)
    replaced = final == target and target != source and replace
    removed = []
    for other in dict.fromkeys(Path(p) for p in remove):
        if other.resolve() == final.resolve() or not other.is_file():
            continue
        for preview in existing_card_previews(other):
            unlink_quietly(preview)
        unlink_quietly(other)
        removed.append(str(other))
    grid_image = preview_path(work_dir, source)
    preview = None
    if grid_image.is_file():
        written = write_card_preview(final, [str(grid_image)], replace=replaced or final == source)
        preview = str(written) if written else None
    return KeptFile(str(final), replaced, removed, preview)
