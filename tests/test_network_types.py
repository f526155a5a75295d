"""Network types selected through the config: kohya's networks.lora, and LyCORIS's lycoris.kohya with
``algo`` lora/locon/loha/lokr and ``dora_wd`` (DoRA).

The settings, their validation and kohya TOML; a run of each type on the tiny SD1 model through the
stand-in WebUI (its Lora loader places and applies every module, the metadata is what LyCORIS's kohya
module writes); exact resume; every optimizer with every algorithm.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from lora_trainer.config import TrainConfig
from lora_trainer.errors import ConfigError
from lora_trainer.files.inspection import format_report, inspect_lora
from lora_trainer.files.lora_file import load_lora
from lora_trainer.jobs import JobManager
from lora_trainer.networks.network import split_modules
from lora_trainer.networks.registry import detect_algorithm
from lora_trainer.train.loop import train
from lora_trainer.train.names import OPTIMIZERS
from tests.fixtures.training import StopAfter, make_config
from tests.fixtures.webui_models import TinyAdapter

LYCORIS = "lycoris.kohya"
# label -> (config overrides, registered algorithm, ss_network_args as LyCORIS's kohya module writes them)
TYPES = {
    "lora": ({}, "lora", None),
    "locon": (
        {"network.network_module": LYCORIS, "network.algo": "locon", "network.conv_dim": 2, "network.conv_alpha": 1.0},
        "lora",
        {"algo": "locon", "conv_dim": "2", "conv_alpha": "1"},
    ),
    "loha": (
        {"network.network_module": LYCORIS, "network.algo": "loha", "network.conv_dim": 2, "network.conv_alpha": 1.0},
        "loha",
        {"algo": "loha", "conv_dim": "2", "conv_alpha": "1"},
    ),
    "lokr": (
        {"network.network_module": LYCORIS, "network.algo": "lokr", "network.factor": 4},
        "lokr",
        {"algo": "lokr", "factor": "4", "conv_dim": "0", "conv_alpha": "4"},
    ),
    "dora": (
        {"network.network_module": LYCORIS, "network.dora_wd": True, "network.conv_dim": 2, "network.conv_alpha": 1.0},
        "dora",
        {"algo": "lora", "dora_wd": "True", "conv_dim": "2", "conv_alpha": "1"},
    ),
}


def network_config(**values) -> TrainConfig:
    cfg = TrainConfig()
    cfg.dataset.train_data_dir = "data"
    for name, value in values.items():
        setattr(cfg.network, name, value)
    return cfg


# --------------------------------------------------------------------------------------------
# settings


@pytest.mark.parametrize(
    ("values", "algorithm", "args"),
    [
        ({}, "lora", {}),
        ({"network_module": LYCORIS}, "lora", {}),
        ({"network_module": LYCORIS, "algo": "locon"}, "lora", {}),
        ({"network_module": LYCORIS, "algo": "loha", "use_tucker": True}, "loha", {"use_tucker": True}),
        (
            {"network_module": LYCORIS, "algo": "loha", "factor": 8},
            "loha",
            {"use_tucker": False},
        ),  # ignored, as LyCORIS does
        (
            {"network_module": LYCORIS, "algo": "lokr", "factor": 8, "full_matrix": True},
            "lokr",
            {"factor": 8, "decompose_both": False, "full_matrix": True, "use_tucker": False},
        ),
        ({"network_module": LYCORIS, "algo": "locon", "dora_wd": True}, "dora", {}),
    ],
)
def test_algorithm_and_its_arguments_from_the_settings(values, algorithm, args):
    cfg = network_config(**values)
    assert cfg.errors() == []
    assert cfg.network.algorithm == algorithm
    assert cfg.network.algorithm_args == args


@pytest.mark.parametrize(
    ("values", "field", "words"),
    [
        ({"algo": "loha"}, "network.algo", "needs network_module 'lycoris.kohya'"),
        ({"dora_wd": True}, "network.dora_wd", "needs network_module 'lycoris.kohya'"),
        ({"factor": 8}, "network.factor", "needs network_module 'lycoris.kohya'"),
        ({"network_module": LYCORIS, "algo": "lokr", "dora_wd": True}, "network.dora_wd", "'lora' or 'locon'"),
        (
            {"network_module": LYCORIS, "dora_wd": True, "network_dropout": 0.1},
            "network.network_dropout",
            "rank_dropout",
        ),
        ({"network_module": LYCORIS, "algo": "loha", "network_dropout": 0.1}, "network.network_dropout", "must be 0"),
        ({"network_module": LYCORIS, "use_tucker": True}, "network.use_tucker", "'loha' or 'lokr'"),
        ({"network_module": LYCORIS, "algo": "ia3"}, "network.algo", "'loha'"),
    ],
)
def test_network_type_problems_name_the_field(values, field, words):
    errors = network_config(**values).errors()
    assert [e.field for e in errors] == [field], errors
    assert words in str(errors[0])


KOHYA_LOHA = """
[additional_network_arguments]
network_module = "lycoris.kohya"
network_dim = 16
network_alpha = 8
network_args = ["algo=loha", "use_tucker=False", "preset=full"]

