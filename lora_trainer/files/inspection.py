"""Describe a LoRA file (ours, kohya's, LyCORIS's): family, network type, ranks/alphas, metadata, hashes.

:func:`inspect_lora` returns a JSON-able dict; :func:`format_report` renders it for people.
``python -m lora_trainer inspect FILE [--json]`` is the command-line front end.

A kohya-style key is ``<module>.<part>``: the module name has no dots (``lora_unet_..._to_q``),
the part says what the tensor is (``lora_down.weight``, ``hada_w1_a``, ``alpha`` ...), as A1111
splits it. Network types are recognised by their parts: :data:`NETWORK_TYPES` is the registry,
one line per type.
"""

from __future__ import annotations

import importlib
import json
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from safetensors import safe_open

from lora_trainer.errors import LoraFileError
from lora_trainer.files.hashes import file_data_sha256
from lora_trainer.files.lora_file import require_lora_keys
from lora_trainer.files.safetensors_format import read_safetensors_header

__all__ = ["NETWORK_TYPES", "SHARED_PARTS", "NetworkType", "detect_family", "format_report", "inspect_lora"]


@dataclass(frozen=True)
class NetworkType:
    """A module type: its tensor parts, which part's ``shape[0]`` is the rank, and the parts it needs."""

    name: str
    parts: tuple[str, ...]
    rank_from: tuple[str, ...] = ()
    required: tuple[tuple[str, ...], ...] = ()  # each inner tuple: at least one of these must be present
    in_from_rank_part: bool = False  # the rank part is (rank, in_features, ...): tells the layer width


# First match wins, so list more specific types first. New types are one line.
NETWORK_TYPES: tuple[NetworkType, ...] = (
    NetworkType(
        "lora",
        ("lora_down.weight", "lora_up.weight", "lora_mid.weight"),
        ("lora_down.weight",),
        (("lora_down.weight",), ("lora_up.weight",)),
        in_from_rank_part=True,
    ),
    NetworkType(
        "loha",
        ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
        ("hada_w1_b",),
        (("hada_w1_a",), ("hada_w1_b",), ("hada_w2_a",), ("hada_w2_b",)),
        in_from_rank_part=True,
    ),
    NetworkType(
        "lokr",
        ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
        ("lokr_w2_b", "lokr_w1_b"),
        (("lokr_w1", "lokr_w1_b"), ("lokr_w2", "lokr_w2_b")),
    ),
    NetworkType("glora", ("a1.weight", "a2.weight", "b1.weight", "b2.weight"), ("a1.weight",)),
    NetworkType("oft", ("oft_blocks", "oft_diag", "rescale")),
    NetworkType("ia3", ("weight", "on_input")),
    NetworkType("full", ("diff", "diff_b")),
    NetworkType("norm", ("w_norm", "b_norm")),
)
# Parts any type may carry.
SHARED_PARTS = ("alpha", "dora_scale", "bias_indices", "bias_values", "bias_size")

GROUP_PREFIXES = (("lora_te1_", "te1"), ("lora_te2_", "te2"), ("lora_te_", "te"), ("lora_unet_", "unet"))
_COMPVIS_UNET = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")
_TE_LAYER = re.compile(r"^lora_te_text_model_encoder_layers_(\d+)_")
# 3x3 convs by name, for types whose tensors do not show the kernel (LoHa/LoKr without Tucker factors)
_CONV_NAME = re.compile(r"(_conv1|_conv2|_conv|_op|_in_layers_2|_out_layers_3|_conv_in|_conv_out)$")
_CROSS_ATTN_DIM = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
_TE_HIDDEN = {768: "sd1", 1024: "sd2"}
_LIST_LIMIT = 20


@dataclass
class _Module:
    name: str
    group: str | None
    parts: dict[str, dict[str, Any]]  # part -> header entry (dtype, shape, ...)
    type: str = "?"
    rank: int | None = None
    alpha: float | None = None
    kind: str = "?"
    in_features: int | None = None

    @property
    def layer_class(self) -> str:
        """ "conv" (kernel > 1, kohya's conv_dim) or "linear" (Linear and 1x1 conv, kohya's network_dim)."""
        return "conv" if self.kind in ("conv3x3", "conv") else "linear" if self.kind != "?" else "?"


