"""The training device: its free memory, its throughput, and letting go of memory after an out-of-memory error.

``device_memory`` is what the hosts report as ``Host.free_memory()`` (CUDA: ``mem_get_info``; the
CPU: MemAvailable), ``device_throughput`` the matmul figure the plan's seconds per step divide by.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import sys
import time

import torch

from lora_trainer.contracts import DeviceMemory
from lora_trainer.meminfo import meminfo_bytes

_THROUGHPUT: dict[tuple[str, str], float] = {}


def available_ram() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    return meminfo_bytes("MemAvailable")


def device_memory(device: torch.device | str, *, attention: str = "", placement: str = "") -> DeviceMemory:
    """Free and total memory of ``device`` now: ``torch.cuda.mem_get_info`` on CUDA, available RAM on the CPU."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(device)
        name = torch.cuda.get_device_name(device)
        return DeviceMemory("cuda", int(free), int(total), name, attention, placement)
    if device.type == "cpu":
        return DeviceMemory("cpu", available_ram(), meminfo_bytes("MemTotal"), "CPU", attention, placement)
    return DeviceMemory(device.type, None, None, device.type, attention, placement)


def device_throughput(device: torch.device | str, dtype: torch.dtype = torch.float16) -> float:
    """Multiply-add throughput (FLOP/s) of a square matmul on ``device``, measured once and remembered."""
    device = torch.device(device)
    if device.type == "cpu":
        dtype = torch.float32
    key = (str(device), str(dtype))
    if key not in _THROUGHPUT:
        n = 2048 if device.type == "cuda" else 512
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        torch.matmul(a, b)
        _sync(device)
        reps = 10 if device.type == "cuda" else 3
        start = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b)
        _sync(device)
        _THROUGHPUT[key] = 2.0 * n**3 * reps / max(time.perf_counter() - start, 1e-9)
    return _THROUGHPUT[key]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_memory(exc: BaseException | None = None) -> None:
    """Let go of what an out-of-memory error holds (its tracebacks' frames), then collect, empty the
    device cache and trim the heap: after an error and at the end of every run."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    _trim_heap()


def _trim_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``): freed CPU tensors
    otherwise stay in the process's resident size."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's OutOfMemoryError (CUDA's is the same class), or a RuntimeError with a backend's
    out-of-memory message ("MPS backend out of memory", "HIP out of memory", older torch's CUDA one)."""
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    if isinstance(exc, oom):
        return True
    text = str(exc)
    if not isinstance(exc, RuntimeError):
        return False
    return any(f"{backend} out of memory" in text for backend in _BACKENDS) or _CPU_OOM in text


_BACKENDS = ("CUDA", "MPS backend", "HIP", "XPU")
_CPU_OOM = "DefaultCPUAllocator: can't allocate memory"
