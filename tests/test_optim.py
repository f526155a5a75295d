import io
import logging
import math
import re
import sys
import types

import pytest
import torch

from lora_trainer.errors import ConfigError
from lora_trainer.train import optim


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(8, 8, generator=g))
    target = torch.randn(8, 8, generator=g)
    return w, target


def _train(opt, w, target, steps=30):
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = ((w - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _sgd_opt(lr=1.0):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)


# ----------------------------------------------------------------------------- optimizers


@pytest.mark.parametrize(
    ("name", "lr", "args", "factor"),
    [
        ("AdamW", 0.1, None, 0.1),
        ("adamw", 0.1, "betas=(0.9, 0.99) weight_decay=0.0", 0.1),
        ("Lion", 0.02, None, 0.7),
        ("Prodigy", 1.0, None, 0.2),
        ("Adafactor", 0.1, "relative_step=False", 0.1),
        ("Adafactor", None, None, 0.9),  # relative_step: its own step size
    ],
)
def test_optimizer_lowers_quadratic_loss(name, lr, args, factor):
    w, target = _problem()
    opt = optim.build_optimizer(name, [w], lr, args)
    losses = _train(opt, w, target)
    assert losses[-1] < losses[0] * factor, (name, losses[0], losses[-1])


def test_optimizer_types_are_the_libraries():
    from lion_pytorch import Lion
    from prodigyopt import Prodigy
    from transformers.optimization import Adafactor

    w, _ = _problem()
    assert type(optim.build_optimizer("AdamW", [w], 1e-3)) is torch.optim.AdamW
    assert isinstance(optim.build_optimizer("LION", [w], 1e-4), Lion)
    assert isinstance(optim.build_optimizer("prodigy", [w], 1.0), Prodigy)
    assert isinstance(optim.build_optimizer("Adafactor", [w], 1e-3), Adafactor)


def test_unknown_optimizer_lists_allowed_names():
    w, _ = _problem()
    with pytest.raises(ConfigError) as ei:
        optim.build_optimizer("SGDNesterov", [w], 1e-3)
    assert ei.value.field == "optim.optimizer_type"
    for name in optim.OPTIMIZER_TYPES:
        assert name in ei.value.message


def _adamw8bit_builds() -> bool:
    """Whether ``build_optimizer`` gives an AdamW8bit here (False: it raised ConfigError; anything else propagates)."""
    w, _ = _problem()
    try:
        optim.build_optimizer("AdamW8bit", [w], 0.05)
    except ConfigError:
        return False
    return True


def test_adamw8bit_works_or_raises_clear_error():
    w, target = _problem()
    if _adamw8bit_builds():
        losses = _train(optim.build_optimizer("AdamW8bit", [w], 0.05), w, target)
        assert losses[-1] < losses[0]
        return
    with pytest.raises(ConfigError) as ei:
        optim.build_optimizer("AdamW8bit", [w], 0.05)
    e = ei.value
    assert e.field == "optim.optimizer_type"
    assert "bitsandbytes" in e.message
    assert re.search(r"\bAdamW\b(?!8bit)", e.message), e.message  # suggests plain AdamW
    if not torch.cuda.is_available():
        assert "CUDA" in e.message or "could not be imported" in e.message


def _fake_bnb(step_error: Exception | None):
    class FakeAdamW8bit(torch.optim.AdamW):
        def step(self, closure=None):
            if step_error is not None:
                raise step_error
            return super().step(closure)

    mod = types.ModuleType("bitsandbytes")
    mod.optim = types.SimpleNamespace(AdamW8bit=FakeAdamW8bit)
    return mod, FakeAdamW8bit


def test_adamw8bit_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import raises ImportError
    w, _ = _problem()
    with pytest.raises(ConfigError) as ei:
        optim.build_optimizer("AdamW8bit", [w], 1e-3)
    assert ei.value.field == "optim.optimizer_type"
    assert "pip install bitsandbytes" in ei.value.message
    assert re.search(r"\bAdamW\b(?!8bit)", ei.value.message)


def test_adamw8bit_installed_but_cannot_run(monkeypatch):
    mod, _ = _fake_bnb(RuntimeError("All input tensors need to be on the same GPU"))
    monkeypatch.setitem(sys.modules, "bitsandbytes", mod)
    optim._bnb_smoke_test.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    w, _ = _problem()
    try:
        with pytest.raises(ConfigError) as ei:
            optim.build_optimizer("AdamW8bit", [w], 1e-3)
    finally:
        optim._bnb_smoke_test.cache_clear()
    msg = ei.value.message
    assert ei.value.field == "optim.optimizer_type"
    assert "same GPU" in msg
    assert "no CUDA GPU" in msg
    assert "cpu" in msg
    assert re.search(r"\bAdamW\b(?!8bit)", msg)


def test_adamw8bit_used_when_it_runs(monkeypatch):
    mod, cls = _fake_bnb(None)
    monkeypatch.setitem(sys.modules, "bitsandbytes", mod)
    optim._bnb_smoke_test.cache_clear()
    w, target = _problem()
    try:
        opt = optim.build_optimizer("adamw8bit", [w], 0.1, {"betas": "(0.9, 0.99)"})
    finally:
        optim._bnb_smoke_test.cache_clear()
    assert type(opt) is cls
    assert opt.param_groups[0]["betas"] == (0.9, 0.99)
    losses = _train(opt, w, target)
    assert losses[-1] < losses[0] * 0.1


@pytest.mark.parametrize(
    ("name", "module", "package"), [("Lion", "lion_pytorch", "lion-pytorch"), ("Prodigy", "prodigyopt", "prodigyopt")]
)
def test_missing_optional_package_names_pip_package(monkeypatch, name, module, package):
    monkeypatch.setitem(sys.modules, module, None)
    w, _ = _problem()
    with pytest.raises(ConfigError) as ei:
        optim.build_optimizer(name, [w], 1.0)
    assert ei.value.field == "optim.optimizer_type"
    assert f"pip install {package}" in ei.value.message


def test_prodigy_warns_on_low_lr(lt_caplog):
    w, _ = _problem()
    optim.build_optimizer("Prodigy", [w], 1.0)
    assert not [r for r in lt_caplog.records if r.levelno == logging.WARNING]
    optim.build_optimizer("Prodigy", [w], 1e-4)
    warnings = [r.getMessage() for r in lt_caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "1.0" in warnings[0]


def test_adafactor_defaults_are_kohyas():
    w, _ = _problem()
    # kohya: relative_step=True unless optimizer_args say otherwise, even with a learning rate,
    # which becomes the AdafactorSchedule's initial value
    default = optim.build_optimizer("Adafactor", [w], 1e-3)
    g = default.param_groups[0]
    assert (g["relative_step"], g["scale_parameter"], g["warmup_init"]) == (True, True, False)
    sched = optim.build_scheduler("constant", default, num_training_steps=10)
    assert type(sched).__name__ == "AdafactorSchedule"
    assert sched.get_lr() == [1e-3]

    fixed = optim.build_optimizer("Adafactor", [w], 1e-3, ["relative_step=False"])
    g = fixed.param_groups[0]
    assert (g["relative_step"], g["scale_parameter"], g["warmup_init"]) == (False, False, False)
    assert g["lr"] == 1e-3

    rel = optim.build_optimizer("Adafactor", [w], None)
    assert rel.param_groups[0]["relative_step"] is True
    explicit = optim.build_optimizer("Adafactor", [w], 1e-3, ["relative_step=True", "scale_parameter=False"])
    assert explicit.param_groups[0]["relative_step"] is True
    assert explicit.param_groups[0]["scale_parameter"] is False
    forced = optim.build_optimizer("Adafactor", [w], 1e-3, {"warmup_init": True})
    assert forced.param_groups[0]["relative_step"] is True
    with pytest.raises(ConfigError):
        optim.build_optimizer("Adafactor", [w], None, {"relative_step": False})


def test_optimizer_args_parsing():
    assert optim.parse_optimizer_args(None) == {}
    expected = {"betas": (0.9, 0.99), "weight_decay": 0.01, "amsgrad": True}
    assert optim.parse_optimizer_args(["betas=(0.9,0.99)", "weight_decay=0.01", "amsgrad=True"]) == expected
    assert optim.parse_optimizer_args("betas=(0.9, 0.99) weight_decay=0.01, amsgrad=True") == expected
    assert optim.parse_optimizer_args({"betas": "(0.9,0.99)", "weight_decay": 0.01, "amsgrad": "True"}) == expected
    with pytest.raises(ConfigError) as ei:
        optim.parse_optimizer_args(["betas=(0.9,"])
    assert ei.value.field == "optim.optimizer_args"
    with pytest.raises(ConfigError):
        optim.parse_optimizer_args(["no_equals_sign"])


def test_optimizer_args_reach_the_optimizer_and_bad_ones_raise():
    w, _ = _problem()
    opt = optim.build_optimizer("AdamW", [w], 1e-3, "betas=(0.8,0.95) weight_decay=0.05")
    assert opt.param_groups[0]["betas"] == (0.8, 0.95)
    assert opt.param_groups[0]["weight_decay"] == 0.05
    with pytest.raises(ConfigError) as ei:
        optim.build_optimizer("AdamW", [w], 1e-3, {"not_an_arg": 1})
    assert ei.value.field == "optim.optimizer_args"
    assert "not_an_arg" in ei.value.message
    with pytest.raises(ConfigError):
        optim.build_optimizer("AdamW", [w], 1e-3, {"lr": 1.0})
    with pytest.raises(ConfigError) as ei:
        optim.build_optimizer("AdamW", [w], -1.0)
    assert ei.value.field == "optim.learning_rate"


def test_adamw_is_torchs_foreach_and_equals_its_per_tensor_loop():
    """The default AdamW is the multi-tensor one (not fused, which rounds differently); on tensors of which
    some get no gradient in a step, its weights equal ``foreach=False``'s bit for bit."""
    params = {
        mode: [torch.nn.Parameter(torch.full((4, 3), float(i + 1))) for i in range(4)] for mode in ("ours", "ref")
    }
    ours = optim.build_optimizer("AdamW", params["ours"], 1e-2, {"weight_decay": 0.1})
    assert ours.defaults["foreach"] is True
    assert not ours.defaults["fused"]
    ref = torch.optim.AdamW(params["ref"], lr=1e-2, weight_decay=0.1, foreach=False)
    g = torch.Generator().manual_seed(0)
    for step in range(5):
        grads = [None if (i + step) % 3 == 0 else torch.randn(4, 3, generator=g) for i in range(4)]
        for opt, ps in ((ours, params["ours"]), (ref, params["ref"])):
            for p, grad in zip(ps, grads, strict=True):
                p.grad = None if grad is None else grad.clone()
            opt.step()
            opt.zero_grad(set_to_none=True)
    assert all(torch.equal(a, b) for a, b in zip(params["ours"], params["ref"], strict=True))
    fused = optim.build_optimizer("AdamW", [torch.nn.Parameter(torch.zeros(2))], 1e-2, {"fused": True})
    assert fused.defaults["fused"] is True  # still there when asked for
    assert not fused.defaults["foreach"]


# ----------------------------------------------------------------------------- param groups


def test_param_groups_for_names_lrs_and_omissions():
    u = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))]
    t = [torch.nn.Parameter(torch.zeros(4))]
    groups = optim.param_groups_for(u, t, 1e-4, 5e-5)
    assert [g["name"] for g in groups] == ["unet", "text_encoder"]
    assert [g["lr"] for g in groups] == [1e-4, 5e-5]
    assert groups[0]["params"] == u

    assert [g["name"] for g in optim.param_groups_for(u, [], 1e-4, 5e-5)] == ["unet"]
    assert [g["name"] for g in optim.param_groups_for(u, t, 1e-4, 0.0)] == ["unet"]  # kohya: lr 0 is not trained
    default = optim.param_groups_for(u, t, None, 5e-5)
    assert "lr" not in default[0]

    opt = optim.build_optimizer("AdamW", default, 1e-3)
    assert optim.current_lrs(opt) == {"unet": 1e-3, "text_encoder": 5e-5}
    with pytest.raises(ConfigError):
        optim.build_optimizer("AdamW", optim.param_groups_for([], t, 1e-4, 0), 1e-3)


