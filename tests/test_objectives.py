import math

import pytest
import torch

from lora_trainer.train import objectives as obj

T = 1000


def _alphas_cumprod_py(n: int = T, beta_start: float = 0.00085, beta_end: float = 0.012) -> list[float]:
    """SD's scaled-linear schedule in plain python floats (independent of torch)."""
    lo, hi = math.sqrt(beta_start), math.sqrt(beta_end)
    out, prod = [], 1.0
    for i in range(n):
        beta = (lo + (hi - lo) * i / (n - 1)) ** 2
        prod *= 1.0 - beta
        out.append(prod)
    return out


AC_PY = _alphas_cumprod_py()


@pytest.fixture(scope="module")
def ac() -> torch.Tensor:
    return obj.scaled_linear_alphas_cumprod()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_scaled_linear_schedule_matches_closed_form(ac):
    assert ac.shape == (T,)
    assert ac.dtype == torch.float32
    assert ac[0].item() == pytest.approx(1 - 0.00085, rel=1e-7)
    expected = torch.tensor(AC_PY, dtype=torch.float64)
    torch.testing.assert_close(ac.double(), expected, rtol=1e-6, atol=0)
    assert ac[-1].item() == pytest.approx(0.0046600, rel=1e-3)  # SD's terminal alphas_cumprod
    assert bool((ac[1:] < ac[:-1]).all())


# ----------------------------------------------------------------------------- timesteps


def test_sample_timesteps_reproducible_and_in_range():
    a = obj.sample_timesteps(64, _gen(1))
    b = obj.sample_timesteps(64, _gen(1))
    c = obj.sample_timesteps(64, _gen(2))
    assert a.dtype == torch.long
    assert a.shape == (64,)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert int(a.min()) >= 0
    assert int(a.max()) < T


def test_sample_timesteps_respects_min_max_exclusive():
    t = obj.sample_timesteps(4000, _gen(0), min_timestep=200, max_timestep=203)
    assert set(t.tolist()) == {200, 201, 202}  # max is exclusive, like torch.randint / kohya
    t = obj.sample_timesteps(5, _gen(0), min_timestep=500, max_timestep=500)
    assert t.tolist() == [500] * 5
    t = obj.sample_timesteps(3, _gen(0), num_train_timesteps=10, max_timestep=None)
    assert int(t.max()) < 10


RANGE_ERROR = r"need 0 <= min_timestep <= max_timestep <= num_train_timesteps"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min_timestep": -1}, RANGE_ERROR),
        ({"min_timestep": 10, "max_timestep": 5}, RANGE_ERROR),
        ({"max_timestep": 1001}, RANGE_ERROR),
        ({"min_timestep": 1000, "max_timestep": 1000}, r"timestep 1000 is out of range for 1000 train timesteps"),
    ],
)
def test_sample_timesteps_rejects_bad_ranges(kwargs, match):
    with pytest.raises(ValueError, match=match):
        obj.sample_timesteps(2, _gen(0), **kwargs)


def test_sample_timesteps_device_argument():
    t = obj.sample_timesteps(3, _gen(0), device="cpu")
    assert t.device.type == "cpu"
    assert torch.equal(t, obj.sample_timesteps(3, _gen(0)))


# ----------------------------------------------------------------------------- noise


def test_sample_noise_reproducible_shape_dtype():
    latents = torch.zeros(2, 4, 8, 8)
    a = obj.sample_noise(latents, _gen(3))
    b = obj.sample_noise(latents, _gen(3))
    assert a.shape == latents.shape
    assert a.dtype == latents.dtype
    assert torch.equal(a, b)
    assert not torch.equal(a, obj.sample_noise(latents, _gen(4)))
    # the seed gives the same numbers whatever the latents' dtype
    h = obj.sample_noise(latents.half(), _gen(3))
    assert h.dtype == torch.float16
    torch.testing.assert_close(h.float(), a.half().float())
    assert 0.8 < a.std().item() < 1.2


