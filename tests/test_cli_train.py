"""`python -m lora_trainer train`: the command end to end on a tiny model (the checkpoint loader replaced
by a TinyAdapter), its messages and exit codes, stop and resume, and `--help` without diffusers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_trainer.__main__ import main
from lora_trainer.backends.checkpoint import command
from lora_trainer.backends.checkpoint.progress import TerminalCallbacks
from lora_trainer.config import TrainConfig
from lora_trainer.files.lora_file import load_lora
from tests.fixtures.training import fixed_eval_loss, make_config, make_dataset
from tests.fixtures.webui_models import TinyAdapter

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).parent.parent


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """A config file (no output folder in it), a stand-in checkpoint file, and the loader replaced."""
    cfg = make_config(tmp_path)
    cfg.save.output_dir = None
    config = tmp_path / "config.toml"
    config.write_text(cfg.to_toml())
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"not read: the loader is replaced")
    calls = []

    def fake_load(path, **kwargs):
        calls.append((Path(path), kwargs))
        return TinyAdapter("sd1")

    monkeypatch.setattr(command, "load_checkpoint", fake_load)
    return tmp_path, config, checkpoint, calls


def _args(tmp_path, config, checkpoint, *extra):
    return ["train", str(config), "--checkpoint", str(checkpoint), "--output-dir", str(tmp_path / "out"), *extra]


def test_train_writes_lora_log_and_config(setup, capsys):
    tmp_path, config, checkpoint, calls = setup
    code = main(_args(tmp_path, config, checkpoint, "--output-name", "cli", "--device", "cpu", "--dtype", "fp32"))
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "Traceback" not in err
    assert calls[0][0] == checkpoint.resolve()
    assert calls[0][1]["device"] == "cpu"

    lora = tmp_path / "out" / "cli.safetensors"
    assert f"wrote {lora}" in out
    state, metadata = load_lora(lora)
    golden = {m["kohya"] for m in json.loads((DATA / "lora_keys_sd1.json").read_text())["modules"]}
    modules = {key.split(".")[0] for key in state}
    assert modules
    assert modules <= golden
    assert metadata["ss_output_name"] == "cli"
    assert all(math.isfinite(float(t.float().abs().sum())) for t in state.values())

    written = tmp_path / "out" / "cli.toml"
    assert f"wrote {written}" in out
    used = TrainConfig.from_toml(written.read_text())
    expected = TrainConfig.from_toml(config.read_text())
    expected.save.output_dir = str((tmp_path / "out").resolve())
    expected.save.output_name = "cli"
    assert used == expected

    logs = list((tmp_path / "out" / ".lora-train" / "logs").glob("cli-*.log"))
    assert len(logs) == 1
    text = logs[0].read_text()
    assert "step 6/6" in text
    assert "[lora_train" in text  # the config
    losses = [float(line.split(" loss ")[1].split()[0]) for line in text.splitlines() if " loss " in line]
    assert len(losses) == 6
    assert all(math.isfinite(x) for x in losses)


def test_missing_config_is_one_error_line(setup, capsys):
    tmp_path, _, checkpoint, _ = setup
    missing = tmp_path / "nope.toml"
    assert main(_args(tmp_path, missing, checkpoint)) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert str(missing) in err
    assert "Traceback" not in err


def test_unknown_key_is_named_unless_ignored(setup, capsys):
    tmp_path, config, checkpoint, calls = setup
    config.write_text(config.read_text() + "\n[lora_train_extra]\nnot_a_setting_xyz = 1\n")
    assert main(_args(tmp_path, config, checkpoint)) == 1
    err = capsys.readouterr().err
    assert "not_a_setting_xyz" in err
    assert "--ignore-unknown" in err
    assert "strict=False" not in err
    assert calls == []  # refused before the checkpoint is loaded

    assert main(_args(tmp_path, config, checkpoint, "--ignore-unknown", "--device", "cpu")) == 0


def test_missing_checkpoint_names_the_path(setup, capsys):
    tmp_path, config, _, calls = setup
    missing = tmp_path / "models" / "absent.safetensors"
    assert main(_args(tmp_path, config, missing)) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert str(missing) in err
    assert "Traceback" not in err
    assert calls == []


def test_no_output_folder_is_an_error(setup, capsys):
    _, config, checkpoint, _ = setup
    assert main(["train", str(config), "--checkpoint", str(checkpoint)]) == 1
    assert "--output-dir" in capsys.readouterr().err


def test_stop_then_resume_continues(setup, monkeypatch, capsys):
    tmp_path, config, checkpoint, _ = setup
    seen = []

    def stop_after_two(self):
        return len(seen) >= 2

    original_on_step = TerminalCallbacks.on_step

    def on_step(self, info):
        seen.append(info.step)
        original_on_step(self, info)

    monkeypatch.setattr(TerminalCallbacks, "should_stop", stop_after_two)
    monkeypatch.setattr(TerminalCallbacks, "on_step", on_step)
    assert main(_args(tmp_path, config, checkpoint, "--device", "cpu")) == 0
    out = capsys.readouterr().out
    assert seen == [1, 2]
    assert "--resume" in out

    monkeypatch.setattr(TerminalCallbacks, "should_stop", lambda self: False)
    seen.clear()
    assert main(_args(tmp_path, config, checkpoint, "--device", "cpu", "--resume")) == 0
    assert seen == [3, 4, 5, 6]
    _, metadata = load_lora(tmp_path / "out" / "tiny.safetensors")
    assert int(metadata["ss_steps"]) == 6


def test_resume_without_a_stopped_run_is_refused(setup, capsys):
    tmp_path, config, checkpoint, calls = setup
    assert main(_args(tmp_path, config, checkpoint, "--resume")) == 1
    assert "no stopped run" in capsys.readouterr().err
    assert calls == []


def test_kohya_toml_names_the_checkpoint(setup, capsys):
    tmp_path, _, checkpoint, calls = setup
    kohya = tmp_path / "kohya.toml"
    data = tmp_path / "data"
    kohya.write_text(
        f'pretrained_model_name_or_path = "{checkpoint}"\nv_parameterization = true\n'
        f'train_data_dir = "{data}"\nresolution = "64,64"\nnetwork_dim = 4\nmax_train_steps = 1\n'
        'mixed_precision = "no"\noutput_name = "k"\n'
    )
    assert main(["train", str(kohya), "--output-dir", str(tmp_path / "out"), "--device", "cpu"]) == 0, (
        capsys.readouterr().err
    )
    assert calls[0][0] == checkpoint.resolve()
    assert calls[0][1]["v_parameterization"] is True
    assert (tmp_path / "out" / "k.safetensors").is_file()


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"]])
def test_help_does_not_import_diffusers(argv):
    code = (
        "import sys, runpy\n"
        f"sys.argv = ['lora_trainer', *{argv!r}]\n"
        "try:\n    runpy.run_module('lora_trainer', run_name='__main__')\n"
        "except SystemExit as e:\n    assert e.code == 0, e.code\n"
        "bad = [m for m in ('diffusers', 'accelerate', 'tqdm') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout
    if argv[0] == "train":
        assert "--checkpoint" in proc.stdout


def test_real_tiny_checkpoint_through_a_subprocess(tmp_path):
    """The whole command on a tiny SD1 checkpoint file in the WebUI's layout: load, train, write."""
    from tests.fixtures.checkpoints import write_tiny_checkpoint

    cfg = make_config(tmp_path)
    cfg.training.max_train_steps = 2
    config = tmp_path / "config.toml"
    config.write_text(cfg.to_toml())
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny-sd1.safetensors", "sd1")
    argv = ["-m", "lora_trainer", "train", str(config), "--checkpoint", str(checkpoint), "--device", "cpu"]
    proc = _run_command([sys.executable, *argv], timeout=240)
    lora = tmp_path / "out" / "tiny.safetensors"
    assert f"wrote {lora}" in proc.stdout
    state, metadata = load_lora(lora)
    golden = {m["kohya"] for m in json.loads((DATA / "lora_keys_sd1.json").read_text())["modules"]}
    modules = {key.split(".")[0] for key in state}
    assert modules
    assert modules <= golden
    assert metadata["ss_steps"] == "2"
    assert all(math.isfinite(float(t.float().abs().sum())) for t in state.values())
    assert TrainConfig.from_toml((tmp_path / "out" / "tiny.toml").read_text()) == cfg


