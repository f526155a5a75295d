"""Validation: each setting's limits, the per-field rules, and the rules between fields.

``TrainConfig.errors()`` runs them in that order: ``check_limits`` (the ``choices``/``ge``/``gt``/
``le``/``lt`` metadata), ``FIELD_CHECKS`` (rules one field's metadata cannot say, e.g. a resolution
is a multiple of 64), then ``cross_checks`` (rules between fields, each run only when the fields it
reads are individually valid). Messages name the dotted field, say what is allowed and, where
there is one, the fix.

Why stdlib dataclasses and hand-written checks rather than a validation library (pydantic): the
WebUI's environment fixes pydantic's major version (1.10 in WebUI 1.10, via gradio and fastapi) and
other extensions in the same process pin it too, so the config would have to run on both the v1 API
and ``pydantic.v1`` on pydantic 2. The error messages are part of the interface (the tests pin them):
they use kohya's field names and give the fix (``"must be 0 with the 'constant' scheduler; for a
warmup choose 'constant_with_warmup'"``), which library messages do not. The same field metadata
drives kohya TOML (kohya's names, ``network_args`` key=value lists, kohya's defaults for kohya files)
and the JSON schema, which a library would not remove. Moving would need: the WebUI's pydantic
version settled (or code written to the v1 API only), custom messages kept per rule, and the kohya
mapping kept as field metadata; the REST API could then take a typed body generated from the same
fields.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from lora_trainer.config.meta import MAX_RESOLUTION, MIN_RESOLUTION, RESOLUTION_MULTIPLE, Leaf
from lora_trainer.config.network_group import check_network_type
from lora_trainer.config.validation_group import check_validation
from lora_trainer.errors import ConfigError
from lora_trainer.filenames import bad_name_chars, is_windows_reserved

__all__ = ["FIELD_CHECKS", "check_limits", "cross_checks", "num"]


def num(x: float) -> str:
    """A number as messages show it (8.0 -> '8', 1e-05 -> '1e-05')."""
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return f"{x:g}" if isinstance(x, float) else str(x)


def _limits_text(kind: str, ge: Any = None, gt: Any = None, le: Any = None, lt: Any = None) -> str:
    noun = "an integer" if kind == "int" else "a number"
    if ge is not None and le is not None:
        return f"{noun} from {num(ge)} to {num(le)}"
    parts = []
    if ge is not None:
        parts.append(f"at least {num(ge)}")
    if gt is not None:
        parts.append(f"greater than {num(gt)}")
    if le is not None:
        parts.append(f"at most {num(le)}")
    if lt is not None:
        parts.append(f"less than {num(lt)}")
    return f"{noun} " + " and ".join(parts)


def _out_of(value: float, ge: Any = None, gt: Any = None, le: Any = None, lt: Any = None) -> bool:
    return (
        not math.isfinite(value)
        or (ge is not None and value < ge)
        or (gt is not None and value <= gt)
        or (le is not None and value > le)
        or (lt is not None and value >= lt)
    )


def check_limits(leaf: Leaf, value: Any) -> None:
    """Raise ``ConfigError`` when a coerced ``value`` is outside ``leaf``'s choices or bounds."""
    if value is None:
        return
    meta = leaf.meta
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        lowered = {str(c).lower(): c for c in choices}
        hint = ""
        if isinstance(value, str) and value.lower() in lowered:
            hint = f" (did you mean {lowered[value.lower()]!r}?)"
        raise ConfigError(leaf.path, f"must be one of {listed}, got {value!r}{hint}")
    bounds = {k: meta[k] for k in ("ge", "gt", "le", "lt") if k in meta}
    if bounds and leaf.kind in ("int", "float") and _out_of(value, **bounds):
        unset = " (or unset)" if leaf.optional else ""
        raise ConfigError(leaf.path, f"must be {_limits_text(leaf.kind, **bounds)}{unset}, got {num(value)}")


# --------------------------------------------------------------------------------------------
# Rules of one field
# --------------------------------------------------------------------------------------------


def _check_output_name(name: str) -> str | None:
    if not name.strip():
        return "must not be empty: give the LoRA a file name, e.g. 'my_character'"
    if len(name) > 200:
        return f"must be at most 200 characters, got {len(name)}"
    bad = bad_name_chars(name)
    if bad:
        return f"must be a plain file name without {' '.join(repr(c) for c in bad)} (no folders: use save.output_dir)"
    if name in (".", "..") or name.startswith(".."):
        return f"must be a plain file name, not {name!r}"
    if name != name.strip() or name.endswith("."):
        return f"must not start or end with a space or end with a dot, got {name!r}"
    if is_windows_reserved(name):
        return f"{name!r} is a reserved file name on Windows; pick another"
    if name.lower().endswith((".safetensors", ".pt", ".ckpt")):
        return f"leave out the extension: {name.rsplit('.', 1)[0]!r} (the file is always .safetensors)"
    return None