def test_noise_offset_adds_per_channel_constant():
    latents = torch.zeros(3, 4, 6, 5)
    base = obj.sample_noise(latents, _gen(5))
    off = obj.sample_noise(latents, _gen(5), noise_offset=0.1)
    diff = off - base
    assert diff.abs().max() > 0
    # constant over H, W for each (sample, channel)
    torch.testing.assert_close(diff, diff[:, :, :1, :1].expand_as(diff))
    # == 0.1 * randn(B, C, 1, 1), drawn right after the base noise
    g = _gen(5)
    torch.randn(latents.shape, generator=g)
    expected = 0.1 * torch.randn((3, 4, 1, 1), generator=g)
    torch.testing.assert_close(diff[:, :, :1, :1], expected)


# ----------------------------------------------------------------------------- q_sample and targets


@pytest.mark.parametrize("t", [0, 1, 250, 500, 999])
def test_add_noise_closed_form_scalars(ac, t):
    x0, n = 0.7, -1.3
    latents = torch.full((1, 1, 1, 1), x0)
    noise = torch.full((1, 1, 1, 1), n)
    out = obj.add_noise(latents, noise, torch.tensor([t]), ac)
    a = AC_PY[t]
    assert out.item() == pytest.approx(math.sqrt(a) * x0 + math.sqrt(1 - a) * n, rel=1e-5, abs=1e-6)


