"""The stand-in WebUI (``tests.fixtures.fake_webui``) is held to the real WebUI v1.10.1.

(a) Everything the stand-in's ``modules`` package and ``networks`` module define exists in the
real WebUI's recorded surface (``tests/data/a1111_api_surface.json``) with the same signature;
its classes have the real bases, dataclass fields and method signatures; its option keys and
defaults are the real ones; the attributes of ``cmd_opts``, ``model_hijack``, ``shared.state``
and the Lora module's globals exist on the real objects. Names the stand-in adds for the tests
only are listed in ``TEST_CONTROL`` with the reason. ``modules.sd_samplers`` is not in the
recorded surface, so it is not checked.
(b) The stand-in is strict where the WebUI is: processing dataclasses reject unknown fields,
``Options.set`` rejects unknown keys, a frozen WebUI rejects setting changes.
(c) Its prompt handling follows the WebUI's parser and chunking rules (expected values worked
out by hand from those rules).
"""

from __future__ import annotations

import argparse

import pytest
import torch

from tests.fixtures.api_surface import SurfaceChecker, load_surface
from tests.fixtures.fake_webui import FakeWebUI
from tests.fixtures.fake_webui.prompt_parser import parse_prompt_attention
from tests.fixtures.fake_webui.sd_hijack_clip import FrozenCLIPEmbedderWithCustomWords
from tests.fixtures.webui_models import ToyTokenizer

SURFACE = load_surface()

_FAKE = "tests.fixtures.fake_webui"
TEST_CONTROL = {
    f"{_FAKE}.shared_state.State._events": "records begin/end for the job-lifecycle assertions",
    f"{_FAKE}.shared_state.State._devices": "the fake WebUI's devices module, for torch_gc in begin/end",
    f"{_FAKE}.captioning.FakeDeepDanbooru._events": "records start/stop for the captioning assertions",
    f"{_FAKE}.captioning.FakeDeepDanbooru._devices": "the fake WebUI's devices module (start/stop move to it)",
    f"{_FAKE}.captioning.FakeInterrogator._events": "records the BLIP calls for the captioning assertions",
    f"{_FAKE}.sd_hijack_clip.TextConditionalModel._opts": "the options the wrappers read (the WebUI: shared.opts)",
}
"""Names the stand-in adds only for the tests: ``<where>.<name>`` -> why."""


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    return FakeWebUI(tmp_path_factory.mktemp("webui"))


def _checker() -> SurfaceChecker:
    return SurfaceChecker(SURFACE, TEST_CONTROL)


# --------------------------------------------------------------------------------------------
# (a) the surface


def test_every_stand_in_module_has_a_recorded_counterpart(fake):
    modules = fake._modules()
    unrecorded = sorted(name for name in modules if name not in SURFACE and name != "modules")
    assert unrecorded == ["modules.sd_samplers"]


def test_stand_in_modules_match_the_real_surface(fake):
    checker = _checker()
    for name, module in fake._modules().items():
        if name in SURFACE:
            checker.check_module(name, module)
    assert not checker.problems, "\n".join(checker.problems)


def test_live_objects_have_only_real_attributes(fake):
    checker = _checker()
    instances = SURFACE["__instances__"]
    checker.check_instance("shared.cmd_opts", fake.cmd_opts, instances["shared.cmd_opts"]["attrs"], None)
    checker.check_instance(
        "sd_hijack.model_hijack",
        fake.hijack,
        instances["sd_hijack.model_hijack"]["attrs"],
        SURFACE["modules.sd_hijack"]["StableDiffusionModelHijack"],
    )
    fake.state.begin("x")
    fake.state.end()
    checker.check_instance(
        "modules.shared.state (State)",
        fake.state,
        instances["shared.state"]["attrs"],
        SURFACE["modules.shared_state"]["State"],
    )
    assert not checker.problems, "\n".join(checker.problems)


def test_option_keys_and_defaults_are_the_real_ones(fake):
    checker = _checker()
    checker.check_options(fake.opts.data_labels)
    assert not checker.problems, "\n".join(checker.problems)