def _group_of(name: str) -> str | None:
    for prefix, group in GROUP_PREFIXES:
        if name.startswith(prefix):
            return group
    return None


def _classify(module: _Module) -> list[str]:
    """Set type/rank/kind/in_features; return the module's parts that no type explains."""
    own = {p for p in module.parts if p not in SHARED_PARTS}
    for network_type in NETWORK_TYPES:
        if own & set(network_type.parts):
            module.type = network_type.name
            for part in network_type.rank_from:
                shape = module.parts.get(part, {}).get("shape")
                if shape:
                    module.rank = int(shape[0])
                    if network_type.in_from_rank_part and len(shape) >= 2:
                        module.in_features = int(shape[1])
                    break
            for alternatives in network_type.required:
                if not any(a in module.parts for a in alternatives):
                    module.type = f"{network_type.name} (incomplete)"
            unknown = sorted(own - set(network_type.parts))
            break
    else:
        unknown = sorted(own)
    module.kind = _kind_of(module)
    return unknown


def _kind_of(module: _Module) -> str:
    shapes = [entry["shape"] for entry in module.parts.values()]
    kernels = [tuple(s[2:]) for s in shapes if len(s) == 4]
    if any(k != (1, 1) for k in kernels):
        return "conv3x3" if (3, 3) in kernels else "conv"
    if kernels:
        # a 1x1 lora_up also comes with 3x3 convs: the down/first factor decides
        return "conv1x1"
    if module.type == "lora" or module.type.startswith("lora "):
        return "linear"
    if _CONV_NAME.search(module.name):
        return "conv"
    if module.type in ("loha", "lokr", "glora"):
        return "linear"
    return "?"


def family_from_metadata(md: dict[str, str]) -> tuple[str | None, bool | None, str | None]:
    """(family, v_prediction, which key said so) from kohya/modelspec metadata."""
    version = md.get("ss_base_model_version", "")
    arch = md.get("modelspec.architecture", "")
    prediction = md.get("modelspec.prediction_type")
    v_pred = None
    if prediction in ("v", "epsilon"):
        v_pred = prediction == "v"
    if version:
        if version.startswith("sd_v1") or version.startswith("sd_v2"):
            vp = version.endswith("_v")
            return (
                ("sd2" if version.startswith("sd_v2") else "sd1"),
                (vp if v_pred is None else v_pred),
                (f"ss_base_model_version={version}"),
            )
        if version.startswith("sdxl"):
            return "sdxl", v_pred, f"ss_base_model_version={version}"
    if arch:
        base = arch.split("/")[0]
        if base.startswith("stable-diffusion-xl"):
            return "sdxl", v_pred, f"modelspec.architecture={arch}"
        if base.startswith("stable-diffusion-v2"):
            return "sd2", (base.endswith("-v") if v_pred is None else v_pred), f"modelspec.architecture={arch}"
        if base.startswith("stable-diffusion-v1"):
            return "sd1", v_pred, f"modelspec.architecture={arch}"
    if md.get("ss_v2") == "True":
        return "sd2", v_pred, "ss_v2=True"
    if md.get("ss_v2") == "False":
        return "sd1", v_pred, "ss_v2=False"
    return None, v_pred, None


