"""The LoRA Train tab without a browser: field table <-> components, config from widget values,
error and status rendering, the handlers over a FakeHost, the WebUI entry and its callbacks."""

from __future__ import annotations

import dataclasses
import json
import runpy
import subprocess
import sys
import types
from pathlib import Path

import gradio as gr
import pytest

from lora_trainer.config import GROUPS, PRESETS, TrainConfig, load_preset
from lora_trainer.errors import ConfigError
from lora_trainer.jobs import JobManager
from lora_trainer.webui import fields, render
from lora_trainer.webui.fields import FIELDS
from lora_trainer.webui.ui import RESYNC_EVERY, _Actions, create_tab
from tests.fixtures.host import FakeHost
from tests.fixtures.training import make_config

REPO = Path(__file__).resolve().parents[1]
WIDGET_CLASSES = {
    "text": gr.Textbox,
    "lines": gr.Textbox,
    "kv": gr.Textbox,
    "int": gr.Number,
    "float": gr.Number,
    "checkbox": gr.Checkbox,
    "dropdown": gr.Dropdown,
}


@pytest.fixture
def host(tmp_path):
    return FakeHost(tmp_path / "host")


@pytest.fixture
def manager(host):
    jobs = JobManager(host)
    yield jobs
    for job in jobs.list():  # leave no training thread behind
        if job.active:
            jobs.cancel(job.id)
            jobs.wait(job.id, timeout=120)


@pytest.fixture
def actions(manager, host, tmp_path):
    return _Actions(manager, host, tmp_path / "presets")


def ui_values(cfg: TrainConfig) -> list:
    return fields.widget_values(cfg)


def by_path(values: list) -> dict:
    return dict(zip((s.path for s in FIELDS), values, strict=True))


# --------------------------------------------------------------------------------------------
# The field table generates the tab
# --------------------------------------------------------------------------------------------


def test_every_field_is_exactly_one_component_and_vice_versa(manager, host):
    tab = create_tab(manager, host)
    generated = [
        block
        for block in tab.blocks.values()
        if isinstance(getattr(block, "elem_id", None), str) and block.elem_id.startswith(fields.ELEM_PREFIX)
    ]
    ids = [block.elem_id for block in generated]
    assert len(ids) == len(set(ids))
    assert sorted(ids) == sorted(fields.elem_id(spec.path) for spec in FIELDS)
    by_id = {block.elem_id: block for block in generated}
    for spec in FIELDS:
        component = by_id[fields.elem_id(spec.path)]
        expected = gr.Textbox if spec.widget in ("int", "float") and spec.optional else WIDGET_CLASSES[spec.widget]
        assert isinstance(component, expected), spec.path
        assert component.label == spec.label
        assert "lora_train_field" in component.elem_classes
        if spec.widget == "dropdown":
            assert [c if isinstance(c, str) else c[0] for c in component.choices][: len(spec.choices)] == [
                str(c) for c in spec.choices
            ]
    assert tab.lora_train_components.keys() == {spec.path for spec in FIELDS}


def test_sections_show_every_group_once():
    shown = [group for section in fields.SECTIONS for group in section.groups]
    assert sorted(shown) == sorted(GROUPS)
    assert len(shown) == len(set(shown))
    assert [s.title for s in fields.SECTIONS] == [
        "Dataset",
        "Network & optimizer",
        "Training & validation",
        "Save & samples",
    ]
    assert sum(len(fields.section_fields(s)) for s in fields.SECTIONS) == len(FIELDS)


def test_elem_ids_are_prefixed_and_unique(manager, host):
    tab = create_tab(manager, host)
    ids = [b.elem_id for b in tab.blocks.values() if getattr(b, "elem_id", None)]
    assert all(i.startswith("lora_train_") for i in ids), [i for i in ids if not i.startswith("lora_train_")]
    assert len(ids) == len(set(ids))


def test_workshop_hook_gets_its_tab_and_the_folder_box(manager, host):
    seen = []

    def workshop(folder_box):
        seen.append(folder_box)
        gr.Markdown("workshop here", elem_id="lora_train_workshop_probe")

    tab = create_tab(manager, host, workshop=workshop)
    assert seen == [tab.lora_train_components["dataset.train_data_dir"]]
    ids = {getattr(b, "elem_id", None) for b in tab.blocks.values()}
    assert {"lora_train_section_workshop", "lora_train_workshop_probe"} <= ids
    assert "lora_train_section_workshop" not in {
        getattr(b, "elem_id", None) for b in create_tab(manager, host).blocks.values()
    }


