"""The tab's settings as widgets: the field table ``FIELDS`` and widget values <-> config values.

No gradio here: ``FIELDS`` has one ``FieldSpec`` row per setting (built from ``config.LEAVES``);
``ui.py`` builds one component per row and hands their values to :func:`build_config`, which
returns the ``TrainConfig`` plus every problem found (``ConfigError`` naming the dotted field),
so the UI can show them all at once. Widget kinds (``WIDGETS``):

========  ================================  ==========================================
widget    component holds                   config value
========  ================================  ==========================================
text      str (blank = unset if optional)   str (resolution: "512" or "512,768")
int       number; optional: str, blank      int (blank = unset, optional only)
float     number; optional: str, blank      float (blank = unset, optional only)
checkbox  bool                              bool
dropdown  str (str(choice))                 the choice (75/150/225 stay ints)
lines     str, one entry per line           list[str]
kv        str, one ``name=value`` per line  dict (values read as Python literals)
========  ================================  ==========================================

Optional numbers are text boxes: gradio 3.41's number box shows an unset value as 0, which would
read as a setting ("save every 0 epochs"); a blank text box with the placeholder "unset" does not.
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from lora_trainer.config import LEAVES, Leaf, TrainConfig
from lora_trainer.errors import ConfigError

WIDGETS = ("text", "int", "float", "checkbox", "dropdown", "lines", "kv")
"""Widget kinds in ``FIELDS``: text box, integer, number, checkbox, dropdown (``choices``),
one string per line (``list[str]``), key=value pairs (``dict``)."""

_WIDGET_OF_KIND = {
    "bool": "checkbox",
    "int": "int",
    "float": "float",
    "str": "text",
    "str_list": "lines",
    "dict": "kv",
    "resolution": "text",
}


class FieldSpec(NamedTuple):
    """One row of the UI field table."""

    path: str  # dotted attribute, "network.network_dim"
    label: str
    widget: str  # one of WIDGETS
    choices: tuple | None  # for "dropdown"
    help: str
    default: Any  # JSON form
    optional: bool  # blank = None (unset)
    minimum: float | None
    maximum: float | None
    kohya: str | None


def widget_of(leaf: Leaf) -> str:
    """The widget kind for a setting: a dropdown when it has choices, else by its value kind."""
    return "dropdown" if "choices" in leaf.meta else _WIDGET_OF_KIND[leaf.kind]


def field_spec(leaf: Leaf) -> FieldSpec:
    """The UI row of one setting."""
    return FieldSpec(
        path=leaf.path,
        label=leaf.meta["label"],
        widget=widget_of(leaf),
        choices=leaf.meta.get("choices"),
        help=leaf.meta["help"],
        default=leaf.json_default,
        optional=leaf.optional,
        minimum=leaf.meta.get("ge", leaf.meta.get("gt")),
        maximum=leaf.meta.get("le", leaf.meta.get("lt")),
        kohya=leaf.meta.get("kohya"),
    )


FIELDS: tuple[FieldSpec, ...] = tuple(field_spec(leaf) for leaf in LEAVES)
"""Every setting in display order (groups in ``TrainConfig`` order, fields in class order)."""

ELEM_PREFIX = "lora_train_cfg_"
"""elem_id of a setting's component: this prefix plus the dotted path with '_' for '.'."""


class Section(NamedTuple):
    """One settings tab: a title and the config groups it shows, in order."""

    key: str
    title: str
    groups: tuple[str, ...]


SECTIONS: tuple[Section, ...] = (
    Section("dataset", "Dataset", ("dataset",)),
    Section("network", "Network & optimizer", ("network", "optim")),
    Section("training", "Training & validation", ("training", "validation")),
    Section("save", "Save & samples", ("save", "sample")),
)

GROUP_LABELS: dict[str, str] = {f.name: f.metadata["label"] for f in dataclasses.fields(TrainConfig)}

FIELD_BY_PATH: dict[str, FieldSpec] = {spec.path: spec for spec in FIELDS}