def test_param_group_lrs_are_used_per_group():
    u = [torch.nn.Parameter(torch.zeros(3))]
    t = [torch.nn.Parameter(torch.zeros(3))]
    opt = optim.build_optimizer("Lion", optim.param_groups_for(u, t, 0.1, 0.01), 0.5, {"betas": (0.9, 0.99)})
    (u[0].sum() + t[0].sum()).backward()
    opt.step()
    # Lion moves every coordinate by exactly lr (sign of the update)
    torch.testing.assert_close(u[0].detach(), torch.full((3,), -0.1))
    torch.testing.assert_close(t[0].detach(), torch.full((3,), -0.01))


def test_current_lrs_prodigy_reports_d_times_lr():
    w, target = _problem()
    opt = optim.build_optimizer("Prodigy", optim.param_groups_for([w], [], 1.0, None), 1.0)
    _train(opt, w, target, steps=5)
    d = opt.param_groups[0]["d"]
    assert d != 1.0
    assert optim.current_lrs(opt) == {"unet": pytest.approx(d)}


# ----------------------------------------------------------------------------- schedulers


LR = 0.01


def _lrs(sched, opt, steps):
    """lr (first group) at step 0 .. steps."""
    out = [sched.get_last_lr()[0]]
    for _ in range(steps):
        opt.step()
        sched.step()
        out.append(sched.get_last_lr()[0])
    return out