def _family_from_modules(modules: list[_Module]) -> tuple[str | None, str | None]:
    """(family, reason) from module names and shapes alone."""
    groups = {m.group for m in modules}
    if "te1" in groups or "te2" in groups:
        return "sdxl", "lora_te1_/lora_te2_ keys"
    cross = {m.in_features for m in modules if m.group == "unet" and m.name.endswith("attn2_to_k") and m.in_features}
    for dim in cross:
        if dim in _CROSS_ATTN_DIM:
            return _CROSS_ATTN_DIM[dim], f"cross-attention context dim {dim}"
    te_layers = [int(match.group(1)) for m in modules if (match := _TE_LAYER.match(m.name))]
    te_hidden = {m.in_features for m in modules if m.group == "te" and m.name.endswith("q_proj") and m.in_features}
    if 1024 in te_hidden:
        return "sd2", "text encoder width 1024"
    if te_layers and max(te_layers) >= 12:
        return "sd2", f"text encoder layer {max(te_layers)} (SD1 has 12 layers)"
    if any(m.name.startswith(_COMPVIS_UNET) for m in modules):
        return "sdxl", "compvis-style UNet keys (lora_unet_input_blocks_...)"
    if 768 in te_hidden:
        return "sd1", "text encoder width 768"
    if any(m.group == "unet" for m in modules):
        return "sd1", "diffusers-style UNet keys (SD1 or SD2; guessed SD1)"
    return None, None


def detect_family(metadata: dict[str, str], tensor_names_shapes: dict[str, list[int]]) -> tuple[str | None, str | None]:
    """Family ("sd1"/"sd2"/"sdxl"/None) and the reason, from metadata first, else from keys and shapes."""
    family, _, source = family_from_metadata(metadata)
    if family:
        return family, source
    modules = _group_modules({k: {"shape": v, "dtype": "F32"} for k, v in tensor_names_shapes.items()})[0]
    for m in modules:
        _classify(m)
    return _family_from_modules(modules)


def _group_modules(entries: dict[str, dict[str, Any]]) -> tuple[list[_Module], list[str]]:
    """Split tensor names into modules; returns (modules, keys that cannot be placed)."""
    by_module: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    unplaced: list[str] = []
    for key, entry in entries.items():
        name, dot, part = key.partition(".")
        if not dot or _group_of(name) is None:
            unplaced.append(key)
            continue
        by_module[name][part] = entry
    modules = [_Module(name, _group_of(name), parts) for name, parts in sorted(by_module.items())]
    return modules, unplaced


def _kohya_names(family: str) -> tuple[set[str] | None, str | None]:
    """kohya's module names for ``family`` from ``lora_trainer.naming.kohya_names``, if that exists."""
    try:
        naming = importlib.import_module("lora_trainer.naming")
    except ImportError as e:
        return None, f"lora_trainer.naming is not available ({e})"
    kohya_names = getattr(naming, "kohya_names", None)
    if not callable(kohya_names):
        return None, "lora_trainer.naming has no kohya_names()"
    try:
        return set(cast("Iterable[str]", kohya_names(family, conv=True))), None
    except Exception as e:  # noqa: BLE001 - a checker must not break inspection
        return None, f"kohya_names({family!r}) failed: {e}"


def _read_alphas(path: Path, modules: list[_Module]) -> None:
    wanted = [m for m in modules if "alpha" in m.parts]
    if not wanted:
        return
    try:
        with safe_open(str(path), framework="pt") as f:  # pyright: ignore[reportGeneralTypeIssues] - stub lacks __enter__
            for m in wanted:
                value = f.get_tensor(f"{m.name}.alpha")
                if value.numel() == 1:
                    m.alpha = float(value.float().item())
    except Exception as e:
        raise LoraFileError(f"{path.name}: cannot read tensors ({e})") from e


def _rank_alpha_table(modules: list[_Module]) -> dict[str, Any]:
    groups: dict[str, Any] = {}
    # every module has a group: _group_modules places only names with a known prefix
    placed = {m.group for m in modules if m.group is not None}
    for group in sorted(placed, key=lambda g: ("te", "te1", "te2", "unet").index(g)):
        members = [m for m in modules if m.group == group]
        classes: dict[str, Counter] = defaultdict(Counter)
        for m in members:
            classes[m.layer_class][(m.rank, m.alpha)] += 1
        groups[group] = {
            "modules": len(members),
            **{
                cls: [
                    {"rank": rank, "alpha": alpha, "count": count}
                    for (rank, alpha), count in sorted(counter.items(), key=lambda kv: (-kv[1], str(kv[0])))
                ]
                for cls, counter in sorted(classes.items())
            },
        }
    return groups


