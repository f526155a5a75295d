"""kohya TOML: read our TOML or a kohya ``train_network.py --config_file``, and write ours.

Layout: kohya's own argument names in kohya-style ``[*_arguments]`` tables (kohya flattens tables,
so the file is also a kohya ``--config_file``), and the settings kohya lacks under
``[lora_train.<group>]``. A file *with* a ``[lora_train]`` table was written by us (or is a preset):
absent settings take our defaults. A file *without* it is read as a kohya config: absent kohya
settings take kohya's defaults (``metadata["kohya_default"]``), so it means what it meant to kohya.
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from lora_trainer.config.coerce import coerce, short, unknown
from lora_trainer.config.meta import FORMAT_VERSION, LYCORIS_MODULE, OPTIMIZERS, Leaf, jsonable
from lora_trainer.config.model import GROUPS, LEAF_BY_PATH, LEAVES, TrainConfig, config_from_groups
from lora_trainer.errors import ConfigError
from lora_trainer.log import logger

try:  # Python >= 3.11
    import tomllib as _tomllib
except ModuleNotFoundError:  # Python 3.10 (the WebUI's): the toml package, which kohya uses too
    _tomllib = None

__all__ = ["KOHYA_UNMAPPED", "ParsedToml", "UnknownSetting", "from_toml", "kohya_and_ours", "parse_toml", "to_toml"]

_KOHYA_SECTIONS = {
    "dataset": "dataset_arguments",
    "network": "additional_network_arguments",
    "optim": "optimizer_arguments",
    "training": "training_arguments",
    "save": "saving_arguments",
    "sample": "sample_prompt_arguments",
    "validation": "validation_arguments",
}
_KOHYA_TO_LEAF = {
    leaf.meta["kohya"]: leaf for leaf in LEAVES if "kohya" in leaf.meta and not leaf.meta.get("kohya_network_arg")
}
_NETWORK_ARG_LEAVES = {leaf.meta["kohya"]: leaf for leaf in LEAVES if leaf.meta.get("kohya_network_arg")}
_KOHYA_KEY_GROUP = {name: leaf.group for name, leaf in _KOHYA_TO_LEAF.items()} | {"network_args": "network"}


def _names(text: str) -> frozenset[str]:
    return frozenset(text.split())


# kohya train_network.py arguments (sd-scripts 48d368f: train_util, train_network, sdxl_train_util,
# custom_train_functions, deepspeed_utils, sai_model_spec, utils) that we do not map. A kohya file
# may hold them; we report them in ParsedToml.ignored instead of failing.
KOHYA_UNMAPPED = _names(
    """
    adaptive_noise_scale alpha_mask async_upload base_weights base_weights_multiplier blocks_to_swap cache_info
    cache_text_encoder_outputs_to_disk caption_prefix caption_separator caption_suffix
    ckpt color_aug conditioning_data_dir config_file console_log_file console_log_level console_log_simple
    cpu_offload_checkpointing dataset_class dataset_config ddp_gradient_as_bucket_view
    ddp_static_graph ddp_timeout debiased_estimation_loss debug_dataset deepspeed dim_from_weights
    disable_mmap_load_safetensors dynamo_backend enable_wildcard face_crop_aug_range
    fp16_master_weights_and_gradients fp8_base fp8_base_unet full_bf16 full_fp16 fused_backward_pass highvram
    huber_c huber_scale huber_schedule huggingface_path_in_repo huggingface_repo_id huggingface_repo_type
    huggingface_repo_visibility huggingface_token in_json initial_epoch initial_step ip_noise_gamma
    ip_noise_gamma_random_strength keep_tokens_separator log_config log_prefix log_tracker_config
    log_tracker_name log_with logging_dir logit_mean logit_std loss_type lowram lr_decay_steps lr_scheduler_args
    lr_scheduler_min_lr_ratio lr_scheduler_timescale lr_scheduler_type masked_loss max_data_loader_n_workers
    max_timestep mem_eff_attn metadata_is_negative_embedding metadata_license
    metadata_merged_from metadata_preprocessor metadata_thumbnail metadata_trigger_phrase metadata_usage_hint
    min_timestep mode_scale multires_noise_discount multires_noise_iterations network_weights no_half_vae
    no_metadata noise_offset_random_strength offload_optimizer_device offload_optimizer_nvme_path
    offload_param_device offload_param_nvme_path output_config persistent_data_loader_workers
    pretrained_model_name_or_path prior_loss_weight random_crop reg_data_dir resize_interpolation resume
    resume_from_huggingface sample_at_first sample_prompts sample_sampler save_last_n_epochs
    save_last_n_epochs_state save_last_n_steps save_last_n_steps_state save_model_as save_n_epoch_ratio
    save_state_on_train_end save_state_to_huggingface scale_v_pred_loss_like_noise_pred scale_weight_norms sdpa
    secondary_separator skip_cache_check skip_until_initial_step text_encoder_batch_size token_warmup_min
    token_warmup_step tokenizer_cache_dir torch_compile use_safetensors v2 v_parameterization v_pred_like_loss
    vae vae_batch_size
    wandb_api_key wandb_run_name weighting_scheme xformers zero3_init_flag
    zero3_save_16bit_model zero_stage zero_terminal_snr
    """
)
# ... of which these only concern the environment, the base model (the WebUI's) or logging: ignored quietly.
_KOHYA_INERT = _names(
    """
    async_upload cache_info ckpt config_file console_log_file console_log_level console_log_simple
    ddp_gradient_as_bucket_view ddp_static_graph ddp_timeout debug_dataset deepspeed disable_mmap_load_safetensors
    dynamo_backend highvram huggingface_path_in_repo huggingface_repo_id huggingface_repo_type
    huggingface_repo_visibility huggingface_token log_config log_prefix log_tracker_config log_tracker_name
    log_with logging_dir lowram max_data_loader_n_workers mem_eff_attn no_half_vae no_metadata
    offload_optimizer_device offload_optimizer_nvme_path offload_param_device offload_param_nvme_path
    output_config persistent_data_loader_workers pretrained_model_name_or_path prior_loss_weight
    resume_from_huggingface sample_sampler save_model_as save_state_to_huggingface sdpa skip_cache_check
    text_encoder_batch_size tokenizer_cache_dir use_safetensors v2 v_parameterization vae vae_batch_size
    wandb_api_key wandb_run_name xformers zero3_init_flag zero3_save_16bit_model zero_stage
    """
)
# networks.lora create_network() keyword arguments we do not support.
_KOHYA_UNMAPPED_NETWORK_ARGS = _names(
    """
    exclude_patterns include_patterns
    """
)
_KOHYA_ALIASES = {"caption_extention": "caption_extension"}  # kohya's old misspelling, still accepted by kohya
_KOHYA_LEGACY_OPTIMIZER = {"use_8bit_adam": "AdamW8bit", "use_lion_optimizer": "Lion"}


class UnknownSetting(ConfigError):
    """A setting ``parse_toml(strict=True)`` does not know; the caller says how its user skips such
    settings (the command line's ``--ignore-unknown``)."""


class ParsedToml(NamedTuple):
    """What ``parse_toml`` read: the config, the kohya settings it did not use, and a preset description."""

    config: TrainConfig
    ignored: dict[str, Any]
    description: str | None


def _toml_loads(text: str) -> dict[str, Any]:
    try:
        if _tomllib is not None:
            return _tomllib.loads(text)
        import toml

        return toml.loads(text)
    except ValueError as exc:  # tomllib.TOMLDecodeError and toml.TomlDecodeError are ValueErrors
        raise ConfigError("toml", f"is not valid TOML: {exc}") from None


def _toml_str(s: str) -> str:
    out = ['"']
    for ch in s:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return (
            repr(value) if math.isfinite(value) else ("nan" if math.isnan(value) else ("inf" if value > 0 else "-inf"))
        )
    if isinstance(value, str):
        return _toml_str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")  # unreachable for coerced values


def _py_literal(value: Any) -> str:
    """An optimizer argument as kohya's ast.literal_eval reads it (lists as tuples: betas=(0.9, 0.99))."""
    if isinstance(value, list):
        return repr(tuple(value))
    return repr(value)


def _parse_kv_list(path: str, value: Any, *, literal: bool) -> dict[str, Any]:
    """kohya's ["key=value", ...] lists (network_args: strings; optimizer_args: Python literals)."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(path, f"must be a list of 'key=value' strings, got {short(value)}")
    out: dict[str, Any] = {}
    for item in value:
        key, sep, text = item.partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not key:
            raise ConfigError(path, f"entries must look like 'key=value', got {item!r}")
        if literal:
            try:
                parsed = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                parsed = text  # kohya would fail here; keep the bare word as a string
            out[key] = parsed  # tuples become lists when the field is coerced
        else:
            out[key] = _parse_scalar(text)
    return out


def _network_arg_bool(leaf: Leaf, arg: Any) -> bool:
    """A true/false network argument ("dora_wd=True"), any case, as LyCORIS's kohya module writes them.
    LyCORIS takes any word but "false" as true; here another word is an error, so a typo is not a switch."""
    text = str(arg).lower()
    if text not in ("true", "false"):
        raise ConfigError(leaf.path, f"network_args '{leaf.meta['kohya']}' must be True or False, got {short(arg)}")
    return text == "true"


def _parse_scalar(text: str) -> Any:
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def _flatten_kohya(data: dict[str, Any]) -> dict[str, tuple[Any, str]]:
    """kohya's read_config_from_file: top-level keys and one level of tables, later keys winning."""
    flat: dict[str, tuple[Any, str]] = {}
    for key, value in data.items():
        items = value.items() if isinstance(value, dict) else [(key, value)]
        prefix = f"{key}." if isinstance(value, dict) else ""
        for name, item in items:
            if name in flat:
                logger.warning(
                    "kohya setting %r is set twice (%s and %s%s); the later one wins, as in kohya",
                    name,
                    flat[name][1],
                    prefix,
                    name,
                )
            flat[name] = (item, prefix + name)
    return flat


@dataclass
class _Reader:
    """What ``parse_toml`` collects: raw values by dotted path, where each was set, the ignored settings."""

    strict: bool
    values: dict[str, Any] = field(default_factory=dict)  # dotted path -> raw value
    where: dict[str, str] = field(default_factory=dict)  # dotted path -> where it was set, for duplicate messages
    ignored: dict[str, Any] = field(default_factory=dict)
    description: str | None = None

    def put(self, path: str, value: Any, source: str) -> None:
        if path in self.values:
            raise ConfigError(path, f"is set twice: as {self.where[path]} and as {source}; keep one")
        self.values[path] = value
        self.where[path] = source

    def unknown(self, name: str, value: Any, message: str) -> None:
        if self.strict:
            raise UnknownSetting(name, message)
        self.ignored[name] = value

    # -- kohya's names, from any table --------------------------------------------------------

    def read_kohya(self, flat: dict[str, tuple[Any, str]]) -> None:
        for raw_name, (value, source) in flat.items():
            self._read_kohya_key(_KOHYA_ALIASES.get(raw_name, raw_name), value, source, flat)
        if "max_train_epochs" in flat and "max_train_steps" in flat:  # in kohya, epochs override steps
            logger.warning("kohya settings: max_train_epochs overrides max_train_steps, as in kohya")
            self.values["training.max_train_steps"] = None
            self.where["training.max_train_steps"] = "kohya's max_train_epochs (which overrides max_train_steps)"
        self._lycoris_conv_defaults()

    def _lycoris_conv_defaults(self) -> None:
        """LyCORIS trains the 3x3 convs at the network's rank and alpha unless conv_dim/conv_alpha say otherwise."""
        if self.values.get("network.network_module") != LYCORIS_MODULE:
            return
        for conv, plain in (("conv_dim", "network_dim"), ("conv_alpha", "network_alpha")):
            if f"network.{conv}" not in self.values:
                leaf = LEAF_BY_PATH[f"network.{plain}"]
                value = self.values.get(leaf.path, leaf.meta["kohya_default"])
                self.put(f"network.{conv}", value, f"LyCORIS's default {conv} (= {plain})")

    def _read_kohya_key(self, name: str, value: Any, source: str, flat: dict[str, tuple[Any, str]]) -> None:
        if name == "network_args":
            self._read_network_args(value)
        elif name == "optimizer_args":
            self.put("optim.optimizer_args", _parse_kv_list("optim.optimizer_args", value, literal=True), source)
        elif name in _KOHYA_LEGACY_OPTIMIZER:
            if value is True and "optimizer_type" not in flat:
                self.put("optim.optimizer_type", _KOHYA_LEGACY_OPTIMIZER[name], source)
        elif name in _KOHYA_TO_LEAF:
            self._read_kohya_leaf(name, value, source)
        elif name in KOHYA_UNMAPPED:
            self.ignored[name] = value
        else:
            known = [*_KOHYA_TO_LEAF, "network_args", "optimizer_args"]
            self.unknown(source, value, unknown(name, known, "kohya setting"))

    def _read_network_args(self, value: Any) -> None:
        for key, arg in _parse_kv_list("network.network_args", value, literal=False).items():
            if key in _NETWORK_ARG_LEAVES:
                leaf = _NETWORK_ARG_LEAVES[key]
                self.put(
                    leaf.path, _network_arg_bool(leaf, arg) if leaf.kind == "bool" else arg, f"network_args '{key}'"
                )
            elif key in _KOHYA_UNMAPPED_NETWORK_ARGS:
                self.ignored[f"network_args.{key}"] = arg
            else:
                self.unknown(f"network_args.{key}", arg, unknown(key, _NETWORK_ARG_LEAVES, "networks.lora argument"))

    def _read_kohya_leaf(self, name: str, value: Any, source: str) -> None:
        leaf = _KOHYA_TO_LEAF[name]
        if leaf.meta.get("kohya_inverted"):
            if not isinstance(value, bool):
                raise ConfigError(leaf.path, f"{name} must be true or false, got {short(value)}")
            value = not value
        elif name == "optimizer_type" and isinstance(value, str):
            value = {o.lower(): o for o in OPTIMIZERS}.get(value.lower(), value) if value else "AdamW"
        elif name == "text_encoder_lr" and isinstance(value, list):  # kohya: one rate per text encoder
            if len(set(value)) > 1:
                raise ConfigError(leaf.path, f"must be one learning rate for all text encoders, got {value}")
            value = value[0] if value else None
            if value is None:
                return
        self.put(leaf.path, value, source)

    # -- ours, from [lora_train] --------------------------------------------------------------

    def read_ours(self, ours: Any) -> None:
        if not isinstance(ours, dict):
            raise ConfigError("lora_train", f"must be a table, got {type(ours).__name__}")
        for key, value in ours.items():
            if key == "format":
                _check_format(value)
            elif key == "description":
                if not isinstance(value, str):
                    raise ConfigError("lora_train.description", f"must be a string, got {short(value)}")
                self.description = value
            elif key in GROUPS and isinstance(value, dict):
                for name, item in value.items():
                    path = f"{key}.{name}"
                    if path not in LEAF_BY_PATH:
                        raise ConfigError(path, unknown(path, LEAF_BY_PATH, "setting"))
                    self.put(path, item, f"[lora_train.{key}] {name}")
            else:
                raise ConfigError(f"lora_train.{key}", unknown(key, (*GROUPS, "format", "description"), "setting"))


def _check_format(value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError("lora_train.format", f"must be a format number like {FORMAT_VERSION}, got {short(value)}")
    if value > FORMAT_VERSION:
        raise ConfigError(
            "lora_train.format",
            f"this file's format {value} is newer than this version reads ({FORMAT_VERSION}); "
            "update sd-webui-lora-train",
        )


def _build_config(values: dict[str, Any], *, kohya_file: bool, epochs_given: bool) -> TrainConfig:
    kwargs: dict[str, dict[str, Any]] = {group: {} for group in GROUPS}
    for leaf in LEAVES:
        if leaf.path in values:
            kwargs[leaf.group][leaf.name] = coerce(leaf, values[leaf.path])
        elif kohya_file and "kohya_default" in leaf.meta:
            kwargs[leaf.group][leaf.name] = leaf.meta["kohya_default"]
    if kohya_file and epochs_given:
        kwargs["training"]["max_train_steps"] = None  # epochs given: kohya's 1600-step default does not apply
    return config_from_groups(kwargs)


def _warn_ignored(ignored: dict[str, Any]) -> None:
    relevant = {k: v for k, v in ignored.items() if k not in _KOHYA_INERT and v not in (None, False, "", 0, [])}
    if relevant:
        listed = ", ".join(f"{k}={short(v)}" for k, v in relevant.items())
        logger.warning("these kohya settings are not supported and were ignored: %s", listed)


def parse_toml(text: str, *, strict: bool = True) -> ParsedToml:
    """Read our TOML (``to_toml``) or a kohya ``train_network.py --config_file`` TOML.

    kohya settings are read under kohya's names from any table (kohya flattens them); ours come from
    ``[lora_train.<group>]``. Without a ``[lora_train]`` table, absent kohya settings take kohya's own
    defaults. kohya settings we do not use are returned in ``ignored`` (logged when they change training).
    Unknown names raise ``ConfigError`` naming them, or with ``strict=False`` are ignored too.
    Types are checked here; limits are ``validate()``'s job.
    """
    data = _toml_loads(text)
    ours = data.pop("lora_train", None)
    if "datasets" in data:
        raise ConfigError(
            "datasets",
            "this is a kohya --dataset_config file ([general]/[[datasets]]); read the training config "
            "(--config_file) instead and set dataset.train_data_dir to the folder of '<repeats>_<name>' subfolders",
        )
    reader = _Reader(strict)
    flat = _flatten_kohya(data)
    reader.read_kohya(flat)
    if ours is not None:
        reader.read_ours(ours)
    config = _build_config(reader.values, kohya_file=ours is None, epochs_given="max_train_epochs" in flat)
    _warn_ignored(reader.ignored)
    return ParsedToml(config, reader.ignored, reader.description)


def from_toml(text: str, *, strict: bool = True) -> TrainConfig:
    """Module-level alias of ``TrainConfig.from_toml``."""
    return parse_toml(text, strict=strict).config


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _kohya_value(leaf: Leaf, value: Any) -> Any:
    """A value kohya has a plain argument for, in kohya's form."""
    if leaf.meta.get("kohya_inverted"):
        return not value
    if leaf.kind == "resolution":
        w, h = (value, value) if isinstance(value, int) else value
        return f"{w},{h}"
    if leaf.meta["kohya"] == "optimizer_args":
        return [f"{k}={_py_literal(v)}" for k, v in value.items()]
    return jsonable(value)


def _lycoris_writes(leaf: Leaf, values: dict[str, Any]) -> bool:
    """conv_dim/conv_alpha are always written for LyCORIS, whose defaults for them are the network's."""
    return values["network.network_module"] == LYCORIS_MODULE and leaf.name in ("conv_dim", "conv_alpha")


def kohya_and_ours(config: TrainConfig) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The set settings as kohya arguments, and by group those kohya lacks (for ``[lora_train.*]``)."""
    values = {leaf.path: value for leaf, value in config.leaf_values()}
    kohya: dict[str, Any] = {}
    ours: dict[str, dict[str, Any]] = {group: {} for group in GROUPS}
    network_args: list[str] = []
    for leaf in LEAVES:
        value = values[leaf.path]
        kohya_name = leaf.meta.get("kohya")
        if value is None:
            continue
        if kohya_name is None or (
            leaf.path == "training.max_train_epochs" and values["training.max_train_steps"] is not None
        ):
            # kohya lacks it, or (epochs while steps is set) kohya would let it override steps.
            ours[leaf.group][leaf.name] = jsonable(value)
        elif leaf.meta.get("kohya_network_arg"):
            kohya.setdefault("network_args", network_args)
            if value != leaf.default or _lycoris_writes(leaf, values):
                # absent = the default, in kohya (None/1.0) and here alike; LyCORIS's conv defaults differ
                network_args.append(f"{kohya_name}={value}")
        else:
            kohya[kohya_name] = _kohya_value(leaf, value)
    if not network_args:
        kohya.pop("network_args", None)
    return kohya, ours


def to_toml(config: TrainConfig, *, description: str | None = None) -> str:
    """``config`` as our TOML (see ``TrainConfig.to_toml``)."""
    kohya, ours = kohya_and_ours(config)
    lines = [
        "# sd-webui-lora-train training config.",
        "# The [*_arguments] tables hold kohya-ss/sd-scripts train_network.py arguments under kohya's names",
        "# (kohya flattens tables, so this also works as its --config_file); [lora_train.*] holds the rest.",
    ]
    for group in GROUPS:
        section = {k: v for k, v in kohya.items() if _KOHYA_KEY_GROUP[k] == group}
        if section:
            lines += ["", f"[{_KOHYA_SECTIONS[group]}]"]
            lines += [f"{key} = {_toml_value(value)}" for key, value in section.items()]
    lines += ["", "[lora_train]", f"format = {FORMAT_VERSION}"]
    if description is not None:
        lines.append(f"description = {_toml_value(description)}")
    for group in GROUPS:
        if ours[group]:
            lines += ["", f"[lora_train.{group}]"]
            lines += [f"{key} = {_toml_value(value)}" for key, value in ours[group].items()]
    return "\n".join(lines) + "\n"