def test_first_interrupt_stops_second_aborts(capsys):
    import signal

    from lora_trainer.backends.checkpoint.progress import StopOnInterrupt

    callbacks = TerminalCallbacks(None)
    before = signal.getsignal(signal.SIGINT)
    with StopOnInterrupt(callbacks) as guard:
        assert signal.getsignal(signal.SIGINT) == guard._handle
        guard._handle(signal.SIGINT, None)
        assert callbacks.should_stop()
        assert "--resume" in capsys.readouterr().err
        with pytest.raises(KeyboardInterrupt):
            guard._handle(signal.SIGINT, None)
    assert signal.getsignal(signal.SIGINT) == before


def _run_command(argv: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    # one thread per process, as in the test process (conftest): OpenMP threads spin on a busy 2-core machine
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return proc


@pytest.mark.slow
@pytest.mark.parametrize(("family", "flags"), [("sd2", ["--v-parameterization"]), ("sdxl", [])])
def test_sd2_v_and_sdxl_checkpoints_train_from_the_command_line(tmp_path, family, flags):
    """The other two families end to end: file in the WebUI's layout -> golden keys, falling loss."""
    from tests.fixtures.checkpoints import write_tiny_checkpoint

    cfg = make_config(tmp_path, **{"training.max_train_steps": 8, "optim.learning_rate": 1e-2})
    config = tmp_path / "config.toml"
    config.write_text(cfg.to_toml())
    checkpoint = write_tiny_checkpoint(tmp_path / f"tiny-{family}.safetensors", family)
    _run_command([sys.executable, "-m", "lora_trainer", "train", str(config), "--checkpoint", str(checkpoint), *flags])
    state, metadata = load_lora(tmp_path / "out" / "tiny.safetensors")
    golden = {m["kohya"] for m in json.loads((DATA / f"lora_keys_{family}.json").read_text())["modules"]}
    modules = {key.split(".")[0] for key in state}
    assert modules <= golden
    groups = {"unet"} | ({"te1", "te2"} if family == "sdxl" else {"te"})
    assert {g for g in groups if any(m.startswith(f"lora_{g}_") for m in modules)} == groups
    assert metadata["ss_v2"] == ("True" if family == "sd2" else "False")
    assert metadata["modelspec.prediction_type"] == ("v" if family == "sd2" else "epsilon")
    log = next((tmp_path / "out" / ".lora-train" / "logs").glob("tiny-*.log")).read_text()
    assert "step 8/8" in log
    # the loss on fixed noise over the training images falls with the file applied to the same checkpoint
    from lora_trainer.backends.checkpoint.loader import load_checkpoint

    adapter = load_checkpoint(checkpoint, v_parameterization=family == "sd2")
    torch.manual_seed(0)  # the VAE samples its latents with the global generator
    before = fixed_eval_loss(adapter, cfg)
    torch.manual_seed(0)
    after = fixed_eval_loss(adapter, cfg, tmp_path / "out" / "tiny.safetensors")
    assert after < before


@pytest.mark.slow
def test_two_processes_through_accelerate_launch_train_as_one_with_the_whole_batch(tmp_path):
    """``accelerate launch`` with 2 processes (gloo on the CPU) x batch 1 == one process x batch 2."""
    from tests.fixtures.checkpoints import write_tiny_checkpoint

    checkpoint = write_tiny_checkpoint(tmp_path / "tiny-sd1.safetensors", "sd1")
    outputs = {}
    for processes, batch in ((1, 2), (2, 1)):
        run = tmp_path / f"p{processes}"
        make_dataset(run / "data", n=3)
        cfg = make_config(
            run,
            **{
                "dataset.train_data_dir": str(run / "data"),
                "training.max_train_steps": 3,
                "training.train_batch_size": batch,
                "optim.max_grad_norm": 0.05,
                "optim.optimizer_args": {"eps": 1.0},  # see test_data_parallel: rounding of tiny gradients
            },
        )
        config = run / "config.toml"
        config.write_text(cfg.to_toml())
        command_args = ["train", str(config), "--checkpoint", str(checkpoint), "--output-dir", str(run / "out")]
        if processes == 1:
            argv = [sys.executable, "-m", "lora_trainer", *command_args]
        else:
            launch = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
            argv = [sys.executable, "-m", "accelerate.commands.launch", *launch, "--dynamo_backend", "no"]
            argv += ["--num_cpu_threads_per_process", "1", "-m", "lora_trainer", *command_args]
        proc = _run_command(argv, timeout=420)
        assert proc.stdout.count("wrote ") == 1 + 1, proc.stdout  # the LoRA and its TOML, from one process
        outputs[processes] = load_lora(run / "out" / "tiny.safetensors")
    (one, meta_one), (two, meta_two) = outputs[1], outputs[2]
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key].float(), one[key].float(), rtol=1e-4, atol=1e-6)
    assert meta_one["ss_total_batch_size"] == meta_two["ss_total_batch_size"] == "2"


