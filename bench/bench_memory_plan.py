"""The memory plan's estimate against the measured peak of the tiny models, on the CPU.

    python bench/bench_memory_plan.py                   # SD1, SD2, SDXL tiny at a few settings
    python bench/bench_memory_plan.py --family sdxl --resolution 256 384

Measured: the peak of live tensors during a short training run (torch's profiler with
``profile_memory=True``, ``tests/fixtures/memory_probe.py``: every allocation and free of the CPU
allocator, autograd's saved tensors included, plus the model's own tensors), the CPU counterpart of
``torch.cuda.max_memory_allocated``. Estimated: ``lora_trainer.train.memory`` from the model's
sizes and the settings. ``ACTIVATION_SCALE`` in memory.py is fitted to these figures.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_trainer.train.memory import peak_bytes, profile_model, settings_from_config
from tests.fixtures.memory_probe import training_peak
from tests.fixtures.training import make_config, make_dataset
from tests.fixtures.webui_models import TinyAdapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", nargs="+", default=["sd1", "sd2", "sdxl"], choices=["sd1", "sd2", "sdxl"])
    parser.add_argument("--resolution", nargs="+", type=int, default=[256, 384])
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    grid = [(r, 1, False, 4) for r in args.resolution]
    grid += [(args.resolution[0], 2, False, 4), (args.resolution[0], 1, True, 4), (args.resolution[0], 1, False, 32)]
    print(
        f"{'model':10} {'px':>4} {'batch':>5} {'ckpt':>4} {'rank':>4} {'measured MB':>12} {'estimate MB':>12} {'est/meas':>8}"
    )
    for family in args.family:
        adapter = TinyAdapter(family)
        profile = profile_model(family, adapter.unet, adapter.text_encoders, adapter.root.first_stage_model)
        for resolution, batch, checkpointing, rank in grid:
            with tempfile.TemporaryDirectory() as tmp:
                tmp = Path(tmp)
                make_dataset(tmp / "data", n=2, size=resolution)
                cfg = make_config(
                    tmp,
                    **{
                        "dataset.resolution": resolution,
                        "dataset.cache_latents": True,
                        "training.max_train_steps": args.steps,
                        "training.train_batch_size": batch,
                        "training.gradient_checkpointing": checkpointing,
                        "network.network_dim": rank,
                        "network.network_alpha": rank,
                    },
                )
                measured = training_peak(adapter, cfg, tmp / "work")
                estimated = peak_bytes(profile, settings_from_config(cfg), "cpu")
            print(
                f"{family + ' tiny':10} {resolution:>4} {batch:>5} {'on' if checkpointing else 'off':>4} {rank:>4} "
                f"{measured / 1e6:>12.1f} {estimated / 1e6:>12.1f} {estimated / measured:>8.2f}"
            )


if __name__ == "__main__":
    main()
