"""Trying a trained LoRA: the same seed with and without it, on the loaded model.

The tab's test panel and ``POST /lora-train/v1/test-image`` make two txt2img images through the
host's own generation (:meth:`Host.generate_pair`): the prompt with ``<lora:NAME:S>`` (the host's
Lora loader applies the file, as in a user's generation) and the same prompt, seed and settings
with every ``<lora:NAME:...>`` of that file taken out, so the pair shows what the file adds. The
file is a run's (a job's ``output_file``, restored jobs included) or one named directly; the host
makes the pair only with a file its Lora list has under that name.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_trainer.config.coerce import request_number
from lora_trainer.errors import ConfigError, LoraTrainerError

if TYPE_CHECKING:
    from PIL import Image

    from lora_trainer.contracts import Host
    from lora_trainer.jobs import Job

__all__ = ["PairRequest", "PairResult", "lora_tag", "make_pair", "pair_prompts", "request_from_dict", "with_strength"]

MAX_SIDE = 2048
MAX_STEPS = 150
MAX_STRENGTH = 2.0
_MAX_SEED = 2**32 - 1
_TAG = re.compile(r"<lora:([^:>]+)(?::[^>]*)?>")


@dataclasses.dataclass(frozen=True)
class PairRequest:
    """One pair: ``file`` at ``strength`` in ``prompt``, and the same without it (the sampler by the host's name)."""

    file: str
    prompt: str
    strength: float = 1.0
    seed: int = 1234
    width: int = 512
    height: int = 512
    steps: int = 20
    cfg_scale: float = 7.0
    sampler: str = "Euler a"

    @property
    def name(self) -> str:
        """The file's name in the host's Lora list (``<lora:NAME:S>``)."""
        return Path(self.file).stem


@dataclasses.dataclass
class PairResult:
    """The images (None where the host's Interrupt came first) and the prompts they were made from."""

    with_lora: Image.Image | None
    without_lora: Image.Image | None
    with_prompt: str
    without_prompt: str

    def to_dict(self) -> dict[str, Any]:
        """The images as base64 PNG (None where missing), as the WebUI's own txt2img API answers."""
        return {
            "with_lora": _png_base64(self.with_lora),
            "without_lora": _png_base64(self.without_lora),
            "with_prompt": self.with_prompt,
            "without_prompt": self.without_prompt,
            "complete": self.with_lora is not None and self.without_lora is not None,
        }


def _png_base64(image: Image.Image | None) -> str | None:
    if image is None:
        return None
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode("ascii")


def lora_tag(name: str, strength: float) -> str:
    return f"<lora:{name}:{strength:g}>"


def _without(prompt: str, name: str) -> str:
    """``prompt`` with every ``<lora:NAME:...>`` removed exactly as the WebUI removes extra-network
    tags before encoding (nothing else: the separators around it stay), so that the two images of
    a pair are conditioned on the same text and differ only by the LoRA."""
    return _TAG.sub(lambda m: "" if m.group(1) == name else m.group(0), prompt).strip()


def with_strength(prompt: str, name: str, strength: float) -> str:
    """``prompt`` with its first ``<lora:NAME:...>`` at ``strength`` where it stands (later copies
    removed), or the tag in front when the prompt has none."""
    tag = lora_tag(name, strength)
    first = next((m for m in _TAG.finditer(prompt) if m.group(1) == name), None)
    if first is None:
        return f"{tag} {prompt.strip()}".strip()
    head, tail = prompt[: first.start()], _without(prompt[first.end() :], name)
    return f"{head}{tag}{tail if not tail or tail[0] in ',;' else ' ' + tail}".strip()


def pair_prompts(prompt: str, name: str, strength: float) -> tuple[str, str]:
    """(the prompt with ``<lora:NAME:strength>``, the same prompt without it, as the WebUI reads it)."""
    with_tag = with_strength(prompt, name, strength)
    return with_tag, _without(with_tag, name)


def _file_of(data: Mapping[str, Any], jobs: Sequence[Job]) -> str:
    job_id, file = data.get("job"), data.get("file")
    if job_id is not None and file is None:
        job = next((j for j in jobs if j.id == job_id), None)
        if job is None:
            raise ConfigError("job", f"no training job {job_id!r}")
        if not job.output_file:
            raise ConfigError("job", f"job {job_id!r} saved no LoRA file")
        file = job.output_file
    if not isinstance(file, str) or not file.strip():
        raise ConfigError("file", 'give the LoRA "file" or the "job" whose file to try')
    path = Path(file)
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        raise ConfigError("file", f"{path.name} is not a .safetensors file that exists")
    return str(path)


def request_from_dict(data: Any, jobs: Sequence[Job] = ()) -> PairRequest:
    """A request from JSON (``file`` or ``job_id``, ``prompt`` ...); a ConfigError names a bad field."""
    if not isinstance(data, Mapping):
        raise ConfigError("body", "must be a JSON object")
    file = _file_of(data, jobs)
    prompt = data.get("prompt", "")
    sampler = data.get("sampler", "Euler a") or "Euler a"
    if not isinstance(prompt, str):
        raise ConfigError("prompt", "must be text")
    if not isinstance(sampler, str):
        raise ConfigError("sampler", "must be a sampler's name")
    width = request_number(data, "width", 512, 64, MAX_SIDE, whole=True)
    height = request_number(data, "height", 512, 64, MAX_SIDE, whole=True)
    for key, side in (("width", width), ("height", height)):
        if side % 8:
            raise ConfigError(key, f"must be a multiple of 8, got {side}")
    return PairRequest(
        file=file,
        prompt=prompt,
        strength=request_number(data, "strength", 1.0, 0.0, MAX_STRENGTH, whole=False),
        seed=request_number(data, "seed", 1234, 0, _MAX_SEED, whole=True),
        width=width,
        height=height,
        steps=request_number(data, "steps", 20, 1, MAX_STEPS, whole=True),
        cfg_scale=request_number(data, "cfg_scale", 7.0, 1.0, 30.0, whole=False),
        sampler=sampler,
    )


def make_pair(host: Host, request: PairRequest) -> PairResult:
    """The pair through :meth:`Host.generate_pair`, under the host's queue lock (generation waits for a run)."""
    with host.gpu_lock():
        images = list(host.generate_pair(request))
    if len(images) > 2:
        raise LoraTrainerError(f"the host made {len(images)} images for a pair")
    images += [None] * (2 - len(images))
    with_prompt, without_prompt = pair_prompts(request.prompt, request.name, request.strength)
    return PairResult(images[0], images[1], with_prompt, without_prompt)
