"""Inter-op parallelism: split a chain of layers into contiguous pipeline stages.

The model is a sequence of L layers (embedding, transformer blocks, head; not
uniform). A pipeline of S stages runs m micro-batches per step. This module
chooses the S − 1 cut points that minimise the predicted step time while every
stage's memory (weights, gradients, optimizer state, and the activations of the
micro-batches it holds in flight, which depends on its position in the
pipeline) fits the per-GPU budget.

Objective (DAPPLE, Fan et al. 2021; Alpa, Zheng et al. 2022, §5.2 eq. 2)::

    step ≈ (m − 1) · max_j t_j + Σ_j t_j

where ``t_j`` is the forward + backward time of one micro-batch on stage j plus
its point-to-point sends. The first term is the steady state, paced by the
slowest stage; the second is one micro-batch filling and draining the pipeline.
GPipe and 1F1B have the same bubble and differ only in memory (in-flight
micro-batches: m for GPipe, ``min(m, S − j)`` for 1F1B).

Interleaved 1F1B (Narayanan et al. 2021, §2.2) cuts the model into S = pp · v
chunks placed round-robin on the pp ranks; with uniform chunks of time t the
step is ``m·v·t + (pp − 1)·t``, i.e. the bubble shrinks to ``(pp − 1)/v`` of a
rank's per-micro-batch time. The kernel solves the weighted form
``alpha · max_j t_j + beta · Σ_j t_j`` with ``alpha = m·v − 1`` and
``beta = 1/v``, which is exact for uniform chunks and reduces to the form above
for v = 1.

Everything here is torch-free: inputs are numbers, outputs frozen dataclasses.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from autopar.errors import InfeasiblePlanError
from autopar.layout import Schedule
from autopar.schedule import in_flight_per_stage, schedule_weights
from autopar.solvers.pipeline.band import StageTimes, feasible_width, partition_times, stage_times
from autopar.solvers.pipeline.runs import partition_runs

logger = logging.getLogger(__name__)

FloatArray = NDArray[np.float64]


class InfeasibleStagePartitionError(InfeasiblePlanError):
    """No partition into the requested stages fits the memory budget (or there are too few layers).

    ``min_budget_bytes`` is the smallest per-stage budget for which a partition
    exists (None when no budget helps, e.g. more stages than layers).
    """

    def __init__(self, message: str, *, min_budget_bytes: float | None) -> None:
        super().__init__(message)
        self.min_budget_bytes = min_budget_bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class StageCosts:
    """Per-layer inputs of the stage partition, one entry per layer in model order."""

    forward_s: tuple[float, ...]
    """Forward time of one micro-batch through the layer."""
    backward_s: tuple[float, ...]
    """Backward time (recomputation included) of one micro-batch."""
    static_mem_bytes: tuple[float, ...]
    """Memory that does not depend on the stage's position: weights, gradients, optimizer state."""
    activation_bytes: tuple[float, ...]
    """Activations saved for backward by one micro-batch."""
    boundary_send_s: tuple[float, ...]
    """Point-to-point time to send the layer's input across a stage boundary (activation or gradient)."""

    def __post_init__(self) -> None:
        n = len(self.forward_s)
        fields = ("forward_s", "backward_s", "static_mem_bytes", "activation_bytes", "boundary_send_s")
        for name in fields:
            values = getattr(self, name)
            if len(values) != n:
                raise ValueError(f"StageCosts.{name} has {len(values)} entries, forward_s has {n}")
            # a NaN or an infinity makes the sum so; with neither, min is exact (plain Python: called per layout)
            if not (math.isfinite(sum(values)) and min(values, default=0.0) >= 0):
                bad = [v for v in values if not (math.isfinite(v) and v >= 0)]
                raise ValueError(f"StageCosts.{name} must be finite and >= 0, got {bad[:3]}")
        if n == 0:
            raise ValueError("StageCosts needs at least one layer")

    @property
    def num_layers(self) -> int:
        """Number of layers L."""
        return len(self.forward_s)

    @classmethod
    def uniform(cls, num_layers: int, *, forward_s: float, backward_s: float, static_mem_bytes: float,
                activation_bytes: float, boundary_send_s: float) -> StageCosts:
        """``num_layers`` identical layers (tests and quick estimates).

        Example:
            >>> StageCosts.uniform(3, forward_s=1.0, backward_s=2.0, static_mem_bytes=0,
            ...                    activation_bytes=0, boundary_send_s=0).num_layers
            3
        """
        def rep(x: float) -> tuple[float, ...]:
            return (float(x),) * num_layers

        return cls(forward_s=rep(forward_s), backward_s=rep(backward_s), static_mem_bytes=rep(static_mem_bytes),
                   activation_bytes=rep(activation_bytes), boundary_send_s=rep(boundary_send_s))


