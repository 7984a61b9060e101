"""Least bottlenecks of equal or listed layers over pipeline stages: the numeric cores of the search bounds.

Each returns a lower bound on the slowest stage (or rank) of every partition it relaxes, from below
(a margin for rounding), so the bounds built on them (``bounds``) never exceed a layout's price.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

_ROUNDING = 1e-9
"""Relative slack on floors and on the returned bound, so float rounding never makes a bound too high."""


def rank_bottleneck_s(*, count: int, static_bytes: float, policies: Sequence[tuple[float, float]],
                      in_flight: Sequence[int], budget_bytes: float) -> float:
    """Least possible ``max_r T_r`` for ``count`` equal layers over ranks holding ``in_flight[r]`` micro-batches.

    ``policies`` lists (activation bytes, forward + backward seconds) of one layer per recomputation
    policy; ``static_bytes`` is its model state per GPU. Rank r's layers must fit
    ``Σ (static + in_flight[r] · activations) ≤ budget_bytes``. Layers may be split fractionally and
    policies mixed (a relaxation), so the result is a lower bound; +inf when no split fits.

    Within time T, rank r holds at most x blocks of a mix of policies with mean bytes L̄ and seconds τ̄:
    ``x · L̄ ≤ budget`` and ``x · τ̄ ≤ T``. The best mixes lie on the lower-left chain of the policies' convex
    hull (``_chain``), the same on every rank (bytes s + k·a are affine in a), so the rank's capacity is
    concave and piecewise linear in T: T / t_0 (time-bound at the fastest policy) until the time
    ``budget · t_v / L_v`` at which chain policy v fills the budget in its time, then along the mix of v and
    v + 1 between those times, then budget / L_last. The ranks' sum is piecewise linear too; the least T
    at which it reaches ``count`` is read off its slopes between the sorted kinks.

    Example:
        >>> round(rank_bottleneck_s(count=4, static_bytes=0.0, policies=[(1.0, 1.0)], in_flight=[2, 1],
        ...                         budget_bytes=3.0), 3)  # rank 0 fits 1.5 layers, rank 1 the other 2.5
        2.5
    """
    if count <= 0:
        return 0.0
    if budget_bytes <= 0:
        return math.inf
    acts, secs = (np.asarray(v, dtype=np.float64) for v in zip(*_chain(policies)))
    k = np.asarray(in_flight, dtype=np.float64)[:, None]
    lean = static_bytes + k * acts[None, :]  # (ranks, chain): bytes of one block at each chain policy
    with np.errstate(divide="ignore", invalid="ignore"):  # a block of no bytes never fills the budget (inf, NaN)
        kinks = budget_bytes * secs[None, :] / lean  # rank r's capacity changes slope at kinks[r, v]
        fastest = secs[0]
        start = 0.0 if fastest > 0 else float(np.sum(budget_bytes / lean[:, 0]))  # a zero-time policy: held at once
    # the slope of rank r's capacity after kink v: along the mix of v and v + 1 (1 / t_{v+1} when v + 1 takes no
    # bytes), flat after the last
    d_bytes, d_secs = lean[:, 1:] - lean[:, :-1], secs[1:] - secs[:-1]
    after = np.concatenate((-d_bytes / (d_secs * lean[:, :-1] - secs[:-1] * d_bytes), np.zeros_like(k)), axis=1)
    before = np.full_like(k, 1.0 / fastest if fastest > 0 else 0.0)
    change = (after - np.concatenate((before, after[:, :-1]), axis=1)).ravel()  # slope change at each kink
    order = np.argsort(kinks, axis=None, kind="stable")
    order = order[np.isfinite(kinks.ravel()[order])]
    points = np.concatenate(([0.0], kinks.ravel()[order]))  # T = 0, then the kinks in order
    slopes = before.sum() + np.concatenate(([0.0], np.cumsum(change[order])))  # from each point to the next
    held = start + np.concatenate(([0.0], np.cumsum(slopes[:-1] * np.diff(points))))  # at each point
    bounded = bool(np.all(lean[:, -1] > 0))  # every rank's capacity stops growing at its last kink
    if bounded and math.fsum(budget_bytes / lean[:, -1]) < count * (1 - 1e-12):
        return math.inf  # every rank full of the leanest chain policy holds too few
    reach = int(np.searchsorted(held, count))  # the first point holding count
    if reach == 0:
        return 0.0  # held at once: blocks of a policy that takes no time
    if reach < len(points):  # between two points, where the capacity grows
        crossing = min(points[reach - 1] + (count - held[reach - 1]) / slopes[reach - 1], points[reach])
    elif bounded:
        crossing = points[-1]  # count is the most the ranks hold (to rounding): reached at the last kink
    else:
        crossing = points[-1] + (count - held[-1]) / slopes[-1]  # past the last kink, on blocks of no bytes
    return float(crossing) * (1 - _ROUNDING) ** 2  # below the crossing: the sums above round


def _chain(policies: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (activation bytes, seconds) policies on the lower-left chain of their convex hull, by seconds: each has
    fewer bytes than the one before, and lies below the chord of its neighbours (the others are no better than
    a mix of two chain policies, in both bytes and time, on any rank).

    Example:
        >>> _chain([(10.0, 1.0), (8.0, 1.5), (1.0, 2.0), (12.0, 3.0)])  # (8, 1.5) is above the chord
        [(10.0, 1.0), (1.0, 2.0)]
    """
    chain: list[tuple[float, float]] = []
    for a, t in sorted(policies, key=lambda p: (p[1], p[0])):
        if chain and a >= chain[-1][0]:
            continue  # no fewer bytes for no less time
        while len(chain) >= 2 and (chain[-1][0] - chain[-2][0]) * (t - chain[-2][1]) >= \
                (a - chain[-2][0]) * (chain[-1][1] - chain[-2][1]):
            chain.pop()  # the last one lies on or above the chord from the one before it to this one
        chain.append((a, t))
    return chain


