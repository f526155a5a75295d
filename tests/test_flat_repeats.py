"""A flat training folder (no ``N_name`` subfolders) takes its repeats from ``dataset_repeats``."""

from PIL import Image

from lora_trainer.config import parse_toml
from lora_trainer.config.presets import load_preset
from lora_trainer.data.scan import dataset_dirs_info, scan_dataset


def _image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (10, 20, 30)).save(path)


def test_flat_folder_uses_the_given_repeats(tmp_path):
    _image(tmp_path / "flat" / "a.png")
    _image(tmp_path / "flat" / "more" / "b.png")
    assert {it.repeats for it in scan_dataset(tmp_path / "flat")} == {1}
    items = scan_dataset(tmp_path / "flat", flat_repeats=10)
    assert [it.repeats for it in items] == [10, 10]
    assert dataset_dirs_info(items) == {"flat": {"n_repeats": 10, "img_count": 2}}


def test_subset_folders_keep_their_own_repeats(tmp_path):
    _image(tmp_path / "kohya" / "3_thing" / "a.png")
    assert [it.repeats for it in scan_dataset(tmp_path / "kohya", flat_repeats=10)] == [3]


def test_kohya_dataset_repeats_and_the_notebook_preset():
    parsed = parse_toml('train_data_dir = "/data"\ndataset_repeats = 10\n')
    assert parsed.config.dataset.dataset_repeats == 10
    assert "dataset_repeats" not in parsed.ignored
    preset = load_preset("kohya-trainer")
    assert preset.dataset.dataset_repeats == 10
    assert preset.sample.sample_every_n_epochs == 1
    assert preset.sample.sample_prompts
