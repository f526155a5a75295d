"""lora_trainer.config: one typed config, its validation, dict/TOML round-trips, kohya TOML, schema, presets."""

from __future__ import annotations

import ast
import copy
import dataclasses
import json
import logging
import typing

import pytest
import toml

from lora_trainer import config as C
from lora_trainer.config import (
    PRESETS,
    DatasetConfig,
    NetworkConfig,
    OptimConfig,
    TrainConfig,
    json_schema,
    kohya_toml,
    list_presets,
    load_preset,
    parse_toml,
)
from lora_trainer.config.validate import FIELD_CHECKS
from lora_trainer.errors import ConfigError
from lora_trainer.log import logger
from lora_trainer.webui.fields import FIELDS, WIDGETS

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def valid_config(**updates) -> TrainConfig:
    """Defaults plus a dataset folder (the one required setting), then dotted ``updates``."""
    flat = {"dataset.train_data_dir": "/data/train"}
    flat.update({k.replace("__", "."): v for k, v in updates.items()})
    return TrainConfig.from_flat(flat)


def leaf_paths_by_walking() -> list[str]:
    """Every leaf field, found independently of webui.fields.FIELDS."""
    paths = []
    for group in dataclasses.fields(TrainConfig):
        assert dataclasses.is_dataclass(group.default_factory)
        for f in dataclasses.fields(group.default_factory):
            assert not dataclasses.is_dataclass(f.type), "groups nest only one level"
            paths.append(f"{group.name}.{f.name}")
    return paths


def changed_config() -> TrainConfig:
    """A config in which every setting differs from its default (types right, limits mostly too)."""
    return TrainConfig.from_flat(
        {
            "dataset.train_data_dir": 'C:\\data\\my "lora"\\train',
            "dataset.trigger_words": ["mychar", "ünïcode wörd"],
            "dataset.caption_extension": ".caption",
            "dataset.dataset_repeats": 4,
            "dataset.resolution": "768,512",
            "dataset.enable_bucket": False,
            "dataset.min_bucket_reso": 320,
            "dataset.max_bucket_reso": 1280,
            "dataset.bucket_reso_steps": 32,
            "dataset.bucket_no_upscale": True,
            "dataset.flip_aug": True,
            "dataset.shuffle_caption": True,
            "dataset.keep_tokens": 2,
            "dataset.caption_dropout_rate": 0.05,
            "dataset.caption_tag_dropout_rate": 0.1,
            "dataset.caption_dropout_every_n_epochs": 3,
            "dataset.max_token_length": 150,
            "dataset.weighted_captions": True,
            "dataset.cache_latents": False,
            "dataset.cache_latents_to_disk": True,  # invalid without cache_latents: still round-trips
            "dataset.cache_text_encoder_outputs": True,  # invalid with shuffle_caption: still round-trips
            "network.network_module": "lycoris.kohya",
            "network.algo": "lokr",
            "network.dora_wd": True,  # invalid with lokr: still round-trips
            "network.factor": 8,
            "network.decompose_both": True,
            "network.full_matrix": True,
            "network.use_tucker": True,
            "network.network_dim": 64,
            "network.network_alpha": 32.5,
            "network.conv_dim": 8,
            "network.conv_alpha": 4.0,
            "network.network_dropout": 0.1,
            "network.rank_dropout": 0.2,
            "network.module_dropout": 0.3,
            "network.train_unet": False,
            "network.train_text_encoder": False,
            "network.loraplus_lr_ratio": 16.0,
            "network.loraplus_unet_lr_ratio": 8.0,
            "network.loraplus_text_encoder_lr_ratio": 4.0,
            "network.block_dims": ",".join(["4"] * 25),
            "network.block_alphas": ",".join(["2"] * 25),
            "network.conv_block_dims": ",".join(["0", "8"] * 12 + ["8"]),
            "network.conv_block_alphas": ",".join(["1.5"] * 25),
            "network.down_lr_weight": "sine+0.1",
            "network.mid_lr_weight": "0.5",
            "network.up_lr_weight": ",".join(["1", "0.5"] * 6),
            "network.block_lr_zero_threshold": 0.05,
            "optim.optimizer_type": "Prodigy",
            "optim.optimizer_args": {"weight_decay": 0.01, "betas": [0.9, 0.99], "decouple": True, "mode": "x"},
            "optim.learning_rate": 1.0,
            "optim.unet_lr": 0.9,
            "optim.text_encoder_lr": 0.5,
            "optim.lr_scheduler": "cosine_with_restarts",
            "optim.lr_warmup_steps": 50,
            "optim.lr_scheduler_num_cycles": 3,
            "optim.lr_scheduler_power": 2.0,
            "optim.max_grad_norm": 0.0,
            "training.max_train_epochs": 7,
            "training.max_train_steps": 1234,
            "training.train_batch_size": 4,
            "training.gradient_accumulation_steps": 2,
            "training.gradient_checkpointing": True,
            "training.mixed_precision": "bf16",
            "training.seed": 1234567,
            "training.clip_skip": 2,
            "training.noise_offset": 0.0357,
            "training.min_snr_gamma": 5.0,
            "save.output_name": "my char v1.2",
            "save.output_dir": "/out/loras",
            "save.overwrite": True,
            "save.save_precision": "bf16",
            "save.save_every_n_epochs": 2,
            "save.save_every_n_steps": 500,
            "save.save_state": True,
            "save.training_comment": 'line one\nline "two"\ttab \\ backslash',
            "save.metadata_title": "My Char",
            "save.metadata_author": "me",
            "save.metadata_description": "a test",
            "save.metadata_tags": "character, test",
            "sample.sample_every_n_steps": 100,
            "sample.sample_every_n_epochs": 1,
            "sample.sample_prompts": ["mychar, smiling --n lowres", "mychar\nstanding"],
            "sample.sample_sampler": "DPM++ 2M",
            "sample.sample_steps": 28,
            "sample.sample_cfg": 6.5,
            "sample.sample_seed": 7,
            "sample.sample_width": 512,
            "sample.sample_height": 768,
            "validation.validation_split": 0.1,
            "validation.validation_count": 3,  # invalid with validation_split: still round-trips
            "validation.validation_data_dir": "/data/val",
            "validation.validation_seed": 99,
            "validation.validate_every_n_steps": 50,
            "validation.validate_every_n_epochs": 2,
            "validation.max_validation_steps": 8,
        }
    )


@pytest.fixture(params=["tomllib", "toml"])
def toml_reader(request, monkeypatch):
    """Read TOML with tomllib (Python 3.11+) and with the toml package (Python 3.10, and kohya's reader)."""
    if request.param == "toml":
        monkeypatch.setattr(kohya_toml, "_tomllib", None)
    return request.param