def test_short_help_keeps_parenthesised_sentences_whole():
    assert fields.short_help("One (e.g. this. and that). Two.") == "One (e.g. this. and that)."
    assert fields.short_help("No end") == "No end"
    assert fields.short_help("Use e.g. 5 here. More.") == "Use e.g. 5 here."


# --------------------------------------------------------------------------------------------
# Widget values <-> TrainConfig
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_the_widgets(name):
    cfg = load_preset(name)
    cfg.dataset.train_data_dir = "/data/set"
    built, errors = fields.build_config(ui_values(cfg))
    assert built is not None
    assert built.to_dict() == cfg.to_dict()
    assert [e.field for e in errors] == [e.field for e in cfg.errors()]


def test_every_widget_kind_round_trips():
    cfg = TrainConfig()
    cfg.dataset.train_data_dir = "/data"
    cfg.dataset.trigger_words = ["mychar", "blue hair"]
    cfg.dataset.resolution = (512, 768)
    cfg.dataset.max_token_length = 150
    cfg.optim.optimizer_args = {"weight_decay": 0.01, "betas": [0.9, 0.99], "decouple": True, "mode": "x y"}
    cfg.optim.unet_lr = 5e-5
    cfg.training.seed = 7
    cfg.save.output_dir = "/out"
    cfg.sample.sample_prompts = ["a photo of mychar, smiling", "mychar at night"]
    values = ui_values(cfg)
    shown = by_path(values)
    assert shown["dataset.resolution"] == "512,768"
    assert shown["dataset.max_token_length"] == "150"
    assert shown["dataset.trigger_words"] == "mychar\nblue hair"
    assert shown["training.max_train_steps"] == ""
    assert shown["save.metadata_title"] == ""
    assert shown["training.seed"] == "7"
    assert shown["optim.unet_lr"] == "5e-05"
    assert shown["network.network_dim"] == 16  # a required number stays a number
    built, errors = fields.build_config(values)
    assert errors == []
    assert built.to_dict() == cfg.to_dict()
    assert built.dataset.max_token_length == 150
    assert built.optim.optimizer_args["betas"] == [0.9, 0.99]


def test_values_as_gradio_sends_them():
    values = by_path(ui_values(TrainConfig()))
    values.update(
        {
            "dataset.train_data_dir": "  /data/set  ",
            "network.network_dim": 8.0,  # gr.Number may send a float
            "training.max_train_steps": " 20 ",  # optional numbers are text boxes
            "training.seed": "",  # blank optional number: unset
            "optim.unet_lr": "1e-4",
            "save.output_dir": "   ",  # blank optional text: unset
            "optim.optimizer_args": "weight_decay = 0.1\n# a comment\n\nbetas=(0.9, 0.999)",
            "dataset.trigger_words": " mychar \n\n",
        }
    )
    cfg, errors = fields.build_config(values)
    assert errors == []
    assert cfg.dataset.train_data_dir == "/data/set"
    assert cfg.network.network_dim == 8
    assert isinstance(cfg.network.network_dim, int)
    assert cfg.training.seed is None
    assert cfg.save.output_dir is None
    assert cfg.training.max_train_steps == 20
    assert cfg.optim.unet_lr == 1e-4
    assert cfg.optim.optimizer_args == {"weight_decay": 0.1, "betas": [0.9, 0.999]}
    assert cfg.dataset.trigger_words == ["mychar"]


def test_every_problem_is_reported_by_field_in_display_order():
    values = by_path(ui_values(TrainConfig()))
    values.update(
        {
            "network.network_dim": 4.5,  # not whole
            "training.seed": "twelve",  # not a number
            "training.train_batch_size": None,  # required number left blank
            "optim.optimizer_args": "weight_decay",  # no '='
            "dataset.resolution": "100",  # limit (errors())
            "save.output_name": "a/b",  # check (errors())
        }
    )
    cfg, errors = fields.build_config(values)
    assert cfg is not None
    assert [e.field for e in errors] == [
        "dataset.train_data_dir",  # required, empty
        "dataset.resolution",
        "network.network_dim",
        "optim.optimizer_args",
        "training.train_batch_size",
        "training.seed",
        "save.output_name",
    ]
    assert "whole number" in errors[2].message
    assert "name=value" in errors[3].message


