"""The epoch x strength grid, the suggested epoch and keeping a file: on the stand-in WebUI (its
processing and Lora extension) and through the API on the stand-in host."""

from __future__ import annotations

import contextlib
import itertools
import json
import sys
import types
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from lora_trainer.errors import ConfigError
from lora_trainer.grid import (
    GridSettings,
    best_file,
    files_of_job,
    keep_file,
    make_grid,
    plan_cells,
    settings_from_dict,
)
from lora_trainer.jobs import Job, JobManager
from lora_trainer.webui.api import mount
from tests.fixtures.fake_webui import FakeWebUI
from tests.fixtures.host import FakeHost
from tests.fixtures.model_state import assert_model_unchanged, model_snapshot
from tests.fixtures.saved_runs import lora_file, saved_run

SIZE = 64


@pytest.fixture
def fake(tmp_path):
    with contextlib.ExitStack() as stack:
        webui = FakeWebUI(tmp_path / "webui", "sd1")
        stack.enter_context(webui.installed())
        yield webui


def cell_image(grid: Image.Image, row: int, column: int) -> Image.Image:
    """The cell at ``row``/``column``, by the box the grid's parameters give it."""
    cells = json.loads(grid.info["parameters"])["cells"]
    (box,) = [c["box"] for c in cells if (c["row"], c["column"]) == (row, column)]
    return grid.crop(tuple(box))


def assert_captions_fit(grid: Image.Image) -> None:
    """Cells do not overlap, and each column is wide enough for its caption (no run-together labels)."""
    boxes = [tuple(c["box"]) for c in json.loads(grid.info["parameters"])["cells"]]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)
    lefts = sorted({b[0] for b in boxes})
    # "no LoRA (0)", "strength 0.5" are wider than a 64 px image: the columns widen for them
    assert all(right - left > SIZE for left, right in itertools.pairwise(lefts))
    assert grid.size[0] >= max(b[2] for b in boxes)


def settings(**kw) -> GridSettings:
    return GridSettings(**{"prompts": ("a photo of sks",), "strengths": (0.0, 0.5, 1.0), "width": SIZE,
                           "height": SIZE, "steps": 2, "seed": 7, **kw})  # fmt: skip


def test_grid_cells_are_files_by_strengths_and_strength_0_is_the_base_image(fake):
    lora_dir = Path(fake.cmd_opts.lora_dir)
    files = [lora_file(lora_dir, f"tiny-00000{i}", seed=i, step=i * 10, model=fake.sd_model) for i in (1, 2)]
    host = fake.backend.host.WebUIHost()
    parts = types.SimpleNamespace(unet=fake.sd_model.model.diffusion_model, text_encoders={"te": fake.sd_model})
    before = model_snapshot(parts)
    seen = []
    txt2img = host._txt2img

    def watched(*args):
        seen.append((fake.queue_lock.locked(), fake.state.job_no, fake.state.job_count))
        return txt2img(*args)

    host._txt2img = watched
    result = make_grid(host, [str(f) for f in files], settings())
    host._txt2img = txt2img

    assert seen == [(True, i, 6) for i in range(6)]  # under the queue lock, progress counts the cells
    assert [(c.row, c.column, c.strength, Path(c.file).name) for c in result.cells] == [
        (r, s, strength, f.name) for r, f in enumerate(files) for s, strength in enumerate((0.0, 0.5, 1.0))
    ]
    assert [c.full_prompt for c in result.cells[:3]] == [
        "a photo of sks",
        "a photo of sks <lora:tiny-000001:0.5>",
        "a photo of sks <lora:tiny-000001:1>",
    ]
    assert result.complete
    grid = Image.open(result.path)
    params = json.loads(grid.info["parameters"])
    assert params["settings"]["strengths"] == [0.0, 0.5, 1.0]
    assert len(params["cells"]) == 6
    assert {c["column"] for c in params["cells"]} == {0, 1, 2}
    assert_captions_fit(grid)

    base = host._txt2img("a photo of sks", 7, SIZE, SIZE, 2, 7.0, "Euler a", True)
    assert base is not None
    grid = grid.convert("RGB")
    for row in (0, 1):
        assert cell_image(grid, row, 0).tobytes() == base.tobytes()  # bit for bit
        assert cell_image(grid, row, 2).tobytes() != base.tobytes()  # the LoRA changes the image
    assert cell_image(grid, 0, 2).tobytes() != cell_image(grid, 1, 2).tobytes()
    # the WebUI's own Lora extension applied each file: it loaded them by name
    loaded = [c for c in fake.lora.calls if c[0] == "load_networks"]
    assert ["tiny-000001"] in [c[1] for c in loaded]
    assert ["tiny-000002"] in [c[1] for c in loaded]
    assert fake.lora.loaded_networks == []
    assert_model_unchanged(parts, before)
    assert not fake.state.interrupted
    assert not fake.queue_lock.locked()
    assert set(result.previews) == {str(f) for f in files}