@pytest.fixture
def log_records():
    """Records of the package logger (it does not propagate, so caplog cannot see them)."""
    records: list[logging.LogRecord] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = _Keep(level=logging.DEBUG)
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def kohya_read_config(text: str) -> dict:
    """kohya-ss/sd-scripts train_util.read_config_from_file (48d368f), minus argparse: toml + flatten one level."""
    config_dict = toml.loads(text)
    ignore_nesting_dict = {}
    for section_name, section_dict in config_dict.items():
        if not isinstance(section_dict, dict):
            ignore_nesting_dict[section_name] = section_dict
            continue
        for key, value in section_dict.items():
            ignore_nesting_dict[key] = value
    return ignore_nesting_dict


# config_file.toml exactly as Linaqruf's kohya-LoRA-dreambooth.ipynb (cell 5.4) writes it with its defaults
# (toml.dumps of the notebook's dict; None and "" values are dropped by toml.dumps).
NOTEBOOK_CONFIG_FILE = """\
[model_arguments]
v2 = false
v_parameterization = false
pretrained_model_name_or_path = "/content/pretrained_model/AnyLoRA.safetensors"

[additional_network_arguments]
no_metadata = false
unet_lr = 0.0001
text_encoder_lr = 5e-5
network_module = "networks.lora"
network_dim = 32
network_alpha = 16
network_train_unet_only = false
network_train_text_encoder_only = false

[optimizer_arguments]
optimizer_type = "AdamW8bit"
learning_rate = 0.0001
max_grad_norm = 1.0
lr_scheduler = "constant"
lr_warmup_steps = 0

[dataset_arguments]
cache_latents = true
debug_dataset = false
vae_batch_size = 4

[training_arguments]
output_dir = "/content/LoRA/output"
output_name = "last"
save_precision = "fp16"
save_every_n_epochs = 1
train_batch_size = 6
max_token_length = 225
mem_eff_attn = false
xformers = true
max_train_epochs = 10
max_data_loader_n_workers = 8
persistent_data_loader_workers = true
gradient_checkpointing = false
gradient_accumulation_steps = 1
mixed_precision = "fp16"
clip_skip = 2
logging_dir = "/content/LoRA/logs"
log_prefix = "last"
lowram = true

[sample_prompt_arguments]
sample_every_n_epochs = 1
sample_sampler = "ddim"

[dreambooth_arguments]
prior_loss_weight = 1.0

[saving_arguments]
save_model_as = "safetensors"
"""


# --------------------------------------------------------------------------------------------
# the dataclasses
# --------------------------------------------------------------------------------------------


def test_every_field_has_help_and_label():
    for group in dataclasses.fields(TrainConfig):
        assert group.metadata["help"].strip(), group.name
        assert group.metadata["label"].strip(), group.name
        for f in dataclasses.fields(group.default_factory):
            assert isinstance(f.metadata.get("help"), str), f.name
            assert len(f.metadata["help"]) > 10, f.name
            assert isinstance(f.metadata.get("label"), str), f.name
            assert f.metadata["label"].strip(), f.name


def test_optional_fields_default_to_none():
    # TOML has no null: an unset setting is written as an absent key, which must read back as the default.
    for group in dataclasses.fields(TrainConfig):
        cls = group.default_factory
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if type(None) in typing.get_args(hints[f.name]):
                assert f.default is None, f"{group.name}.{f.name}"


def test_defaults_are_the_documented_ones():
    cfg = TrainConfig()
    assert (cfg.network.network_dim, cfg.network.network_alpha, cfg.network.conv_dim) == (16, 8.0, 0)
    assert (cfg.optim.optimizer_type, cfg.optim.learning_rate, cfg.optim.lr_scheduler) == ("AdamW", 1e-4, "cosine")
    assert cfg.optim.unet_lr is None
    assert cfg.optim.text_encoder_lr is None
    assert cfg.dataset.caption_extension == ".txt"
    assert cfg.dataset.bucket_reso_steps == 64
    assert cfg.training.max_train_steps is None
    assert cfg.training.clip_skip is None
    assert cfg.save.output_dir is None
    assert cfg.save.overwrite is False
    assert valid_config().errors() == []


def test_replace_and_equality():
    cfg = valid_config()
    other = dataclasses.replace(cfg, network=dataclasses.replace(cfg.network, network_dim=32))
    assert other.network.network_dim == 32
    assert cfg.network.network_dim == 16
    assert other != cfg
    assert dataclasses.replace(other, network=dataclasses.replace(other.network, network_dim=16)) == cfg
    assert copy.deepcopy(cfg) == cfg


def test_construction_normalises_values():
    assert DatasetConfig(resolution="512,512").resolution == 512
    assert DatasetConfig(resolution=" 768 , 512 ").resolution == (768, 512)
    assert DatasetConfig(resolution=[512, 768]).resolution_wh == (512, 768)
    assert DatasetConfig(resolution=640).resolution_wh == (640, 640)
    alpha = NetworkConfig(network_alpha=8).network_alpha
    assert alpha == 8.0
    assert isinstance(alpha, float)
    assert OptimConfig(optimizer_args={"betas": (0.9, 0.99)}).optimizer_args == {"betas": [0.9, 0.99]}
    assert NetworkConfig(network_dim="16").network_dim == "16"  # wrong type kept as given, for errors() to report


def test_convenience_properties():
    optim = OptimConfig(learning_rate=2e-4, text_encoder_lr=5e-5)
    assert optim.resolved_unet_lr == 2e-4
    assert optim.resolved_text_encoder_lr == 5e-5
    assert NetworkConfig().algorithm == "lora"


# --------------------------------------------------------------------------------------------
# dict / flat / JSON
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [TrainConfig, valid_config, changed_config], ids=["defaults", "valid", "changed"])
def test_dict_round_trip_through_json(make):
    cfg = make()
    data = cfg.to_dict()
    assert set(data) == set(C.GROUPS)
    again = TrainConfig.from_dict(json.loads(json.dumps(data, allow_nan=False)))
    assert again == cfg
    assert TrainConfig.from_flat(json.loads(json.dumps(cfg.to_flat()))) == cfg


def test_changed_config_changes_every_field():
    changed, default = changed_config().to_flat(), TrainConfig().to_flat()
    same = [path for path in changed if changed[path] == default[path] and path != "network.network_module"]
    assert same == []


def test_from_dict_partial_takes_defaults():
    cfg = TrainConfig.from_dict({"network": {"network_dim": 32}})
    assert cfg == dataclasses.replace(TrainConfig(), network=NetworkConfig(network_dim=32))


def test_from_dict_accepts_ints_for_floats_and_integral_floats_for_ints():
    cfg = TrainConfig.from_dict({"network": {"network_alpha": 4, "network_dim": 16.0}, "optim": {"learning_rate": 1}})
    assert cfg.network.network_alpha == 4.0
    assert isinstance(cfg.network.network_alpha, float)
    assert cfg.network.network_dim == 16
    assert isinstance(cfg.network.network_dim, int)
    assert isinstance(cfg.optim.learning_rate, float)