@dataclass(frozen=True, slots=True, kw_only=True)
class StagePartition:
    """A partition of the layers into contiguous stages, with its predicted cost."""

    boundaries: tuple[int, ...]
    """S + 1 layer indices: stage j covers layers ``[boundaries[j], boundaries[j + 1])``."""
    stage_time_s: tuple[float, ...]
    """t_j: forward + backward + boundary sends of one micro-batch, per stage."""
    forward_time_s: tuple[float, ...]
    """Forward compute of one micro-batch, per stage."""
    backward_time_s: tuple[float, ...]
    """Backward compute of one micro-batch, per stage."""
    comm_time_s: tuple[float, ...]
    """Boundary sends of one micro-batch (output activation forward, input gradient backward), per stage."""
    mem_bytes: tuple[float, ...]
    """Peak memory per stage: static bytes + in-flight micro-batches × activation bytes."""
    in_flight: tuple[int, ...]
    """Micro-batches whose activations a stage holds at its peak."""
    rank_mem_bytes: tuple[float, ...]
    """Peak memory per pipeline rank (the sum over its chunks; equals ``mem_bytes`` when v = 1)."""
    step_time_s: float
    """Predicted step time: alpha · max_j t_j + beta · Σ_j t_j."""
    bottleneck_s: float
    """max_j t_j."""
    virtual_stages: int = 1
    """Chunks per pipeline rank (v); stage j runs on rank j mod (S / v)."""

    @property
    def num_stages(self) -> int:
        """Number of stages (chunks) S."""
        return len(self.boundaries) - 1

    def stage_layers(self, stage: int) -> range:
        """Layer indices of one stage."""
        return range(self.boundaries[stage], self.boundaries[stage + 1])


# ---- the kernel ------------------------------------------------------------------------------


def _min_max_memory(costs: StageCosts, in_flight: Sequence[int]) -> float:
    """Smallest budget for which some partition fits: H[j+1][k] = min_i max(H[j][i], mem_j(i, k))."""
    w = np.concatenate(([0.0], np.cumsum(costs.static_mem_bytes)))
    a = np.concatenate(([0.0], np.cumsum(costs.activation_bytes)))
    size = w.shape[0]
    upper = np.triu(np.ones((size, size), dtype=bool), 1)
    h = np.full(size, np.inf)
    h[0] = 0.0
    for n in in_flight:
        mem = np.where(upper, (w[None, :] - w[:, None]) + n * (a[None, :] - a[:, None]), np.inf)
        h = np.min(np.maximum(h[:, None], mem), axis=0)
    return float(h[-1])


