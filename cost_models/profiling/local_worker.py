"""One rank of the local-cluster measurement (``local_cluster.py``): runs in its own process.

Every rank uses one thread, joins a gloo group over loopback, and then, with all ranks at
once: times the compute probes (and the model's ops when a graph is given), then each
collective kind over each group size, then send/recv between ranks 0 and 1. Rank 0's
collective timings are the group's (a collective ends on every rank at nearly the same time).
"""

from __future__ import annotations

import datetime
import os
import socket
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from autopar.cost_models.comm import Collective
from autopar.cost_models.profiling.local_cluster import FITTED_KINDS
from autopar.cost_models.profiling.probe import (
    PROBE_COPY_BYTES,
    PROBE_REPEATS,
    PROBE_SMALL_MATMUL_SIZE,
    _copy_bandwidth,
    _gemm_rate,
    _memory_bytes,
)
from autopar.cost_models.profiling.profiler import Clock, Statistic, Timing, device_name, time_call

GROUP_TIMEOUT = datetime.timedelta(minutes=5)
"""gloo timeout: a measurement that hangs ends instead of blocking forever."""
PROBE_GEMM_SIZE = 512
"""Square fp32 GEMM for the per-rank rate: large enough to run at the core's full rate."""
_ = PROBE_COPY_BYTES  # the copy probe's size is probe.py's


def free_port() -> int:
    """A TCP port free on loopback now (for the gloo rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_rank(rank: int, world: int, port: int, message_bytes: Sequence[int], repeats: int, queue: Any,
             graph: Any = None) -> None:
    """Measure as ``rank`` of ``world`` and put a dict of results on ``queue``."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=GROUP_TIMEOUT)
    try:
        dist.barrier()
        compute = _compute_probes()
        table = None
        if graph is not None:  # every rank profiles at once, so each op sees N busy ranks
            from autopar.cost_models.profiling.profiler import profile_graph

            dist.barrier()
            table = profile_graph(graph, device="cpu", repeats=3, warmup=1).to_dict()
        dist.barrier()
        compute.update(_dtensor_overhead(world))
        dist.barrier()
        collectives = _collectives(rank, world, message_bytes, repeats)
        queue.put({"rank": rank, "compute": compute, "collectives": collectives, "table": table,
                   "device_name": device_name(torch.device("cpu")), "host_mem_bytes": _memory_bytes(torch.device("cpu"))})
    finally:
        dist.destroy_process_group()


def _compute_probes() -> dict[str, float]:
    dev = torch.device("cpu")
    timing = Timing(repeats=PROBE_REPEATS, warmup=1, statistic=Statistic.MEDIAN, clock=Clock.WALL)
    peak = _gemm_rate(dev, torch.float32, PROBE_GEMM_SIZE, timing)
    one = torch.ones(1)
    floor = time_call(lambda: torch.add(one, 1.0), dev, timing)
    n = PROBE_SMALL_MATMUL_SIZE
    a = torch.randn(n, n)
    small = time_call(lambda: torch.mm(a, a), dev, timing)
    return {"gemm_flops_per_s": peak, "copy_bytes_per_s": _copy_bandwidth(dev, timing), "op_floor_s": floor,
            "half_efficiency_s": max(small - 2 * n**3 / peak, floor * 1e-3)}


DTENSOR_PROBE_SHAPE = (2, 8, 32)
"""(batch, sequence, hidden) of the DTensor probe: small, so its kernels take little next to dispatch."""