@pytest.mark.parametrize(
    ("data", "field", "words"),
    [
        ({"netwrok": {}}, "netwrok", "did you mean 'network'"),
        ({"network": {"network_dimm": 8}}, "network.network_dimm", "did you mean 'network.network_dim'"),
        ({"network": 5}, "network", "must be an object"),
        ({"network": {"network_dim": "16"}}, "network.network_dim", "must be an integer"),
        ({"network": {"network_dim": 16.5}}, "network.network_dim", "must be an integer"),
        ({"network": {"network_dim": True}}, "network.network_dim", "must be an integer"),
        ({"network": {"train_unet": 1}}, "network.train_unet", "must be true or false"),
        ({"optim": {"learning_rate": "1e-4"}}, "optim.learning_rate", "must be a number"),
        ({"optim": {"learning_rate": None}}, "optim.learning_rate", "must be a number, got NoneType"),
        ({"optim": {"optimizer_args": {"betas": {"a": 1}}}}, "optim.optimizer_args", "values are true/false"),
        ({"dataset": {"trigger_words": "mychar"}}, "dataset.trigger_words", "must be a list of strings"),
        ({"dataset": {"resolution": "512x512"}}, "dataset.resolution", "'width,height'"),
        ({"dataset": {"resolution": [512, 512, 3]}}, "dataset.resolution", "'width,height'"),
        ({"training": {"seed": "random"}}, "training.seed", "or null"),
    ],
)
def test_from_dict_errors_name_the_field(data, field, words):
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict(data)
    assert info.value.field == field
    assert words in info.value.message
    assert str(info.value).startswith(f"{field}: ")


def test_from_flat_unknown_key():
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_flat({"optim.learning_rte": 1e-4})
    assert info.value.field == "optim.learning_rte"
    assert "optim.learning_rate" in info.value.message


def test_to_dict_refuses_a_wrong_type_set_after_construction():
    cfg = TrainConfig()
    cfg.network.network_dim = "sixteen"
    with pytest.raises(ConfigError) as info:
        cfg.to_dict()
    assert info.value.field == "network.network_dim"


# --------------------------------------------------------------------------------------------
# TOML: our own round trip, and what kohya reads from it
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [TrainConfig, valid_config, changed_config], ids=["defaults", "valid", "changed"])
def test_toml_round_trip(make, toml_reader):
    cfg = make()
    text = cfg.to_toml()
    assert TrainConfig.from_toml(text) == cfg
    assert C.from_toml(text) == cfg


def test_toml_round_trip_steps_unset_and_description(toml_reader):
    cfg = valid_config(training__max_train_steps=None, training__max_train_epochs=3)
    parsed = parse_toml(cfg.to_toml(description='my "preset"'))
    assert parsed.config == cfg
    assert parsed.description == 'my "preset"'
    assert parsed.ignored == {}


def test_toml_uses_kohya_names_kohya_can_read():
    cfg = changed_config()
    flat = kohya_read_config(cfg.to_toml())  # what kohya's --config_file loader would see
    assert flat["network_dim"] == 64
    assert flat["network_alpha"] == 32.5
    assert flat["network_args"] == [
        "algo=lokr",
        "dora_wd=True",
        "factor=8",
        "decompose_both=True",
        "full_matrix=True",
        "use_tucker=True",
        "conv_dim=8",
        "conv_alpha=4.0",
        "rank_dropout=0.2",
        "module_dropout=0.3",
        "loraplus_lr_ratio=16.0",
        "loraplus_unet_lr_ratio=8.0",
        "loraplus_text_encoder_lr_ratio=4.0",
        f"block_dims={','.join(['4'] * 25)}",
        f"block_alphas={','.join(['2'] * 25)}",
        f"conv_block_dims={','.join(['0', '8'] * 12 + ['8'])}",
        f"conv_block_alphas={','.join(['1.5'] * 25)}",
        "down_lr_weight=sine+0.1",
        "mid_lr_weight=0.5",
        f"up_lr_weight={','.join(['1', '0.5'] * 6)}",
        "block_lr_zero_threshold=0.05",
    ]
    assert flat["network_train_unet_only"] is True
    assert flat["network_train_text_encoder_only"] is True
    assert flat["resolution"] == "768,512"
    assert tuple(int(r) for r in flat["resolution"].split(",")) == (768, 512)  # kohya's parsing: (width, height)
    assert flat["optimizer_type"] == "Prodigy"
    assert flat["mixed_precision"] == "bf16"
    # kohya: key, value = arg.split("="); value = ast.literal_eval(value)
    kwargs = {a.split("=")[0]: ast.literal_eval(a.split("=")[1]) for a in flat["optimizer_args"]}
    assert kwargs == {"weight_decay": 0.01, "betas": (0.9, 0.99), "decouple": True, "mode": "x"}
    # steps set: epochs must not reach kohya, where they would override the steps
    assert flat["max_train_steps"] == 1234
    assert "max_train_epochs" not in flat
    # our extras do not land on kohya argument names
    kohya_names = set(C.KOHYA_UNMAPPED) | {f.kohya for f in FIELDS if f.kohya} | {"network_args"}
    assert set(flat) - kohya_names == {"format", "dataset", "save", "sample", "training", "validation"}
    assert cfg.to_kohya_args()["network_args"] == flat["network_args"]


def test_toml_leaves_defaults_out_of_network_args():
    flat = kohya_read_config(valid_config().to_toml())
    assert "network_args" not in flat  # conv off and no dropouts: nothing for networks.lora
    assert flat["max_train_epochs"] == 10
    assert "max_train_steps" not in flat
    assert flat["network_train_unet_only"] is False
    assert flat["network_train_text_encoder_only"] is False


def test_toml_unicode_and_control_characters(toml_reader):
    cfg = valid_config(sample__sample_prompts=["a\x7fb\x01c", "日本語, «quotes»", "back\\slash"])
    assert TrainConfig.from_toml(cfg.to_toml()) == cfg


# --------------------------------------------------------------------------------------------
# TOML: reading kohya config files
# --------------------------------------------------------------------------------------------


