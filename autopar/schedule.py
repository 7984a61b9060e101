"""Pipeline schedules as plain data: the one home of each schedule's action order and what follows from it.

Torch-free and a leaf of the import graph, so the memory model (in-flight activations),
the stage DP (the step-time weights), the timeline chart and emit all read the same rules.

A schedule is, for each pipeline rank, the order in which it runs forward and backward
passes of (stage, micro-batch) pairs, written in the text form of
``torch.distributed.pipelining`` (``"2F0"`` = stage 2, forward, micro-batch 0).
Orderings (S = pp · v stages, stage s runs on rank s mod pp):

- GPipe (Huang et al. 2019): every forward, then every backward, micro-batches ascending.
- 1F1B (Narayanan et al. 2021, PipeDream-Flush): rank r runs min(pp − r − 1, m) warm-up
  forwards, then alternates one forward and one backward, then drains the backwards.
- Interleaved 1F1B (Narayanan et al. 2021, §2.2; Megatron-LM's
  ``forward_backward_pipelining_with_interleaving``; torch's ``ScheduleInterleaved1F1B``):
  micro-batches go in rounds of g = m // max(1, m // pp) (g = pp when pp divides m);
  within a round each of the rank's v chunks runs in turn (forward: chunk 0 → v−1,
  backward: chunk v−1 → 0). Warm-up is 2·(pp − r − 1) + (v − 1)·g chunk-forwards.

From the order follow the micro-batches in flight on each stage (``in_flight_per_stage``)
and, in the form the stage DP solves (``solvers/pipeline/stage_dp.py``), the step time::

    step = alpha · max_j t_j + beta · Σ_j t_j

GPipe and 1F1B: ``alpha = m − 1``, ``beta = 1`` (DAPPLE, Fan et al. 2021; Alpa §5.2).
Interleaved 1F1B with v chunks per rank: ``alpha = m·v − 1``, ``beta = 1/v``, exact for
uniform chunks (``m·v·t + (pp − 1)·t``, Narayanan et al. 2021 §2.2).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator
from typing import NamedTuple

from autopar.layout import Schedule


class Action(NamedTuple):
    """One pass of one micro-batch through one (virtual) stage; text form ``"2F0"``."""

    stage: int
    """Stage index in model order (0 … pp·v − 1)."""
    forward: bool
    """Forward (True) or backward (False)."""
    micro_batch: int
    """Micro-batch index."""

    def __str__(self) -> str:
        return f"{self.stage}{'F' if self.forward else 'B'}{self.micro_batch}"

    @classmethod
    def from_str(cls, text: str) -> Action:
        """Parse the text form.

        Example:
            >>> Action.from_str("2F0")
            Action(stage=2, forward=True, micro_batch=0)
        """
        kind = "F" if "F" in text else "B"
        stage, _, micro_batch = text.partition(kind)
        return cls(stage=int(stage), forward=kind == "F", micro_batch=int(micro_batch))


def schedule_order(schedule: Schedule, *, pp: int, num_micro_batches: int,
                   virtual_stages: int = 1) -> tuple[tuple[Action, ...], ...]:
    """The order of actions on each pipeline rank.

    Args:
        schedule: GPipe, 1F1B or interleaved 1F1B.
        pp: pipeline ranks.
        num_micro_batches: micro-batches per step (m).
        virtual_stages: chunks per rank (v > 1 only with interleaved 1F1B).

    Returns:
        One tuple of actions per rank.

    Raises:
        ValueError: a size is not positive, or v > 1 with a schedule that is not interleaved.

    Example:
        >>> [" ".join(map(str, r)) for r in schedule_order(Schedule.ONE_F_ONE_B, pp=2, num_micro_batches=3)]
        ['0F0 0F1 0B0 0F2 0B1 0B2', '1F0 1B0 1F1 1B1 1F2 1B2']
    """
    if min(pp, num_micro_batches, virtual_stages) < 1:
        raise ValueError(f"pp={pp}, num_micro_batches={num_micro_batches}, virtual_stages={virtual_stages} "
                         "must all be positive")
    _check_chunks(schedule, virtual_stages)
    m, v = num_micro_batches, virtual_stages
    return tuple(_rank_order(_forwards(schedule, r, pp, m, v), _backwards(schedule, r, pp, m, v),
                             total=m * v, warmup=_warmup(schedule, r, pp, m, v)) for r in range(pp))


def _check_chunks(schedule: Schedule, virtual_stages: int) -> None:
    match schedule:
        case Schedule.GPIPE | Schedule.ONE_F_ONE_B if virtual_stages != 1:
            raise ValueError(f"schedule {schedule.value!r} runs one stage per rank, got virtual_stages={virtual_stages}")
        case Schedule.GPIPE | Schedule.ONE_F_ONE_B | Schedule.INTERLEAVED_1F1B:
            return
        case _:
            raise ValueError(f"unknown schedule {schedule!r}")


def _rank_order(forwards: Iterator[Action], backwards: Iterator[Action], *, total: int,
                warmup: int) -> tuple[Action, ...]:
    """Every schedule's shape: ``warmup`` forwards, then one forward and one backward in turn, then the rest."""
    order = list(itertools.islice(forwards, warmup))
    for forward, backward in zip(forwards, backwards):
        order += [forward, backward]
    order.extend(backwards)
    assert len(order) == 2 * total, (len(order), total)
    return tuple(order)