def _network_label(type_counts: Counter, kind_counts: Counter, dora: int) -> str:
    names = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr", "ia3": "IA3", "glora": "GLoRA", "oft": "OFT"}
    labels = []
    for type_name, _ in type_counts.most_common():
        base = type_name.split(" ")[0]
        if base == "lora":
            label = "LoCon" if kind_counts.get("conv3x3") or kind_counts.get("conv") else "LoRA"
        else:
            label = names.get(base, base)
        if label not in labels:
            labels.append(label)
    label = " + ".join(labels) if labels else "?"
    return f"{label} (DoRA)" if dora else label


def _metadata_summary(md: dict[str, str], warnings: list[str]) -> dict[str, Any]:
    fields = {
        "output_name": "ss_output_name",
        "title": "modelspec.title",
        "base_model_version": "ss_base_model_version",
        "architecture": "modelspec.architecture",
        "sd_model_name": "ss_sd_model_name",
        "network_module": "ss_network_module",
        "network_dim": "ss_network_dim",
        "network_alpha": "ss_network_alpha",
        "network_args": "ss_network_args",
        "resolution": "ss_resolution",
        "steps": "ss_steps",
        "max_train_steps": "ss_max_train_steps",
        "epoch": "ss_epoch",
        "num_epochs": "ss_num_epochs",
        "num_train_images": "ss_num_train_images",
        "clip_skip": "ss_clip_skip",
        "learning_rate": "ss_learning_rate",
        "optimizer": "ss_optimizer",
        "training_comment": "ss_training_comment",
        "date": "modelspec.date",
        "implementation": "modelspec.implementation_version",
        "stopped_early": "lora_train.stopped_early",
    }
    summary: dict[str, Any] = {name: md[key] for name, key in fields.items() if key in md}
    if "resolution" not in summary and "modelspec.resolution" in md:
        summary["resolution"] = md["modelspec.resolution"]
    if "ss_tag_frequency" in md:
        try:
            frequency = json.loads(md["ss_tag_frequency"])
            totals: Counter = Counter()
            for tags in (frequency or {}).values():
                for tag, count in (tags or {}).items():
                    totals[tag.strip()] += int(count)
            summary["tag_count"] = len(totals)
            summary["top_tags"] = [[tag, count] for tag, count in totals.most_common(10)]
        except (ValueError, TypeError, AttributeError) as e:
            warnings.append(f"ss_tag_frequency is not valid tag JSON ({e})")
    return summary


