"""Brute-force oracles for the solvers' tests: enumerate everything on small instances.

They share the evaluation functions of the real solvers (``evaluate_partition``,
``evaluate_assignment``) but none of their search: every composition of layers
into stages, every assignment of strategies to nodes.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from autopar.errors import InfeasiblePlanError
from autopar.solvers.sharding.sharding_ilp import ShardingSolution
from autopar.solvers.sharding.sharding_problem import ShardingProblem, evaluate_assignment
from autopar.solvers.pipeline.stage_dp import (
    InfeasibleStagePartitionError,
    StageCosts,
    StagePartition,
    check_stage_count,
    evaluate_partition,
)


def brute_force_stage_partition(costs: StageCosts, *, num_stages: int, in_flight: Sequence[int],
                                mem_budget_bytes: float, alpha: float, beta: float) -> StagePartition:
    """Oracle for tests: try every composition of L layers into S non-empty parts (C(L−1, S−1) of them).

    Raises:
        InfeasibleStagePartitionError: S > L or no composition fits (with the smallest budget that fits).

    Example:
        >>> c = StageCosts.uniform(4, forward_s=1, backward_s=2, static_mem_bytes=0, activation_bytes=0,
        ...                        boundary_send_s=0)
        >>> brute_force_stage_partition(c, num_stages=2, in_flight=(2, 1), mem_budget_bytes=1, alpha=3,
        ...                             beta=1).boundaries
        (0, 2, 4)
    """
    check_stage_count(costs, num_stages, in_flight)
    n = costs.num_layers
    best: StagePartition | None = None
    need = math.inf
    for cuts in itertools.combinations(range(1, n), num_stages - 1):
        part = evaluate_partition(costs, (0, *cuts, n), in_flight=in_flight, alpha=alpha, beta=beta)
        need = min(need, max(part.mem_bytes))
        if max(part.mem_bytes) <= mem_budget_bytes and (best is None or part.step_time_s < best.step_time_s):
            best = part
    if best is None:
        raise InfeasibleStagePartitionError(f"brute force: nothing fits {mem_budget_bytes} bytes",
                                            min_budget_bytes=need)
    return best


def brute_force_sharding(problem: ShardingProblem) -> ShardingSolution:
    """Oracle for tests: enumerate every assignment of the free (non-follower) nodes.

    Raises:
        InfeasiblePlanError: nothing fits the budget with a finite cost.

    Example:
        >>> from autopar.solvers.sharding.sharding_problem import ShardingNode
        >>> a = ShardingNode(name="a", strategies=("x", "y"), compute_s=(2, 1), comm_s=(0, 0), mem_bytes=(0, 9))
        >>> brute_force_sharding(ShardingProblem(nodes=(a,), edges=(), mem_budget_bytes=5)).choice
        {'a': 0}
    """
    free = [n for n in problem.nodes if n.follows is None]
    best: tuple[float, float, dict[str, int]] | None = None
    for combo in itertools.product(*(range(len(n.strategies)) for n in free)):
        choice = dict(zip((n.name for n in free), combo))
        for node in problem.nodes:
            if node.follows is not None:
                choice[node.name] = node.follow_map[choice[node.follows]]
        cost, mem = evaluate_assignment(problem, choice)
        fits = problem.mem_budget_bytes is None or mem <= problem.mem_budget_bytes
        if fits and math.isfinite(cost) and (best is None or cost < best[0]):
            best = (cost, mem, choice)
    if best is None:
        raise InfeasiblePlanError("brute force: no assignment fits the memory budget")
    return ShardingSolution(choice=best[2], cost_s=best[0], mem_bytes=best[1], optimal=True, solver="brute-force")


__all__ = ["brute_force_sharding", "brute_force_stage_partition"]
