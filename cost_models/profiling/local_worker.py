"""One rank of the local-cluster measurement (``local_cluster.py``): runs in its own process.

Every rank uses one thread, joins a gloo group over loopback, and then, with all ranks at
once: times the compute probes (and the model's ops when a graph is given), then each
collective kind over each group size, then send/recv between ranks 0 and 1. Rank 0's
collective timings are the group's (a collective ends on every rank at nearly the same time).

Collectives are timed as a training step issues them: each call after a burst of compute on every
rank (``IN_STEP_COMPUTE_S``), less the bursts' own time (``_in_step_s``). Back to back, a 16 KiB
all-reduce on 2 ranks of 2 cores took 0.23 ms and a 16 KiB send 0.10 ms; after 1 ms of GEMMs on
every rank they added 0.77 and 1.16 ms to the step. While a rank computes, its gloo transport
threads wait for its core, and the ranks reach the call with the skew their compute left.
"""

from __future__ import annotations

import datetime
import math
import os
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from autopar.cost_models.comm import Collective
from autopar.cost_models.profiling.dtensor_probe import measure_dtensor_host
from autopar.cost_models.profiling.fsdp_probe import measure_fsdp_host
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
IN_STEP_COMPUTE_S = 5e-3
"""Compute before each timed collective call (``_in_step_s``): about what a step runs between two of its
collectives here (a block's forward or backward on one micro-batch, a tensor-parallel sub-layer)."""
BURST_GEMM_SIZE = 256
"""Square fp32 GEMM the bursts are made of."""
_ = PROBE_COPY_BYTES  # the copy probe's size is probe.py's


def free_port() -> int:
    """A TCP port free on loopback now (for the gloo rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_rank(rank: int, world: int, port: int, message_bytes: Sequence[int], repeats: int, queue: Any,
             graph: Any = None, batch_graphs: Any = None, cores: int | None = None) -> None:
    """Measure as ``rank`` of ``world`` and put a dict of results on ``queue``; ``graph`` (and ``batch_graphs``,
    the model at other batch sizes: ``profile_graph``'s) are profiled too.

    Compute (the probes and the op table) is timed on the first ``cores`` ranks at once (every rank when None),
    the others waiting: a rank with a core of its own next to a fully busy host, the rate the cluster's "GPU"
    stands for (``Cluster.host_cores`` prices ranks beyond the cores taking turns)."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=GROUP_TIMEOUT)
    try:
        dist.barrier()
        computes = cores is None or rank < cores
        compute: dict[str, Any] = _compute_probes() if computes else {}
        table = None
        dist.barrier()
        if graph is not None and computes:
            from autopar.cost_models.profiling.profiler import profile_graph

            # profile_graph's 7 samples an op: with 3, two runs' predictions of one layout differed by up to 25 %
            table = profile_graph(graph, device="cpu", batch_graphs=batch_graphs).to_dict()
        dist.barrier()
        compute.update(measure_dtensor_host(world))
        dist.barrier()
        compute.update(measure_fsdp_host(world))
        dist.barrier()
        collectives = _collectives(rank, world, message_bytes, repeats, _burst())
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


def _burst() -> Callable[[], None]:
    """``IN_STEP_COMPUTE_S`` of GEMMs on this rank, the same number of GEMMs on every rank (the slowest rank's)."""
    a = torch.randn(BURST_GEMM_SIZE, BURST_GEMM_SIZE)
    timing = Timing(repeats=PROBE_REPEATS, warmup=1, statistic=Statistic.MEDIAN, clock=Clock.WALL)
    count = torch.tensor([math.ceil(IN_STEP_COMPUTE_S / time_call(lambda: torch.mm(a, a), torch.device("cpu"), timing))])
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    n = int(count.item())

    def burst() -> None:
        for _ in range(n):
            torch.mm(a, a)

    return burst


def _collectives(rank: int, world: int, message_bytes: Sequence[int], repeats: int,
                 burst: Callable[[], None]) -> dict:
    results: dict[tuple[str, int], list[tuple[int, float]]] = {}
    sizes = [g for g in (2, 4, 8, 16) if g <= world] + ([world] if world not in (2, 4, 8, 16) else [])
    for g in sizes:
        group = dist.new_group(list(range(g))) if g < world else None
        for kind in FITTED_KINDS:
            for nbytes in message_bytes:
                t = _time_collective(kind, nbytes, g, rank, group, repeats, burst) if rank < g else None
                dist.barrier()
                if t is not None:
                    results.setdefault((kind.value, g), []).append((nbytes, t))
    for nbytes in message_bytes:
        t = _time_p2p(nbytes, rank, repeats, burst)
        dist.barrier()
        if t is not None:
            results.setdefault((Collective.SEND_RECV.value, 2), []).append((nbytes, t))
    return results


def _in_step_s(call: Callable[[], None], burst: Callable[[], None], calls: int, group: Any) -> float:
    """Seconds one ``call`` adds to a run of compute: ``calls`` times (``burst``, ``call``), less ``calls`` bursts
    alone, each loop started at a barrier of ``group`` (every rank of it runs every loop); at least the call's own
    time back to back (a blocking call cannot cost a step less than itself: a smaller difference is noise)."""
    call()  # warm-up (connections, buffers)

    def loop(with_burst: bool, with_call: bool) -> float:
        dist.barrier(group=group)
        start = time.perf_counter()
        for _ in range(calls):
            if with_burst:
                burst()
            if with_call:
                call()
        return time.perf_counter() - start

    alone = loop(True, False)
    in_step = loop(True, True) - alone
    return max(in_step, loop(False, True)) / calls


def _time_collective(kind: Collective, nbytes: int, g: int, rank: int, group: Any, repeats: int,
                     burst: Callable[[], None]) -> float:
    """Seconds one call adds to a step (``_in_step_s``: the mean over calls, slow ones included); nbytes is
    NCCL's "size" (the full buffer).

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

    return _in_step_s(call, burst, calls_for(nbytes, repeats), group)


SMALL_MESSAGE_BYTES = 2**20
"""Messages up to this size take ``SMALL_MESSAGE_CALLS_FACTOR`` times the calls: their mean is set by rare slow
calls (a gloo thread waiting for a busy core), which a few dozen calls catch or miss by chance."""
SMALL_MESSAGE_CALLS_FACTOR = 5


def calls_for(nbytes: int, repeats: int) -> int:
    """Calls timed for one message size: ``repeats``, times ``SMALL_MESSAGE_CALLS_FACTOR`` for small
    messages. Every rank computes the same count (a collective needs every rank's call).

    Example:
        >>> calls_for(4096, 20), calls_for(2**22, 20)
        (100, 20)
    """
    return repeats * (SMALL_MESSAGE_CALLS_FACTOR if nbytes <= SMALL_MESSAGE_BYTES else 1)


def _time_p2p(nbytes: int, rank: int, repeats: int, burst: Callable[[], None]) -> float | None:
    """Seconds one message from rank 0 to rank 1 adds to their compute (``_in_step_s``, as a pipeline sends an
    activation after a stage's micro-batch), the larger of the two ranks' figures; other ranks compute alone."""
    buf = torch.ones(max(1, nbytes // 4))

    def call() -> None:
        if rank == 0:
            dist.send(buf, 1)
        elif rank == 1:
            dist.recv(buf, 0)

    t = torch.tensor([_in_step_s(call, burst, calls_for(nbytes, repeats), None)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item()) if rank == 0 else None
