"""Data parallel training: N processes with batch B train the same LoRA as one process with batch N*B.

The processes are real ones (torch.multiprocessing, spawn) joined by a gloo process group on the CPU."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
from torch.multiprocessing.spawn import spawn

from lora_trainer.data.buckets import BucketSettings
from lora_trainer.data.dataset import TrainDataset
from lora_trainer.data.scan import scan_dataset
from lora_trainer.files.lora_file import load_lora
from lora_trainer.train.callbacks import Callbacks
from lora_trainer.train.loop import train
from lora_trainer.train.parallel import Parallel, from_torch_distributed, single_process
from tests.fixtures.training import make_config, make_dataset
from tests.fixtures.webui_models import TinyAdapter

SETTINGS = {
    "training.max_train_steps": 3,
    "training.gradient_accumulation_steps": 2,
    "optim.max_grad_norm": 0.05,  # small enough to clip: the clipped norm is the whole batch's
    "dataset.cache_latents": True,
    "dataset.cache_latents_to_disk": True,
    "dataset.flip_aug": True,
    "dataset.shuffle_caption": True,
    # AdamW's tiny eps turns the float rounding of near-zero gradients (summed in another order) into whole steps
    "optim.optimizer_args": {"eps": 1.0},
}


class Reports(Callbacks):
    def __init__(self, stop_after=None):
        self.steps, self.saved, self.stop_after = 0, [], stop_after

    def on_step(self, info):
        self.steps += 1

    def should_stop(self):
        return self.stop_after is not None and self.steps >= self.stop_after

    def on_save(self, path, final):
        self.saved.append(str(path))


def _worker(rank, world, root, family, batch, stop_after):
    dist.init_process_group("gloo", init_method=f"file://{root}/group", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        cfg = make_config(root, **SETTINGS, **{"training.train_batch_size": batch})
        cfg.save.output_dir = str(root / "out")
        parallel = from_torch_distributed()
        reports = Reports(stop_after if rank == 0 else None)  # a stop asked of the main process stops all
        result = train(cfg, TinyAdapter(family), reports, work_dir=root / "work", parallel=parallel)
        if stop_after is not None:  # every process resumes from the state the main one wrote
            assert result.stopped_early
            reports.stop_after = None
            result = train(cfg, TinyAdapter(family), reports, work_dir=root / "work", resume=True, parallel=parallel)
        out = {"losses": result.losses, "steps": reports.steps, "saved": reports.saved, "seed": result.seed}
        (root / f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


def _data(tmp_path, images):
    make_dataset(tmp_path / "data", n=images, folder="1_subject")  # odd count: the last batch is short


@pytest.mark.parametrize(
    ("family", "world", "batch", "images", "stop_after"),
    [("sd1", 2, 1, 3, 1), ("sdxl", 2, 2, 5, None)],
)
def test_processes_train_as_one_process_with_their_whole_batch(tmp_path, family, world, batch, images, stop_after):
    """Odd image counts (a short last batch: a process with no samples in it), gradient accumulation,
    clipping, flipped cached latents from the main process's disk cache, shuffled captions; the sd1 run
    is stopped after a step and resumed (the state written by the main process, read by all)."""
    one, many = tmp_path / "one", tmp_path / "many"
    _data(one, images)
    _data(many, images)
    cfg = make_config(one, **SETTINGS, **{"training.train_batch_size": world * batch})
    single = train(cfg, TinyAdapter(family), work_dir=one / "work")

    spawn(_worker, args=(world, many, family, batch, stop_after), nprocs=world)

    ranks = [json.loads((many / f"rank{r}.json").read_text()) for r in range(world)]
    written = sorted((many / "out").iterdir())
    assert [p.name for p in written] == ["tiny.safetensors"]  # only the main process writes
    assert set(ranks[0]["saved"]) == {str(written[0])}  # a resumed run finishes the file it left
    assert ranks[1]["saved"] == []
    assert ranks[0]["steps"] == 3
    assert ranks[1]["steps"] == 0
    assert ranks[0]["seed"] == ranks[1]["seed"] == single.seed
    assert ranks[0]["losses"] == ranks[1]["losses"]
    assert ranks[0]["losses"] == pytest.approx(single.losses, rel=1e-5)
    assert single.output_path is not None
    want, _ = load_lora(single.output_path)
    got, meta = load_lora(written[0])
    assert meta["ss_batch_size_per_device"] == str(batch)
    assert meta["ss_total_batch_size"] == str(world * batch * 2)  # kohya's: every process's, accumulated
    assert want.keys() == got.keys()
    moved = 0
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-7)
        moved += int(not torch.equal(want[key], torch.zeros_like(want[key])))
    assert moved > 0


def test_shards_are_contiguous_even_and_cover_the_batch():
    for world in (1, 2, 3):
        for n in range(7):
            parts = [Parallel(world, r).shard(n) for r in range(world)]
            assert [i for p in parts for i in range(n)[p]] == list(range(n))
            sizes = [len(range(n)[p]) for p in parts]
            assert max(sizes) - min(sizes) <= 1
            assert sizes == sorted(sizes, reverse=True)
    assert Parallel(2, 1).shard(1) == slice(1, 1)  # an empty part


def test_a_single_process_does_nothing_collective():
    par = single_process()
    t = torch.ones(3)
    par.all_reduce_sum_([t])
    par.barrier()
    assert torch.equal(t, torch.ones(3))
    assert par.is_main
    assert par.any(True)
    assert not par.any(False)
    assert par.shard(4) == slice(0, 4)
    p = torch.nn.Parameter(torch.ones(2))
    par.sum_gradients_([p])
    assert p.grad is None  # left as it was
    with pytest.raises(RuntimeError, match="not initialised"):
        from_torch_distributed()


def test_a_part_of_a_batch_is_loaded_as_in_the_whole_batch(tmp_path):
    make_dataset(tmp_path / "data", n=5, folder="1_subject")
    items = scan_dataset(str(tmp_path / "data"))
    buckets = BucketSettings(resolution=(64, 64), enable_bucket=False)
    whole = TrainDataset(items, buckets, batch_size=4, flip_aug=True, seed=3)
    full = list(whole.iter_epoch(2))
    for rank in (0, 1):
        parts = list(whole.iter_epoch(2, shard=Parallel(2, rank).shard))
        for b, part in zip(full, parts, strict=True):
            cut = Parallel(2, rank).shard(len(b["indices"]))
            assert part["batch_size"] == len(b["indices"])
            assert part["batch_captions"] == b["captions"]
            assert part["indices"] == b["indices"][cut]
            assert part.get("flipped", []) == b["flipped"][cut]
            if part["indices"]:
                torch.testing.assert_close(part["pixels"], b["pixels"][cut], rtol=0, atol=0)