def _round_size(pp: int, m: int) -> int:
    """Interleaved 1F1B runs micro-batches in rounds of g = m // max(1, m // pp) (torch's
    ``ScheduleInterleaved1F1B``; g = pp when pp divides m, as in Megatron-LM)."""
    rounds = max(1, m // pp)
    if m % rounds:
        raise ValueError(f"interleaved 1F1B needs num_micro_batches={m} to be a multiple of its number of "
                         f"rounds max(1, m // pp) = {rounds} (pp={pp})")
    return m // rounds


def _warmup(schedule: Schedule, rank: int, pp: int, m: int, v: int) -> int:
    """Forwards a rank runs before it starts alternating."""
    match schedule:
        case Schedule.GPIPE:
            return m
        case Schedule.ONE_F_ONE_B:
            return min(pp - rank - 1, m)
        case _:
            return min(2 * (pp - rank - 1) + (v - 1) * _round_size(pp, m), m * v)


def _forwards(schedule: Schedule, rank: int, pp: int, m: int, v: int) -> Iterator[Action]:
    """A rank's forwards in the order it runs them (within a round of interleaving: chunk 0 → v − 1)."""
    if schedule is not Schedule.INTERLEAVED_1F1B:
        return (Action(rank, True, i) for i in range(m))
    g = _round_size(pp, m)
    return (Action(c * pp + rank, True, i) for start in range(0, m, g) for c in range(v)
            for i in range(start, start + g))


def _backwards(schedule: Schedule, rank: int, pp: int, m: int, v: int) -> Iterator[Action]:
    """A rank's backwards in the order it runs them (within a round of interleaving: chunk v − 1 → 0)."""
    if schedule is not Schedule.INTERLEAVED_1F1B:
        return (Action(rank, False, i) for i in range(m))
    g = _round_size(pp, m)
    return (Action(c * pp + rank, False, i) for start in range(0, m, g) for c in reversed(range(v))
            for i in range(start, start + g))


@functools.lru_cache(maxsize=4096)
def in_flight_per_stage(schedule: Schedule, *, pp: int, num_micro_batches: int,
                        virtual_stages: int = 1) -> tuple[int, ...]:
    """Micro-batches whose activations each stage holds at its rank's peak, read off ``schedule_order``.

    A rank holds the most activations just before its first backward (from then on it
    alternates a forward and a backward); the count per stage is the forwards of that stage it
    has run by then that no backward has freed. GPipe holds all m; 1F1B ``min(m, pp − r)`` on
    rank r; interleaved 1F1B splits its ``2·(pp − r − 1) + (v − 1)·pp + 1`` forwards over its
    chunks in the schedule's order (for rank 0 with uniform chunks, Korthikanti et al. 2022 §4.2.3's
    ``pp·(1 + (pp − 1)/(pp·v))`` micro-batches' worth).

    This is the rank's peak exactly when its chunks hold equal activations; with uneven chunks
    a later steady-state moment can hold a different mix of chunks.

    Returns:
        One count per stage, stage j = chunk ``j // pp`` of rank ``j % pp``.

    Example:
        >>> in_flight_per_stage(Schedule.ONE_F_ONE_B, pp=4, num_micro_batches=8)
        (4, 3, 2, 1)
        >>> in_flight_per_stage(Schedule.INTERLEAVED_1F1B, pp=2, num_micro_batches=4, virtual_stages=2)
        (3, 2, 2, 1)
    """
    if min(pp, num_micro_batches, virtual_stages) < 1:
        raise ValueError(f"pp={pp}, num_micro_batches={num_micro_batches}, virtual_stages={virtual_stages} "
                         "must all be positive")
    _check_chunks(schedule, virtual_stages)
    m, v = num_micro_batches, virtual_stages
    g = _round_size(pp, m) if schedule is Schedule.INTERLEAVED_1F1B else m
    counts = [0] * (pp * v)
    for rank in range(pp):  # the order's prefix up to the first backward: warm-up, then one more forward
        before_backward = min(_warmup(schedule, rank, pp, m, v) + 1, m * v)
        # ``_forwards`` runs whole rounds of g micro-batches per chunk, chunk 0 → v − 1 (g·rounds = m)
        rounds, rest = divmod(before_backward, g * v)
        for chunk in range(v):
            counts[chunk * pp + rank] = rounds * g + min(g, max(0, rest - chunk * g))
    return tuple(counts)


def fits_micro_batches(schedule: Schedule, *, pp: int, num_micro_batches: int) -> bool:
    """Whether ``schedule`` runs ``num_micro_batches`` over ``pp`` ranks as itself.

    - 1F1B needs at least pp micro-batches (torch's ``Schedule1F1B`` refuses fewer; with fewer,
      its warm-up already holds every micro-batch, so it is GPipe);
    - interleaved 1F1B needs a multiple of pp (Megatron-LM's rule; the rounds of pp micro-batches
      above are then whole).

    Example:
        >>> fits_micro_batches(Schedule.ONE_F_ONE_B, pp=4, num_micro_batches=2)
        False
        >>> fits_micro_batches(Schedule.INTERLEAVED_1F1B, pp=4, num_micro_batches=8)
        True
    """
    match schedule:
        case Schedule.ONE_F_ONE_B:
            return pp == 1 or num_micro_batches >= pp
        case Schedule.INTERLEAVED_1F1B:
            return num_micro_batches % pp == 0
        case Schedule.GPIPE:
            return True
        case _:
            raise ValueError(f"unknown schedule {schedule!r}")


def schedule_weights(schedule: Schedule, *, num_micro_batches: int, virtual_stages: int = 1) -> tuple[float, float]:
    """(alpha, beta) of ``step = alpha · max_j t_j + beta · Σ_j t_j`` for a schedule.

    Example:
        >>> schedule_weights(Schedule.ONE_F_ONE_B, num_micro_batches=8)
        (7.0, 1.0)
        >>> schedule_weights(Schedule.INTERLEAVED_1F1B, num_micro_batches=8, virtual_stages=2)
        (15.0, 0.5)
    """
    m, v = num_micro_batches, virtual_stages
    if schedule is not Schedule.INTERLEAVED_1F1B and v != 1:
        raise ValueError(f"schedule {schedule.value!r} has one chunk per rank, got virtual_stages={v}")
    return float(m * v - 1), 1.0 / v


__all__ = ["Action", "fits_micro_batches", "in_flight_per_stage", "schedule_order", "schedule_weights"]