def test_test_control_names_are_all_in_use(fake):
    """The list stays short: an entry the stand-in no longer needs is an error."""
    checker = _checker()
    for name, module in fake._modules().items():
        if name in SURFACE:
            checker.check_module(name, module)
    fake.state.begin("x")
    fake.state.end()
    checker.check_instance(
        "modules.shared.state (State)",
        fake.state,
        SURFACE["__instances__"]["shared.state"]["attrs"],
        SURFACE["modules.shared_state"]["State"],
    )
    for obj, where, entry in (
        (fake.deepbooru, "modules.deepbooru.model (DeepDanbooru)", SURFACE["modules.deepbooru"]["DeepDanbooru"]),
        (
            fake.interrogator,
            "modules.shared.interrogator (InterrogateModels)",
            SURFACE["modules.interrogate"]["InterrogateModels"],
        ),
    ):
        checker.check_instance(where, obj, None, entry)
    assert not checker.problems, "\n".join(checker.problems)
    assert set(TEST_CONTROL) == checker.used_test_control


def test_the_check_names_what_differs():
    """A stand-in function with a parameter the real one lacks fails, naming the parameter."""
    checker = _checker()

    def load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None, strict=False):
        pass

    module = type(torch)("networks")
    module.load_networks = load_networks
    module.not_in_the_webui = 1
    checker.check_module("networks", module)
    assert any("'strict' does not exist in the real signature" in p for p in checker.problems), checker.problems
    assert any("networks.not_in_the_webui: not in the real networks" in p for p in checker.problems)


# --------------------------------------------------------------------------------------------
# (b) strict where the WebUI is


def test_processing_rejects_unknown_fields_and_ignores_sd_model(fake):
    with fake.installed():
        from modules import processing  # the fake module, only while installed

        with pytest.raises(TypeError, match="no_such_field"):
            processing.StableDiffusionProcessingTxt2Img(prompt="a", no_such_field=1)
        p = processing.StableDiffusionProcessingTxt2Img(sd_model=object(), prompt="a")
        assert p.sd_model is fake.sd_model  # the WebUI's property reads shared.sd_model
        assert (p.denoising_strength, p.override_settings, p.steps) == (0.75, {}, 50)


def test_options_set_rejects_unknown_keys_and_frozen_settings(tmp_path):
    fake = FakeWebUI(tmp_path)
    with pytest.raises(KeyError):
        fake.opts.set("no_such_option", 3)
    assert fake.opts.set("CLIP_stop_at_last_layers", 2)
    assert fake.opts.CLIP_stop_at_last_layers == 2
    fake.cmd_opts.freeze_settings = True
    with pytest.raises(AssertionError, match="changing settings is disabled"):
        fake.opts.set("CLIP_stop_at_last_layers", 3)
    assert isinstance(fake.cmd_opts, argparse.Namespace)


# --------------------------------------------------------------------------------------------
# (c) the prompt, the WebUI's way

_W = 1 / 1.1


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        (
            "a (b:1.5) [c] \\(d\\) BREAK e",
            [["a ", 1.0], ["b", 1.5], [" ", 1.0], ["c", _W], [" (d)", 1.0], ["BREAK", -1], ["e", 1.0]],
        ),
        ("", [["", 1.0]]),
        ("normal text", [["normal text", 1.0]]),
        ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
        ("(unbalanced", [["unbalanced", 1.1]]),
        ("\\(literal\\]", [["(literal]", 1.0]]),
        ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
        ("((a)) [[b]]", [["a", 1.1 * 1.1], [" ", 1.0], ["b", _W * _W]]),
        ("(a:0.5) x)", [["a", 0.5], [" x)", 1.0]]),  # a stray ')' is text
        ("x:y (z:1.2", [["x:y ", 1.0], ["z:1.2", 1.1]]),  # no ')': the weight is text, the '(' still counts
        ("a \\\\ b \\ c", [["a \\ b  c", 1.0]]),  # an escaped backslash stays, a lone one disappears
        ("aBREAKb BREAK", [["aBREAKb", 1.0], ["BREAK", -1], ["", 1.0]]),  # BREAK only as a word
    ],
)
def test_parse_prompt_attention(prompt, expected):
    got = parse_prompt_attention(prompt)
    assert [text for text, _ in got] == [text for text, _ in expected]
    assert [weight for _, weight in got] == pytest.approx([weight for _, weight in expected])


