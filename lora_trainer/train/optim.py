"""Optimizers, learning-rate schedulers and parameter groups, as kohya-ss/sd-scripts builds them.

Optimizers (``optim.optimizer_type``, case-insensitive):

=========== ================================================ ==========================================
AdamW       ``torch.optim.AdamW``
AdamW8bit   ``bitsandbytes.optim.AdamW8bit``                 needs bitsandbytes and a device it runs on
Lion        ``lion_pytorch.Lion``                            ``pip install lion-pytorch``
Prodigy     ``prodigyopt.Prodigy``                           ``pip install prodigyopt``; use lr ~ 1.0
Adafactor   ``transformers.optimization.Adafactor``
=========== ================================================ ==========================================

Schedulers (``optim.lr_scheduler``) are the ``transformers`` schedule functions that kohya's
``get_scheduler_fix`` uses: constant, constant_with_warmup, linear, cosine, cosine_with_restarts,
polynomial. An Adafactor with ``relative_step=True`` sets its own step size; it gets an
``AdafactorSchedule`` (a proxy that reports that step size), as kohya does.
"""

from __future__ import annotations

import ast
import functools
import math
import numbers
import re
from collections.abc import Collection, Iterable, Mapping
from typing import Any, cast

import torch

from lora_trainer.errors import ConfigError
from lora_trainer.log import logger
from lora_trainer.train.names import LR_SCHEDULERS, OPTIMIZERS

__all__ = [
    "OPTIMIZER_TYPES",
    "SCHEDULER_TYPES",
    "build_optimizer",
    "build_scheduler",
    "current_lrs",
    "param_groups_for",
    "parse_optimizer_args",
]

OPTIMIZER_TYPES = OPTIMIZERS
"""The optimizers :func:`build_optimizer` builds (one builder each, checked at import)."""
SCHEDULER_TYPES = (*LR_SCHEDULERS, "adafactor")
"""The schedulers :func:`build_scheduler` builds: the config's choices plus Adafactor's own schedule."""

_OPTIM_FIELD = "optim.optimizer_type"
_ARGS_FIELD = "optim.optimizer_args"
_LR_FIELD = "optim.learning_rate"
_SCHED_FIELD = "optim.lr_scheduler"
_WARMUP_FIELD = "optim.lr_warmup_steps"


# --------------------------------------------------------------------------- parameter groups


def param_groups_for(
    unet_params: Iterable[torch.nn.Parameter],
    te_params: Iterable[torch.nn.Parameter],
    unet_lr: float | None,
    te_lr: float | None,
    *,
    default_lr: float | None = None,
    plus: Collection[torch.nn.Parameter] = (),
    unet_plus_ratio: float | None = None,
    te_plus_ratio: float | None = None,
    unet_blocks: Iterable[tuple[int, float, list[torch.nn.Parameter]]] | None = None,
) -> list[dict[str, Any]]:
    """Optimizer param groups ``[{"name": "unet", "params": [...], "lr": unet_lr}, {"name": "text_encoder", ...}]``.

    A group with no parameters is left out. As in kohya, so is a group whose learning rate is 0
    (that part is not trained). An lr of None leaves the key out so the optimizer's default lr applies.
    The ``name`` key is carried by the optimizer's param groups; :func:`current_lrs` reports by it.

    kohya's extras (``prepare_optimizer_params``): ``unet_blocks`` (block index, lr weight, parameters)
    replaces the one UNet group by one group per block, ``unet_block<i>``, at the UNet lr x weight.
    LoRA+: with a ratio for its part, the ``plus`` parameters (the lora_up weights) of each group get a
    group of their own, ``<name>_plus``, at that group's lr x ratio. Both need an lr: a part's lr of
    None is then ``default_lr``.
    """
    parts: list[tuple[str, list[torch.nn.Parameter], float | None, float | None]] = []
    if unet_blocks is None:
        parts.append(("unet", list(unet_params), unet_lr, unet_plus_ratio))
    else:
        base = unet_lr if unet_lr is not None else default_lr
        for index, weight, params in unet_blocks:
            parts.append((f"unet_block{index}", params, None if base is None else base * weight, unet_plus_ratio))
    parts.append(("text_encoder", list(te_params), te_lr, te_plus_ratio))
    plus_ids = {id(p) for p in plus}
    groups: list[dict[str, Any]] = []
    for name, params, lr, ratio in parts:
        if ratio is None:
            groups += _group(name, params, lr)
            continue
        lr = lr if lr is not None else default_lr
        groups += _group(name, [p for p in params if id(p) not in plus_ids], lr)
        groups += _group(f"{name}_plus", [p for p in params if id(p) in plus_ids], None if lr is None else lr * ratio)
    return groups


