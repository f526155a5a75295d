"""Process memory before, during and after training jobs on the stand-in WebUI (tiny models, CPU or GPU).

    python bench/bench_job_memory.py                       # SD1 tiny: done, stopped, failed
    python bench/bench_job_memory.py --family sdxl --steps 20 --rank 32

A warm-up job runs first (imports, allocator arenas, kernels' first use), then the idle resident
size is read and each ending runs in turn: resident size (``VmRSS``) before the job, its peak
while it runs (sampled each step) and right after it ended; on CUDA also the allocated device
memory. "after - idle" is what a run leaves behind in the process.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from lora_trainer.jobs import JobManager
from tests.fixtures.fake_webui import FakeWebUI
from tests.fixtures.training import make_config

MB = 2**20


def rss() -> int:
    """The process's resident size now (Linux ``/proc/self/status``), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def device_allocated() -> int:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


def run(manager: JobManager, host, tmp: Path, ending: str, args: argparse.Namespace) -> dict[str, int]:
    peak = {"rss": rss()}
    progress = host.on_job_progress

    def measuring_progress(job):
        progress(job)
        peak["rss"] = max(peak["rss"], rss())
        if job.step == args.steps // 2 and ending == "stopped":
            manager.cancel(job.id)
        if job.step == args.steps // 2 and ending == "failed":
            raise RuntimeError("failure injected by the benchmark")

    host.on_job_progress = measuring_progress
    overrides = {
        "training.max_train_steps": args.steps,
        "network.network_dim": args.rank,
        "network.train_text_encoder": True,
        "save.output_name": f"bench-{ending}",
    }
    cfg = make_config(tmp, **overrides)
    cfg.save.output_dir = None
    job = manager.wait(manager.start(cfg).id)
    host.on_job_progress = progress
    return {"state": job.state, "peak": peak["rss"], "after": rss(), "device": device_allocated()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="sd1", choices=["sd1", "sd2", "sdxl"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        fake = FakeWebUI(tmp / "webui", args.family)
        with fake.installed():
            host = fake.backend.host.WebUIHost()
            manager = JobManager(host)
            run(manager, host, tmp, "done", args)  # warm-up
            idle = rss()
            print(f"idle after a warm-up job: {idle / MB:.1f} MB (device allocated {device_allocated() / MB:.1f} MB)")
            print(f"{'ending':8} {'before MB':>10} {'peak MB':>9} {'after MB':>9} {'after-idle':>10} {'device MB':>9}")
            for ending in ("done", "stopped", "failed"):
                before = rss()
                r = run(manager, host, tmp, ending, args)
                print(
                    f"{r['state']:8} {before / MB:10.1f} {r['peak'] / MB:9.1f} {r['after'] / MB:9.1f} "
                    f"{(r['after'] - idle) / MB:+10.1f} {r['device'] / MB:9.1f}"
                )


if __name__ == "__main__":
    main()
