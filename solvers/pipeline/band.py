"""The stage DP's kernel on banded stage-time tables: only ranges short enough to be allowed are stored.

A stage covering layers [i, k) is allowed when its memory fits (and, inside the bottleneck scan,
when its time is at most the candidate bottleneck T). Memory only grows with the range, so for each
end k the allowed starts form an interval that reaches back at most ``width`` layers; the table keeps
``band[j, k, c] = t_j(k − width + c, k)`` for c = 0 … width − 1 (+inf where not allowed or i < 0)
instead of the dense (L + 1)² matrix. With S stages sharing L layers the width is about L/S times the
imbalance the budget allows, so one DP costs O(S · L · width) ≈ O(L²) instead of O(S · L²), and a DP
at bottleneck T reads only the columns where some entry is at most T.

The entries are computed with the same floating-point operations, in the same order, as the dense
matrices (``t = (P[k] − P[i]) + c_i + c_k``, memory ``(W[k] − W[i]) + n · (A[k] − A[i])``), and the
DP breaks ties toward the smallest start i as ``np.argmin`` over a dense column does, so the band
changes the work, never the partition chosen.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import as_strided, sliding_window_view
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]


@dataclass(frozen=True, slots=True, kw_only=True)
class StageTimes:
    """t_j(i, k) of every stage j over every allowed range [i, k), as a band (+inf = not allowed)."""

    tables: FloatArray
    """The distinct bands, shape (V, L + 1, width): ``tables[index[j], k, c] = t_j(k − width + c, k)``."""
    index: tuple[int, ...]
    """Per stage j, its band in ``tables`` (stages with the same neighbours and memory share one)."""
    column_min: FloatArray
    """Per column c, the least entry over every stage and end (+inf if none is allowed)."""

    @property
    def width(self) -> int:
        """Longest range (in layers) the band holds."""
        return int(self.tables.shape[2])

    @property
    def num_stages(self) -> int:
        """S."""
        return len(self.index)

    def band(self, stage: int) -> FloatArray:
        """Stage ``stage``'s band, shape (L + 1, width)."""
        return self.tables[self.index[stage]]

    def at(self, stage: int, start: int, end: int) -> float:
        """t_stage(start, end), +inf when the range is not allowed or longer than the band."""
        length = end - start
        if not 0 < length <= self.width:
            return math.inf
        return float(self.band(stage)[end, self.width - length])

    def elementwise_min(self, others: Sequence[StageTimes]) -> StageTimes:
        """The entry-wise least over ``self`` and ``others`` (same shape and stage-to-band index)."""
        if any(o.index != self.index for o in others):
            raise ValueError("elementwise_min needs stage times built for the same stages and budget")
        if not others:
            return self
        return _with_column_min(np.min(np.stack([self.tables, *(o.tables for o in others)]), axis=0), self.index)


def _with_column_min(tables: FloatArray, index: tuple[int, ...]) -> StageTimes:
    column_min = tables.min(axis=(0, 1)) if tables.size else np.full(tables.shape[2], np.inf)
    return StageTimes(tables=tables, index=index, column_min=column_min)


def _prefix(values: Sequence[float]) -> FloatArray:
    return np.concatenate(([0.0], np.cumsum(np.asarray(values, dtype=np.float64))))


def feasible_width(static: Sequence[float], activations: Sequence[float], in_flight: Sequence[int],
                   budget: float) -> int:
    """The longest range any stage may cover within ``budget`` (memory is monotone in the range: bisection)."""
    n = len(static)
    if math.isinf(budget) and budget > 0:
        return n
    w, a = _prefix(static), _prefix(activations)
    least = min(in_flight)  # activations are >= 0: the stage holding the fewest micro-batches fits the longest

    def fits(length: int) -> bool:
        k = np.arange(length, n + 1)
        i = k - length
        return bool(np.any((w[k] - w[i]) + least * (a[k] - a[i]) <= budget))

    low, high = 0, n  # fits(low) holds (an empty range is never needed); find the largest length that fits
    while low < high:
        mid = (low + high + 1) // 2
        if fits(mid):
            low = mid
        else:
            high = mid - 1
    return max(low, 1)


