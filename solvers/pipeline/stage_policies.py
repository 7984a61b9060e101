"""Stage partition with a recomputation policy chosen per stage.

Each policy p (none, selective, full recompute) gives every layer its own times and
memory (``StageCosts``). For a fixed stage range [i, k) on stage j the objective
``alpha · max_j t_j + beta · Σ_j t_j`` only grows with t_j, so the best policy for
that stage is the fastest one whose memory fits:

    t_j(i, k) = min { t_j^p(i, k) : mem_j^p(i, k) <= budget }

which turns the problem back into the single-policy DP of ``stage_dp`` on these
element-wise minima — exact, at the cost of one O(L²·S) masking pass per policy.
Memory-hungry stages near the pipeline's start (which hold more micro-batches under
1F1B) can then recompute while later stages do not (Korthikanti et al. 2022 §5
recompute only as many layers as memory requires; this is the per-stage form).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from autopar.layout import Schedule
from autopar.schedule import in_flight_per_stage, schedule_weights
from autopar.solvers.pipeline.stage_dp import (
    InfeasibleStagePartitionError,
    StageCosts,
    StagePartition,
    check_stage_count,
    evaluate_partition,
    masked_stage_times,
)
from autopar.solvers.pipeline.band import feasible_width, partition_times


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyPartition:
    """A partition and the policy each stage uses."""

    partition: StagePartition
    """Boundaries, times and memory, priced with each stage's policy."""
    policies: tuple[int, ...]
    """Per stage, the index of its policy in the ``variants`` given."""


def composite_costs(variants: Sequence[StageCosts], boundaries: Sequence[int], policies: Sequence[int]) -> StageCosts:
    """Per-layer costs where each layer takes the values of its stage's policy."""
    if len(set(policies)) == 1:
        return variants[policies[0]]
    chosen = np.repeat(np.asarray(policies), np.diff(np.asarray(boundaries)))
    layers = np.arange(len(chosen))

    def pick(name: str) -> tuple[float, ...]:
        table = np.array([getattr(v, name) for v in variants], dtype=np.float64)  # (policy, layer)
        return tuple(table[chosen, layers].tolist())

    return StageCosts(forward_s=pick("forward_s"), backward_s=pick("backward_s"),
                      static_mem_bytes=pick("static_mem_bytes"), activation_bytes=pick("activation_bytes"),
                      boundary_send_s=pick("boundary_send_s"))


def solve_stage_policies(variants: Sequence[StageCosts], *, num_stages: int, num_micro_batches: int,
                         mem_budget_bytes: float, schedule: Schedule = Schedule.ONE_F_ONE_B,
                         virtual_stages: int = 1) -> PolicyPartition:
    """Best partition into ``num_stages`` stages, each with its fastest policy that fits.

    Args:
        variants: per-layer costs under each policy (same layers, same order).
        num_stages: S (chunks, pp · v for interleaved schedules).
        num_micro_batches: m per step.
        mem_budget_bytes: memory per GPU of one pipeline rank (each of a rank's v chunks gets 1/v).
        schedule: pipeline schedule.
        virtual_stages: chunks per rank v.

    Raises:
        InfeasibleStagePartitionError: no partition fits under any mix of policies.

    Example:
        >>> fast = StageCosts.uniform(4, forward_s=1, backward_s=2, static_mem_bytes=0, activation_bytes=10,
        ...                           boundary_send_s=0)
        >>> lean = StageCosts.uniform(4, forward_s=1, backward_s=3, static_mem_bytes=0, activation_bytes=1,
        ...                           boundary_send_s=0)
        >>> solve_stage_policies([fast, lean], num_stages=2, num_micro_batches=4, mem_budget_bytes=25).policies
        (1, 0)
    """
    if not variants:
        raise ValueError("solve_stage_policies needs at least one policy's costs")
    if num_stages % virtual_stages:
        raise ValueError(f"num_stages={num_stages} is not a multiple of virtual_stages={virtual_stages}")
    check_stage_count(variants[0], num_stages, [0] * num_stages)
    m, v = num_micro_batches, virtual_stages
    in_flight = in_flight_per_stage(schedule, pp=num_stages // v, num_micro_batches=m, virtual_stages=v)
    alpha, beta = schedule_weights(schedule, num_micro_batches=m, virtual_stages=v)
    budget = mem_budget_bytes / v
    width = max(feasible_width(c.static_mem_bytes, c.activation_bytes, in_flight, budget) for c in variants)
    per_policy = [masked_stage_times(c, num_stages=num_stages, in_flight=in_flight, mem_budget_bytes=budget,
                                     width=width) for c in variants]
    bounds = partition_times(per_policy[0].elementwise_min(per_policy[1:]), alpha=alpha, beta=beta)
    if bounds is None:
        raise InfeasibleStagePartitionError(
            f"no split of {variants[0].num_layers} layers into {num_stages} stages fits {mem_budget_bytes:.4g} bytes "
            f"per rank under any recomputation policy", min_budget_bytes=None)
    policies = tuple(int(np.argmin([t.at(j, bounds[j], bounds[j + 1]) for t in per_policy]))
                     for j in range(num_stages))
    partition = evaluate_partition(composite_costs(variants, bounds, policies), bounds, in_flight=in_flight,
                                   alpha=alpha, beta=beta, virtual_stages=v)
    return PolicyPartition(partition=partition, policies=policies)


def brute_force_stage_policies(variants: Sequence[StageCosts], *, num_stages: int, num_micro_batches: int,
                               mem_budget_bytes: float, schedule: Schedule = Schedule.ONE_F_ONE_B,
                               virtual_stages: int = 1) -> float:
    """Oracle for tests: the best step time over every composition and every policy per stage (inf if none fits)."""
    import itertools

    n, m, v = variants[0].num_layers, num_micro_batches, virtual_stages
    in_flight = in_flight_per_stage(schedule, pp=num_stages // v, num_micro_batches=m, virtual_stages=v)
    alpha, beta = schedule_weights(schedule, num_micro_batches=m, virtual_stages=v)
    best = math.inf
    for cuts in itertools.combinations(range(1, n), num_stages - 1):
        bounds = (0, *cuts, n)
        for policies in itertools.product(range(len(variants)), repeat=num_stages):
            part = evaluate_partition(composite_costs(variants, bounds, policies), bounds, in_flight=in_flight,
                                      alpha=alpha, beta=beta, virtual_stages=v)
            if max(part.mem_bytes) <= mem_budget_bytes / v:
                best = min(best, part.step_time_s)
    return best
