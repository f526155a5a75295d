"""Dataset workshop benchmark: import, clean, bucket and dedupe a generated image set.

Run by hand (not a test)::

    python bench/bench_workshop.py            # 1000 images, 256-1024 px
    python bench/bench_workshop.py --n 200 --keep

It generates ``--n`` images of varied sizes, formats and colour modes (JPEG, PNG, RGBA PNG,
WebP, greyscale, palette GIF, BMP, EXIF-rotated JPEG) with captions for half of them, in a
temporary folder, then times each workshop phase and prints images/s and memory:

* ``py peak``: tracemalloc's peak of Python-tracked allocations during the phase (numpy
  included; Pillow's pixel buffers are not tracked by tracemalloc);
* ``rss max``: the process's peak resident memory so far (``ru_maxrss``), which includes them.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import resource
import shutil
import sys
import tempfile
import time
import tracemalloc
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_trainer.data.images import load_image_rgb
from lora_trainer.workshop import Workspace

KINDS = [  # (kind, weight)
    ("jpeg", 35),
    ("png", 20),
    ("rgba_png", 10),
    ("webp", 10),
    ("gray_png", 5),
    ("gif", 5),
    ("bmp", 5),
    ("exif_jpeg", 10),
]


def make_one(args: tuple[int, str, str]) -> int:
    i, kind, folder = args
    rng = np.random.default_rng(i)
    w, h = (int(x) for x in rng.integers(256, 1025, 2))
    grid = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "RGB")
    arr = np.asarray(grid.resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
    arr = np.clip(arr + rng.integers(-6, 7, arr.shape), 0, 255).astype(np.uint8)  # a little grain
    img = Image.fromarray(arr, "RGB")
    base = Path(folder) / f"img_{i:05d}"
    if kind == "jpeg":
        img.save(base.with_suffix(".jpg"), quality=90)
    elif kind == "png":
        img.save(base.with_suffix(".png"))
    elif kind == "rgba_png":
        a = img.convert("RGBA")
        a.putalpha(Image.linear_gradient("L").resize((w, h)))
        a.save(base.with_suffix(".png"))
    elif kind == "webp":
        img.save(base.with_suffix(".webp"), quality=90)
    elif kind == "gray_png":
        img.convert("L").save(base.with_suffix(".png"))
    elif kind == "gif":
        img.convert("P", palette=Image.Palette.ADAPTIVE).save(base.with_suffix(".gif"))
    elif kind == "bmp":
        img.save(base.with_suffix(".bmp"))
    elif kind == "exif_jpeg":
        exif = Image.Exif()
        exif[0x0112] = 6
        img.save(base.with_suffix(".jpg"), quality=90, exif=exif.tobytes())
    if i % 2 == 0:
        base.with_suffix(".txt").write_text(f"tag_{i % 17}, tag_{i % 5}, shared tag", encoding="utf-8")
    return w * h


def generate(folder: Path, n: int, seed: int, workers: int) -> int:
    rnd = random.Random(seed)
    kinds = rnd.choices([k for k, _ in KINDS], weights=[w for _, w in KINDS], k=n)
    jobs = []
    for i, kind in enumerate(kinds):
        sub = folder / ("10_subject" if i % 4 else "3_background")
        sub.mkdir(parents=True, exist_ok=True)
        jobs.append((i, kind, str(sub)))
    with ProcessPoolExecutor(max_workers=workers) as ex:
        return sum(ex.map(make_one, jobs, chunksize=16))


def add_duplicates(folder: Path, k: int) -> None:
    """k exact copies and k resized, re-encoded copies of existing images (dedupe must find them)."""
    files = sorted(p for p in folder.rglob("img_*") if p.suffix != ".txt")[: 2 * k]
    for p in files[:k]:
        shutil.copyfile(p, p.with_name("dup_exact_" + p.name))
    for p in files[k:]:
        img = load_image_rgb(p)  # upright, transparency on white: what the workshop compares
        small = img.resize((img.width * 4 // 5, img.height * 4 // 5))
        small.save(p.with_name("dup_near_" + p.stem + ".jpg"), quality=80)


def rss_mib() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1 << 20) if sys.platform == "darwin" else r / 1024


def phase(name: str, n: int, fn):
    tracemalloc.start()
    t0 = time.perf_counter()
    result = fn()
    dt = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(
        f"{name:<22} {dt:8.2f} s {n / dt:9.1f} img/s   py peak {peak / (1 << 20):7.1f} MiB   rss max {rss_mib():7.0f} MiB"
    )
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="images to generate (default 1000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes for generating only")
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--dupes", type=int, default=10, help="exact and near copies added (each; default 10)")
    args = ap.parse_args()

    work = Path(args.dir or tempfile.mkdtemp(prefix="bench_workshop_"))
    src = work / "src"
    try:
        print(f"python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs; work folder {work}")
        t0 = time.perf_counter()
        pixels = generate(src, args.n, args.seed, args.workers)
        add_duplicates(src, args.dupes)
        size = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
        print(
            f"generated {args.n} images + {2 * args.dupes} duplicates ({pixels / args.n / 1e6:.2f} MP mean, {size / (1 << 20):.0f} MiB on disk) "
            f"in {time.perf_counter() - t0:.1f} s\n"
        )
        n = args.n + 2 * args.dupes
        ws = Workspace.create(work / "workspaces", "bench")
        imp = phase("import_folder", n, lambda: ws.import_folder(src))
        cl = phase("clean", n, ws.clean)
        bk = phase("bucket_report (1024)", n, lambda: ws.bucket_report(1024))
        dd = phase("find_duplicates", n, ws.find_duplicates)  # fingerprints cached by clean()
        (ws.path / ".workshop" / "hashes.json").unlink()
        phase("bucket_report headers", n, lambda: ws.bucket_report(1024))  # no cache: header reads
        dd2 = phase("find_duplicates cold", n, ws.find_duplicates)
        ts = phase("tags", n, ws.tags)
        ed = phase("bulk_replace + undo", n, lambda: (ws.bulk_replace({"shared tag": "common tag"}), ws.undo()))
        print()
        print(
            f"imported {len(imp.imported)}, skipped {imp.skipped}; cleaned: {cl.kept} kept, {cl.converted} converted, "
            f"{cl.quarantined} quarantined; {len(bk.buckets)} buckets; duplicates: {len(dd.exact)} exact, "
            f"{len(dd.near)} near (cold run: {len(dd2.near)} near); {len(ts.tags)} distinct tags; "
            f"bulk edit changed {len(ed[0].changed)} captions"
        )
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