def test_reads_the_kohya_trainer_notebook_config_file(toml_reader, log_records):
    parsed = parse_toml(NOTEBOOK_CONFIG_FILE)
    cfg = parsed.config
    assert (cfg.network.network_dim, cfg.network.network_alpha, cfg.network.conv_dim) == (32, 16.0, 0)
    assert cfg.network.train_unet
    assert cfg.network.train_text_encoder
    assert (cfg.optim.optimizer_type, cfg.optim.learning_rate, cfg.optim.lr_scheduler) == (
        "AdamW8bit",
        1e-4,
        "constant",
    )
    assert (cfg.optim.unet_lr, cfg.optim.text_encoder_lr) == (1e-4, 5e-5)
    assert (cfg.training.train_batch_size, cfg.training.max_train_epochs, cfg.training.max_train_steps) == (6, 10, None)
    assert (cfg.training.mixed_precision, cfg.training.clip_skip, cfg.training.seed) == ("fp16", 2, None)
    assert (cfg.save.output_name, cfg.save.output_dir, cfg.save.save_precision) == (
        "last",
        "/content/LoRA/output",
        "fp16",
    )
    assert cfg.save.save_every_n_epochs == 1
    assert cfg.dataset.max_token_length == 225
    assert cfg.dataset.cache_latents
    # not in config_file.toml (the notebook puts them in dataset_config.toml): kohya's defaults
    assert cfg.dataset.caption_extension == ".caption"
    assert cfg.dataset.enable_bucket is False
    assert parsed.ignored["pretrained_model_name_or_path"] == "/content/pretrained_model/AnyLoRA.safetensors"
    assert parsed.ignored["sample_sampler"] == "ddim"
    assert parsed.ignored["save_model_as"] == "safetensors"
    assert not [r for r in log_records if r.levelno >= logging.WARNING]  # only host/logging settings ignored
    # what is left to do is named: the dataset folder, and prompts for the notebook's per-epoch previews
    assert [e.field for e in cfg.errors()] == ["dataset.train_data_dir", "sample.sample_prompts"]


def test_kohya_trainer_preset_matches_the_notebook():
    notebook = parse_toml(NOTEBOOK_CONFIG_FILE).config.to_flat()
    preset = PRESETS["kohya-trainer"].config.to_flat()
    # these come from the notebook's dataset_config.toml and folder layout (its "10_<class>" folder is the
    # flat folder's 10 repeats), its demo prompt (kohya's sample_prompts is a file), or are output
    # settings the preset leaves out
    elsewhere = {
        "dataset.caption_extension",
        "dataset.enable_bucket",
        "dataset.shuffle_caption",
        "dataset.dataset_repeats",
        "save.output_name",
        "save.output_dir",
        "sample.sample_prompts",
    }
    differ = {path for path in notebook if notebook[path] != preset[path]}
    assert differ == elsewhere
    assert (
        preset["dataset.caption_extension"],
        preset["dataset.enable_bucket"],
        preset["dataset.shuffle_caption"],
    ) == (
        ".txt",
        True,
        True,
    )
    assert preset["sample.sample_every_n_epochs"] == notebook["sample.sample_every_n_epochs"] == 1
    assert len(preset["sample.sample_prompts"]) == 1
    assert preset["dataset.dataset_repeats"] == 10


def test_kohya_style_flat_toml_with_network_args(toml_reader):
    text = """
pretrained_model_name_or_path = "model.safetensors"
train_data_dir = "/data/img"
resolution = "512,768"
network_module = "networks.lora"
network_dim = 16
network_alpha = 8
network_args = ["conv_dim=8", "conv_alpha=4", "rank_dropout=0.1", "module_dropout=0.05"]
network_train_unet_only = true
optimizer_type = "adamw8bit"
optimizer_args = ["weight_decay=0.1", "betas=(0.9,0.99)", "foreach=False"]
learning_rate = 1e-4
lr_scheduler = "cosine_with_restarts"
lr_scheduler_num_cycles = 3
mixed_precision = "fp16"
max_train_steps = 2000
caption_extention = ".txt"
"""
    cfg = TrainConfig.from_toml(text)
    assert cfg.dataset.train_data_dir == "/data/img"
    assert cfg.dataset.resolution == (512, 768)
    assert cfg.dataset.caption_extension == ".txt"  # kohya's old misspelling, which kohya still reads
    net = cfg.network
    assert (net.network_dim, net.network_alpha, net.conv_dim, net.conv_alpha) == (16, 8.0, 8, 4.0)
    assert (net.rank_dropout, net.module_dropout) == (0.1, 0.05)
    assert net.train_unet is True
    assert net.train_text_encoder is False
    assert cfg.optim.optimizer_type == "AdamW8bit"  # kohya's names are case-insensitive
    assert cfg.optim.optimizer_args == {"weight_decay": 0.1, "betas": [0.9, 0.99], "foreach": False}
    assert (cfg.optim.lr_scheduler, cfg.optim.lr_scheduler_num_cycles) == ("cosine_with_restarts", 3)
    assert cfg.training.max_train_steps == 2000
    assert cfg.errors() == []


def test_kohya_file_absent_settings_take_kohya_defaults():
    cfg = TrainConfig.from_toml('network_dim = 8\ntrain_data_dir = "/d"\n')
    assert (cfg.network.network_dim, cfg.network.network_alpha) == (8, 1.0)
    assert (cfg.optim.learning_rate, cfg.optim.lr_scheduler) == (2e-6, "constant")
    assert cfg.training.max_train_steps == 1600
    assert cfg.training.mixed_precision == "no"
    assert cfg.training.clip_skip == 1
    assert cfg.dataset.max_token_length == 75
    assert (cfg.dataset.enable_bucket, cfg.dataset.caption_extension) == (False, ".caption")
    assert (cfg.save.save_precision, cfg.save.output_name) == ("float", "last")


def test_our_file_absent_settings_take_our_defaults():
    cfg = TrainConfig.from_toml("network_dim = 8\n[lora_train]\nformat = 1\n")
    assert cfg == dataclasses.replace(TrainConfig(), network=NetworkConfig(network_dim=8))


def test_kohya_epochs_override_steps(log_records):
    cfg = TrainConfig.from_toml("max_train_steps = 500\nmax_train_epochs = 4\n")
    assert (cfg.training.max_train_epochs, cfg.training.max_train_steps) == (4, None)
    assert any("overrides max_train_steps" in r.getMessage() for r in log_records)


def test_kohya_legacy_and_list_forms():
    cfg = TrainConfig.from_toml("use_8bit_adam = true\ntext_encoder_lr = [5e-5, 5e-5]\n")
    assert cfg.optim.optimizer_type == "AdamW8bit"
    assert cfg.optim.text_encoder_lr == 5e-5
    assert TrainConfig.from_toml('optimizer_type = ""\n').optim.optimizer_type == "AdamW"  # kohya: "" = AdamW


