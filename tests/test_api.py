"""The REST API (``lora_trainer.webui.api``) over a JobManager on the stand-in host."""

from __future__ import annotations

import base64
import time

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from lora_trainer.config import PRESETS, TrainConfig
from lora_trainer.credentials import parse_credentials
from lora_trainer.jobs import JobManager
from lora_trainer.webui.api import PREFIX, config_from_request, mount
from tests.fixtures.host import FakeHost
from tests.fixtures.training import make_config


@pytest.fixture
def api(tmp_path):
    host = FakeHost(tmp_path)
    manager = JobManager(host)
    app = FastAPI()
    mount(app, manager)
    with TestClient(app) as client:
        yield client, manager, host
    for job in manager.list():  # never leave a training thread behind
        manager.cancel(job.id)
        manager.wait(job.id, timeout=120)


def body(tmp_path, steps=2, **overrides) -> dict:
    cfg = make_config(tmp_path, **{"training.max_train_steps": steps, **overrides})
    cfg.save.output_dir = overrides.get("save.output_dir")  # unset: the host's Lora folder
    return cfg.to_dict()


def wait_done(client, job_id, timeout=120.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.get(f"{PREFIX}/jobs/{job_id}").json()
        if status["state"] not in ("queued", "running"):
            return status
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish")


def test_schema_presets_and_model(api):
    client, _, host = api
    assert client.get(f"{PREFIX}/schema").json() == TrainConfig.json_schema()
    presets = client.get(f"{PREFIX}/presets").json()
    assert [p["name"] for p in presets] == list(PRESETS)
    first = presets[0]
    assert first["source"] == "builtin"
    assert first["config"] == PRESETS[first["name"]].config.to_dict()
    assert client.get(f"{PREFIX}/model").json() == {
        "family": "sd1",
        "checkpoint": "tiny.safetensors",
        "vae": "Automatic",
        "problem": None,
        "checkpoint_path": str(host.lora_dir.parent / "Stable-diffusion" / "tiny.safetensors"),
        "vae_path": "",
        "prediction_type": "epsilon",
    }


def test_user_presets_are_listed_and_a_broken_one_does_not_hide_the_others(api):
    client, _, host = api
    presets_dir = host.work_dir / "presets"
    presets_dir.mkdir(parents=True)
    (presets_dir / "mine.toml").write_text(TrainConfig().to_toml(description="my preset"))
    (presets_dir / "broken.toml").write_text("[network_arguments]\nnetwork_dim = 'many'\n")
    presets = {p["name"]: p for p in client.get(f"{PREFIX}/presets").json()}
    assert presets["mine"]["source"] == "user"
    assert presets["mine"]["description"] == "my preset"
    assert "error" in presets["broken"]
    assert set(PRESETS) < set(presets)


def test_start_status_list_and_losses(api, tmp_path):
    client, _, host = api
    response = client.post(f"{PREFIX}/jobs", json=body(tmp_path))
    assert response.status_code == 202, response.text
    started = response.json()
    assert started["state"] in ("queued", "running", "done")
    assert "losses" not in started
    status = wait_done(client, started["id"])
    assert status["state"] == "done"
    assert status["step"] == status["total_steps"] == 2
    assert status["output_file"] == str(host.lora_dir / "tiny.safetensors")
    assert status["error"] is None
    assert "losses" not in status
    with_losses = client.get(f"{PREFIX}/jobs/{started['id']}", params={"losses": "true"}).json()
    assert len(with_losses["losses"]) == 2
    listed = client.get(f"{PREFIX}/jobs").json()
    assert [j["id"] for j in listed] == [started["id"]]
    assert "losses" not in listed[0]


def test_busy_then_cancel(api, tmp_path):
    client, _, host = api
    host.lock.acquire()  # a generation holds the GPU: the job waits for it
    try:
        first = client.post(f"{PREFIX}/jobs", json=body(tmp_path, 50))
        assert first.status_code == 202
        busy = client.post(f"{PREFIX}/jobs", json=body(tmp_path))
        assert busy.status_code == 409
        assert "still running" in busy.json()["error"]
        assert busy.json()["field"] is None
        cancelled = client.post(f"{PREFIX}/jobs/{first.json()['id']}/cancel")
        assert cancelled.status_code == 202
        assert cancelled.json()["id"] == first.json()["id"]
    finally:
        host.lock.release()
    status = wait_done(client, first.json()["id"])
    assert status["state"] == "stopped"
    assert status["step"] == 0
    assert status["eta_s"] is None
    assert status["output_file"] is None


def test_preset_with_overrides_and_resume(api, tmp_path):
    client, manager, _ = api
    own = body(tmp_path, 1)
    overrides = {"dataset": own["dataset"], "save": {"output_name": "from_preset"}, "training": {"max_train_steps": 1}}
    response = client.post(f"{PREFIX}/jobs", json={"preset": "quick-test", "config": overrides})
    assert response.status_code == 202, response.text
    job = manager.get(response.json()["id"])
    expected = PRESETS["quick-test"].config.to_dict()
    assert job.config.save.output_name == "from_preset"
    assert job.config.training.max_train_steps == 1
    assert job.config.to_dict()["network"] == expected["network"]  # the rest comes from the preset
    assert not job.resume
    wait_done(client, job.id)
    nothing = client.post(f"{PREFIX}/jobs", json={**body(tmp_path, 1), "resume": True})
    assert nothing.status_code == 422  # no stopped run of that name: refused at the door, not failed later
    assert nothing.json()["field"] == "resume"
    assert "no stopped run of 'tiny'" in nothing.json()["error"]


@pytest.mark.parametrize(
    ("payload", "field", "message"),
    [
        ({"network": {"network_dim": -1}}, "network.network_dim", None),
        ({"netwerk": {}}, "netwerk", "did you mean 'network'"),
        ({"network": {"no_such_setting": 1}}, "network.no_such_setting", None),
        ({"preset": "nope", "config": {}}, "preset", "unknown preset"),
        ({"preset": "quick-test", "config": {"network": {"network_dim": "many"}}}, "network.network_dim", None),
        ({"preset": "quick-test", "network": {}}, "network", "inside 'config'"),
        ({"resume": "yes"}, "resume", "true or false"),
        ([1, 2], "config", "JSON object"),
    ],
)
def test_bad_config_is_422_with_the_field(api, tmp_path, payload, field, message):
    client, manager, _ = api
    if isinstance(payload, dict) and "network" in payload and "preset" not in payload:
        payload = {**body(tmp_path), **payload}
    response = client.post(f"{PREFIX}/jobs", json=payload)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field
    if message:
        assert message in response.json()["error"]
    assert manager.list() == []


def test_invalid_json_and_missing_dataset(api, tmp_path):
    client, _, _ = api
    response = client.post(f"{PREFIX}/jobs", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json() == {
        "error": "the request body is not valid JSON",
        "field": None,
    }
    response = client.post(f"{PREFIX}/jobs", json={"save": {"output_name": "x"}})  # no dataset folder
    assert response.status_code == 422
    assert response.json()["field"].startswith("dataset.")


def test_unknown_job_is_404(api):
    client, _, _ = api
    for response in (client.get(f"{PREFIX}/jobs/job-nope"), client.post(f"{PREFIX}/jobs/job-nope/cancel")):
        assert response.status_code == 404
        assert response.json() == {"error": "no training job 'job-nope'", "field": None}


def test_model_that_cannot_train_is_409_and_no_model_is_503(api, tmp_path, monkeypatch):
    client, manager, host = api
    host.problem = "tiny.safetensors is an SDXL refiner"
    response = client.post(f"{PREFIX}/jobs", json=body(tmp_path))
    assert response.status_code == 409
    assert "refiner" in response.json()["error"]
    original = host.model_info
    monkeypatch.setattr(host, "model_info", lambda: original().__class__(None, "", "", "no model is loaded yet"))
    response = client.post(f"{PREFIX}/jobs", json=body(tmp_path))
    assert response.status_code == 503
    assert "no model" in response.json()["error"]
    assert manager.list() == []


def test_unexpected_errors_are_500_with_one_line(api, monkeypatch):
    client, manager, _ = api

    def broken():
        raise RuntimeError("database exploded\nTraceback (most recent call last): secret details")

    monkeypatch.setattr(manager, "list", broken)
    response = client.get(f"{PREFIX}/jobs")
    assert response.status_code == 500
    assert response.json() == {"error": "internal error: RuntimeError: database exploded", "field": None}


def test_non_finite_numbers_become_null(api, tmp_path):
    client, manager, _ = api
    job_id = client.post(f"{PREFIX}/jobs", json=body(tmp_path, 1)).json()["id"]
    wait_done(client, job_id)
    job = manager.get(job_id)
    job.loss, job.losses = float("nan"), [float("inf"), 0.5]
    status = client.get(f"{PREFIX}/jobs/{job_id}", params={"losses": True}).json()
    assert status["loss"] is None
    assert status["losses"] == [None, 0.5]


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_api_auth_as_the_webui(tmp_path):
    host = FakeHost(tmp_path)
    app = FastAPI()
    mount(app, JobManager(host), auth="alice:secret,bob:hunter2")
    with TestClient(app) as client:
        for headers in ({}, basic("alice", "wrong"), basic("carol", "secret"), {"Authorization": "Bearer x"}):
            response = client.get(f"{PREFIX}/model", headers=headers)
            assert response.status_code == 401
            assert response.headers["www-authenticate"] == "Basic"
            assert response.json() == {"error": "Incorrect username or password", "field": None}
        # checked before the body is read: no hint about the request without credentials
        assert client.post(f"{PREFIX}/jobs", content=b"{bad").status_code == 401
        assert client.get(f"{PREFIX}/model", headers=basic("alice", "secret")).status_code == 200
        assert client.get(f"{PREFIX}/schema", headers=basic("bob", "hunter2")).status_code == 200


def test_parse_credentials_and_config_from_request():
    assert parse_credentials(None) is None
    assert parse_credentials("") is None
    assert parse_credentials("a:b, c:d:e") == {"a": "b", "c": "d:e"}
    assert parse_credentials({"a": "b"}) == {"a": "b"}
    with pytest.raises(ValueError, match="user:password"):
        parse_credentials("nopassword")
    cfg, resume = config_from_request({"network": {"network_dim": 8}, "resume": True})
    assert cfg.network.network_dim == 8
    assert resume
    cfg, resume = config_from_request({"config": {"network": {"network_dim": 4}}})
    assert cfg.network.network_dim == 4
    assert not resume


def test_api_writes_only_under_the_lora_folder(api, tmp_path):
    client, manager, host = api
    outside = tmp_path / "anywhere" / "deep"
    refused = client.post(f"{PREFIX}/jobs", json=body(tmp_path, 1, **{"save.output_dir": str(outside)}))
    assert refused.status_code == 422
    assert refused.json()["field"] == "save.output_dir"
    assert "outside the WebUI's Lora folder" in refused.json()["error"]
    assert "Settings > LoRA Train" in refused.json()["error"]  # what to do
    assert not (tmp_path / "anywhere").exists()
    assert manager.list() == []
    accepted = client.post(f"{PREFIX}/jobs", json=body(tmp_path, 1, **{"save.output_dir": "api/runs"}))
    assert accepted.status_code == 202, accepted.text
    done = wait_done(client, accepted.json()["id"])
    assert done["output_file"] == str(host.lora_dir / "api" / "runs" / "tiny.safetensors")


def test_dataset_and_resume_problems_are_422_with_their_field(api, tmp_path):
    client, manager, _ = api
    unreadable = tmp_path / "unreadable" / "1_x"
    unreadable.mkdir(parents=True)
    (unreadable / "a.png").write_bytes(b"GIF89a but not really")
    (tmp_path / "empty").mkdir()
    for folder in (unreadable.parent, tmp_path / "missing", tmp_path / "empty"):
        response = client.post(f"{PREFIX}/jobs", json=body(tmp_path, 1, **{"dataset.train_data_dir": str(folder)}))
        assert response.status_code == 422
        assert response.json()["field"] == "dataset.train_data_dir"
        assert str(folder) in response.json()["error"]
    first = client.post(f"{PREFIX}/jobs", json=body(tmp_path, 1, **{"save.save_state": True}))
    wait_done(client, first.json()["id"])
    other = client.post(f"{PREFIX}/jobs", json={**body(tmp_path, 1, **{"optim.learning_rate": 0.5}), "resume": True})
    assert other.status_code == 422
    assert other.json()["field"] == "optim.learning_rate"
    assert "differs from the stopped run of 'tiny'" in other.json()["error"]
    assert len(manager.list()) == 1


def test_jobs_of_an_earlier_session_are_listed_and_a_stopped_one_resumes(tmp_path):
    host = FakeHost(tmp_path)
    first = JobManager(host)
    original = host.on_job_progress

    def stop_at_two(job):
        original(job)
        if job.step == 2:
            first.cancel(job.id)

    host.on_job_progress = stop_at_two
    stopped = first.wait(first.start(TrainConfig.from_dict(body(tmp_path, 20))).id, timeout=120)
    assert stopped.state == "stopped"

    manager = JobManager(FakeHost(tmp_path))  # the WebUI restarted
    app = FastAPI()
    mount(app, manager)
    with TestClient(app) as client:
        (listed,) = client.get(f"{PREFIX}/jobs").json()
        assert (listed["id"], listed["state"], listed["restored"], listed["resumable"]) == (
            stopped.id,
            "stopped",
            True,
            True,
        )
        assert listed["output_file"] == stopped.output_file
        assert listed["step"] == 2
        response = client.post(f"{PREFIX}/jobs/{stopped.id}/resume")
        assert response.status_code == 202, response.text
        done = wait_done(client, response.json()["id"])
        assert (done["state"], done["step"], done["output_file"]) == ("done", 20, stopped.output_file)
        again = client.post(f"{PREFIX}/jobs/{done['id']}/resume")
        assert again.status_code == 422
        assert again.json()["field"] == "resume"
        assert client.post(f"{PREFIX}/jobs/nope/resume").status_code == 404
