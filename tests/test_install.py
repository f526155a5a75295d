"""install.py as the WebUI runs it, against a stand-in ``launch`` module: pip only for what is missing."""

from __future__ import annotations

import importlib.util
import re
import runpy
import sys
import types
from pathlib import Path

import pytest

INSTALL_PY = Path(__file__).resolve().parents[1] / "install.py"


def load_install():
    spec = importlib.util.spec_from_file_location("lora_train_install", INSTALL_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeLaunch(types.ModuleType):
    """What install.py uses of the WebUI's ``launch`` module: is_installed, run_pip, args.skip_install."""

    def __init__(self, missing=(), skip_install=False):
        super().__init__("launch")
        self.missing = set(missing)
        self.pip_calls: list[str] = []
        self.checked: list[str] = []
        self.args = types.SimpleNamespace(skip_install=skip_install)

    def is_installed(self, package):
        self.checked.append(package)
        return package not in self.missing

    def run_pip(self, command, desc=None, live=False):
        self.pip_calls.append(command)


VERSIONS = {"toml": "0.10.2", "lion-pytorch": "0.2.5", "prodigyopt": "1.1.2", "bitsandbytes": "0.43.1"}


def run(launch, versions=VERSIONS, cuda=True):
    return load_install().install(launch, version_of=versions.get, has_cuda=lambda: cuda)


def test_all_present_means_no_pip_call():
    launch = FakeLaunch()
    assert run(launch) == []
    assert launch.pip_calls == []
    assert set(launch.checked) == {"toml", "lion_pytorch", "prodigyopt", "bitsandbytes"}


def test_one_missing_means_exactly_that_pip_call():
    launch = FakeLaunch(missing={"prodigyopt"})
    run(launch)
    assert launch.pip_calls == ['install "prodigyopt>=1.0"']


def test_bitsandbytes_only_with_cuda():
    launch = FakeLaunch(missing={"bitsandbytes"})
    run(launch, cuda=False)
    assert launch.pip_calls == []
    run(launch, cuda=True)
    assert launch.pip_calls == ['install "bitsandbytes>=0.41.1"']


def test_older_than_minimum_is_upgraded_newer_is_left_alone():
    launch = FakeLaunch()
    run(launch, versions={**VERSIONS, "lion-pytorch": "0.1.0", "toml": "0.10.10"})
    assert launch.pip_calls == ['install "lion-pytorch>=0.1.2"']  # 0.10.10 > 0.10.2: no call


def test_unknown_version_counts_as_present():
    launch = FakeLaunch()
    run(launch, versions={})
    assert launch.pip_calls == []


def test_skip_install_does_nothing():
    launch = FakeLaunch(missing={"toml", "prodigyopt"}, skip_install=True)
    assert run(launch) == []
    assert launch.pip_calls == []
    assert launch.checked == []


def test_never_touches_the_webui_pins():
    launch = FakeLaunch(missing={"toml", "lion_pytorch", "prodigyopt", "bitsandbytes"})
    run(launch, versions={}, cuda=True)
    assert len(launch.pip_calls) == 4
    for call in launch.pip_calls:
        assert call.startswith("install ")
        assert "--upgrade" not in call
        assert "==" not in call
        for pinned in ("torch", "gradio", "transformers", "numpy"):
            assert pinned not in call.replace("lion-pytorch", "")


def test_a_failed_pip_call_does_not_stop_the_webui(capsys):
    launch = FakeLaunch(missing={"toml", "prodigyopt"})

    def failing(command, desc=None, live=False):
        launch.pip_calls.append(command)
        raise RuntimeError("Couldn't install (offline)")

    launch.run_pip = failing
    run(launch)
    assert len(launch.pip_calls) == 2
    assert "could not install toml>=0.10.2" in capsys.readouterr().err


def test_run_as_the_webui_runs_it(monkeypatch):
    """`python install.py` with the WebUI's launch importable: all present here, so nothing to do."""
    launch = FakeLaunch()
    monkeypatch.setitem(sys.modules, "launch", launch)
    runpy.run_path(str(INSTALL_PY), run_name="__main__")
    assert launch.checked == ["toml", "lion_pytorch", "prodigyopt", "bitsandbytes"]
    assert launch.pip_calls == []


@pytest.mark.parametrize(
    ("text", "expected"), [("0.10.2", (0, 10, 2)), ("1.1.2rc1", (1, 1, 2)), ("2.0.0+cu118", (2, 0, 0))]
)
def test_version_parsing(text, expected):
    assert load_install()._version_tuple(text) == expected


def test_the_command_lines_extra_is_never_installed_into_the_webui():
    """diffusers, accelerate and open-clip-torch (pyproject's ``train`` extra) are for the command line only."""
    import toml

    pyproject = toml.loads((INSTALL_PY.parent / "pyproject.toml").read_text())
    extra = pyproject["project"]["optional-dependencies"]["train"]
    names = {re.split(r"[<>=!\[ ]", req, maxsplit=1)[0].lower() for req in extra} - {"tqdm"}  # tqdm: the WebUI's own
    assert {"diffusers", "accelerate", "open-clip-torch"} <= names
    launch = FakeLaunch(missing={name.replace("-", "_") for name in names} | names)
    run(launch)
    assert launch.pip_calls == []
    assert not {r.dist.lower() for r in load_install().REQUIREMENTS} & names