def test_unsupported_kohya_settings_are_reported(log_records):
    parsed = parse_toml('color_aug = true\nxformers = true\nnetwork_args = ["exclude_patterns=x"]\n')
    assert parsed.ignored == {"color_aug": True, "xformers": True, "network_args.exclude_patterns": "x"}
    warnings = [r.getMessage() for r in log_records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "color_aug=True" in warnings[0]
    assert "xformers" not in warnings[0]


@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        ("network_dimm = 8\n", "network_dimm", "did you mean 'network_dim'"),
        ("[training_arguments]\nmax_train_epoch = 8\n", "training_arguments.max_train_epoch", "max_train_epochs"),
        ('network_args = ["conv_dims=8"]\n', "network_args.conv_dims", "did you mean 'conv_dim'"),
        ('network_args = ["conv_dim"]\n', "network.network_args", "'key=value'"),
        ('network_args = "conv_dim=8"\n', "network.network_args", "list of 'key=value'"),
        ('optimizer_args = ["weight_decay"]\n', "optim.optimizer_args", "'key=value'"),
        ('network_args = ["conv_dim=eight"]\n', "network.conv_dim", "must be an integer"),
        ('network_dim = "16"\n', "network.network_dim", "must be an integer"),
        ("network_train_unet_only = 1\n", "network.train_text_encoder", "true or false"),
        ("resolution = 512.5\n", "dataset.resolution", "'width,height'"),
        ("text_encoder_lr = [1e-4, 5e-5]\n", "optim.text_encoder_lr", "one learning rate"),
        ("network_dim = 8\nnetwork_dim = 9\n", "toml", "not valid TOML"),
        ("[general]\nenable_bucket = true\n[[datasets]]\nresolution = 512\n", "datasets", "--dataset_config"),
        ("network_dim = 8\n[lora_train.network]\nnetwork_dim = 9\n", "network.network_dim", "set twice"),
        ("[lora_train.network]\nnetwork_dimm = 9\n", "network.network_dimm", "network.network_dim"),
        ("[lora_train]\nformat = 99\n", "lora_train.format", "newer"),
        ("[lora_train]\nformat = 'one'\n", "lora_train.format", "format number"),
        ("[lora_train]\nformatt = 1\n", "lora_train.formatt", "did you mean 'format'"),
        ("[lora_train.save]\noverwrite = 'yes'\n", "save.overwrite", "true or false"),
    ],
)
def test_toml_errors_name_the_setting(text, field, words):
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_toml(text)
    assert info.value.field == field
    assert words in info.value.message


def test_not_strict_ignores_unknown_settings():
    parsed = parse_toml('network_dimm = 8\nnetwork_args = ["foo=1"]\n', strict=False)
    assert parsed.ignored == {"network_dimm": 8, "network_args.foo": 1}
    assert parsed.config.network.network_dim == 4  # kohya's default, as the file sets no network_dim


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------

