"""The one home of pipeline schedules: golden action orders, in-flight counts read off them, the micro-batch rule."""

from __future__ import annotations

import pytest

from autopar.cost_models.memory import inflight_micro_batches
from autopar.layout import Schedule
from autopar.schedule import Action, fits_micro_batches, in_flight_per_stage, schedule_order, schedule_weights


def _orders(schedule: Schedule, pp: int, m: int, v: int = 1) -> list[str]:
    return [" ".join(map(str, rank)) for rank in schedule_order(schedule, pp=pp, num_micro_batches=m,
                                                                 virtual_stages=v)]


def test_golden_orders() -> None:
    assert _orders(Schedule.GPIPE, 2, 3) == ["0F0 0F1 0F2 0B0 0B1 0B2", "1F0 1F1 1F2 1B0 1B1 1B2"]
    assert _orders(Schedule.ONE_F_ONE_B, 3, 4) == [
        "0F0 0F1 0F2 0B0 0F3 0B1 0B2 0B3",
        "1F0 1F1 1B0 1F2 1B1 1F3 1B2 1B3",
        "2F0 2B0 2F1 2B1 2F2 2B2 2F3 2B3",
    ]
    # Megatron's interleaved order for pp=2, v=2, m=4: rounds of 2 micro-batches, chunk 0 then chunk 1
    assert _orders(Schedule.INTERLEAVED_1F1B, 2, 4, 2) == [
        "0F0 0F1 2F0 2F1 0F2 2B0 0F3 2B1 2F2 0B0 2F3 0B1 2B2 2B3 0B2 0B3",
        "1F0 1F1 3F0 3B0 3F1 3B1 1F2 1B0 1F3 1B1 3F2 3B2 3F3 3B3 1B2 1B3",
    ]


def test_action_text_round_trip() -> None:
    for text in ("0F0", "12B7", "3F15"):
        assert str(Action.from_str(text)) == text


def test_in_flight_counts_are_read_off_the_order() -> None:
    # golden orders above: 1F1B rank r runs pp − r forwards before its first backward
    assert in_flight_per_stage(Schedule.ONE_F_ONE_B, pp=3, num_micro_batches=4) == (3, 2, 1)
    assert in_flight_per_stage(Schedule.ONE_F_ONE_B, pp=4, num_micro_batches=2) == (2, 2, 2, 1)
    assert in_flight_per_stage(Schedule.GPIPE, pp=2, num_micro_batches=3) == (3, 3)
    # interleaved pp=2 v=2 m=4: rank 0 runs 0F0 0F1 2F0 2F1 0F2 before 2B0; rank 1 runs 1F0 1F1 3F0 before 3B0
    assert in_flight_per_stage(Schedule.INTERLEAVED_1F1B, pp=2, num_micro_batches=4, virtual_stages=2) == (3, 2, 2, 1)


@pytest.mark.parametrize("schedule", list(Schedule))
@pytest.mark.parametrize(("pp", "m"), [(1, 3), (2, 4), (3, 4), (4, 2), (4, 8), (5, 15), (8, 16)])
def test_in_flight_is_the_orders_prefix_before_each_first_backward(schedule: Schedule, pp: int, m: int) -> None:
    for v in ((2, 3) if schedule is Schedule.INTERLEAVED_1F1B else (1,)):
        if schedule is Schedule.INTERLEAVED_1F1B and (pp == 1 or m % pp):
            continue
        counts = [0] * (pp * v)
        for actions in schedule_order(schedule, pp=pp, num_micro_batches=m, virtual_stages=v):
            for action in actions[:next(i for i, a in enumerate(actions) if not a.forward)]:
                counts[action.stage] += 1
        assert in_flight_per_stage(schedule, pp=pp, num_micro_batches=m, virtual_stages=v) == tuple(counts)


@pytest.mark.parametrize(("pp", "v"), [(4, 2), (8, 3), (16, 4)])
def test_interleaved_first_rank_matches_korthikanti(pp: int, v: int) -> None:
    """Rank 0 holds pp·(1 + (pp − 1)/(pp·v)) micro-batches' worth of its layers (Korthikanti et al. 2022 §4.2.3)."""
    counts = in_flight_per_stage(Schedule.INTERLEAVED_1F1B, pp=pp, num_micro_batches=64, virtual_stages=v)
    assert sum(counts[0::pp]) / v == pytest.approx(pp * (1 + (pp - 1) / (pp * v)))
    # the memory model's per-rank figure is this sum: one rule, not a second copy
    assert inflight_micro_batches(Schedule.INTERLEAVED_1F1B, pp=pp, stage=0, num_micro_batches=64,
                                  virtual_stages=v) == sum(counts[0::pp]) / v


def test_micro_batch_rule() -> None:
    assert fits_micro_batches(Schedule.ONE_F_ONE_B, pp=4, num_micro_batches=4)
    assert not fits_micro_batches(Schedule.ONE_F_ONE_B, pp=4, num_micro_batches=3)  # that is GPipe
    assert fits_micro_batches(Schedule.ONE_F_ONE_B, pp=1, num_micro_batches=1)
    assert not fits_micro_batches(Schedule.INTERLEAVED_1F1B, pp=4, num_micro_batches=6)
    assert fits_micro_batches(Schedule.GPIPE, pp=8, num_micro_batches=1)


def test_docstring_examples() -> None:
    import doctest

    import autopar.schedule

    result = doctest.testmod(autopar.schedule)
    assert result.failed == 0 and result.attempted >= 6


def test_weights() -> None:
    assert schedule_weights(Schedule.ONE_F_ONE_B, num_micro_batches=8) == (7.0, 1.0)
    assert schedule_weights(Schedule.INTERLEAVED_1F1B, num_micro_batches=8, virtual_stages=2) == (15.0, 0.5)