def _check_resolution(value: int | tuple[int, int]) -> str | None:
    sides = (value, value) if isinstance(value, int) else value
    if any(s % RESOLUTION_MULTIPLE or not MIN_RESOLUTION <= s <= MAX_RESOLUTION for s in sides):
        shown = str(value) if isinstance(value, int) else f"'{value[0]},{value[1]}'"
        return (
            f"each side must be a multiple of {RESOLUTION_MULTIPLE} from {MIN_RESOLUTION} to {MAX_RESOLUTION} "
            f"(e.g. 512, 768, 1024 or '512,768'), got {shown}"
        )
    return None


def _check_optimizer_args(args: dict[str, Any]) -> str | None:
    for key, value in args.items():
        if not key.isidentifier():
            return f"argument names must be Python identifiers (like weight_decay), got {key!r}"
        if key in ("lr", "params"):
            return f"{key!r} is set by the trainer: use the learning-rate settings instead"
        if isinstance(value, float) and not math.isfinite(value):
            return f"{key} must be a finite number, got {value}"
    return None


def _check_list(what: str, *, no_commas: bool = False) -> Callable[[list[str]], str | None]:
    def check(items: list[str]) -> str | None:
        for i, item in enumerate(items):
            if not item.strip():
                return f"entry {i + 1} is empty: each {what} must have text"
            if no_commas and "," in item:
                return f"{item!r} contains a comma: give each {what} as its own entry"
        return None

    return check


_LR_CURVES = ("cosine", "sine", "linear", "reverse_linear", "zeros")


def _check_block_list(counts: tuple[int, ...], *, curves: bool = False) -> Callable[[str], str | None]:
    """A kohya per-block list: comma-separated numbers (``counts``: the lengths allowed; empty = any)."""

    def check(text: str) -> str | None:
        name, _, base = text.partition("+")
        if curves and name.strip() in _LR_CURVES and (not base or re.fullmatch(r"\s*-?[\d.]+\s*", base)):
            return None
        try:
            values = [float(part) for part in text.split(",")]
        except ValueError:
            extra = f", or a curve: {', '.join(_LR_CURVES)}" if curves else ""
            return f"must be comma-separated numbers{extra}; got {text!r}"
        if counts and len(values) not in counts:
            sizes = " or ".join(str(c) for c in counts)
            return f"must have {sizes} values (one per UNet block: 25 for SD1/SD2, 23 for SDXL), got {len(values)}"
        return None

    return check


_BLOCK_LIST_CHECKS = {
    **{
        f"network.{name}": _check_block_list((25, 23))
        for name in ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")
    },
    **{f"network.{name}": _check_block_list((), curves=True) for name in ("down_lr_weight", "up_lr_weight")},
    "network.mid_lr_weight": _check_block_list(()),
}

FIELD_CHECKS: dict[str, Callable[[Any], str | None]] = {
    **_BLOCK_LIST_CHECKS,
    "dataset.train_data_dir": lambda v: (
        None if v.strip() else "is required: the folder holding '<repeats>_<name>' subfolders of images and captions"
    ),
    "dataset.trigger_words": _check_list("trigger word", no_commas=True),
    "dataset.caption_extension": lambda v: (
        None
        if re.fullmatch(r"\.[A-Za-z0-9_-]{1,15}", v)
        else f"must be a dot and 1-15 letters/digits, like '.txt' or '.caption', got {v!r}"
    ),
    "dataset.resolution": _check_resolution,
    "dataset.bucket_reso_steps": lambda v: None if v % 8 == 0 else f"must be a multiple of 8 (64 is usual), got {v}",
    "optim.optimizer_args": _check_optimizer_args,
    "save.output_name": _check_output_name,
    "save.output_dir": lambda v: (
        None if v.strip() and "\0" not in v else "must be a folder path, or unset for the WebUI's Lora folder"
    ),
    "sample.sample_prompts": _check_list("prompt"),
    "sample.sample_sampler": lambda v: None if v.strip() else "must name a WebUI sampler, e.g. 'Euler a'",
    "sample.sample_width": lambda v: None if v % 8 == 0 else f"must be a multiple of 8, got {v}",
    "sample.sample_height": lambda v: None if v % 8 == 0 else f"must be a multiple of 8, got {v}",
}
"""Rules of one field beyond its limits, by dotted path: value -> message, or None when it is fine."""


# --------------------------------------------------------------------------------------------
# Rules between fields. Each takes the individually valid values by dotted path.
# --------------------------------------------------------------------------------------------


def _has(v: dict[str, Any], *paths: str) -> bool:
    return all(p in v for p in paths)


def _check_trained_parts(v: dict[str, Any]) -> list[ConfigError]:
    if _has(v, "network.train_unet", "network.train_text_encoder") and not (
        v["network.train_unet"] or v["network.train_text_encoder"]
    ):
        message = (
            "network.train_unet and network.train_text_encoder are both off, so nothing would be trained; "
            "turn on at least one"
        )
        return [ConfigError("network.train_unet", message)]
    return []