def partition_stages(costs: StageCosts, *, num_stages: int, in_flight: Sequence[int], mem_budget_bytes: float,
                     alpha: float, beta: float, report_min_budget: bool = True) -> tuple[int, ...]:
    """The kernel: boundaries minimising ``alpha · max_j t_j + beta · Σ_j t_j`` under the memory budget.

    Stage j covering layers [i, k) costs ``t_j = Σ_{l∈[i,k)} (f_l + b_l) + [j > 0]·c_i + [j < S−1]·c_k``
    (it sends its output forward and its input gradient back) and needs
    ``Σ w_l + in_flight[j] · Σ a_l <= budget``.

    Because the objective mixes a max and a sum, it is solved as in Alpa's stage
    construction: enumerate the bottleneck T over the distinct values of t_j in
    increasing order and, for each, run the DP

        G[0][0] = 0,   G[j+1][k] = min_{i<k, t_j(i,k) <= T, mem ok} G[j][i] + t_j(i, k),

    scoring ``alpha · T + beta · G[S][L]``. One DP costs O(L·S·w) (vectorised over
    (i, k)), where w is the longest stage the budget and T allow (``band``: about L/S when
    memory binds, L at worst); there are O(L²) candidate values of T, so O(L⁴·S) in the worst case.
    Pruning: G with T = ∞ is a lower bound of the sum term, so the scan stops at
    the first T with ``alpha · T + beta · G_∞ >= best``; the first feasible T is
    found by a min-max DP in one pass. With many identical layers
    the scan ends after one or two DPs, and when alpha = 0 (m = 1) the T = ∞ DP is
    the answer. With no memory limit (``mem_budget_bytes = inf``) and a model that is a short
    prefix, a run of identical layers and a short suffix, ``runs.partition_runs`` counts the run's
    layers per stage instead, in time independent of L (its ties: least bottleneck, then the
    lexicographically smallest boundaries).

    Args:
        costs: per-layer times and memory.
        num_stages: S.
        in_flight: micro-batches held per stage (length S).
        mem_budget_bytes: per-stage memory budget.
        alpha: weight of the bottleneck (``m − 1`` for GPipe/1F1B).
        beta: weight of the sum (1 for GPipe/1F1B).
        report_min_budget: on failure, compute the smallest budget that fits (one more DP pass) for the
            error; a caller that only needs to know that nothing fits passes False.

    Returns:
        S + 1 boundaries.

    Raises:
        InfeasibleStagePartitionError: S > L, or no partition fits (carries the smallest budget that fits).

    Example:
        >>> c = StageCosts(forward_s=(1, 1, 10, 1), backward_s=(0, 0, 0, 0), static_mem_bytes=(0, 0, 0, 0),
        ...                activation_bytes=(0, 0, 0, 0), boundary_send_s=(0, 0, 0, 0))
        >>> partition_stages(c, num_stages=3, in_flight=(3, 2, 1), mem_budget_bytes=1, alpha=7, beta=1)
        (0, 2, 3, 4)
    """
    check_stage_count(costs, num_stages, in_flight)
    if math.isinf(mem_budget_bytes) and mem_budget_bytes > 0:  # times alone decide: count the identical layers
        work = [f + b for f, b in zip(costs.forward_s, costs.backward_s)]
        counted = partition_runs(work, costs.boundary_send_s, num_stages=num_stages, alpha=alpha, beta=beta)
        if counted is not None:
            return counted
    times = masked_stage_times(costs, num_stages=num_stages, in_flight=in_flight, mem_budget_bytes=mem_budget_bytes)
    bounds = partition_times(times, alpha=alpha, beta=beta)
    if bounds is None:
        need = _min_max_memory(costs, in_flight) if report_min_budget else None
        raise InfeasibleStagePartitionError(
            f"no split of {costs.num_layers} layers into {num_stages} stages fits {mem_budget_bytes:.4g} bytes "
            f"per stage" + (f"; the smallest budget that fits is {need:.4g} bytes" if need is not None else ""),
            min_budget_bytes=need,
        )
    return bounds


def masked_stage_times(costs: StageCosts, *, num_stages: int, in_flight: Sequence[int], mem_budget_bytes: float,
                       width: int | None = None) -> StageTimes:
    """t_j(i, k) per stage j as a band (``band.StageTimes``), +inf where [i, k) does not fit the budget on stage j.

    ``width`` (default: the longest range that fits) must be at least that; policies share one width.
    """
    if width is None:
        width = feasible_width(costs.static_mem_bytes, costs.activation_bytes, in_flight, mem_budget_bytes)
    work = np.asarray(costs.forward_s) + np.asarray(costs.backward_s)
    return stage_times(work=work, send=costs.boundary_send_s, static=costs.static_mem_bytes,
                       activations=costs.activation_bytes, in_flight=in_flight, budget=mem_budget_bytes, width=width)


def check_stage_count(costs: StageCosts, num_stages: int, in_flight: Sequence[int]) -> None:
    """Raise unless S >= 1, one in-flight count per stage, and S <= L."""
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    if len(in_flight) != num_stages:
        raise ValueError(f"in_flight has {len(in_flight)} entries for {num_stages} stages")
    if num_stages > costs.num_layers:
        raise InfeasibleStagePartitionError(
            f"cannot split {costs.num_layers} layers into {num_stages} non-empty stages", min_budget_bytes=None
        )


# ---- wrapper, evaluation and oracle ----------------------------------------------------------