PERSONAL = frozenset(
    {
        "dataset.train_data_dir",
        "dataset.trigger_words",
        "save.output_name",
        "save.output_dir",
        "save.training_comment",
        "save.metadata_title",
        "save.metadata_author",
        "save.metadata_description",
        "save.metadata_tags",
        "sample.sample_prompts",
    }
)
"""Settings about *this* LoRA, not about how to train: a preset that leaves one at its default
does not clear what the user typed (kohya-trainer's preset has no output name, for instance)."""

WIDE = frozenset({"lines", "kv"})
"""Widgets that get a row of their own."""


def elem_id(path: str) -> str:
    return ELEM_PREFIX + path.replace(".", "_")


def group_of(path: str) -> str:
    return path.split(".", 1)[0]


def section_fields(section: Section) -> list[FieldSpec]:
    return [spec for spec in FIELDS if group_of(spec.path) in section.groups]


def field_label(path: str) -> str:
    """'Dataset › Training images folder' for a dotted path; the path itself when unknown."""
    spec = FIELD_BY_PATH.get(path)
    if spec is None:
        return path
    return f"{GROUP_LABELS[group_of(path)]} › {spec.label}"


def short_help(text: str) -> str:
    """The first sentence of a help text (the whole text is the tooltip).

    A sentence ends at '. ' outside parentheses and not after 'e.g'/'i.e'.
    """
    depth = 0
    for i, char in enumerate(text):
        if char == "(":
            depth += 1
        elif char == ")":
            depth = max(0, depth - 1)
        elif (
            char == "."
            and depth == 0
            and text[i + 1 : i + 2] == " "
            and not text[max(0, i - 3) : i].lower().endswith(("e.g", "i.e"))
        ):
            return text[: i + 1]
    return text


# --------------------------------------------------------------------------------------------
# config value -> widget value
# --------------------------------------------------------------------------------------------


def _literal(value: Any) -> str:
    return repr(value)


def to_widget(spec: FieldSpec, value: Any) -> Any:
    """A config value (JSON form, as ``TrainConfig.to_flat()`` gives it) as the widget shows it."""
    widget = spec.widget
    if widget == "text":
        if value is None:
            return ""
        if isinstance(value, (list, tuple)):  # resolution (w, h)
            return ",".join(str(v) for v in value)
        return str(value)
    if widget in ("int", "float"):
        if not spec.optional:
            return value
        return "" if value is None else repr(value)
    if widget == "checkbox":
        return bool(value)
    if widget == "dropdown":
        return "" if value is None else str(value)
    if widget == "lines":
        return "\n".join(value or [])
    if widget == "kv":
        return "\n".join(f"{k}={_literal(v)}" for k, v in (value or {}).items())
    raise ValueError(f"unknown widget {widget!r} for {spec.path}")


def widget_values(cfg: TrainConfig) -> list[Any]:
    """Every widget's value for ``cfg``, in ``FIELDS`` order."""
    flat = cfg.to_flat()
    return [to_widget(spec, flat[spec.path]) for spec in FIELDS]


# --------------------------------------------------------------------------------------------
# widget value -> config value
# --------------------------------------------------------------------------------------------


