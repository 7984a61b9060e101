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


_GRID = 8
"""Candidate bottlenecks tried at once in each round of the search for the least feasible one (a round's array
is candidates × ranks × segments: at pp = 64, 8 per round over 6 rounds costs a quarter of 64 over 3)."""
_ROUNDS = 6
"""Rounds of refinement: the bound is within 8⁻⁶ (3.8e-6) of the first interval's width of the least bottleneck."""


class _Segments(NamedTuple):
    """The segments p → q (p ≤ q: the ends included) between every two policies' (bytes, seconds) points."""

    acts: np.ndarray
    """Activation bytes at p."""
    secs: np.ndarray
    """Seconds at p."""
    d_acts: np.ndarray
    """Bytes at q less bytes at p."""
    d_secs: np.ndarray
    """Seconds at q less seconds at p."""

    @classmethod
    def of(cls, policies: Sequence[tuple[float, float]]) -> _Segments:
        p, q = (np.asarray(i) for i in zip(*itertools.combinations_with_replacement(range(len(policies)), 2)))
        acts, secs = (np.asarray(v, dtype=np.float64) for v in zip(*policies))
        return cls(acts=acts[p], secs=secs[p], d_acts=acts[q] - acts[p], d_secs=secs[q] - secs[p])


def _capacity(time_s: np.ndarray, *, static_bytes: float, segments: _Segments, in_flight: np.ndarray,
              budget_bytes: float) -> np.ndarray:
    """Per candidate time (rows) and rank (columns), the most blocks (fractional) a rank can hold.

    A rank holding x blocks under a mix of policies with mean (activation bytes ā, seconds τ̄) needs
    ``x·(s + k·ā) ≤ budget`` and ``x·τ̄ ≤ T``; the mixes form the hull of the policies' points, and the
    best one lies on a segment between two of them, at an end or where the two limits cross. Candidates,
    ranks and segments are the three axes of one array.
    """
    a_p, t_p, d_a, d_t = segments
    k = in_flight.astype(np.float64)[None, :, None]
    time_s = time_s[:, None, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        cross = ((time_s * (static_bytes + k * a_p) - budget_bytes * t_p)
                 / (budget_bytes * d_t - time_s * k * d_a))
        lam = np.clip(cross, 0.0, 1.0)
        lam[np.isnan(lam)] = 0.0  # λ = 0 at the ends, where d_a = d_t = 0
        held = np.minimum(budget_bytes / (static_bytes + k * (a_p + lam * d_a)), time_s / (t_p + lam * d_t))
    return np.fmax(np.fmax.reduce(held, axis=2), 0.0)  # fmax skips NaN (0/0: a block of no bytes and no time)


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
    segments = _Segments.of(policies)

    def fits(times: np.ndarray) -> np.ndarray:
        return _capacity(times, static_bytes=static_bytes, segments=segments, in_flight=k,
                         budget_bytes=budget_bytes).sum(axis=1) >= count

    lean = min(policies)  # the fewest activation bytes: it fits the most layers when time is no limit
    low, high = count * min(t for _, t in policies) / len(k), count * lean[1]  # below: even at the fastest
    if not fits(np.array([high]))[0]:
        return math.inf
    for _ in range(_ROUNDS):  # capacity grows with the time allowed: the feasible times are an interval
        grid = np.linspace(low, high, _GRID + 1)
        first = int(np.argmax(fits(grid)))  # the last point (high) is feasible
        if first == 0:
            break
        low, high = float(grid[first - 1]), float(grid[first])
    # low is below the least bottleneck: infeasible there, or the even split at the fastest policy
    return low * (1 - 1e-9)  # a margin for rounding


_PRECISION = 1e-6
"""Relative width at which the bisection for the least bottleneck stops: the bound is within 10⁻⁶ of it, below."""


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
    runs = [(t, sum(1 for _ in group)) for t, group in itertools.groupby(times)]
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
    k = np.asarray(in_flight, dtype=np.float64)[:, None]  # (S, 1)
    acts = np.asarray([a for a, _ in policies], dtype=np.float64)[None, :]  # (1, P)
    secs = np.asarray([t for _, t in policies], dtype=np.float64)
    by_memory = np.floor(budget_bytes / (static_bytes + k * acts) * (1 + _ROUNDING))  # (S, P)
    candidates = np.unique((np.arange(1, count + 1)[:, None] * secs[None, :]).ravel())  # (C,), sorted

    def held(c: float) -> float:  # layers the stages hold within c seconds: grows with c
        with np.errstate(divide="ignore", invalid="ignore"):
            by_time = np.floor(c / secs * (1 + _ROUNDING))  # (P,)
        return float(np.fmax.reduce(np.minimum(by_memory, by_time), axis=1, initial=0.0).sum())  # NaN: 0

    if held(candidates[-1]) < count:
        return math.inf
    lo, hi = 0, len(candidates) - 1  # the first feasible candidate is in [lo, hi]; hi is feasible
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if held(candidates[mid]) >= count else (mid + 1, hi)
    return float(candidates[hi]) * (1 - _ROUNDING)


__all__ = ["chunk_bottleneck_s", "least_bottleneck_s", "rank_bottleneck_s"]
