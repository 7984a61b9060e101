"""What a pipeline schedule implies for the stage partition: in-flight micro-batches and the bubble weight.

In-flight micro-batches per stage are the memory model's (``cost_models.memory.in_flight_per_stage``).

Step time of a schedule in the form the stage DP solves (``solvers/stage_dp.py``)::

    step = alpha · max_j t_j + beta · Σ_j t_j

GPipe and 1F1B: ``alpha = m − 1``, ``beta = 1`` (DAPPLE, Fan et al. 2021; Alpa §5.2).
Interleaved 1F1B with v chunks per rank: ``alpha = m·v − 1``, ``beta = 1/v``, exact for
uniform chunks (``m·v·t + (pp − 1)·t``, Narayanan et al. 2021 §2.2).
"""

from __future__ import annotations

from autopar.cost_models.memory import in_flight_per_stage as in_flight_micro_batches
from autopar.layout import Schedule


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