def test_preset_keeps_personal_settings_it_does_not_set():
    current = by_path(ui_values(TrainConfig()))
    current["dataset.train_data_dir"] = "/my/images"
    current["save.output_name"] = "my_char"
    kohya = by_path(fields.preset_values(load_preset("kohya-trainer"), current))
    assert kohya["dataset.train_data_dir"] == "/my/images"
    assert kohya["save.output_name"] == "my_char"
    assert kohya["network.network_dim"] == 32
    assert kohya["optim.optimizer_type"] == "AdamW8bit"
    quick = by_path(fields.preset_values(load_preset("quick-test"), current))
    assert quick["save.output_name"] == "lora_quick_test"  # the preset sets it
    assert quick["dataset.train_data_dir"] == "/my/images"


def test_lora_prompt():
    assert fields.lora_prompt("my_char") == "<lora:my_char:1.0>"
    assert fields.lora_prompt("my char", ["mychar", " blue hair ", ""]) == "<lora:my char:1.0> mychar, blue hair"


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def test_errors_html_names_fields_and_escapes():
    html = render.errors_html([ConfigError("dataset.resolution", "must be <64>"), ConfigError("preset", "bad & wrong")])
    assert "Dataset › Resolution" in html
    assert "<code>dataset.resolution</code>" in html
    assert 'data-field="dataset.resolution"' in html
    assert "loraTrain.showField('dataset.resolution')" in html
    assert "must be &lt;64&gt;" in html
    assert "bad &amp; wrong" in html
    assert 'data-field="preset"' not in html  # not a setting: named, no link
    assert render.errors_html([]) == ""


def test_exception_html_never_shows_a_trace():
    try:
        raise RuntimeError("boom")
    except RuntimeError as exc:
        html = render.exception_html(exc)
    assert "RuntimeError: boom" in html
    assert "Traceback" not in html
    assert "lora_train_msg_error" in html


def test_status_html_states():
    assert 'data-state="idle"' in render.status_html(None)
    job = {
        "state": "running",
        "phase": "Training",
        "output_name": "x<y>",
        "step": 3,
        "total_steps": 10,
        "epoch": 1,
        "total_epochs": 2,
        "loss": 0.123456,
        "avg_loss": 0.2,
        "steps_per_s": 1.5,
        "eta_s": 65.0,
        "output_file": None,
        "error": None,
        "created_at": 1.0,
        "finished_at": None,
    }
    html = render.status_html(job)
    assert 'data-state="running"' in html
    assert "Step <b>3</b> / 10" in html
    assert "ETA <b>1:05</b>" in html
    assert "0.1235" in html
    assert "x&lt;y&gt;" in html
    assert "width:30.0%" in html
    assert "Last run:" not in html  # a current job
    failed = render.status_html({**job, "state": "failed", "error": "DatasetError: no images", "finished_at": 9.0})
    assert "Last run:" in failed  # a reloaded page says the panel shows a previous job
    assert "lora_train_msg_error" in failed
    assert "no images" in failed
    assert "took 0:08" in failed
    assert render.format_duration(3725) == "1:02:05"
    assert render.format_duration(None) == "–"


def test_loss_svg():
    assert "after two steps" in render.loss_svg([1.0])
    svg = render.loss_svg([1.0, 0.5, float("nan"), 0.75] * 500)
    assert svg.count("<polyline") == 2
    assert "1500 steps" in svg
    points = svg.split('points="')[1].split('"')[0].split()
    assert len(points) == render.PLOT_POINTS


def test_model_html_refuses_unsupported_models(host):
    assert "SD 1.x" in render.model_html(host.model_info())
    assert "Cannot train" not in render.model_html(host.model_info())
    host.problem = "the loaded model is an SD3 model, which is not supported"
    html = render.model_html(host.model_info())
    assert "lora_train_model_bad" in html
    assert "Cannot train on the loaded model: the loaded model is an SD3" in html


# --------------------------------------------------------------------------------------------
# Handlers over the FakeHost
# --------------------------------------------------------------------------------------------


