"""Stage partition with no memory limit for a short prefix, a run of identical layers and a short suffix.

With no memory limit (the time-optimal partition ``evaluate._fastest`` asks for) only the stage times
matter: stage j over layers [i, k) takes ``t_j = Σ work[i:k] + [j > 0]·send[i] + [j < S−1]·send[k]``.
A transformer is an embedding, n identical blocks and a head, and a stage that holds only blocks
differs from another only in how many it holds. So a partition is

- a choice of cuts among the p prefix positions 1 … r0 and the q suffix positions r1 … L−1
  (2^(p+q) choices, p + q ≤ ``MAX_EDGE_LAYERS``), and
- a composition of the n blocks into m + 1 pieces, m the cuts left for the run: the first piece shares
  a stage with the prefix's last part (``head + x·w + s``), the last with the suffix's first part
  (``x·w + s + foot``), and the m − 1 others are stages of blocks alone (``x·w + 2·s``).

For fixed edge cuts Σ_j t_j is fixed (each cut inside the run sends s twice), so the best composition
is the one of least bottleneck: the smallest candidate time T at which the pieces' capacities (how
many blocks each holds within T) add up to n. That is O(n log n) per choice of edge cuts, against
the band DP's O(S · L · width) per candidate bottleneck (``band.partition_times``); the answer is
the same optimum (the brute-force tests check both).

Ties. Among the partitions of least ``alpha · max_j t_j + beta · Σ_j t_j`` this returns the one of
least bottleneck, then the lexicographically smallest boundaries (the front stages as short as the
rest allow: under 1F1B they hold the most micro-batches in flight). Across choices of edge cuts,
scores and bottlenecks within a relative ``TIE`` of each other are equal, so which of mathematically
equal partitions comes back does not depend on rounding (the band DP's prefix sums make equal ranges
differ in their last bits, and its choice among equal partitions follows those bits).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np

MAX_EDGE_LAYERS = 4
"""Most layers outside the run (prefix + suffix) for which the edge cuts are enumerated (2^4 choices)."""
TIE = 1e-12
"""Relative difference below which two scores (or bottlenecks) of different edge cuts count as equal."""


class _Run(NamedTuple):
    """The longest run of layers with equal work and send: layers [start, end)."""

    start: int
    """r0: its first layer (= the prefix's length p)."""
    end: int
    """r1: one past its last layer (L − r1 = the suffix's length q)."""
    work_s: float
    """w: forward + backward seconds of one of its layers."""
    send_s: float
    """s: send seconds of a boundary inside it (its layers' input)."""


class _Choice(NamedTuple):
    """The best partition for one choice of edge cuts."""

    score_s: float
    """``alpha · max_j t_j + beta · Σ_j t_j``."""
    bottleneck_s: float
    """max_j t_j."""
    boundaries: tuple[int, ...]
    """The lexicographically smallest boundaries of that bottleneck."""


def longest_run(work: Sequence[float], send: Sequence[float]) -> tuple[int, int]:
    """(first, one past the last) layer of the longest run of layers with equal work and send (first of equals).

    Example:
        >>> longest_run([1.0, 3.0, 3.0, 3.0, 2.0], [0.0, 0.5, 0.5, 0.5, 0.5])
        (1, 4)
    """
    keys = list(zip(work, send))
    starts = [i for i in range(len(keys)) if i == 0 or keys[i] != keys[i - 1]] + [len(keys)]
    return max(zip(starts, starts[1:]), key=lambda run: (run[1] - run[0], -run[0]))


def partition_runs(work: Sequence[float], send: Sequence[float], *, num_stages: int, alpha: float,
                   beta: float) -> tuple[int, ...] | None:
    """Boundaries of the best partition into ``num_stages`` stages with no memory limit; None when the model
    is not a prefix, a run of at least two identical layers and a suffix with at most ``MAX_EDGE_LAYERS``
    layers outside the run (the band DP then decides).

    ``work``: forward + backward seconds per layer; ``send``: seconds to send each layer's input across
    a stage boundary. The caller checks 1 <= num_stages <= len(work).

    Example:
        >>> partition_runs([1.0] + [3.0] * 6 + [2.0], [0.0] * 8, num_stages=3, alpha=7, beta=1)
        (0, 3, 5, 8)
    """
    num_layers = len(work)
    r0, r1 = longest_run(work, send)
    if r1 - r0 < 2 or num_layers - (r1 - r0) > MAX_EDGE_LAYERS:
        return None
    run = _Run(start=r0, end=r1, work_s=float(work[r0]), send_s=float(send[r0]))
    sends = [float(s) for s in send] + [0.0]  # a stage ending at L sends nothing
    choices = [_choose(work, sends, run, pre, suf, num_stages - 1 - len(pre) - len(suf), alpha, beta)
               for pre, suf in _edge_cuts(r0, r1, num_layers)
               if 0 <= num_stages - 1 - len(pre) - len(suf) <= r1 - r0 - 1]
    least = min(c.score_s for c in choices)
    tied = [c for c in choices if c.score_s <= least + TIE * abs(least)]
    fastest = min(c.bottleneck_s for c in tied)
    return min(c.boundaries for c in tied if c.bottleneck_s <= fastest + TIE * abs(fastest))


def _edge_cuts(r0: int, r1: int, num_layers: int) -> Iterator[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Every (prefix cuts among 1 … r0, suffix cuts among r1 … L−1)."""
    def subsets(positions: range) -> list[tuple[int, ...]]:
        return [c for size in range(len(positions) + 1) for c in itertools.combinations(positions, size)]

    return itertools.product(subsets(range(1, r0 + 1)), subsets(range(r1, num_layers)))


def _edge_stage_times(work: Sequence[float], sends: Sequence[float], pre: tuple[int, ...],
                      suf: tuple[int, ...]) -> list[float]:
    """Times of the stages that hold no layer of the run: before the first prefix cut … and after the suffix's."""
    num_layers = len(work)
    times = []
    for j, (i, k) in enumerate(zip((0, *pre), pre)):  # never the last stage: it sends forward
        times.append(math.fsum(work[i:k]) + (sends[i] if j > 0 else 0.0) + sends[k])
    for i, k in zip(suf, (*suf[1:], num_layers)):  # never the first: it receives
        times.append(math.fsum(work[i:k]) + sends[i] + (sends[k] if k < num_layers else 0.0))
    return times


def _choose(work: Sequence[float], sends: Sequence[float], run: _Run, pre: tuple[int, ...], suf: tuple[int, ...],
            cuts: int, alpha: float, beta: float) -> _Choice:
    """The best partition with prefix cuts ``pre``, suffix cuts ``suf`` and ``cuts`` cuts inside the run."""
    num_layers, n, w, s = len(work), run.end - run.start, run.work_s, run.send_s
    fixed = _edge_stage_times(work, sends, pre, suf)
    a, z = (pre[-1] if pre else 0), (suf[0] if suf else num_layers)
    head = math.fsum(work[a:run.start]) + (sends[a] if a > 0 else 0.0)  # the first block stage's prefix part
    foot = math.fsum(work[run.end:z]) + (sends[z] if z < num_layers else 0.0)  # the last block stage's suffix part
    if cuts == 0:  # one stage holds the whole run
        times = [*fixed, head + n * w + foot]
        total = math.fsum(times)
        return _Choice(score_s=alpha * max(times) + beta * total, bottleneck_s=max(times),
                       boundaries=(0, *pre, *suf, num_layers))
    blocks = np.arange(1, n - cuts + 1) * w  # a piece holds 1 … n − cuts blocks (the others at least one each)
    front, middle, back = head + blocks + s, blocks + 2 * s, blocks + s + foot
    candidates = np.unique(np.concatenate((front, middle, back)))
    fits = _fits(candidates, front, middle, back, n, cuts)
    bottleneck = max(float(candidates[int(np.argmax(fits))]), max(fixed, default=-math.inf))  # the last fits
    total = math.fsum([*fixed, head, foot, n * w, 2 * cuts * s])  # Σ over the pieces is fixed
    pieces = _smallest_first(*(int(np.searchsorted(v, bottleneck, "right")) for v in (front, middle, back)),
                             n=n, cuts=cuts)
    inner = tuple(run.start + int(c) for c in itertools.accumulate(pieces[:-1]))
    return _Choice(score_s=alpha * bottleneck + beta * total, bottleneck_s=bottleneck,
                   boundaries=(0, *pre, *inner, *suf, num_layers))


def _fits(times: np.ndarray, front: np.ndarray, middle: np.ndarray, back: np.ndarray, n: int,
          cuts: int) -> np.ndarray:
    """Per candidate bottleneck, whether the m + 1 pieces (each >= 1 block) can hold the n blocks within it."""
    cap_front, cap_middle, cap_back = (np.searchsorted(v, times, "right") for v in (front, middle, back))
    some_middle = cap_middle >= 1 if cuts > 1 else np.ones(times.shape, dtype=bool)
    return (cap_front >= 1) & (cap_back >= 1) & some_middle & (cap_front + (cuts - 1) * cap_middle + cap_back >= n)


def _smallest_first(cap_front: int, cap_middle: int, cap_back: int, *, n: int, cuts: int) -> list[int]:
    """The lexicographically smallest composition of n blocks into cuts + 1 pieces within the capacities:
    each piece as small as the pieces after it, filled to capacity, allow."""
    pieces, rest = [], n
    for after in range(cuts, 0, -1):  # ``after`` middle pieces (the back one counted apart) follow this one
        piece = max(1, rest - (after - 1) * cap_middle - cap_back)
        pieces.append(piece)
        rest -= piece
    assert 1 <= rest <= cap_back and pieces[0] <= cap_front, "the capacities were checked by _fits"
    return [*pieces, rest]
