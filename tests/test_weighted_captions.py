"""Captions are plain text unless ``weighted_captions`` (kohya's meaning), through the WebUI's conditioning.

Without ``weighted_captions`` the adapter makes the WebUI's text wrappers (the stand-in follows
the real WebUI's parser, chunking and textual-inversion lookup) read a caption as its words: the
conditioning equals ``TinyAdapter``'s, which tokenizes the text directly. With it, the caption
goes through the WebUI's prompt syntax exactly as a prompt would. The WebUI's options, its
embedding lookup and its infotext notes are back after every call.
"""

from __future__ import annotations

import random

import pytest
import torch

from lora_trainer.config import TrainConfig, parse_toml
from lora_trainer.contracts import SizeCond
from lora_trainer.data.captions import process_caption, split_tags, unescape_caption
from lora_trainer.train.loop import train
from tests.fixtures.fake_webui import FakeWebUI
from tests.fixtures.fake_webui.textual_inversion import Embedding
from tests.fixtures.training import make_config
from tests.fixtures.webui_models import EmbeddingsWithFixes, TinyAdapter

SYNTAX = [
    "hatsune miku (vocaloid:1.1), [blurry]",
    "1girl, (unbalanced, long hair",
    "a cat BREAK a dog",
]


def _size_cond(family: str, n: int):
    return [SizeCond((64, 64), (0, 0), (64, 64))] * n if family == "sdxl" else None


def _add_embedding(fake: FakeWebUI, name: str, vectors: int = 2) -> Embedding:
    """Register a textual-inversion embedding (random vectors for every text encoder) in the fake WebUI."""
    wrappers = fake.sd_model.conditioner.embedders[:2] if fake.sd_model.is_sdxl else [fake.sd_model.cond_stage_model]
    gen = torch.Generator().manual_seed(1)
    vec = {}
    for wrapper in wrappers:
        table = next(m for m in wrapper.modules() if isinstance(m, EmbeddingsWithFixes))
        vec[table.textual_inversion_key] = torch.randn(vectors, table.wrapped.weight.shape[1], generator=gen)
    emb = Embedding(vec if fake.sd_model.is_sdxl else vec["clip_l"], name)
    emb.vectors = vectors
    fake.embedding_db.register_embedding(emb, fake.sd_model)
    return emb


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_literal_captions_are_their_plain_tokens_and_weighted_ones_the_webui_parse(make_webui, family):
    fake = make_webui(family)
    _add_embedding(fake, "mychar")
    host = fake.backend.host.WebUIHost()
    reference = TinyAdapter(family)  # same weights; tokenizes the text as it is
    captions = [*SYNTAX, "a photo of mychar"]
    size_cond = _size_cond(family, len(captions))
    with host.training_session() as adapter:
        literal = adapter.encode_text(captions, size_cond=size_cond)
        plain = reference.encode_text(captions, size_cond=size_cond)
        assert torch.allclose(literal.context, plain.context, atol=1e-5)
        weighted = adapter.encode_text(captions, size_cond=size_cond, weighted_captions=True)
        if family == "sdxl":
            webui = fake.sd_model.conditioner(adapter._sdxl_batch(captions, size_cond))["crossattn"]
        else:
            webui = fake.sd_model.cond_stage_model(captions)
    assert torch.allclose(weighted.context, webui[:, :77], atol=1e-6)  # the WebUI's own reading
    for row in range(len(captions)):  # emphasis, an open bracket, BREAK, an embedding: each changes it
        assert not torch.allclose(weighted.context[row], literal.context[row], atol=1e-3), captions[row]


def test_escaped_brackets_mean_the_brackets_in_both_modes(make_webui):
    fake = make_webui("sd1")
    host = fake.backend.host.WebUIHost()
    escaped = "hatsune miku \\(vocaloid\\), a\\\\b"
    assert unescape_caption(escaped) == "hatsune miku (vocaloid), a\\b"
    with host.training_session() as adapter:
        literal = adapter.encode_text([unescape_caption(escaped)])
        literal_brackets = adapter.encode_text(["hatsune miku (vocaloid), a\\b"])
        weighted = adapter.encode_text([escaped], weighted_captions=True)
    assert torch.equal(literal.context, literal_brackets.context)
    assert torch.allclose(weighted.context, literal.context, atol=1e-5)  # the WebUI reads \( as "("


def test_webui_state_is_back_after_each_call_even_when_it_fails(make_webui):
    fake = make_webui("sd1")
    _add_embedding(fake, "mychar")
    fake.opts.data["emphasis"] = "No norm"
    old_emphasis = fake.opts.data.get("use_old_emphasis_implementation")
    fake.hijack.extra_generation_params["TI hashes"] = "theirs"
    params = fake.hijack.extra_generation_params
    host = fake.backend.host.WebUIHost()
    wrapper = fake.sd_model.cond_stage_model
    seen = []
    forward = type(wrapper).forward

    def spy(self, texts):
        seen.append((fake.opts.data["emphasis"], fake.opts.data.get("use_old_emphasis_implementation")))
        seen.append(fake.embedding_db.find_embedding_at_position(self.tokenize(["mychar"])[0], 0)[0])
        return forward(self, texts)

    with host.training_session() as adapter:
        wrapper.forward = spy.__get__(wrapper)
        try:
            adapter.encode_text(["(mychar:1.2)"])
            assert seen == [("None", False), None]  # literal for the call
            seen.clear()
            adapter.encode_text(["(mychar:1.2)"], weighted_captions=True)
            assert seen[0] == ("No norm", old_emphasis)  # the user's own reading
            assert seen[1] is not None
            wrapper.forward = lambda texts: (_ for _ in ()).throw(RuntimeError("boom"))
            with pytest.raises(RuntimeError, match="boom"):
                adapter.encode_text(["a cat"])
        finally:
            del wrapper.forward
        # between calls (a preview's txt2img) the WebUI is as the user set it
        assert fake.opts.data["emphasis"] == "No norm"
        assert fake.opts.data.get("use_old_emphasis_implementation") == old_emphasis
        assert "find_embedding_at_position" not in vars(fake.embedding_db)
        assert fake.hijack.extra_generation_params is params
        assert params == {"TI hashes": "theirs"}  # training text leaves no note for the next infotext