class _Words:
    """A tokenizer stand-in where every word is one token: ``w<n>`` -> n, ``,`` -> 900, others 500."""

    bos_id, eos_id = 998, 999

    def encode(self, text: str) -> list[int]:
        words = text.replace(",", " , ").split()
        return [900 if w == "," else int(w[1:]) if w[1:].isdigit() else 500 for w in words]

    def __call__(self, texts):
        return [self.encode(t) for t in texts]


def _wrapper(**opts) -> FrozenCLIPEmbedderWithCustomWords:
    wrapped = torch.nn.Module()
    wrapped.tokenizer = _Words()
    wrapper = FrozenCLIPEmbedderWithCustomWords(wrapped, None)
    wrapper._opts = argparse.Namespace(
        **{"emphasis": "Original", "comma_padding_backtrack": 20, "use_old_emphasis_implementation": False, **opts}
    )
    return wrapper


def _words(start: int, stop: int) -> str:
    return " ".join(f"w{i}" for i in range(start, stop))


def test_chunks_are_77_ids_with_weights():
    chunks, count = _wrapper().tokenize_line("w1 (w2:1.5) [w3]")
    assert (count, len(chunks)) == (3, 1)
    assert chunks[0].tokens == [998, 1, 2, 3] + [999] * 73
    assert chunks[0].multipliers == pytest.approx([1.0, 1.0, 1.5, _W] + [1.0] * 73)


def test_break_starts_a_new_chunk():
    chunks, count = _wrapper().tokenize_line("w1 BREAK w2")
    assert [c.tokens[:3] for c in chunks] == [[998, 1, 999], [998, 2, 999]]
    assert count == 75 + 1


def test_a_comma_within_20_tokens_moves_the_rest_to_the_next_chunk():
    # 70 words, a comma (token 71), then 10 words: the chunk fills at 75 tokens with the comma
    # 4 from its end, so the 4 words after the comma move to the second chunk
    prompt = f"{_words(1, 71)} , {_words(71, 81)}"
    chunks, count = _wrapper().tokenize_line(prompt)
    assert chunks[0].tokens[1:] == [*range(1, 71), 900, *[999] * 5]
    assert chunks[1].tokens[1:12] == [*range(71, 81), 999]
    assert count == 75 + 10


def test_a_comma_further_back_or_backtrack_off_cuts_at_75():
    far = f"{_words(1, 50)} , {_words(50, 100)}"  # the comma is 25 tokens from the end of the chunk
    chunks, _ = _wrapper().tokenize_line(far)
    assert chunks[0].tokens[1:76] == [*range(1, 50), 900, *range(50, 75)]
    near = f"{_words(1, 71)} , {_words(71, 81)}"
    chunks, _ = _wrapper(comma_padding_backtrack=0).tokenize_line(near)
    assert chunks[0].tokens[1:76] == [*range(1, 71), 900, *range(71, 75)]


def test_emphasis_none_reads_brackets_as_text():
    chunks, _ = _wrapper(emphasis="None").tokenize_line("(w1:1.5)")
    assert chunks[0].multipliers == [1.0] * 77


def test_original_emphasis_scales_tokens_and_restores_the_mean():
    """``process_tokens``: z * weights, then z * (mean before / mean after) over the whole batch."""
    wrapper = _wrapper()
    wrapper.register_parameter("anchor", torch.nn.Parameter(torch.zeros(())))
    z0 = torch.arange(2 * 77 * 3, dtype=torch.float32).reshape(2, 77, 3) + 1
    wrapper.encode_with_transformers = lambda tokens: z0.clone()
    weights = [[1.0] * 77, [1.0, 2.0] + [1.0] * 75]
    z = wrapper.process_tokens([[998] + [1] * 76, [998] + [1] * 76], weights)
    scaled = z0 * torch.tensor(weights)[..., None]
    assert torch.allclose(z, scaled * (z0.mean() / scaled.mean()))
    assert torch.allclose(z.mean(), z0.mean())
    wrapper._opts.emphasis = "No norm"
    assert torch.allclose(wrapper.process_tokens([[998] + [1] * 76] * 2, weights), scaled)


def test_the_toy_tokenizer_has_a_comma_token():
    tok = ToyTokenizer()
    assert tok.encode("a, b")[1:2] == tok.encode(",")