def stage_times(*, work: Sequence[float], send: Sequence[float], static: Sequence[float],
                activations: Sequence[float], in_flight: Sequence[int], budget: float, width: int) -> StageTimes:
    """The band of t_j(i, k), +inf where stage j's memory over [i, k) exceeds ``budget``.

    ``t_j(i, k) = Σ work[i:k] + [j > 0]·send[i] + [j < S−1]·send[k]`` (``send[L]`` = 0).
    """
    n, num_stages = len(work), len(in_flight)
    k = np.arange(n + 1)[:, None]
    i = k - width + np.arange(width)[None, :]
    outside = i < 0
    i = np.where(outside, 0, i)
    prefix = _prefix(work)
    comm = np.concatenate((np.asarray(send, dtype=np.float64), [0.0]))
    base = prefix[k] - prefix[i]
    base[outside] = np.inf
    recv, out = comm[i], comm[k]
    variants = {(False, False): base, (True, False): base + recv, (False, True): base + out,
                (True, True): base + recv + out}
    w, a = _prefix(static), _prefix(activations)
    w_range, a_range = w[k] - w[i], a[k] - a[i]
    unlimited = math.isinf(budget) and budget > 0
    keys = [(j > 0, j < num_stages - 1, None if unlimited else held) for j, held in enumerate(in_flight)]
    distinct = list(dict.fromkeys(keys))
    tables = np.empty((len(distinct), n + 1, width))
    for v, (recv_in, send_out, held) in enumerate(distinct):
        t = variants[(recv_in, send_out)]
        tables[v] = t if held is None else np.where(w_range + held * a_range <= budget, t, np.inf)
    slot = {key: v for v, key in enumerate(distinct)}
    return _with_column_min(tables, tuple(slot[key] for key in keys))


def min_sum_dp(times: StageTimes, limit_s: float) -> tuple[float, NDArray[np.int64]]:
    """Min Σ_j t_j over partitions with every t_j <= limit; returns (value, start-of-stage table).

    G[0][0] = 0;  G[j+1][k] = min_{i<k} G[j][i] + t_j(i, k)  subject to t_j(i, k) <= limit;
    ``arg[j, k]`` is the start i of stage j in the best partition of layers [0, k) into j + 1 stages.
    """
    num_stages, (_, size, width) = times.num_stages, times.tables.shape
    usable = np.flatnonzero(np.isfinite(times.column_min) if math.isinf(limit_s) else times.column_min <= limit_s)
    arg = np.zeros((num_stages, size), dtype=np.int64)
    if usable.size == 0:
        return math.inf, arg
    first = int(usable[0])  # columns before it are longer ranges with every entry above the limit
    span = width - first
    band = times.tables[:, :, first:]
    limited = not math.isinf(limit_s)
    index = times.index
    rows = np.arange(size)
    padded = np.full(span + size, np.inf)
    window = as_strided(padded, shape=(size, span), strides=(padded.strides[0],) * 2)  # window[k, c] = g[k − span + c]
    padded[span] = 0.0
    g = padded[span:]
    layers = size - 1
    for j in range(num_stages):
        # only ends k that j + 1 stages of 1 … span layers reach and the other S − j − 1 stages can finish from
        # (+inf elsewhere, as the full column would give: the entries outside are never on a finishing path)
        lo, hi = max(j + 1, layers - (num_stages - j - 1) * span), min(layers, (j + 1) * span)
        if lo > hi:  # no split of this many stages covers the layers
            return math.inf, arg
        entries = band[index[j], lo:hi + 1]
        cand = window[lo:hi + 1] + entries
        if limited:  # ranges slower than the limit are not allowed
            cand[entries > limit_s] = np.inf
        best = cand.argmin(axis=1)
        arg[j, lo:hi + 1] = best
        reached = cand[rows[:hi + 1 - lo], best]
        g[:] = np.inf
        g[lo:hi + 1] = reached
    arg += (rows - span)[None, :]
    return float(g[-1]), arg


