"""What is trained is what the WebUI applies: LoRA, LoCon and DoRA on every family.

Each test gives a network random non-zero weights, records every targeted layer's output with
the network attached (the trainer's forward), saves it with the normal save path, loads it
into the stand-in of the WebUI's builtin Lora extension (whose ``calc_updown`` follows
``network_lora.py`` and ``network.py``: alpha / dim, DoRA's decomposition, the multiplier,
fused q/k/v of OpenCLIP's attention) and compares the outputs of the merged layers.
"""

from __future__ import annotations

import importlib
import itertools
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from lora_trainer.files.lora_file import load_lora
from lora_trainer.naming import find_targets
from lora_trainer.networks.dora import DoRAModule, column_norm, target_weight
from lora_trainer.networks.network import LoRANetwork, network_from_weights, split_modules
from lora_trainer.networks.registry import detect_algorithm, loadable_algorithm
from tests.fixtures.fake_webui import FakeWebUI
from tests.fixtures.fake_webui.lora import golden_table
from tests.fixtures.networks import VARIANTS as LYCO_VARIANTS
from tests.fixtures.networks import outputs, probes, save
from tests.fixtures.networks import random_network as lyco_random_network
from tests.fixtures.training import make_config
from tests.fixtures.webui_models import TinyAdapter, build_webui_model, webui_text_encoders

# algorithm label -> (registered algorithm, conv 3x3 targets too)
ALGORITHMS = {"lora": ("lora", False), "locon": ("lora", True), "dora": ("dora", True)}
FP16_EPS = 2.0**-10


def random_network(fake: FakeWebUI | nn.Module, algorithm: str, conv: bool, seed: int = 3) -> LoRANetwork:
    """A network with random non-zero weights that fp16 holds exactly (so saving loses nothing).

    ``fake`` is the stand-in WebUI, or a tiny model of ``build_webui_model`` itself."""
    sd_model = fake.sd_model if isinstance(fake, FakeWebUI) else fake
    unet, text_encoders = sd_model.model.diffusion_model, webui_text_encoders(sd_model)
    family = "sdxl" if sd_model.is_sdxl else "sd2" if sd_model.is_sd2 else "sd1"
    targets = find_targets(family, unet, text_encoders, conv=conv)
    network = LoRANetwork(targets, rank=4, alpha=2, conv_rank=4, conv_alpha=3, algorithm=algorithm)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for module in network.loras():
            nn.init.normal_(module.lora_up.weight, std=0.2)
            if isinstance(module, DoRAModule):
                module.dora_scale.mul_(1 + 0.3 * torch.randn_like(module.dora_scale))
            for p in module.parameters():
                p.copy_(p.half().float())
    return network


def apply_in_webui(fake: FakeWebUI, name: str, multiplier: float | None = None) -> None:
    if multiplier is None:
        fake.networks.load_networks([name])
    else:
        fake.networks.load_networks([name], te_multipliers=[multiplier], unet_multipliers=[multiplier])
    fake.lora.apply_as_a_generation_would(fake.sd_model)


def compare(trained: dict[str, torch.Tensor], applied: dict[str, torch.Tensor]) -> float:
    """The largest abs difference over all layers; each layer well within fp16 rounding of its output.

    The saved weights are fp16-exact and the tiny models fp32, so only float arithmetic differs.
    """
    worst = 0.0
    for name, y in trained.items():
        diff = float((applied[name] - y).abs().max())
        assert diff <= 0.1 * FP16_EPS * max(1.0, float(y.abs().max())), (name, diff)
        worst = max(worst, diff)
    return worst


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("label", list(ALGORITHMS))
def test_trained_forward_equals_what_the_webui_applies(make_webui, family, label):
    algorithm, conv = ALGORITHMS[label]
    fake = make_webui(family)
    network = random_network(fake, algorithm, conv)
    layers = probes(network)
    base = outputs(layers)
    with network.applied():
        trained = outputs(layers)
    assert all(not torch.allclose(trained[n], base[n]) for n in layers)  # every module changes its layer
    path = save(fake, network, label)

    apply_in_webui(fake, label)
    assert sum(len(n.modules) for n in fake.lora.loaded_networks) == len(network.targets)  # every module placed
    compare(trained, outputs(layers))

    state, _ = load_lora(path)
    modules = split_modules(state)
    assert {detect_algorithm(parts) for parts in modules.values()} == {algorithm}
    if conv:
        assert any(network.targets[k].kind == "conv3x3" for k in modules)


