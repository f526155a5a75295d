"""GPU check: full-size SD1.5 (512 px) and SDXL (1024 px) architectures with random weights, trained
by the trainer itself, in fp16 and bf16, with sdp attention (and xformers when installed), gradient
checkpointing off and on. For each run: steps/s, peak memory (``max_memory_allocated``) against the
memory plan's estimate, NaN/inf counts (skipped steps, non-finite losses and saved weights), and
whether the base model is bit-identical afterwards.

    python bench/gpu_check.py                              # on CUDA: the whole matrix
    python bench/gpu_check.py --family sdxl --dtype bf16   # a part of it
    python bench/gpu_check.py --size tiny --device cpu     # smoke test of this script on the CPU

A full model is built once per family and dtype (SDXL fp16: ~7 GB); a run that runs out of memory
is reported as such (with the plan's advice) and the next one goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_trainer.config import TrainConfig
from lora_trainer.errors import OutOfMemory
from lora_trainer.files.lora_file import load_lora
from lora_trainer.train.callbacks import Callbacks
from lora_trainer.train.device import device_memory, device_throughput, release_memory
from lora_trainer.train.loop import train
from lora_trainer.train.memory import GB, estimate, profile_model, settings_from_config
from tests.fixtures import webui_models
from tests.fixtures.training import make_dataset
from tests.fixtures.webui_models import TinyAdapter

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
RESOLUTION = {("sd1", "full"): 512, ("sdxl", "full"): 1024, ("sd1", "tiny"): 64, ("sdxl", "tiny"): 128}


def config(data: Path, out: Path, resolution: int, dtype: str, checkpointing: bool, steps: int) -> TrainConfig:
    cfg = TrainConfig()
    cfg.dataset.train_data_dir = str(data)
    cfg.dataset.resolution = resolution
    cfg.dataset.enable_bucket = False
    cfg.dataset.cache_latents = True
    cfg.network.network_dim = 16
    cfg.network.network_alpha = 16
    cfg.network.train_text_encoder = False
    cfg.optim.optimizer_type = "AdamW"
    cfg.optim.learning_rate = 1e-4
    cfg.optim.lr_scheduler = "constant"
    cfg.training.train_batch_size = 1
    cfg.training.max_train_steps = steps
    cfg.training.mixed_precision = dtype
    cfg.training.gradient_checkpointing = checkpointing
    cfg.training.seed = 0
    cfg.save.output_dir = str(out)
    cfg.save.overwrite = True
    return cfg


class Timer(Callbacks):
    def __init__(self, device: torch.device):
        self.device, self.times = device, []

    def on_step(self, info) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())


def _xformers_forward(self, x, context=None):
    import xformers.ops

    context = x if context is None else context
    b, n, _ = x.shape

    def split(t):
        return t.reshape(b, t.shape[1], self.heads, -1)

    out = xformers.ops.memory_efficient_attention(
        split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
    )
    return self.to_out(out.reshape(b, n, -1))


@contextlib.contextmanager
def attention(name: str):
    """The tiny/full UNet's attention: torch's sdp (the fixtures' own) or xformers' kernel."""
    if name != "xformers":
        yield
        return
    cls = webui_models.CrossAttention
    original = cls.forward
    cls.forward = _xformers_forward
    try:
        yield
    finally:
        cls.forward = original


def attentions(device: torch.device) -> list[str]:
    names = ["sdp"]
    if device.type == "cuda":
        try:
            import xformers.ops  # noqa: F401
        except ImportError:
            print("xformers is not installed: sdp attention only")
        else:
            names.append("xformers")
    return names


def snapshot(adapter) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """CPU copies of every base tensor, to compare bit for bit afterwards."""
    tensors = {id(t): t for t in [*adapter.root.parameters(), *adapter.root.buffers()]}.values()
    return [(t, t.detach().to("cpu", copy=True)) for t in tensors]


def identical(copies) -> bool:
    return all(torch.equal(t.detach().cpu(), copy) for t, copy in copies)


def one_run(args, adapter, profile, memory, family, dtype, attn, checkpointing, tmp: Path) -> str:
    device = adapter.device
    resolution = RESOLUTION[family, args.size]
    cfg = config(tmp / "data", tmp / "out", resolution, dtype, checkpointing, args.warmup + args.steps)
    flops = device_throughput(device, DTYPES[dtype])
    plan = estimate(profile, settings_from_config(cfg, attention=attn), memory, flops_per_s=flops)
    timer = Timer(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    head = f"{family} {args.size} {resolution}px {dtype} {attn:8} ckpt {'on ' if checkpointing else 'off'}"
    try:
        with attention(attn):
            result = train(cfg, adapter, timer, work_dir=tmp / "work")
    except OutOfMemory as e:
        release_memory(e)
        return f"{head}: OUT OF MEMORY ({e.phase}); estimate {plan.peak_bytes / GB:.2f} GB; {plan.advice()}"
    spans = [b - a for a, b in zip(timer.times[args.warmup - 1 :], timer.times[args.warmup :], strict=False)]
    rate = len(spans) / sum(spans) if spans and sum(spans) > 0 else float("nan")
    measured = torch.cuda.max_memory_allocated(device) / GB if device.type == "cuda" else None
    nonfinite_losses = sum(not math.isfinite(x) for x in result.losses)
    weights = load_lora(result.output_path)[0] if result.output_path else {}
    nonfinite_weights = sum(int((~torch.isfinite(t.float())).sum()) for t in weights.values())
    skipped = getattr(result, "skipped_steps", 0)
    if measured is not None:
        vs = f"measured {measured:.2f} GB, estimate {plan.peak_bytes / GB:.2f} GB ({plan.peak_bytes / GB / measured - 1:+.0%})"
    else:
        vs = f"measured n/a on {device.type}, estimate {plan.peak_bytes / GB:.3f} GB"
    est_rate = 1 / plan.seconds_per_step if plan.seconds_per_step else float("nan")
    return (
        f"{head}: {rate:6.2f} steps/s (estimate {est_rate:.2f}), {vs}, skipped steps {skipped}, non-finite losses {nonfinite_losses}, "
        f"non-finite saved weights {nonfinite_weights}, loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", nargs="+", default=["sd1", "sdxl"], choices=["sd1", "sdxl"])
    parser.add_argument("--dtype", nargs="+", default=["fp16", "bf16"], choices=list(DTYPES))
    parser.add_argument("--size", default="full", choices=["tiny", "full"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type != "cuda" and args.size == "full":
        print("full-size models need CUDA: use --size tiny --device cpu for a smoke test")
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"GPU check on {name}, torch {torch.__version__}, sdp backend: {F.scaled_dot_product_attention.__name__}")
    failures = 0
    for family in args.family:
        for dtype in args.dtype:
            adapter = TinyAdapter(family, dtype=DTYPES[dtype], size=args.size, device=device)
            profile = profile_model(family, adapter.unet, adapter.text_encoders, adapter.root.first_stage_model)
            copies = snapshot(adapter)
            with tempfile.TemporaryDirectory() as tmp:
                make_dataset(Path(tmp) / "data", n=4, size=RESOLUTION[family, args.size], folder="1_check")
                for attn in attentions(device):
                    for checkpointing in (False, True):
                        memory = device_memory(device, attention=attn)
                        run_dir = Path(tmp) / f"{attn}-{checkpointing}"
                        run_dir.mkdir()
                        (run_dir / "data").symlink_to(Path(tmp) / "data")
                        line = one_run(args, adapter, profile, memory, family, dtype, attn, checkpointing, run_dir)
                        same = identical(copies)
                        failures += not same
                        print(f"{line}; base bit-identical: {'yes' if same else 'NO'}", flush=True)
            del adapter, copies
            release_memory()
    print("all runs left the base model bit-identical" if not failures else f"{failures} run(s) changed the base")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
