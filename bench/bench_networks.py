"""Step time and memory per network algorithm, against plain LoRA at the same rank.

    python bench/bench_networks.py                                 # tiny SD1 on the CPU, 64 px
    python bench/bench_networks.py --family sdxl
    python bench/bench_networks.py --size full --device cuda --dtype fp16 --resolution 512

Each algorithm is attached to the same model in turn and trained for whole steps on data already
on the device: text encoding, the denoiser's forward, the MSE loss, the backward pass and an AdamW
step over the network's tensors. "lora" targets the Linear layers (kohya's LoRA); "locon" is LoRA
on the 3x3 and 1x1 convolutions too (``conv_dim`` = rank); "loha", "lokr" and "dora" also target
the convolutions at the same rank, as they are used (``--linear-only`` keeps every algorithm to
the Linear layers). Step times are the best of --rounds alternating runs, every run's figure being
the median over its timed steps after warm-up steps.

Memory: "state" is the network's parameters, their gradients and AdamW's two moments (exact);
"saved" is what autograd holds for the backward pass at the end of the forward (tensors counted
once per storage, the model's and network's own weights left out): the activation memory, which
is where the algorithms differ beyond their parameters (LoHa and LoKr build each layer's full
delta weight in the forward). On a GPU, "peak" is ``torch.cuda.max_memory_allocated`` during the
timed steps, less what was allocated before them (the model).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_trainer.naming import find_targets
from lora_trainer.networks.network import LoRANetwork
from lora_trainer.train import objectives
from lora_trainer.train.optim import build_optimizer
from tests.fixtures.webui_models import TinyAdapter

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# label -> (registered algorithm, targets the convolutions)
ALGORITHMS = {
    "lora": ("lora", False),
    "locon": ("lora", True),
    "loha": ("loha", True),
    "lokr": ("lokr", True),
    "dora": ("dora", True),
}
MIB = 2**20


@dataclass
class Result:
    label: str
    modules: int
    params: int
    state_bytes: int
    saved_bytes: int = 0
    peak_bytes: int | None = None
    medians: list[float] = field(default_factory=list)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SavedTensors:
    """Bytes autograd saves for the backward pass, once per storage, leaving ``exclude`` out."""

    def __init__(self, exclude: set[int]):
        self.exclude, self.storages = exclude, {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.exclude:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())


def build_network(args, adapter: TinyAdapter, label: str) -> LoRANetwork:
    algorithm, conv = ALGORITHMS[label]
    conv = conv and not args.linear_only
    encoders = None if args.unet_only else adapter.text_encoders
    targets = find_targets(adapter.family, adapter.unet, encoders, conv=conv)
    network = LoRANetwork(
        targets,
        rank=args.rank,
        alpha=args.rank,
        conv_rank=args.rank if conv else 0,
        conv_alpha=args.rank,
        algorithm=algorithm,
    )
    return network.to(adapter.device)


class Stepper:
    """Whole training steps of one network on fixed latents and captions."""

    def __init__(self, args, adapter: TinyAdapter):
        self.args, self.adapter = args, adapter
        device, b, r = adapter.device, args.batch, args.resolution
        self.latents = adapter.encode_images(torch.rand(b, 3, r, r) * 2 - 1).to(device, torch.float32)
        self.captions = [f"bench subject, photo {i}, plain background" for i in range(b)]
        self.alphas = adapter.alphas_cumprod.to(device, torch.float32)
        self.generator = torch.Generator().manual_seed(0)
        half = args.dtype != "fp32" and device.type == "cuda"
        self.autocast = torch.autocast(device.type, dtype=DTYPES[args.dtype], enabled=half)
        self.model_params = [
            *adapter.unet.parameters(),
            *(p for te in adapter.text_encoders.values() for p in te.parameters()),
        ]
        for p in self.model_params:
            p.requires_grad_(False)

    def forward_loss(self, network: LoRANetwork) -> torch.Tensor:
        adapter, b = self.adapter, self.args.batch
        noise = torch.randn(self.latents.shape, generator=self.generator).to(adapter.device)
        t = torch.randint(0, 1000, (b,), generator=self.generator).to(adapter.device)
        with self.autocast:
            cond = adapter.encode_text(self.captions, max_token_length=75)
            noisy = objectives.add_noise(self.latents, noise, t, self.alphas).to(adapter.dtype)
            pred = adapter.predict(noisy, t, cond)
        return torch.nn.functional.mse_loss(pred.float(), noise)

    def saved_bytes(self, network: LoRANetwork) -> int:
        own = {p.untyped_storage().data_ptr() for p in [*self.model_params, *network.parameters()]}
        saved = SavedTensors(own)
        with network.applied(), torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            loss = self.forward_loss(network)
        del loss
        return saved.nbytes

    def run(self, network: LoRANetwork, optimizer: torch.optim.Optimizer) -> tuple[list[float], int | None]:
        """Seconds per timed step, and the peak bytes on a GPU above what was allocated before."""
        device = self.adapter.device
        times: list[float] = []
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        with network.applied():
            for i in range(self.args.warmup + self.args.steps):
                start = time.perf_counter()
                self.forward_loss(network).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                sync(device)
                if i >= self.args.warmup:
                    times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else None
        return times, peak


def state_bytes(network: LoRANetwork, optimizer: torch.optim.Optimizer) -> int:
    """Parameters, gradients (one per parameter) and the optimizer's state tensors."""
    params = sum(p.numel() * p.element_size() for p in network.parameters())
    moments = sum(
        v.numel() * v.element_size()
        for state in optimizer.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor) and v.dim() > 0
    )
    return 2 * params + moments