def test_constant_scheduler():
    opt = _sgd_opt(LR)
    lrs = _lrs(optim.build_scheduler("constant", opt, 100), opt, 100)
    assert lrs == pytest.approx([LR] * 101)
    with pytest.raises(ConfigError) as ei:
        optim.build_scheduler("constant", _sgd_opt(LR), 100, num_warmup_steps=10)
    assert ei.value.field == "optim.lr_warmup_steps"


def test_constant_with_warmup_scheduler():
    opt = _sgd_opt(LR)
    lrs = _lrs(optim.build_scheduler("constant_with_warmup", opt, 100, num_warmup_steps=10), opt, 100)
    assert lrs[0] == 0.0
    assert lrs[5] == pytest.approx(0.5 * LR)
    assert lrs[10] == pytest.approx(LR)
    assert lrs[55] == pytest.approx(LR)
    assert lrs[100] == pytest.approx(LR)


def test_linear_scheduler():
    opt = _sgd_opt(LR)
    lrs = _lrs(optim.build_scheduler("linear", opt, 100, num_warmup_steps=10), opt, 100)
    assert lrs[0] == 0.0
    assert lrs[5] == pytest.approx(0.5 * LR)
    assert lrs[10] == pytest.approx(LR)
    assert lrs[55] == pytest.approx(LR * (100 - 55) / 90)
    assert lrs[100] == pytest.approx(0.0)


