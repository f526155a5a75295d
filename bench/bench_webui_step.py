"""A training job of fixed settings in a running WebUI, timed and measured from outside (its REST API).

    # 1. a full-size random SD1.5 checkpoint (bench/build_sd15_checkpoint.py), then the WebUI on it:
    #    python launch.py --api --no-half --use-cpu all --ckpt models/Stable-diffusion/bench_sd15.safetensors ...
    # 2. with the WebUI's pid (process memory is read from /proc/<pid>/status):
    python bench/bench_webui_step.py --pid $(cat webui.pid) [--url http://127.0.0.1:7861] [--checkpointing]
    python bench/bench_webui_step.py --pid ... --images-only /tmp/bench_images   # just write the images

Settings (the same as a kohya ``train_network.py`` run to compare with): 12 generated images of
256 px with captions (``<dir>/1_thing``), no buckets, batch 1, LoRA dim 32 / alpha 16 on the UNet
and the text encoder, AdamW, fp32, cached latents, seed 42, 12 steps, no previews, no saving
before the end; ``--checkpointing`` turns gradient checkpointing on.

Reports: time to first step (from the job's submission to step 1 showing in its status), s/step
over steps 3-12 (the status is polled every ``--poll`` seconds, 0.5 by default; each step's time is
when its number first shows, so 10 steps measure to about +-0.05 s/step; polling costs the WebUI CPU
time: every 50 ms it took about a fifth of one core of a 2-core machine from the run), process memory of the WebUI (VmRSS idle before the job, the highest VmRSS seen and VmHWM
during it, VmRSS a few seconds after it ends) and the job's own memory report (device peaks on
CUDA). Figures on a shared machine are indicative; alternate runs to compare.
"""

from __future__ import annotations

import argparse
import json
import random
import time
import urllib.error
import urllib.request
from pathlib import Path

GiB = 1024**3
WORDS = ("red", "blue", "green", "square", "circle", "stripe", "dot", "tree", "house", "cat", "sky", "stone")


def write_images(root: Path, count: int = 12, size: int = 256) -> Path:
    """``count`` coloured-shape images with captions in kohya's layout (``root/1_thing``), seeded."""
    from PIL import Image, ImageDraw

    folder = root / "1_thing"
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(42)
    for i in range(count):
        image = Image.new("RGB", (size, size))
        draw = ImageDraw.Draw(image)
        draw.rectangle((0, 0, size, size), fill=(rng.randrange(256), rng.randrange(256), rng.randrange(256)))
        for _ in range(6):
            x0, y0 = rng.randrange(size - 40), rng.randrange(size - 40)
            box = (x0, y0, x0 + rng.randrange(20, 120), y0 + rng.randrange(20, 120))
            draw.ellipse(box, fill=(rng.randrange(256), rng.randrange(256), rng.randrange(256)))
        image.save(folder / f"img{i:02d}.png")
        (folder / f"img{i:02d}.txt").write_text("thing, " + ", ".join(rng.sample(WORDS, 3)))
    return root


def proc_memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in bytes."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def call(url: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        raise SystemExit(f"{url}: {error.code} {error.read().decode(errors='replace')}") from None


def job_body(images: Path, name: str, checkpointing: bool) -> dict:
    return {
        "dataset": {"train_data_dir": str(images), "resolution": 256, "enable_bucket": False, "cache_latents": True},
        "network": {"network_dim": 32, "network_alpha": 16, "train_unet": True, "train_text_encoder": True},
        "optim": {"optimizer_type": "AdamW"},
        "training": {
            "max_train_steps": 12,
            "train_batch_size": 1,
            "mixed_precision": "no",
            "seed": 42,
            "gradient_checkpointing": checkpointing,
        },
        "save": {"output_name": name, "overwrite": True},
    }


def run_job(base: str, pid: int, body: dict, poll: float = 0.5) -> dict:
    """Submit, poll every ``poll`` seconds, and return the timings and memory seen."""
    idle = proc_memory(pid)["VmRSS"]
    submitted = time.perf_counter()
    job_id = call(f"{base}/lora-train/v1/jobs", body)["id"]
    step_times: dict[int, float] = {}
    peak_rss = idle
    while True:
        status = call(f"{base}/lora-train/v1/jobs/{job_id}?with_losses=false")
        now = time.perf_counter()
        step_times.setdefault(int(status.get("step") or 0), now)
        peak_rss = max(peak_rss, proc_memory(pid)["VmRSS"])
        if status["state"] not in ("queued", "running"):
            break
        time.sleep(poll)
    hwm = proc_memory(pid)["VmHWM"]
    time.sleep(5)
    after = proc_memory(pid)["VmRSS"]
    per_step = (step_times[12] - step_times[2]) / 10 if 12 in step_times and 2 in step_times else None
    return {
        "state": status["state"],
        "error": status.get("error"),
        "first_step_s": step_times[1] - submitted if 1 in step_times else None,
        "s_per_step": per_step,
        "rss_idle_gib": idle / GiB,
        "rss_peak_gib": peak_rss / GiB,
        "hwm_gib": hwm / GiB,
        "rss_after_gib": after / GiB,
        "job_memory": status.get("memory"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pid", type=int, help="the WebUI's process id")
    parser.add_argument("--url", default="http://127.0.0.1:7861")
    parser.add_argument("--images", type=Path, default=Path("/tmp/bench_webui_images"))
    parser.add_argument("--images-only", action="store_true", help="write the images and stop")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on")
    parser.add_argument("--name", default="bench_webui_step")
    parser.add_argument("--poll", type=float, default=0.5, help="seconds between status requests (default 0.5)")
    args = parser.parse_args()
    write_images(args.images)
    if args.images_only:
        print(f"images in {args.images / '1_thing'}")
        return
    if args.pid is None:
        parser.error("--pid is needed to read the WebUI's memory")
    result = run_job(args.url.rstrip("/"), args.pid, job_body(args.images, args.name, args.checkpointing), args.poll)
    result["checkpointing"] = args.checkpointing
    result["poll_s"] = args.poll
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
