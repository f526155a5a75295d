"""LoRA modules and their attachment: maths, dropout, non-destructive apply/remove."""

import pytest
import torch
from torch import nn

from lora_trainer.naming import Target
from lora_trainer.networks.network import LoRANetwork


def linear_target(module, key="lora_unet_x"):
    return Target(key, module, "x", "unet", "linear", module.in_features, module.out_features)


def conv_target(module, key="lora_unet_c"):
    kind = "conv1x1" if tuple(module.kernel_size) == (1, 1) else "conv3x3"
    return Target(
        key,
        module,
        "c",
        "unet",
        kind,
        module.in_channels,
        module.out_channels,
        tuple(module.kernel_size),
        tuple(module.stride),
        tuple(module.padding),
    )


def randomise(network):
    gen = torch.Generator().manual_seed(1)
    for lora in network.loras():
        lora.lora_up.weight.data.normal_(generator=gen)


def test_fresh_network_changes_nothing_and_has_kohya_layout():
    torch.manual_seed(0)
    layer = nn.Linear(8, 6)
    x = torch.randn(3, 8)
    network = LoRANetwork([linear_target(layer)], rank=4, alpha=2)
    with network.applied():
        assert torch.equal(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
    sd = network.state_dict()
    assert set(sd) == {"lora_unet_x.lora_down.weight", "lora_unet_x.lora_up.weight", "lora_unet_x.alpha"}
    assert sd["lora_unet_x.lora_down.weight"].shape == (4, 8)
    assert sd["lora_unet_x.lora_up.weight"].shape == (6, 4)
    assert sd["lora_unet_x.alpha"].shape == ()
    assert sd["lora_unet_x.alpha"].item() == 2.0
    assert not torch.all(sd["lora_unet_x.lora_down.weight"] == 0)


@pytest.mark.parametrize(("alpha", "scale"), [(2.0, 0.5), (None, 1.0), (0, 1.0), (8.0, 2.0)])
def test_alpha_scale_as_kohya(alpha, scale):
    network = LoRANetwork([linear_target(nn.Linear(4, 4))], rank=4, alpha=alpha)
    lora = next(network.loras())
    assert lora.scale == scale
    assert lora.alpha.item() == (alpha or 4)


@pytest.mark.parametrize(
    "layer",
    [nn.Linear(8, 6), nn.Conv2d(8, 6, 1), nn.Conv2d(8, 6, 3, padding=1), nn.Conv2d(8, 6, 3, stride=2, padding=1)],
    ids=["linear", "conv1x1", "conv3x3", "conv3x3-stride2"],
)
def test_hooked_output_equals_merged_weight(layer):
    torch.manual_seed(0)
    target = linear_target(layer) if isinstance(layer, nn.Linear) else conv_target(layer)
    network = LoRANetwork([target], rank=3, alpha=1.5, conv_rank=3, conv_alpha=1.5)
    randomise(network)
    network.eval()
    x = torch.randn(2, 8) if isinstance(layer, nn.Linear) else torch.randn(2, 8, 9, 9)
    with network.applied():
        hooked = layer(x)
    merged = type(layer)(**_ctor_args(layer))
    merged.load_state_dict(layer.state_dict())
    with torch.no_grad():
        merged.weight += next(network.loras()).delta_weight()
    assert torch.allclose(hooked, merged(x), atol=1e-5)
    assert not torch.allclose(hooked, layer(x), atol=1e-3)  # detached again


def _ctor_args(layer):
    if isinstance(layer, nn.Linear):
        return {"in_features": layer.in_features, "out_features": layer.out_features}
    return {
        "in_channels": layer.in_channels,
        "out_channels": layer.out_channels,
        "kernel_size": layer.kernel_size,
        "stride": layer.stride,
        "padding": layer.padding,
    }


def mha_targets(mha, prefix="lora_te_l0"):
    e = mha.embed_dim
    targets = [Target(f"{prefix}_{c}", mha, "attn", "te", f"mha_{c}", e, e) for c in "qkv"]
    return [*targets, Target(f"{prefix}_out", mha.out_proj, "attn.out_proj", "te", "linear", e, e)]


@pytest.mark.parametrize("batch_first", [False, True])
def test_fused_mha_lora_equals_merged_in_proj(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first)
    x = torch.randn(2, 7, 16) if batch_first else torch.randn(7, 2, 16)
    mask = torch.full((7, 7), float("-inf")).triu(1)  # OpenCLIP's causal mask
    network = LoRANetwork(mha_targets(mha), rank=4, alpha=4)
    randomise(network)
    network.eval()
    with network.applied():
        hooked = mha(x, x, x, need_weights=False, attn_mask=mask)[0]
        with_weights = mha(x, x, x, need_weights=True, attn_mask=mask)[0]
    merged = nn.MultiheadAttention(16, 4, batch_first=batch_first)
    merged.load_state_dict(mha.state_dict())
    loras = {m.key[-1]: m for m in network.loras()}
    with torch.no_grad():
        merged.in_proj_weight += torch.cat([loras[c].delta_weight() for c in "qkv"])
        merged.out_proj.weight += loras["t"].delta_weight()
    expected = merged(x, x, x, need_weights=False, attn_mask=mask)[0]
    assert torch.allclose(hooked, expected, atol=1e-5)
    assert torch.allclose(with_weights, expected, atol=1e-5)
    assert "forward" not in mha.__dict__


def test_mha_gradients_reach_qkv_loras():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2)
    network = LoRANetwork(mha_targets(mha), rank=2, alpha=2)
    randomise(network)
    x = torch.randn(5, 3, 8)
    with network.applied():
        mha(x, x, x, need_weights=False)[0].square().sum().backward()
    for lora in network.loras():
        assert lora.lora_down.weight.grad is not None, lora.key
        assert lora.lora_down.weight.grad.abs().sum() > 0, lora.key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_base_tensors_bit_identical_after_training_and_removal(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 4)).to(dtype)
    mha = nn.MultiheadAttention(8, 2).to(dtype)
    before = {k: v.clone() for k, v in [*model.state_dict().items(), *mha.state_dict().items()]}
    targets = [linear_target(model[0], "a"), linear_target(model[2], "b"), *mha_targets(mha)]
    network = LoRANetwork(targets, rank=2, alpha=1)
    assert all(p.dtype == torch.float32 for p in network.parameters())
    opt = torch.optim.SGD(network.parameters(), lr=0.1)
    for p in [*model.parameters(), *mha.parameters()]:
        p.requires_grad_(False)
    x = torch.randn(5, 3, 8, dtype=dtype)
    with network.applied():
        for _ in range(3):
            h = mha(x, x, x, need_weights=False)[0]
            loss = model(h).float().square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    after = [*model.state_dict().items(), *mha.state_dict().items()]
    for k, v in after:
        assert v.dtype == dtype, k
        assert torch.equal(v, before[k]), k
    assert not model[0]._forward_hooks
    assert "forward" not in mha.__dict__
    assert network.state_dict()["a.lora_up.weight"].abs().sum() > 0  # it did train


