"""LoHa and LoKr: LyCORIS's layout, and what is trained is what the WebUI applies, on every family.

The equivalence tests give a network random non-zero weights (fp16-exact, so saving loses
nothing), record every targeted layer's output with the network attached (the trainer's
forward), save the file with the normal save path (fp16), load it into the stand-in of the
WebUI's builtin Lora extension (``tests/fixtures/fake_webui/network_lyco.py``: the maths of
``network_hada.py``/``network_lokr.py`` and ``finalize_updown``, fused OpenCLIP q/k/v
included) and compare the merged layers' outputs.

The layout table is what LyCORIS's own ``LohaModule``/``LokrModule`` give the same layers.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_trainer.errors import LoraFileError
from lora_trainer.files.lora_file import load_lora
from lora_trainer.naming import Target
from lora_trainer.networks.lokr import LoKrModule, factorization
from lora_trainer.networks.network import network_from_weights, split_modules
from lora_trainer.networks.registry import detect_algorithm, get_algorithm, loadable_algorithm
from tests.fixtures.networks import VARIANTS, outputs, probes, random_network, save
from tests.fixtures.training import make_config
from tests.fixtures.webui_models import TinyAdapter, webui_text_encoders

FP16_EPS = 2.0**-10
MAX_DIFF: dict[tuple[str, str], float] = {}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("label", list(VARIANTS))
def test_trained_forward_equals_what_the_webui_applies(make_webui, family, label):
    algorithm, options = VARIANTS[label]
    fake = make_webui(family)
    network = random_network(fake, algorithm, options)
    kinds = {t.kind for t in network.targets.values()}
    assert {"linear", "conv3x3", "conv1x1"} <= kinds or {"linear", "conv3x3"} <= kinds
    if family == "sd2":
        assert {"mha_q", "mha_k", "mha_v"} <= kinds
    layers = probes(network)
    base = outputs(layers)
    with network.applied():
        trained = outputs(layers)
    assert all(not torch.allclose(trained[n], base[n]) for n in layers)  # every module changes its layer
    path = save(fake, network, label)

    fake.networks.load_networks([label])
    fake.lora.apply_as_a_generation_would(fake.sd_model)
    assert sum(len(n.modules) for n in fake.lora.loaded_networks) == len(network.targets)  # every module placed
    applied = outputs(layers)
    worst = 0.0
    for name, y in trained.items():
        diff = float((applied[name] - y).abs().max())
        assert diff <= 4 * FP16_EPS * max(1.0, float(y.abs().max())), (name, diff)
        worst = max(worst, diff)
    MAX_DIFF[(label, family)] = worst

    state, _ = load_lora(path)
    modules = split_modules(state)
    assert {detect_algorithm(parts) for parts in modules.values()} == {algorithm}
    assert {loadable_algorithm(parts) for parts in modules.values()} == {algorithm}
    loaded, unplaced = network_from_weights(
        state, family, fake.sd_model.model.diffusion_model, webui_text_encoders(fake.sd_model)
    )
    assert unplaced == []
    assert loaded.algorithms() == {algorithm}
    for module in loaded.loras():  # read back, the same delta as trained
        original = getattr(network, module.key)
        assert torch.allclose(module.delta_weight(), original.delta_weight(), atol=1e-6), module.key


def _target(kind: str, in_features: int, out_features: int, kernel: int = 1) -> Target:
    if kind == "linear":
        layer: nn.Module = nn.Linear(in_features, out_features)
    else:
        layer = nn.Conv2d(in_features, out_features, kernel, padding=kernel // 2)
    return Target(
        "lora_unet_x", layer, "x", "unet", kind, in_features, out_features, (kernel, kernel), (1, 1), (kernel // 2,) * 2
    )


# what LyCORIS's LohaModule / LokrModule give these layers: (parts -> shape, saved alpha, scale)
LYCORIS_LAYOUTS = [
    (
        ("loha", ("linear", 96, 64), 4, 2, {}),
        {"hada_w1_a": (64, 4), "hada_w1_b": (4, 96), "hada_w2_a": (64, 4), "hada_w2_b": (4, 96)},
        2.0,
        0.5,
    ),
    (
        ("loha", ("conv3x3", 32, 64, 3), 4, 2, {}),
        {"hada_w1_a": (64, 4), "hada_w1_b": (4, 288), "hada_w2_a": (64, 4), "hada_w2_b": (4, 288)},
        2.0,
        0.5,
    ),
    (
        ("loha", ("conv3x3", 32, 64, 3), 4, 2, {"use_tucker": True}),
        {
            "hada_w1_a": (4, 64),
            "hada_w1_b": (4, 32),
            "hada_w2_a": (4, 64),
            "hada_w2_b": (4, 32),
            "hada_t1": (4, 4, 3, 3),
            "hada_t2": (4, 4, 3, 3),
        },
        2.0,
        0.5,
    ),
    (
        ("loha", ("conv1x1", 32, 64, 1), 4, 2, {"use_tucker": True}),
        {"hada_w1_a": (64, 4), "hada_w1_b": (4, 32), "hada_w2_a": (64, 4), "hada_w2_b": (4, 32)},
        2.0,
        0.5,
    ),
    (("lokr", ("linear", 96, 64), 4, 2, {}), {"lokr_w1": (8, 8), "lokr_w2_a": (8, 4), "lokr_w2_b": (4, 12)}, 2.0, 0.5),
    (
        ("lokr", ("linear", 96, 64), 2, 2, {"factor": 4}),
        {"lokr_w1": (4, 4), "lokr_w2_a": (16, 2), "lokr_w2_b": (2, 24)},
        2.0,
        1.0,
    ),
    (
        ("lokr", ("linear", 1280, 640), 4, 2, {"factor": 8, "decompose_both": True}),
        {"lokr_w1": (8, 8), "lokr_w2_a": (80, 4), "lokr_w2_b": (4, 160)},
        2.0,
        0.5,
    ),
    (("lokr", ("linear", 96, 64), 4, 2, {"full_matrix": True}), {"lokr_w1": (8, 8), "lokr_w2": (8, 12)}, 4.0, 1.0),
    (
        ("lokr", ("conv3x3", 320, 640, 3), 4, 2, {"factor": 8}),
        {"lokr_w1": (8, 8), "lokr_w2_a": (80, 4), "lokr_w2_b": (4, 360)},
        2.0,
        0.5,
    ),
    (
        ("lokr", ("conv3x3", 320, 640, 3), 4, 2, {"factor": 8, "use_tucker": True}),
        {"lokr_w1": (8, 8), "lokr_w2_a": (4, 80), "lokr_w2_b": (4, 40), "lokr_t2": (4, 4, 3, 3)},
        2.0,
        0.5,
    ),
    (("lokr", ("conv3x3", 32, 64, 3), 8, 2, {}), {"lokr_w1": (8, 4), "lokr_w2": (8, 8, 3, 3)}, 8.0, 1.0),
    (
        ("lokr", ("linear", 640, 640), 2, 2, {"factor": 16, "decompose_both": True}),
        {"lokr_w1_a": (16, 2), "lokr_w1_b": (2, 16), "lokr_w2_a": (40, 2), "lokr_w2_b": (2, 40)},
        2.0,
        1.0,
    ),
]


@pytest.mark.parametrize(("spec", "parts", "alpha", "scale"), LYCORIS_LAYOUTS)
def test_keys_and_layout_are_lycoris(spec, parts, alpha, scale):
    algorithm, layer, rank, given_alpha, options = spec
    module = get_algorithm(algorithm)(_target(*layer), rank, given_alpha, **options)
    state = module.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items() if k != "alpha"} == parts
    assert float(state["alpha"]) == alpha
    assert module.scale == scale
    fresh = module.delta_weight()
    assert tuple(fresh.shape) == (layer[2], layer[1], *([layer[3]] * 2 if len(layer) > 3 else []))
    assert not fresh.any()  # LyCORIS's initialisation: a fresh module changes nothing
    assert all(p.any() for name, p in module.named_parameters() if name not in ("hada_w2_a", "lokr_w2", "lokr_w2_b"))


def test_lycoris_factorization():
    # LyCORIS's values: -1 is the split nearest the square root, a factor caps the smaller part
    assert [factorization(d) for d in (320, 640, 768, 1024, 1280, 2048, 360, 127)] == [
        (16, 20),
        (20, 32),
        (24, 32),
        (32, 32),
        (32, 40),
        (32, 64),
        (18, 20),
        (1, 127),
    ]
    assert [factorization(d, 8) for d in (320, 360, 250, 64, 96)] == [(8, 40), (8, 45), (5, 50), (8, 8), (8, 12)]
    assert factorization(250, 4) == (2, 125)


def test_loha_delta_is_the_hadamard_product_by_hand():
    module = get_algorithm("loha")(_target("linear", 6, 4), 2, 1.0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p))
    a, b, c, d = (p.detach() for p in (module.hada_w1_a, module.hada_w1_b, module.hada_w2_a, module.hada_w2_b))
    by_hand = torch.tensor([[float(a[o] @ b[:, i]) * float(c[o] @ d[:, i]) / 2 for i in range(6)] for o in range(4)])
    assert torch.allclose(module.delta_weight(), by_hand, atol=1e-5)
    module.multiplier = 0.5
    assert torch.allclose(module.delta_weight(), by_hand / 2, atol=1e-5)


def test_lokr_delta_is_the_kronecker_product_by_hand():
    module = get_algorithm("lokr")(_target("linear", 6, 4), 1, 1.0, factor=2)
    assert isinstance(module, LoKrModule)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p))
    w1 = module.lokr_w1  # (2, 2)
    w2 = module.lokr_w2_a @ module.lokr_w2_b  # (2, 3)
    by_hand = torch.zeros(4, 6)
    for i in range(2):
        for j in range(2):
            by_hand[2 * i : 2 * i + 2, 3 * j : 3 * j + 3] = w1[i, j] * w2
    assert torch.allclose(module.delta_weight(), by_hand, atol=1e-5)


def test_detection_of_saved_modules():
    loha = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}
    assert detect_algorithm(loha) == "loha"
    assert detect_algorithm(loha | {"hada_t1", "hada_t2"}) == "loha"
    assert detect_algorithm({"lokr_w1", "lokr_w2", "alpha"}) == "lokr"
    assert detect_algorithm({"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}) == "lokr"
    assert detect_algorithm({"lokr_w1", "lokr_w2_a"}) is None  # half a second factor
    assert detect_algorithm({"lokr_w1_a", "lokr_w2"}) is None
    assert detect_algorithm(loha - {"hada_w2_b"}) is None
    with pytest.raises(LoraFileError, match="parts no algorithm knows"):
        loadable_algorithm(loha | {"hada_w3"})


@pytest.mark.parametrize("algorithm", ["loha", "lokr"])
def test_dropouts_only_in_training(algorithm):
    module = get_algorithm(algorithm)(_target("linear", 8, 8), 2, 1.0, rank_dropout=0.5, module_dropout=0.5)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p))
    x = torch.randn(3, 8)
    module.eval()
    reference = module.delta(x)
    assert reference is not None
    assert all(torch.equal(module.delta(x), reference) for _ in range(5))  # type: ignore[arg-type]
    module.train()
    torch.manual_seed(0)
    results = [module.delta(x) for _ in range(20)]
    assert any(r is None for r in results)
    kept = [r for r in results if r is not None]
    assert any(bool(((r == 0).all(0) & (reference != 0).all(0)).any()) for r in kept)  # whole output rows dropped


@pytest.mark.parametrize("algorithm", ["loha", "lokr"])
def test_loss_falls_on_tiny_overfit_task(tmp_path, monkeypatch, algorithm):
    from lora_trainer.config.groups import NetworkConfig
    from lora_trainer.train.loop import train
    from tests.fixtures.training import fixed_eval_loss

    # the settings do not offer the LyCORIS algorithms yet: the run is given one directly
    monkeypatch.setattr(NetworkConfig, "algorithm", property(lambda self: algorithm))
    adapter = TinyAdapter("sd1")
    overrides = {
        "training.max_train_steps": 60,
        "optim.learning_rate": 1e-2,
        "network.conv_dim": 4,
        "network.conv_alpha": 4.0,
    }
    cfg = make_config(tmp_path, **overrides)
    before = fixed_eval_loss(adapter, cfg)
    result = train(cfg, adapter, work_dir=tmp_path / "work")
    state, _ = load_lora(result.output_path)
    assert {detect_algorithm(parts) for parts in split_modules(state).values()} == {algorithm}
    after = fixed_eval_loss(adapter, cfg, result.output_path)
    assert after < 0.8 * before, (before, after)
