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


_RELATIVE_WIDTH = 2.5e-4
"""The search for the least feasible bottleneck stops once its bracket is this narrow relative to its top:
the bound is then within 0.025 % of the least bottleneck, below it."""
_KINKS_AT_ONCE = 9
"""Kinks at which one round of the search for the bottleneck evaluates the capacity (a round's array is
times × ranks × segments)."""
_MOST_STEPS = 200
"""A cap on the steps of that search (a bisection would narrow any bracket of floats far sooner)."""


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


class _Ranks(NamedTuple):
    """The parts of ``_capacity`` that do not depend on the candidate time, per rank (rows) and segment."""

    lean: np.ndarray
    """Bytes of one block at p: static + k·a_p."""
    d_bytes: np.ndarray
    """Bytes of one block at q less at p: k·(a_q − a_p)."""
    budget_secs: np.ndarray
    """budget · t_p (per segment: the same on every rank)."""
    budget_d_secs: np.ndarray
    """budget · (t_q − t_p) (per segment)."""

    @classmethod
    def of(cls, *, static_bytes: float, segments: _Segments, in_flight: np.ndarray, budget_bytes: float) -> _Ranks:
        k = in_flight.astype(np.float64)[:, None]
        a_p, t_p, d_a, d_t = segments
        return cls(lean=static_bytes + k * a_p, d_bytes=k * d_a, budget_secs=budget_bytes * t_p,
                   budget_d_secs=budget_bytes * d_t)


def _capacity(time_s: np.ndarray, *, ranks: _Ranks, segments: _Segments, budget_bytes: float) -> np.ndarray:
    """Per candidate time (rows) and rank (columns), the most blocks (fractional) a rank can hold.

    A rank holding x blocks under a mix of policies with mean (activation bytes ā, seconds τ̄) needs
    ``x·(s + k·ā) ≤ budget`` and ``x·τ̄ ≤ T``; the mixes form the hull of the policies' points, and the
    best one lies on a segment between two of them, at an end or where the two limits cross. Candidates,
    ranks and segments are the three axes of one array.
    """
    time_s = time_s[:, None, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        lam = (time_s * ranks.lean - ranks.budget_secs) / (ranks.budget_d_secs - time_s * ranks.d_bytes)
        np.clip(lam, 0.0, 1.0, out=lam)
        lam[np.isnan(lam)] = 0.0  # λ = 0 at the ends, where d_a = d_t = 0
        held = np.minimum(budget_bytes / (ranks.lean + lam * ranks.d_bytes), time_s / (segments.secs + lam * segments.d_secs))
    most = np.zeros(held.shape[:2])
    for segment in range(held.shape[2]):  # a loop over the few segments: numpy reduces a short last axis slowly
        np.fmax(most, held[:, :, segment], out=most)  # fmax skips NaN (0/0: a block of no bytes and no time)
    return most


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
    ranks = _Ranks.of(static_bytes=static_bytes, segments=segments, in_flight=k, budget_bytes=budget_bytes)

    def capacity(times: np.ndarray) -> np.ndarray:  # blocks all ranks hold within each time
        return _capacity(times, ranks=ranks, segments=segments, budget_bytes=budget_bytes).sum(axis=1)

    lean = min(policies)  # the fewest activation bytes: it fits the most layers when time is no limit
    low, high = count * min(t for _, t in policies) / len(k), count * lean[1]  # below: even at the fastest
    # capacity grows with the time allowed and is linear in it between the times at which a rank's blocks at one
    # policy fill its memory and its time together (``_kinks``): the sum reaches ``count`` between two of them,
    # where regula falsi finds it at once (the Illinois rule in case it is not linear there), keeping an
    # infeasible time below it and a feasible one above
    times = np.concatenate(([low], _kinks(ranks, segments, low, high), [high]))
    lo, hi = 0, len(times) - 1  # indices into ``times``: the crossing is in [times[lo], times[hi]] once checked
    excess_lo = excess_hi = math.nan
    while True:  # narrow [lo, hi] to two neighbouring kinks, a few at a time
        picks = np.arange(lo, hi + 1) if hi - lo < _KINKS_AT_ONCE else \
            np.unique(np.linspace(lo, hi, _KINKS_AT_ONCE).round().astype(np.intp))
        excess = capacity(times[picks]) - count
        if math.isnan(excess_hi):  # the first round: picks holds both ends
            if excess[-1] < 0:
                return math.inf
            if excess[0] >= 0:
                return low * (1 - 1e-9)  # the even split at the fastest policy fits
        first = int(np.argmax(excess >= 0))  # the last pick is feasible, the first infeasible
        lo, hi = int(picks[first - 1]), int(picks[first])
        excess_lo, excess_hi = float(excess[first - 1]), float(excess[first])
        if hi - lo <= 1:
            break
    low, high, excess_low, excess_high = float(times[lo]), float(times[hi]), excess_lo, excess_hi
    side = 0
    for _ in range(_MOST_STEPS):
        if high - low <= _RELATIVE_WIDTH * high:
            break
        guess = (low * excess_high - high * excess_low) / (excess_high - excess_low)
        if not low < guess < high:
            guess = (low + high) / 2
        # the guess and a time just below it: when the guess is the crossing, that brackets it at once
        pair = np.array([max(low, guess * (1 - _RELATIVE_WIDTH / 2)), guess])
        below, at = (float(v) - count for v in capacity(pair))
        if below >= 0:  # both feasible
            high, excess_high = float(pair[0]), below
            if side == 1:
                excess_low /= 2  # the same end moved twice: halve the other's weight (Illinois)
            side = 1
        elif at < 0:  # both infeasible
            low, excess_low = guess, at
            if side == -1:
                excess_high /= 2
            side = -1
        else:
            low, high, excess_low, excess_high = float(pair[0]), guess, below, at
    # low is below the least bottleneck: infeasible there
    return low * (1 - 1e-9)  # a margin for rounding


def _kinks(ranks: _Ranks, segments: _Segments, low: float, high: float) -> np.ndarray:
    """The times strictly between ``low`` and ``high`` at which a rank's blocks at one policy fill its budget and its
    time together (budget · t_p / (static + k · a_p)): where a rank's capacity changes slope, sorted."""
    with np.errstate(divide="ignore", invalid="ignore"):
        times = (ranks.budget_secs / ranks.lean)[:, segments.d_secs == 0]  # the segments p → p: one per policy
    return np.unique(times[(times > low) & (times < high)])  # NaN and ±inf fail both tests


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

    def held(c: float) -> float:  # layers the stages hold within c seconds: grows with c
        with np.errstate(divide="ignore", invalid="ignore"):
            by_time = np.floor((c - extra_s)[:, None] / secs[None, :] * (1 + _ROUNDING))  # (S, P)
        return float(np.fmax.reduce(np.minimum(by_memory, by_time), axis=1, initial=0.0).sum())  # NaN: 0

    if held(candidates[-1]) < count:
        return math.inf
    lo, hi = 0, len(candidates) - 1  # the first feasible candidate is in [lo, hi]; hi is feasible
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if held(candidates[mid]) >= count else (mid + 1, hi)
    return float(candidates[hi]) * (1 - _ROUNDING)


__all__ = ["chunk_bottleneck_s", "least_bottleneck_s", "rank_bottleneck_s", "runs_of"]