[dataset_arguments]
train_data_dir = "data"
"""


def test_kohya_toml_with_lycoris_takes_lycoris_conv_defaults():
    parsed = TrainConfig.from_toml(KOHYA_LOHA, strict=False)
    net = parsed.network
    assert (net.algorithm, net.network_dim, net.network_alpha) == ("loha", 16, 8.0)
    assert (net.conv_dim, net.conv_alpha) == (16, 8.0)  # LyCORIS: conv_dim/conv_alpha default to dim/alpha
    toml = KOHYA_LOHA.replace('"preset=full"', '"conv_dim=4", "conv_alpha=1", "dora_wd=true"').replace("loha", "locon")
    net = TrainConfig.from_toml(toml).network
    assert (net.algorithm, net.conv_dim, net.conv_alpha) == ("dora", 4, 1.0)


def test_kohya_toml_refuses_a_flag_that_is_not_true_or_false():
    with pytest.raises(ConfigError, match=r"network.dora_wd: network_args 'dora_wd' must be True or False"):
        TrainConfig.from_toml(KOHYA_LOHA.replace('"preset=full"', '"dora_wd=yes"'), strict=False)


@pytest.mark.parametrize("label", list(TYPES))
def test_kohya_toml_round_trip(tmp_path, label):
    overrides, _, _ = TYPES[label]
    cfg = make_config(tmp_path, **overrides, **{"network.use_tucker": label in ("loha", "lokr")})
    text = cfg.to_toml()
    again = TrainConfig.from_toml(text)
    assert again == cfg
    if label != "lora":
        assert 'network_module = "lycoris.kohya"' in text
        assert "conv_dim=" in text  # always said: LyCORIS's default is the network's rank
    # a kohya file (no [lora_train] table) with the same network reads back to the same network
    kohya_only = text.split("[lora_train]")[0]
    assert TrainConfig.from_toml(kohya_only, strict=False).network == cfg.network


# --------------------------------------------------------------------------------------------
# runs


@pytest.mark.parametrize("label", list(TYPES))
def test_each_type_trains_and_the_webui_applies_it(make_webui, tmp_path, label):
    overrides, algorithm, lycoris_args = TYPES[label]
    fake = make_webui("sd1")
    host = fake.backend.host.WebUIHost()
    cfg = make_config(tmp_path, **{"training.max_train_steps": 2, **overrides})
    cfg.save.output_dir = None  # the host's Lora folder
    manager = JobManager(host)
    job = manager.wait(manager.start(cfg).id, timeout=120)
    assert job.state == "done", job.error
    assert job.output_file is not None
    path = Path(job.output_file)
    state, metadata = load_lora(path)
    modules = split_modules(state)
    assert {detect_algorithm(parts) for parts in modules.values()} == {algorithm}
    conv = [name for name in modules if "resnets" in name and "conv" in name]
    assert bool(conv) == (cfg.network.conv_dim > 0)

    assert metadata["ss_network_module"] == cfg.network.network_module
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("4", "4.0")
    if lycoris_args is None:
        assert "ss_network_args" not in metadata
    else:
        assert json.loads(metadata["ss_network_args"]) == lycoris_args

    assert host.verify_lora(path) == []  # the WebUI's loader places every module
    pristine = {k: v.clone() for k, v in fake.sd_model.state_dict().items()}
    fake.networks.load_networks([path.stem])
    fake.lora.apply_as_a_generation_would(fake.sd_model)
    assert sum(len(n.modules) for n in fake.lora.loaded_networks) == len(modules)
    assert any(not torch.equal(v, pristine[k]) for k, v in fake.sd_model.state_dict().items())

    report = inspect_lora(path)
    text = format_report(report)
    assert {"lora": "LoRA", "locon": "LoCon", "loha": "LoHa", "lokr": "LoKr", "dora": "(DoRA)"}[label] in (
        report["network_type"]
    )
    if lycoris_args is not None:
        assert f"algo {lycoris_args['algo']}" in text


@pytest.mark.parametrize("label", ["loha", "lokr", "dora"])
def test_resume_is_exact(tmp_path, label):
    assert torch.get_num_threads() == 1  # bit-exact comparisons need one thread (tests/conftest.py)
    overrides = {
        **TYPES[label][0],
        "training.max_train_steps": 4,
        "network.rank_dropout": 0.2,
        "optim.lr_scheduler": "cosine",
        "save.save_precision": "float",
    }
    full = train(make_config(tmp_path / "a", **overrides), TinyAdapter("sd1"), work_dir=tmp_path / "a" / "work")
    cfg = make_config(tmp_path / "b", **overrides)
    partial = train(cfg, TinyAdapter("sd1"), StopAfter(2), work_dir=tmp_path / "b" / "work")
    assert partial.stopped_early
    resumed = train(cfg, TinyAdapter("sd1"), work_dir=tmp_path / "b" / "work", resume=True)
    assert resumed.losses == full.losses
    assert full.output_path is not None
    assert resumed.output_path is not None
    a, b = load_lora(full.output_path)[0], load_lora(resumed.output_path)[0]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


_OPTIONAL = {"AdamW8bit": "bitsandbytes", "Lion": "lion_pytorch", "Prodigy": "prodigyopt", "Adafactor": "transformers"}


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer_takes_every_algorithm(tmp_path, optimizer):
    module = _OPTIONAL.get(optimizer)
    if module is not None and importlib.util.find_spec(module) is None:
        pytest.skip(f"{optimizer} needs {module}")
    adapter = TinyAdapter("sd1")
    lr = 1.0 if optimizer == "Prodigy" else 1e-3
    for label in ("loha", "lokr", "dora"):
        overrides = {**TYPES[label][0], "training.max_train_steps": 2, "optim.optimizer_type": optimizer}
        cfg = make_config(tmp_path / label, **overrides, **{"optim.learning_rate": lr})
        result = train(cfg, adapter, work_dir=tmp_path / label / "work")
        assert result.steps == 2
        assert result.output_path is not None
        state = load_lora(result.output_path)[0]
        trained = [v for k, v in state.items() if k.endswith(("hada_w2_a", "lokr_w2", "lokr_w2_b", "lora_up.weight"))]
        assert trained, label
        assert any(bool(v.abs().sum() > 0) for v in trained), label  # the zero factor moved


def test_loha_and_lokr_presets():
    from lora_trainer.config import PRESETS, load_preset

    assert {"loha-style", "lokr-small"} <= set(PRESETS)
    loha = load_preset("loha-style").network
    assert (loha.algorithm, loha.network_dim, loha.network_alpha, loha.conv_dim, loha.conv_alpha) == (
        "loha",
        16,
        8.0,
        8,
        4.0,
    )
    lokr = load_preset("lokr-small")
    assert (lokr.network.algorithm, lokr.network.factor, lokr.network.train_text_encoder) == ("lokr", 8, False)
    assert (lokr.optim.optimizer_type, lokr.optim.learning_rate) == ("AdamW", 3e-4)
    for name in ("loha-style", "lokr-small"):
        cfg = load_preset(name)
        cfg.dataset.train_data_dir = "/data/train"
        assert cfg.validate() is cfg
        assert TrainConfig.from_toml(cfg.to_toml()) == cfg