def test_cosine_scheduler():
    opt = _sgd_opt(LR)
    lrs = _lrs(optim.build_scheduler("cosine", opt, 110, num_warmup_steps=10), opt, 110)
    assert lrs[0] == 0.0
    assert lrs[10] == pytest.approx(LR)
    assert lrs[35] == pytest.approx(LR * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert lrs[60] == pytest.approx(0.5 * LR)
    assert lrs[110] == pytest.approx(0.0, abs=1e-12)


def test_cosine_with_restarts_scheduler():
    opt = _sgd_opt(LR)
    sched = optim.build_scheduler("cosine_with_restarts", opt, 110, num_warmup_steps=10, num_cycles=2)
    lrs = _lrs(sched, opt, 110)
    assert lrs[0] == 0.0
    assert lrs[10] == pytest.approx(LR)
    assert lrs[35] == pytest.approx(0.5 * LR)  # middle of the first cycle
    assert lrs[59] == pytest.approx(LR * 0.5 * (1 + math.cos(math.pi * (2 * 49 / 100))))  # near its end
    assert lrs[60] == pytest.approx(LR)  # hard restart
    assert lrs[85] == pytest.approx(0.5 * LR)
    assert lrs[110] == 0.0


def test_polynomial_scheduler():
    opt = _sgd_opt(LR)
    lrs = _lrs(optim.build_scheduler("polynomial", opt, 110, num_warmup_steps=10, power=2.0), opt, 110)
    end = 1e-7
    assert lrs[0] == 0.0
    assert lrs[10] == pytest.approx(LR)
    assert lrs[60] == pytest.approx((LR - end) * 0.5**2 + end)
    assert lrs[110] == pytest.approx(end)


def test_scheduler_scales_each_group():
    u = [torch.nn.Parameter(torch.zeros(2))]
    t = [torch.nn.Parameter(torch.zeros(2))]
    opt = optim.build_optimizer("AdamW", optim.param_groups_for(u, t, 1e-3, 1e-4), 1e-3)
    sched = optim.build_scheduler("linear", opt, 100, num_warmup_steps=10)
    for _ in range(55):
        opt.step()
        sched.step()
    assert optim.current_lrs(opt) == {"unet": pytest.approx(0.5e-3), "text_encoder": pytest.approx(0.5e-4)}


def test_unknown_scheduler_and_bad_arguments():
    with pytest.raises(ConfigError) as ei:
        optim.build_scheduler("cosine_annealing", _sgd_opt(), 10)
    assert ei.value.field == "optim.lr_scheduler"
    for name in ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"):
        assert name in ei.value.message
    with pytest.raises(ConfigError):
        optim.build_scheduler("linear", _sgd_opt(), 0)
    with pytest.raises(ConfigError):
        optim.build_scheduler("linear", _sgd_opt(), 10, num_warmup_steps=-1)
    with pytest.raises(ConfigError):
        optim.build_scheduler("cosine_with_restarts", _sgd_opt(), 10, num_cycles=0)
    with pytest.raises(ConfigError):
        optim.build_scheduler("adafactor", _sgd_opt(), 10)


def _state_roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("constant", {}),
        ("constant_with_warmup", {"num_warmup_steps": 5}),
        ("linear", {"num_warmup_steps": 5}),
        ("cosine", {"num_warmup_steps": 5}),
        ("cosine_with_restarts", {"num_warmup_steps": 5, "num_cycles": 3}),
        ("polynomial", {"num_warmup_steps": 5, "power": 2.0}),
    ],
)
def test_scheduler_state_dict_round_trip(name, kwargs):
    def make():
        w, target = _problem()
        opt = optim.build_optimizer("AdamW", optim.param_groups_for([w], [], 0.05, None), 0.05)
        return w, target, opt, optim.build_scheduler(name, opt, 30, **kwargs)

    def run(w, target, opt, sched, steps):
        out = []
        for _ in range(steps):
            _train(opt, w, target, steps=1)
            sched.step()
            out.append((sched.get_last_lr()[0], w.detach().clone()))
        return out

    w, target, opt, sched = make()
    run(w, target, opt, sched, 12)
    opt_state, sched_state, w_saved = _state_roundtrip(opt), _state_roundtrip(sched), w.detach().clone()
    reference = run(w, target, opt, sched, 15)

    w2, target2, opt2, sched2 = make()
    with torch.no_grad():
        w2.copy_(w_saved)
    opt2.load_state_dict(opt_state)
    sched2.load_state_dict(sched_state)
    resumed = run(w2, target2, opt2, sched2, 15)
    for (lr_a, w_a), (lr_b, w_b) in zip(reference, resumed, strict=True):
        assert lr_a == lr_b
        torch.testing.assert_close(w_a, w_b, rtol=0, atol=0)
    if name != "constant":  # a fresh scheduler would differ: the round trip carried the step
        fresh = run(*make(), 15)
        assert [a for a, _ in fresh] != [a for a, _ in reference]