# (dotted updates on a valid config, field named, words in the message)
INVALID = [
    ({"dataset.dataset_repeats": 0}, "dataset.dataset_repeats", "from 1 to 10000"),
    ({"network.network_dim": 0}, "network.network_dim", "must be an integer from 1 to 1024, got 0"),
    ({"network.network_dim": 2048}, "network.network_dim", "from 1 to 1024"),
    ({"network.network_alpha": 0}, "network.network_alpha", "greater than 0"),
    ({"network.network_alpha": 5000.0}, "network.network_alpha", "at most 1024"),
    ({"network.conv_dim": -1}, "network.conv_dim", "from 0 to 1024"),
    ({"network.conv_alpha": 0.0}, "network.conv_alpha", "greater than 0"),
    ({"network.network_dropout": 1.0}, "network.network_dropout", "less than 1"),
    ({"network.rank_dropout": -0.1}, "network.rank_dropout", "at least 0"),
    ({"network.module_dropout": 1.5}, "network.module_dropout", "less than 1"),
    ({"network.loraplus_lr_ratio": 0}, "network.loraplus_lr_ratio", "greater than 0"),
    ({"network.loraplus_unet_lr_ratio": -1}, "network.loraplus_unet_lr_ratio", "greater than 0"),
    ({"network.loraplus_text_encoder_lr_ratio": 2000}, "network.loraplus_text_encoder_lr_ratio", "at most 1024"),
    ({"network.block_lr_zero_threshold": -0.1}, "network.block_lr_zero_threshold", "at least 0"),
    ({"network.block_dims": "4,4"}, "network.block_dims", "must have 25 or 23 values"),
    ({"network.block_alphas": "1,x"}, "network.block_alphas", "comma-separated numbers"),
    ({"network.conv_block_dims": "4"}, "network.conv_block_dims", "got 1"),
    ({"network.conv_block_alphas": "a"}, "network.conv_block_alphas", "comma-separated numbers"),
    ({"network.down_lr_weight": "wave"}, "network.down_lr_weight", "or a curve: cosine"),
    ({"network.mid_lr_weight": "sine"}, "network.mid_lr_weight", "comma-separated numbers"),
    ({"network.up_lr_weight": "1,,2"}, "network.up_lr_weight", "comma-separated numbers"),
    ({"network.network_module": "networks.lokr"}, "network.network_module", "'networks.lora', 'lycoris.kohya'"),
    ({"network.algo": "ia3"}, "network.algo", "'lora', 'locon', 'loha', 'lokr'"),
    ({"network.factor": -2}, "network.factor", "from -1 to 1024"),
    ({"network.train_unet": False, "network.train_text_encoder": False}, "network.train_unet", "nothing would be"),
    ({"optim.optimizer_type": "Adam"}, "optim.optimizer_type", "'AdamW', 'AdamW8bit', 'Lion', 'Prodigy', 'Adafactor'"),
    ({"optim.optimizer_type": "adamw8bit"}, "optim.optimizer_type", "did you mean 'AdamW8bit'"),
    ({"optim.optimizer_args": {"lr": 0.1}}, "optim.optimizer_args", "learning-rate settings"),
    ({"optim.optimizer_args": {"weight decay": 0.1}}, "optim.optimizer_args", "identifiers"),
    ({"optim.optimizer_args": {"eps": float("nan")}}, "optim.optimizer_args", "finite"),
    ({"optim.learning_rate": 0.0}, "optim.learning_rate", "greater than 0"),
    ({"optim.learning_rate": 1.0}, "optim.learning_rate", "less than 1"),
    ({"optim.learning_rate": float("inf")}, "optim.learning_rate", "got inf"),
    ({"optim.optimizer_type": "Prodigy", "optim.learning_rate": 20.0}, "optim.learning_rate", "at most 10"),
    ({"optim.unet_lr": 0.0}, "optim.unet_lr", "greater than 0"),
    ({"optim.text_encoder_lr": 2.0}, "optim.text_encoder_lr", "less than 1 (or unset)"),
    ({"optim.lr_scheduler": "adafactor"}, "optim.lr_scheduler", "'cosine_with_restarts'"),
    ({"optim.lr_warmup_steps": -1}, "optim.lr_warmup_steps", "from 0 to 100000"),
    ({"optim.lr_scheduler": "constant", "optim.lr_warmup_steps": 10}, "optim.lr_warmup_steps", "constant_with_warmup"),
    ({"training.max_train_steps": 100, "optim.lr_warmup_steps": 100}, "optim.lr_warmup_steps", "less than training"),
    ({"optim.lr_scheduler_num_cycles": 0}, "optim.lr_scheduler_num_cycles", "from 1 to 1000"),
    ({"optim.lr_scheduler_power": 0.0}, "optim.lr_scheduler_power", "greater than 0"),
    ({"optim.max_grad_norm": -1.0}, "optim.max_grad_norm", "from 0 to 100"),
    ({"training.max_train_epochs": 0}, "training.max_train_epochs", "from 1 to 10000"),
    ({"training.max_train_epochs": 10001}, "training.max_train_epochs", "from 1 to 10000"),
    ({"training.max_train_steps": 0}, "training.max_train_steps", "(or unset), got 0"),
    ({"training.max_train_steps": 2_000_000}, "training.max_train_steps", "from 1 to 1000000"),
    ({"training.train_batch_size": 0}, "training.train_batch_size", "from 1 to 64"),
    ({"training.train_batch_size": 65}, "training.train_batch_size", "from 1 to 64"),
    ({"training.gradient_accumulation_steps": 0}, "training.gradient_accumulation_steps", "from 1 to 256"),
    ({"training.mixed_precision": "fp32"}, "training.mixed_precision", "'no', 'fp16', 'bf16'"),
    ({"training.seed": -1}, "training.seed", "from 0 to 4294967295 (or unset)"),
    ({"training.seed": 2**32}, "training.seed", "from 0 to 4294967295"),
    ({"training.clip_skip": 0}, "training.clip_skip", "from 1 to 12"),
    ({"training.noise_offset": 2.0}, "training.noise_offset", "from 0 to 1"),
    ({"training.min_snr_gamma": -1.0}, "training.min_snr_gamma", "from 0 to 100"),
    ({"training.noise_offset": float("nan")}, "training.noise_offset", "got nan"),
    ({"dataset.train_data_dir": "  "}, "dataset.train_data_dir", "is required"),
    ({"dataset.resolution": 500}, "dataset.resolution", "multiple of 64 from 64 to 4096"),
    ({"dataset.resolution": 32}, "dataset.resolution", "got 32"),
    ({"dataset.resolution": "512,8192"}, "dataset.resolution", "got '512,8192'"),
    ({"dataset.min_bucket_reso": 640}, "dataset.min_bucket_reso", "smaller side (512)"),
    ({"dataset.max_bucket_reso": 448}, "dataset.max_bucket_reso", "larger side (512)"),
    ({"dataset.min_bucket_reso": 224}, "dataset.min_bucket_reso", "multiple of dataset.bucket_reso_steps (64)"),
    ({"dataset.min_bucket_reso": 32}, "dataset.min_bucket_reso", "from 64 to 4096"),
    ({"dataset.max_bucket_reso": 9000}, "dataset.max_bucket_reso", "from 64 to 8192"),
    ({"dataset.bucket_reso_steps": 12}, "dataset.bucket_reso_steps", "multiple of 8"),
    ({"dataset.bucket_reso_steps": 1024}, "dataset.bucket_reso_steps", "from 8 to 512"),
    ({"dataset.max_token_length": 100}, "dataset.max_token_length", "75, 150, 225"),
    ({"dataset.keep_tokens": -1}, "dataset.keep_tokens", "from 0 to 100"),
    ({"dataset.caption_dropout_rate": 1.0}, "dataset.caption_dropout_rate", "less than 1"),
    ({"dataset.caption_tag_dropout_rate": -0.5}, "dataset.caption_tag_dropout_rate", "at least 0"),
    ({"dataset.caption_dropout_every_n_epochs": -1}, "dataset.caption_dropout_every_n_epochs", "from 0 to 10000"),
    ({"dataset.caption_extension": "txt"}, "dataset.caption_extension", "like '.txt'"),
    ({"dataset.caption_extension": "./x"}, "dataset.caption_extension", "like '.txt'"),
    ({"dataset.cache_latents": False, "dataset.cache_latents_to_disk": True}, "dataset.cache_latents_to_disk", "needs"),
    *(
        ({"dataset.cache_text_encoder_outputs": True, path: value}, "dataset.cache_text_encoder_outputs", path)
        for path, value in (
            ("dataset.shuffle_caption", True),
            ("dataset.caption_dropout_rate", 0.1),
            ("dataset.caption_tag_dropout_rate", 0.1),
            ("dataset.caption_dropout_every_n_epochs", 2),
            ("network.train_text_encoder", True),
        )
    ),
    ({"dataset.trigger_words": ["mychar, blue"]}, "dataset.trigger_words", "contains a comma"),
    ({"dataset.trigger_words": ["ok", " "]}, "dataset.trigger_words", "entry 2 is empty"),
    ({"save.output_name": ""}, "save.output_name", "must not be empty"),
    ({"save.output_name": "../evil"}, "save.output_name", "'/'"),
    ({"save.output_name": "a\\b"}, "save.output_name", "save.output_dir"),
    ({"save.output_name": "a:b"}, "save.output_name", "':'"),
    ({"save.output_name": "tab\tname"}, "save.output_name", "without"),
    ({"save.output_name": ".."}, "save.output_name", "plain file name"),
    ({"save.output_name": "..hidden"}, "save.output_name", "plain file name"),
    ({"save.output_name": "CON"}, "save.output_name", "reserved"),
    ({"save.output_name": "lpt1.v2"}, "save.output_name", "reserved"),
    ({"save.output_name": "mine.safetensors"}, "save.output_name", "leave out the extension: 'mine'"),
    ({"save.output_name": " lead"}, "save.output_name", "start or end with a space"),
    ({"save.output_name": "trail."}, "save.output_name", "end with a dot"),
    ({"save.output_name": "x" * 201}, "save.output_name", "at most 200"),
    ({"save.output_dir": ""}, "save.output_dir", "folder path"),
    ({"save.save_precision": "fp32"}, "save.save_precision", "'fp16', 'bf16', 'float'"),
    ({"save.save_every_n_epochs": 0}, "save.save_every_n_epochs", "from 1 to 10000"),
    ({"save.save_every_n_steps": 0}, "save.save_every_n_steps", "from 1 to 1000000"),
    ({"sample.sample_every_n_steps": 0}, "sample.sample_every_n_steps", "from 1 to 1000000"),
    ({"sample.sample_every_n_epochs": 0, "sample.sample_prompts": ["p"]}, "sample.sample_every_n_epochs", "from 1"),
    ({"sample.sample_every_n_steps": 100}, "sample.sample_prompts", "add a prompt"),
    ({"sample.sample_prompts": ["a", ""]}, "sample.sample_prompts", "entry 2 is empty"),
    ({"sample.sample_sampler": " "}, "sample.sample_sampler", "WebUI sampler"),
    ({"sample.sample_steps": 0}, "sample.sample_steps", "from 1 to 150"),
    ({"sample.sample_cfg": 0.5}, "sample.sample_cfg", "from 1 to 30"),
    ({"sample.sample_seed": -1}, "sample.sample_seed", "from 0 to 4294967295"),
    ({"sample.sample_width": 500}, "sample.sample_width", "multiple of 8"),
    ({"sample.sample_height": 32}, "sample.sample_height", "from 64 to 4096"),
    ({"validation.validation_split": 1.0}, "validation.validation_split", "less than 1"),
    ({"validation.validation_count": 0}, "validation.validation_count", "from 1 to 100000"),
    ({"validation.validation_seed": -1}, "validation.validation_seed", "from 0 to 4294967295"),
    ({"validation.validate_every_n_steps": 0}, "validation.validate_every_n_steps", "from 1 to 1000000"),
    ({"validation.validate_every_n_epochs": 0}, "validation.validate_every_n_epochs", "from 1 to 1000000"),
    ({"validation.max_validation_steps": 0}, "validation.max_validation_steps", "from 1 to 1000000"),
    (
        {"validation.validation_split": 0.2, "validation.validation_count": 2},
        "validation.validation_count",
        "not both",
    ),
    (
        {"validation.validation_count": 2, "validation.validation_data_dir": "v"},
        "validation.validation_data_dir",
        "replaces",
    ),
]


