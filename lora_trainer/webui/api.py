"""REST API: train LoRAs over HTTP, under ``/lora-train/v1``.

Routes (JSON in and out)::

    GET  /lora-train/v1/schema              JSON schema of the config (TrainConfig.to_dict() shape)
    GET  /lora-train/v1/presets             [{name, description, source, config}]
    GET  /lora-train/v1/model               the loaded model: {family, checkpoint, vae, problem}
    POST /lora-train/v1/jobs                start a job -> 202 with its status
    GET  /lora-train/v1/jobs                every job kept, oldest first (with those of earlier sessions:
                                            ``restored``; a stopped one with its resume state: ``resumable``)
    GET  /lora-train/v1/jobs/{id}           one job; ?losses=true adds the loss of every step
    POST /lora-train/v1/jobs/{id}/cancel    ask a job to stop (it saves what it trained) -> 202
    POST /lora-train/v1/jobs/{id}/resume    continue a resumable job with its settings -> 202, the new job
    POST /lora-train/v1/plan                the memory and time plan of a config (same body as /jobs):
                                            estimated peak vs free memory, parts, s/step, what to change
    POST /lora-train/v1/grid                an epoch x strength grid on the loaded model: {"files": [...]} or
                                            {"job": id}, "prompts", "strengths", "seed", "size", "steps",
                                            "sampler", "cfg_scale" -> {"image", "cells", "suggested", ...}
    POST /lora-train/v1/keep                keep one file as the final NAME.safetensors: {"file", "job",
                                            "name", "replace", "remove_others"} -> {"path", "removed", ...}
    POST /lora-train/v1/test-image          one file at one seed with and without it: {"file"} or {"job"},
                                            "prompt", "strength", "seed", "width", "height", "steps",
                                            "cfg_scale", "sampler" -> {"with_lora", "without_lora" (base64
                                            PNG), "with_prompt", "without_prompt", "complete"}

``POST /jobs`` takes either the config itself (``{"dataset": {...}, "network": {...}, ...}``,
missing settings take their defaults) or ``{"preset": name, "config": {...overrides}}``, plus
``"resume": true`` to continue a stopped run.

Every error is ``{"error": message, "field": dotted setting or null}``: 422 for an invalid
setting or dataset, 409 when a job is already running or the loaded model cannot be trained,
503 when no model is loaded, 404 for an unknown job, 401 without valid credentials, 500 with a
one-line message for anything unexpected (details go to the log, never to the client).

Authentication follows the WebUI's ``--api-auth user:pass[,user2:pass2]`` (``modules/api/api.py``):
HTTP Basic, passwords compared in constant time, 401 with ``WWW-Authenticate: Basic``; the list is
parsed by :func:`lora_trainer.credentials.parse_credentials`.

This module imports neither gradio nor the WebUI: it only needs a :class:`JobManager`.
"""

from __future__ import annotations

import base64
import binascii
import copy
import dataclasses
import functools
import math
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from lora_trainer.config import TrainConfig, get_preset, list_presets, load_preset
from lora_trainer.credentials import parse_credentials
from lora_trainer.errors import ConfigError, DatasetError, IncompatibleModelError, LoraTrainerError
from lora_trainer.grid import best_file, files_of_job, keep_file, make_grid, settings_from_dict
from lora_trainer.jobs import Job, JobBusyError, JobManager, UnknownJobError
from lora_trainer.log import logger
from lora_trainer.tryout import make_pair, request_from_dict

__all__ = ["PREFIX", "ApiError", "config_from_request", "create_router", "mount"]

PREFIX = "/lora-train/v1"
_START_BODY = (
    'The settings as GET /schema describes them, or {"preset": name, "config": overrides}; '
    'plus "resume": true to continue a stopped run.'
)


