"""Least bottlenecks of equal or listed layers over pipeline stages: the numeric cores of the search bounds.

Each returns a lower bound on the slowest stage (or rank) of every partition it relaxes, from below
(a margin for rounding), so the bounds built on them (``bounds``) never exceed a layout's price.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence

import numpy as np

_ROUNDING = 1e-9
"""Relative slack on floors and on the returned bound, so float rounding never makes a bound too high."""


_GRID = 64
"""Candidate bottlenecks tried at once in each round of the search for the least feasible one."""
_ROUNDS = 3
"""Rounds of refinement: the bound is within 64⁻³ of the first interval's width of the least bottleneck."""


def _capacity(time_s: np.ndarray, *, static_bytes: float, policies: Sequence[tuple[float, float]],
              in_flight: np.ndarray, budget_bytes: float) -> np.ndarray:
    """Per candidate time (rows) and rank (columns), the most blocks (fractional) a rank can hold.

    A rank holding x blocks under a mix of policies with mean (activation bytes ā, seconds τ̄) needs
    ``x·(s + k·ā) ≤ budget`` and ``x·τ̄ ≤ T``; the mixes form the hull of the policies' points, and the
    best one lies on a segment between two of them, at an end or where the two limits cross.
    """
    k = in_flight.astype(np.float64)[None, :]
    time_s = time_s[:, None]
    best = np.zeros((time_s.shape[0], k.shape[1]))
    with np.errstate(divide="ignore", invalid="ignore"):
        for p, (a_p, t_p) in enumerate(policies):
            best = np.fmax(best, np.minimum(budget_bytes / (static_bytes + k * a_p), time_s / t_p))  # the end λ = 0
            for a_q, t_q in policies[p + 1:]:  # λ = 1 is the other policy's own end, visited as its λ = 0
                d_a, d_t = a_q - a_p, t_q - t_p
                cross = ((time_s * (static_bytes + k * a_p) - budget_bytes * t_p)
                         / (budget_bytes * d_t - time_s * k * d_a))
                lam = np.clip(cross, 0.0, 1.0)
                lam[np.isnan(lam)] = 0.0
                acts, secs = a_p + lam * d_a, t_p + lam * d_t
                best = np.fmax(best, np.minimum(budget_bytes / (static_bytes + k * acts), time_s / secs))
    return best  # fmax skips NaN (0/0: a block of no bytes and no time), as 0 would: best starts at 0


def rank_bottleneck_s(*, count: int, static_bytes: float, policies: Sequence[tuple[float, float]],
                      in_flight: Sequence[int], budget_bytes: float) -> float:
    """Least possible ``max_r T_r`` for ``count`` equal layers over ranks holding ``in_flight[r]`` micro-batches.

    ``policies`` lists (activation bytes, forward + backward seconds) of one layer per recomputation
    policy; ``static_bytes`` is its model state per GPU. Rank r's layers must fit
    ``Σ (static + in_flight[r] · activations) ≤ budget_bytes``. Layers may be split fractionally and
    policies mixed (a relaxation), so the result is a lower bound; +inf when no split fits.

    Example:
        >>> round(rank_bottleneck_s(count=4, static_bytes=0.0, policies=[(1.0, 1.0)], in_flight=[2, 1],
        ...                         budget_bytes=3.0), 3)  # rank 0 fits 1.5 layers, rank 1 the other 2.5
        2.5
    """
    k = np.asarray(in_flight)
    if count <= 0:
        return 0.0

    def fits(times: np.ndarray) -> np.ndarray:
        return _capacity(times, static_bytes=static_bytes, policies=policies, in_flight=k,
                         budget_bytes=budget_bytes).sum(axis=1) >= count

    lean = min(policies)  # the fewest activation bytes: it fits the most layers when time is no limit
    low, high = 0.0, count * lean[1]
    if not fits(np.array([high]))[0]:
        return math.inf
    for _ in range(_ROUNDS):  # capacity grows with the time allowed: the feasible times are an interval
        grid = np.linspace(low, high, _GRID + 1)
        first = int(np.argmax(fits(grid)))  # the last point (high) is feasible
        if first == 0:
            break
        low, high = float(grid[first - 1]), float(grid[first])
    return low * (1 - 1e-9)  # infeasible at low: the least bottleneck is above it (a margin for rounding)


