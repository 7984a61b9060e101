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
and, in the form the stage DP solves (``solvers/stage_dp.py``), the step time::

    step = alpha · max_j t_j + beta · Σ_j t_j

GPipe and 1F1B: ``alpha = m − 1``, ``beta = 1`` (DAPPLE, Fan et al. 2021; Alpa §5.2).
Interleaved 1F1B with v chunks per rank: ``alpha = m·v − 1``, ``beta = 1/v``, exact for
uniform chunks (``m·v·t + (pp − 1)·t``, Narayanan et al. 2021 §2.2).
"""

from __future__ import annotations

import functools
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
    match schedule:
        case Schedule.GPIPE | Schedule.ONE_F_ONE_B if virtual_stages != 1:
            raise ValueError(f"schedule {schedule.value!r} runs one stage per rank, got virtual_stages={virtual_stages}")
        case Schedule.GPIPE:
            return tuple(_gpipe(r, num_micro_batches) for r in range(pp))
        case Schedule.ONE_F_ONE_B:
            return tuple(_one_f_one_b(r, pp, num_micro_batches) for r in range(pp))
        case Schedule.INTERLEAVED_1F1B:
            return tuple(_interleaved(r, pp, num_micro_batches, virtual_stages) for r in range(pp))
        case _:
            raise ValueError(f"unknown schedule {schedule!r}")


def _gpipe(rank: int, m: int) -> tuple[Action, ...]:
    return tuple(Action(rank, True, i) for i in range(m)) + tuple(Action(rank, False, i) for i in range(m))


def _one_f_one_b(rank: int, pp: int, m: int) -> tuple[Action, ...]:
    warmup = min(pp - rank - 1, m)
    order = [Action(rank, True, i) for i in range(warmup)]
    for i in range(m - warmup):
        order += [Action(rank, True, warmup + i), Action(rank, False, i)]
    order += [Action(rank, False, i) for i in range(m - warmup, m)]
    return tuple(order)


def _interleaved(rank: int, pp: int, m: int, v: int) -> tuple[Action, ...]:
    # torch's ScheduleInterleaved1F1B: rounds of g = m // max(1, m // pp) micro-batches (g = pp
    # when pp divides m, as in Megatron-LM); within a round each chunk runs in turn
    rounds = max(1, m // pp)
    if m % rounds:
        raise ValueError(f"interleaved 1F1B needs num_micro_batches={m} to be a multiple of its number of "
                         f"rounds max(1, m // pp) = {rounds} (pp={pp})")
    g = m // rounds
    forwards: list[Action] = []
    backwards: list[Action] = []
    for group_start in range(0, m, g):
        group = range(group_start, group_start + g)
        forwards += [Action(c * pp + rank, True, i) for c in range(v) for i in group]
        backwards += [Action(c * pp + rank, False, i) for c in reversed(range(v)) for i in group]
    total = len(forwards)
    warmup = min(2 * (pp - rank - 1) + (v - 1) * g, total)
    order = forwards[:warmup]
    for k in range(total - warmup):
        order += [forwards[warmup + k], backwards[k]]
    order += backwards[total - warmup:]
    return tuple(order)


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
    counts = [0] * (pp * virtual_stages)
    for actions in schedule_order(schedule, pp=pp, num_micro_batches=num_micro_batches,
                                  virtual_stages=virtual_stages):
        for action in actions:
            if not action.forward:
                break
            counts[action.stage] += 1
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