def test_an_interrupt_ends_the_grid_early(fake):
    lora_dir = Path(fake.cmd_opts.lora_dir)
    file = lora_file(lora_dir, "tiny", seed=1, step=10, model=fake.sd_model)
    host = fake.backend.host.WebUIHost()
    calls = []
    txt2img = host._txt2img

    def then_interrupt(*args):
        calls.append(args[0])
        if len(calls) == 2:
            fake.state.interrupted = True
        return txt2img(*args)

    host._txt2img = then_interrupt
    result = make_grid(host, [str(file)], settings())
    assert not result.complete
    assert len(calls) == 2
    assert not fake.state.interrupted  # the Interrupt meant for the grid does not outlive it
    assert fake.lora.loaded_networks == []


def test_a_cell_the_webuis_nan_check_refuses_is_left_blank(fake, monkeypatch):
    """The WebUI raises NansException for an image whose UNet output has NaN (an over-trained file
    at a high strength): that cell stays blank and says so; the grid is still made."""
    lora_dir = Path(fake.cmd_opts.lora_dir)
    path = lora_file(lora_dir, "tiny-000001", seed=1, step=1, model=fake.sd_model)
    processing = sys.modules["modules.processing"]
    original = processing.process_images

    def nan_at_full_strength(p):
        if ":1>" in p.prompt:
            raise sys.modules["modules.devices"].NansException("A tensor with NaNs was produced in Unet.")
        return original(p)

    monkeypatch.setattr(processing, "process_images", nan_at_full_strength)
    host = fake.backend.host.WebUIHost()
    result = make_grid(host, [str(path)], settings())
    assert result.complete
    params = json.loads(Image.open(result.path).info["parameters"])
    assert [c["generated"] for c in params["cells"]] == [True, True, False]
    assert not fake.networks.loaded_networks


def test_files_of_another_base_model_or_outside_the_lora_list_are_refused(fake, tmp_path):
    lora_dir = Path(fake.cmd_opts.lora_dir)
    xl = lora_file(lora_dir, "xl", seed=1, step=1, model=fake.sd_model, version="sdxl_base_v1-0")
    host = fake.backend.host.WebUIHost()
    with pytest.raises(ConfigError) as e:
        make_grid(host, [str(xl)], settings())
    assert e.value.field == "files"
    assert "sdxl" in e.value.message
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    outside = lora_file(elsewhere, "outside", seed=1, step=1, model=fake.sd_model)
    with pytest.raises(ConfigError) as e:
        make_grid(host, [str(outside)], settings())
    assert e.value.field == "files"
    assert fake.samples == []  # nothing generated


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "prompts"),
        ({"prompts": ["x <lora:a:1>"]}, "prompts"),
        ({"prompts": ["x"], "strengths": []}, "strengths"),
        ({"prompts": ["x"], "strengths": [0, "a"]}, "strengths"),
        ({"prompts": ["x"], "size": [65, 64]}, "size"),
        ({"prompts": ["x"], "steps": 0}, "steps"),
        ({"prompts": ["x"], "seed": 1.5}, "seed"),
    ],
)
def test_bad_grid_settings_name_their_field(body, field):
    with pytest.raises(ConfigError) as e:
        settings_from_dict(body)
    assert e.value.field == field


def test_cells_for_several_prompts_are_blocks_of_rows():
    s = settings_from_dict({"prompts": "one\ntwo", "strengths": "0, 1", "seed": 5, "size": [64, 64]})
    cells = plan_cells([Path("a.safetensors"), Path("b.safetensors")], s)
    assert [(c.row, c.column, c.prompt, c.seed) for c in cells] == [
        (0, 0, "one", 5), (0, 1, "one", 5), (1, 0, "one", 5), (1, 1, "one", 5),
        (2, 0, "two", 6), (2, 1, "two", 6), (3, 0, "two", 6), (3, 1, "two", 6),
    ]  # fmt: skip