def inspect_lora(path: str | os.PathLike) -> dict[str, Any]:
    """Everything :command:`python -m lora_trainer inspect` shows, as a JSON-able dict.

    Raises :class:`LoraFileError` for a missing, damaged or non-LoRA file.
    """
    header = read_safetensors_header(path)
    require_lora_keys(header.tensors, header.path)
    md = header.metadata
    warnings: list[str] = []

    modules, unplaced = _group_modules(header.tensors)
    unknown_parts: list[str] = []
    for m in modules:
        unknown_parts += [f"{m.name}.{p}" for p in _classify(m)]
    unplaced = sorted(unplaced + unknown_parts)
    _read_alphas(header.path, modules)

    meta_family, v_pred, meta_source = family_from_metadata(md)
    key_family, key_reason = _family_from_modules(modules)
    if meta_family and key_family and meta_family != key_family:
        warnings.append(
            f"metadata says {meta_family} ({meta_source}) but the keys look like {key_family} ({key_reason})"
        )
    family = meta_family or key_family
    family_source = f"metadata: {meta_source}" if meta_family else (f"keys: {key_reason}" if key_family else None)

    golden: dict[str, Any] = {"checked": False}
    if family:
        names, reason = _kohya_names(family)
        if names is not None:
            outside = sorted(m.name for m in modules if m.name not in names)
            golden = {
                "checked": True,
                "kohya_modules": len(names),
                "present": len(modules) - len(outside),
                "not_kohya_count": len(outside),
                "not_kohya": outside[:_LIST_LIMIT],
            }
        else:
            golden["reason"] = reason
    else:
        golden["reason"] = "family unknown"

    type_counts = Counter(m.type for m in modules)
    kind_counts = Counter(m.kind for m in modules)
    dora = sum(1 for m in modules if "dora_scale" in m.parts)
    incomplete = sorted(m.name for m in modules if m.type.endswith("(incomplete)"))
    if incomplete:
        warnings.append(f"{len(incomplete)} modules are missing tensors (e.g. {incomplete[0]})")
    if unplaced:
        warnings.append(f"{len(unplaced)} keys cannot be placed (e.g. {unplaced[0]})")

    data_sha256 = file_data_sha256(header.path)
    stored = md.get("sshs_model_hash")
    hashes = {
        "sshs_model_hash": stored,
        "sshs_legacy_hash": md.get("sshs_legacy_hash"),
        "data_sha256": data_sha256,
        "model_hash_matches": (stored == data_sha256) if stored else None,
        "a1111_short_hash": (stored or data_sha256)[:12],
    }
    if stored and stored != data_sha256:
        warnings.append("sshs_model_hash does not match the tensor data (file edited after saving?)")

    return {
        "path": str(header.path),
        "file_size": header.file_size,
        "tensor_count": len(header.tensors),
        "module_count": len(modules),
        "dtypes": dict(Counter(entry["dtype"] for entry in header.tensors.values()).most_common()),
        "family": family,
        "family_source": family_source,
        "v_prediction": v_pred,
        "network_type": _network_label(type_counts, kind_counts, dora),
        "module_types": dict(type_counts.most_common()),
        "module_kinds": dict(kind_counts.most_common()),
        "dora_modules": dora,
        "groups": _rank_alpha_table(modules),
        "unplaced_key_count": len(unplaced),
        "unplaced_keys": unplaced[:_LIST_LIMIT],
        "incomplete_modules": incomplete[:_LIST_LIMIT],
        "kohya_name_check": golden,
        "metadata_key_count": len(md),
        "metadata": _metadata_summary(md, warnings),
        "hashes": hashes,
        "warnings": warnings,
    }


_DTYPE_NAMES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:g}"


def format_report(report: dict[str, Any]) -> str:
    """A short human-readable rendering of :func:`inspect_lora`'s dict."""
    lines = _summary_lines(report)
    lines.append("")
    lines += _rank_alpha_lines(report)
    lines.append("")
    lines += _key_lines(report)
    lines += _metadata_lines(report)
    lines += _hash_lines(report["hashes"])
    for warning in report["warnings"]:
        lines.append(f"warning   {warning}")
    return "\n".join(lines)


def _summary_lines(report: dict[str, Any]) -> list[str]:
    """file, family and network lines."""
    lines: list[str] = []
    dtypes = ", ".join(
        f"{_DTYPE_NAMES.get(d, d)}" + (f" x{n}" if len(report["dtypes"]) > 1 else "")
        for d, n in report["dtypes"].items()
    )
    lines.append(f"file      {report['path']}")
    lines.append(f"          {_size(report['file_size'])}, {report['tensor_count']} tensors, {dtypes}")
    family = report["family"] or "unknown"
    if report["v_prediction"] is not None and report["family"]:
        family += ", v-prediction" if report["v_prediction"] else ", epsilon"
    lines.append(f"family    {family}" + (f"  ({report['family_source']})" if report["family_source"] else ""))
    types = ", ".join(f"{n} {t}" for t, n in report["module_types"].items())
    kinds = ", ".join(f"{n} {k}" for k, n in report["module_kinds"].items())
    lines.append(f"network   {report['network_type']}: {report['module_count']} modules ({types}; {kinds})")
    if report["dora_modules"]:
        lines.append(f"          {report['dora_modules']} modules carry dora_scale")
    return lines + _settings_lines(report["metadata"])


def _settings_lines(md: dict[str, Any]) -> list[str]:
    """The network's settings as the metadata records them: kohya's module and its network_args."""
    if "network_module" not in md:
        return []
    try:
        args = json.loads(md.get("network_args") or "{}")
    except ValueError:
        args = {}
    listed = ", ".join(f"{k} {v}" for k, v in args.items()) if isinstance(args, dict) else ""
    return [f"settings  {md['network_module']}" + (f": {listed}" if listed else "")]


