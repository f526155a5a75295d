import logging
import random

import pytest

from lora_trainer.data import captions as cap
from lora_trainer.errors import DatasetError

CAPTION = "mychar, 1girl, solo, red hair, smile, outdoors, sky"
TAGS = [t.strip() for t in CAPTION.split(",")]


def _tags(caption: str) -> list[str]:
    return [t.strip() for t in caption.split(",") if t.strip()]


# ----------------------------------------------------------------------------- process_caption


def test_no_processing_returns_caption_stripped():
    assert cap.process_caption("  a photo,  of x  ", random.Random(0)) == "a photo,  of x"
    assert cap.process_caption(CAPTION, random.Random(0), keep_tokens=2) == CAPTION


def test_shuffle_keeps_first_tokens_and_permutes_the_rest():
    outs = set()
    for seed in range(30):
        out = _tags(cap.process_caption(CAPTION, random.Random(seed), shuffle=True, keep_tokens=2))
        assert out[:2] == TAGS[:2]
        assert sorted(out[2:]) == sorted(TAGS[2:])
        outs.add(tuple(out))
    assert len(outs) > 10  # it does shuffle


def test_shuffle_is_seeded_and_matches_random_shuffle():
    a = cap.process_caption(CAPTION, random.Random(42), shuffle=True, keep_tokens=1)
    b = cap.process_caption(CAPTION, random.Random(42), shuffle=True, keep_tokens=1)
    assert a == b
    rest = TAGS[1:]
    random.Random(42).shuffle(rest)
    assert a == ", ".join([TAGS[0], *rest])


def test_shuffle_without_keep_tokens_moves_first_tag_sometimes():
    firsts = {_tags(cap.process_caption(CAPTION, random.Random(s), shuffle=True))[0] for s in range(30)}
    assert len(firsts) > 1


def test_tags_are_stripped_and_empties_dropped():
    out = cap.process_caption(" a ,, b ,  , c ,", random.Random(0), shuffle=True, keep_tokens=3)
    assert out == "a, b, c"


@pytest.mark.parametrize("seed", range(5))
def test_caption_dropout_rates_zero_and_one(seed):
    assert cap.process_caption(CAPTION, random.Random(seed), caption_dropout_rate=0.0) == CAPTION
    assert cap.process_caption(CAPTION, random.Random(seed), caption_dropout_rate=1.0) == ""
    assert cap.process_caption(CAPTION, random.Random(seed), drop_caption_this_epoch=True) == ""


def test_caption_dropout_rate_half_drops_about_half():
    rng = random.Random(0)
    dropped = sum(cap.process_caption(CAPTION, rng, caption_dropout_rate=0.5) == "" for _ in range(2000))
    assert 850 < dropped < 1150


def test_tag_dropout_rates_zero_and_one():
    kept = cap.process_caption(CAPTION, random.Random(0), keep_tokens=2, caption_tag_dropout_rate=1.0)
    assert kept == "mychar, 1girl"
    full = cap.process_caption(CAPTION, random.Random(0), keep_tokens=2, caption_tag_dropout_rate=0.0, shuffle=True)
    assert sorted(_tags(full)) == sorted(TAGS)
    none_kept = cap.process_caption(CAPTION, random.Random(0), caption_tag_dropout_rate=1.0)
    assert none_kept == ""


def test_tag_dropout_rate_half_keeps_order_and_fixed_tokens():
    rng = random.Random(3)
    lengths = []
    for _ in range(300):
        out = _tags(cap.process_caption(CAPTION, rng, keep_tokens=1, caption_tag_dropout_rate=0.5))
        assert out[0] == "mychar"
        rest = out[1:]
        assert rest == [t for t in TAGS[1:] if t in rest]  # no shuffle: order kept
        lengths.append(len(rest))
    assert 2.4 < sum(lengths) / len(lengths) < 3.6  # 6 tags * 0.5