def test_stand_in_places_embeddings_as_the_webui_does(make_webui):
    fake = make_webui("sd1")
    emb = _add_embedding(fake, "my char", vectors=3)
    wrapper = fake.sd_model.cond_stage_model
    tok = wrapper.tokenizer
    chunks, count = wrapper.tokenize_line("a my char b")
    assert count == 5
    assert chunks[0].tokens[:6] == [tok.bos_id, *tok.encode("a"), 0, 0, 0, *tok.encode("b")]
    assert [(f.offset, f.embedding) for f in chunks[0].fixes] == [(1, emb)]
    # an embedding that does not fit in the chunk starts the next one
    chunks, _ = wrapper.tokenize_line("w " * 73 + "my char")
    assert len(chunks) == 2
    assert chunks[1].fixes[0].offset == 0
    assert chunks[1].tokens[1:4] == [0, 0, 0]
    fake.opts.data["emphasis"] = "None"  # emphasis "None" skips the parser, not the embeddings
    chunks, _ = wrapper.tokenize_line("(my char:1.3)")
    assert chunks[0].fixes
    assert chunks[0].tokens[1] == tok.encode("(")[0]


# --------------------------------------------------------------------------------------------
# shuffling and tag dropout read tags as the encoder will


def test_weighted_tags_keep_emphasis_groups_together():
    caption = "mychar, (red, blue:1.2), [x, y], \\(a, b\\), tail"
    assert split_tags(caption) == ["mychar", "(red", "blue:1.2)", "[x", "y]", "\\(a", "b\\)", "tail"]
    assert split_tags(caption, weighted=True) == ["mychar", "(red, blue:1.2)", "[x, y]", "\\(a", "b\\)", "tail"]
    assert split_tags("a, (open, rest", weighted=True) == ["a", "(open, rest"]  # the WebUI emphasises the rest
    assert split_tags("a, b), [c, d", weighted=True) == ["a", "b)", "[c, d"]  # a stray ")" is text
    groups = {"(red, blue:1.2)", "[x, y]"}
    for seed in range(20):
        shuffled = process_caption(caption, random.Random(seed), shuffle=True, keep_tokens=1, weighted=True)
        tags = split_tags(shuffled, weighted=True)
        assert tags[0] == "mychar"
        assert groups <= set(tags)
        assert len(tags) == 6
        dropped = process_caption(caption, random.Random(seed), caption_tag_dropout_rate=0.5, weighted=True)
        assert set(split_tags(dropped, weighted=True)) <= set(split_tags(caption, weighted=True))
        assert ("(red" in dropped) == ("blue:1.2)" in dropped)  # a group goes whole or not at all
        assert ("[x" in dropped) == ("y]" in dropped)


def test_weighted_captions_is_kohyas_setting():
    assert TrainConfig().dataset.weighted_captions is False
    parsed = parse_toml("weighted_captions = true\n")
    assert parsed.config.dataset.weighted_captions is True
    assert "weighted_captions" not in parsed.ignored
    cfg = TrainConfig()
    cfg.dataset.weighted_captions = True
    assert TrainConfig.from_toml(cfg.to_toml()).dataset.weighted_captions is True


class _RecordingAdapter(TinyAdapter):
    def __init__(self, family: str):
        super().__init__(family)
        self.calls: list[tuple[list[str], bool]] = []

    def encode_text(self, captions, *, weighted_captions=False, **kwargs):
        self.calls.append((list(captions), weighted_captions))
        return super().encode_text(captions, **kwargs)


@pytest.mark.parametrize("weighted", [False, True])
def test_training_reads_captions_per_the_setting(tmp_path, weighted):
    cfg = make_config(tmp_path, **{"training.max_train_steps": 2, "dataset.weighted_captions": weighted})
    for path in (tmp_path / "data" / "2_subject").glob("*.txt"):
        path.write_text("subject, hatsune miku \\(vocaloid\\), (red, blue:1.2)")
    adapter = _RecordingAdapter("sd1")
    train(cfg, adapter, work_dir=tmp_path / "work")
    assert adapter.calls
    for captions, flag in adapter.calls:
        assert flag is weighted
        # literal: the escapes are the characters; weighted: the WebUI reads them
        expected = "subject, hatsune miku " + ("\\(vocaloid\\)" if weighted else "(vocaloid)") + ", (red, blue:1.2)"
        assert captions == [expected] * len(captions)
