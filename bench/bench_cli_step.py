"""Step time of the command line's model (a checkpoint file loaded into diffusers/transformers
modules) against the in-WebUI trainer's model (ldm/sgm-shaped modules) with the same weights.

    python bench/bench_cli_step.py                          # tiny SD1 checkpoint, 64 px, on the CPU
    python bench/bench_cli_step.py --family sdxl --repeats 5
    python bench/bench_cli_step.py --checkpoint model.safetensors --size full --resolution 512 --device cuda

Both runs are ``lora_trainer.train.loop.train`` with the same settings (cached latents, no
buckets, LoRA on the UNet and the text encoder, AdamW, constant LR, seed 0); only the adapter
differs: "command line" is ``load_checkpoint`` (``CheckpointAdapter``: diffusers UNet and VAE,
transformers text encoders, CLIP's tokenizer), "in-WebUI" is ``tests.fixtures.webui_models.TinyAdapter``,
the WebUI-shaped model the tab trains on (its toy tokenizer and fixed latent encoder; the latents are
cached before the timed steps, so neither VAE is in the figure). The WebUI-shaped run gets images
sized so that its latents are as large as the command line's (the tiny VAEs downscale by different
factors; with full-size models both are 8 and the sizes are equal). Without ``--checkpoint`` the checkpoint
is written by ``tests.fixtures.checkpoints.write_tiny_checkpoint`` from the same seed as the
WebUI-shaped model, so UNet and text encoder weights are equal; with ``--checkpoint`` the
WebUI-shaped model of ``--size`` gets every tensor of the file whose name and shape match (the
count is printed). The two alternate ``--repeats`` times; each run's figure is the median s/step
over its steps after ``--warmup``, and the printed figure is the median over the runs.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_trainer.backends.checkpoint.loader import load_checkpoint, read_state_dict
from lora_trainer.config import TrainConfig
from lora_trainer.train.callbacks import Callbacks
from lora_trainer.train.loop import train
from tests.fixtures.checkpoints import write_tiny_checkpoint
from tests.fixtures.webui_models import TinyAdapter


def make_images(folder: Path, n: int, size: int) -> None:
    sub = folder / "1_bench"
    sub.mkdir(parents=True)
    rng = random.Random(0)
    for i in range(n):
        color = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        Image.new("RGB", (size, size), color).save(sub / f"{i}.png")
        (sub / f"{i}.txt").write_text(f"bench subject, photo {i}, plain background")


def config(args: argparse.Namespace, resolution: int, data: Path, out: Path) -> TrainConfig:
    cfg = TrainConfig()
    cfg.dataset.train_data_dir = str(data)
    cfg.dataset.resolution = resolution
    cfg.dataset.enable_bucket = False
    cfg.dataset.cache_latents = True
    cfg.network.network_dim = args.rank
    cfg.network.network_alpha = args.rank
    cfg.optim.optimizer_type = "AdamW"
    cfg.optim.lr_scheduler = "constant"
    cfg.training.train_batch_size = args.batch
    cfg.training.max_train_steps = args.warmup + args.steps
    cfg.training.mixed_precision = "no"  # fp32 models
    cfg.training.seed = 0
    cfg.save.output_dir = str(out)
    cfg.save.overwrite = True
    return cfg


class StepTimer(Callbacks):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step(self, info) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())


def seconds_per_step(cfg: TrainConfig, adapter, warmup: int, work: Path) -> float:
    timer = StepTimer()
    train(cfg, adapter, timer, work_dir=work)
    steps = [b - a for a, b in zip(timer.times[warmup - 1 :], timer.times[warmup:], strict=False)]
    return statistics.median(steps)


def webui_shaped(args: argparse.Namespace, family: str, checkpoint: Path, given: bool) -> tuple[TinyAdapter, str]:
    """The WebUI-shaped model with the checkpoint's weights, and a line saying how many it took."""
    adapter = TinyAdapter(family, size=args.size, device=args.device, seed=args.seed)
    if not given:
        return adapter, "weights: the same seed (UNet and text encoder equal)"
    own = adapter.root.state_dict()
    state = read_state_dict(checkpoint)
    shared = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    adapter.root.load_state_dict(shared, strict=False)
    return adapter, f"weights: {len(shared)}/{len(own)} tensors taken from the checkpoint"


def downscale(adapter, device: str) -> int:
    """How many pixels make one latent pixel along a side with ``adapter``'s VAE."""
    return 64 // adapter.encode_images(torch.zeros(1, 3, 64, 64, device=device)).shape[-1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="sd1", choices=["sd1", "sd2", "sdxl"])
    parser.add_argument("--checkpoint", type=Path, default=None, help="a WebUI-layout checkpoint (default: a tiny one)")
    parser.add_argument("--size", default="tiny", choices=["tiny", "full"], help="the WebUI-shaped model's size")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: OpenMP threads spin on a busy machine)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = args.checkpoint or write_tiny_checkpoint(
            tmp / f"tiny_{args.family}.safetensors", args.family, args.seed
        )
        cli = load_checkpoint(checkpoint, device=args.device)
        webui, weights = webui_shaped(args, cli.family, checkpoint, args.checkpoint is not None)
        # the same latent size for both (the tiny VAEs downscale by different factors)
        webui_resolution = args.resolution * downscale(webui, args.device) // downscale(cli, args.device)
        make_images(tmp / "data", max(4, 2 * args.batch), args.resolution)
        make_images(tmp / "data_webui", max(4, 2 * args.batch), webui_resolution)
        cfg = config(args, args.resolution, tmp / "data", tmp / "out")
        webui_cfg = config(args, webui_resolution, tmp / "data_webui", tmp / "out")
        runs: dict[str, list[float]] = {"cli": [], "webui": []}
        for i in range(args.repeats):  # alternate, so drifting load on a shared machine hits both
            runs["cli"].append(seconds_per_step(cfg, cli, args.warmup, tmp / f"work_cli{i}"))
            runs["webui"].append(seconds_per_step(webui_cfg, webui, args.warmup, tmp / f"work_webui{i}"))

    cli_s, webui_s = statistics.median(runs["cli"]), statistics.median(runs["webui"])
    print(
        f"{cli.family} {checkpoint.name if args.checkpoint else 'tiny'} {args.resolution}px batch {args.batch} "
        f"rank {args.rank} fp32 on {args.device} ({args.threads} threads), {args.repeats} repeats x {args.steps} steps, "
        f"torch {torch.__version__}"
    )
    print(f"  {weights}; images {args.resolution} px (command line), {webui_resolution} px (WebUI-shaped)")
    print(f"  command line (checkpoint) : {cli_s:.4f} s/step")
    print(f"  in-WebUI (WebUI-shaped)   : {webui_s:.4f} s/step")
    print(f"  ratio command line / WebUI: {cli_s / webui_s:.2f}x")
    for label, key in (("command line", "cli"), ("WebUI-shaped", "webui")):
        print(f"  runs, {label:12s}: " + " ".join(f"{s:.4f}" for s in runs[key]))


if __name__ == "__main__":
    main()
