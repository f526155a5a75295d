"""The AUTOMATIC1111 WebUI as the :class:`~lora_trainer.contracts.Host` training jobs run on.

Owns :class:`WebUIHost`: the folders (the Lora folder and the work folder, from
:mod:`~lora_trainer.backends.webui.options`), a training session on the loaded model (active
Lora networks off, base frozen, everything put back after), the WebUI's queue lock (generation
waits while a run holds it), a job's progress mapped onto ``shared.state`` (progress bar,
Interrupt button), previews through the WebUI's own txt2img, and checking/publishing a
written LoRA file with the WebUI's own Lora loader.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import re
import threading
import weakref
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from modules import call_queue, devices, sd_vae, shared
from torch import nn

from lora_trainer.backends.webui import options
from lora_trainer.backends.webui.attention import TrainingAttention, planned_attention, use_training_attention
from lora_trainer.backends.webui.guard import lora_extension, model_guard, no_block_checkpointing, take_networks_off
from lora_trainer.backends.webui.model import (
    WebUIAdapter,
    checkpoint_label,
    detect_model,
    environment_problem,
    loaded_model,
    text_encoders,
    vae_label,
)
from lora_trainer.backends.webui.placement import LowVramPlacement, is_lowvram, taken_over
from lora_trainer.config import TrainConfig
from lora_trainer.contracts import DeviceMemory, ModelInfo
from lora_trainer.errors import ConfigError, IncompatibleModelError, LoraFileError, LoraTrainerError
from lora_trainer.files.lora_file import load_lora
from lora_trainer.files.safetensors_format import read_safetensors_header
from lora_trainer.log import logger
from lora_trainer.networks.network import network_from_weights
from lora_trainer.train.device import device_memory
from lora_trainer.train.memory import ModelProfile, profile_model

if TYPE_CHECKING:
    from PIL import Image

    from lora_trainer.grid import GridCell, GridSettings
    from lora_trainer.jobs import Job
    from lora_trainer.tryout import PairRequest

__all__ = ["MAX_SEED", "WebUIHost"]

MAX_SEED = 2**32 - 1
_STATE_FIELDS = ("job", "job_count", "job_no", "sampling_step", "sampling_steps", "textinfo")


def _format_eta(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _torch_gc() -> None:
    devices.torch_gc()


def _unet_dtype(sd_model: nn.Module | None) -> torch.dtype:
    """The dtype the loaded model's UNet computes in (the WebUI's default without a model)."""
    unet = getattr(getattr(sd_model, "model", None), "diffusion_model", None)
    weight = next(iter(unet.parameters()), None) if isinstance(unet, nn.Module) else None
    return weight.dtype if weight is not None else devices.dtype_unet


def _clear_cond_cache() -> None:
    """Forget the conditionings processing keeps across generations (``opts.persistent_cond_cache``):
    ours carry the text encoder LoRA being trained."""
    from modules import processing

    for cls in (processing.StableDiffusionProcessing, processing.StableDiffusionProcessingTxt2Img):
        for name in ("cached_c", "cached_uc", "cached_hr_c", "cached_hr_uc"):
            if name in cls.__dict__:
                setattr(cls, name, [None, None])


def _model_changed(trained: tuple[weakref.ref, str] | None) -> bool:
    """True when ``trained`` (a model and its checkpoint label) is no longer the loaded model: a
    checkpoint change queued behind a run loads as soon as the run lets go of the queue lock."""
    if trained is None:
        return False
    ref, label = trained
    current = loaded_model()
    return current is None or ref() is not current or checkpoint_label(current) != label


def _shape_mismatch(module: Any, mapping: Mapping[str, nn.Module]) -> str | None:
    """Why a loaded LoRA module's delta would not fit its layer (LoRA modules only), else None."""
    up, down = getattr(module, "up_model", None), getattr(module, "down_model", None)
    if up is None or down is None or getattr(module, "mid_model", None) is not None:
        return None
    up_w, down_w = up.weight, down.weight
    numel = up_w.shape[0] * down_w.shape[1] * int(np.prod(down_w.shape[2:], dtype=np.int64))
    layer = module.sd_module
    if isinstance(layer, nn.MultiheadAttention):
        e = layer.embed_dim
        shape: tuple[int, ...] = (e, e)
    else:
        weight = getattr(layer, "weight", None)
        if weight is None:
            return None
        shape = tuple(weight.shape)
    expected = int(np.prod(shape, dtype=np.int64))
    if numel != expected:
        got = (up_w.shape[0], down_w.shape[1], *down_w.shape[2:])
        return f"delta {tuple(got)} does not fit the layer's weight {shape}"
    return None


