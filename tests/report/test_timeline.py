"""The schedule simulation: golden orders, known bubble fractions, dependencies, 1F1B's memory bound."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autopar.plan import Schedule
from autopar.report.timeline import EventKind, bubble_fraction, simulate_schedule, timeline_from_plan
from autopar.schedule import schedule_order
from tests.report.sample_plans import data_parallel_plan, gpt175b_plan, interleaved_plan


@settings(max_examples=60, deadline=None)
@given(pp=st.integers(1, 6), m=st.integers(1, 16), tf=st.floats(0.1, 3.0), tb=st.floats(0.1, 3.0),
       schedule=st.sampled_from([Schedule.GPIPE, Schedule.ONE_F_ONE_B]))
def test_equal_stages_give_the_textbook_bubble(pp: int, m: int, tf: float, tb: float, schedule: Schedule) -> None:
    ev = simulate_schedule(schedule, pp=pp, num_micro_batches=m, forward_time_s=[tf] * pp, backward_time_s=[tb] * pp)
    makespan = max(e.end_s for e in ev)
    assert makespan == pytest.approx((m + pp - 1) * (tf + tb))
    assert bubble_fraction(ev) == pytest.approx((pp - 1) / (m + pp - 1))


@settings(max_examples=40, deadline=None)
@given(pp=st.integers(2, 6), rounds=st.integers(1, 4), v=st.integers(2, 4))
def test_interleaving_divides_the_bubble_by_v(pp: int, rounds: int, v: int) -> None:
    m = pp * rounds
    ev = simulate_schedule(Schedule.INTERLEAVED_1F1B, pp=pp, num_micro_batches=m, virtual_stages=v,
                           forward_time_s=[1.0 / v] * (pp * v), backward_time_s=[2.0 / v] * (pp * v))
    assert bubble_fraction(ev) == pytest.approx((pp - 1) / (v * m + pp - 1))


@settings(max_examples=60, deadline=None)
@given(pp=st.integers(1, 5), m=st.integers(1, 10), v=st.integers(1, 3), p2p=st.floats(0.0, 0.5),
       times=st.lists(st.floats(0.05, 2.0), min_size=30, max_size=30))
def test_events_tile_each_rank_and_respect_dependencies(pp: int, m: int, v: int, p2p: float,
                                                         times: list[float]) -> None:
    if v > 1 and (pp == 1 or m % max(1, m // pp)):
        return
    schedule = Schedule.INTERLEAVED_1F1B if v > 1 else Schedule.ONE_F_ONE_B
    n = pp * v
    fwd, bwd = times[:n], times[15:15 + n]
    ev = simulate_schedule(schedule, pp=pp, num_micro_batches=m, virtual_stages=v, forward_time_s=fwd,
                           backward_time_s=bwd, p2p_time_s=p2p)
    makespan = max(e.end_s for e in ev)
    for rank in range(pp):
        mine = [e for e in ev if e.stage == rank]
        assert mine[0].start_s == 0.0 and mine[-1].end_s == pytest.approx(makespan)
        assert all(a.end_s == pytest.approx(b.start_s) for a, b in zip(mine, mine[1:]))  # no gap, no overlap
    done = {(e.chunk * pp + e.stage, e.kind, e.micro_batch): e for e in ev
            if e.kind in (EventKind.FORWARD, EventKind.BACKWARD)}
    assert len(done) == 2 * n * m
    for (s, kind, mb), e in done.items():
        assert e.end_s - e.start_s == pytest.approx((fwd if kind is EventKind.FORWARD else bwd)[s])
        if kind is EventKind.FORWARD and s > 0:
            assert e.start_s >= done[(s - 1, kind, mb)].end_s + p2p - 1e-9
        if kind is EventKind.BACKWARD:
            assert e.start_s >= done[(s, EventKind.FORWARD, mb)].end_s - 1e-9
            if s < n - 1:
                assert e.start_s >= done[(s + 1, kind, mb)].end_s + p2p - 1e-9


def _max_in_flight(schedule: Schedule, pp: int, m: int) -> list[int]:
    ev = simulate_schedule(schedule, pp=pp, num_micro_batches=m, forward_time_s=[1.0] * pp,
                           backward_time_s=[2.0] * pp)
    peaks = []
    for rank in range(pp):
        live = peak = 0
        for e in sorted((e for e in ev if e.stage == rank), key=lambda e: e.start_s):
            live += {EventKind.FORWARD: 1, EventKind.BACKWARD: -1}.get(e.kind, 0)
            peak = max(peak, live)
        peaks.append(peak)
    return peaks


def test_1f1b_bounds_activations_in_flight_and_gpipe_does_not() -> None:
    # 1F1B: rank r holds at most pp − r micro-batches' activations; GPipe holds all m
    assert _max_in_flight(Schedule.ONE_F_ONE_B, 4, 12) == [4, 3, 2, 1]
    assert _max_in_flight(Schedule.GPIPE, 4, 12) == [12, 12, 12, 12]


def test_transfers_show_as_comm_and_lengthen_the_step() -> None:
    kw = dict(pp=3, num_micro_batches=4, forward_time_s=[1.0] * 3, backward_time_s=[2.0] * 3)
    base = simulate_schedule(Schedule.GPIPE, **kw)
    slow = simulate_schedule(Schedule.GPIPE, p2p_time_s=0.25, **kw)
    assert not [e for e in base if e.kind is EventKind.COMM]
    comm = [e for e in slow if e.kind is EventKind.COMM]
    assert comm and all(e.end_s - e.start_s <= 0.25 + 1e-9 for e in comm)
    # GPipe's critical path crosses 2 boundaries forward and 2 backward: 4 transfers longer
    assert max(e.end_s for e in slow) == pytest.approx(max(e.end_s for e in base) + 4 * 0.25)
    # 1F1B's steady state waits on a round trip per micro-batch: transfers cost it more than GPipe's fill/drain
    f1b = simulate_schedule(Schedule.ONE_F_ONE_B, p2p_time_s=0.25, **kw)
    assert max(e.end_s for e in f1b) > max(e.end_s for e in slow)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="multiple of its number of rounds"):
        schedule_order(Schedule.INTERLEAVED_1F1B, pp=4, num_micro_batches=9, virtual_stages=2)
    with pytest.raises(ValueError, match="one stage per rank"):
        schedule_order(Schedule.ONE_F_ONE_B, pp=2, num_micro_batches=4, virtual_stages=2)
    with pytest.raises(ValueError, match="need 4 forward"):
        simulate_schedule(Schedule.GPIPE, pp=4, num_micro_batches=2, forward_time_s=[1.0], backward_time_s=[1.0])


def test_timeline_from_plan_caps_long_schedules() -> None:
    long = timeline_from_plan(gpt175b_plan())  # 64 micro-batches
    assert long.capped and long.num_micro_batches == 32 and long.total_micro_batches == 64
    assert long.num_ranks == 8
    # p2p per transfer: the plan's 0.256 s of p2p over 2 transfers × 64 micro-batches
    assert long.p2p_time_s == pytest.approx(0.256 / 128)
    short = timeline_from_plan(interleaved_plan())
    assert not short.capped and {e.chunk for e in short.events} == {0, 1}
    flat = timeline_from_plan(data_parallel_plan())
    assert flat.num_ranks == 1 and bubble_fraction(list(flat.events)) == pytest.approx(0.0)