_BISECTIONS = 24
"""Halvings of the interval the least bottleneck lies in: within 2⁻²⁴ of the longest layer below it."""


def least_bottleneck_s(times: Sequence[float], stages: int) -> float:
    """Least possible ``max_j`` (Σ of ``times`` in stage j) over cuts of ``times`` into ``stages`` contiguous
    stages, from below (a time the greedy cut finds infeasible, less a margin for rounding).

    A stage's time in any partition is at least the sum of its layers' least times (sends and the
    policy chosen only add to it), so this is a lower bound on every partition's bottleneck.

    Example:
        >>> round(least_bottleneck_s([1.0, 1.0, 1.0, 1.0, 3.0], 2), 5)  # [1, 1, 1, 1] [3]
        4.0
    """
    n = len(times)
    longest = max(times, default=0.0)
    if stages >= n:
        return longest * (1 - _ROUNDING)
    prefix = list(itertools.accumulate(times, initial=0.0))

    def fits(limit: float) -> bool:  # the greedy cut: each stage takes as many layers as fit under limit
        i = 0
        for _ in range(stages):
            i = bisect.bisect_right(prefix, prefix[i] + limit) - 1
            if i >= n:
                return True
        return False

    low = max(prefix[-1] / stages, longest)
    if fits(low):
        return low * (1 - _ROUNDING)
    high = prefix[-1] / stages + longest  # feasible: each greedy stage but the last exceeds high − longest
    for _ in range(_BISECTIONS):
        mid = (low + high) / 2
        low, high = (low, mid) if fits(mid) else (mid, high)
    return low * (1 - _ROUNDING)


def chunk_bottleneck_s(*, count: int, static_bytes: float, policies: Sequence[tuple[float, float]],
                       in_flight: Sequence[int], budget_bytes: float) -> float:
    """Least possible ``max_j t_j`` for ``count`` equal layers over stages that each run one policy.

    Stage j holds a whole number x_j of the layers under one policy p (activation bytes a_p, seconds t_p):
    ``x_j · (static + in_flight[j] · a_p) ≤ budget_bytes`` and ``t_j ≥ x_j · t_p``. The least bottleneck is
    one of the values c · t_p (c = 1 … count): the smallest at which the stages hold ``count`` layers.
    +inf when no split fits. A lower bound on the stage DP's bottleneck when each stage picks one policy.

    Example:
        >>> chunk_bottleneck_s(count=4, static_bytes=0.0, policies=[(1.0, 1.0)], in_flight=[2, 1],
        ...                    budget_bytes=3.0) >= 3.0 * (1 - 1e-8)  # 1 layer on stage 0, 3 on stage 1
        True
    """
    if count <= 0:
        return 0.0
    k = np.asarray(in_flight, dtype=np.float64)[None, :, None]  # (1, S, 1)
    acts = np.asarray([a for a, _ in policies], dtype=np.float64)[None, None, :]  # (1, 1, P)
    secs = np.asarray([t for _, t in policies], dtype=np.float64)[None, None, :]
    by_memory = np.floor(budget_bytes / (static_bytes + k * acts) * (1 + _ROUNDING))  # (1, S, P)
    candidates = np.unique((np.arange(1, count + 1)[:, None] * secs[0, 0][None, :]).ravel())  # (C,)
    with np.errstate(divide="ignore", invalid="ignore"):
        by_time = np.floor(candidates[:, None, None] / secs * (1 + _ROUNDING))  # (C, 1, P)
    held = np.nan_to_num(np.minimum(by_memory, by_time), nan=0.0).max(axis=2).sum(axis=1)  # (C,)
    feasible = np.flatnonzero(held >= count)
    if feasible.size == 0:
        return math.inf
    return float(candidates[feasible[0]]) * (1 - _ROUNDING)


__all__ = ["chunk_bottleneck_s", "least_bottleneck_s", "rank_bottleneck_s"]
