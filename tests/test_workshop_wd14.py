"""WD14 tagger pre/post-processing with a fake ONNX session; clear errors without onnxruntime or
the model. Nothing is downloaded."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from lora_trainer.workshop import CaptionerUnavailable, Workspace
from lora_trainer.workshop.wd14 import WD14Captioner, postprocess_probs, preprocess, read_selected_tags
from tests.fixtures.images import save

CSV = """tag_id,name,category,count
9999999,general,9,100
9999998,sensitive,9,100
9999997,questionable,9,100
9999996,explicit,9,100
1,1girl,0,100
2,long_hair,0,100
3,smile,0,100
4,^_^,0,100
5,hatsune_miku,4,100
6,some_character,4,100
"""
PROBS = [0.99, 0.5, 0.1, 0.1, 0.95, 0.40, 0.30, 0.36, 0.90, 0.80]


@pytest.fixture
def tags_file(tmp_path):
    p = tmp_path / "model" / "selected_tags.csv"
    p.parent.mkdir()
    p.write_text(CSV, encoding="utf-8")
    return p


class FakeSession:
    def __init__(self, probs=PROBS, shape=(1, 448, 448, 3)):
        self.probs = np.asarray([probs], dtype=np.float32)
        self.shape = list(shape)
        self.feeds = []

    def get_inputs(self):
        return [SimpleNamespace(name="input_1:0", shape=self.shape)]

    def get_outputs(self):
        return [SimpleNamespace(name="predictions_sigmoid")]

    def run(self, output_names, feed):
        self.feeds.append(feed)
        return [self.probs]


def test_read_selected_tags(tags_file):
    t = read_selected_tags(tags_file)
    assert t.names[4] == "1girl"
    assert len(t.names) == 10
    assert t.rating == (0, 1, 2, 3)
    assert t.general == (4, 5, 6, 7)
    assert t.character == (8, 9)


def test_bad_tag_file(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("a,b\n1,2\n", encoding="utf-8")
    with pytest.raises(CaptionerUnavailable, match="not a WD14 tag list"):
        read_selected_tags(p)


def test_preprocess_pads_resizes_and_swaps_to_bgr():
    img = Image.new("RGB", (200, 100), (255, 0, 0))  # pure red, wide
    x = preprocess(img, 448)
    assert x.shape == (1, 448, 448, 3)
    assert x.dtype == np.float32
    centre = x[0, 224, 224]
    assert centre.tolist() == [0.0, 0.0, 255.0]  # BGR: red is the last channel
    assert x[0, 5, 224].tolist() == [255.0, 255.0, 255.0]  # white padding above
    assert x[0, 443, 224].tolist() == [255.0, 255.0, 255.0]  # and below
    assert x.max() <= 255.0
    assert x.min() >= 0.0


def test_preprocess_transparency_onto_white():
    img = Image.new("RGBA", (10, 10), (0, 0, 255, 0))
    assert preprocess(img, 16)[0, 8, 8].tolist() == [255.0, 255.0, 255.0]


def test_postprocess_thresholds_and_no_ratings(tags_file):
    t = read_selected_tags(tags_file)
    out = postprocess_probs(PROBS, t, general_threshold=0.35, character_threshold=0.85)
    names = [n for n, _ in out]
    assert names == ["1girl", "hatsune_miku", "long_hair", "^_^"]  # best first
    assert not {"general", "sensitive", "questionable", "explicit"} & set(names)
    assert "some_character" not in names  # 0.80 < character threshold
    out = postprocess_probs(PROBS, t, general_threshold=0.2, character_threshold=0.5)
    assert {"smile", "some_character"} <= {n for n, _ in out}
    with pytest.raises(ValueError, match="do not match"):
        postprocess_probs(PROBS[:5], t)


def test_captioner_with_fake_session(tags_file):
    sess = FakeSession()
    wd = WD14Captioner(session=sess, tags=read_selected_tags(tags_file))
    out = wd.caption(Image.new("RGB", (64, 32), (0, 255, 0)))
    assert [n for n, _ in out] == ["1girl", "hatsune_miku", "long_hair", "^_^"]
    [feed] = sess.feeds
    assert list(feed) == ["input_1:0"]
    assert feed["input_1:0"].shape == (1, 448, 448, 3)


def test_captioner_uses_model_input_size(tags_file):
    sess = FakeSession(shape=(1, 384, 384, 3))
    WD14Captioner(session=sess, tags=read_selected_tags(tags_file)).caption(Image.new("RGB", (8, 8)))
    assert sess.feeds[0]["input_1:0"].shape == (1, 384, 384, 3)
    sess = FakeSession(shape=("batch", "h", "w", 3))  # dynamic axes: the default 448
    WD14Captioner(session=sess, tags=read_selected_tags(tags_file)).caption(Image.new("RGB", (8, 8)))
    assert sess.feeds[0]["input_1:0"].shape == (1, 448, 448, 3)


def test_local_model_dir_loads_without_download(tags_file, monkeypatch):
    (tags_file.parent / "model.onnx").write_bytes(b"fake")
    created = {}

    class FakeOrt:
        @staticmethod
        def get_available_providers():
            return ["CPUExecutionProvider"]

        @staticmethod
        def InferenceSession(path, providers=None):
            created["path"], created["providers"] = path, providers
            return FakeSession()

    monkeypatch.setitem(sys.modules, "onnxruntime", FakeOrt)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # would fail if a download were tried
    wd = WD14Captioner(model_dir=tags_file.parent)
    assert wd.caption(Image.new("RGB", (8, 8)))[0][0] == "1girl"
    assert created == {"path": str(tags_file.parent / "model.onnx"), "providers": ["CPUExecutionProvider"]}


def test_missing_onnxruntime_says_what_to_install(tags_file, monkeypatch):
    (tags_file.parent / "model.onnx").write_bytes(b"fake")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    wd = WD14Captioner(model_dir=tags_file.parent)
    with pytest.raises(CaptionerUnavailable, match="pip install onnxruntime"):
        wd.caption(Image.new("RGB", (8, 8)))


def test_download_failure_says_where_to_put_files(tmp_path, monkeypatch):
    calls = []

    def fake_download(repo_id, filename, **kw):
        calls.append((repo_id, filename, kw))
        raise OSError("no network")

    monkeypatch.setitem(sys.modules, "huggingface_hub", SimpleNamespace(hf_hub_download=fake_download))
    model_dir = tmp_path / "wd14"
    wd = WD14Captioner("SmilingWolf/wd-v1-4-moat-tagger-v2", model_dir=model_dir)
    with pytest.raises(CaptionerUnavailable) as e:
        wd.load()
    msg = str(e.value)
    assert "Could not download" in msg
    assert "no network" in msg
    assert str(model_dir) in msg
    assert "model.onnx" in msg
    assert "selected_tags.csv" in msg
    assert "https://huggingface.co/SmilingWolf/wd-v1-4-moat-tagger-v2" in msg
    assert calls[0][:2] == ("SmilingWolf/wd-v1-4-moat-tagger-v2", "model.onnx")


def test_no_hub_package_and_download_off(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(CaptionerUnavailable, match="pip install huggingface_hub"):
        WD14Captioner(model_dir=tmp_path).load()
    with pytest.raises(CaptionerUnavailable, match="downloading is off"):
        WD14Captioner(model_dir=tmp_path, allow_download=False).load()


def test_wd14_in_the_pipeline(tmp_path, tags_file):
    ws = Workspace.create(tmp_path / "w", "ds")
    save(Image.new("RGB", (32, 32), (0, 0, 255)), ws.path / "1_a" / "x.png")
    wd = WD14Captioner(session=FakeSession(), tags=read_selected_tags(tags_file))
    ws.caption(wd, {"mode": "overwrite", "trigger_words": ["miku_lora"], "sort": "alpha"})
    assert (ws.path / "1_a/x.txt").read_text(encoding="utf-8") == "miku_lora, 1girl, ^_^, hatsune miku, long hair"


def test_bad_threshold():
    with pytest.raises(ValueError, match="general threshold"):
        WD14Captioner(general_threshold=1.5)