def _rank_alpha_lines(report: dict[str, Any]) -> list[str]:
    """The group / layers / rank / alpha / modules table."""
    lines = [f"  {'group':<6} {'layers':<7} {'rank':>5} {'alpha':>7} {'modules':>8}"]
    for group, info in report["groups"].items():
        for cls in ("linear", "conv", "?"):
            for row in info.get(cls, []):
                rank = "-" if row["rank"] is None else str(row["rank"])
                lines.append(f"  {group:<6} {cls:<7} {rank:>5} {_num(row['alpha']):>7} {row['count']:>8}")
    return lines


def _key_lines(report: dict[str, Any]) -> list[str]:
    """Keys that cannot be placed, and the kohya module-name check."""
    lines: list[str] = []
    if report["unplaced_key_count"]:
        shown = ", ".join(report["unplaced_keys"][:5])
        more = report["unplaced_key_count"] - min(5, len(report["unplaced_keys"]))
        lines.append(f"unplaced  {report['unplaced_key_count']} keys: {shown}" + (f" (+{more} more)" if more else ""))
    check = report["kohya_name_check"]  # not checked: only in the JSON (reason)
    if check["checked"]:
        if check["not_kohya_count"]:
            shown = ", ".join(check["not_kohya"][:5])
            lines.append(f"kohya     {check['not_kohya_count']} modules are not kohya targets: {shown}")
        else:
            lines.append(
                f"kohya     all {report['module_count']} modules are kohya targets ({check['kohya_modules']} possible)"
            )
    return lines


def _metadata_lines(report: dict[str, Any]) -> list[str]:
    md = report["metadata"]
    if report["metadata_key_count"] == 0:
        return ["metadata  none"]
    lines = [f"metadata  {report['metadata_key_count']} keys; " + "; ".join(_metadata_parts(md))]
    if md.get("training_comment") not in (None, "None", ""):
        lines.append(f"comment   {md['training_comment']}")
    if "tag_count" in md:
        top = ", ".join(f"{t} ({n})" for t, n in md["top_tags"])
        lines.append(f"tags      {md['tag_count']} distinct" + (f"; top: {top}" if top else ""))
    return lines


def _metadata_parts(md: dict[str, Any]) -> list[str]:
    """The ``label value`` pieces of the metadata line."""
    parts = []
    for label, key in (
        ("name", "output_name"),
        ("base", "base_model_version"),
        ("model", "sd_model_name"),
        ("resolution", "resolution"),
        ("clip skip", "clip_skip"),
        ("images", "num_train_images"),
    ):
        if md.get(key) not in (None, "None"):
            parts.append(f"{label} {md[key]}")
    if "network_dim" in md:
        parts.append(f"dim/alpha {md['network_dim']}/{md.get('network_alpha', '?')}")
    if md.get("network_args"):
        parts.append(f"args {md['network_args']}")
    if "steps" in md:
        parts.append(f"steps {md['steps']}" + (f"/{md['max_train_steps']}" if "max_train_steps" in md else ""))
    if "epoch" in md:
        parts.append(f"epoch {md['epoch']}" + (f"/{md['num_epochs']}" if "num_epochs" in md else ""))
    if md.get("stopped_early") == "True":
        parts.append("stopped early")
    return parts


def _hash_lines(h: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if h["sshs_model_hash"] is None:
        lines.append(f"hash      no sshs_model_hash; data sha256 {h['data_sha256']}")
    elif h["model_hash_matches"]:
        lines.append(f"hash      sshs_model_hash {h['sshs_model_hash']} (matches the data)")
    else:
        lines.append(f"hash      sshs_model_hash {h['sshs_model_hash']} DOES NOT match the data ({h['data_sha256']})")
    if h["sshs_legacy_hash"] is not None:
        lines.append(f"          sshs_legacy_hash {h['sshs_legacy_hash']} (not checkable from the file)")
    return lines
