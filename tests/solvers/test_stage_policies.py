"""Per-stage recomputation: the DP on policy-wise minima equals brute force over partitions × policies."""

from __future__ import annotations

import math
import random

import pytest

from autopar.errors import InfeasiblePlanError
from autopar.plan import Schedule
from autopar.solvers.pipeline.stage_dp import StageCosts
from autopar.solvers.pipeline.stage_policies import brute_force_stage_policies, solve_stage_policies


def _variants(rng: random.Random, n: int) -> list[StageCosts]:
    """none / selective / full: more backward time, fewer activations, same weights."""
    fwd = [rng.uniform(0.5, 2.0) for _ in range(n)]
    static = [rng.uniform(0.0, 3.0) for _ in range(n)]
    acts = [rng.uniform(0.5, 3.0) for _ in range(n)]
    send = [rng.uniform(0.0, 0.3) for _ in range(n)]
    out = []
    for extra, keep in ((0.0, 1.0), (0.2, 0.6), (1.0, 0.15)):
        out.append(StageCosts(forward_s=tuple(fwd), backward_s=tuple(f * (2 + extra) for f in fwd),
                              static_mem_bytes=tuple(static), activation_bytes=tuple(a * keep for a in acts),
                              boundary_send_s=tuple(send)))
    return out


@pytest.mark.parametrize("seed", range(60))
def test_matches_brute_force(seed):
    rng = random.Random(seed)
    n = rng.randint(2, 7)
    stages = rng.randint(1, min(4, n))
    schedule = rng.choice([Schedule.GPIPE, Schedule.ONE_F_ONE_B])
    m = rng.randint(1, 8)
    variants = _variants(rng, n)
    budget = rng.uniform(3.0, 25.0)
    expected = brute_force_stage_policies(variants, num_stages=stages, num_micro_batches=m, mem_budget_bytes=budget,
                                          schedule=schedule)
    if math.isinf(expected):
        with pytest.raises(InfeasiblePlanError):
            solve_stage_policies(variants, num_stages=stages, num_micro_batches=m, mem_budget_bytes=budget,
                                 schedule=schedule)
        return
    got = solve_stage_policies(variants, num_stages=stages, num_micro_batches=m, mem_budget_bytes=budget,
                               schedule=schedule)
    assert got.partition.step_time_s == pytest.approx(expected, rel=1e-9)
    assert max(got.partition.mem_bytes) <= budget * (1 + 1e-12)


def test_first_stage_recomputes_when_only_it_is_short_of_memory():
    """1F1B: stage 0 holds pp micro-batches, the last one 1; only stage 0 needs to recompute."""
    fast = StageCosts.uniform(8, forward_s=1, backward_s=2, static_mem_bytes=1, activation_bytes=2,
                              boundary_send_s=0)
    full = StageCosts.uniform(8, forward_s=1, backward_s=3, static_mem_bytes=1, activation_bytes=0.25,
                              boundary_send_s=0)
    got = solve_stage_policies([fast, full], num_stages=4, num_micro_batches=8, mem_budget_bytes=12,
                               schedule=Schedule.ONE_F_ONE_B)
    assert got.policies[0] == 1 and got.policies[-1] == 0


def test_single_policy_is_the_plain_dp():
    from autopar.solvers.pipeline.stage_dp import solve_stage_partition

    costs = _variants(random.Random(7), 6)[0]
    plain = solve_stage_partition(costs, num_stages=3, num_micro_batches=4, mem_budget_bytes=100.0)
    mixed = solve_stage_policies([costs], num_stages=3, num_micro_batches=4, mem_budget_bytes=100.0)
    assert mixed.partition.boundaries == plain.boundaries and mixed.policies == (0, 0, 0)
