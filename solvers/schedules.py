"""What a pipeline schedule implies for the stage partition: in-flight micro-batches and the bubble weight.

Step time of a schedule in the form the stage DP solves (``solvers/stage_dp.py``)::

    step = alpha · max_j t_j + beta · Σ_j t_j

GPipe and 1F1B: ``alpha = m − 1``, ``beta = 1`` (DAPPLE, Fan et al. 2021; Alpa §5.2).
Interleaved 1F1B with v chunks per rank: ``alpha = m·v − 1``, ``beta = 1/v``, exact for
uniform chunks (``m·v·t + (pp − 1)·t``, Narayanan et al. 2021 §2.2).
"""

from __future__ import annotations

import itertools

from autopar.plan import Schedule


def in_flight_micro_batches(schedule: Schedule, *, pp: int, num_micro_batches: int,
                            virtual_stages: int = 1) -> tuple[int, ...]:
    """Micro-batches whose activations each stage holds at its peak, per stage (chunk) index.

    GPipe keeps all m. 1F1B (PipeDream-Flush, Narayanan et al. 2021) keeps
    ``min(m, pp − j)`` on stage j. Interleaved 1F1B follows Megatron-LM's
    schedule: rank r runs ``2·(pp − r − 1) + (v − 1)·pp`` warm-up chunk forwards,
    in groups of pp micro-batches per chunk, before its first backward; the count
    per chunk is read off that order (plus the one in steady state).

    Args:
        schedule: the pipeline schedule.
        pp: pipeline ranks.
        num_micro_batches: m.
        virtual_stages: chunks per rank v (> 1 only for interleaved 1F1B).

    Returns:
        One count per stage, stage j = chunk ``j // pp`` of rank ``j % pp``.

    Example:
        >>> in_flight_micro_batches(Schedule.ONE_F_ONE_B, pp=4, num_micro_batches=8)
        (4, 3, 2, 1)
        >>> in_flight_micro_batches(Schedule.GPIPE, pp=2, num_micro_batches=8)
        (8, 8)
    """
    m, v = num_micro_batches, virtual_stages
    if pp < 1 or m < 1 or v < 1:
        raise ValueError(f"pp={pp}, num_micro_batches={m}, virtual_stages={v} must all be >= 1")
    match schedule:
        case Schedule.GPIPE:
            return (m,) * (pp * v)
        case Schedule.ONE_F_ONE_B:
            if v != 1:
                raise ValueError(f"1F1B has one chunk per rank, got virtual_stages={v}")
            return tuple(min(m, pp - j) for j in range(pp))
        case Schedule.INTERLEAVED_1F1B:
            return _interleaved_in_flight(pp, m, v)
        case _:
            raise ValueError(f"unknown schedule {schedule!r}")


def _interleaved_in_flight(pp: int, m: int, v: int) -> tuple[int, ...]:
    counts = [[0] * v for _ in range(pp)]
    for r in range(pp):
        warmup = min(m * v, 2 * (pp - r - 1) + (v - 1) * pp + 1)
        # Megatron's forward order on a rank: micro-batch groups of pp, chunk by chunk within a group
        order = ((c, mb) for g in range(0, m, pp) for c in range(v) for mb in range(g, min(g + pp, m)))
        for c, _ in itertools.islice(order, warmup):
            counts[r][c] += 1
    return tuple(counts[j % pp][j // pp] for j in range(pp * v))


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


__all__ = ["in_flight_micro_batches", "schedule_weights"]