@pytest.mark.parametrize("label", ["lora", "dora"])
def test_multiplier_is_applied_as_the_webui_does(make_webui, label):
    """DoRA at a multiplier m: the WebUI merges m * (W' - W), and so does the trainer."""
    algorithm, conv = ALGORITHMS[label]
    fake = make_webui("sd2")
    network = random_network(fake, algorithm, conv, seed=5)
    network.set_multiplier(0.5)
    layers = probes(network)
    with network.applied():
        trained = outputs(layers)
    save(fake, network, label)
    apply_in_webui(fake, label, multiplier=0.5)
    compare(trained, outputs(layers))


def test_dora_file_layout_and_detection(make_webui):
    fake = make_webui("sd1")
    network = random_network(fake, "dora", conv=True)
    state, _ = load_lora(save(fake, network, "dora"))
    for name, parts in split_modules(state).items():
        target = network.targets[name]
        assert set(parts) == {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"}
        expected = (1, target.in_features) + ((1, 1) if target.is_conv else ())
        assert tuple(parts["dora_scale"].shape) == expected, name
        assert detect_algorithm(parts) == "dora"
        assert loadable_algorithm(parts) == "dora"
        plain = {k: v for k, v in parts.items() if k != "dora_scale"}
        assert detect_algorithm(plain) == "lora"
    loaded, unplaced = network_from_weights(
        state, "sd1", fake.sd_model.model.diffusion_model, webui_text_encoders(fake.sd_model)
    )
    assert unplaced == []
    assert loaded.algorithms() == {"dora"}


def test_fresh_dora_changes_nothing_and_its_magnitude_is_the_input_channel_norm(make_webui):
    fake = make_webui("sd2")
    unet, text_encoders = fake.sd_model.model.diffusion_model, webui_text_encoders(fake.sd_model)
    network = LoRANetwork(
        find_targets("sd2", unet, text_encoders, conv=True), rank=2, alpha=1, conv_rank=2, algorithm="dora"
    )
    layers = probes(network)
    base = outputs(layers)
    with network.applied():
        fresh = outputs(layers)
    assert all(float((fresh[n] - base[n]).abs().max()) < 1e-5 for n in layers)
    conv = next(m for m in network.loras() if network.targets[m.key].kind == "conv3x3")
    weight = network.targets[conv.key].module.weight
    by_hand = torch.stack([weight[:, i].norm() for i in range(weight.shape[1])])
    assert torch.allclose(conv.dora_scale.flatten(), by_hand)
    assert torch.allclose(column_norm(weight).flatten(), by_hand)


def test_dora_refuses_network_dropout(make_webui):
    fake = make_webui("sd1")
    targets = find_targets("sd1", None, webui_text_encoders(fake.sd_model))
    with pytest.raises(ValueError, match="dropout"):
        LoRANetwork(targets, rank=2, alpha=1, dropout=0.1, algorithm="dora")


def test_dora_gradients_reach_magnitude_and_low_rank_parts_not_the_base(make_webui):
    fake = make_webui("sd2")
    network = random_network(fake, "dora", conv=False)
    layers = probes(network)
    network.train()
    with network.applied():
        loss = sum(
            (layer(x, x, x, need_weights=False)[0] if is_mha else layer(x)).square().mean()
            for layer, x, is_mha in layers.values()
        )
        assert isinstance(loss, torch.Tensor)
        loss.backward()
    for module in network.loras():
        for name, p in module.named_parameters():
            assert p.grad is not None, (module.key, name)
            assert bool(p.grad.abs().sum() > 0), (module.key, name)
    module = next(iter(network.loras()))
    base = network.targets[module.key].module.in_proj_weight.chunk(3)[0].detach().clone().requires_grad_(True)
    module.delta_weight(base).sum().backward()
    assert base.grad is None  # the base weight only scales the delta: no gradient reaches it


def test_loss_falls_on_tiny_overfit_task_with_dora(tmp_path, monkeypatch):
    """Trained through ``train()``; the config's ``network_module`` choices do not name DoRA yet,
    so the network config is told the algorithm directly."""
    from lora_trainer.train.loop import train
    from tests.fixtures.training import fixed_eval_loss

    adapter = TinyAdapter("sd1")
    overrides = {"training.max_train_steps": 60, "optim.learning_rate": 6e-3}
    cfg = make_config(tmp_path, **overrides)
    monkeypatch.setattr(type(cfg.network), "algorithm", property(lambda self: "dora"))
    before = fixed_eval_loss(adapter, cfg)
    result = train(cfg, adapter, work_dir=tmp_path / "work")
    state, _ = load_lora(result.output_path)
    assert any(k.endswith(".dora_scale") for k in state)
    after = fixed_eval_loss(adapter, cfg, result.output_path)
    assert after < 0.8 * before, (before, after)


def test_dora_rank_dropout_only_in_training(make_webui):
    fake = make_webui("sd1")
    targets = find_targets("sd1", None, webui_text_encoders(fake.sd_model))[:1]
    network = LoRANetwork(targets, rank=8, alpha=8, rank_dropout=0.5, algorithm="dora")
    module = next(iter(network.loras()))
    nn.init.normal_(module.lora_up.weight, std=0.2)
    weight = network.targets[module.key].module.weight
    module.eval()
    assert torch.equal(module.delta_weight(weight), module.delta_weight(weight))
    module.train()
    torch.manual_seed(0)
    assert not torch.equal(module.delta_weight(weight), module.delta_weight(weight))


WEBUI_DIR = Path(os.environ.get("LORA_TRAINER_WEBUI_DIR", "/tmp/webui-live/webui"))
LORA_EXTENSION = WEBUI_DIR / "extensions-builtin" / "Lora"
REAL_MODULES = ("network", "lyco_helpers", "network_lora", "network_hada", "network_lokr")


@pytest.fixture
def real_network_lora(monkeypatch):
    """The WebUI's own ``network_lora`` module (its ``network.py`` and ``lyco_helpers.py`` too;
    ``network_hada`` and ``network_lokr`` import from the same place while it is active),
    imported from a local WebUI checkout over stub ``modules``; skipped when there is none."""
    if not (LORA_EXTENSION / "network_lora.py").is_file():
        pytest.skip(f"no WebUI checkout at {WEBUI_DIR} (set LORA_TRAINER_WEBUI_DIR)")
    stubs = {name: types.ModuleType(name) for name in ("modules", "modules.models", "modules.models.sd3")}
    stubs["modules.models.sd3.mmdit"] = types.ModuleType("modules.models.sd3.mmdit")
    stubs["modules.models.sd3.mmdit"].QkvLinear = type("QkvLinear", (nn.Linear,), {})
    stubs["modules.devices"] = types.SimpleNamespace(cpu="cpu", device="cpu", dtype=torch.float32)
    for name in ("sd_models", "cache", "errors", "hashes", "shared"):
        stubs[f"modules.{name}"] = types.ModuleType(f"modules.{name}")
    for name, stub in stubs.items():
        monkeypatch.setitem(sys.modules, name, stub)
        parent, _, child = name.rpartition(".")
        if parent:
            monkeypatch.setattr(stubs[parent], child, stub, raising=False)
    for name in REAL_MODULES:
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(str(LORA_EXTENSION))
    try:
        yield importlib.import_module("network_lora"), importlib.import_module("network")
    finally:
        for name in REAL_MODULES:
            sys.modules.pop(name, None)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("label", list(ALGORITHMS))
def test_real_webui_calc_updown_equals_the_trained_delta(tmp_path, real_network_lora, family, label):
    """Each saved module through the WebUI's own ``NetworkModuleLora.calc_updown`` (alpha, DoRA,
    multiplier) gives the merged delta the trainer applies, at multiplier 1 and 0.7."""
    network_lora, network = real_network_lora
    algorithm, conv = ALGORITHMS[label]
    trained = random_network(build_webui_model(family, "tiny"), algorithm, conv)
    state, _ = load_lora(save(tmp_path, trained, label))
    table = golden_table(family)
    for multiplier in (1.0, 0.7):
        trained.set_multiplier(multiplier)
        net = types.SimpleNamespace(te_multiplier=multiplier, unet_multiplier=multiplier, dyn_dim=None)
        for name, parts in split_modules(state).items():
            target = trained.targets[name]
            weights = network.NetworkWeights(name, table[name][1], dict(parts), target.module)
            real = network_lora.NetworkModuleLora(net, weights)
            base = target_weight(target).detach()
            updown, _ = real.calc_updown(base)
            with torch.no_grad():
                ours = getattr(trained, name).delta_weight(base)
            scale = max(1.0, float(ours.abs().max()))
            assert float((updown - ours).abs().max()) <= 0.1 * FP16_EPS * scale, (name, multiplier)


def real_webui_worst_diffs(tmp_path: Path, family: str, label: str) -> dict[torch.dtype, float]:
    """The largest abs difference, per dtype of the saved tensors, between the WebUI's own
    ``calc_updown`` for each saved LoHa/LoKr module (picked by its module types, in the WebUI's
    order) and the trainer's merged delta, at multiplier 1 and 0.7.

    The WebUI keeps these modules' tensors in the file's dtype (fp16 here) and multiplies them in
    it, so its delta is the trained one within fp16 rounding (a few fp16 steps of the delta's
    largest value); given the same tensors in fp32, its maths gives the trained delta to fp32 rounding.
    """
    import network
    import network_hada
    import network_lokr
    import network_lora

    algorithm, options = LYCO_VARIANTS[label]
    expected = {"loha": network_hada.NetworkModuleHada, "lokr": network_lokr.NetworkModuleLokr}[algorithm]
    module_types = [network_lora.ModuleTypeLora(), network_hada.ModuleTypeHada(), network_lokr.ModuleTypeLokr()]
    trained = lyco_random_network(build_webui_model(family, "tiny"), algorithm, options)
    state, _ = load_lora(save(tmp_path, trained, label))
    table = golden_table(family)
    worst = {torch.float16: 0.0, torch.float32: 0.0}
    for (dtype, tolerance), multiplier in itertools.product(
        ((torch.float16, 4 * FP16_EPS), (torch.float32, 2.0**-20)), (1.0, 0.7)
    ):
        trained.set_multiplier(multiplier)
        net = types.SimpleNamespace(te_multiplier=multiplier, unet_multiplier=multiplier, dyn_dim=None)
        for name, parts in split_modules(state).items():
            assert {v.dtype for v in parts.values()} == {torch.float16}  # as saved
            target = trained.targets[name]
            tensors = {k: v.to(dtype) for k, v in parts.items()}
            weights = network.NetworkWeights(name, table[name][1], tensors, target.module)
            real = next(m for t in module_types if (m := t.create_module(net, weights)) is not None)
            assert isinstance(real, expected), name
            base = target_weight(target).detach()
            updown, _ = real.calc_updown(base)
            with torch.no_grad():
                ours = getattr(trained, name).delta_weight(base)
            assert updown.shape == ours.shape, name
            diff = float((updown.float() - ours).abs().max())
            assert diff <= tolerance * max(1.0, float(ours.abs().max())), (name, dtype, multiplier, diff)
            worst[dtype] = max(worst[dtype], diff)
    return worst


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("label", list(LYCO_VARIANTS))
def test_real_webui_calc_updown_equals_the_trained_loha_and_lokr_delta(tmp_path, real_network_lora, family, label):
    """LoHa and LoKr (Tucker, factor, both factors decomposed, full matrix) through the WebUI's own
    ``network_hada.py``/``network_lokr.py``: the merged delta the trainer applies."""
    worst = real_webui_worst_diffs(tmp_path, family, label)
    assert worst[torch.float32] < worst[torch.float16] < 0.1
