"""The rank-aware bottleneck bound never exceeds the best integer split it relaxes (brute force)."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from autopar.solvers.bottlenecks import rank_bottleneck_s


def _best_split(count, static, policies, in_flight, budget):
    """Least max over ranks of Σ seconds, over every integer split of the layers and every policy per layer."""
    best = math.inf
    ranks = len(in_flight)
    for split in itertools.product(range(count + 1), repeat=ranks):
        if sum(split) != count:
            continue
        worst = 0.0
        for n, k in zip(split, in_flight):
            rank_best = math.inf  # the fastest mix of policies for n layers that fits this rank
            for mix in itertools.combinations_with_replacement(range(len(policies)), n):
                if sum(static + k * policies[p][0] for p in mix) <= budget:
                    rank_best = min(rank_best, sum(policies[p][1] for p in mix))
            worst = max(worst, rank_best)
        best = min(best, worst)
    return best


@pytest.mark.parametrize("seed", range(40))
def test_bound_is_below_the_best_integer_split(seed):
    rng = random.Random(seed)
    count, ranks = rng.randint(1, 6), rng.randint(1, 3)
    policies = [(float(rng.randint(1, 6)), 1.0)]
    if rng.random() < 0.6:
        policies.append((float(rng.randint(0, 3)), 1.0 + rng.randint(1, 4) / 4))
    in_flight = sorted((rng.randint(1, 4) for _ in range(ranks)), reverse=True)
    static, budget = float(rng.randint(0, 3)), float(rng.randint(4, 30))
    exact = _best_split(count, static, policies, in_flight, budget)
    bound = rank_bottleneck_s(count=count, static_bytes=static, policies=policies, in_flight=in_flight,
                              budget_bytes=budget)
    if math.isinf(exact):  # the relaxation may still fit fractional layers; it never claims less than a split
        return
    assert bound <= exact * (1 + 1e-12)


def _rank_capacity(time_s, static, policies, k, budget):
    """Most blocks (fractional) one rank holds within ``time_s``: the best mix of two policies p, q, at the λ where
    its memory and time limits cross (each limit is monotone in λ), or at an end."""
    best = 0.0
    for (a_p, t_p), (a_q, t_q) in itertools.product(policies, repeat=2):
        def held(lam):
            nbytes, secs = static + k * (a_p + lam * (a_q - a_p)), t_p + lam * (t_q - t_p)
            return min(budget / nbytes if nbytes > 0 else math.inf, time_s / secs if secs > 0 else math.inf)
        ends = [0.0, 1.0]
        denom = budget * (t_q - t_p) - time_s * k * (a_q - a_p)
        if denom:
            ends.append(min(1.0, max(0.0, (time_s * (static + k * a_p) - budget * t_p) / denom)))
        best = max(best, *(held(lam) for lam in ends))
    return best


@pytest.mark.parametrize("seed", range(60))
def test_rank_bound_is_the_least_time_its_relaxation_allows(seed):
    """Equal to the least time at which the ranks' capacities (best mixes of two policies, computed here by brute
    force over every pair) sum to the count, found by bisection: never above it, within 1e-8 below it."""
    rng = random.Random(seed)
    policies = [(0.0 if rng.random() < 0.1 else rng.uniform(0.0, 5.0), rng.uniform(0.1, 3.0))
                for _ in range(rng.randint(1, 4))]
    in_flight = [rng.randint(1, 40) for _ in range(rng.randint(1, 24))]
    count, static, budget = rng.randint(1, 300), rng.choice([0.0, rng.uniform(0.0, 3.0)]), rng.uniform(1.0, 400.0)
    got = rank_bottleneck_s(count=count, static_bytes=static, policies=policies, in_flight=in_flight,
                            budget_bytes=budget)

    def total(time_s):
        return sum(_rank_capacity(time_s, static, policies, k, budget) for k in in_flight)

    high = count * max(t for _, t in policies)  # the slowest policy's blocks one after another on one rank
    if total(high) < count:  # at that time memory binds every rank whatever the time: no split fits
        assert got == math.inf
        return
    low = 0.0
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (low, mid) if total(mid) >= count else (mid, high)
    assert got <= high * (1 + 1e-12) and got == pytest.approx(high, rel=1e-8)


def test_memory_moves_layers_to_the_ranks_with_fewer_micro_batches():
    # 4 layers of 1 byte each; rank 0 holds 2 micro-batches (1.5 layers fit in 3 bytes), rank 1 holds one
    assert rank_bottleneck_s(count=4, static_bytes=0.0, policies=[(1.0, 1.0)], in_flight=[2, 1],
                             budget_bytes=3.0) == pytest.approx(2.5, rel=1e-3)
    assert rank_bottleneck_s(count=4, static_bytes=0.0, policies=[(1.0, 1.0)], in_flight=[2, 1],
                             budget_bytes=2.0) == math.inf  # 1 + 2 layers fit at most
    assert rank_bottleneck_s(count=8, static_bytes=0.0, policies=[(1.0, 1.0)], in_flight=[2, 1],
                             budget_bytes=1e9) == pytest.approx(4.0, rel=1e-3)  # memory no limit: even


def _best_one_policy_split(count, static, policies, in_flight, budget, pinned=None):
    """Least max over stages of pinned seconds + n_j · t_p, over every integer split and one policy per stage
    that fits beside the stage's pinned bytes."""
    pinned = pinned or [(0.0, 0.0)] * len(in_flight)
    best = math.inf
    for split in itertools.product(range(count + 1), repeat=len(in_flight)):
        if sum(split) != count:
            continue
        worst = 0.0
        for n, k, (fixed_bytes, fixed_s) in zip(split, in_flight, pinned):
            fits = [fixed_s + n * t for a, t in policies if fixed_bytes + n * (static + k * a) <= budget]
            worst = max(worst, min(fits, default=math.inf))
        best = min(best, worst)
    return best


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("with_pinned", [False, True])
def test_chunk_bound_equals_the_best_one_policy_split(seed, with_pinned):
    """Exact for the repeated layers alone, and with layers pinned to the first and last stages: never above
    the brute force (a valid bound), and equal to it."""
    from autopar.solvers.bottlenecks import chunk_bottleneck_s

    rng = random.Random(seed)
    count, stages = rng.randint(1, 7), rng.randint(1, 3)
    policies = [(rng.uniform(0.1, 3.0), rng.uniform(0.5, 2.0)) for _ in range(rng.randint(1, 3))]
    in_flight = [rng.randint(1, 4) for _ in range(stages)]
    static, budget = rng.uniform(0.0, 2.0), rng.uniform(2.0, 20.0)
    pinned = None
    if with_pinned:  # the model's first layer on stage 0 and its last on the last stage (both on one stage)
        pinned = [[0.0, 0.0] for _ in range(stages)]
        for stage in (0, stages - 1):
            pinned[stage][0] += rng.uniform(0.0, 6.0)
            pinned[stage][1] += rng.uniform(0.0, 2.0)
        pinned = [tuple(p) for p in pinned]
    got = chunk_bottleneck_s(count=count, static_bytes=static, policies=policies, in_flight=in_flight,
                             budget_bytes=budget, pinned=pinned)
    want = _best_one_policy_split(count, static, policies, in_flight, budget, pinned)
    if math.isinf(want):
        assert math.isinf(got)
    else:
        assert got <= want and got == pytest.approx(want, rel=1e-8)