def test_removed_after_exception_mid_step():
    layer = nn.Linear(4, 4)
    mha = nn.MultiheadAttention(4, 1)
    network = LoRANetwork([linear_target(layer), *mha_targets(mha)], rank=2, alpha=1)

    def step():
        with network.applied():
            layer(torch.randn(1, 4))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        step()
    assert not layer._forward_hooks
    assert "forward" not in mha.__dict__
    assert not network.is_applied


def test_module_dropout_and_rank_dropout_only_in_training():
    torch.manual_seed(0)
    layer = nn.Linear(8, 8)
    network = LoRANetwork([linear_target(layer)], rank=8, alpha=8, module_dropout=0.5, rank_dropout=0.5)
    randomise(network)
    lora = next(network.loras())
    x = torch.randn(64, 8)
    network.eval()
    reference = lora.delta(x)
    assert torch.equal(reference, lora.delta(x))
    network.train()
    outputs = [lora.delta(x) for _ in range(40)]
    assert any(o is None for o in outputs)
    assert any(o is not None for o in outputs)
    kept = [o for o in outputs if o is not None]
    assert not torch.allclose(kept[0], reference)


def test_multiplier_scales_delta():
    layer = nn.Linear(4, 4)
    network = LoRANetwork([linear_target(layer)], rank=2, alpha=2)
    randomise(network)
    network.eval()
    x = torch.randn(2, 4)
    lora = next(network.loras())
    full = lora.delta(x)
    network.set_multiplier(0.5)
    assert torch.allclose(lora.delta(x), full * 0.5)


def test_scale_applied_on_the_rank_wide_activation():
    """The scale multiplies the (B, rank) activation, not the (B, out) output: same values
    (exactly, for a power-of-two scale), and the output comes straight from ``lora_up``."""
    layer = nn.Linear(8, 64)
    network = LoRANetwork([linear_target(layer)], rank=4, alpha=2)  # scale 0.5
    randomise(network)
    network.eval()
    lora = next(network.loras())
    x = torch.randn(3, 8)
    delta = lora.delta(x)
    assert delta is not None
    assert torch.equal(delta, lora.lora_up(lora.lora_down(x)) * 0.5)
    assert delta.grad_fn is not None
    assert delta.grad_fn.name() != "MulBackward0"


def test_conv_target_gets_its_input_in_the_standard_layout():
    """A permuted (channels-last strided) input, as the WebUI's SpatialTransformer gives
    ``proj_out``, reaches the conv contiguous, so its output is in the standard layout too;
    the values are those of the layer on that input plus the delta. Detached, nothing stays."""
    layer = nn.Conv2d(8, 8, 1)
    seen = []
    network = LoRANetwork([conv_target(layer)], rank=2, alpha=2)
    randomise(network)
    network.eval()
    x = torch.randn(2, 4, 4, 8).permute(0, 3, 1, 2)  # (b, c, h, w) view of (b, h, w, c)
    assert not x.is_contiguous()
    lora = next(network.loras())
    with torch.no_grad():
        network.apply_to_model()
        observer = layer.register_forward_pre_hook(lambda _, args: seen.append(args[0].is_contiguous()))
        y = layer(x)
        observer.remove()
        network.remove_from_model()
        expected = layer(x.contiguous()) + lora.delta(x.contiguous())
    assert seen[0] is True
    assert y.is_contiguous()
    assert torch.allclose(y, expected, atol=1e-6)
    assert not layer._forward_pre_hooks
