"""This machine as a cluster of N ranks: per-rank compute, gloo collectives and send/recv, measured.

A planner's predictions can only be checked against runs on hardware at hand. On a CPU
machine that hardware is N gloo processes of one thread each, so this module measures
exactly that:

* compute per rank with min(N, cores) processes running at once (one thread each), so the rates
  include the memory-bandwidth and cache contention of a fully busy machine: a GEMM rate, a copy
  bandwidth, the floor of one eager op and the start-up time of a small GEMM (as ``probe.py``),
  and the model's ops (the calibration table). These are a rank with a core of its own; with more
  ranks than cores the cluster file says how many cores the ranks share (``host_cores``), and the
  planner prices the ranks a layout keeps busy beyond them taking turns (``evaluate.host_wait``): a
  layout on 3 of 4 ranks gets 2/3 of a core each, one on 2 a core each (a fixed half core per rank
  over-predicted GPT's 3-stage pipelines on 4 ranks of 2 cores by half);
* the host time DTensor adds to each op (forward, and backward per forward op) and FSDP2 adds per
  unit, measured with all N ranks at once (these need the group). DTensor's is a difference of short
  runs of ops, which run inside one time slice at a core's speed (11.6 us per op on 4 ranks of 2 cores,
  12.7 on 2), and is kept; FSDP2's is a difference of steps of four micro-batches, which get only their
  share of a core (1.16 ms on 4 ranks, 0.57 on 2), and is scaled to a core of its own (``core_share``);
* for each collective kind (all-reduce, all-gather, reduce-scatter, broadcast) and group size
  (2, 4, ... up to N), the time a call adds to a run of compute (as a step issues it: after a
  burst of compute on every rank, ``local_worker._in_step_s``) over message sizes, fitted as t = alpha + beta · S (Hockney's
  alpha-beta model) by least squares;
* point-to-point send/recv between two ranks, fitted the same way.

``cluster_yaml`` turns the measurement into a cluster file that ``autopar plan --cluster``
reads: the "GPU" is one single-threaded rank; the per-kind fits go in ``measured_collectives``,
which the collective model uses for those kinds and sizes; the one intra-node link (for
anything not measured) is the least-squares fit of the ring model (``comm.py``: ring steps ×
latency plus bus bytes / bandwidth) to every sample.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from autopar.cost_models.cluster import DTENSOR_HOST_FIELDS
from autopar.cost_models.comm import RING_BASE_LATENCY_S, Collective, bus_bandwidth_factor
from autopar.cost_models.profiling.calibration import CalibrationTable
from autopar.graph.ir import OpGraph

log = logging.getLogger(__name__)

MESSAGE_BYTES = (2**12, 2**16, 2**18, 2**20, 2**22)
"""Logical sizes (NCCL "size") each collective is timed at: 4 KiB (latency) to 4 MiB (bandwidth)."""
COLLECTIVE_REPEATS = 20
"""Calls per (kind, group, size), each after a burst of compute; their mean cost is kept (``local_worker._in_step_s``)."""
FITTED_KINDS = (Collective.ALL_REDUCE, Collective.ALL_GATHER, Collective.REDUCE_SCATTER, Collective.BROADCAST)
"""Collectives the emitted programs issue on gloo (DDP/FSDP: all-reduce, all-gather, reduce-scatter)."""
MIN_LATENCY_S = 1e-7
"""Floor on a fitted per-step latency (the cluster schema needs it positive)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AlphaBetaFit:
    """t = alpha_s + nbytes · beta_s_per_byte for one collective kind at one group size."""

    kind: Collective
    """The collective."""
    group_size: int
    """Ranks in the group (2 for send/recv)."""
    alpha_s: float
    """Fixed cost per call (fitted intercept, clamped at 0)."""
    beta_s_per_byte: float
    """Seconds per byte of logical size S (fitted slope)."""
    samples: tuple[tuple[int, float], ...]
    """(nbytes, mean seconds a call adds to a step: ``local_worker._in_step_s``) that were fitted."""

    def time_s(self, nbytes: float) -> float:
        """The fitted time of one call of logical size ``nbytes``."""
        return self.alpha_s + nbytes * self.beta_s_per_byte

    @property
    def bus_bytes_per_s(self) -> float:
        """Bus bandwidth the slope implies: busbw factor / beta (nccl-tests convention)."""
        factor = bus_bandwidth_factor(self.kind, self.group_size)
        return factor / self.beta_s_per_byte if self.beta_s_per_byte > 0 else math.inf


