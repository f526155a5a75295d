"""The trainer's optimizer steps are torch's per-tensor optimizers', bit for bit.

A run of ``train()`` on the tiny SD1 model records, at each step, the gradients of the LoRA
network's own parameters before clipping (None where a parameter got none: module dropout, a text
encoder layer that clip skip leaves unused). The same gradients are then replayed on copies of the
initial weights through ``clip_grad_norm_`` and the reference optimizer built on the original
parameter list (``torch.optim.AdamW(foreach=False)``, ``lion_pytorch.Lion``, ``prodigyopt.Prodigy``).
The trained weights must equal the replayed ones exactly (``torch.equal``).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lora_trainer.train import loop
from tests.fixtures.training import make_config
from tests.fixtures.webui_models import TinyAdapter

MAX_NORM = 0.05  # small enough that clipping acts on these gradients
WEIGHT_DECAY = 0.1

CASES = {
    "module_dropout": {"network.module_dropout": 0.5},
    "rank_dropout": {"network.rank_dropout": 0.5},
    "unused_layers": {"training.clip_skip": 2},  # the text encoder's last layer feeds nothing
    "all_at_once": {
        "network.module_dropout": 0.3,
        "network.rank_dropout": 0.3,
        "network.network_dropout": 0.1,
        "training.clip_skip": 2,
    },
}
SKIPS_PARAMETERS = {"module_dropout", "unused_layers", "all_at_once"}


def _adamw(groups, lr):
    return torch.optim.AdamW(groups, lr=lr, weight_decay=WEIGHT_DECAY, foreach=False)


def _lion(groups, lr):
    from lion_pytorch import Lion

    return Lion(groups, lr=lr, weight_decay=WEIGHT_DECAY)


def _prodigy(groups, lr):
    from prodigyopt import Prodigy

    return Prodigy(groups, lr=lr, weight_decay=WEIGHT_DECAY)


def _needs(module: str):
    missing = importlib.util.find_spec(module) is None
    return pytest.mark.skipif(missing, reason=f"{module} is not installed")


OPTIMIZERS = [
    pytest.param("AdamW", 1e-3, _adamw, id="AdamW"),
    pytest.param("Lion", 1e-4, _lion, id="Lion", marks=_needs("lion_pytorch")),
    pytest.param("Prodigy", 1.0, _prodigy, id="Prodigy", marks=_needs("prodigyopt")),
]


class Recorder:
    """Keeps the run's LoRA network and, per step, its parameters' gradients before clipping."""

    def __init__(self, monkeypatch):
        self.network = None
        self.initial: list[torch.Tensor] | None = None
        self.steps: list[list[torch.Tensor | None]] = []
        self.norms: list[float] = []
        self.real_clip = torch.nn.utils.clip_grad_norm_
        real_network = loop.LoRANetwork

        def network(*args, **kwargs):
            self.network = real_network(*args, **kwargs)
            return self.network

        def clip(params, max_norm, *args, **kwargs):
            own = self.params()
            if self.initial is None:
                self.initial = [p.detach().clone() for p in own]
            self.steps.append([None if p.grad is None else p.grad.detach().clone() for p in own])
            norm = self.real_clip(params, max_norm, *args, **kwargs)
            self.norms.append(float(norm))
            return norm

        monkeypatch.setattr(loop, "LoRANetwork", network)
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)

    def groups(self) -> list[list[torch.nn.Parameter]]:
        """The network's own parameters, UNet then text encoders: the original parameter list."""
        assert self.network is not None
        return [self.network.parameters_of(("unet",)), self.network.parameters_of(loop.TE_GROUPS)]

    def params(self) -> list[torch.nn.Parameter]:
        return [p for group in self.groups() for p in group]


def _replay(recorder: Recorder, make_optimizer, lr: float) -> list[torch.Tensor]:
    assert recorder.initial is not None
    copies = [torch.nn.Parameter(t.clone()) for t in recorder.initial]
    sizes = [len(g) for g in recorder.groups()]
    groups = [{"params": copies[: sizes[0]], "lr": lr}, {"params": copies[sizes[0] :], "lr": lr}]
    opt = make_optimizer([g for g in groups if g["params"]], lr)
    for grads in recorder.steps:
        for p, g in zip(copies, grads, strict=True):
            p.grad = None if g is None else g.clone()
        recorder.real_clip(copies, MAX_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return [p.detach() for p in copies]


@pytest.mark.parametrize(("name", "lr", "reference"), OPTIMIZERS)
@pytest.mark.parametrize("case", list(CASES))
def test_trainer_steps_equal_the_per_tensor_optimizer(tmp_path, monkeypatch, name, lr, reference, case):
    recorder = Recorder(monkeypatch)
    cfg = make_config(
        tmp_path,
        **{
            "optim.optimizer_type": name,
            "optim.learning_rate": lr,
            "optim.optimizer_args": {"weight_decay": WEIGHT_DECAY},
            "optim.max_grad_norm": MAX_NORM,
            "training.max_train_steps": 6,
            **CASES[case],
        },
    )
    result = loop.train(cfg, TinyAdapter("sd1"), work_dir=tmp_path / "work")

    assert result.steps == len(recorder.steps) == 6
    assert max(recorder.norms) > MAX_NORM  # clipping acted
    skipped = sum(g is None for grads in recorder.steps for g in grads)
    if case in SKIPS_PARAMETERS:
        # a parameter the step did not reach has no gradient (not a zero one), as torch leaves it
        assert skipped > 0, "every parameter had a gradient tensor in every step"
    trained = [p.detach() for p in recorder.params()]
    expected = _replay(recorder, reference, lr)
    assert len(trained) == len(expected)
    moved = sum(not torch.equal(t, i) for t, i in zip(trained, recorder.initial or [], strict=True))
    assert moved > 0
    different = [i for i, (t, e) in enumerate(zip(trained, expected, strict=True)) if not torch.equal(t, e)]
    assert not different, (
        f"{len(different)} of {len(trained)} tensors differ; "
        f"max {max((trained[i] - expected[i]).abs().max().item() for i in different):.3g}"
    )