@pytest.mark.parametrize(("updates", "field", "words"), INVALID, ids=[f"{c[1]}-{i}" for i, c in enumerate(INVALID)])
def test_validation_names_the_field(updates, field, words):
    cfg = valid_config(**{k.replace(".", "__"): v for k, v in updates.items()})
    problems = cfg.errors()
    assert [e.field for e in problems] == [field], [str(e) for e in problems]
    assert words in problems[0].message
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    assert info.value.field == field
    assert str(info.value) == f"{field}: {problems[0].message}"


def test_every_limited_field_has_an_invalid_case():
    limited = {
        f.path
        for f in FIELDS
        if f.minimum is not None or f.maximum is not None or f.choices is not None or f.path in FIELD_CHECKS
    }
    covered = {field for _, field, _ in INVALID}
    assert limited <= covered, sorted(limited - covered)


@pytest.mark.parametrize(
    "updates",
    [
        {"optim.optimizer_type": "Prodigy", "optim.learning_rate": 1.0},
        {"dataset.resolution": "512,768", "dataset.min_bucket_reso": 512, "dataset.max_bucket_reso": 768},
        {"dataset.enable_bucket": False, "dataset.resolution": 1024},  # buckets off: their limits do not apply
        {"dataset.resolution": 4096, "dataset.max_bucket_reso": 4096},
        {"optim.lr_scheduler": "constant_with_warmup", "optim.lr_warmup_steps": 100},
        {"training.min_snr_gamma": 0.0, "training.seed": 0, "training.clip_skip": 12},
        {"save.output_name": "My LoRA v1.5 (final)-x_y"},
        {"sample.sample_every_n_epochs": 999_999, "sample.sample_prompts": ["1girl"]},  # the notebook's "off"
        {"network.conv_dim": 8, "network.conv_alpha": 1.0, "network.network_alpha": 16.0},
    ],
)
def test_valid_edge_values_pass(updates):
    cfg = valid_config(**{k.replace(".", "__"): v for k, v in updates.items()})
    assert cfg.errors() == []
    assert cfg.validate() is cfg


def test_errors_lists_every_problem_in_display_order():
    cfg = valid_config(
        sample__sample_steps=0, network__network_dim=0, dataset__train_data_dir="", optim__lr_scheduler="nope"
    )
    assert [e.field for e in cfg.errors()] == [
        "dataset.train_data_dir",
        "network.network_dim",
        "optim.lr_scheduler",
        "sample.sample_steps",
    ]
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    assert info.value.field == "dataset.train_data_dir"


def test_cross_field_errors_take_their_place_in_display_order():
    cfg = valid_config(dataset__min_bucket_reso=640, network__network_dim=0)
    assert [e.field for e in cfg.errors()] == ["dataset.min_bucket_reso", "network.network_dim"]


def test_errors_report_wrong_types_set_directly():
    cfg = valid_config()
    cfg.network.network_dim = "16"
    cfg.training = "fast"
    fields = [e.field for e in cfg.errors()]
    assert fields[0] == "network.network_dim"
    assert "training.max_train_epochs" in fields  # a whole group of the wrong type: each setting reported
    assert "must be an integer, got str '16'" in cfg.errors()[0].message


def test_cross_checks_skip_fields_that_are_already_invalid():
    # a resolution that is not a size is one error, not also a bucket error
    cfg = valid_config()
    cfg.dataset.resolution = "huge"
    assert [e.field for e in cfg.errors()] == ["dataset.resolution"]


# --------------------------------------------------------------------------------------------
# schema and field table
# --------------------------------------------------------------------------------------------


def test_json_schema_covers_every_field():
    schema = json_schema()
    assert TrainConfig.json_schema() == schema
    json.dumps(schema)  # JSON-safe
    assert schema["additionalProperties"] is False
    assert list(schema["properties"]) == list(C.GROUPS)
    paths = [f"{g}.{name}" for g, sub in schema["properties"].items() for name in sub["properties"]]
    assert paths == leaf_paths_by_walking()
    defaults = TrainConfig().to_flat()
    for path in paths:
        group, name = path.split(".")
        prop = schema["properties"][group]["properties"][name]
        assert prop["description"] == C.LEAF_BY_PATH[path].meta["help"]
        assert prop["default"] == defaults[path]
        assert "type" in prop or "oneOf" in prop
    network = schema["properties"]["network"]["properties"]
    assert network["network_dim"] == {**network["network_dim"], "type": "integer", "minimum": 1, "maximum": 1024}
    assert network["network_dim"]["x-kohya"] == "network_dim"
    assert network["conv_dim"]["x-kohya"] == "network_args:conv_dim"
    optim = schema["properties"]["optim"]["properties"]
    assert optim["optimizer_type"]["enum"] == list(C.OPTIMIZERS)
    assert optim["unet_lr"]["type"] == ["number", "null"]


@pytest.mark.parametrize("make", [TrainConfig, changed_config])
def test_json_schema_accepts_to_dict(make):
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(make().to_dict(), json_schema())


def test_json_schema_rejects_unknown_and_out_of_range():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json_schema()
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"network": {"network_dimm": 8}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"network": {"network_dim": 0}}, schema)


def test_fields_cover_every_leaf_exactly():
    paths = [f.path for f in FIELDS]
    assert paths == leaf_paths_by_walking()
    assert len(set(paths)) == len(paths)
    for f in FIELDS:
        assert f.label.strip(), f.path
        assert f.help.strip(), f.path
        assert f.widget in WIDGETS, f.path
        assert (f.widget == "dropdown") == (f.choices is not None), f.path
    by_path = {f.path: f for f in FIELDS}
    assert by_path["network.network_dim"][:4] == ("network.network_dim", "Rank (network_dim)", "int", None)
    assert by_path["optim.lr_scheduler"].choices == C.LR_SCHEDULERS
    assert by_path["training.seed"].optional
    assert not by_path["training.max_train_epochs"].optional
    assert by_path["dataset.trigger_words"].widget == "lines"
    assert by_path["optim.optimizer_args"].widget == "kv"
    assert by_path["dataset.resolution"].widget == "text"