def test_the_suggestion_and_the_files_of_a_restored_run(tmp_path):
    from tests.fixtures.webui_models import build_webui_model

    job, files = saved_run(tmp_path, build_webui_model("sd1", "tiny", seed=0))
    assert files_of_job(job) == files
    assert best_file(job) == {"file": str(files[1]), "step": 20, "epoch": 2, "loss": 0.20}
    restored = Job(id="j0", config=job.config, state="done", restored=True)  # a run without a record
    (files[0].parent / "other.safetensors").write_bytes(files[0].read_bytes())  # not named after the run
    assert files_of_job(restored) == files  # found by ss_output_name, in the order of their ss_steps


def test_keeping_a_file_never_overwrites_silently(tmp_path):
    from tests.fixtures.webui_models import build_webui_model

    _job, files = saved_run(tmp_path, build_webui_model("sd1", "tiny", seed=0))
    final = files[3]
    original = final.read_bytes()
    chosen = files[1]
    preview = tmp_path / "work" / "grids" / "previews"
    from lora_trainer.grid import preview_path

    preview_path(tmp_path / "work", chosen).parent.mkdir(parents=True)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(preview_path(tmp_path / "work", chosen))

    kept = keep_file(chosen, "tiny", work_dir=tmp_path / "work")
    assert Path(kept.path).name == "tiny_1.safetensors"
    assert not kept.replaced
    assert final.read_bytes() == original
    assert Path(kept.path).read_bytes() == chosen.read_bytes()
    assert kept.preview == str(Path(kept.path).with_name("tiny_1.preview.png"))
    assert Image.open(kept.preview).getpixel((0, 0)) == (1, 2, 3)

    chosen_bytes = chosen.read_bytes()
    kept = keep_file(chosen, "tiny", work_dir=tmp_path / "work", replace=True, remove=[str(f) for f in files])
    assert kept.path == str(final)
    assert kept.replaced
    assert final.read_bytes() == chosen_bytes
    assert sorted(Path(p).name for p in kept.removed) == ["tiny-000001.safetensors", "tiny-000002.safetensors",
                                                          "tiny-000003.safetensors"]  # fmt: skip
    assert final.exists()
    assert not chosen.exists()
    assert preview.is_dir()


def test_keeping_a_file_and_removing_the_others_takes_the_final_name(tmp_path):
    """Removing the run's other files includes the one at the final name: the kept file takes that
    name (the user asked for it to go), instead of ending as NAME_1 beside nothing."""
    from tests.fixtures.webui_models import build_webui_model

    _job, files = saved_run(tmp_path, build_webui_model("sd1", "tiny", seed=0))
    final, chosen = files[3], files[1]
    chosen_bytes = chosen.read_bytes()
    kept = keep_file(chosen, "tiny", work_dir=tmp_path / "work", remove=[str(f) for f in files])
    assert kept.path == str(final)
    assert final.read_bytes() == chosen_bytes
    assert sorted(p.name for p in final.parent.glob("tiny*.safetensors")) == ["tiny.safetensors"]


@pytest.fixture
def api(tmp_path):
    host = FakeHost(tmp_path)
    manager = JobManager(host)
    app = FastAPI()
    mount(app, manager)
    return TestClient(app), manager, host