@dataclass(frozen=True, slots=True, kw_only=True)
class RankCompute:
    """What one single-threaded rank with a core of its own reaches while the machine is busy."""

    gemm_flops_per_s: float
    """fp32 GEMM rate (median over ranks)."""
    copy_bytes_per_s: float
    """Copy bandwidth, read + write (median over ranks)."""
    op_floor_s: float
    """Time of a one-element eager op (median over ranks)."""
    half_efficiency_s: float
    """Excess time of a small GEMM over the peak rate (Hockney's n½ as time)."""
    dtensor_op_s: float = 0.0
    """Host time DTensor adds per forward op on a rank (``dtensor_probe.op_overhead``; median over ranks)."""
    dtensor_backward_op_s: float = 0.0
    """The same for the backward ops of one forward op."""
    dtensor_collective_s: float = 0.0
    """Host time a DTensor redistribution adds to its collective (``dtensor_probe.collective_overhead``)."""
    dtensor_hook_s: float = 0.0
    """Host time of one Megatron *f* in forward (``dtensor_probe.hook_overhead``)."""
    dtensor_hook_backward_s: float = 0.0
    """The same in backward."""
    fsdp_unit_s: float = 0.0
    """Host time FSDP2 adds per unit and micro-batch (``fsdp_probe.measure_fsdp_host``)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalClusterProfile:
    """The measured local machine as N ranks."""

    device_name: str
    """One rank's device as calibration tables name it (``cpu:<model>:1threads``)."""
    ranks: int
    """N, the ranks measured at once."""
    compute: RankCompute
    """Per-rank compute, all ranks busy."""
    collectives: tuple[AlphaBetaFit, ...]
    """One fit per (collective kind, group size), plus send/recv."""
    host_mem_bytes: int
    """Memory of the machine (each rank's share is host_mem_bytes / ranks)."""
    calibration: CalibrationTable | None = None
    """The model's ops timed on rank 0 while min(N, cores) ranks profiled them at once (None: no model given)."""
    host_cores: int = 0
    """The cores the ranks share (``Cluster.host_cores``)."""


