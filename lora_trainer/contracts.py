"""The two contracts the core depends on: the model (:class:`ModelAdapter`) and the host (:class:`Host`).

The core never reaches into a model or the program it runs in on its own. A *model adapter*
hands it the pieces below; the WebUI adapter (``lora_trainer/backends/``) builds them from
``modules.shared.sd_model`` and the tests build them from tiny models whose module
names and classes follow the WebUI's own (ldm names for SD1/SD2, sgm names for SDXL).

Families and their parts::

    family  unet (denoiser)                 text_encoders                  cond.vector
    sd1     ldm UNetModel                   {"te": HF CLIPTextModel}      None
    sd2     ldm UNetModel (linear proj)     {"te": OpenCLIP model}        None
    sdxl    sgm UNetModel                   {"te1": HF CLIPTextModel,     (B, adm_in_channels):
                                             "te2": OpenCLIP model}        pooled te2 + size embeddings

The module trees are what LoRA attaches to, and their module names decide the
kohya keys (``lora_trainer.naming``): ``unet`` must yield ldm/sgm names
(``input_blocks.1.1.proj_in``) or be a diffusers ``UNet2DConditionModel`` (whose names give the
same kohya keys), an HF text encoder ``text_model.encoder.layers.N...``,
an OpenCLIP text encoder ``transformer.resblocks.N...``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import nn

if TYPE_CHECKING:
    from PIL import Image

    from lora_trainer.config import TrainConfig
    from lora_trainer.grid import GridCell, GridSettings
    from lora_trainer.jobs import Job
    from lora_trainer.train.memory import ModelProfile
    from lora_trainer.tryout import PairRequest

FAMILIES = ("sd1", "sd2", "sdxl")
PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass(frozen=True)
class SizeCond:
    """SDXL micro-conditioning of one sample, in pixels (kohya and sgm order: height, width)."""

    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]


@dataclass
class Conditioning:
    """What the denoiser is conditioned on, for a batch.

    ``context``: cross-attention context (B, T, C), T = 77 * number of 75-token chunks.
    ``vector``: SDXL's ``y`` (pooled text embedding + size embeddings), None for SD1/SD2.
    """

    context: torch.Tensor
    vector: torch.Tensor | None = None

    def to(self, *args, **kwargs) -> Conditioning:
        return Conditioning(
            self.context.to(*args, **kwargs),
            None if self.vector is None else self.vector.to(*args, **kwargs),
        )

    def detach(self) -> Conditioning:
        return Conditioning(self.context.detach(), None if self.vector is None else self.vector.detach())


@runtime_checkable
class ModelAdapter(Protocol):
    """A loaded SD1/SD2/SDXL model as the trainer sees it.

    Attributes:
        family: "sd1", "sd2" or "sdxl".
        prediction_type: "epsilon" or "v_prediction" (SD2-768-v models).
        device: where the model runs.
        dtype: dtype of the UNet's weights (fp16 in a default WebUI).
        alphas_cumprod: (1000,) float32 tensor of the model's noise schedule, on any device.
        unet: the denoiser module that LoRA attaches to (ldm/sgm ``UNetModel``).
        text_encoders: {"te": ...} for SD1/SD2, {"te1": ..., "te2": ...} for SDXL.
        model_name: the checkpoint's name, for metadata (``ss_sd_model_name``).
        model_hash: the checkpoint's hash if known, else "" (``ss_new_sd_model_hash``).
        vae_name: the VAE in use, for metadata and the latent-cache key ("" if built in).

    Optional: ``model_legacy_hash`` (str), the checkpoint's old 8-hex WebUI hash
    (``ss_sd_model_hash``; "" or absent when unknown).

    Optional: ``default_clip_skip`` (int), the host's own clip-skip setting, used when the
    config leaves ``training.clip_skip`` unset (1 when the adapter has none).

    Optional: ``encode_images_fp32(pixels) -> latents``, :meth:`encode_images` with the VAE run in
    float32 for that call and put back as it was afterwards (the WebUI's automatic VAE precision
    fallback, on encode). The trainer calls it for images a half-precision VAE turned into NaN/inf;
    without it such an image stops the run.

    Optional: ``place(parts) -> ContextManager[None]``, for hosts that keep parts of the model in CPU
    memory (the WebUI's --medvram/--lowvram): for the block, the parts named (of :data:`MODEL_PARTS`)
    are on :attr:`device` and the others in CPU memory; afterwards the placement before it is back.
    The trainer calls it through :func:`placement` (a no-op for an adapter without it).
    """

    family: str
    prediction_type: str
    device: torch.device
    dtype: torch.dtype
    alphas_cumprod: torch.Tensor
    unet: nn.Module
    text_encoders: dict[str, nn.Module]
    model_name: str
    model_hash: str
    vae_name: str

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Encode images to scaled latents, without gradients.

        pixels: (B, 3, H, W) float in [-1, 1], H and W multiples of 8, on any device/dtype.
        Returns (B, 4, H/8, W/8) latents already multiplied by the VAE scale factor.
        """
        ...

    def encode_text(
        self,
        captions: Sequence[str],
        *,
        clip_skip: int = 1,
        max_token_length: int = 75,
        size_cond: Sequence[SizeCond] | None = None,
        weighted_captions: bool = False,
    ) -> Conditioning:
        """Turn captions into conditioning, differentiably w.r.t. any LoRA on the text encoders.

        clip_skip: 1 = last layer, 2 = penultimate ... (SDXL ignores it, as kohya does).
        max_token_length: 75, 150 or 225; captions are split into 75-token chunks, each
            encoded as its own 77-token window and concatenated (the WebUI's way).
        size_cond: SDXL only, one per caption.
        weighted_captions: read captions in the host's prompt syntax (emphasis such as ``(x:1.2)``,
            ``BREAK``, textual-inversion names); False (kohya's default): the text as it is.
        """
        ...

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Run the denoiser: returns the model output (epsilon or v) shaped like ``noisy_latents``."""
        ...


MODEL_PARTS = ("vae", "text_encoders", "unet")
"""The parts of a model :func:`placement` moves: the VAE, the text encoder(s), the denoiser."""


def placement(adapter: object, parts: Iterable[str]) -> ContextManager[None]:
    """``adapter.place(parts)`` when the adapter places parts itself, else a context that does nothing.

    The trainer wraps each phase of a run in it: the VAE while latents are encoded, the text
    encoders while captions are encoded, the parts the steps use for the steps.
    """
    wanted = frozenset(parts)
    unknown = wanted - set(MODEL_PARTS)
    if unknown:
        raise ValueError(f"unknown model parts {sorted(unknown)}; expected some of {MODEL_PARTS}")
    place: Callable[[frozenset[str]], ContextManager[None]] | None = getattr(adapter, "place", None)
    return place(wanted) if place is not None else contextlib.nullcontext()


@dataclass(frozen=True)
class ModelInfo:
    """The loaded model as the tab shows it; ``problem`` says why it cannot be trained, if so.

    ``checkpoint_path`` / ``vae_path``: the files loaded ("" when unknown or built in), and
    ``prediction_type``, for the command line that trains the same model without the host.
    """

    family: str | None
    checkpoint: str
    vae: str
    problem: str | None = None
    checkpoint_path: str = ""
    vae_path: str = ""
    prediction_type: str = ""


@dataclass(frozen=True)
class DeviceMemory:
    """The device a run would train on and its memory now, for the memory plan.

    ``device``: "cuda", "mps" or "cpu"; ``free_bytes``: what a run can use, the loaded model's weights
    already on the device included (the plan counts them itself); ``total_bytes``; None when unknown;
    ``attention``: the host's attention implementation ("sdp", "xformers", "Doggettx" ...; "" unknown);
    ``placement``: "" or the host's "medvram"/"lowvram" (parts not in use kept in CPU memory).
    """

    device: str
    free_bytes: int | None
    total_bytes: int | None
    name: str = ""
    attention: str = ""
    placement: str = ""


class Host(Protocol):
    """What a job needs from the program it runs in."""

    @property
    def lora_dir(self) -> Path:
        """Where finished LoRAs go (the WebUI's --lora-dir)."""
        ...

    @property
    def work_dir(self) -> Path:
        """Latent caches, resume states, samples."""
        ...

    def allowed_output_roots(self) -> Sequence[Path] | None:
        """The folders a run may write its LoRA under (the Lora folder); None: anywhere, which only
        the host's own settings may allow, never a request."""
        ...

    def model_info(self) -> ModelInfo: ...

    def free_memory(self) -> DeviceMemory:
        """The training device's free and total memory now (CUDA: ``mem_get_info``; CPU: available RAM)."""
        ...

    def model_profile(self) -> ModelProfile | None:
        """Sizes of the loaded model for the memory plan (``train.memory.profile_model``); None if none is loaded."""
        ...

    def training_session(self) -> ContextManager[ModelAdapter]:
        """The loaded model as a ModelAdapter, for one run; puts everything back on exit."""
        ...

    def gpu_lock(self) -> ContextManager[object]:
        """Held for the whole run: generation waits meanwhile."""
        ...

    def on_job_start(self, job: Job) -> None: ...

    def on_job_progress(self, job: Job) -> None: ...

    def on_job_end(self, job: Job) -> None: ...

    def interrupted(self) -> bool:
        """The host's own stop button (the WebUI's Interrupt)."""
        ...

    def verify_lora(self, path: Path) -> list[str]:
        """Load the file as the host's own loader would; return what did not land on a module."""
        ...

    def publish_lora(self, path: Path) -> None:
        """Make a new file visible (refresh the host's Lora list)."""
        ...

    def sample_images(self, prompts: Sequence[str], cfg: TrainConfig, step: int) -> list[Any]:
        """Images (PIL) for the prompts with the network being trained attached."""
        ...

    def generate_grid_cells(self, cells: Sequence[GridCell], settings: GridSettings) -> list[Image.Image | None]:
        """One txt2img image per cell, in order, through the host's own generation: ``cell.full_prompt``
        (``<lora:NAME:S>`` applied by the host's Lora loader; none at strength 0), ``cell.seed`` and
        ``settings``. The caller holds :meth:`gpu_lock`. The host's progress shows the cells; on its
        Interrupt the images so far are returned. A cell whose generation gave NaN (an over-trained
        file at a high strength) is None. Afterwards no network is left on the model."""
        ...

    def generate_pair(self, request: PairRequest) -> Sequence[Image.Image]:
        """[with, without]: ``request.prompt`` at ``request.seed`` through the host's own txt2img, once with
        ``<lora:NAME:strength>`` (applied by the host's Lora loader) and once with no tag of that file
        (``tryout.pair_prompts``), the rest the same. The caller holds :meth:`gpu_lock`. The host's
        progress shows the two images; on its Interrupt the images so far are returned. Afterwards no
        network is left on the model."""
        ...