class ApiError(Exception):
    """An error response: status, message and the offending field (if any)."""

    def __init__(self, status: int, message: str, field: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers


def _authorized(request: Request, credentials: Mapping[str, str]) -> bool:
    scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic" or not encoded:
        return False
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return False
    user, sep, password = decoded.partition(":")
    if not sep:
        return False
    ok = False
    for known_user, known_password in credentials.items():  # every entry, so timing does not tell users apart
        same_user = secrets.compare_digest(user.encode(), known_user.encode())
        same_password = secrets.compare_digest(password.encode(), known_password.encode())
        ok = ok or (same_user and same_password)
    return ok


def _jsonable(value: Any) -> Any:
    """JSON-safe copy: NaN and infinities (a diverged loss, an unknown ETA) become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _error_body(message: str, field: str | None = None) -> dict[str, Any]:
    return {"error": message, "field": field}


def _one_line(text: str, limit: int = 300) -> str:
    line = next((part.strip() for part in str(text).splitlines() if part.strip()), "")
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _validation_error(exc: RequestValidationError) -> ApiError:
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
    return ApiError(422, f"invalid request: {first.get('msg', 'malformed')}", ".".join(loc) or None)


def _to_api_error(exc: Exception) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ConfigError):
        return ApiError(422, exc.message, exc.field)
    if isinstance(exc, DatasetError):
        return ApiError(422, str(exc))
    if isinstance(exc, JobBusyError):
        return ApiError(409, str(exc))
    if isinstance(exc, UnknownJobError):
        return ApiError(404, str(exc.args[0]) if exc.args else "no such job")
    if isinstance(exc, IncompatibleModelError):
        return ApiError(409, str(exc))
    if isinstance(exc, RequestValidationError):
        return _validation_error(exc)
    if isinstance(exc, HTTPException):
        return ApiError(exc.status_code, _one_line(exc.detail), headers=getattr(exc, "headers", None))
    if isinstance(exc, LoraTrainerError):
        return ApiError(400, _one_line(str(exc)))
    logger.exception("REST API: unexpected error")
    return ApiError(500, f"internal error: {type(exc).__name__}: {_one_line(str(exc))}")


def _respond(error: ApiError) -> JSONResponse:
    return JSONResponse(_error_body(error.message, error.field), status_code=error.status, headers=error.headers)


def _route_class(credentials: Mapping[str, str] | None) -> type[APIRoute]:
    """Routes that check credentials before anything else and answer every error as JSON."""

    class GuardedRoute(APIRoute):
        def get_route_handler(self) -> Callable:
            handler = super().get_route_handler()

            async def guarded(request: Request):
                if credentials and not _authorized(request, credentials):
                    return _respond(
                        ApiError(401, "Incorrect username or password", headers={"WWW-Authenticate": "Basic"})
                    )
                try:
                    return await handler(request)
                except Exception as exc:  # noqa: BLE001 - the API's edge: every error becomes a JSON answer
                    return _respond(_to_api_error(exc))

            return guarded

    return GuardedRoute


def config_from_request(payload: Any, preset_dir: str | Path | None = None) -> tuple[TrainConfig, bool]:
    """``(config, resume)`` from a ``POST /jobs`` body; ConfigError names the offending field."""
    if not isinstance(payload, Mapping):
        raise ConfigError("config", "the request body must be a JSON object (the settings, or a preset and overrides)")
    data = dict(payload)
    resume = data.pop("resume", False)
    if not isinstance(resume, bool):
        raise ConfigError("resume", "must be true or false")
    if "preset" not in data and "config" not in data:
        return TrainConfig.from_dict(data), resume
    extra = sorted(set(data) - {"preset", "config"})
    if extra:
        raise ConfigError(extra[0], "unexpected beside 'preset'/'config': put settings inside 'config'")
    overrides = data.get("config") or {}
    if not isinstance(overrides, Mapping):
        raise ConfigError("config", 'must be an object of setting groups, e.g. {"network": {"network_dim": 16}}')
    name = data.get("preset")
    if name is None:
        return TrainConfig.from_dict(overrides), resume
    if not isinstance(name, str):
        raise ConfigError("preset", "must be a preset name (see GET /presets)")
    merged: dict[str, Any] = copy.deepcopy(load_preset(name, preset_dir).to_dict())
    for group, section in overrides.items():
        if isinstance(section, Mapping) and isinstance(merged.get(group), dict):
            merged[group].update(section)
        else:
            merged[group] = section  # from_dict reports the unknown group or the wrong type
    return TrainConfig.from_dict(merged), resume


async def _json_body(request: Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        raise ApiError(422, "the request body is not valid JSON") from None


def _preset_json(name: str, preset_dir: Path) -> dict[str, Any]:
    """One entry of ``GET /presets``; a broken user file gives an entry with its error (not a failure)."""
    try:
        preset = get_preset(name, preset_dir)
    except ConfigError as e:  # a broken user file must not hide the others
        return {"name": name, "error": str(e)}
    return {
        "name": name,
        "description": preset.description,
        "source": "builtin" if preset.source == "builtin" else "user",
        "config": preset.config.to_dict(),
    }


async def _starting(manager: JobManager, start: Callable[[], Job]) -> Job:
    """Run ``start`` (a job start) off the event loop; a model that cannot train is 409, none loaded 503."""
    try:
        return await run_in_threadpool(start)
    except IncompatibleModelError as e:
        info = await run_in_threadpool(manager.host.model_info)
        raise ApiError(409 if info.checkpoint else 503, str(e)) from None


def create_router(
    manager: JobManager,
    *,
    auth: str | Mapping[str, str] | None = None,
    preset_dir: str | Path | None = None,
) -> APIRouter:
    """The API's routes over ``manager``; ``auth`` as the WebUI's ``--api-auth`` (or a mapping).

    ``preset_dir``: where user presets are read (default: ``<host work dir>/presets``, as the tab).
    """
    credentials = parse_credentials(auth)
    presets_at = Path(preset_dir) if preset_dir is not None else Path(manager.host.work_dir) / "presets"
    router = APIRouter(prefix=PREFIX, tags=["LoRA training"], route_class=_route_class(credentials))

    def job_json(job, *, losses: bool = False, status: int = 200) -> JSONResponse:
        return JSONResponse(_jsonable(job.to_dict(with_losses=losses)), status_code=status)

    @router.get("/schema", summary="JSON schema of the training config")
    def schema() -> JSONResponse:
        return JSONResponse(_jsonable(TrainConfig.json_schema()))

    @router.get("/presets", summary="Built-in and user presets")
    def presets() -> JSONResponse:
        return JSONResponse(_jsonable([_preset_json(name, presets_at) for name in list_presets(presets_at)]))

    @router.get("/model", summary="The loaded model and whether it can be trained")
    def model() -> JSONResponse:
        return JSONResponse(_jsonable(dataclasses.asdict(manager.host.model_info())))

    @router.post(
        "/jobs",
        status_code=202,
        summary="Start training",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"type": "object", "description": _START_BODY}}},
            }
        },
    )
    async def start(request: Request) -> JSONResponse:
        payload = await _json_body(request)
        cfg, resume = config_from_request(payload, presets_at)
        job = await _starting(manager, functools.partial(manager.start, cfg, resume=resume))
        return job_json(job, status=202)

    @router.post(
        "/plan",
        summary="Memory and time plan of a config on the loaded model",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"type": "object", "description": _START_BODY}}},
            }
        },
    )
    async def plan(request: Request) -> JSONResponse:
        payload = await _json_body(request)
        cfg, _ = config_from_request(payload, presets_at)
        cfg.validate()
        result = await run_in_threadpool(manager.plan, cfg)
        if result is None:
            info = await run_in_threadpool(manager.host.model_info)
            raise ApiError(409 if info.checkpoint else 503, info.problem or "no trainable model is loaded")
        return JSONResponse(_jsonable(result.to_dict()))

    @router.get("/jobs", summary="Every job kept, oldest first")
    def jobs() -> JSONResponse:
        return JSONResponse(_jsonable([job.to_dict(with_losses=False) for job in manager.list()]))

    @router.get("/jobs/{job_id}", summary="One job's status")
    def job(job_id: str, losses: bool = False) -> JSONResponse:
        return job_json(manager.get(job_id), losses=losses)

    @router.post("/jobs/{job_id}/cancel", status_code=202, summary="Ask a job to stop (it saves what it trained)")
    def cancel(job_id: str) -> JSONResponse:
        return job_json(manager.cancel(job_id), status=202)

    @router.post("/jobs/{job_id}/resume", status_code=202, summary="Continue a stopped job with its settings")
    async def resume(job_id: str) -> JSONResponse:
        job = await _starting(manager, functools.partial(manager.resume, job_id))
        return job_json(job, status=202)

    _add_result_routes(router, manager)
    _add_test_image_route(router, manager)
    return router


def _add_test_image_route(router: APIRouter, manager: JobManager) -> None:
    """``POST /test-image``: a file at one seed beside the same seed without it (the tab's test panel)."""

    @router.post("/test-image", summary="One LoRA file at one seed, with and without it, on the loaded model")
    async def test_image(request: Request) -> JSONResponse:
        payload = await _json_body(request)
        pair_request = request_from_dict(payload, manager.list())
        if manager.current() is not None:
            raise ApiError(409, "a training run is using the model; try the file when it has ended")
        result = await run_in_threadpool(make_pair, manager.host, pair_request)
        return JSONResponse(_jsonable(result.to_dict()))


def _add_result_routes(router: APIRouter, manager: JobManager) -> None:
    """``POST /grid`` and ``POST /keep``: comparing a run's files and keeping one."""

    @router.post("/grid", summary="Epoch x strength grid of LoRA files on the loaded model")
    async def grid(request: Request) -> JSONResponse:
        payload = await _json_body(request)
        if not isinstance(payload, Mapping):
            raise ApiError(422, "the request body must be a JSON object", "files")
        settings = settings_from_dict(payload)
        job, files = _grid_files(manager, payload)
        if manager.current() is not None:
            raise ApiError(409, "a training run is using the model; make the grid when it has ended")
        result = await run_in_threadpool(make_grid, manager.host, files, settings)
        suggested = best_file(job) if job is not None else None
        return JSONResponse(_jsonable({**result.to_dict(), "suggested": suggested}))

    @router.post("/keep", summary="Keep one saved file as the final NAME.safetensors")
    async def keep(request: Request) -> JSONResponse:
        payload = await _json_body(request)
        if not isinstance(payload, Mapping):
            raise ApiError(422, "the request body must be a JSON object", "file")
        kept = await run_in_threadpool(_keep, manager, payload)
        return JSONResponse(_jsonable(kept))


def _job_of(manager: JobManager, payload: Mapping[str, Any]) -> Job | None:
    job_id = payload.get("job")
    if job_id is None:
        return None
    if not isinstance(job_id, str):
        raise ConfigError("job", "must be a job id (see GET /jobs)")
    try:
        return manager.get(job_id)
    except UnknownJobError:
        raise ConfigError("job", f"no training job {job_id!r}") from None


def _grid_files(manager: JobManager, payload: Mapping[str, Any]) -> tuple[Job | None, list[str]]:
    job = _job_of(manager, payload)
    files = payload.get("files")
    if files is not None and (not isinstance(files, list) or not all(isinstance(f, str) for f in files)):
        raise ConfigError("files", "must be a list of LoRA file paths (or names in the Lora folder)")
    if files is None and job is None:
        raise ConfigError("files", 'give "files" or the "job" whose saved files to compare')
    if files is None and job is not None:
        files = [str(p) for p in files_of_job(job)]
        if not files:
            raise ConfigError("job", f"job {job.id} has no saved LoRA files left")
    return job, list(files or [])


def _inside(path: Path, roots: Any) -> bool:
    if roots is None:
        return True
    resolved = path.resolve()
    return any(resolved.is_relative_to(Path(root).resolve()) for root in roots)


def _keep(manager: JobManager, payload: Mapping[str, Any]) -> dict[str, Any]:
    """``POST /keep``: only files under the host's allowed output folders are copied or removed."""
    job = _job_of(manager, payload)
    file = payload.get("file")
    if not isinstance(file, str) or not file:
        raise ConfigError("file", "must be the path of the LoRA file to keep")
    roots = manager.host.allowed_output_roots()
    source = Path(file) if Path(file).is_absolute() else Path(manager.host.lora_dir) / file
    if not _inside(source, roots):
        raise ConfigError("file", "must be a file in the Lora folder")
    name = payload.get("name") or (job.config.save.output_name if job is not None else None)
    if not isinstance(name, str) or not name:
        raise ConfigError("name", "must be the final name (without .safetensors)")
    flags = {key: payload.get(key, False) for key in ("replace", "remove_others")}
    for key, value in flags.items():
        if not isinstance(value, bool):
            raise ConfigError(key, "must be true or false")
    others = [str(p) for p in files_of_job(job)] if job is not None and flags["remove_others"] else []
    if flags["remove_others"] and job is None:
        raise ConfigError("job", "remove_others needs the job whose other files to remove")
    kept = keep_file(
        source,
        name,
        work_dir=manager.host.work_dir,
        replace=flags["replace"],
        remove=[p for p in others if _inside(Path(p), roots)],
    )
    manager.host.publish_lora(Path(kept.path))
    return kept.to_dict()


def mount(
    app: FastAPI,
    manager: JobManager,
    *,
    auth: str | Mapping[str, str] | None = None,
    preset_dir: str | Path | None = None,
) -> APIRouter:
    """Add the API's routes to ``app`` (the WebUI's FastAPI app in ``on_app_started``)."""
    router = create_router(manager, auth=auth, preset_dir=preset_dir)
    app.include_router(router)
    return router
