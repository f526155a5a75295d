"""Trainer step time against a bare forward+backward of the same model and LoRA, and peak memory.

    python bench/bench_train_step.py                              # tiny SD1 on the CPU, 64 px
    python bench/bench_train_step.py --family sdxl
    python bench/bench_train_step.py --size full --device cuda --dtype fp16 --resolution 512

"bare" is the least any LoRA trainer must do per step: text encoding, the denoiser's forward,
the MSE loss and the backward pass, with the same LoRA attached, on data already on the device.
"trainer" is ``lora_trainer.train.loop.train`` doing whole steps (data, captions, noise, loss,
backward, clipping, optimizer and scheduler step, progress callback). Both use cached latents.
Figures are the best of --rounds alternating runs of each, every run's figure being the median
over its timed steps after warm-up steps.

"optimizer step" is the part of the trainer's overhead spent on gradient clipping and the AdamW
step alone: torch's multi-tensor (foreach) AdamW over the LoRA's own tensors, as the trainer runs
it (the same arithmetic as torch's per-tensor loop, bit for bit, and a parameter without a gradient
is skipped). "one flat tensor" is the same work on one tensor holding all the weights: the least
per-tensor overhead could cost, which the trainer does not use because it cannot skip a parameter
that got no gradient.
"""

from __future__ import annotations

import argparse
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_trainer.config import TrainConfig
from lora_trainer.naming import find_targets
from lora_trainer.networks.network import LoRANetwork
from lora_trainer.train import objectives
from lora_trainer.train.callbacks import Callbacks
from lora_trainer.train.loop import train
from lora_trainer.train.optim import build_optimizer
from tests.fixtures.webui_models import TinyAdapter

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_images(folder: Path, n: int, size: int) -> None:
    sub = folder / "1_bench"
    sub.mkdir(parents=True)
    rng = random.Random(0)
    for i in range(n):
        Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3))).save(sub / f"{i}.png")
        (sub / f"{i}.txt").write_text(f"bench subject, photo {i}, plain background")


def config(args, data: Path, out: Path) -> TrainConfig:
    cfg = TrainConfig()
    cfg.dataset.train_data_dir = str(data)
    cfg.dataset.resolution = args.resolution
    cfg.dataset.enable_bucket = False
    cfg.dataset.max_token_length = 75
    cfg.network.network_dim = args.rank
    cfg.network.network_alpha = args.rank
    cfg.network.train_text_encoder = not args.unet_only
    cfg.optim.optimizer_type = "AdamW"
    cfg.optim.lr_scheduler = "constant"
    cfg.training.train_batch_size = args.batch
    cfg.training.max_train_steps = args.warmup + args.steps
    cfg.training.mixed_precision = "no" if args.dtype == "fp32" else args.dtype
    cfg.training.gradient_checkpointing = args.gradient_checkpointing
    cfg.training.seed = 0
    cfg.save.output_dir = str(out)
    cfg.save.overwrite = True
    return cfg


class StepTimer(Callbacks):
    def __init__(self, device):
        self.device, self.times = device, []

    def on_step(self, info):
        sync(self.device)
        self.times.append(time.perf_counter())


def bench_trainer(args, adapter, cfg, work: Path) -> list[float]:
    timer = StepTimer(adapter.device)
    train(cfg, adapter, timer, work_dir=work)
    return [b - a for a, b in zip(timer.times[args.warmup - 1 :], timer.times[args.warmup :], strict=False)]


