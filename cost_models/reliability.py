"""Failures, checkpoints and goodput: what a parallel layout costs once nodes fail.

A synchronous training job stops whenever any of its GPUs or nodes fails, then restarts
and resumes from its last durable checkpoint. The model here, per failure:

    expected loss = restart (incl. checkpoint load) + interval / 2 + checkpoint time

where ``interval`` is the time between the starts of two checkpoints and ``checkpoint
time`` is how long a checkpoint takes to become durable (a failure while it is written
falls back to the one before). Checkpointing stalls training for ``stall`` seconds per
interval (the whole write when synchronous; only the device-to-host copy when
asynchronous). The fraction of wall time that makes progress is then

    A(τ) = (1 − stall / τ) · M / (M + loss(τ))          (M: the job's mean time between failures)

whose maximum is the availability-optimal interval ``τ* = Ts + √(2·(Tf + Tr)·Ts + Ts²)``
(Ts = stall, Tf = M, Tr = the part of the loss that does not depend on τ). For Ts ≪ Tf it
tends to Young's ``√(2·C·MTBF)`` (Young 1974; Daly 2006). Goodput = throughput · A(τ).

Failure rates default to what Meta reported for Llama 3 405B pre-training (Dubey et al.
2024, "The Llama 3 Herd of Models", §3.3.4 and Table 5): 419 unexpected interruptions in
54 days on 16,384 H100 GPUs (2,048 nodes), 58.7 % of them GPU issues. Per-GPU MTBF =
16,384 · 1,296 h / (0.587 · 419) = 86,333 h; the other 41.3 % (host, network, software)
spread over 2,048 nodes give a per-node MTBF of 2,048 · 1,296 h / (0.413 · 419) = 15,338 h;
together a job on all 16,384 GPUs fails every 1,296 h / 419 = 3.09 h, as reported.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from autopar._compat import StrEnum
from autopar.cost_models.units import UnitKind, parse_quantity
from autopar.errors import ClusterSpecError

SECONDS_PER_HOUR = 3600.0
"""Seconds in an hour (MTBFs are given in hours)."""
LLAMA3_GPU_MTBF_HOURS = 86_333.0
"""Per-GPU MTBF from Llama 3's 419 interruptions in 54 days on 16,384 H100s, GPU share 58.7 % (module docstring)."""
LLAMA3_NODE_MTBF_HOURS = 15_338.0
"""Per-node MTBF of everything but the GPUs, from the same report: the other 41.3 % over 2,048 nodes."""
LLAMA3_STORAGE_BYTES_PER_S = 2e12
"""Llama 3's Tectonic file system: 2 TB/s sustained (7 TB/s peak) for checkpoints (Dubey et al. 2024, §3.3.1).
No read figure is published; reads default to the same rate."""
ASSUMED_RESTART_S = 600.0
"""Time from a failure to the job running again, checkpoint load excluded: rescheduling, process start and
NCCL initialisation at thousands of ranks. An assumption (no public per-job figure we can cite): override it
with your cluster's measured value (``reliability.restart_s`` in a cluster file)."""


class CheckpointMode(StrEnum):
    """How a checkpoint is written."""

    SYNC = "sync"  # training waits until every rank has written its shard
    ASYNC = "async"  # training waits for the device-to-host copy only; the write overlaps the next steps