def _parse_kv(path: str, text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, eq, raw = line.partition("=")
        name, raw = name.strip(), raw.strip()
        if not eq or not name:
            raise ConfigError(path, f"line {n} ({line!r}) must be name=value, e.g. weight_decay=0.01")
        if name in out:
            raise ConfigError(path, f"{name!r} is given twice (again on line {n})")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # a bare word: a string
        if isinstance(value, tuple):
            value = list(value)
        out[name] = value
    return out


def _from_text(spec: FieldSpec, raw: Any) -> Any:
    text = "" if raw is None else str(raw).strip()
    return None if spec.optional and not text else text


def _from_number(spec: FieldSpec, raw: Any) -> Any:
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        if spec.optional:
            return None
        raise ConfigError(spec.path, "is required: enter a number")
    try:
        number = float(raw)
    except (TypeError, ValueError):
        raise ConfigError(spec.path, f"must be a number, got {raw!r}") from None
    if spec.widget == "int":
        if not number.is_integer():
            raise ConfigError(spec.path, f"must be a whole number, got {raw}")
        return int(number)
    return number


def _from_dropdown(spec: FieldSpec, raw: Any) -> Any:
    choices = spec.choices or ()
    if raw in (None, "") and spec.optional:
        return None
    for choice in choices:
        if raw == choice or str(raw) == str(choice):
            return choice
    return raw  # errors() names the allowed choices


_FROM_WIDGET: dict[str, Callable[[FieldSpec, Any], Any]] = {
    "text": _from_text,
    "int": _from_number,
    "float": _from_number,
    "checkbox": lambda spec, raw: bool(raw),
    "dropdown": _from_dropdown,
    "lines": lambda spec, raw: [line.strip() for line in str(raw or "").splitlines() if line.strip()],
    "kv": lambda spec, raw: _parse_kv(spec.path, str(raw or "")),
}


def from_widget(spec: FieldSpec, raw: Any) -> Any:
    """What the widget holds as a config value (types only; limits are ``TrainConfig.errors()``'s).

    Raises ``ConfigError(spec.path, ...)`` for a value that cannot be read.
    """
    convert = _FROM_WIDGET.get(spec.widget)
    if convert is None:
        raise ValueError(f"unknown widget {spec.widget!r} for {spec.path}")
    return convert(spec, raw)


def build_config(values: Mapping[str, Any] | Sequence[Any]) -> tuple[TrainConfig | None, list[ConfigError]]:
    """The config the widgets describe, and every problem in it (display order).

    ``values``: widget values by dotted path, or a sequence in ``FIELDS`` order. A field whose
    widget value cannot be read is reported and left at its default, so the other checks still run.
    """
    if not isinstance(values, Mapping):
        values = dict(zip((spec.path for spec in FIELDS), values, strict=True))
    problems: list[ConfigError] = []
    flat: dict[str, Any] = {}
    for spec in FIELDS:
        if spec.path not in values:
            continue
        try:
            flat[spec.path] = from_widget(spec, values[spec.path])
        except ConfigError as exc:
            problems.append(exc)
    try:
        cfg = TrainConfig.from_flat(flat)
    except ConfigError as exc:  # a type the widget conversion let through
        return None, _ordered([*problems, exc])
    bad = {p.field for p in problems}
    problems += [e for e in cfg.errors() if e.field not in bad]
    return cfg, _ordered(problems)


_ORDER = {spec.path: i for i, spec in enumerate(FIELDS)}


def _ordered(errors: Iterable[ConfigError]) -> list[ConfigError]:
    return sorted(errors, key=lambda e: _ORDER.get(e.field, len(_ORDER)))


def preset_values(preset: TrainConfig, current: Mapping[str, Any]) -> list[Any]:
    """Widget values after choosing ``preset``: its settings, except personal ones it leaves unset."""
    defaults = TrainConfig().to_flat()
    flat = preset.to_flat()
    out = []
    for spec in FIELDS:
        if spec.path in PERSONAL and flat[spec.path] == defaults[spec.path] and spec.path in current:
            out.append(current[spec.path])
        else:
            out.append(to_widget(spec, flat[spec.path]))
    return out


# --------------------------------------------------------------------------------------------
# Send to txt2img
# --------------------------------------------------------------------------------------------


def lora_prompt(name: str, trigger_words: Iterable[str] = (), weight: float = 1.0) -> str:
    """``<lora:NAME:1.0>`` followed by the trigger words, as pasted into the txt2img prompt. No comma
    after the tag: the WebUI removes the tag before encoding, and a comma would be left in front."""
    words = ", ".join(w.strip() for w in trigger_words if w.strip())
    return f"<lora:{name}:{weight:.1f}> {words}".strip()
