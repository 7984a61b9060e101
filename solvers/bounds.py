"""Lower bounds for the outer search that couple memory and time per pipeline rank.

The search's cheaper bounds (``search._layout_bound``) spread the work evenly over the stages and
price the recomputation memory forces over all ranks together, so they miss that the first ranks of
a 1F1B pipeline hold more micro-batches in flight and must take fewer layers or recompute. The bound
here keeps the ranks apart for the most repeated layer alone (the other layers only add time and
memory, so leaving them out keeps it a lower bound).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

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
            for a_q, t_q in policies[p:]:
                d_a, d_t = a_q - a_p, t_q - t_p
                cross = (time_s * (static_bytes + k * a_p) - budget_bytes * t_p) / (budget_bytes * d_t - time_s * k * d_a)
                for lam in (0.0, 1.0, np.nan_to_num(np.clip(cross, 0.0, 1.0))):
                    acts, secs = a_p + lam * d_a, t_p + lam * d_t
                    held = np.minimum(budget_bytes / (static_bytes + k * acts), time_s / secs)
                    best = np.maximum(best, np.nan_to_num(held, nan=0.0, posinf=math.inf))
    return best


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