def test_least_bottleneck_matches_brute_force_from_below():
    """``least_bottleneck_s`` is at most, and within a relative 1e-6 of, the least max stage sum over every
    contiguous cut: on layers of mixed times (the greedy cut by bisection) and on a few runs of equal layers,
    fewer runs than stages (the greedy cut run by run), as a transformer's embedding, blocks and head."""
    import itertools
    import random

    from autopar.solvers.bottlenecks import least_bottleneck_s

    rng = random.Random(0)
    for case in range(400):
        if case % 2:
            n = rng.randint(1, 9)
            stages = rng.randint(1, n + 1)
            times = [rng.choice([0.0, rng.random(), 1.0, 3.0]) for _ in range(n)]
        else:
            runs = [(rng.choice([0.0, rng.random(), 1.0, 3.0]), rng.randint(1, 5)) for _ in range(rng.randint(1, 3))]
            times = [t for t, m in runs for _ in range(m)][:12]
            n = len(times)
            stages = rng.randint(min(n, len(runs) + 1), n)
        best = min(max(sum(times[a:b]) for a, b in zip((0, *cuts), (*cuts, n)))
                   for cuts in itertools.combinations(range(1, n), min(stages, n) - 1))
        got = least_bottleneck_s(times, stages)
        assert got <= best and got >= best * (1 - 2e-6), (times, stages, got, best)
