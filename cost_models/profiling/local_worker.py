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
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from autopar.cost_models.comm import Collective
from autopar.cost_models.profiling.dtensor_probe import measure_dtensor_host
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
             graph: Any = None, batch_graphs: Any = None) -> None:
    """Measure as ``rank`` of ``world`` and put a dict of results on ``queue``; ``graph`` (and ``batch_graphs``,
    the model at other batch sizes: ``profile_graph``'s) are profiled with every rank at once."""
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
            table = profile_graph(graph, device="cpu", repeats=3, warmup=1, batch_graphs=batch_graphs).to_dict()
        dist.barrier()
        compute.update(measure_dtensor_host(world))
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
    """Mean seconds of one call of ``repeats`` issued back to back; nbytes is NCCL's "size" (the full buffer).

    Not the median of calls each started at a barrier: a training step pays every call, including the slow
    ones (on a CPU whose cores all compute, gloo's transport threads wait to be scheduled; the median of 64 KiB
    all-reduces on 2 busy ranks was 0.56 ms and their mean 1.9 ms), and its ranks arrive without a barrier."""
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
    calls = calls_for(nbytes, repeats)
    dist.barrier(group=group)
    start = time.perf_counter()
    for _ in range(calls):  # back to back, as a step issues them (nccl-tests' method): the mean, tails included
        call()
    return (time.perf_counter() - start) / calls


SMALL_MESSAGE_BYTES = 2**20
"""Messages up to this size take ``SMALL_MESSAGE_CALLS_FACTOR`` times the calls: their mean is set by rare slow
calls (a gloo thread waiting for a busy core), which a few dozen calls catch or miss by chance."""
SMALL_MESSAGE_CALLS_FACTOR = 5


def calls_for(nbytes: int, repeats: int) -> int:
    """Calls timed back to back for one message size: ``repeats``, times ``SMALL_MESSAGE_CALLS_FACTOR`` for small
    messages. Every rank computes the same count (a collective needs every rank's call).

    Example:
        >>> calls_for(4096, 20), calls_for(2**22, 20)
        (100, 20)
    """
    return repeats * (SMALL_MESSAGE_CALLS_FACTOR if nbytes <= SMALL_MESSAGE_BYTES else 1)


def _time_p2p(nbytes: int, rank: int, repeats: int) -> float | None:
    """Half a ping-pong between ranks 0 and 1 (one message one way); other ranks idle."""
    if rank > 1:
        return None
    buf = torch.ones(max(1, nbytes // 4))
    peer = 1 - rank
    start, repeats = 0.0, calls_for(nbytes, repeats)
    for i in range(repeats + 1):
        if i == 1:  # the first round trip is the warm-up
            start = time.perf_counter()
        if rank == 0:
            dist.send(buf, peer)
            dist.recv(buf, peer)
        else:
            dist.recv(buf, peer)
            dist.send(buf, peer)
    return (time.perf_counter() - start) / (2 * repeats) if rank == 0 else None  # the mean, as for collectives