def test_grid_and_keep_through_the_api(api, tmp_path):
    from tests.fixtures.webui_models import build_webui_model

    client, manager, host = api
    job, files = saved_run(tmp_path / "run", build_webui_model("sd1", "tiny", seed=0))
    for f in files:  # the run wrote into the Lora folder
        f.rename(host.lora_dir / f.name)
    job.saved = [str(host.lora_dir / f.name) for f in files[:3]]
    job.output_file = str(host.lora_dir / files[3].name)
    job.config.save.output_dir = str(host.lora_dir)
    manager._jobs[job.id] = job

    r = client.post("/lora-train/v1/grid", json={"job": "j1", "prompts": ["sks"], "size": [64, 64]})
    assert r.status_code == 200, r.text
    data = r.json()
    assert len(data["cells"]) == 4 * 4
    assert data["complete"]
    assert [c["strength"] for c in data["cells"][:4]] == [0.0, 0.5, 0.75, 1.0]
    assert data["suggested"]["file"] == job.saved[1]
    assert Path(data["image"]).is_file()
    assert ("grid", "16") in host.events

    r = client.post("/lora-train/v1/grid", json={"job": "j1", "prompts": ["sks"], "strengths": "x"})
    assert r.status_code == 422
    assert r.json()["field"] == "strengths"
    r = client.post("/lora-train/v1/grid", json={"prompts": ["sks"]})
    assert r.status_code == 422
    assert r.json()["field"] == "files"

    r = client.post("/lora-train/v1/keep", json={"job": "j1", "file": job.saved[1]})
    assert r.status_code == 200, r.text
    assert Path(r.json()["path"]).name == "tiny_1.safetensors"
    assert r.json()["preview"]
    assert host.published[-1] == Path(r.json()["path"])
    r = client.post("/lora-train/v1/keep", json={"job": "j1", "file": str(tmp_path / "x.safetensors")})
    assert r.status_code == 422
    assert r.json()["field"] == "file"
    r = client.post("/lora-train/v1/keep", json={"job": "j1", "file": job.saved[1], "replace": "yes"})
    assert r.status_code == 422
    assert r.json()["field"] == "replace"


def test_the_results_section_suggests_makes_the_grid_and_keeps(api, tmp_path):
    from lora_trainer.webui.results_ui import STAR, ResultActions
    from tests.fixtures.webui_models import build_webui_model

    _, manager, _host = api
    job, files = saved_run(tmp_path / "run", build_webui_model("sd1", "tiny", seed=0))
    manager._jobs[job.id] = job
    actions = ResultActions(manager)
    run, checked, best, keep_choice, name = actions.refresh(None)
    assert run["choices"] == ["j1 · tiny"]
    assert run["value"] == "j1 · tiny"
    assert checked["value"] == [STAR + "tiny-000002.safetensors" if f == files[1] else f.name for f in files]
    assert "tiny-000002" in best
    assert keep_choice["value"] == STAR + "tiny-000002.safetensors"
    assert name == "tiny"

    image, message = actions.grid("j1 · tiny", checked["value"][:2], "sks", "0, 1", 3, 64, 64, 2, "Euler a")
    assert image is not None
    assert "4 images" in message
    assert len(json.loads(Image.open(image).info["parameters"])["cells"]) == 4
    image, message = actions.grid("j1 · tiny", checked["value"], "sks", "0, x", 3, 64, 64, 2, "Euler a")
    assert image is None
    assert "strengths" in message
    assert "lora_train_error" in message

    message = actions.keep("j1 · tiny", keep_choice["value"], "tiny", False, False)
    assert "kept tiny_1.safetensors" in message
    assert files[3].read_bytes() != files[1].read_bytes()  # the final file was not replaced


def test_after_a_restart_the_grid_and_keep_work_on_a_recorded_run(tmp_path):
    from lora_trainer.jobs import _save_record
    from tests.fixtures.webui_models import build_webui_model

    host = FakeHost(tmp_path)
    job, files = saved_run(tmp_path / "run", build_webui_model("sd1", "tiny", seed=0))
    _save_record(host.work_dir, job)
    manager = JobManager(host)  # a new session reads the records back
    restored = manager.get("j1")
    assert restored.restored
    assert files_of_job(restored) == files
    assert best_file(restored) == {"file": str(files[1]), "step": 20, "epoch": 2, "loss": 0.20}
    app = FastAPI()
    mount(app, manager)
    host.allow_any_output_dir = True
    client = TestClient(app)
    r = client.post(
        "/lora-train/v1/grid", json={"job": "j1", "prompts": ["sks"], "strengths": [0, 1], "size": [64, 64]}
    )
    assert r.status_code == 200, r.text
    assert len(r.json()["cells"]) == 8
    r = client.post("/lora-train/v1/keep", json={"job": "j1", "file": str(files[0]), "remove_others": True})
    assert r.status_code == 200, r.text
    assert Path(r.json()["path"]).name == "tiny.safetensors"  # the final name, its old file removed as asked
    assert sorted(Path(p).name for p in r.json()["removed"]) == sorted(f.name for f in files if f != files[3])
