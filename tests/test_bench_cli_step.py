"""Smoke test of ``bench/bench_cli_step.py`` with its smallest settings: both models train and the
figures it prints agree with each other."""

from __future__ import annotations

import re

from tests.fixtures.bench import load_bench


def test_bench_cli_step_prints_both_step_times_and_their_ratio(capsys, monkeypatch):
    bench = load_bench("bench_cli_step", monkeypatch)
    bench.main(["--steps", "1", "--warmup", "1", "--repeats", "1", "--resolution", "64"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("sd1 tiny 64px batch 1 rank 4 fp32 on cpu (1 threads), 1 repeats x 1 steps")
    # the tiny checkpoint's VAE halves, the WebUI-shaped one divides by 8: equal latents at 256 px
    assert (
        lines[1]
        == "  weights: the same seed (UNet and text encoder equal); images 64 px (command line), 256 px (WebUI-shaped)"
    )
    figures = []
    for line, pattern in zip(
        lines[2:5],
        (
            r"  command line \(checkpoint\) : (\d+\.\d{4}) s/step",
            r"  in-WebUI \(WebUI-shaped\)   : (\d+\.\d{4}) s/step",
            r"  ratio command line / WebUI: (\d+\.\d\d)x",
        ),
        strict=True,
    ):
        match = re.fullmatch(pattern, line)
        assert match is not None, line
        figures.append(float(match.group(1)))
    cli, webui, ratio = figures
    assert cli > 0
    assert webui > 0
    assert abs(ratio - cli / webui) <= 0.01 + 0.01 * ratio  # printed figures are rounded
    assert lines[5].startswith("  runs, command line: ")
    assert lines[6].startswith("  runs, WebUI-shaped: ")