def _probe_block(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """A transformer-like sequence of ops: norm, projection, activation, projection, residual."""
    w_norm, w_up, w_down = weights
    h = torch.nn.functional.layer_norm(x, x.shape[-1:], w_norm)
    h = torch.nn.functional.gelu(torch.nn.functional.linear(h, w_up))
    return x + torch.nn.functional.linear(h, w_down).view(x.shape)


def _dtensor_overhead(world: int) -> dict[str, float]:
    """Host seconds DTensor adds per op: forward, and backward per forward op (``GPUSpec.dtensor_op_s``).

    The probe block runs forward and backward on plain tensors and on replicated DTensors over every
    rank (same kernels, no collectives); the difference of their times over the ATen ops one forward
    dispatches is what each op of a tensor-parallel stage pays (``emit/tp.py`` runs the whole stage on
    DTensors) on a rank whose host and device are one.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor
    from torch.utils._python_dispatch import TorchDispatchMode

    hidden = DTENSOR_PROBE_SHAPE[-1]
    plain = [torch.ones(hidden), torch.randn(4 * hidden, hidden), torch.randn(hidden, 4 * hidden)]
    x = torch.randn(*DTENSOR_PROBE_SHAPE)
    mesh = init_device_mesh("cpu", (world,))
    dtensors = [distribute_tensor(w, mesh, [Replicate()]) for w in plain]
    dx = distribute_tensor(x, mesh, [Replicate()])

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
            Count.ops += 1
            return func(*args, **(kwargs or {}))

    with Count():
        _probe_block(x, plain)
    timing = Timing(repeats=PROBE_REPEATS, warmup=2, statistic=Statistic.MEDIAN, clock=Clock.WALL)
    times = {}
    for name, inputs, weights in (("plain", x, plain), ("dtensor", dx, dtensors)):
        params = [w.detach().requires_grad_() for w in weights]
        forward = time_call(lambda: _probe_block(inputs, params), torch.device("cpu"), timing)

        def step() -> None:
            _probe_block(inputs, params).sum().backward()

        times[name] = (forward, time_call(step, torch.device("cpu"), timing) - forward)
    (plain_f, plain_b), (dt_f, dt_b) = times["plain"], times["dtensor"]
    return {"dtensor_op_s": max(0.0, dt_f - plain_f) / Count.ops,
            "dtensor_backward_op_s": max(0.0, dt_b - plain_b) / Count.ops}


def _collectives(rank: int, world: int, message_bytes: Sequence[int], repeats: int) -> dict:
    results: dict[tuple[str, int], list[tuple[int, float]]] = {}
    sizes = [g for g in (2, 4, 8, 16) if g <= world] + ([world] if world not in (2, 4, 8, 16) else [])
    for g in sizes:
        group = dist.new_group(list(range(g))) if g < world else None
        for kind in FITTED_KINDS:
            for nbytes in message_bytes:
                t = _time_collective(kind, nbytes, g, rank, group, repeats) if rank < g else None
                dist.barrier()
                if t is not None:
                    results.setdefault((kind.value, g), []).append((nbytes, t))
    for nbytes in message_bytes:
        t = _time_p2p(nbytes, rank, repeats)
        dist.barrier()
        if t is not None:
            results.setdefault((Collective.SEND_RECV.value, 2), []).append((nbytes, t))
    return results


def _time_collective(kind: Collective, nbytes: int, g: int, rank: int, group: Any, repeats: int) -> float:
    """Median seconds of one call; nbytes is NCCL's "size" (the full buffer)."""
    full = torch.ones(max(1, nbytes // 4))
    shard = torch.ones(max(1, nbytes // 4 // g))
    gathered = torch.empty(shard.numel() * g)

    def call() -> None:
        match kind:
            case Collective.ALL_REDUCE:
                dist.all_reduce(full, group=group)
            case Collective.ALL_GATHER:
                dist.all_gather_into_tensor(gathered, shard, group=group)
            case Collective.REDUCE_SCATTER:
                dist.reduce_scatter_tensor(shard, gathered, group=group)
            case Collective.BROADCAST:
                dist.broadcast(full, src=0, group=group)
            case _:
                raise ValueError(f"not timed: {kind}")

    call()  # warm-up (connections, buffers)
    samples = []
    for _ in range(repeats):
        dist.barrier(group=group)
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _time_p2p(nbytes: int, rank: int, repeats: int) -> float | None:
    """Half a ping-pong between ranks 0 and 1 (one message one way); other ranks idle."""
    if rank > 1:
        return None
    buf = torch.ones(max(1, nbytes // 4))
    peer = 1 - rank
    samples = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        if rank == 0:
            dist.send(buf, peer)
            dist.recv(buf, peer)
        else:
            dist.recv(buf, peer)
            dist.send(buf, peer)
        if i:  # the first round trip is the warm-up
            samples.append((time.perf_counter() - start) / 2)
    return statistics.median(samples) if rank == 0 else None
