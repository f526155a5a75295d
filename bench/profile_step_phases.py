"""Where a training step's time goes, on the stand-in WebUI: text encoding, UNet forward, backward, optimizer.

    python bench/profile_step_phases.py                          # SD1 tiny, 12 steps, the run's attention
    python bench/profile_step_phases.py --webui-attention        # train with the WebUI's "InvokeAI" instead
    python bench/profile_step_phases.py --family sdxl --torch-profile 25

Phases are timed with forward hooks on the text encoders and the UNet and torch's global optimizer
step hooks; "backward and the rest" is the step's wall time minus those (the loss, backward,
gradient clipping, the LoRA's own hooks' share of backward). The first steps are left out
(warm-up). ``--torch-profile N`` also prints torch's profiler table of the N costliest operators
over the measured steps.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from lora_trainer.train.callbacks import Callbacks, StepInfo
from lora_trainer.train.loop import train
from tests.fixtures.fake_webui import FakeWebUI
from tests.fixtures.training import make_config


class PhaseTimer(Callbacks):
    """Sums the time spent in each phase per optimizer step."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.current: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []
        self.started: dict[str, float] = {}
        self.step_start = time.perf_counter()

    def begin(self, phase: str) -> None:
        self.started[phase] = time.perf_counter()

    def end(self, phase: str) -> None:
        self.current[phase] += time.perf_counter() - self.started.pop(phase, time.perf_counter())

    def on_step(self, info: StepInfo) -> None:
        now = time.perf_counter()
        phases = dict(self.current)
        phases["step"] = now - self.step_start
        phases["backward and the rest"] = phases["step"] - sum(v for k, v in self.current.items())
        if info.step > self.warmup:
            self.steps.append(phases)
        self.current.clear()
        self.step_start = now


def _timed(module: torch.nn.Module, timer: PhaseTimer, phase: str) -> list:
    return [
        module.register_forward_pre_hook(lambda *_: timer.begin(phase)),
        module.register_forward_hook(lambda *_: timer.end(phase)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="sd1", choices=["sd1", "sd2", "sdxl"])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--webui-attention", action="store_true", help="keep the WebUI's attention for training")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--torch-profile", type=int, default=0, metavar="N")
    args = parser.parse_args()
    timer = PhaseTimer(args.warmup)
    with tempfile.TemporaryDirectory() as tmp_dir, contextlib.ExitStack() as stack:
        tmp = Path(tmp_dir)
        fake = FakeWebUI(tmp / "webui", args.family)
        stack.enter_context(fake.installed())
        attention = fake.backend.attention
        if args.webui_attention:
            stack.callback(setattr, attention, "_training_optimizer", attention._training_optimizer)
            attention._training_optimizer = lambda device, dtype: None
        host = fake.backend.host.WebUIHost()
        cfg = make_config(
            tmp,
            **{
                "training.max_train_steps": args.steps,
                "network.train_text_encoder": True,
                "dataset.resolution": args.resolution,
                "training.gradient_checkpointing": args.gradient_checkpointing,
            },
        )
        cfg.save.output_dir = str(tmp / "out")
        adapter = stack.enter_context(host.training_session())
        handles = _timed(adapter.unet, timer, "UNet forward")
        for name, encoder in adapter.text_encoders.items():
            handles += _timed(encoder, timer, f"text encoder {name}")
        handles.append(register_optimizer_step_pre_hook(lambda *_: timer.begin("optimizer")))
        handles.append(register_optimizer_step_post_hook(lambda *_: timer.end("optimizer")))
        profiler = torch.profiler.profile() if args.torch_profile else contextlib.nullcontext()
        with profiler:
            train(cfg, adapter, timer, work_dir=tmp / "work")
        for handle in handles:
            handle.remove()
        attention_name = fake.hijack.optimization_method if args.webui_attention else "the run's (sdp)"
        print(f"{args.family} {args.resolution}px, attention: {attention_name}, steps measured: {len(timer.steps)}")
        print(f"{'phase':28} {'ms/step':>9} {'share':>6}")
        total = statistics.mean(s["step"] for s in timer.steps)
        for phase in sorted({k for s in timer.steps for k in s} - {"step"}):
            ms = statistics.mean(s.get(phase, 0.0) for s in timer.steps)
            print(f"{phase:28} {ms * 1e3:9.2f} {ms / total:6.1%}")
        print(f"{'step':28} {total * 1e3:9.2f}")
        if args.torch_profile and isinstance(profiler, torch.profiler.profile):
            print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.torch_profile))


if __name__ == "__main__":
    main()
