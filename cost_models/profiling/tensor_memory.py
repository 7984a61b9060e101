"""Peak tensor bytes of a step on CPU, measured: what ``bench/plan_regret.py`` holds the memory model to.

PyTorch's CPU allocator is plain malloc, so the bytes malloc has handed out and not had back
(glibc's ``mallinfo2``: ``uordblks + hblkhd``) rise and fall with every tensor; they are read after
every ATen op of the step (a ``TorchDispatchMode``), so the peak is seen at op granularity with
every tensor alive at that moment (a kernel's scratch freed within one op is not). The heap also
holds what is not a tensor: Python objects, export caches, gloo's buffers (9-13 MB on a 16 MB
model). That part is taken as the heap at the start of the step minus the tensors alive then (every
distinct CPU storage of a tensor the garbage collector reaches: weights, optimizer states, the
batch, when no activation is alive), and subtracted from the peak.

torch's profiler (``profile_memory=True``) was tried first and is not used: it nets each op's
allocations and frees at the op's start time, so an autograd node's release of its saved tensors
lands before its kernel's allocation, and under FSDP2 a step's frees did not all appear (48 MB
never freed of a 65 MB peak).
"""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]


_LIBC = ctypes.CDLL("libc.so.6")
_LIBC.mallinfo2.restype = _MallInfo2


def heap_in_use() -> int:
    """Bytes malloc has handed out and not had back (glibc ``mallinfo2``: small blocks and mmapped ones)."""
    info = _LIBC.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def live_tensor_bytes() -> int:
    """Bytes of every distinct CPU storage held by a live tensor the garbage collector can reach, after a
    collection (a DTensor's local shard is such a tensor; its wrapper has no storage of its own)."""
    from torch.distributed.tensor import DTensor

    gc.collect()  # tensors only garbage (in unreachable cycles) are not alive
    storages: dict[int, int] = {}
    for obj in gc.get_objects():  # type(), not isinstance: some objects warn when asked for __class__
        if issubclass(type(obj), torch.Tensor) and not issubclass(type(obj), DTensor) and obj.device.type == "cpu":
            try:
                storage = obj.untyped_storage()
                ptr = storage.data_ptr()
            except RuntimeError:  # no real storage: a FakeTensor or FunctionalTensor an export left alive
                continue
            if ptr:
                storages[ptr] = storage.nbytes()
    return sum(storages.values())


class _PeakHeap(TorchDispatchMode):
    """The highest ``heap_in_use`` seen after any ATen op while active."""

    def __init__(self) -> None:
        super().__init__()
        self.peak = heap_in_use()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if any(issubclass(t, DTensor) for t in types):
            # let DTensor run it with this mode still active: the local ops it runs (a sharding rule's, or a
            # custom handler's such as loss_parallel's fused loss backward, whose 3 temporaries of the local
            # logits' size are freed before it returns) are then read one by one, as on a plain tensor
            return NotImplemented
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, heap_in_use())
        return out


def peak_tensor_bytes(step: Callable[[], None]) -> int:
    """Most tensor bytes alive after any op of ``step()``, with no activation alive at its start (see the
    module docstring)."""
    with _PeakHeap():  # the mode's own first-use allocations (Python's dispatch machinery) happen here
        torch.zeros(1).add_(1)
    tensors = live_tensor_bytes()  # collects first, so the heap read next has no garbage in it
    not_tensors = heap_in_use() - tensors
    with _PeakHeap() as heap:
        step()
    return heap.peak - not_tensors


__all__ = ["heap_in_use", "live_tensor_bytes", "peak_tensor_bytes"]
