"""Data parallel training: the few collective operations the training loop needs.

N processes train one LoRA as one process would with N times the batch (kohya's ``train_batch_size``
is per device): every process builds the same dataset with the global batch, walks the same batches
in the same order, and trains on its own part of each batch (:meth:`Parallel.shard`). Gradients are
summed across the processes before each optimizer step, so every process applies the same update.

:func:`single_process` is the plain run (every operation does nothing, at no cost);
:func:`from_torch_distributed` wraps the default process group a launcher set up (``torch.distributed``:
gloo on the CPU, nccl on CUDA), e.g. under ``accelerate launch`` or ``torchrun``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lora_trainer.train.callbacks import Callbacks

__all__ = ["ListeningCallbacks", "Parallel", "from_torch_distributed", "single_process"]


class Parallel:
    """Where this process stands among the ones training together, and their collective operations.

    ``world_size`` processes, this one ``rank`` (0 is the main one: it reports, writes the files).
    ``device``: where the collective operations' tensors live (CUDA for nccl, else the CPU).
    """

    def __init__(self, world_size: int = 1, rank: int = 0, device: torch.device | str = "cpu"):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} of {world_size} processes")
        self.world_size, self.rank, self.device = int(world_size), int(rank), torch.device(device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Sum ``tensors`` across the processes, in place (one collective for all of them)."""
        if not self.distributed or not tensors:
            return
        import torch.distributed as dist

        dtype = torch.float32
        for t in tensors:  # float32 gradients travel as float32; float64 and whole numbers as float64
            dtype = torch.promote_types(dtype, t.dtype if t.is_floating_point() else torch.float64)
        flat = torch.cat([t.detach().reshape(-1).to(self.device, dtype) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n

    def sum_gradients_(self, params: Sequence[torch.Tensor]) -> None:
        """The gradients of ``params`` summed across the processes, in place.

        The training loop divides each process's loss by the whole batch's size, so the sum is the whole
        batch's gradient. A parameter with a gradient on any process gets one everywhere (zeros where it
        had none); one with none on every process keeps None (as ``zero_grad(set_to_none=True)`` leaves
        it, so the optimizer skips it as a single process would). The sums are equal on every process,
        so clipping, the NaN/inf check and the GradScaler decide alike everywhere. Two collectives per
        optimizer step (a flag per parameter, then all gradients in one buffer); none for one process.
        """
        if not self.distributed:
            return
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.float64)
        self.all_reduce_sum_([has])
        live = [p for p, n in zip(params, has.tolist(), strict=True) if n > 0]
        for p in live:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.all_reduce_sum_([p.grad for p in live if p.grad is not None])

    def sum(self, values: Sequence[float]) -> list[float]:
        """``values`` summed across the processes."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64)
        self.all_reduce_sum_([t])
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on any of them."""
        if not self.distributed:
            return bool(flag)
        return self.sum([1.0 if flag else 0.0])[0] > 0

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def shard(self, n: int) -> slice:
        """This process's part of a batch of ``n``: contiguous, sizes differing by at most one (the
        lower ranks take the extra samples), empty when ``n`` is smaller than the number of processes."""
        base, extra = divmod(int(n), self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))


class ListeningCallbacks(Callbacks):
    """The callbacks of a process other than the main one: silent, but a stop asked of any process
    stops them all (the loop agrees on it with ``Parallel.any``)."""

    def __init__(self, callbacks: Callbacks):
        self._callbacks = callbacks

    def should_stop(self) -> bool:
        return self._callbacks.should_stop()


def single_process() -> Parallel:
    """One process: every collective operation is a no-op."""
    return Parallel(1, 0)


def from_torch_distributed() -> Parallel:
    """The initialised default ``torch.distributed`` process group (CUDA tensors for nccl)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: start the processes with a launcher")
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    return Parallel(dist.get_world_size(), dist.get_rank(), device)