def test_add_noise_per_sample_timesteps(ac):
    latents = torch.randn(3, 4, 2, 2, generator=_gen(0))
    noise = torch.randn(3, 4, 2, 2, generator=_gen(1))
    ts = torch.tensor([10, 500, 990])
    out = obj.add_noise(latents, noise, ts, ac)
    for i, t in enumerate(ts.tolist()):
        a = AC_PY[t]
        torch.testing.assert_close(
            out[i], math.sqrt(a) * latents[i] + math.sqrt(1 - a) * noise[i], rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("t", [0, 333, 999])
def test_v_target_closed_form_scalars(ac, t):
    x0, n = 0.5, 2.0
    latents = torch.full((1, 1, 1, 1), x0)
    noise = torch.full((1, 1, 1, 1), n)
    v = obj.target_for("v_prediction", latents, noise, torch.tensor([t]), ac)
    a = AC_PY[t]
    assert v.item() == pytest.approx(math.sqrt(a) * n - math.sqrt(1 - a) * x0, rel=1e-5, abs=1e-6)


def test_v_target_recovers_x0_and_noise(ac):
    latents = torch.randn(4, 4, 3, 3, generator=_gen(0))
    noise = torch.randn(4, 4, 3, 3, generator=_gen(1))
    ts = torch.tensor([0, 100, 600, 999])
    xt = obj.add_noise(latents, noise, ts, ac)
    v = obj.target_for("v_prediction", latents, noise, ts, ac)
    a = ac[ts].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(a.sqrt() * xt - (1 - a).sqrt() * v, latents, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close((1 - a).sqrt() * xt + a.sqrt() * v, noise, rtol=1e-4, atol=1e-5)


def test_epsilon_target_is_noise_and_unknown_type_raises(ac):
    latents = torch.randn(2, 4, 2, 2, generator=_gen(0))
    noise = torch.randn(2, 4, 2, 2, generator=_gen(1))
    ts = torch.tensor([5, 6])
    assert torch.equal(obj.target_for("epsilon", latents, noise, ts, ac), noise)
    with pytest.raises(ValueError, match="sample"):
        obj.target_for("sample", latents, noise, ts, ac)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_pred_equal_target_gives_zero_loss(ac, prediction_type):
    latents = torch.randn(2, 4, 8, 8, generator=_gen(0))
    noise = obj.sample_noise(latents, _gen(1))
    ts = obj.sample_timesteps(2, _gen(2))
    target = obj.target_for(prediction_type, latents, noise, ts, ac)
    loss = obj.loss_per_sample(target.clone(), target)
    assert loss.shape == (2,)
    assert torch.equal(loss, torch.zeros(2))
    # and a wrong prediction (the other objective's target) does not
    other = "epsilon" if prediction_type == "v_prediction" else "v_prediction"
    wrong = obj.target_for(other, latents, noise, ts, ac)
    assert bool((obj.loss_per_sample(wrong, target) > 0).all())


# ----------------------------------------------------------------------------- loss and min-SNR


def test_loss_per_sample_values_weights_and_dtype():
    pred = torch.zeros(2, 3, 2, 2, dtype=torch.float16)
    target = torch.stack([torch.full((3, 2, 2), 1.0), torch.full((3, 2, 2), 3.0)]).half()
    target[0, 0] = 2.0  # sample 0: four 4s and eight 1s -> mean 2
    loss = obj.loss_per_sample(pred, target)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, torch.tensor([2.0, 9.0]))
    weighted = obj.loss_per_sample(pred, target, torch.tensor([0.5, 2.0]))
    torch.testing.assert_close(weighted, torch.tensor([1.0, 18.0]))
    with pytest.raises(ValueError, match=r"pred shape \(2, 3, 2, 2\) != target shape \(1, 3, 2, 2\)"):
        obj.loss_per_sample(pred, target[:1])
    with pytest.raises(ValueError, match=r"weights shape \(3,\) does not match batch \(2,\)"):
        obj.loss_per_sample(pred, target, torch.ones(3))


def test_snr_closed_form(ac):
    ts = torch.tensor([0, 10, 500, 999])
    s = obj.snr(ts, ac)
    for i, t in enumerate(ts.tolist()):
        a = AC_PY[t]
        assert s[i].item() == pytest.approx(a / (1 - a), rel=1e-4)
    assert s[0].item() == pytest.approx(0.99915 / 0.00085, rel=1e-4)  # 1175.47


def test_min_snr_weights_hand_computed(ac):
    ts = torch.tensor([0, 100, 500, 999])
    gamma = 5.0
    eps = obj.min_snr_weight(ts, ac, gamma, v_prediction=False)
    v = obj.min_snr_weight(ts, ac, gamma, v_prediction=True)
    assert eps.dtype == torch.float32
    assert eps.shape == (4,)
    for i, t in enumerate(ts.tolist()):
        a = AC_PY[t]
        s = a / (1 - a)
        assert eps[i].item() == pytest.approx(min(s, gamma) / s, rel=1e-4)
        assert v[i].item() == pytest.approx(min(s, gamma) / (s + 1), rel=1e-4)
    # t=0: snr = 0.99915/0.00085 = 1175.47 -> 5/1175.47 and 5/1176.47
    assert eps[0].item() == pytest.approx(5 / 1175.4706, rel=1e-4)
    assert v[0].item() == pytest.approx(5 / 1176.4706, rel=1e-4)
    # t=999: snr = 0.00466/0.99534 < gamma -> weight 1 for epsilon, snr/(snr+1) = a for v
    assert eps[3].item() == pytest.approx(1.0)
    assert v[3].item() == pytest.approx(AC_PY[999], rel=1e-4)


def test_min_snr_zero_terminal_snr_and_bad_gamma():
    ac = torch.tensor([0.9, 0.5, 0.0])
    w = obj.min_snr_weight(torch.tensor([0, 1, 2]), ac, 5.0)
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w, torch.tensor([5.0 / 9.0, 1.0, 1.0]))
    torch.testing.assert_close(obj.min_snr_weight(torch.tensor([2]), ac, 5.0, v_prediction=True), torch.tensor([0.0]))
    with pytest.raises(ValueError, match=r"min-SNR gamma must be > 0, got 0\.0"):
        obj.min_snr_weight(torch.tensor([0]), ac, 0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_generator_gives_same_values_on_cuda(ac):
    latents = torch.zeros(2, 4, 8, 8)
    cpu = obj.sample_noise(latents, _gen(7), noise_offset=0.05)
    gpu = obj.sample_noise(latents.cuda(), _gen(7), noise_offset=0.05)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu)
    ts = obj.sample_timesteps(2, _gen(7), device="cuda")
    assert ts.device.type == "cuda"
    xt = obj.add_noise(latents.cuda(), gpu, ts, ac)  # alphas_cumprod on the CPU, latents on the GPU
    torch.testing.assert_close(xt.cpu(), obj.add_noise(latents, cpu, ts.cpu(), ac))
    w = obj.min_snr_weight(ts, ac, 5.0)
    assert w.device.type == "cuda"