def bench_bare(args, adapter, cfg) -> list[float]:
    targets = find_targets(adapter.family, adapter.unet, None if args.unet_only else adapter.text_encoders)
    network = LoRANetwork(targets, rank=args.rank, alpha=args.rank)
    device = adapter.device
    b, r = args.batch, args.resolution
    pixels = torch.rand(b, 3, r, r) * 2 - 1
    latents = adapter.encode_images(pixels).to(device, torch.float32)
    captions = [f"bench subject, photo {i}, plain background" for i in range(b)]
    alphas = adapter.alphas_cumprod.to(device, torch.float32)
    gen = torch.Generator().manual_seed(0)
    autocast = (
        torch.autocast(device.type, dtype=DTYPES[args.dtype])
        if args.dtype != "fp32" and device.type == "cuda"
        else torch.autocast(device.type, enabled=False)
    )
    for p in [*adapter.unet.parameters(), *(q for te in adapter.text_encoders.values() for q in te.parameters())]:
        p.requires_grad_(False)
    times = []
    with network.applied():
        for i in range(args.warmup + args.steps):
            start = time.perf_counter()
            noise = torch.randn(latents.shape, generator=gen).to(device)
            t = torch.randint(0, 1000, (b,), generator=gen).to(device)
            with autocast:
                cond = adapter.encode_text(captions, max_token_length=75)
                pred = adapter.predict(objectives.add_noise(latents, noise, t, alphas).to(adapter.dtype), t, cond)
            loss = torch.nn.functional.mse_loss(pred.float(), noise)
            loss.backward()
            for p in network.parameters():
                p.grad = None
            sync(device)
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
    return times


def bench_optimizer(args, adapter) -> tuple[int, float, float]:
    """(number of LoRA tensors, median s per clip + AdamW step over them, the same over one flat tensor)."""
    targets = find_targets(adapter.family, adapter.unet, None if args.unet_only else adapter.text_encoders)
    params = list(LoRANetwork(targets, rank=args.rank, alpha=args.rank).to(adapter.device).parameters())
    flat = [torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in params]))]
    figures = []
    for tensors in (params, flat):
        opt = build_optimizer("AdamW", tensors, 1e-4, {"weight_decay": 0.01})
        for p in tensors:
            p.grad = torch.randn_like(p)
        times = []
        for i in range(args.warmup + args.steps):
            sync(adapter.device)
            start = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(tensors, 1.0)
            opt.step()
            sync(adapter.device)
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
        figures.append(statistics.median(times))
    return len(params), figures[0], figures[1]


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB GPU"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB RSS (process peak)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="sd1", choices=["sd1", "sd2", "sdxl"])
    parser.add_argument("--size", default="tiny", choices=["tiny", "full"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="alternations of bare and trainer runs")
    parser.add_argument("--unet-only", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args()
    args.resolution = args.resolution or (64 if args.size == "tiny" else 512)
    device = torch.device(args.device)

    adapter = TinyAdapter(args.family, dtype=DTYPES[args.dtype], size=args.size, device=device)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_images(tmp / "data", max(4, args.batch * 2), args.resolution)
        cfg = config(args, tmp / "data", tmp / "out")

        # Alternate the two a few times and keep each one's best median: on a shared machine the
        # load drifts, and interleaving keeps that drift out of the comparison.
        bare_runs, trainer_runs = [], []
        for _ in range(args.rounds):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            bare_runs.append(statistics.median(bench_bare(args, adapter, cfg)))
            bare_mem = peak_memory(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            trainer_runs.append(statistics.median(bench_trainer(args, adapter, cfg, tmp / "work")))
            trainer_mem = peak_memory(device)

    bare_s, trainer_s = min(bare_runs), min(trainer_runs)
    optimizer_runs = [bench_optimizer(args, adapter) for _ in range(args.rounds)]
    n_tensors = optimizer_runs[0][0]
    optimizer_s, flat_s = min(r[1] for r in optimizer_runs), min(r[2] for r in optimizer_runs)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"{args.family} {args.size} {args.resolution}px batch {args.batch} rank {args.rank} {args.dtype}"
        f"{' unet-only' if args.unet_only else ''} on {name}, torch {torch.__version__}"
    )
    print(f"  bare forward+backward : {bare_s * 1000:8.2f} ms/step  {1 / bare_s:7.2f} steps/s  peak {bare_mem}")
    print(
        f"  trainer step          : {trainer_s * 1000:8.2f} ms/step  {1 / trainer_s:7.2f} steps/s  peak {trainer_mem}"
    )
    print(f"  trainer overhead      : {(trainer_s / bare_s - 1) * 100:+.1f}%")
    print(
        f"  optimizer step        : {optimizer_s * 1000:8.2f} ms/step  ({optimizer_s / trainer_s * 100:.1f}% of the "
        f"trainer step; clip + AdamW foreach over {n_tensors} tensors)"
    )
    print(f"  ... on one flat tensor: {flat_s * 1000:8.2f} ms/step  (the same work without per-tensor overhead)")


if __name__ == "__main__":
    main()