def test_kohya_names():
    kohya = {f.path: f.kohya for f in FIELDS if f.kohya}
    # settings the brief maps to kohya's argument names (kohya passes the conv_* and *_dropout in network_args)
    brief = """network_dim network_alpha conv_dim conv_alpha network_dropout rank_dropout module_dropout
        learning_rate unet_lr text_encoder_lr network_train_unet_only network_train_text_encoder_only optimizer_type
        optimizer_args lr_scheduler lr_warmup_steps lr_scheduler_num_cycles lr_scheduler_power max_train_epochs
        max_train_steps train_batch_size gradient_accumulation_steps max_grad_norm gradient_checkpointing
        mixed_precision save_precision seed noise_offset min_snr_gamma shuffle_caption keep_tokens
        caption_dropout_rate caption_tag_dropout_rate caption_dropout_every_n_epochs caption_extension
        max_token_length clip_skip resolution enable_bucket min_bucket_reso max_bucket_reso bucket_reso_steps
        bucket_no_upscale cache_latents cache_latents_to_disk save_every_n_epochs save_every_n_steps output_name
        output_dir training_comment flip_aug sample_every_n_steps train_data_dir"""
    for name in brief.split():
        assert name in kohya.values(), name
    assert kohya["network.train_unet"] == "network_train_text_encoder_only"
    assert kohya["network.train_text_encoder"] == "network_train_unet_only"
    network_args = {f.kohya for f in FIELDS if C.LEAF_BY_PATH[f.path].meta.get("kohya_network_arg")}
    assert {"conv_dim", "conv_alpha", "rank_dropout", "module_dropout"} <= network_args
    assert {"loraplus_lr_ratio", "block_dims", "down_lr_weight", "block_lr_zero_threshold"} <= network_args
    assert not set(kohya.values()) & C.KOHYA_UNMAPPED  # a kohya name is either ours or reported as ignored


# --------------------------------------------------------------------------------------------
# presets
# --------------------------------------------------------------------------------------------


def test_builtin_presets():
    assert {"kohya-trainer", "quick-test", "sd15-character", "sdxl-low-vram"} <= set(PRESETS)
    assert list_presets() == list(PRESETS)
    for name, preset in PRESETS.items():
        assert preset.name == name
        assert preset.source == "builtin"
        assert len(preset.description) > 20
        # a preset leaves only the dataset folder to fill in
        assert [e.field for e in preset.config.errors()] == ["dataset.train_data_dir"], name
        cfg = load_preset(name)
        cfg.dataset.train_data_dir = "/data/train"
        assert cfg.validate() is cfg
        assert TrainConfig.from_toml(cfg.to_toml()) == cfg


def test_kohya_trainer_preset_values():
    cfg = load_preset("kohya-trainer")
    assert (cfg.network.network_dim, cfg.network.network_alpha, cfg.network.conv_dim) == (32, 16.0, 0)
    assert (cfg.optim.optimizer_type, cfg.optim.learning_rate) == ("AdamW8bit", 1e-4)
    assert (cfg.optim.unet_lr, cfg.optim.text_encoder_lr) == (1e-4, 5e-5)
    assert (cfg.optim.lr_scheduler, cfg.optim.lr_warmup_steps) == ("constant", 0)
    assert (cfg.training.train_batch_size, cfg.training.max_train_epochs, cfg.training.max_train_steps) == (6, 10, None)
    assert cfg.dataset.resolution == 512
    assert cfg.dataset.enable_bucket
    assert (cfg.dataset.min_bucket_reso, cfg.dataset.max_bucket_reso) == (256, 1024)
    assert (cfg.dataset.caption_extension, cfg.dataset.shuffle_caption, cfg.dataset.keep_tokens) == (".txt", True, 0)
    assert (cfg.dataset.max_token_length, cfg.training.clip_skip) == (225, 2)
    assert (cfg.training.mixed_precision, cfg.save.save_precision, cfg.save.save_every_n_epochs) == ("fp16", "fp16", 1)
    assert (cfg.training.noise_offset, cfg.training.gradient_checkpointing, cfg.dataset.cache_latents) == (
        0.0,
        False,
        True,
    )
    assert cfg.training.seed is None


def test_practical_presets():
    quick = load_preset("quick-test")
    assert quick.training.max_train_steps == 10
    assert quick.network.network_dim == 4
    assert quick.save.overwrite
    char = load_preset("sd15-character")
    assert (char.network.network_dim, char.network.network_alpha) == (16, 8.0)
    assert (char.optim.optimizer_type, char.optim.lr_scheduler, char.optim.learning_rate) == ("AdamW", "cosine", 1e-4)
    xl = load_preset("sdxl-low-vram")
    assert (xl.network.network_dim, xl.optim.optimizer_type, xl.training.train_batch_size) == (8, "Adafactor", 1)
    assert xl.training.gradient_checkpointing
    assert xl.dataset.cache_latents
    assert xl.dataset.resolution == 1024
    assert xl.training.mixed_precision in ("bf16", "fp16")
    assert not xl.network.train_text_encoder
    assert xl.optim.optimizer_args == {"scale_parameter": False, "relative_step": False, "warmup_init": False}


def test_load_preset_returns_a_copy():
    cfg = load_preset("quick-test")
    cfg.network.network_dim = 99
    assert load_preset("quick-test").network.network_dim == 4
    assert PRESETS["quick-test"].config.network.network_dim == 4


def test_user_presets(tmp_path):
    cfg = valid_config(network__network_dim=24)
    path = C.save_preset(cfg, "my-style", tmp_path, description="mine")
    assert path == tmp_path / "my-style.toml"
    assert list_presets(tmp_path) == [*PRESETS, "my-style"]
    assert load_preset("my-style", tmp_path) == cfg
    assert C.get_preset("my-style", tmp_path).description == "mine"
    with pytest.raises(ConfigError, match="exists"):
        C.save_preset(cfg, "my-style", tmp_path)
    # a user file shadows a built-in of the same name
    C.save_preset(cfg, "quick-test", tmp_path)
    assert load_preset("quick-test", tmp_path).network.network_dim == 24
    assert list_presets(tmp_path).count("quick-test") == 1
    assert load_preset("quick-test").network.network_dim == 4
    with pytest.raises(ConfigError) as info:
        C.save_preset(cfg, "Bad Name", tmp_path)
    assert info.value.field == "preset"


def test_unknown_and_broken_presets(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_preset("nope", tmp_path)
    assert info.value.field == "preset"
    assert "kohya-trainer" in info.value.message
    (tmp_path / "broken.toml").write_text("[lora_train.network]\nnetwork_dim = 'x'\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_preset("broken", tmp_path)
    assert info.value.field == "network.network_dim"
    assert "'broken'" in info.value.message
    assert "broken" in list_presets(tmp_path)
    assert list_presets(tmp_path / "missing") == list(PRESETS)
