"""How well predictions match measurements: rank correlation, regret, memory error, a stable median.

Used by ``bench/plan_regret.py`` (predicted vs measured step time and memory of every layout
the planner can emit on the local cluster). Torch-free; plain numbers in, plain numbers out.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def ranks_of(values: Sequence[float]) -> list[float]:
    """Ranks 1..n, ties sharing their mean rank (the convention Spearman's rho needs).

    Example:
        >>> ranks_of([10.0, 30.0, 20.0, 20.0])
        [1.0, 4.0, 2.5, 2.5]
    """
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(predicted: Sequence[float], measured: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's r of the ranks (ties averaged).

    Raises:
        ValueError: fewer than 2 pairs, unequal lengths, or a constant sequence (rho undefined).

    Example:
        >>> spearman([1, 2, 3, 4], [10, 20, 30, 40]), spearman([1, 2, 3, 4], [40, 30, 20, 10])
        (1.0, -1.0)
        >>> round(spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]), 3)
        0.8
    """
    if len(predicted) != len(measured) or len(predicted) < 2:
        raise ValueError(f"spearman needs two equal sequences of >= 2 values, got {len(predicted)}, {len(measured)}")
    rp, rm = ranks_of(predicted), ranks_of(measured)
    mp, mm = statistics.fmean(rp), statistics.fmean(rm)
    cov = sum((a - mp) * (b - mm) for a, b in zip(rp, rm))
    var_p = sum((a - mp) ** 2 for a in rp)
    var_m = sum((b - mm) ** 2 for b in rm)
    if var_p == 0 or var_m == 0:
        raise ValueError("spearman is undefined for a constant sequence")
    return float(cov / (var_p * var_m) ** 0.5)


def regret(chosen_measured_s: float, measured_s: Sequence[float]) -> float:
    """Measured time of the chosen layout over the fastest measured one, minus 1 (0: the best was chosen).

    Example:
        >>> regret(1.1, [1.0, 1.1, 1.5])
        0.10000000000000009
    """
    best = min(measured_s)
    if best <= 0:
        raise ValueError(f"measured times must be positive, got a minimum of {best}")
    return chosen_measured_s / best - 1.0


def relative_error(predicted: float, measured: float) -> float:
    """(predicted − measured) / measured: positive when the prediction is high.

    Example:
        >>> relative_error(110.0, 100.0)
        0.1
    """
    if measured <= 0:
        raise ValueError(f"measured value must be positive, got {measured}")
    return (predicted - measured) / measured


def is_stable(samples: Sequence[float], *, window: int, tolerance: float) -> bool:
    """Whether the median of the last ``window`` samples is within ``tolerance`` of the one before.

    Example:
        >>> is_stable([5.0, 1.0, 1.02, 0.99, 1.0, 1.01], window=3, tolerance=0.03)
        True
        >>> is_stable([1.0, 2.0, 3.0, 4.0], window=2, tolerance=0.03)
        False
    """
    if len(samples) < window + 1:
        return False
    now = statistics.median(samples[-window:])
    before = statistics.median(samples[-window - 1:-1])
    return abs(now - before) <= tolerance * now


def min_is_stable(samples: Sequence[float], *, window: int, tolerance: float) -> bool:
    """Whether the last ``window`` samples failed to lower the minimum by more than ``tolerance``.

    On a machine shared with other processes every sample is the step's own time plus whatever
    the others stole, so the minimum is the best estimate of the step alone (as the op profiler's
    ``Statistic.MIN``); it is settled when more samples stop improving it.

    Example:
        >>> min_is_stable([1.3, 1.0, 1.2, 1.1, 1.02, 1.5], window=3, tolerance=0.03)
        True
        >>> min_is_stable([1.3, 1.2, 1.1, 1.0], window=2, tolerance=0.03)
        False
    """
    if len(samples) < window + 1:
        return False
    return min(samples[-window:]) >= (1 - tolerance) * min(samples[:-window])


def spread(samples: Sequence[float]) -> float:
    """Interquartile range over the median: the relative scatter of timed steps.

    Example:
        >>> spread([1.0, 1.0, 1.0, 1.0])
        0.0
    """
    if len(samples) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(samples, n=4)
    return float((q3 - q1) / statistics.median(samples))


__all__ = ["is_stable", "min_is_stable", "ranks_of", "regret", "relative_error", "spearman", "spread"]