def _bad_files(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """(extra arguments, text the error must hold) per broken input, with the real loader."""
    from safetensors.torch import load_file, save_file

    from tests.fixtures.checkpoints import write_tiny_checkpoint

    good = write_tiny_checkpoint(tmp_path / "good.safetensors", "sd1")
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # cut in half: a failed download
    inpainting = tmp_path / "inpainting.safetensors"
    state = load_file(str(good))
    conv_in = state["model.diffusion_model.input_blocks.0.0.weight"]
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.cat([conv_in, conv_in, conv_in[:, :1]], dim=1)
    save_file(state, str(inpainting))
    lora = tmp_path / "a_lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 8)}, str(lora))
    pickled = tmp_path / "old.ckpt"
    pickled.write_bytes(b"never unpickled")
    missing_vae = tmp_path / "vae" / "absent.safetensors"
    return {
        "damaged": (["--checkpoint", str(damaged)], str(damaged)),
        "missing VAE": (["--checkpoint", str(good), "--vae", str(missing_vae)], str(missing_vae)),
        "inpainting model": (["--checkpoint", str(inpainting)], "inpainting"),
        "not a model": (["--checkpoint", str(lora)], "LoRA"),
        "pickled without the flag": (["--checkpoint", str(pickled)], "--allow-pickle"),
    }


@pytest.mark.parametrize(
    "case", ["damaged", "missing VAE", "inpainting model", "not a model", "pickled without the flag"]
)
def test_a_bad_checkpoint_or_vae_is_one_error_line_and_exit_1(tmp_path, case):
    """Through the real loader, in a subprocess: exit code 1, ``error: ...`` naming the file, no traceback."""
    cfg = make_config(tmp_path, **{"training.max_train_steps": 1})
    config = tmp_path / "config.toml"
    config.write_text(cfg.to_toml())
    extra, expected = _bad_files(tmp_path)[case]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "lora_trainer", "train", str(config), *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert expected in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "tiny.safetensors").exists()