_PRECISION = 1e-6
"""Relative width at which the bisection for the least bottleneck stops: the bound is within 10⁻⁶ of it, below."""


def runs_of(times: Sequence[float]) -> tuple[tuple[float, int], ...]:
    """(seconds, count) of each run of equal consecutive ``times``.

    Example:
        >>> runs_of([1.0, 2.0, 2.0, 1.0])
        ((1.0, 1), (2.0, 2), (1.0, 1))
    """
    return tuple((t, sum(1 for _ in group)) for t, group in itertools.groupby(times))


def least_bottleneck_s(times: Sequence[float], stages: int, runs: Sequence[tuple[float, int]] | None = None) -> float:
    """Least possible ``max_j`` (Σ of ``times`` in stage j) over cuts of ``times`` into ``stages`` contiguous
    stages, from below (a time the greedy cut finds infeasible, less a margin for rounding).

    A stage's time in any partition is at least the sum of its layers' least times (sends and the
    policy chosen only add to it), so this is a lower bound on every partition's bottleneck.
    ``runs``: ``runs_of(times)``, when the caller keeps it for many calls.

    Example:
        >>> round(least_bottleneck_s([1.0, 1.0, 1.0, 1.0, 3.0], 2), 5)  # [1, 1, 1, 1] [3]
        4.0
    """
    n = len(times)
    longest = max(times, default=0.0)
    if stages >= n:
        return longest * (1 - _ROUNDING)
    runs = runs_of(times) if runs is None else runs
    total = math.fsum(times)
    if len(runs) < stages:  # a transformer: few runs of equal layers; each run is crossed in one step
        def fits(limit: float) -> bool:
            return _greedy_stages(runs, limit, stages) <= stages
    else:
        prefix = list(itertools.accumulate(times, initial=0.0))

        def fits(limit: float) -> bool:  # the greedy cut: each stage takes as many layers as fit under limit
            i = 0
            for _ in range(stages):
                i = bisect.bisect_right(prefix, prefix[i] + limit) - 1
                if i >= n:
                    return True
            return False

    low = max(total / stages, longest)
    if fits(low):
        return low * (1 - _ROUNDING)
    high = total / stages + longest  # feasible: each greedy stage but the last exceeds high − longest
    while high - low > _PRECISION * high:
        mid = (low + high) / 2
        low, high = (low, mid) if fits(mid) else (mid, high)
    return low * (1 - _ROUNDING)