@dataclass(frozen=True, slots=True, kw_only=True)
class ReliabilitySpec:
    """Failure rates and checkpoint storage of a cluster (``reliability:`` in a cluster file)."""

    gpu_mtbf_hours: float = LLAMA3_GPU_MTBF_HOURS
    """Mean time between failures of one GPU (GPU, HBM, SRAM, GPU system processor faults)."""
    node_mtbf_hours: float = LLAMA3_NODE_MTBF_HOURS
    """Mean time between failures of one node's other parts (host, NIC, switch, software)."""
    restart_s: float = ASSUMED_RESTART_S
    """Time to restart the job after a failure, not counting the checkpoint load."""
    storage_write_bytes_per_s: float = LLAMA3_STORAGE_BYTES_PER_S
    """Aggregate checkpoint write bandwidth of the storage system."""
    storage_read_bytes_per_s: float = LLAMA3_STORAGE_BYTES_PER_S
    """Aggregate checkpoint read bandwidth of the storage system."""
    node_storage_write_bytes_per_s: float = 50e9
    """Write bandwidth of one node to storage (its storage NICs); default: one 400 Gb/s port."""
    node_storage_read_bytes_per_s: float = 50e9
    """Read bandwidth of one node from storage."""
    host_link_bytes_per_s: float = 64e9
    """Device-to-host copy bandwidth of one GPU (asynchronous staging); default: PCIe Gen5 x16 one way."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and value > 0):
                raise ClusterSpecError(f"reliability.{f.name} must be a positive number, got {value!r}")


_KINDS: Mapping[str, UnitKind | None] = {
    f.name: (UnitKind.BYTES_PER_S if f.name.endswith("bytes_per_s") else
             UnitKind.SECONDS if f.name.endswith("_s") else None) for f in dataclasses.fields(ReliabilitySpec)}


def build_reliability_spec(data: Mapping[str, Any] | None) -> ReliabilitySpec:
    """A ``ReliabilitySpec`` from a cluster file's ``reliability:`` mapping (missing keys take the defaults).

    Raises:
        ClusterSpecError: not a mapping, an unknown key, or a value that is not a positive quantity.

    Example:
        >>> build_reliability_spec({"gpu_mtbf_hours": 50000, "restart_s": "300 s"}).restart_s
        300.0
    """
    if data is None:
        return ReliabilitySpec()
    if not isinstance(data, Mapping):
        raise ClusterSpecError(f"reliability must be a mapping of fields, got {data!r}")
    unknown = sorted(str(k) for k in data if k not in _KINDS)
    if unknown:
        raise ClusterSpecError(f"unknown key(s) {', '.join('reliability.' + k for k in unknown)}; "
                               f"allowed: {', '.join('reliability.' + k for k in _KINDS)}")
    values: dict[str, float] = {}
    for key, raw in data.items():
        kind = _KINDS[key]
        if kind is None:
            if isinstance(raw, bool) or not isinstance(raw, (int, float)):
                raise ClusterSpecError(f"reliability.{key} must be a number of hours, got {raw!r}")
            values[key] = float(raw)
        else:
            values[key] = parse_quantity(raw, kind, key=f"reliability.{key}")
    return ReliabilitySpec(**values)


# ---- closed forms --------------------------------------------------------------------------------


def job_mtbf_s(spec: ReliabilitySpec, *, num_gpus: int, gpus_per_node: int) -> float:
    """Mean time between failures of a job on ``num_gpus`` GPUs: failure rates add (independent, exponential).

    Example:
        >>> round(job_mtbf_s(ReliabilitySpec(), num_gpus=16384, gpus_per_node=8) / 3600, 2)  # Llama 3: 3.09 h
        3.09
    """
    nodes = math.ceil(num_gpus / gpus_per_node)
    rate_per_hour = num_gpus / spec.gpu_mtbf_hours + nodes / spec.node_mtbf_hours
    return SECONDS_PER_HOUR / rate_per_hour


def young_daly_interval_s(checkpoint_s: float, mtbf_s: float) -> float:
    """Young's first-order optimal checkpoint interval √(2·C·MTBF) (Young 1974; Daly 2006, eq. 3).

    Example:
        >>> young_daly_interval_s(50.0, 10_000.0)
        1000.0
    """
    return math.sqrt(2.0 * checkpoint_s * mtbf_s)


def availability_optimal_interval_s(save_s: float, mtbf_s: float, restart_s: float) -> float:
    """Interval Tc that maximises ``availability``: Tc = Ts + √(2·(Tf + Tr)·Ts + Ts²).

    Args:
        save_s: Ts, the time a checkpoint stalls training.
        mtbf_s: Tf, the job's mean time between failures.
        restart_s: Tr, the loss per failure that does not depend on the interval.

    Example:
        >>> availability_optimal_interval_s(0.0, 10_000.0, 600.0)
        0.0
    """
    return save_s + math.sqrt(2.0 * (mtbf_s + restart_s) * save_s + save_s * save_s)


def expected_loss_per_failure_s(interval_s: float, *, restart_s: float, checkpoint_s: float) -> float:
    """Wall time one failure costs: restart + interval / 2 + checkpoint time.

    The failure falls uniformly in an interval; if it falls while the newest checkpoint is
    still being written (``checkpoint_s``), the job resumes from the one before.

    Example:
        >>> expected_loss_per_failure_s(1000.0, restart_s=600.0, checkpoint_s=30.0)
        1130.0
    """
    return restart_s + interval_s / 2.0 + checkpoint_s


def availability(interval_s: float, *, stall_s: float, mtbf_s: float, restart_s: float,
                 checkpoint_s: float) -> float:
    """Fraction of wall time that makes progress: (1 − stall/τ) · M / (M + loss(τ)).

    Example:
        >>> round(availability(1000.0, stall_s=10.0, mtbf_s=10_000.0, restart_s=600.0, checkpoint_s=10.0), 4)
        0.8911
    """
    if interval_s <= stall_s:
        return 0.0
    loss = expected_loss_per_failure_s(interval_s, restart_s=restart_s, checkpoint_s=checkpoint_s)
    return (1.0 - stall_s / interval_s) * mtbf_s / (mtbf_s + loss)


# ---- a plan's checkpoint ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointSize:
    """What a plan's checkpoint holds: weights and optimizer states (gradients are not saved)."""

    held_bytes_per_rank: tuple[int, ...]
    """Per pipeline rank, the checkpointed state one GPU holds (what it stages and reads back)."""
    written_bytes_per_rank: tuple[int, ...]
    """Per pipeline rank, what one GPU writes: state replicated over data parallelism is written once,
    its writes spread over the replicas (PyTorch DCP's save planner de-duplicates replicated items)."""
    total_bytes: int
    """Bytes in storage: every unique shard once."""
    read_bytes: int
    """Bytes all GPUs read on resume (every replica reads the state it holds)."""


