"""The tab's Export / import: settings -> TOML + command line, and a TOML back into the form."""

from __future__ import annotations

import shlex
from pathlib import Path

import gradio as gr
import pytest

from lora_trainer.config import TrainConfig
from lora_trainer.contracts import ModelInfo
from lora_trainer.webui.export_ui import ExportActions, train_command
from lora_trainer.webui.fields import FIELDS, build_config, widget_values
from tests.fixtures.host import FakeHost
from tests.fixtures.training import make_config


@pytest.fixture
def host(tmp_path):
    return FakeHost(tmp_path / "host")


def _field(values: list, path: str):
    return values[[s.path for s in FIELDS].index(path)]


def test_export_writes_the_settings_and_the_command_that_trains_them(tmp_path, host):
    cfg = make_config(tmp_path, **{"save.output_name": "hero", "network.network_dim": 8, "training.max_train_steps": 7})
    message, text, command = ExportActions(host).export(*widget_values(cfg))
    path = host.work_dir / "exports" / "hero.toml"
    assert path.read_text(encoding="utf-8") == text
    assert str(path) in message
    assert TrainConfig.from_toml(text) == build_config(widget_values(cfg))[0]
    words = shlex.split(command.split(" && ", 1)[1])
    assert words[:5] == ["python", "-m", "lora_trainer", "train", str(path)]
    assert words[words.index("--checkpoint") + 1] == host.model_info().checkpoint_path
    assert "--vae" not in words  # the stand-in's VAE is the checkpoint's own


def test_export_of_settings_with_errors_says_they_need_fixing(host):
    values = widget_values(TrainConfig())
    values[[s.path for s in FIELDS].index("network.network_dim")] = "not a number"
    message, text, _ = ExportActions(host).export(*values)
    assert "still need fixing" in message  # as a preset is saved: the file is for editing, not for training yet
    assert TrainConfig.from_toml(text).network.network_dim == TrainConfig().network.network_dim  # the default applies


def test_load_fills_the_form_from_a_toml(tmp_path, host):
    exported = make_config(tmp_path, **{"save.output_name": "from_cli", "network.network_dim": 12})
    message, *values = ExportActions(host).load(exported.to_toml(), *widget_values(TrainConfig()))
    assert "Loaded" in message
    assert _field(values, "save.output_name") == "from_cli"
    assert build_config(values)[0] == exported


def test_load_names_an_unknown_key_and_leaves_the_form(host):
    text = "[training_arguments]\nmax_train_steps = 10\nlearning_rat = 0.001\n"
    message, *values = ExportActions(host).load(text, *widget_values(TrainConfig()))
    assert "learning_rat" in message
    assert all(v == gr.update() for v in values)


def test_load_lists_kohya_settings_the_trainer_does_not_use(host):
    text = '[training_arguments]\nmax_train_steps = 10\nlog_with = "tensorboard"\n'
    message, *values = ExportActions(host).load(text, *widget_values(TrainConfig()))
    assert "Loaded" in message
    assert "log_with" in message
    assert build_config(values)[0].training.max_train_steps == 10


@pytest.mark.parametrize("platform", ["linux", "win32"])
def test_the_command_keeps_paths_with_spaces_whole(monkeypatch, platform):
    monkeypatch.setattr("sys.platform", platform)
    info = ModelInfo(
        "sd2", "v.safetensors", "my vae", None, "/models/My Models/v 768.safetensors", "/vae/a b.pt", "v_prediction"
    )
    command = train_command(Path("/work/exports/x y.toml"), info, root="/ext/lora train")
    if platform == "linux":
        cd, rest = command.split(" && ", 1)
        assert shlex.split(cd) == ["cd", "/ext/lora train"]
        words = shlex.split(rest)
        assert words[4] == "/work/exports/x y.toml"
        assert words[words.index("--vae") + 1] == "/vae/a b.pt"
    else:
        assert '"/models/My Models/v 768.safetensors"' in command
    assert command.endswith("--v-parameterization")


def test_the_exported_command_is_one_the_command_line_accepts(tmp_path, host):
    from lora_trainer.__main__ import build_parser

    info = ModelInfo("sd2", "v", "vae", None, "/m/v 768.safetensors", "/m/vae.pt", "v_prediction")
    command = train_command(tmp_path / "exports" / "a b.toml", info)
    args = build_parser().parse_args(shlex.split(command.split(" && ", 1)[1])[3:])
    assert args.command == "train"
    assert (args.config, args.checkpoint, args.vae) == (
        str(tmp_path / "exports" / "a b.toml"),
        "/m/v 768.safetensors",
        "/m/vae.pt",
    )
    assert args.v_parameterization is True
