"""A ``GPUSpec`` for the local device, measured in a second: peak GEMM rate, copy bandwidth, op floor.

Planning for a cluster uses data-sheet presets; checking the cost model against
the machine at hand (tests, ``bench/cost_model_accuracy.py``) needs the local
device described the same way. The rates measured here are what the device
reaches, so the spec's efficiencies are 1.0 by construction.
"""

from __future__ import annotations

import torch

from autopar.cost_models.cluster import GPUSpec
from autopar.cost_models.profiling.profiler import Clock, Statistic, Timing, device_name, time_call

PROBE_MATMUL_SIZE = {"cpu": 1024, "cuda": 8192}
"""Square GEMM size for the peak-rate probe (8192³ is the size autopar's H100 reference figure uses)."""
PROBE_SMALL_MATMUL_SIZE = 128
"""Square GEMM size whose excess time over the peak rate gives the start-up time (Hockney n½)."""
PROBE_COPY_BYTES = {"cpu": 64 * 2**20, "cuda": 1 * 2**30}
"""Buffer size for the bandwidth probe: well beyond the last-level cache."""
PROBE_REPEATS = 7
"""Samples per probe; the fastest is kept: other processes only ever add time to a sample."""
MIN_HALF_EFFICIENCY_FRACTION = 1e-3
"""Floor on the measured start-up time, as a fraction of the op floor (it must stay positive)."""
FALLBACK_HOST_MEM_BYTES = 16 * 2**30
"""Memory reported for a CPU whose OS does not say (no /proc/meminfo)."""


def probe_local_device(device: str | None = None, *, clock: str = "wall") -> GPUSpec:
    """Measure the local device (CUDA when present, else CPU) and describe it as a ``GPUSpec``.

    The CPU spec lists only ``float32``; a CUDA spec lists ``float32``, ``bfloat16`` and ``float16``.
    ``clock="thread"`` times CPU probes in thread CPU time (see ``profiler.Clock``).
    """
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    timing = Timing(repeats=PROBE_REPEATS, warmup=1, statistic=Statistic.MIN, clock=Clock(clock))
    dtypes = [torch.float32] if dev.type == "cpu" else [torch.float32, torch.bfloat16, torch.float16]
    peaks = {str(d).removeprefix("torch."): _gemm_rate(dev, d, PROBE_MATMUL_SIZE[dev.type], timing) for d in dtypes}
    one = torch.ones(1, device=dev)
    launch = time_call(lambda: torch.add(one, 1.0), dev, timing)
    small = PROBE_SMALL_MATMUL_SIZE
    a = torch.randn(small, small, device=dev)
    t_small = time_call(lambda: torch.mm(a, a), dev, timing)
    half = max(t_small - 2 * small**3 / peaks["float32"], launch * MIN_HALF_EFFICIENCY_FRACTION)
    return GPUSpec(name=device_name(dev), peak_flops_per_s=peaks, mem_bytes=_memory_bytes(dev),
                   mem_bytes_per_s=_copy_bandwidth(dev, timing), matmul_efficiency=1.0, memory_efficiency=1.0,
                   kernel_launch_s=launch, half_efficiency_s=half)


def _gemm_rate(dev: torch.device, dtype: torch.dtype, n: int, timing: Timing) -> float:
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    return 2 * n**3 / time_call(lambda: torch.mm(a, b), dev, timing)


def _copy_bandwidth(dev: torch.device, timing: Timing) -> float:
    nbytes = PROBE_COPY_BYTES[dev.type]
    src = torch.empty(nbytes // 4, device=dev, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    return 2 * nbytes / time_call(lambda: dst.copy_(src), dev, timing)  # a copy reads and writes every byte


def _memory_bytes(dev: torch.device) -> int:
    if dev.type == "cuda":
        return int(torch.cuda.get_device_properties(dev).total_memory)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return FALLBACK_HOST_MEM_BYTES


__all__ = ["probe_local_device"]