def good_values(tmp_path, **overrides):
    cfg = make_config(tmp_path, **overrides)
    cfg.save.output_dir = None  # the host's Lora folder
    return ui_values(cfg)


def test_start_with_bad_settings_shows_them_and_starts_nothing(actions, manager):
    html = actions.start(*ui_values(TrainConfig()))
    assert "Fix these settings first" in html
    assert "dataset.train_data_dir" in html
    assert manager.latest() is None


def test_start_refuses_an_unsupported_model(actions, host, manager, tmp_path):
    host.problem = "SD3 models are not supported"
    assert "Cannot start: SD3 models are not supported" in actions.start(*good_values(tmp_path))
    assert manager.latest() is None
    updates = actions.poll({})
    assert updates[4]["interactive"] is False
    assert updates[5]["interactive"] is False


def test_start_poll_send_and_reconnect(actions, manager, host, tmp_path):
    seen: dict = {}
    first = actions.poll(seen)
    assert 'data-state="idle"' in first[1]
    assert first[7]["interactive"] is False
    assert actions.restore_fields(None)[1:] == [gr.update()] * len(FIELDS)

    values = by_path(good_values(tmp_path))
    values["dataset.trigger_words"] = "tinychar"
    html = actions.start(*values.values())
    assert "Started 'tiny'" in html
    assert "still running" in actions.start(*values.values()) or manager.current() is None
    job = manager.wait(manager.latest().id, timeout=300)
    assert job.state == "done", job.error

    updates = actions.poll({})  # a new page: everything is sent
    assert 'data-state="done"' in updates[1]
    assert "Step <b>6</b> / 6" in updates[1]
    assert "<polyline" in updates[2]
    assert updates[4]["interactive"] is True
    assert updates[6]["interactive"] is False
    assert updates[7]["interactive"] is True
    assert updates[8] == "<lora:tiny:1.0> tinychar"
    # The first page gets what changed since its last poll, then nothing while nothing changes.
    changed = actions.poll(seen)
    assert 'data-state="done"' in changed[1]
    assert changed[4] == gr.update()
    quiet = [actions.poll(seen) for _ in range(RESYNC_EVERY - 2)]
    assert all(u == gr.update() for updates in quiet for u in updates)
    # Every RESYNC_EVERY polls everything is sent again, so an update the page missed heals.
    assert 'data-state="done"' in actions.poll(seen)[1]
    # A reloaded page shows the job's settings.
    restored = actions.restore_fields(None)
    assert by_path(restored[1:])["dataset.trigger_words"] == "tinychar"
    # The output folder was left unset (the host's Lora folder): it stays unset, not resolved to a path.
    assert manager.latest().config.save.output_dir == str(host.lora_dir)
    assert by_path(restored[1:])["save.output_dir"] in ("", None)
    assert (host.lora_dir / "tiny.safetensors").is_file()


def test_stop_and_resume(actions, manager, host, tmp_path):
    assert "Nothing is running" in actions.stop()
    original = host.on_job_progress

    def stop_at_two(job):
        original(job)
        if job.step == 2 and job.phase == "Training":
            actions.stop()

    host.on_job_progress = stop_at_two
    values = good_values(tmp_path, **{"training.max_train_steps": 4})
    actions.start(*values)
    job = manager.wait(manager.latest().id, timeout=300)
    assert job.state == "stopped"
    assert job.step == 2
    host.on_job_progress = original
    assert "Resuming 'tiny'" in actions.resume(*values)  # overwrites its own partial file
    resumed = manager.wait(manager.latest().id, timeout=300)
    assert resumed.state == "done", resumed.error
    assert resumed.step == 4, resumed.error


def test_poll_never_raises(actions, host, manager):
    def broken():
        raise RuntimeError("no model loaded")

    host.model_info = broken
    updates = actions.poll({})
    assert "cannot read the loaded model (RuntimeError: no model loaded)" in updates[0]
    assert updates[4]["interactive"] is False  # no Start without a model
    manager.latest = broken
    assert actions.poll({}) == [gr.update()] * 9