def estimate_checkpoint_size(*, params_bytes: Sequence[int], optimizer_bytes: Sequence[int], dp: int, tp: int,
                             zero_stage: int) -> CheckpointSize:
    """Checkpoint bytes of a plan from its per-GPU weights and optimizer states on each pipeline rank.

    Args:
        params_bytes: weights per GPU on each pipeline rank (sharded over dp only under ZeRO-3).
        optimizer_bytes: optimizer states per GPU (fp32 master weights and Adam moments under mixed
            precision; sharded over dp under ZeRO-1 and up).
        dp, tp: data- and tensor-parallel sizes (each pipeline rank has dp · tp GPUs).
        zero_stage: 0-3.

    Example:
        >>> s = estimate_checkpoint_size(params_bytes=[200], optimizer_bytes=[300], dp=4, tp=2, zero_stage=1)
        >>> s.written_bytes_per_rank, s.total_bytes, s.read_bytes
        ((350,), 2800, 4000)
    """
    if len(params_bytes) != len(optimizer_bytes) or not params_bytes:
        raise ValueError(f"need one params and one optimizer figure per pipeline rank, got "
                         f"{len(params_bytes)} and {len(optimizer_bytes)}")
    param_replicas = 1 if zero_stage >= 3 else dp
    optim_replicas = 1 if zero_stage >= 1 else dp
    held = tuple(int(p + o) for p, o in zip(params_bytes, optimizer_bytes))
    written = tuple(math.ceil(p / param_replicas + o / optim_replicas) for p, o in zip(params_bytes, optimizer_bytes))
    return CheckpointSize(held_bytes_per_rank=held, written_bytes_per_rank=written,
                          total_bytes=sum(written) * dp * tp, read_bytes=sum(held) * dp * tp)


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointTimes:
    """How long a plan's checkpoint takes to save and to load."""

    save_sync_s: float
    """Synchronous save: until the slowest node and the storage system have written everything."""
    async_stall_s: float
    """Asynchronous save: training stalls for the device-to-host copy of each GPU's state."""
    save_async_s: float
    """Asynchronous save: until the checkpoint is durable (copy, then the write in the background)."""
    async_fits: bool
    """Whether a node's host memory can stage its GPUs' state (else only synchronous saves are possible)."""
    load_s: float
    """Reading the checkpoint back on resume."""


def estimate_checkpoint_times(size: CheckpointSize, spec: ReliabilitySpec, *, gpus_per_node: int,
                              host_mem_bytes: int) -> CheckpointTimes:
    """Save and load times: the busier of the busiest node's link and the storage system's aggregate rate.

    The busiest node is taken to hold ``gpus_per_node`` GPUs of the pipeline rank with the most
    state (exact when dp · tp ≥ gpus_per_node; an upper bound otherwise).

    Example:
        >>> size = CheckpointSize(held_bytes_per_rank=(10e9,), written_bytes_per_rank=(5e9,), total_bytes=10**13,
        ...                       read_bytes=2 * 10**13)
        >>> t = estimate_checkpoint_times(size, ReliabilitySpec(), gpus_per_node=8, host_mem_bytes=2**41)
        >>> t.save_sync_s, t.load_s, round(t.async_stall_s, 4)
        (5.0, 10.0, 0.1562)
    """
    node_written = gpus_per_node * max(size.written_bytes_per_rank)
    node_held = gpus_per_node * max(size.held_bytes_per_rank)
    write_s = max(node_written / spec.node_storage_write_bytes_per_s,
                  size.total_bytes / spec.storage_write_bytes_per_s)
    stall_s = max(size.held_bytes_per_rank) / spec.host_link_bytes_per_s
    load_s = max(node_held / spec.node_storage_read_bytes_per_s, size.read_bytes / spec.storage_read_bytes_per_s)
    return CheckpointTimes(save_sync_s=write_s, async_stall_s=stall_s, save_async_s=stall_s + write_s,
                           async_fits=node_held <= host_mem_bytes, load_s=load_s)