def _group(name: str, params: Iterable[torch.nn.Parameter], lr: float | None) -> list[dict[str, Any]]:
    params = [p for p in params if p.requires_grad]
    if not params:
        return []
    if lr is not None and lr == 0:
        logger.info(f"learning rate of the {name} is 0: its LoRA weights are not trained")
        return []
    group: dict[str, Any] = {"name": name, "params": params}
    if lr is not None:
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ConfigError(_LR_FIELD, f"the {name} learning rate must be a positive number, got {lr!r}")
        group["lr"] = float(lr)
    return [group]


# --------------------------------------------------------------------------- optimizer_args

_ARG_START = re.compile(r"[\s,;]+(?=[A-Za-z_]\w*\s*=)")


def _literal(key: str, value: Any) -> Any:
    if not isinstance(value, str):
        return value
    text = value.strip()
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError) as e:
        raise ConfigError(
            _ARGS_FIELD, f"value of {key!r} is not a python literal: {value!r} (e.g. 0.01, (0.9, 0.99), True)"
        ) from e


def parse_optimizer_args(optimizer_args: Mapping[str, Any] | Iterable[str] | str | None) -> dict[str, Any]:
    """Normalize optimizer arguments to a dict of python values.

    Accepts a dict (string values are parsed with ``ast.literal_eval``: ``{"betas": "(0.9,0.99)"}``),
    kohya's list of ``"key=value"`` strings (``["betas=(0.9,0.99)", "weight_decay=0.01"]``), or one string
    of such items separated by spaces, commas or semicolons (``"betas=(0.9, 0.99) weight_decay=0.01"``).
    """
    if optimizer_args is None:
        return {}
    if isinstance(optimizer_args, Mapping):
        return {str(k): _literal(str(k), v) for k, v in optimizer_args.items()}
    if isinstance(optimizer_args, str):
        text = optimizer_args.strip()
        items = [s for s in _ARG_START.split(text) if s.strip()] if text else []
    else:
        items = list(optimizer_args)
    out: dict[str, Any] = {}
    for item in items:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(_ARGS_FIELD, f"expected key=value, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip()
        if not key.isidentifier():
            raise ConfigError(_ARGS_FIELD, f"bad argument name {key!r} in {item!r}")
        out[key] = _literal(key, value)
    return out


# --------------------------------------------------------------------------- optimizers


def _canonical(name: str, allowed: tuple[str, ...], field: str, what: str) -> str:
    if isinstance(name, str):
        for a in allowed:
            if name.strip().lower() == a.lower():
                return a
    raise ConfigError(field, f"unknown {what} {name!r}; choose one of: {', '.join(allowed)}")


@functools.cache
def _bnb_smoke_test(device_str: str) -> str | None:
    """Run one AdamW8bit step on ``device_str``; None if it works, else why not."""
    try:
        import bitsandbytes as bnb

        device = torch.device(device_str)
        p = torch.nn.Parameter(torch.zeros(8192, device=device))  # > 4096 elements: the 8-bit state path
        opt = bnb.optim.AdamW8bit([p], lr=1e-3)
        p.grad = torch.ones_like(p)
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if not torch.isfinite(p).all():
            return "a test step produced non-finite values"
    except Exception as e:  # noqa: BLE001 - any failure of the test step means: cannot run here
        return f"{type(e).__name__}: {e}"
    return None


def _adamw8bit(param_groups, lr, kwargs):
    try:
        import bitsandbytes as bnb
    except Exception as e:  # ImportError, or a RuntimeError/OSError from a broken native library
        raise ConfigError(
            _OPTIM_FIELD,
            f"AdamW8bit needs the bitsandbytes package, which could not be imported ({type(e).__name__}: {e}). "
            "Install it (pip install bitsandbytes) on a machine with a supported GPU, or choose AdamW.",
        ) from e
    devices = sorted({str(p.device) for g in param_groups for p in g["params"]})
    for device in devices:
        reason = _bnb_smoke_test(device)
        if reason is not None:
            if not torch.cuda.is_available():
                reason = f"no CUDA GPU is available ({reason})"
            raise ConfigError(
                _OPTIM_FIELD,
                f"AdamW8bit (bitsandbytes) cannot run on {device}: {reason}. bitsandbytes' 8-bit optimizers need "
                "a CUDA GPU with the parameters on it; choose AdamW instead.",
            )
    return bnb.optim.AdamW8bit(param_groups, lr=lr, **kwargs)


def _lion(param_groups, lr, kwargs):
    try:
        from lion_pytorch import Lion
    except ImportError as e:
        raise ConfigError(
            _OPTIM_FIELD, "Lion needs the lion-pytorch package: pip install lion-pytorch (or choose AdamW)"
        ) from e
    return Lion(param_groups, lr=lr, **kwargs)


def _prodigy(param_groups, lr, kwargs):
    try:
        from prodigyopt import Prodigy
    except ImportError as e:
        raise ConfigError(
            _OPTIM_FIELD, "Prodigy needs the prodigyopt package: pip install prodigyopt (or choose AdamW)"
        ) from e
    lrs = sorted({g.get("lr", lr) for g in param_groups})
    if min(lrs) < 0.1:
        logger.warning(
            f"learning rate {min(lrs)} is too low for Prodigy, which adapts the step size itself: "
            "set the learning rate (and unet/text encoder learning rates) around 1.0"
        )
    if len(lrs) > 1:
        logger.info(f"Prodigy: the group learning rates {lrs} scale its adaptive step size per group")
    return Prodigy(param_groups, lr=lr, **kwargs)


def _adafactor(param_groups, lr, kwargs):
    from transformers.optimization import Adafactor

    # kohya's defaults: relative_step=True (and transformers' scale_parameter=True,
    # warmup_init=False) unless optimizer_args say otherwise, whatever the learning rate; the
    # learning rate is then only the AdafactorSchedule's initial value.
    kwargs.setdefault("relative_step", True)
    if kwargs.get("warmup_init", False) and not kwargs["relative_step"]:
        logger.info("Adafactor: warmup_init=True needs relative_step=True; setting relative_step=True")
        kwargs["relative_step"] = True
    if kwargs["relative_step"]:
        kwargs.setdefault("scale_parameter", True)
        kwargs.setdefault("warmup_init", False)
        if lr:
            logger.warning(ADAFACTOR_RELATIVE_STEP_NOTE.format(lr=lr))
        group_lrs = {g["lr"] for g in param_groups if g.get("lr")}
        if lr and group_lrs - {lr}:
            logger.warning("Adafactor with relative_step=True: the UNet and text encoder learning rates are ignored")
        for g in param_groups:  # Adafactor ignores a group's lr then; the scheduler's initial value is the lr
            g["lr"] = lr if lr else g.get("lr", lr)
        return Adafactor(param_groups, lr=None, **kwargs)
    kwargs.setdefault("scale_parameter", False)
    kwargs.setdefault("warmup_init", False)
    if not lr and any(not g.get("lr") for g in param_groups):
        raise ConfigError(_LR_FIELD, "Adafactor with relative_step=False needs a learning rate > 0")
    return Adafactor(param_groups, lr=lr, **kwargs)


ADAFACTOR_RELATIVE_STEP_NOTE = (
    "Adafactor computes its own step size (relative_step=True, kohya's default): the learning rate {lr} is only "
    "the initial value the scheduler reports, and the lr scheduler is Adafactor's own. For a fixed learning "
    "rate set optimizer_args to relative_step=False scale_parameter=False warmup_init=False."
)
"""What a run with a relative-step Adafactor is told (the log and the tab's preflight warnings)."""


def _adamw(param_groups, lr, kwargs):
    # torch's multi-tensor (foreach) AdamW: the same arithmetic as its per-tensor loop, bit for bit
    # (tests/test_optim_exact.py), and like it skips a parameter whose grad is None. The fused
    # kernel is faster but rounds differently (differences of ~1e-8 after a few steps), so it is
    # used only when optimizer_args ask for it (fused=True).
    if "foreach" not in kwargs and "fused" not in kwargs:
        kwargs = {**kwargs, "foreach": True}
    return torch.optim.AdamW(param_groups, lr=lr, **kwargs)


_BUILDERS = {
    "AdamW": _adamw,
    "AdamW8bit": _adamw8bit,
    "Lion": _lion,
    "Prodigy": _prodigy,
    "Adafactor": _adafactor,
}
if tuple(_BUILDERS) != OPTIMIZER_TYPES:  # the config offers train.names.OPTIMIZERS: one builder each
    raise RuntimeError(f"optimizer builders {tuple(_BUILDERS)} do not match train.names.OPTIMIZERS {OPTIMIZER_TYPES}")


def build_optimizer(
    name: str,
    param_groups: Iterable[dict[str, Any]] | Iterable[torch.nn.Parameter],
    lr: float | None,
    optimizer_args: Mapping[str, Any] | Iterable[str] | str | None = None,
) -> torch.optim.Optimizer:
    """Build optimizer ``name`` (one of :data:`OPTIMIZER_TYPES`, case-insensitive) over ``param_groups``.

    ``param_groups``: groups from :func:`param_groups_for` (or plain parameters). ``lr``: the default
    learning rate, used by groups without their own. ``optimizer_args``: extra constructor arguments,
    see :func:`parse_optimizer_args`. Problems raise :class:`ConfigError`. For AdamW8bit, build the
    optimizer after the parameters are on the training device: the check runs there.
    """
    canonical = _canonical(name, OPTIMIZER_TYPES, _OPTIM_FIELD, "optimizer")
    kwargs = parse_optimizer_args(optimizer_args)
    if "lr" in kwargs:
        raise ConfigError(_ARGS_FIELD, "set the learning rate with the learning rate setting, not in optimizer_args")
    if lr is not None and not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
        raise ConfigError(_LR_FIELD, f"learning rate must be a number >= 0, got {lr!r}")
    items = list(param_groups)
    given = cast(list[dict[str, Any]], items) if items and isinstance(items[0], dict) else [{"params": items}]
    groups: list[dict[str, Any]] = [dict(g, params=list(g["params"])) for g in given]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ConfigError(_LR_FIELD, "nothing to train: every parameter group is empty or has learning rate 0")
    if lr is None and canonical != "Adafactor":
        if not all(g.get("lr") for g in groups):
            raise ConfigError(_LR_FIELD, f"{canonical} needs a learning rate")
        lr = groups[0]["lr"]
    lr = None if lr is None else float(lr)

    try:
        opt = _BUILDERS[canonical](groups, lr, kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # unknown keyword, out-of-range beta ...
        raise ConfigError(_ARGS_FIELD, f"{canonical} rejected its arguments {kwargs}: {e}") from e
    logger.info(f"optimizer: {type(opt).__module__}.{type(opt).__name__} {kwargs or ''}".rstrip())
    return opt


# --------------------------------------------------------------------------- schedulers


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_relative_step_adafactor(optimizer: torch.optim.Optimizer) -> bool:
    try:
        from transformers.optimization import Adafactor
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(optimizer, Adafactor) and any(g.get("relative_step") for g in optimizer.param_groups)


def _checked_steps(num_training_steps: Any, num_warmup_steps: Any) -> tuple[int, int]:
    if not _is_int(num_training_steps) or num_training_steps < 1:
        raise ConfigError("optim.max_train_steps", f"number of training steps must be >= 1, got {num_training_steps!r}")
    if not _is_int(num_warmup_steps) or num_warmup_steps < 0:
        raise ConfigError(_WARMUP_FIELD, f"warmup steps must be an integer >= 0, got {num_warmup_steps!r}")
    return int(num_training_steps), int(num_warmup_steps)


def _adafactor_schedule(tfo: Any, canonical: str, optimizer: torch.optim.Optimizer) -> Any:
    if canonical not in ("adafactor", "constant"):
        logger.warning(
            f"Adafactor with relative_step=True schedules its own step size; lr scheduler {canonical!r} is ignored"
        )
    initial_lr = next((g["lr"] for g in optimizer.param_groups if g.get("lr")), 0.0)
    return tfo.AdafactorSchedule(optimizer, initial_lr=float(initial_lr))


def _constant(tfo: Any, optimizer: Any, warmup: int, total: int, num_cycles: Any, power: Any) -> Any:
    if warmup:
        raise ConfigError(
            _WARMUP_FIELD, "the constant scheduler takes no warmup steps; use constant_with_warmup or set them to 0"
        )
    return tfo.get_constant_schedule(optimizer)


def _constant_with_warmup(tfo: Any, optimizer: Any, warmup: int, total: int, num_cycles: Any, power: Any) -> Any:
    return tfo.get_constant_schedule_with_warmup(optimizer, num_warmup_steps=warmup)


def _linear(tfo: Any, optimizer: Any, warmup: int, total: int, num_cycles: Any, power: Any) -> Any:
    return tfo.get_linear_schedule_with_warmup(optimizer, warmup, total)


def _cosine(tfo: Any, optimizer: Any, warmup: int, total: int, num_cycles: Any, power: Any) -> Any:
    return tfo.get_cosine_schedule_with_warmup(optimizer, warmup, total)


def _cosine_with_restarts(tfo: Any, optimizer: Any, warmup: int, total: int, num_cycles: Any, power: Any) -> Any:
    if not _is_int(num_cycles) or num_cycles < 1:
        raise ConfigError("optim.lr_scheduler_num_cycles", f"must be an integer >= 1, got {num_cycles!r}")
    return tfo.get_cosine_with_hard_restarts_schedule_with_warmup(optimizer, warmup, total, num_cycles=int(num_cycles))


def _polynomial(tfo: Any, optimizer: Any, warmup: int, total: int, num_cycles: Any, power: Any) -> Any:
    if not (isinstance(power, (int, float)) and power > 0):
        raise ConfigError("optim.lr_scheduler_power", f"must be > 0, got {power!r}")
    try:
        return tfo.get_polynomial_decay_schedule_with_warmup(optimizer, warmup, total, power=float(power))
    except (ValueError, TypeError) as e:  # lr_init <= lr_end (1e-7), or no default lr
        raise ConfigError(_LR_FIELD, f"polynomial scheduler: {e}") from e


_SCHEDULES = {
    "constant": _constant,
    "constant_with_warmup": _constant_with_warmup,
    "linear": _linear,
    "cosine": _cosine,
    "cosine_with_restarts": _cosine_with_restarts,
    "polynomial": _polynomial,
}
if tuple(_SCHEDULES) != LR_SCHEDULERS:  # the config offers train.names.LR_SCHEDULERS: one builder each
    raise RuntimeError(f"scheduler builders {tuple(_SCHEDULES)} do not match train.names.LR_SCHEDULERS {LR_SCHEDULERS}")


def build_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    num_training_steps: int,
    num_warmup_steps: int = 0,
    num_cycles: int = 1,
    power: float = 1.0,
) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate scheduler ``name`` (one of :data:`SCHEDULER_TYPES`), stepped once per optimizer step.

    ``num_cycles``: hard restarts of cosine_with_restarts; ``power``: exponent of polynomial (which decays
    to 1e-7, transformers' default). As in kohya, ``constant`` with warmup steps is an error (use
    constant_with_warmup). An Adafactor with ``relative_step=True`` always gets an ``AdafactorSchedule``.
    ``state_dict()``/``load_state_dict()`` of the result round-trip into a scheduler built the same way.
    """
    from transformers import optimization as tfo

    canonical = _canonical(name, SCHEDULER_TYPES, _SCHED_FIELD, "lr scheduler")
    num_training_steps, num_warmup_steps = _checked_steps(num_training_steps, num_warmup_steps)

    if _is_relative_step_adafactor(optimizer):
        return _adafactor_schedule(tfo, canonical, optimizer)
    if canonical == "adafactor":
        raise ConfigError(_SCHED_FIELD, "the adafactor scheduler needs the Adafactor optimizer with relative_step=True")

    if num_warmup_steps >= num_training_steps and canonical != "constant":
        logger.warning(
            f"{num_warmup_steps} warmup steps >= {num_training_steps} training steps: lr never leaves warmup"
        )
    return _SCHEDULES[canonical](tfo, optimizer, num_warmup_steps, num_training_steps, num_cycles, power)


def current_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The effective learning rate of each param group, keyed by the group's ``name`` (``group{i}`` if none).

    Prodigy: ``d * lr`` (the adapted step, as kohya logs it). Adafactor with relative_step: the step
    size it computes (the group's lr before its first step).
    """
    out: dict[str, float] = {}
    for i, group in enumerate(optimizer.param_groups):
        name = group.get("name") or f"group{i}"
        lr = group.get("lr") or 0.0
        if "d" in group and type(optimizer).__name__ == "Prodigy":
            lr = group["d"] * lr
        elif group.get("relative_step") and hasattr(optimizer, "_get_lr"):
            state = optimizer.state.get(group["params"][0], {})
            if state.get("step"):
                lr = optimizer._get_lr(group, state)  # pyright: ignore[reportAttributeAccessIssue] (Adafactor)
        out[name] = float(lr)
    return out
