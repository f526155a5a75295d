"""The WD14 tagger (SmilingWolf's ONNX models) as a :class:`~lora_trainer.workshop.captioning.Captioner`.

A model folder holds ``model.onnx`` and ``selected_tags.csv`` (columns ``tag_id,name,category,count``;
category 9 = rating, 0 = general, 4 = character), as in the Hugging Face repos
``SmilingWolf/wd-v1-4-moat-tagger-v2``, ``SmilingWolf/wd-v1-4-convnextv2-tagger-v2``,
``SmilingWolf/wd-swinv2-tagger-v3`` ...

Pre-processing (as SmilingWolf's reference code and kohya's ``tag_images_by_wd14_tagger.py``):
transparency onto white, pad to a centred square with white, resize to the model's input size
(448) with bicubic resampling, RGB -> BGR, float32 0-255 (no normalisation), NHWC batch of one.

Post-processing: rating tags are dropped; general tags at or above ``general_threshold`` and
character tags at or above ``character_threshold`` are returned with their scores (the caption
pipeline sorts, formats and merges them).

``onnxruntime`` is optional and imported only when the model is loaded; ``huggingface_hub``
only when a model must be downloaded. Without them (or offline), :class:`CaptionerUnavailable`
says what to install or which files to put where.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lora_trainer.workshop.captioning import CaptionerUnavailable

__all__ = [
    "DEFAULT_REPO",
    "MODEL_FILE",
    "TAGS_FILE",
    "WD14Captioner",
    "WD14Tags",
    "postprocess_probs",
    "preprocess",
    "read_selected_tags",
]

DEFAULT_REPO = "SmilingWolf/wd-v1-4-moat-tagger-v2"
MODEL_FILE = "model.onnx"
TAGS_FILE = "selected_tags.csv"
DEFAULT_SIZE = 448
CATEGORY_GENERAL, CATEGORY_CHARACTER, CATEGORY_RATING = 0, 4, 9


@dataclass(frozen=True)
class WD14Tags:
    """The model's output labels: ``names[i]`` is output ``i``; index lists per category."""

    names: tuple[str, ...]
    rating: tuple[int, ...]
    general: tuple[int, ...]
    character: tuple[int, ...]


