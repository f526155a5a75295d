"""Wide convolutions on small CPU feature maps take torch's direct kernel during training only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora_trainer.train import cpu_conv
from lora_trainer.train.cpu_conv import direct_small_convs, takes_direct_kernel
from lora_trainer.train.loop import train
from tests.fixtures.model_state import assert_model_unchanged, model_snapshot
from tests.fixtures.training import make_config
from tests.fixtures.webui_models import TinyAdapter


def _conv(cin: int = 1024, cout: int = 16, **kw) -> nn.Conv2d:
    torch.manual_seed(0)
    return nn.Conv2d(cin, cout, 3, padding=1, **kw)


def test_which_convolutions_take_the_direct_kernel():
    wide, narrow = _conv(1024), _conv(64)
    assert takes_direct_kernel(wide, torch.zeros(1, 1024, 8, 8))
    assert takes_direct_kernel(wide, torch.zeros(2, 1024, 4, 4))
    assert not takes_direct_kernel(wide, torch.zeros(1, 1024, 16, 16))  # oneDNN is faster there
    assert not takes_direct_kernel(narrow, torch.zeros(1, 64, 4, 4))
    assert not takes_direct_kernel(wide, torch.zeros(1, 1024, 8, 8, dtype=torch.float64))
    assert not takes_direct_kernel(_conv(1024, 16, groups=2), torch.zeros(1, 1024, 8, 8))


def test_values_and_gradients_are_torchs_own_direct_kernel_and_forward_is_put_back():
    conv = _conv(1024)
    x = torch.randn(1, 1024, 8, 8, requires_grad=True)
    grad_out = torch.randn(1, 16, 8, 8)
    with torch.backends.mkldnn.flags(enabled=False):  # what F.conv2d runs without oneDNN
        want = F.conv2d(x, conv.weight, conv.bias, 1, 1)
        (want_gx,) = torch.autograd.grad(want, x, grad_out)
    with direct_small_convs(nn.Sequential(conv)) as count:
        assert count == 1
        got = conv(x)
        (got_gx,) = torch.autograd.grad(got, x, grad_out)
    assert torch.equal(got, want)
    assert torch.equal(got_gx, want_gx)
    assert torch.allclose(got, F.conv2d(x, conv.weight, conv.bias, 1, 1), atol=1e-5)  # oneDNN: rounding apart
    assert "forward" not in conv.__dict__


def test_no_grad_calls_and_large_maps_run_the_previous_forward(monkeypatch):
    conv = _conv(1024)
    calls = []
    monkeypatch.setattr(
        cpu_conv, "direct_conv2d", lambda c, x: calls.append(x.shape) or c._conv_forward(x, c.weight, c.bias)
    )
    previous = conv.forward
    conv.forward = lambda input: previous(input) + 0  # an instance forward someone else set
    own = conv.__dict__["forward"]
    with direct_small_convs(conv):
        with torch.no_grad():
            conv(torch.randn(1, 1024, 4, 4))  # a preview: as the host generates
        conv(torch.randn(1, 1024, 32, 32))
        assert calls == []
        conv(torch.randn(1, 1024, 4, 4))
        assert calls == [torch.Size([1, 1024, 4, 4])]
    assert conv.__dict__["forward"] is own


def test_training_takes_it_for_the_run_only_and_trains_the_same(tmp_path, monkeypatch):
    """Every conv of the tiny UNet counts as wide on a small map here; the run's losses match a run
    without the direct kernel and every forward is the model's own afterwards."""
    plain = train(make_config(tmp_path / "a"), TinyAdapter("sd1"), work_dir=tmp_path / "a" / "w")
    monkeypatch.setattr(cpu_conv, "SMALL_MAP", 10**9)
    monkeypatch.setattr(cpu_conv, "WIDE_PATCH", 1)
    direct = cpu_conv.direct_conv2d
    calls = []
    monkeypatch.setattr(cpu_conv, "direct_conv2d", lambda c, x: calls.append(1) or direct(c, x))
    adapter = TinyAdapter("sd1")
    snapshot = model_snapshot(adapter)
    result = train(make_config(tmp_path / "b"), adapter, work_dir=tmp_path / "b" / "w")
    assert calls
    assert result.losses == pytest.approx(plain.losses, rel=1e-4)
    assert_model_unchanged(adapter, snapshot)
    assert not [m for m in adapter.unet.modules() if "forward" in m.__dict__]