def bench(args, adapter: TinyAdapter) -> list[Result]:
    stepper = Stepper(args, adapter)
    runs = []
    for label in args.algorithms:
        network = build_network(args, adapter, label)
        optimizer = build_optimizer("AdamW", list(network.parameters()), 1e-4, {"weight_decay": 0.01})
        n_params = sum(p.numel() for p in network.parameters())
        result = Result(label, len(list(network.loras())), n_params, 0, stepper.saved_bytes(network))
        runs.append((result, network, optimizer))
    # alternate the algorithms and keep each one's best median: on a shared machine the load
    # drifts, and interleaving keeps that drift out of the comparison
    for _ in range(args.rounds):
        for result, network, optimizer in runs:
            times, peak = stepper.run(network, optimizer)
            result.medians.append(statistics.median(times))
            if peak is not None:
                result.peak_bytes = max(result.peak_bytes or 0, peak)
    for result, network, optimizer in runs:
        result.state_bytes = state_bytes(network, optimizer)
    return [r for r, _, _ in runs]


def table(results: Sequence[Result]) -> list[str]:
    reference = next((r for r in results if r.label == "lora"), results[0])
    ref_s = min(reference.medians)
    gpu = any(r.peak_bytes is not None for r in results)
    head = f"  {'algorithm':<9} {'modules':>7} {'params':>10} {'ms/step':>9} {'vs lora':>8} {'state MiB':>10}"
    head += f" {'saved MiB':>10}" + (f" {'peak MiB':>9}" if gpu else "")
    lines = [head]
    for r in results:
        best = min(r.medians)
        line = f"  {r.label:<9} {r.modules:>7} {r.params:>10,} {best * 1000:>9.2f} {best / ref_s:>7.2f}x"
        line += f" {r.state_bytes / MIB:>10.2f} {r.saved_bytes / MIB:>10.2f}"
        if gpu:
            line += f" {(r.peak_bytes or 0) / MIB:>9.0f}"
        lines.append(line)
    return lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="sd1", choices=["sd1", "sd2", "sdxl"])
    parser.add_argument("--size", default="tiny", choices=["tiny", "full"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the algorithms")
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS))
    parser.add_argument("--unet-only", action="store_true")
    parser.add_argument("--linear-only", action="store_true", help="no algorithm targets the convolutions")
    args = parser.parse_args(argv)
    args.resolution = args.resolution or (64 if args.size == "tiny" else 512)
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    adapter = TinyAdapter(args.family, dtype=DTYPES[args.dtype], size=args.size, device=device)
    results = bench(args, adapter)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"{args.family} {args.size} {args.resolution}px batch {args.batch} rank {args.rank} {args.dtype}"
        f"{' unet-only' if args.unet_only else ''}{' linear-only' if args.linear_only else ''}"
        f" on {name}, torch {torch.__version__}"
    )
    print("\n".join(table(results)))


if __name__ == "__main__":
    main()