def _check_learning_rates(v: dict[str, Any]) -> list[ConfigError]:
    """Below 1, except Prodigy (a multiplier of its own estimate, usually 1.0)."""
    if not _has(v, "optim.optimizer_type") or v["optim.optimizer_type"] == "Prodigy":
        return []
    out = []
    for path in ("optim.learning_rate", "optim.unet_lr", "optim.text_encoder_lr"):
        lr = v.get(path)
        if lr is None or lr < 1.0:
            continue
        unset = " (or unset)" if path != "optim.learning_rate" else ""
        message = (
            f"must be a number greater than 0 and less than 1{unset} with {v['optim.optimizer_type']}, "
            f"got {num(lr)} (1e-4 is a good start; only Prodigy takes about 1.0)"
        )
        out.append(ConfigError(path, message))
    return out


def _check_warmup(v: dict[str, Any]) -> list[ConfigError]:
    out = []
    if _has(v, "optim.lr_scheduler", "optim.lr_warmup_steps") and (
        v["optim.lr_scheduler"] == "constant" and v["optim.lr_warmup_steps"] > 0
    ):
        message = "must be 0 with the 'constant' scheduler; for a warmup choose 'constant_with_warmup'"
        out.append(ConfigError("optim.lr_warmup_steps", message))
    if _has(v, "optim.lr_warmup_steps", "training.max_train_steps") and (
        v["training.max_train_steps"] is not None and v["optim.lr_warmup_steps"] >= v["training.max_train_steps"]
    ):
        message = (
            f"must be less than training.max_train_steps ({v['training.max_train_steps']}), "
            f"got {v['optim.lr_warmup_steps']}"
        )
        out.append(ConfigError("optim.lr_warmup_steps", message))
    return out


def _check_latent_cache(v: dict[str, Any]) -> list[ConfigError]:
    if _has(v, "dataset.cache_latents", "dataset.cache_latents_to_disk") and (
        v["dataset.cache_latents_to_disk"] and not v["dataset.cache_latents"]
    ):
        return [ConfigError("dataset.cache_latents_to_disk", "needs dataset.cache_latents on (or turn this off)")]
    return []


_CAPTION_CHANGES = (
    "dataset.shuffle_caption",
    "dataset.caption_dropout_rate",
    "dataset.caption_tag_dropout_rate",
    "dataset.caption_dropout_every_n_epochs",
)


def _check_text_cache(v: dict[str, Any]) -> list[ConfigError]:
    """Cached text-encoder outputs are fixed: as kohya, not with changing captions or a trained text encoder."""
    if not v.get("dataset.cache_text_encoder_outputs"):
        return []
    clash = [path for path in _CAPTION_CHANGES if v.get(path)]
    if v.get("network.train_text_encoder"):
        clash.append("network.train_text_encoder")
    if not clash:
        return []
    message = (
        f"cannot be combined with {', '.join(clash)}: each caption is encoded once, before training, so the "
        "captions cannot change between steps and the text encoder cannot learn; turn this or those off"
    )
    return [ConfigError("dataset.cache_text_encoder_outputs", message)]


_BUCKET_PATHS = (
    "dataset.enable_bucket",
    "dataset.resolution",
    "dataset.min_bucket_reso",
    "dataset.max_bucket_reso",
    "dataset.bucket_reso_steps",
)


def _check_buckets(v: dict[str, Any]) -> list[ConfigError]:
    if not (_has(v, *_BUCKET_PATHS) and v["dataset.enable_bucket"]):
        return []
    out = []
    res = v["dataset.resolution"]
    w, h = (res, res) if isinstance(res, int) else res
    lo, hi, step = v["dataset.min_bucket_reso"], v["dataset.max_bucket_reso"], v["dataset.bucket_reso_steps"]
    for path, value in (("dataset.min_bucket_reso", lo), ("dataset.max_bucket_reso", hi)):
        if value % step:
            out.append(ConfigError(path, f"must be a multiple of dataset.bucket_reso_steps ({step}), got {value}"))
    if lo > min(w, h):
        message = f"must be at most the resolution's smaller side ({min(w, h)}), got {lo}"
        out.append(ConfigError("dataset.min_bucket_reso", message))
    if hi < max(w, h):
        message = f"must be at least the resolution's larger side ({max(w, h)}), got {hi}"
        out.append(ConfigError("dataset.max_bucket_reso", message))
    return out


def _check_previews(v: dict[str, Any]) -> list[ConfigError]:
    if not _has(v, "sample.sample_every_n_steps", "sample.sample_every_n_epochs", "sample.sample_prompts"):
        return []
    on = v["sample.sample_every_n_steps"] is not None or v["sample.sample_every_n_epochs"] is not None
    if on and not v["sample.sample_prompts"]:
        message = (
            "is empty but previews are on (sample.sample_every_n_steps/_epochs): add a prompt, "
            "or unset both to turn previews off"
        )
        return [ConfigError("sample.sample_prompts", message)]
    return []


_CROSS_CHECKS = (
    _check_trained_parts,
    check_network_type,
    _check_learning_rates,
    _check_warmup,
    _check_latent_cache,
    _check_text_cache,
    _check_buckets,
    _check_previews,
    check_validation,
)


def cross_checks(v: dict[str, Any]) -> list[ConfigError]:
    """Problems between fields; ``v`` holds the individually valid values by dotted path."""
    return [problem for check in _CROSS_CHECKS for problem in check(v)]
