"""Memory given back after a run: nothing the run built outlives its job, however it ends.

Weak references to the run's network, optimizer, dataset and cached latents must be dead as soon
as the job has ended (done, stopped, failed, out of memory), on the stand-in host and on the
stand-in WebUI, and the job's end collects and empties the device cache (``release_memory``).
"""

from __future__ import annotations

import contextlib
import weakref

import pytest
import torch

from lora_trainer import jobs
from lora_trainer.jobs import JobManager
from lora_trainer.train import loop
from tests.fixtures.fake_webui import FakeWebUI
from tests.fixtures.host import FakeHost
from tests.fixtures.training import make_config

ENDINGS = {"done": "done", "stopped": "stopped", "failed": "failed", "oom": "failed"}


def _spy_on_the_run(monkeypatch) -> dict[str, weakref.ref]:
    """Weak references to what each run builds, taken as its steps end."""
    refs: dict[str, weakref.ref] = {}
    execute = loop._Run.execute

    def spying_execute(self, resume_state):
        refs["run"] = weakref.ref(self)
        try:
            return execute(self, resume_state)
        finally:
            refs["network"] = weakref.ref(self.network)
            refs["optimizer"] = weakref.ref(self.optimizer)
            refs["dataset"] = weakref.ref(self.dataset)
            latents = self.dataset._latents
            assert latents, "the run caches its latents"
            refs["latents"] = weakref.ref(latents[0][0])
            refs["lora_weight"] = weakref.ref(next(iter(self.network.parameters())))

    monkeypatch.setattr(loop._Run, "execute", spying_execute)
    return refs


@contextlib.contextmanager
def _host(kind: str, tmp_path):
    if kind == "stand-in host":
        yield FakeHost(tmp_path)
        return
    fake = FakeWebUI(tmp_path / "webui", "sd1")
    with fake.installed():
        yield fake.backend.host.WebUIHost()


@pytest.mark.parametrize("ending", list(ENDINGS))
@pytest.mark.parametrize("kind", ["stand-in host", "stand-in WebUI"])
def test_nothing_of_the_run_is_alive_after_its_job_ends(tmp_path, monkeypatch, kind, ending):
    refs = _spy_on_the_run(monkeypatch)
    released = []
    release = jobs.release_memory
    monkeypatch.setattr(jobs, "release_memory", lambda exc=None: (released.append(exc), release(exc)))
    with _host(kind, tmp_path) as host:
        manager = JobManager(host)
        progress = host.on_job_progress

        def ending_progress(job):
            progress(job)
            if job.step == 2 and ending == "stopped":
                manager.cancel(job.id)
            if job.step == 2 and ending == "failed":
                raise RuntimeError("injected failure after a step")
            if job.step == 2 and ending == "oom":
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        host.on_job_progress = ending_progress
        cfg = make_config(tmp_path, **{"training.max_train_steps": 4, "network.train_text_encoder": True})
        cfg.save.output_dir = None
        job = manager.wait(manager.start(cfg).id, timeout=120)
        assert job.state == ENDINGS[ending], job.error
        assert not job.thread.is_alive()
        alive = sorted(name for name, ref in refs.items() if ref() is not None)
        assert alive == [], f"still referenced after the job ended: {alive}"
        assert released
        assert released[-1] is None  # the end of every run collects and empties the cache
        assert manager.list() == [job]
