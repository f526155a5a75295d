"""Advisor numbers, warnings and suggestions."""

from __future__ import annotations

import json
import math

import pytest

from lora_trainer.errors import ConfigError
from lora_trainer.workshop import Workspace, advise
from tests.fixtures.images import pattern, save


def test_numbers_follow_kohya():
    a = advise(20, epochs=10, batch_size=2, repeats=10)
    assert a.samples_per_epoch == 200
    assert a.steps_per_epoch == 100
    assert a.total_steps == 1000
    assert a.steps_per_image == 100
    a = advise(21, epochs=3, batch_size=4, repeats=5)
    assert a.steps_per_epoch == math.ceil(105 / 4) == 27
    assert a.total_steps == 81


def test_good_settings_have_no_warnings():
    a = advise(20, epochs=10, batch_size=1, repeats=10)
    assert a.ok
    assert a.warnings == []
    assert a.suggestions == []
    assert a.total_steps == 2000


@pytest.mark.parametrize(
    ("images", "repeats", "epochs", "batch", "codes"),
    [
        (10, 10, 10, 1, {"too_few_images"}),  # 100 per image, 1000 steps -> also too few steps
        (20, 5, 10, 1, {"too_few_steps_per_image"}),
        (20, 10, 10, 2, {"too_few_total_steps"}),
        (3, 1, 1, 8, {"too_few_images", "batch_larger_than_dataset"}),
    ],
)
def test_warnings(images, repeats, epochs, batch, codes):
    a = advise(images, epochs=epochs, batch_size=batch, repeats=repeats)
    assert codes <= a.warning_codes()
    assert not a.ok
    for w in a.warnings:
        assert w.message
        assert w.code


def test_exact_warning_sets():
    assert advise(20, epochs=10, repeats=5).warning_codes() == {"too_few_steps_per_image", "too_few_total_steps"}
    assert advise(20, epochs=10, repeats=10, batch_size=2).warning_codes() == {"too_few_total_steps"}
    assert advise(10, epochs=15, repeats=10).warning_codes() == {"too_few_images"}


@pytest.mark.parametrize(("images", "repeats", "epochs", "batch"), [(20, 5, 10, 1), (40, 1, 1, 4), (7, 3, 2, 2)])
def test_suggestions_satisfy_the_rules(images, repeats, epochs, batch):
    a = advise(images, epochs=epochs, batch_size=batch, repeats=repeats)
    assert len(a.suggestions) == 2
    same_epochs, same_repeats = a.suggestions
    assert same_epochs.epochs == epochs
    assert same_repeats.repeats == repeats
    for s in a.suggestions:
        b = advise(images, epochs=s.epochs, batch_size=batch, repeats=s.repeats)
        assert not {"too_few_steps_per_image", "too_few_total_steps"} & b.warning_codes()
        assert s.total_steps == b.total_steps
    # minimal: one less would fail
    if same_epochs.repeats > 1:
        c = advise(images, epochs=epochs, batch_size=batch, repeats=same_epochs.repeats - 1)
        assert {"too_few_steps_per_image", "too_few_total_steps"} & c.warning_codes()
    json.dumps(a.to_dict())


def test_several_folders():
    a = advise([(10, 10), (10, 2)], epochs=10)
    assert a.images == 20
    assert a.samples_per_epoch == 120
    assert a.steps_per_image == 60
    assert a.repeats == 6


def test_no_images_and_bad_input():
    assert advise(0, epochs=1).warning_codes() == {"no_images"}
    with pytest.raises(ConfigError):
        advise(10, epochs=0)
    with pytest.raises(ConfigError):
        advise(10, epochs=1, batch_size=0)
    with pytest.raises(ConfigError):
        advise(10, epochs=1, repeats=0)


def test_workspace_advise(tmp_path):
    ws = Workspace.create(tmp_path / "w", "ds")
    for i in range(4):
        save(pattern((8, 8), i), ws.path / "10_a" / f"{i}.png")
    save(pattern((8, 8), 9), ws.path / "3_b" / "x.png")
    a = ws.advise(epochs=5, batch_size=2)
    assert a.images == 5
    assert a.samples_per_epoch == 43
    assert a.steps_per_epoch == 22
    assert a.total_steps == 110
