"""SDXL and the WebUI's "Clip skip SDXL" option (``sdxl_clip_l_skip``) while training."""

from __future__ import annotations

import contextlib

import pytest
import torch

from lora_trainer.contracts import SizeCond
from tests.fixtures.fake_webui import FakeWebUI

SIZES = [SizeCond((64, 64), (0, 0), (64, 64))]


@pytest.fixture
def fake(tmp_path):
    with contextlib.ExitStack() as stack:
        webui = FakeWebUI(tmp_path / "webui-sdxl", "sdxl")
        stack.enter_context(webui.installed())
        yield webui


def _webui_conditioning(fake, clip_l_skip: bool, clip_stop: int) -> torch.Tensor:
    """What the WebUI itself conditions on with these two settings."""
    before = dict(fake.opts.data)
    fake.opts.data.update(sdxl_clip_l_skip=clip_l_skip, CLIP_stop_at_last_layers=clip_stop)
    try:
        with torch.no_grad():
            return fake.sd_model.get_learned_conditioning(["a cat"])["crossattn"]
    finally:
        fake.opts.data.clear()
        fake.opts.data.update(before)


def _train_conditioning(fake, clip_skip: int | None) -> tuple[torch.Tensor, dict]:
    """Conditioning in a training session, clip skip chosen as the loop does; the options seen meanwhile."""
    host = fake.backend.host.WebUIHost()
    with host.training_session() as adapter:
        skip = clip_skip or adapter.default_clip_skip
        with torch.no_grad():
            context = adapter.encode_text(["a cat"], clip_skip=skip, size_cond=SIZES).context
        seen = {k: fake.opts.data.get(k) for k in ("sdxl_clip_l_skip", "CLIP_stop_at_last_layers")}
    return context, seen


def test_option_on_does_not_change_training_without_a_config_clip_skip(fake):
    off = _webui_conditioning(fake, False, 1)
    on = _webui_conditioning(fake, True, 1)  # CLIP-L's last layer instead of its penultimate one
    assert not torch.allclose(off, on)

    fake.opts.data.update(sdxl_clip_l_skip=True, CLIP_stop_at_last_layers=1)
    context, seen = _train_conditioning(fake, None)
    assert seen["sdxl_clip_l_skip"] is False
    assert torch.allclose(context, off[:, : context.shape[1]], atol=1e-6)
    assert (fake.opts.sdxl_clip_l_skip, fake.opts.CLIP_stop_at_last_layers) == (True, 1)  # put back


def test_config_clip_skip_makes_clip_l_follow_it_as_the_webui_does(fake):
    context, seen = _train_conditioning(fake, 3)
    assert seen == {"sdxl_clip_l_skip": True, "CLIP_stop_at_last_layers": 3}
    expected = _webui_conditioning(fake, True, 3)
    assert not torch.allclose(expected, _webui_conditioning(fake, False, 1))
    assert torch.allclose(context, expected[:, : context.shape[1]], atol=1e-6)
    assert (fake.opts.sdxl_clip_l_skip, fake.opts.CLIP_stop_at_last_layers) == (False, 1)  # put back

    # clip skip 2 is CLIP-L's own penultimate layer: the same conditioning as no clip skip (and kohya's)
    two, _ = _train_conditioning(fake, 2)
    default, seen = _train_conditioning(fake, None)
    assert seen["sdxl_clip_l_skip"] is False
    assert torch.allclose(two, default, atol=1e-6)