def evaluate_partition(costs: StageCosts, boundaries: Sequence[int], *, in_flight: Sequence[int], alpha: float,
                       beta: float, virtual_stages: int = 1) -> StagePartition:
    """Cost and memory of a given partition, by direct sums (used by the DP wrapper and the oracle).

    Example:
        >>> c = StageCosts.uniform(4, forward_s=1, backward_s=2, static_mem_bytes=10, activation_bytes=1,
        ...                        boundary_send_s=0)
        >>> evaluate_partition(c, (0, 2, 4), in_flight=(2, 1), alpha=3, beta=1).step_time_s
        30.0
    """
    num_stages = len(boundaries) - 1
    fwd, bwd, comm, mem = [], [], [], []
    for j in range(num_stages):
        i, k = boundaries[j], boundaries[j + 1]
        fwd.append(math.fsum(costs.forward_s[i:k]))
        bwd.append(math.fsum(costs.backward_s[i:k]))
        comm.append((costs.boundary_send_s[i] if j > 0 else 0.0)
                    + (costs.boundary_send_s[k] if j < num_stages - 1 else 0.0))
        mem.append(math.fsum(costs.static_mem_bytes[i:k]) + in_flight[j] * math.fsum(costs.activation_bytes[i:k]))
    times = tuple(f + b + c for f, b, c in zip(fwd, bwd, comm))
    pp = num_stages // virtual_stages
    ranks = tuple(math.fsum(mem[r::pp]) for r in range(pp))
    return StagePartition(
        boundaries=tuple(int(b) for b in boundaries), stage_time_s=times, forward_time_s=tuple(fwd),
        backward_time_s=tuple(bwd), comm_time_s=tuple(comm), mem_bytes=tuple(mem), in_flight=tuple(in_flight),
        rank_mem_bytes=ranks, step_time_s=alpha * max(times) + beta * math.fsum(times), bottleneck_s=max(times),
        virtual_stages=virtual_stages,
    )


def solve_stage_partition(costs: StageCosts, *, num_stages: int, num_micro_batches: int, mem_budget_bytes: float,
                          schedule: Schedule = Schedule.ONE_F_ONE_B, virtual_stages: int = 1,
                          report_min_budget: bool = True) -> StagePartition:
    """Best contiguous partition of the layers into ``num_stages`` stages for a pipeline schedule.

    For interleaved 1F1B pass ``num_stages = pp · virtual_stages`` chunks; chunk j
    runs on rank ``j % pp``. A rank's memory is the sum over its chunks, which is
    not a per-chunk quantity, so each chunk is held to ``mem_budget_bytes / v``
    (sufficient, slightly conservative); ``rank_mem_bytes`` reports the real sum.

    Args:
        costs: per-layer costs.
        num_stages: S (chunks).
        num_micro_batches: m per step.
        mem_budget_bytes: memory per GPU available to one pipeline rank.
        schedule: pipeline schedule (decides in-flight micro-batches and the bubble weight).
        virtual_stages: chunks per rank v.

    Returns:
        The partition with its per-stage times and memory and the predicted step time.

    Raises:
        InfeasibleStagePartitionError: S > L or nothing fits; carries the smallest budget that fits.

    Example:
        >>> c = StageCosts.uniform(8, forward_s=1, backward_s=2, static_mem_bytes=1, activation_bytes=1,
        ...                        boundary_send_s=0)
        >>> solve_stage_partition(c, num_stages=4, num_micro_batches=8, mem_budget_bytes=100).boundaries
        (0, 2, 4, 6, 8)
    """
    if num_stages % virtual_stages:
        raise ValueError(f"num_stages={num_stages} is not a multiple of virtual_stages={virtual_stages}")
    pp = num_stages // virtual_stages
    in_flight = in_flight_per_stage(schedule, pp=pp, num_micro_batches=num_micro_batches,
                                        virtual_stages=virtual_stages)
    alpha, beta = schedule_weights(schedule, num_micro_batches=num_micro_batches, virtual_stages=virtual_stages)
    chunk_budget = mem_budget_bytes / virtual_stages
    try:
        bounds = partition_stages(costs, num_stages=num_stages, in_flight=in_flight, mem_budget_bytes=chunk_budget,
                                  alpha=alpha, beta=beta, report_min_budget=report_min_budget)
    except InfeasibleStagePartitionError as e:
        if e.min_budget_bytes is None or virtual_stages == 1:
            raise
        need = e.min_budget_bytes * virtual_stages
        raise InfeasibleStagePartitionError(
            f"no split into {num_stages} chunks ({virtual_stages} per rank) fits {mem_budget_bytes:.4g} bytes per "
            f"rank; the smallest budget that fits is {need:.4g} bytes", min_budget_bytes=need) from e
    result = evaluate_partition(costs, bounds, in_flight=in_flight, alpha=alpha, beta=beta,
                                virtual_stages=virtual_stages)
    logger.debug("stage partition %s: step %.4g s", result.boundaries, result.step_time_s)
    return result


__all__ = [
    "InfeasibleStagePartitionError",
    "check_stage_count",
    "StageCosts",
    "StagePartition",
    "evaluate_partition",
    "masked_stage_times",
    "partition_stages",
    "partition_times",
    "solve_stage_partition",
]