def _attention_problems(placed: Mapping[str, Any], mapping: Mapping[str, nn.Module]) -> list[str]:
    """File modules on a fused attention layer that lacks one of q/k/v/out (the WebUI skips the layer)."""
    attention: dict[str, dict[str, str]] = defaultdict(dict)
    for file_key, module in placed.items():
        match = re.fullmatch(r"(.+)_(q|k|v|out)_proj", str(getattr(module, "sd_key", "")))
        if match and isinstance(mapping.get(match.group(1)), nn.MultiheadAttention):
            attention[match.group(1)][match.group(2)] = file_key
    problems: list[str] = []
    for parts in attention.values():
        missing = [p for p in ("q", "k", "v", "out") if p not in parts]
        if missing:
            lacking = "/".join(f"{p}_proj" for p in missing)
            problems += [f"{key} (its attention layer lacks {lacking}: the WebUI skips it)" for key in parts.values()]
    return problems


class WebUIHost:
    """The WebUI as the :class:`~lora_trainer.jobs.Host` training jobs run on."""

    def __init__(self, work_dir: str | os.PathLike | None = None):
        self._work_dir = Path(work_dir) if work_dir is not None else None
        self._state_owner: str | None = None  # id of the job whose shared.state job is running
        self._state_lock = threading.Lock()
        self._sample_seed = random.randint(0, MAX_SEED)
        self._trained: tuple[weakref.ref, str] | None = None  # the model of the last run, and its checkpoint
        self._placement: LowVramPlacement | None = None  # a run's placement under --medvram/--lowvram
        self._attention: TrainingAttention | None = None  # a run's attention in place of the WebUI's

    # -- folders

    @property
    def lora_dir(self) -> Path:
        """The WebUI's Lora folder (``--lora-dir``), plus the subfolder setting."""
        return options.lora_dir()

    def allowed_output_roots(self) -> list[Path] | None:
        """The Lora folder; None (anywhere) when the "allow any output folder" setting is on."""
        return options.allowed_output_roots()

    @property
    def work_dir(self) -> Path:
        """The folder given to the host, else the WebUI's (``<data dir>/lora_train``)."""
        return self._work_dir or options.default_work_dir()

    @staticmethod
    def task_id(job: Job) -> str:
        """The WebUI progress task id of a job (``/internal/progress`` reports on it while it runs)."""
        return f"task(lora_train-{job.id})"

    # -- the model

    def model_info(self) -> ModelInfo:
        sd_model = loaded_model()
        if sd_model is None:
            return ModelInfo(None, "", "", "no model is loaded yet: pick a checkpoint at the top of the page")
        checkpoint, vae = checkpoint_label(sd_model), vae_label()
        try:
            family, prediction_type = detect_model(sd_model)
        except IncompatibleModelError as e:
            return ModelInfo(None, checkpoint, vae, str(e))
        info = getattr(sd_model, "sd_checkpoint_info", None)
        return ModelInfo(
            family,
            checkpoint,
            vae,
            environment_problem(sd_model),
            checkpoint_path=str(getattr(info, "filename", "") or ""),
            vae_path=str(sd_vae.loaded_vae_file or ""),
            prediction_type=prediction_type,
        )

    def free_memory(self) -> DeviceMemory:
        """The WebUI's device now (``torch.cuda.mem_get_info`` on CUDA, available RAM on the CPU), the
        attention a run trains with and the --medvram/--lowvram placement, for the memory plan."""
        cmd_opts = shared.cmd_opts
        sd_model = loaded_model()
        attention = planned_attention(devices.device, _unet_dtype(sd_model))
        sdxl = bool(getattr(sd_model, "is_sdxl", False))
        placement = ""
        if getattr(cmd_opts, "lowvram", False):
            placement = "lowvram"
        elif getattr(cmd_opts, "medvram", False) or (sdxl and getattr(cmd_opts, "medvram_sdxl", False)):
            placement = "medvram"
        memory = device_memory(devices.device, attention=attention, placement=placement)
        if memory.free_bytes is None or sd_model is None or memory.device != "cuda":
            return memory
        # the loaded model's weights are already taken from the free memory, and the plan counts them itself
        held = {id(t): t for t in [*sd_model.parameters(), *sd_model.buffers()] if t.device.type == "cuda"}
        resident = sum(t.numel() * t.element_size() for t in held.values())
        return dataclasses.replace(memory, free_bytes=memory.free_bytes + resident)

    def model_profile(self) -> ModelProfile | None:
        """Sizes of the loaded model for the memory plan (read only: nothing moves or changes)."""
        sd_model = loaded_model()
        try:
            family, _ = detect_model(sd_model)
        except IncompatibleModelError:
            return None
        assert sd_model is not None  # detect_model raised otherwise
        unet = sd_model.model.diffusion_model
        vae = getattr(sd_model, "first_stage_model", None)
        return profile_model(family, unet, text_encoders(sd_model, family), vae)

    @contextlib.contextmanager
    def training_session(self) -> Iterator[WebUIAdapter]:
        """The loaded model for one run: active Lora networks taken off, base frozen; on exit every
        setting, flag, hook and mode is put back, gradients dropped and the GPU cache emptied.
        Under --medvram/--lowvram the run places the model's parts itself (``placement.taken_over``)."""
        sd_model = loaded_model()
        family, prediction_type = detect_model(sd_model)
        assert sd_model is not None  # detect_model raised otherwise
        problem = environment_problem(sd_model)
        if problem:
            raise IncompatibleModelError(problem)
        with contextlib.ExitStack() as stack:
            stack.callback(_torch_gc)
            take_networks_off(sd_model)
            stack.enter_context(model_guard(sd_model))
            no_block_checkpointing(sd_model.model.diffusion_model, stack)
            self._attention = use_training_attention(stack, devices.device, _unet_dtype(sd_model))
            stack.callback(setattr, self, "_attention", None)
            placement = None
            if is_lowvram(sd_model):
                placement = stack.enter_context(taken_over(sd_model))
                self._placement = placement
                stack.callback(setattr, self, "_placement", None)
            self._sample_seed = random.randint(0, MAX_SEED)
            self._trained = (weakref.ref(sd_model), checkpoint_label(sd_model))
            yield WebUIAdapter(
                sd_model, undo=stack, family=family, prediction_type=prediction_type, placement=placement
            )

    # -- the queue and shared.state

    @contextlib.contextmanager
    def gpu_lock(self) -> Iterator[None]:
        """The WebUI's queue lock: UI and API generations wait while a run holds it. Our
        ``shared.state`` job ends before it is released, so the next generation's begins clean."""
        with call_queue.queue_lock:
            try:
                yield
            finally:
                self._end_state()

    def on_job_start(self, job: Job) -> None:
        state = shared.state
        with self._state_lock:
            state.begin(job=self.task_id(job))
            state.job_count, state.job_no = 1, 0
            state.sampling_step, state.sampling_steps = 0, 0
            state.textinfo = self._textinfo(job)
            self._state_owner = job.id
        with contextlib.suppress(Exception):  # progress reporting is a nicety: nothing of it may stop a run
            from modules import progress

            progress.start_task(self.task_id(job))

    def on_job_progress(self, job: Job) -> None:
        with self._state_lock:
            if self._state_owner != job.id:
                return
            state = shared.state
            state.sampling_steps = max(int(job.total_steps or 0), 0)
            state.sampling_step = min(int(job.step or 0), state.sampling_steps)
            state.textinfo = self._textinfo(job)

    def on_job_end(self, job: Job) -> None:
        self._end_state(job.id)
        with contextlib.suppress(Exception):  # progress reporting is a nicety: nothing of it may fail a run
            from modules import progress

            progress.finish_task(self.task_id(job))

    def _end_state(self, job_id: str | None = None) -> None:
        with self._state_lock:
            if self._state_owner is None or (job_id is not None and job_id != self._state_owner):
                return
            state = shared.state
            state.end()
            # as wrap_gradio_call does after a UI job: an Interrupt meant for us must not outlive us
            state.interrupted = state.skipped = state.stopping_generation = False
            self._state_owner = None

    @staticmethod
    def _textinfo(job: Job) -> str:
        name = job.config.save.output_name
        if job.step and job.total_steps:
            loss = f", loss {job.avg_loss:.4f}" if job.avg_loss is not None else ""
            rate = f", {job.steps_per_s:.2f} it/s" if job.steps_per_s else ""
            return (
                f"Training LoRA '{name}': step {job.step}/{job.total_steps}{loss}{rate}, ETA {_format_eta(job.eta_s)}"
            )
        return f"Training LoRA '{name}': {job.phase or 'starting'}"

    def interrupted(self) -> bool:
        """The WebUI's Interrupt button (also its "stop after current" variant). Skip is not a stop."""
        state = shared.state
        return bool(state.interrupted or getattr(state, "stopping_generation", False))

    # -- files

    def verify_lora(self, path: str | os.PathLike) -> list[str]:
        """Load ``path`` with the WebUI's own Lora loader; return the file's modules that would not
        land on the model: keys it matches to no layer, fused-attention layers missing one of
        q/k/v/out (the WebUI then skips the whole layer) and deltas whose shape does not fit."""
        path = Path(path)
        trained, self._trained = self._trained, None  # the check right after a run is against that run's model
        if _model_changed(trained):
            logger.warning("the model changed after training; %s was not checked against it", path.name)
            return []
        networks = lora_extension()
        if networks is None:
            return self._verify_ourselves(path)
        header = read_safetensors_header(path)
        file_modules = {key.partition(".")[0] for key in header.tensors}
        try:
            on_disk = networks.network.NetworkOnDisk(path.stem, str(path))
            net = networks.load_network(path.stem, on_disk)
        except Exception as e:  # whatever the WebUI's loader raises, said as a LoraFileError
            raise LoraFileError(f"the WebUI's Lora loader cannot load {path.name}: {type(e).__name__}: {e}") from e
        sd_model = loaded_model()
        mapping = getattr(sd_model, "network_layer_mapping", None) or {}
        placed = {str(getattr(m, "network_key", "")).partition(".")[0]: m for m in net.modules.values()}
        problems = sorted(file_modules - set(placed) - {"bundle_emb"})
        problems += _attention_problems(placed, mapping)
        for file_key, module in placed.items():
            mismatch = _shape_mismatch(module, mapping)
            if mismatch:
                problems.append(f"{file_key} ({mismatch})")
        if sd_model is None or _model_changed(trained or (weakref.ref(sd_model), checkpoint_label(sd_model))):
            logger.warning("the model changed while %s was being checked; its result is not used", path.name)
            return []
        return sorted(problems)

    def _verify_ourselves(self, path: Path) -> list[str]:
        sd_model = loaded_model()
        family, _ = detect_model(sd_model)
        assert sd_model is not None  # detect_model raised otherwise
        state, _ = load_lora(path)
        unet = sd_model.model.diffusion_model
        _, unplaced = network_from_weights(state, family, unet, text_encoders(sd_model, family))
        return unplaced

    def publish_lora(self, path: str | os.PathLike) -> None:
        """Refresh the WebUI's Lora list (as ``/sdapi/v1/refresh-loras``) so the file shows in
        ``/sdapi/v1/loras`` and in the Lora tab (after the tab's own refresh)."""
        networks = lora_extension()
        if networks is None:
            return
        networks.list_available_networks()
        if Path(path).stem not in getattr(networks, "available_networks", {}):
            logger.info("%s is outside the WebUI's Lora folder, so the Lora tab does not list it", path)

    # -- previews

    def sample_images(self, prompts: Sequence[str], cfg: TrainConfig, step: int) -> list[Image.Image]:
        """txt2img with the network being trained attached (its hooks are on the model), through
        the WebUI's own processing, inside the running job (the queue lock is already ours)."""
        from modules import processing

        prompts = [str(p) for p in prompts]
        if not prompts:
            return []
        sd_model = loaded_model()
        s = cfg.sample
        width, height = cfg.dataset.resolution_wh
        title = getattr(getattr(sd_model, "sd_checkpoint_info", None), "title", None)
        # a checkpoint picked in the UI during the run must not be loaded by this call: pin the loaded one
        pin = title and shared.opts.data.get("sd_model_checkpoint") != title
        state = shared.state
        saved = {name: getattr(state, name, None) for name in _STATE_FIELDS}
        _clear_cond_cache()
        try:
            p = processing.StableDiffusionProcessingTxt2Img(
                sd_model=sd_model,
                prompt=prompts,
                negative_prompt="",
                sampler_name=s.sample_sampler,
                steps=s.sample_steps,
                cfg_scale=s.sample_cfg,
                seed=s.sample_seed if s.sample_seed is not None else self._sample_seed,
                width=s.sample_width or width,
                height=s.sample_height or height,
                batch_size=1,
                n_iter=len(prompts),
                do_not_save_samples=True,
                do_not_save_grid=True,
                do_not_reload_embeddings=True,
                override_settings={"sd_model_checkpoint": title} if pin else {},
                override_settings_restore_afterwards=True,
            )
            p.disable_extra_networks = True  # <lora:...> in a preview prompt would merge into the weights
            placement, attention = self._placement, self._attention
            with (
                contextlib.closing(p),
                placement.webui_placement() if placement else contextlib.nullcontext(),
                attention.webui_choice() if attention else contextlib.nullcontext(),  # the WebUI's attention
            ):
                processed = processing.process_images(p)  # under --medvram/--lowvram with the WebUI's hooks
            first = int(getattr(processed, "index_of_first_image", 0) or 0)
            images = list(processed.images)[first:]
        finally:
            _clear_cond_cache()
            if sd_model is not None:
                take_networks_off(sd_model)
            for name, value in saved.items():
                setattr(state, name, value)
        if images:
            with contextlib.suppress(Exception):  # the live preview is a nicety: the images are returned anyway
                state.assign_current_image(images[0])
        return images

    # -- generation outside a run (grid, test panel)

    def _txt2img(
        self,
        prompt: str,
        seed: int,
        width: int,
        height: int,
        steps: int,
        cfg_scale: float,
        sampler: str,
        extra_networks_prompt: bool,
    ) -> Image.Image | None:
        """One image through the WebUI's own txt2img (its sampler, progress and Interrupt), the loaded
        checkpoint pinned. ``extra_networks_prompt``: ``<lora:...>`` in ``prompt`` is applied by the
        WebUI's extra networks, as in a user's generation. None when interrupted before the image."""
        from modules import processing

        sd_model = loaded_model()
        title = getattr(getattr(sd_model, "sd_checkpoint_info", None), "title", None)
        pin = title and shared.opts.data.get("sd_model_checkpoint") != title
        p = processing.StableDiffusionProcessingTxt2Img(
            sd_model=sd_model,
            prompt=prompt,
            negative_prompt="",
            sampler_name=sampler,
            steps=steps,
            cfg_scale=cfg_scale,
            seed=seed,
            width=width,
            height=height,
            batch_size=1,
            n_iter=1,
            do_not_save_samples=True,
            do_not_save_grid=True,
            override_settings={"sd_model_checkpoint": title} if pin else {},
            override_settings_restore_afterwards=True,
        )
        p.disable_extra_networks = not extra_networks_prompt
        with contextlib.closing(p):
            processed = processing.process_images(p)
        first = int(getattr(processed, "index_of_first_image", 0) or 0)
        images = list(processed.images)[first:]
        return images[0] if images else None

    def _check_lora_names(self, files: Sequence[str]) -> None:
        """Each file must be the one the WebUI's Lora list has under its name (``<lora:NAME:S>``)."""
        networks = lora_extension()
        if networks is None:
            raise LoraTrainerError("the WebUI's builtin Lora extension is not loaded: enable it to make a grid")
        networks.list_available_networks()
        available = getattr(networks, "available_networks", {})
        for file in dict.fromkeys(files):
            on_disk = available.get(Path(file).stem)
            if on_disk is None or Path(on_disk.filename).resolve() != Path(file).resolve():
                name = Path(file).name
                raise ConfigError("files", f"{name} is not in the WebUI's Lora list under its name (or another has it)")

    def _check_sampler(self, sampler: str) -> None:
        """``sampler`` must be one the WebUI offers (its processing would assert deep in the call)."""
        names = options.sampler_names()
        if names and sampler not in names:
            raise ConfigError("sampler", f"{sampler!r} is not one of the WebUI's samplers: {', '.join(names)}")

    def _generate(
        self, job: str, items: Sequence[tuple[str, int, str]], settings: Any, *, nan_ok: bool = False
    ) -> list[Image.Image | None]:
        """Each ``(prompt, seed, what)`` through :meth:`_txt2img` at ``settings``' size, steps, CFG and
        sampler, ``<lora:...>`` tags applied by the WebUI; progress and Interrupt through
        ``shared.state`` (an Interrupt ends the series); the Lora networks taken off the model after.
        The WebUI's NaN check failing is a None image with ``nan_ok``, else a LoraTrainerError."""
        self._check_sampler(settings.sampler)
        s = settings
        state = shared.state
        images: list[Image.Image | None] = []
        state.begin(job=job)
        state.job_count = len(items)
        try:
            for i, (prompt, seed, what) in enumerate(items):
                if self.interrupted():
                    break
                state.job_no = i
                state.textinfo = f"{what} ({i + 1}/{len(items)})"
                try:
                    image = self._txt2img(prompt, seed, s.width, s.height, s.steps, s.cfg_scale, s.sampler, True)
                except devices.NansException as e:
                    logger.warning("%s: no image for %r: %s", what, prompt, e)
                    if not nan_ok:
                        raise LoraTrainerError(f"the WebUI's generation gave NaN for {prompt!r}: {e}") from None
                    images.append(None)
                    continue
                if image is None:
                    break
                images.append(image)
                with contextlib.suppress(Exception):  # the live preview is a nicety
                    state.assign_current_image(image)
        finally:
            sd_model = loaded_model()
            if sd_model is not None:
                take_networks_off(sd_model, f"after {job}")
            state.end()
            state.interrupted = state.skipped = state.stopping_generation = False
        return images

    def generate_grid_cells(self, cells: Sequence[GridCell], settings: GridSettings) -> list[Image.Image | None]:
        """Each cell with ``<lora:NAME:S>`` in its prompt (none at strength 0), a blank cell where the
        WebUI's NaN check failed; see :meth:`_generate`."""
        self._check_lora_names([c.file for c in cells])
        items = [(c.full_prompt, c.seed, "LoRA grid") for c in cells]
        return self._generate("lora_train_grid", items, settings, nan_ok=True)

    def generate_pair(self, request: PairRequest) -> list[Image.Image]:
        """[with, without] at one seed: the prompt with ``<lora:NAME:S>`` and the prompt with no tag of
        that file (the WebUI then loads no network of it); see :meth:`_generate`."""
        from lora_trainer.tryout import pair_prompts

        try:
            self._check_lora_names([request.file])
        except ConfigError as e:
            raise ConfigError("file", e.message) from None
        prompts = pair_prompts(request.prompt, request.name, request.strength)
        whats = (f"LoRA test: with {request.name}", f"LoRA test: without {request.name}")
        items = [(prompt, request.seed, what) for prompt, what in zip(prompts, whats, strict=True)]
        return [image for image in self._generate("lora_train_test_image", items, request) if image is not None]