def _greedy_stages(runs: Sequence[tuple[float, int]], limit: float, most: int) -> int:
    """Stages the greedy cut takes (each as many layers as fit under ``limit``) over ``runs`` of (seconds,
    count) equal layers, counted run by run; stops early past ``most``. Every layer must fit: t ≤ limit."""
    used, room = 1, limit
    for t, m in runs:
        if t <= 0.0:
            continue
        take = min(m, int(room // t))  # into the stage already open
        m, room = m - take, room - take * t
        if m:  # the rest opens stages holding ⌊limit / t⌋ each, the last one partly full
            per = int(limit // t)
            full, rest = divmod(m, per)
            used += full + (rest > 0)
            room = limit - (rest or per) * t
            if used > most:
                return used
    return used


def chunk_bottleneck_s(*, count: int, static_bytes: float, policies: Sequence[tuple[float, float]],
                       in_flight: Sequence[int], budget_bytes: float,
                       pinned: Sequence[tuple[float, float]] | None = None) -> float:
    """Least possible ``max_j t_j`` for ``count`` equal layers over stages that each run one policy.

    Stage j holds a whole number x_j of the layers under one policy p (activation bytes a_p, seconds t_p):
    ``x_j · (static + in_flight[j] · a_p) ≤ budget_bytes`` and ``t_j ≥ x_j · t_p``. ``pinned`` gives, per
    stage, the (bytes, seconds) of other layers it must hold as well (at least: a contiguous partition puts
    the model's first layer on the first stage and its last on the last): they take ``pinned_bytes`` of the
    budget and add ``pinned_s`` to t_j. The least bottleneck is one of the values pinned_s + c · t_p
    (c = 0 … count): the smallest at which the stages hold ``count`` layers. +inf when no split fits.
    A lower bound on the stage DP's bottleneck when each stage picks one policy.

    Example:
        >>> chunk_bottleneck_s(count=4, static_bytes=0.0, policies=[(1.0, 1.0)], in_flight=[2, 1],
        ...                    budget_bytes=3.0) >= 3.0 * (1 - 1e-8)  # 1 layer on stage 0, 3 on stage 1
        True
        >>> chunk_bottleneck_s(count=4, static_bytes=0.0, policies=[(1.0, 1.0)], in_flight=[2, 1],
        ...                    budget_bytes=3.0, pinned=[(0.0, 0.0), (1.0, 0.5)]) >= 3.5 * (1 - 1e-8)
        True
    """
    if count <= 0 and not pinned:
        return 0.0
    stages = len(in_flight)
    extra_bytes, extra_s = (np.zeros(stages), np.zeros(stages)) if pinned is None else \
        (np.asarray(v, dtype=np.float64) for v in zip(*pinned))
    room = budget_bytes - extra_bytes
    if np.any(room < -_ROUNDING * abs(budget_bytes)):
        return math.inf  # a stage cannot hold its pinned layers alone
    k = np.asarray(in_flight, dtype=np.float64)[:, None]  # (S, 1)
    acts = np.asarray([a for a, _ in policies], dtype=np.float64)[None, :]  # (1, P)
    secs = np.asarray([t for _, t in policies], dtype=np.float64)
    by_memory = np.floor(np.maximum(room, 0.0)[:, None] / (static_bytes + k * acts) * (1 + _ROUNDING))  # (S, P)
    floor_s = float(extra_s.max())  # every stage holds its pinned layers
    offsets = np.unique(extra_s)
    steps = (np.arange(0, count + 1)[:, None] * secs[None, :]).ravel()
    candidates = np.unique((offsets[:, None] + steps[None, :]).ravel())
    candidates = candidates[candidates >= floor_s]  # sorted

    def held(times: np.ndarray) -> np.ndarray:  # layers the stages hold within each time: grows with it
        with np.errstate(divide="ignore", invalid="ignore"):
            by_time = np.floor((times[:, None] - extra_s[None, :])[:, :, None] / secs * (1 + _ROUNDING))  # (C, S, P)
        fitting = np.minimum(by_memory, by_time)
        most = np.zeros(fitting.shape[:2])
        for policy in range(fitting.shape[2]):  # the best policy per stage (fmax skips NaN, and 0 floors it)
            np.fmax(most, fitting[:, :, policy], out=most)
        return most.sum(axis=1)

    # the first feasible candidate, a few at once: every candidate before lo is infeasible, hi is feasible
    lo, hi, first_round = 0, len(candidates) - 1, True
    while lo < hi or first_round:
        picks = np.unique(np.linspace(lo, hi, min(hi - lo + 1, _CANDIDATES_AT_ONCE)).round().astype(np.intp))
        feasible = held(candidates[picks]) >= count
        if first_round and not feasible[-1]:
            return math.inf
        first_round = False
        first = int(np.argmax(feasible))
        lo, hi = (lo, lo) if first == 0 else (int(picks[first - 1]) + 1, int(picks[first]))
    return float(candidates[hi]) * (1 - _ROUNDING)


_CANDIDATES_AT_ONCE = 16
"""Candidates ``chunk_bottleneck_s`` tests per round (an array of candidates × stages × policies)."""


__all__ = ["chunk_bottleneck_s", "least_bottleneck_s", "rank_bottleneck_s", "runs_of"]