def fit_alpha_beta(samples: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (alpha, beta) of t = alpha + beta · S, each sample weighted by 1/t².

    Relative weights keep the 4 KiB samples (which fix alpha) from being drowned by the
    large ones (which fix beta). Alpha is clamped at 0 (a negative intercept is noise).

    Example:
        >>> a, b = fit_alpha_beta([(0, 1e-5), (1e6, 1e-5 + 1e-3), (2e6, 1e-5 + 2e-3)])
        >>> round(a * 1e6, 3), round(b * 1e9, 3)
        (10.0, 1.0)
    """
    if len(samples) < 2:
        raise ValueError(f"an alpha-beta fit needs at least 2 samples, got {len(samples)}")
    w = [1.0 / (t * t) for _, t in samples]
    sw = sum(w)
    sx = sum(wi * s for wi, (s, _) in zip(w, samples))
    sy = sum(wi * t for wi, (_, t) in zip(w, samples))
    sxx = sum(wi * s * s for wi, (s, _) in zip(w, samples))
    sxy = sum(wi * s * t for wi, (s, t) in zip(w, samples))
    det = sw * sxx - sx * sx
    if det <= 0:
        raise ValueError("alpha-beta fit needs at least two distinct message sizes")
    beta = (sw * sxy - sx * sy) / det
    alpha = (sy - beta * sx) / sw
    if alpha < 0:  # refit through the origin
        alpha, beta = 0.0, sxy / sxx
    return alpha, max(beta, 0.0)


def fit_link(fits: Sequence[AlphaBetaFit]) -> tuple[float, float]:
    """(latency_s per ring step, bus bytes/s) of one link that best explains every collective sample.

    ``comm.py`` prices a ring collective as RING_BASE_LATENCY_S + steps · latency + busbw-factor · S
    / bandwidth; that is linear in (latency, 1 / bandwidth), so a relative least-squares fit over all
    samples gives the link. Send/recv is one step with factor 1.

    Example:
        >>> f = AlphaBetaFit(kind=Collective.ALL_REDUCE, group_size=2, alpha_s=0.0, beta_s_per_byte=0.0,
        ...                  samples=((1000, RING_BASE_LATENCY_S + 2 * 1e-5 + 1000 / 1e9),
        ...                           (10**6, RING_BASE_LATENCY_S + 2 * 1e-5 + 10**6 / 1e9)))
        >>> lat, bw = fit_link([f])
        >>> round(lat * 1e6, 3), round(bw / 1e9, 3)
        (10.0, 1.0)
    """
    rows = []  # (steps, bus bytes, seconds)
    for fit in fits:
        steps = _ring_steps(fit.kind, fit.group_size)
        factor = bus_bandwidth_factor(fit.kind, fit.group_size)
        rows += [(steps, factor * s, t - RING_BASE_LATENCY_S) for s, t in fit.samples]
    w = [1.0 / max(abs(y), 1e-9) ** 2 for *_, y in rows]
    a11 = sum(wi * p * p for wi, (p, _, _) in zip(w, rows))
    a12 = sum(wi * p * q for wi, (p, q, _) in zip(w, rows))
    a22 = sum(wi * q * q for wi, (_, q, _) in zip(w, rows))
    b1 = sum(wi * p * y for wi, (p, _, y) in zip(w, rows))
    b2 = sum(wi * q * y for wi, (_, q, y) in zip(w, rows))
    det = a11 * a22 - a12 * a12
    if det <= 0:
        raise ValueError("link fit needs samples of at least two sizes")
    latency = (a22 * b1 - a12 * b2) / det
    inv_bw = (a11 * b2 - a12 * b1) / det
    if latency < MIN_LATENCY_S:  # refit the bandwidth alone with the latency at its floor
        latency = MIN_LATENCY_S
        inv_bw = sum(wi * q * (y - p * latency) for wi, (p, q, y) in zip(w, rows)) / a22
    if inv_bw <= 0:
        raise ValueError(f"collective times do not grow with message size (slope {inv_bw}); measure again")
    return latency, 1.0 / inv_bw


def _ring_steps(kind: Collective, group_size: int) -> int:
    """Ring steps comm.py charges a latency for (inside one node)."""
    if kind is Collective.SEND_RECV:
        return 1
    return 2 * (group_size - 1) if kind is Collective.ALL_REDUCE else group_size - 1


def cluster_yaml(profile: LocalClusterProfile, *, name: str = "local") -> str:
    """The cluster file ``Cluster.from_yaml`` reads: one node of N single-threaded "GPUs"."""
    latency, bus_bw = fit_link(profile.collectives)
    c = profile.compute
    lines = [
        f"# {name}: this machine measured as {profile.ranks} gloo ranks of one thread each",
        f"# (autopar profile --ranks). Compute was timed on {min(profile.ranks, profile.host_cores)} ranks at once, "
        "a core each;",
        f"# the {profile.ranks} ranks share the {profile.host_cores} cores (host_cores) and take turns beyond them.",
        f"# link = least-squares fit of comm.py's ring model to all samples: "
        f"latency {latency * 1e6:.1f} us/step, bus {bus_bw / 1e6:.0f} MB/s",
        "# per-kind alpha-beta fits (t = alpha + S * beta; busbw = factor / beta):",
        *(f"#   {f.kind.value:15s} n={f.group_size}: alpha {f.alpha_s * 1e6:9.1f} us, "
          f"busbw {f.bus_bytes_per_s / 1e6:9.1f} MB/s" for f in profile.collectives),
        f"name: {name}",
        f"description: {profile.ranks} local gloo ranks, 1 thread each ({profile.device_name})",
        "gpu:",
        f"  name: {_quote(profile.device_name)}",
        f"  peak_flops_per_s: {{float32: {c.gemm_flops_per_s:.6g}}}",
        f"  mem_bytes: {profile.host_mem_bytes // profile.ranks}",
        f"  mem_bytes_per_s: {c.copy_bytes_per_s:.6g}",
        "  matmul_efficiency: 1.0  # measured rates are what a rank reaches",
        "  memory_efficiency: 1.0",
        f"  kernel_launch_s: {c.op_floor_s:.6g}",
        f"  half_efficiency_s: {c.half_efficiency_s:.6g}",
        f"  dtensor_op_s: {c.dtensor_op_s:.6g}  # added per op of a tensor-parallel stage (host runs the kernels)",
        f"  dtensor_backward_op_s: {c.dtensor_backward_op_s:.6g}",
        f"  dtensor_collective_s: {c.dtensor_collective_s:.6g}  # added per collective a tensor-parallel stage issues",
        f"  dtensor_hook_s: {c.dtensor_hook_s:.6g}  # per Megatron f (from_local/to_local) in forward",
        f"  dtensor_hook_backward_s: {c.dtensor_hook_backward_s:.6g}",
        f"  fsdp_unit_s: {c.fsdp_unit_s:.6g}  # per FSDP2 unit and micro-batch (its hooks on the host)",
        "  grad_reduce_overlaps: false  # no streams on a CPU: FSDP2's gradient reduce blocks the backward",
        f"gpus_per_node: {profile.ranks}",
        "nodes: 1",
        *_link_lines("intra_node", latency, bus_bw),
        *_link_lines("inter_node", latency, bus_bw),
        f"host_mem_bytes: {profile.host_mem_bytes}",
        f"host_cores: {profile.host_cores}  # the ranks' \"GPUs\" are threads on these cores",
        "measured_collectives:  # kind: {group size: [alpha_s, beta_s_per_byte]}; these replace the link",
        *_fit_lines(profile.collectives),
    ]
    return "\n".join(lines) + "\n"


def _fit_lines(fits: Sequence[AlphaBetaFit]) -> list[str]:
    lines = []
    for kind in dict.fromkeys(f.kind for f in fits):
        sizes = ", ".join(f"{f.group_size}: [{f.alpha_s:.6e}, {f.beta_s_per_byte:.6e}]" for f in fits if f.kind is kind)
        lines.append(f"  {kind.value}: {{{sizes}}}")
    return lines


def _link_lines(key: str, latency: float, bus_bw: float) -> list[str]:
    return [f"{key}:", "  kind: ethernet  # TCP over loopback", f"  bytes_per_s: {bus_bw:.6g}",
            f"  latency_s: {latency:.6g}", "  efficiency: 1.0"]


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# ---- measurement (torch from here on) -----------------------------------------------------------


def measure_local_cluster(ranks: int, *, graph: OpGraph | None = None,
                          batch_graphs: Mapping[float, OpGraph] | None = None,
                          message_bytes: Sequence[int] = MESSAGE_BYTES,
                          repeats: int = COLLECTIVE_REPEATS) -> LocalClusterProfile:
    """Start ``ranks`` gloo processes on this machine and measure them (takes ~10-60 s).

    Args:
        ranks: N, the processes started at once (one thread each).
        graph: a captured model whose ops every rank profiles at once; rank 0's table is kept.
        batch_graphs: the same model captured at other batch sizes, by batch scale, profiled too
            (``profiler.profile_graph``).
        message_bytes: the sizes each collective is timed at.
        repeats: timed calls per size.

    Raises:
        ValueError: fewer than 2 ranks.
    """
    if ranks < 2:
        raise ValueError(f"a local cluster needs at least 2 ranks, got {ranks}")
    from autopar.cost_models.profiling import local_worker

    port = local_worker.free_port()
    cores = host_cores()
    results = run_and_gather(local_worker.run_rank, (ranks, port, tuple(message_bytes), repeats),
                             (graph, dict(batch_graphs or {}), cores), ranks)
    if len(results) != ranks:
        raise RuntimeError(f"{ranks - len(results)} of {ranks} ranks ended without a result")
    return _combine(results, ranks, cores)


def run_and_gather(worker: Callable[..., None], head: tuple[Any, ...], tail: tuple[Any, ...],
                   nprocs: int) -> list[Any]:
    """Run ``worker(rank, *head, queue, *tail)`` in ``nprocs`` spawned processes and return everything they put on
    ``queue``, read while they run.

    A result larger than a pipe's buffer (a rank's op table, a long run of timings) blocks its ``put`` until
    someone reads it: waiting for the processes to end before reading would wait forever (it did, for Llama on 4
    ranks). A process that fails raises here (torch's ``ProcessRaisedException`` or ``ProcessExitedException``).
    """
    import queue as queue_module

    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").Queue()
    context = mp.start_processes(worker, args=(*head, queue, *tail), nprocs=nprocs, join=False, start_method="spawn")
    results: list[Any] = []
    done = False
    while True:
        try:
            results.append(queue.get(timeout=_POLL_S))
        except queue_module.Empty:
            if done:
                return results  # every process has ended, and what they put has been read
            done = context.join(timeout=0)  # raises if a process failed; True once all have ended


_POLL_S = 0.5
"""How long ``run_and_gather`` waits for a result before checking whether a rank has failed."""


def host_cores() -> int:
    """The cores this process may run on (its ranks share them)."""
    return len(os.sched_getaffinity(0))


def core_share(ranks: int, cores: int) -> float:
    """The share of a core each of ``ranks`` busy single-threaded ranks sustains on ``cores`` cores: 1 while
    there is a core per rank, cores / ranks beyond (they take turns in time slices of milliseconds).

    Example:
        >>> core_share(2, cores=2), core_share(4, cores=2), core_share(3, cores=8)
        (1.0, 0.5, 1.0)
    """
    return min(1.0, cores / ranks)


def _combine(results: Sequence[Mapping[str, Any]], ranks: int, cores: int) -> LocalClusterProfile:
    """One profile from every rank's results. Compute comes from the ranks that timed it (a core each). The host
    times DTensor and FSDP2 add were timed with all ``ranks`` taking turns on ``cores``: DTensor's per-op figure
    (short runs of ops, inside one time slice) is kept, FSDP2's per-unit one (steps of tens of milliseconds,
    which get only their share) is scaled to a core of its own (× ``core_share``)."""
    first = next(r for r in results if r["rank"] == 0)
    share = core_share(ranks, cores)

    def med(key: str) -> float:
        return statistics.median(r["compute"][key] for r in results if key in r["compute"])

    compute = RankCompute(gemm_flops_per_s=med("gemm_flops_per_s"), copy_bytes_per_s=med("copy_bytes_per_s"),
                          op_floor_s=med("op_floor_s"), half_efficiency_s=med("half_efficiency_s"),
                          **{name: med(name) for name in DTENSOR_HOST_FIELDS},
                          fsdp_unit_s=med("fsdp_unit_s") * share)
    fits = []
    for (kind, group), samples in sorted(first["collectives"].items()):
        alpha, beta = fit_alpha_beta(samples)
        fits.append(AlphaBetaFit(kind=Collective(kind), group_size=group, alpha_s=alpha, beta_s_per_byte=beta,
                                 samples=tuple(samples)))
    table = CalibrationTable.from_dict(first["table"]) if first["table"] is not None else None
    return LocalClusterProfile(device_name=first["device_name"], ranks=ranks, compute=compute, host_cores=cores,
                               collectives=tuple(fits), host_mem_bytes=first["host_mem_bytes"], calibration=table)


def default_ranks() -> int:
    """A rank per CPU core."""
    return max(2, os.cpu_count() or 2)


__all__ = ["AlphaBetaFit", "LocalClusterProfile", "RankCompute", "cluster_yaml", "core_share", "fit_alpha_beta",
           "fit_link", "host_cores", "measure_local_cluster"]
