"""Peak tensor bytes of a step on CPU, measured: what ``bench/plan_regret.py`` holds the memory model to.

At the start, the bytes of every distinct CPU storage held by a tensor the garbage collector can
reach (weights, optimizer states, the batch); during the step, the running sum of c10's CPU allocator
reports, which torch's profiler records with ``profile_memory=True`` (every allocation and free, inside
an op or not, in time order). The peak is the start plus the running sum's maximum, at op granularity:
scratch a kernel allocates and frees within one op is not seen. Only tensors count, as the memory
model counts them: Python objects, export caches and gloo's own buffers do not (a heap measure such as
glibc's ``mallinfo2`` reads 9-13 MB of those on top of a 16 MB model).
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch


def live_tensor_bytes() -> int:
    """Bytes of every distinct CPU storage held by a tensor the garbage collector can reach (a DTensor's
    local shard is such a tensor; its wrapper has no storage of its own)."""
    from torch.distributed.tensor import DTensor

    storages: dict[int, int] = {}
    for obj in gc.get_objects():  # type(), not isinstance: some objects warn when asked for __class__
        if issubclass(type(obj), torch.Tensor) and not issubclass(type(obj), DTensor) and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            if storage.data_ptr():
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def peak_tensor_bytes(step: Callable[[], None]) -> int:
    """Most tensor bytes alive during ``step()`` (see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    start = live_tensor_bytes()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    changes = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    level = peak = 0
    for _, nbytes in changes:
        level += nbytes
        peak = max(peak, level)
    return start + peak


__all__ = ["live_tensor_bytes", "peak_tensor_bytes"]
