"""The network algorithm registry: names, detection from saved parts, and one-file algorithms end to end."""

import subprocess
import sys

import pytest
import torch
from torch import nn

from lora_trainer.errors import LoraFileError
from lora_trainer.naming import Target
from lora_trainer.networks import network as network_module
from lora_trainer.networks.base import NetworkModule
from lora_trainer.networks.lora import LoRAModule
from lora_trainer.networks.network import LoRANetwork, network_from_weights
from lora_trainer.networks.registry import (
    ALGORITHM_MODULES,
    NETWORK_MODULES,
    algorithm_names,
    detect_algorithm,
    get_algorithm,
    loadable_algorithm,
    register_algorithm,
    unregister_algorithm,
)


class ScaleModule(NetworkModule):
    """A test algorithm: one full matrix ``scale_w`` per module, delta_weight = scale_w * scale (base.delta applies it)."""

    weight_keys = ("scale_w",)

    def __init__(self, target, rank, alpha, *, device=None, dtype=torch.float32, **_dropouts):
        super().__init__(target, rank, alpha, device=device, dtype=dtype)
        self.scale_w = nn.Parameter(torch.zeros(target.out_features, target.in_features, device=device, dtype=dtype))

    @classmethod
    def rank_of(cls, parts):
        return 1

    def delta_weight(self, base_weight=None):
        return self.scale_w * (self.scale * self.multiplier)


@pytest.fixture
def scale_algorithm():
    register_algorithm("scaletest", ScaleModule)
    yield ScaleModule
    unregister_algorithm("scaletest")


def linear_target(module, key="lora_unet_x"):
    return Target(key, module, "x", "unet", "linear", module.in_features, module.out_features)


def test_registry_names_lora_and_its_table_is_torch_free():
    assert "lora" in algorithm_names()
    assert get_algorithm("lora") is LoRAModule
    assert LoRAModule.algorithm == "lora"
    assert set(NETWORK_MODULES.values()) <= set(ALGORITHM_MODULES)
    code = (
        "import sys; import lora_trainer.networks.registry as r; "
        "assert 'torch' not in sys.modules, 'torch imported'; print(sorted(r.NETWORK_MODULES))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "networks.lora" in out.stdout


@pytest.mark.parametrize("name", ["LoRA", "", "1x", "lo-ra", "lo ra", None])
def test_bad_algorithm_names_are_refused(name):
    with pytest.raises(ValueError, match="lower case"):
        register_algorithm(name, ScaleModule)
    assert ScaleModule.algorithm == ""


def test_duplicate_names_and_classes_are_refused(scale_algorithm):
    with pytest.raises(ValueError, match="already registered"):
        register_algorithm("lora", ScaleModule)

    class Other(ScaleModule):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register_algorithm("scaletest", Other)
    with pytest.raises(ValueError, match="already registered as 'scaletest'"):
        register_algorithm("scaletest2", ScaleModule)


def test_non_modules_and_keyless_classes_are_refused():
    with pytest.raises(TypeError, match="not a NetworkModule"):
        register_algorithm("plain", nn.Linear)  # type: ignore[arg-type]

    class NoKeys(NetworkModule):
        pass

    with pytest.raises(TypeError, match="no weight_keys"):
        register_algorithm("nokeys", NoKeys)
    assert "plain" not in algorithm_names()
    assert "nokeys" not in algorithm_names()


def test_unknown_algorithm_names_the_known_ones():
    with pytest.raises(KeyError, match="known: ") as raised:
        get_algorithm("nosuch")
    known = str(raised.value).split("known: ")[1].rstrip(")\"'").split(", ")
    assert {"lora", "loha", "lokr"} <= set(known)


def test_detection_from_parts():
    assert detect_algorithm({"lora_down.weight", "lora_up.weight", "alpha"}) == "lora"
    assert detect_algorithm({"lora_down.weight", "lora_up.weight"}) == "lora"
    assert detect_algorithm({"lora_down.weight", "alpha"}) is None  # incomplete
    assert detect_algorithm({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}) == "loha"
    assert detect_algorithm({"hada_w1_a", "hada_w1_b", "hada_w2_a"}) is None  # incomplete LoHa
    assert loadable_algorithm({"lora_down.weight": 0, "lora_up.weight": 0, "alpha": 0}) == "lora"


def test_unknown_parts_are_reported_not_accepted():
    parts = {"lora_down.weight": 0, "lora_up.weight": 0, "lora_mid.weight": 0, "alpha": 0}
    assert detect_algorithm(parts) == "lora"  # it looks like LoRA ...
    assert LoRAModule.unknown_parts(parts) == ["lora_mid.weight"]  # ... with a part LoRA does not have
    with pytest.raises(LoraFileError, match=r"lora_mid\.weight"):
        loadable_algorithm(parts)
    with pytest.raises(LoraFileError, match="no known network algorithm"):
        loadable_algorithm({"hada_w1_a": 0, "alpha": 0})


@pytest.fixture
def place_on(monkeypatch):
    """network_from_weights over hand-made targets instead of a model's."""

    def place(targets, state):
        monkeypatch.setattr(network_module, "find_targets", lambda *a, **k: targets)
        return network_from_weights(state, "sd1", None, None)

    return place


def test_network_from_weights_leaves_out_modules_with_unknown_parts(place_on):
    layer = nn.Linear(8, 6)
    targets = [linear_target(layer)]
    state = LoRANetwork(targets, rank=2, alpha=1).state_dict()
    network, unplaced = place_on(targets, state)
    assert unplaced == []
    assert set(network.state_dict()) == set(state)
    network, unplaced = place_on(targets, {**state, "lora_unet_x.lora_mid.weight": torch.zeros(2, 2, 3, 3)})
    assert unplaced == ["lora_unet_x"]
    assert not network.state_dict()
    network, unplaced = place_on(targets, {"lora_unet_x.hada_w1_a": torch.zeros(2, 8)})
    assert unplaced == ["lora_unet_x"]
    assert not network.state_dict()


def test_an_algorithm_defined_in_one_place_runs_end_to_end(scale_algorithm, place_on):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 4))
    targets = [linear_target(model[0], "lora_unet_a"), linear_target(model[2], "lora_unet_b")]
    network = LoRANetwork(targets, rank=4, alpha=2, algorithm="scaletest")
    assert network.algorithms() == {"scaletest"}
    assert set(network.state_dict()) == {f"lora_unet_{k}.{p}" for k in "ab" for p in ("scale_w", "alpha")}
    x = torch.randn(3, 8)
    before = model(x)
    with network.applied():
        assert torch.equal(model(x), before)  # zero-initialised: no change
        for m in network.loras():
            m.scale_w.data.normal_()
        first = model[0](x)
        changed = model(x)
        changed.square().sum().backward()
    assert not torch.allclose(changed, before)
    assert all(m.scale_w.grad is not None for m in network.loras())
    assert torch.equal(model(x), before)  # detached again
    with torch.no_grad():
        merged = model[0].weight + next(network.loras()).delta_weight()
    assert torch.allclose(first, nn.functional.linear(x, merged, model[0].bias), atol=1e-5)

    # its saved file is detected by its parts alone and loads back
    loaded, unplaced = place_on(targets, network.state_dict())
    assert unplaced == []
    assert loaded.algorithms() == {"scaletest"}
    for key, value in network.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
