"""Smoke test of ``bench/bench_networks.py`` with its smallest settings: every algorithm gets a row
whose figures agree with the networks it built."""

from __future__ import annotations

import re

from tests.fixtures.bench import load_bench


def test_bench_networks_prints_a_row_per_algorithm(capsys, monkeypatch):
    bench = load_bench("bench_networks", monkeypatch)
    bench.main(["--steps", "1", "--warmup", "1", "--rounds", "1", "--rank", "2", "--unet-only"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("sd1 tiny 64px batch 1 rank 2 fp32 unet-only on CPU")
    rows = {}
    for line in lines[2:]:
        label, modules, params, ms, ratio, state, saved = line.split()
        rows[label] = (int(modules), int(params.replace(",", "")), float(ms), ratio, float(state), float(saved))
    assert list(rows) == ["lora", "locon", "loha", "lokr", "dora"]
    assert rows["lora"][3] == "1.00x"
    assert all(re.fullmatch(r"\d+\.\d\dx", r[3]) and r[2] > 0 for r in rows.values())
    lora, locon, loha = rows["lora"], rows["locon"], rows["loha"]
    assert lora[0] < locon[0] == loha[0] == rows["lokr"][0] == rows["dora"][0]  # the convolutions too
    assert locon[1] > lora[1]
    assert loha[1] == 2 * locon[1]  # LoHa: two pairs of LoCon's shapes
    assert rows["dora"][1] > locon[1]  # plus the magnitudes
    # AdamW: parameters, gradients and two moments, 4 bytes each
    assert all(abs(r[4] - 16 * r[1] / 2**20) < 0.01 for r in rows.values())
    assert loha[5] > lora[5] > 0  # LoHa holds each layer's full delta weight for the backward pass