# ---- goodput -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class GoodputEstimate:
    """A plan's checkpoint costs, chosen checkpoint interval and expected goodput."""

    mtbf_s: float
    """Mean time between failures of the job (all GPUs and nodes the plan uses)."""
    checkpoint_bytes_per_gpu: int
    """Checkpointed state on the fullest GPU."""
    checkpoint_total_bytes: int
    """Bytes of one checkpoint in storage."""
    save_sync_s: float
    """Synchronous save time."""
    save_async_stall_s: float
    """Training stall of an asynchronous save."""
    save_async_s: float
    """Time until an asynchronous save is durable."""
    load_s: float
    """Checkpoint load time on resume."""
    mode: CheckpointMode
    """The save mode chosen (the one with the higher goodput that fits host memory)."""
    interval_steps: int
    """Optimizer steps between checkpoints."""
    interval_s: float
    """Time between checkpoint starts: interval_steps · step time."""
    young_daly_interval_s: float
    """√(2 · stall · MTBF), for comparison."""
    loss_per_failure_s: float
    """Expected wall time one failure costs at the chosen interval (restart and load included)."""
    goodput_fraction: float
    """Fraction of wall time that makes progress."""
    throughput_tokens_per_s: float
    """Tokens per second while running (no failures, no checkpoints)."""
    goodput_tokens_per_s: float
    """throughput · goodput_fraction."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GoodputEstimate:
        """Inverse of the plan's JSON form (``mode`` from its value)."""
        return cls(**{**data, "mode": CheckpointMode(data["mode"])})


def _best_steps(interval_s: float, step_time_s: float, floor_s: float,
                score: Any) -> tuple[int, float]:
    """Whole steps near ``interval_s`` (more than ``floor_s``) with the best score, and that score."""
    least = math.floor(floor_s / step_time_s) + 1
    guess = interval_s / step_time_s
    options = {max(least, math.floor(guess)), max(least, math.ceil(guess))}
    return max(((n, score(n * step_time_s)) for n in sorted(options)), key=lambda t: t[1])


def estimate_goodput(size: CheckpointSize, times: CheckpointTimes, spec: ReliabilitySpec, *, num_gpus: int,
                     gpus_per_node: int, step_time_s: float, tokens_per_s: float) -> GoodputEstimate:
    """Goodput of a plan: checkpoint at the availability-optimal interval in whole steps, in the better mode.

    Per failure the job loses ``restart_s + load_s`` (Tr) plus half an interval plus the time the
    newest checkpoint takes to become durable; each interval stalls training for the save's stall.
    """
    mtbf = job_mtbf_s(spec, num_gpus=num_gpus, gpus_per_node=gpus_per_node)
    restart = spec.restart_s + times.load_s
    modes = [(CheckpointMode.SYNC, times.save_sync_s, times.save_sync_s)]
    if times.async_fits:
        modes.append((CheckpointMode.ASYNC, times.async_stall_s, times.save_async_s))
    best: tuple[float, CheckpointMode, int, float, float] | None = None
    for mode, stall, durable in modes:
        def score(tau: float, stall: float = stall, durable: float = durable) -> float:
            return availability(tau, stall_s=stall, mtbf_s=mtbf, restart_s=restart, checkpoint_s=durable)
        ideal = availability_optimal_interval_s(stall, mtbf, restart + durable)
        steps, frac = _best_steps(ideal, step_time_s, max(durable, stall), score)
        if best is None or frac > best[0]:
            best = (frac, mode, steps, stall, durable)
    assert best is not None
    frac, mode, steps, stall, durable = best
    interval = steps * step_time_s
    return GoodputEstimate(
        mtbf_s=mtbf, checkpoint_bytes_per_gpu=max(size.held_bytes_per_rank), checkpoint_total_bytes=size.total_bytes,
        save_sync_s=times.save_sync_s, save_async_stall_s=times.async_stall_s, save_async_s=times.save_async_s,
        load_s=times.load_s, mode=mode, interval_steps=steps, interval_s=interval,
        young_daly_interval_s=young_daly_interval_s(stall, mtbf),
        loss_per_failure_s=expected_loss_per_failure_s(interval, restart_s=restart, checkpoint_s=durable),
        goodput_fraction=frac, throughput_tokens_per_s=tokens_per_s, goodput_tokens_per_s=tokens_per_s * frac,
    )


__all__ = [
    "ASSUMED_RESTART_S", "CheckpointMode", "CheckpointSize", "CheckpointTimes", "GoodputEstimate",
    "estimate_checkpoint_size", "estimate_checkpoint_times", "estimate_goodput", "LLAMA3_GPU_MTBF_HOURS", "LLAMA3_NODE_MTBF_HOURS",
    "LLAMA3_STORAGE_BYTES_PER_S", "ReliabilitySpec", "availability", "availability_optimal_interval_s",
    "build_reliability_spec", "expected_loss_per_failure_s", "job_mtbf_s", "young_daly_interval_s",
]