def test_adafactor_relative_step_gets_adafactor_schedule_and_round_trips():
    from transformers.optimization import AdafactorSchedule

    w, target = _problem()
    opt = optim.build_optimizer("Adafactor", optim.param_groups_for([w], [], 1e-3, None), 1e-3, ["relative_step=True"])
    sched = optim.build_scheduler("constant", opt, 100)
    assert isinstance(sched, AdafactorSchedule)
    assert sched.get_last_lr() == [pytest.approx(1e-3)]  # the initial value before any step
    _train(opt, w, target, steps=3)
    sched.step()
    reported = float(sched.get_last_lr()[0])
    assert reported != pytest.approx(1e-3)
    assert optim.current_lrs(opt)["unet"] == pytest.approx(reported)

    state = _state_roundtrip(sched)
    opt_state = _state_roundtrip(opt)
    w2, _ = _problem()
    opt2 = optim.build_optimizer(
        "Adafactor", optim.param_groups_for([w2], [], 1e-3, None), 1e-3, ["relative_step=True"]
    )
    sched2 = optim.build_scheduler("adafactor", opt2, 100)
    opt2.load_state_dict(opt_state)
    sched2.load_state_dict(state)
    assert sched2.last_epoch == sched.last_epoch
    assert float(sched2.get_last_lr()[0]) == pytest.approx(reported)


def test_adafactor_relative_step_is_explained_in_the_tab_and_the_log(records):
    from lora_trainer.webui.fields import FIELD_BY_PATH, short_help

    shown = short_help(FIELD_BY_PATH["optim.optimizer_type"].help)
    assert "relative_step=True" in shown
    assert "relative_step=False" in shown
    w, _ = _problem()
    optim.build_optimizer("Adafactor", [w], 1e-4)
    assert optim.ADAFACTOR_RELATIVE_STEP_NOTE.format(lr=1e-4) in [r.getMessage() for r in records]


def test_sdxl_low_vram_preset_keeps_a_fixed_adafactor_rate():
    from lora_trainer.config import load_preset

    cfg = load_preset("sdxl-low-vram")
    w, _ = _problem()
    opt = optim.build_optimizer(cfg.optim.optimizer_type, [w], cfg.optim.learning_rate, cfg.optim.optimizer_args)
    g = opt.param_groups[0]
    assert (g["relative_step"], g["scale_parameter"], g["warmup_init"]) == (False, False, False)
    assert g["lr"] == cfg.optim.learning_rate
    sched = optim.build_scheduler(cfg.optim.lr_scheduler, opt, num_training_steps=200, num_warmup_steps=100)
    assert type(sched).__name__ != "AdafactorSchedule"