def test_keep_tokens_separator():
    caption = "mychar, 1girl ||| solo, smile, sky ||| masterpiece, best quality"
    for seed in range(10):
        out = _tags(
            cap.process_caption(caption, random.Random(seed), shuffle=True, keep_tokens=5, keep_tokens_separator="|||")
        )
        assert out[:2] == ["mychar", "1girl"]
        assert sorted(out[2:5]) == ["sky", "smile", "solo"]
        assert out[5:] == ["masterpiece", "best quality"]
    # the separator is removed even without shuffling
    assert cap.process_caption("a, b ||| c", random.Random(0), keep_tokens_separator="|||") == "a, b, c"
    # a caption without the separator falls back to keep_tokens
    out = _tags(
        cap.process_caption(CAPTION, random.Random(1), shuffle=True, keep_tokens=3, keep_tokens_separator="|||")
    )
    assert out[:3] == TAGS[:3]


def test_custom_separator_is_joined_with_comma_like_kohya():
    out = cap.process_caption("a; b; c", random.Random(0), separator=";", keep_tokens=3, shuffle=True)
    assert out == "a, b, c"


def test_bad_rates_raise():
    with pytest.raises(ValueError, match=r"caption_dropout_rate must be in \[0, 1\], got 1\.5"):
        cap.process_caption(CAPTION, random.Random(0), caption_dropout_rate=1.5)
    with pytest.raises(ValueError, match=r"caption_tag_dropout_rate must be in \[0, 1\], got -0\.1"):
        cap.process_caption(CAPTION, random.Random(0), caption_tag_dropout_rate=-0.1)
    with pytest.raises(ValueError, match=r"keep_tokens must be >= 0, got -1"):
        cap.process_caption(CAPTION, random.Random(0), keep_tokens=-1)


# ----------------------------------------------------------------------------- normalize / frequency


def test_normalize_caption():
    assert cap.normalize_caption("  a   photo\nof  x ,b,,  c  ") == "a photo of x, b, c"
    assert cap.normalize_caption("") == ""
    assert cap.split_tags(" a ,, b ") == ["a", "b"]


def test_tag_frequency_counts():
    freq = cap.tag_frequency(["a, b, c", "b, c", "C , d", ""])
    assert freq == {"a": 1, "b": 2, "c": 3, "d": 1}


def test_tag_frequency_by_dir_and_merge():
    nested = cap.tag_frequency_by_dir({"10_mychar": ["mychar, smile", "mychar"], "1_reg": ["woman"]})
    assert nested == {"10_mychar": {"mychar": 2, "smile": 1}, "1_reg": {"woman": 1}}
    cap.add_tag_frequency(nested, "10_mychar", ["smile, sky"])
    assert nested["10_mychar"] == {"mychar": 2, "smile": 2, "sky": 1}


# ----------------------------------------------------------------------------- caption files


def test_read_caption_file_utf8_with_and_without_bom(tmp_path, lt_caplog):
    p = tmp_path / "a.txt"
    p.write_bytes("\ufeffcafé, 1girl\n".encode())
    assert cap.read_caption_file(p) == "café, 1girl"
    p.write_text("日本語, smile  \n", encoding="utf-8")
    assert cap.read_caption_file(str(p)) == "日本語, smile"
    assert not [r for r in lt_caplog.records if r.levelno >= logging.WARNING]


def test_read_caption_file_falls_back_with_warning(tmp_path, lt_caplog):
    p = tmp_path / "b.txt"
    p.write_bytes("café, naïve\r\n".encode("cp1252"))
    assert cap.read_caption_file(p) == "café, naïve"
    warnings = [r.getMessage() for r in lt_caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "b.txt" in warnings[0]
    assert "cp1252" in warnings[0]

    q = tmp_path / "c.txt"
    q.write_bytes(b"x\x81y")  # undefined in cp1252: latin-1 decodes anything
    assert cap.read_caption_file(q) == "x\x81y"
    assert "latin-1" in lt_caplog.records[-1].getMessage()
    n = len(lt_caplog.records)
    assert cap.read_caption_file(p, warn=False) == "café, naïve"
    assert len(lt_caplog.records) == n


def test_read_caption_file_first_line_empty_and_missing(tmp_path, lt_caplog):
    p = tmp_path / "d.txt"
    p.write_text("first line\nsecond line\n", encoding="utf-8")
    assert cap.read_caption_file(p) == "first line"
    assert "first" in lt_caplog.records[-1].getMessage()
    e = tmp_path / "e.txt"
    e.write_bytes(b"")
    assert cap.read_caption_file(e) == ""
    with pytest.raises(DatasetError):
        cap.read_caption_file(tmp_path / "missing.txt")