def test_save_and_apply_a_user_preset(actions, tmp_path):
    values = by_path(ui_values(TrainConfig()))
    values["network.network_dim"] = 24
    info, dropdown = actions.save_preset("my-preset", *values.values())
    assert "Saved preset 'my-preset'" in info
    assert "need fixing" in info
    assert "my-preset" in dropdown["choices"]
    assert dropdown["value"] == "my-preset"
    assert (tmp_path / "presets" / "my-preset.toml").is_file()
    applied = actions.apply_preset("my-preset", *ui_values(TrainConfig()))
    assert by_path(applied[1:])["network.network_dim"] == 24
    assert "built-in preset" in actions.save_preset("quick-test", *values.values())[0]
    assert "lowercase" in actions.save_preset("Bad Name", *values.values())[0]


def test_apply_a_builtin_preset(actions):
    out = actions.apply_preset("kohya-trainer", *ui_values(TrainConfig()))
    assert "Linaqruf" in out[0]
    assert by_path(out[1:])["optim.optimizer_type"] == "AdamW8bit"
    assert "unknown preset" in actions.apply_preset("nope", *ui_values(TrainConfig()))[0]


# --------------------------------------------------------------------------------------------
# The WebUI entry and its callbacks (with stand-ins for the WebUI's modules)
# --------------------------------------------------------------------------------------------


@pytest.fixture
def fake_webui(monkeypatch, tmp_path):
    """Stand-ins for modules.script_callbacks, the backend's host and options modules,
    lora_trainer.webui.settings and lora_trainer.webui.api."""
    calls: dict[str, list] = {"registered": [], "settings": [], "mount": []}
    callbacks = types.ModuleType("modules.script_callbacks")
    for name in ("on_ui_tabs", "on_ui_settings", "on_app_started"):
        setattr(callbacks, name, lambda fn, _name=name: calls["registered"].append((_name, fn)))
    modules = types.ModuleType("modules")
    modules.script_callbacks = callbacks
    host = types.ModuleType("lora_trainer.backends.webui.host")
    host.WebUIHost = lambda: FakeHost(tmp_path / "webui")
    settings = types.ModuleType("lora_trainer.webui.settings")
    settings.register_settings = lambda: calls["settings"].append(True)
    backend = types.ModuleType("lora_trainer.backends.webui.options")
    backend.api_enabled = lambda: backend.enabled
    backend.api_auth = lambda: ("user", "secret")
    backend.enabled = False
    api = types.ModuleType("lora_trainer.webui.api")
    api.mount = lambda app, manager, *, auth=None, preset_dir=None: calls["mount"].append((app, manager, auth))
    monkeypatch.setitem(sys.modules, "modules", modules)
    monkeypatch.setitem(sys.modules, "modules.script_callbacks", callbacks)
    monkeypatch.setitem(sys.modules, "lora_trainer.backends.webui.host", host)
    monkeypatch.setitem(sys.modules, "lora_trainer.backends.webui.options", backend)
    monkeypatch.setitem(sys.modules, "lora_trainer.webui.settings", settings)
    monkeypatch.setitem(sys.modules, "lora_trainer.webui.api", api)
    from lora_trainer.webui import runtime

    monkeypatch.setattr(runtime, "_manager", None)
    return calls, backend, runtime


def test_entry_script_registers_the_three_callbacks_and_nothing_else(fake_webui):
    calls, _, runtime = fake_webui
    script = REPO / "scripts" / "lora_train.py"
    assert len(script.read_text().splitlines()) <= 80
    namespace = runpy.run_path(str(script))
    assert [name for name, _ in calls["registered"]] == ["on_ui_tabs", "on_ui_settings", "on_app_started"]
    assert [fn for _, fn in calls["registered"]] == [runtime.on_ui_tabs, runtime.on_ui_settings, runtime.on_app_started]
    assert not [k for k in namespace if not k.startswith("__") and k not in ("script_callbacks", "lora_train_runtime")]


def test_callbacks_share_one_manager_and_mount_the_api_only_with_api(fake_webui):
    calls, backend, runtime = fake_webui
    [(tab, title, elem_id)] = runtime.on_ui_tabs()
    assert isinstance(tab, gr.Blocks)
    assert (title, elem_id) == ("LoRA Train", "lora_train")
    runtime.on_ui_settings()
    assert calls["settings"] == [True]
    runtime.on_app_started(None, "app")
    assert calls["mount"] == []
    backend.enabled = True
    runtime.on_app_started(None, "app")
    assert calls["mount"] == [("app", runtime.manager(), ("user", "secret"))]
    assert runtime.manager() is runtime.manager()