def read_selected_tags(path: str | os.PathLike) -> WD14Tags:
    """Parse ``selected_tags.csv``; :class:`CaptionerUnavailable` when it is not one."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise CaptionerUnavailable(f"Cannot read the WD14 tag list {path} ({e}). Download it again.") from None
    if not rows or "name" not in rows[0] or "category" not in rows[0]:
        raise CaptionerUnavailable(
            f"{path} is not a WD14 tag list (it needs 'name' and 'category' columns). Download it again."
        )
    names, rating, general, character = [], [], [], []
    for i, row in enumerate(rows):
        try:
            cat = int(row["category"])
        except (TypeError, ValueError):
            raise CaptionerUnavailable(f"{path} line {i + 2}: bad category {row['category']!r}.") from None
        names.append(row["name"] or "")
        {CATEGORY_RATING: rating, CATEGORY_GENERAL: general, CATEGORY_CHARACTER: character}.get(cat, []).append(i)
    return WD14Tags(tuple(names), tuple(rating), tuple(general), tuple(character))


def preprocess(image: Image.Image, size: int = DEFAULT_SIZE) -> np.ndarray:
    """``image`` as the model's input: (1, size, size, 3) float32, BGR, 0-255, padded square with white."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # pyright: ignore[reportArgumentType] (old Pillow stub)
        canvas.alpha_composite(rgba)
        image = canvas
    image = image.convert("RGB")
    w, h = image.size
    side = max(w, h)
    square = Image.new("RGB", (side, side), (255, 255, 255))  # pyright: ignore[reportArgumentType] (old Pillow stub)
    square.paste(image, ((side - w) // 2, (side - h) // 2))
    if side != size:
        square = square.resize((size, size), Image.Resampling.BICUBIC)
    arr = np.asarray(square, dtype=np.float32)[:, :, ::-1]  # RGB -> BGR
    return np.ascontiguousarray(arr)[None]


def postprocess_probs(
    probs: Sequence[float] | np.ndarray,
    tags: WD14Tags,
    general_threshold: float = 0.35,
    character_threshold: float = 0.85,
) -> list[tuple[str, float]]:
    """(tag, score) of the general and character tags at or above their thresholds, best first.
    Rating tags are never returned."""
    p = np.asarray(probs, dtype=np.float32).reshape(-1)
    if p.shape[0] != len(tags.names):
        raise ValueError(
            f"the model gave {p.shape[0]} scores for {len(tags.names)} tags; model and tag list do not match"
        )
    out = [(tags.names[i], float(p[i])) for i in tags.general if p[i] >= general_threshold]
    out += [(tags.names[i], float(p[i])) for i in tags.character if p[i] >= character_threshold]
    out.sort(key=lambda ts: -ts[1])
    return out


def _missing_files_help(repo_id: str, model_dir: Path | None) -> str:
    where = model_dir if model_dir is not None else Path("<a folder of your choice>")
    return (
        f"Download {MODEL_FILE} and {TAGS_FILE} from https://huggingface.co/{repo_id}/tree/main and put both in "
        f"{where}" + ("" if model_dir is not None else ", then pass that folder as the WD14 model folder") + "."
    )


class WD14Captioner:
    """WD14 tagger. Loads lazily (on the first :meth:`caption` or :meth:`load`).

    model_dir: a folder with ``model.onnx`` and ``selected_tags.csv``; used when both are there.
    Otherwise, with ``allow_download``, they are fetched from ``repo_id`` on the Hugging Face hub
    (into ``model_dir`` when given, else the hub cache).
    providers: onnxruntime execution providers (default: CUDA when available, then CPU).
    session / tags: ready-made objects (tests, or a host that loads the model its own way);
    ``session`` needs ``get_inputs()`` and ``run(output_names, feed)``.
    """

    name = "wd14"

    def __init__(
        self,
        repo_id: str = DEFAULT_REPO,
        *,
        model_dir: str | os.PathLike | None = None,
        general_threshold: float = 0.35,
        character_threshold: float = 0.85,
        allow_download: bool = True,
        providers: Sequence[str] | None = None,
        session=None,
        tags: WD14Tags | None = None,
    ):
        for label, t in (("general", general_threshold), ("character", character_threshold)):
            if not 0.0 <= float(t) <= 1.0:
                raise ValueError(f"the {label} threshold must be between 0 and 1, got {t}")
        self.repo_id = repo_id
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.general_threshold = float(general_threshold)
        self.character_threshold = float(character_threshold)
        self.allow_download = allow_download
        self.providers = list(providers) if providers is not None else None
        self._session: Any = session  # an onnxruntime.InferenceSession (or a stand-in with its API)
        self._tags = tags

    # -- loading

    def _local_files(self) -> tuple[Path, Path] | None:
        if self.model_dir is None:
            return None
        m, t = self.model_dir / MODEL_FILE, self.model_dir / TAGS_FILE
        return (m, t) if m.is_file() and t.is_file() else None

    def _download(self) -> tuple[Path, Path]:
        if not self.allow_download:
            raise CaptionerUnavailable(
                f"The WD14 model is not in {self.model_dir} and downloading is off. "
                + _missing_files_help(self.repo_id, self.model_dir)
            )
        try:
            from huggingface_hub import hf_hub_download  # optional: imported only when needed
        except ImportError:
            raise CaptionerUnavailable(
                "Downloading the WD14 model needs the huggingface_hub package (pip install huggingface_hub). "
                + _missing_files_help(self.repo_id, self.model_dir)
            ) from None
        kwargs: dict[str, Any] = {"local_dir": str(self.model_dir)} if self.model_dir is not None else {}
        try:
            model = hf_hub_download(self.repo_id, MODEL_FILE, **kwargs)
            tags = hf_hub_download(self.repo_id, TAGS_FILE, **kwargs)
        except Exception as e:  # noqa: BLE001 - offline, unknown repo, disk full ...: all mean "no model"
            raise CaptionerUnavailable(
                f"Could not download the WD14 model {self.repo_id} ({type(e).__name__}: {e}). "
                + _missing_files_help(self.repo_id, self.model_dir)
            ) from None
        return Path(model), Path(tags)

    def load(self) -> None:
        """Load the tag list and the ONNX session now (downloading if needed)."""
        if self._session is not None and self._tags is not None:
            return
        files = self._local_files() or self._download()
        if self._tags is None:
            self._tags = read_selected_tags(files[1])
        if self._session is None:
            try:
                import onnxruntime as ort  # optional: imported only when needed
            except ImportError:
                raise CaptionerUnavailable(
                    "The WD14 tagger needs onnxruntime: pip install onnxruntime (or onnxruntime-gpu for CUDA) "
                    "in the WebUI's Python environment, then restart the WebUI."
                ) from None
            providers = self.providers
            if providers is None:
                available = ort.get_available_providers()
                providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
            try:
                self._session = ort.InferenceSession(str(files[0]), providers=providers or None)
            except Exception as e:  # noqa: BLE001 - onnxruntime raises its own assorted errors: all mean "no model"
                raise CaptionerUnavailable(
                    f"onnxruntime could not load {files[0]} ({e}). The file may be damaged: delete it and download it again."
                ) from None

    @property
    def input_size(self) -> int:
        self.load()
        shape = self._session.get_inputs()[0].shape  # [batch, height, width, 3]
        try:
            return int(shape[1])
        except (TypeError, ValueError, IndexError):  # a dynamic axis
            return DEFAULT_SIZE

    # -- tagging

    def tag(self, image: Image.Image) -> list[tuple[str, float]]:
        """(tag, score) pairs above the thresholds, best first, rating tags excluded."""
        self.load()
        inp = self._session.get_inputs()[0]
        batch = preprocess(image, self.input_size)
        outputs = self._session.run(None, {inp.name: batch})
        assert self._tags is not None  # load() sets them or raises
        return postprocess_probs(outputs[0][0], self._tags, self.general_threshold, self.character_threshold)

    def caption(self, image: Image.Image) -> list[tuple[str, float]]:
        return self.tag(image)