def boundaries_from(arg: NDArray[np.int64]) -> tuple[int, ...]:
    """S + 1 boundaries traced back from the end through ``min_sum_dp``'s table."""
    num_stages, size = arg.shape
    cuts = [size - 1]
    for j in range(num_stages - 1, -1, -1):
        cuts.append(int(arg[j, cuts[-1]]))
    return tuple(reversed(cuts))


def min_bottleneck(times: StageTimes, upper_s: float) -> float:
    """The smallest bottleneck that admits a partition: ``B[j+1][k] = min_i max(B[j][i], t_j(i, k))``.

    ``upper_s`` is the bottleneck of some partition: longer ranges whose every entry exceeds it are skipped.
    """
    _, size, width = times.tables.shape
    usable = np.flatnonzero(times.column_min <= upper_s)
    first = int(usable[0]) if usable.size else 0
    span = width - first
    best = np.full(size, np.inf)
    best[0] = 0.0
    for j in range(times.num_stages):
        window = sliding_window_view(np.concatenate((np.full(span, np.inf), best)), span)[:size]
        best = np.maximum(window, times.band(j)[:, first:]).min(axis=1)
    return float(best[-1])


def score(times: StageTimes, bounds: tuple[int, ...], alpha: float, beta: float) -> tuple[float, tuple[int, ...]]:
    """(alpha · max_j t_j + beta · Σ_j t_j, bounds)."""
    ends = np.asarray(bounds)
    stage = times.tables[np.asarray(times.index), ends[1:], times.width - (ends[1:] - ends[:-1])].tolist()
    return alpha * max(stage) + beta * sum(stage), bounds


def partition_times(times: StageTimes, *, alpha: float, beta: float) -> tuple[int, ...] | None:
    """Boundaries minimising ``alpha · max_j t_j + beta · Σ_j t_j`` over the allowed ranges; None if none fits.

    Over the sorted candidate bottlenecks T_0 < … < T_n in the window that can win, G(T) (the
    least Σ t_j with every t_j ≤ T) does not increase with T. An index interval [a, b] can hold
    nothing better than ``alpha · T_a + beta · G(T_b)``, and nothing new when G(T_a) = G(T_b)
    (the DP at T_a already found that sum with a bottleneck ≤ T_a); other intervals are split
    at their middle. Exact, with one DP per visited candidate.
    """
    total, arg = min_sum_dp(times, math.inf)
    if not math.isfinite(total):
        return None
    bounds = boundaries_from(arg)
    best = score(times, bounds, alpha, beta)
    if alpha == 0.0:
        return best[1]
    # only bottlenecks from the smallest feasible one up to where alpha·T alone loses can win
    upper = max(times.at(j, bounds[j], bounds[j + 1]) for j in range(times.num_stages))
    low, high = min_bottleneck(times, upper), (best[0] - beta * total) / alpha
    band = times.tables  # every stage's band is one of these: the same set of values
    candidates = np.unique(band[(band >= low) & (band < high)])
    if candidates.size == 0:
        return best[1]
    sums: dict[int, float] = {}

    def g(index: int) -> float:
        nonlocal best
        if index not in sums:
            value, argmin = min_sum_dp(times, float(candidates[index]))
            sums[index] = value
            if math.isfinite(value):
                best = min(best, score(times, boundaries_from(argmin), alpha, beta))
        return sums[index]

    stack = [(0, candidates.size - 1)]
    while stack:
        a, b = stack.pop()
        g_a, g_b = g(a), g(b)
        if b - a <= 1 or g_a == g_b or alpha * float(candidates[a]) + beta * g_b >= best[0]:
            continue
        mid = (a + b) // 2
        stack.extend(((a, mid), (mid, b)))
    return best[1]
