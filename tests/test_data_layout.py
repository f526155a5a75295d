"""One set of dataset rules: training's scan and the workshop read folders the same way."""

import pytest
from PIL import Image

from lora_trainer.data.layout import (
    CAPTION_EXTENSIONS,
    IMAGE_EXTENSIONS,
    WORKSHOP_IMAGE_EXTENSIONS,
    is_hidden_name,
    is_image_file,
    is_workshop_image,
    parse_subset_folder,
    split_subset_folder,
)
from lora_trainer.data.scan import scan_dataset
from lora_trainer.workshop import Workspace
from lora_trainer.workshop.layout import concept_folders, iter_images

# folder name -> (repeats, class tokens) when training uses it as a subset, else None
EDGE_CASES = {
    "10_": (10, ""),  # kohya: 10 repeats, no class tokens
    "0_x": None,  # 0 repeats: skipped
    "10_x": (10, "x"),
    "x": None,  # no repeat count
    "10__x": (10, "_x"),  # only the first "_" separates
    " 10_x": None,  # stricter than kohya's int(): reported, not trained on
    "3_ sks dog ": (3, "sks dog"),
}


@pytest.mark.parametrize(("name", "expected"), EDGE_CASES.items())
def test_subset_folder_rule(name, expected):
    assert parse_subset_folder(name) == expected


def test_split_keeps_zero_repeats_for_the_report():
    assert split_subset_folder("0_x") == (0, "x")
    assert split_subset_folder("x") is None


def test_extension_and_hidden_rules():
    assert set(IMAGE_EXTENSIONS) < set(WORKSHOP_IMAGE_EXTENSIONS)
    assert is_image_file("a.PNG")
    assert not is_image_file("a.tga")
    assert is_workshop_image("a.tga")
    assert CAPTION_EXTENSIONS == (".txt", ".caption")
    assert is_hidden_name(".workshop")
    assert is_hidden_name("__MACOSX")
    assert is_hidden_name("Thumbs.db")


def _fill(folder, names):
    for k, name in enumerate(names):
        sub = folder / name
        sub.mkdir(parents=True)
        Image.new("RGB", (32, 32), (10 * k, 20, 30)).save(sub / "a.png")


def test_training_and_workshop_agree_on_subset_folders(tmp_path):
    ws = Workspace.create(tmp_path, "ws")
    _fill(ws.path, EDGE_CASES)

    items = scan_dataset(ws.path)
    training = {name: (info.repeats, info.class_tokens or "") for name, info in items.report.subsets.items()}
    workshop = {folder.name: (repeats, concept) for folder, repeats, concept in concept_folders(ws.path)}
    expected = {name: parsed for name, parsed in EDGE_CASES.items() if parsed is not None}
    assert training == expected
    assert workshop == expected
    summary = {c.folder: (c.repeats, c.concept, c.images) for c in ws.summary().concepts}
    assert summary == {name: (*parsed, 1) for name, parsed in expected.items()}
    assert sorted(it.path for it in items) == iter_images(ws.path)


def test_import_reads_source_folders_by_the_same_rule(tmp_path):
    src = tmp_path / "src"
    _fill(src, EDGE_CASES)
    ws = Workspace.create(tmp_path / "spaces", "ws")
    report = ws.import_folder(src)
    by_source = {f.source.split("/")[-2]: f.concept_folder for f in report.imported}
    for name, parsed in EDGE_CASES.items():
        repeats = parsed[0] if parsed is not None else 1
        assert by_source[name].split("_", 1)[0] == str(repeats), name
    # a "<N>_" folder without a name sets the repeats; its images take the import's concept
    assert by_source["10_"] == "10_src"
    assert {it.path for it in scan_dataset(ws.path)} == set(iter_images(ws.path))