def test_modules_without_gradio_stay_without_it():
    """fields/render/runtime import neither gradio nor the WebUI; only ui.py (lazily) does."""
    code = (
        "import sys; sys.modules['gradio'] = None; sys.modules['modules'] = None\n"
        "import lora_trainer.webui.fields, lora_trainer.webui.render, lora_trainer.webui.runtime\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_help_tooltips_cover_every_field():
    from lora_trainer.webui.ui import _help_json

    html = _help_json()
    data = json.loads(html.split(">", 1)[1].rsplit("<", 1)[0].replace("<\\/", "</"))
    assert data == {fields.elem_id(s.path): s.help for s in FIELDS}
    overwrite = data[fields.elem_id("save.overwrite")]  # says what a run does when it is off: a free name
    assert "NAME_1" in overwrite
    assert "stop with an error" not in overwrite


def test_field_table_matches_the_dataclasses():
    paths = [
        f"{group.name}.{leaf.name}"
        for group in dataclasses.fields(TrainConfig)
        for leaf in dataclasses.fields(group.default_factory)
    ]
    assert paths == [spec.path for spec in FIELDS]


def test_runtime_over_the_real_webui_backend(monkeypatch, tmp_path):
    """on_ui_tabs / start_values / on_app_started with lora_trainer.backends.webui on a stand-in WebUI."""
    from fastapi import FastAPI

    from lora_trainer.webui import runtime
    from tests.fixtures.fake_webui import FakeWebUI

    fake = FakeWebUI(tmp_path / "webui")
    with fake.installed():
        backend = fake.backend.options
        monkeypatch.setattr(runtime, "_manager", None)
        fake.opts.data[backend.OPT_PRESET] = "quick-test"
        fake.opts.data[backend.OPT_SAMPLER] = "DPM++ 2M"

        [(tab, title, elem_id)] = runtime.on_ui_tabs()
        assert (title, elem_id) == ("LoRA Train", "lora_train")
        assert type(runtime.manager().host) is fake.backend.host.WebUIHost
        assert runtime.preset_dir() == Path(fake.root) / "lora_train" / "presets"
        model_line = next(b for b in tab.blocks.values() if getattr(b, "elem_id", None) == "lora_train_model_info")
        assert "tiny-sd1.safetensors" in model_line.value
        assert "SD 1.x" in model_line.value

        name, values = runtime.start_values()
        assert name == "quick-test"
        assert values["save.output_name"] == "lora_quick_test"
        assert values["sample.sample_sampler"] == "DPM++ 2M"
        assert values["sample.sample_steps"] == 20
        restore = next(f.fn for f in tab.fns if getattr(f.fn, "__name__", "") == "restore_fields")
        restored = restore(None)
        assert restored[0]["value"] == "quick-test"
        assert by_path(restored[1:])["training.max_train_steps"] == "10"

        fake.opts.data[backend.OPT_PRESET] = "no-such-preset"  # ignored, with a warning
        name, values = runtime.start_values()
        assert name is None
        assert values == {"sample.sample_sampler": "DPM++ 2M", "sample.sample_steps": 20}

        app = FastAPI()
        runtime.on_app_started(None, app)
        assert not [r for r in app.routes if "/lora-train/" in getattr(r, "path", "")]
        fake.cmd_opts.api = True
        runtime.on_app_started(None, app)
        assert [r for r in app.routes if "/lora-train/v1/" in getattr(r, "path", "")]


def test_tab_output_folder_goes_through_the_same_check(actions, manager, host, tmp_path):
    values = by_path(good_values(tmp_path, **{"training.max_train_steps": 1}))
    values["save.output_dir"] = str(tmp_path / "elsewhere")
    html = actions.start(*values.values())
    assert "Cannot start:" in html
    assert "save.output_dir" in html
    assert "outside the WebUI" in html
    assert manager.latest() is None
    assert not (tmp_path / "elsewhere").exists()
    host.allow_any_output_dir = True
    assert "Started 'tiny'" in actions.start(*values.values())
    assert manager.wait(manager.latest().id, timeout=120).state == "done"
