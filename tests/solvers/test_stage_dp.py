"""Stage DP: known answers, degenerate inputs, the schedule helpers, and the brute-force cross-check."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autopar.errors import InfeasiblePlanError
from autopar.plan import Schedule
from autopar.schedule import in_flight_per_stage, schedule_order, schedule_weights
from autopar.solvers.oracles import brute_force_stage_partition
from autopar.solvers.pipeline.band import feasible_width, partition_times
from autopar.solvers.pipeline.stage_dp import (
    InfeasibleStagePartitionError,
    StageCosts,
    evaluate_partition,
    masked_stage_times,
    partition_stages,
    solve_stage_partition,
)


def _costs(work: list[float], *, static: float | list[float] = 0.0, act: float | list[float] = 0.0,
           send: float | list[float] = 0.0) -> StageCosts:
    n = len(work)

    def per_layer(x: float | list[float]) -> tuple[float, ...]:
        return tuple(float(v) for v in x) if isinstance(x, list) else (float(x),) * n

    return StageCosts(forward_s=tuple(w / 3 for w in work), backward_s=tuple(2 * w / 3 for w in work),
                      static_mem_bytes=per_layer(static), activation_bytes=per_layer(act),
                      boundary_send_s=per_layer(send))


# ---- known answers ---------------------------------------------------------------------------


def test_uniform_layers_split_evenly() -> None:
    costs = StageCosts.uniform(8, forward_s=1.0, backward_s=2.0, static_mem_bytes=1.0, activation_bytes=1.0,
                               boundary_send_s=0.0)
    part = solve_stage_partition(costs, num_stages=4, num_micro_batches=8, mem_budget_bytes=100.0)
    assert part.boundaries == (0, 2, 4, 6, 8)
    assert part.stage_time_s == (6.0, 6.0, 6.0, 6.0)
    assert part.step_time_s == pytest.approx((8 - 1) * 6.0 + 4 * 6.0)  # (m − 1)·max + Σ
    assert part.in_flight == (4, 3, 2, 1)


def test_heavy_layer_gets_a_stage_of_its_own() -> None:
    costs = _costs([1, 1, 10, 1, 1, 1])
    part = solve_stage_partition(costs, num_stages=3, num_micro_batches=16, mem_budget_bytes=1.0)
    assert part.boundaries == (0, 2, 3, 6)
    assert part.bottleneck_s == pytest.approx(10.0)


def test_single_stage_is_the_whole_model() -> None:
    costs = _costs([1, 2, 3])
    part = solve_stage_partition(costs, num_stages=1, num_micro_batches=4, mem_budget_bytes=1.0)
    assert part.boundaries == (0, 3)
    assert part.step_time_s == pytest.approx(4 * 6.0)  # m micro-batches back to back, no bubble
    assert part.comm_time_s == (0.0,)


def test_first_stage_holds_more_micro_batches_so_it_gets_fewer_layers() -> None:
    # 1F1B with 2 stages: stage 0 keeps 2 micro-batches in flight, stage 1 keeps 1.
    costs = _costs([1, 1, 1, 1], act=1.0)
    part = solve_stage_partition(costs, num_stages=2, num_micro_batches=4, mem_budget_bytes=3.0)
    assert part.boundaries == (0, 1, 4)  # (0, 2, 4) would be faster but stage 0 would need 4 bytes
    assert part.mem_bytes == (2.0, 3.0)


def test_boundary_sends_move_the_cut_to_the_cheap_boundary() -> None:
    # equal compute either way; the boundary before layer 2 is cheap to cross
    costs = _costs([1, 1, 1, 1], send=[0.0, 5.0, 0.1, 5.0])
    part = solve_stage_partition(costs, num_stages=2, num_micro_batches=1, mem_budget_bytes=1.0)
    assert part.boundaries == (0, 2, 4)
    assert part.comm_time_s == (pytest.approx(0.1), pytest.approx(0.1))


def test_interleaved_uniform_chunks_match_narayanan() -> None:
    pp, v, m = 2, 2, 8
    costs = StageCosts.uniform(8, forward_s=1.0, backward_s=2.0, static_mem_bytes=0.0, activation_bytes=0.0,
                               boundary_send_s=0.0)
    part = solve_stage_partition(costs, num_stages=pp * v, num_micro_batches=m, mem_budget_bytes=1.0,
                                 schedule=Schedule.INTERLEAVED_1F1B, virtual_stages=v)
    chunk = 2 * 3.0
    assert part.boundaries == (0, 2, 4, 6, 8)
    assert part.step_time_s == pytest.approx(m * v * chunk + (pp - 1) * chunk)  # bubble (pp − 1)/v of a rank's time
    assert len(part.rank_mem_bytes) == pp


def test_interleaved_rank_memory_sums_its_chunks() -> None:
    costs = StageCosts.uniform(8, forward_s=1.0, backward_s=2.0, static_mem_bytes=10.0, activation_bytes=1.0,
                               boundary_send_s=0.0)
    part = solve_stage_partition(costs, num_stages=4, num_micro_batches=4, mem_budget_bytes=1000.0,
                                 schedule=Schedule.INTERLEAVED_1F1B, virtual_stages=2)
    assert part.rank_mem_bytes[0] == pytest.approx(part.mem_bytes[0] + part.mem_bytes[2])
    assert part.rank_mem_bytes[1] == pytest.approx(part.mem_bytes[1] + part.mem_bytes[3])


# ---- schedule helpers ------------------------------------------------------------------------


def test_in_flight_per_stage_per_schedule() -> None:
    assert in_flight_per_stage(Schedule.ONE_F_ONE_B, pp=4, num_micro_batches=8) == (4, 3, 2, 1)
    assert in_flight_per_stage(Schedule.ONE_F_ONE_B, pp=4, num_micro_batches=2) == (2, 2, 2, 1)
    assert in_flight_per_stage(Schedule.GPIPE, pp=3, num_micro_batches=5) == (5, 5, 5)
    # Megatron's interleaved warm-up: rank 0 runs 2·(pp−1) + (v−1)·pp = 4 chunk forwards (+1 in steady
    # state): micro-batches 0, 1 on chunk 0, then 0, 1 on chunk 1, then 2 on chunk 0.
    assert in_flight_per_stage(Schedule.INTERLEAVED_1F1B, pp=2, num_micro_batches=4,
                                   virtual_stages=2) == (3, 2, 2, 1)


@pytest.mark.parametrize("schedule,pp,m,v", [
    (Schedule.GPIPE, 3, 5, 1), (Schedule.ONE_F_ONE_B, 4, 2, 1), (Schedule.ONE_F_ONE_B, 5, 12, 1),
    (Schedule.INTERLEAVED_1F1B, 2, 4, 2), (Schedule.INTERLEAVED_1F1B, 4, 8, 3),
    (Schedule.INTERLEAVED_1F1B, 4, 12, 2), (Schedule.INTERLEAVED_1F1B, 8, 4, 4),
    (Schedule.INTERLEAVED_1F1B, 3, 9, 5)])
def test_in_flight_per_stage_reads_the_schedule_order(schedule: Schedule, pp: int, m: int, v: int) -> None:
    """The closed form counts what the action order holds: each rank's forwards before its first backward."""
    counts = [0] * (pp * v)
    for actions in schedule_order(schedule, pp=pp, num_micro_batches=m, virtual_stages=v):
        for action in itertools.takewhile(lambda a: a.forward, actions):
            counts[action.stage] += 1
    assert in_flight_per_stage(schedule, pp=pp, num_micro_batches=m, virtual_stages=v) == tuple(counts)


def test_schedule_weights() -> None:
    assert schedule_weights(Schedule.GPIPE, num_micro_batches=4) == (3.0, 1.0)
    assert schedule_weights(Schedule.INTERLEAVED_1F1B, num_micro_batches=4, virtual_stages=4) == (15.0, 0.25)
    with pytest.raises(ValueError, match="virtual_stages=2"):
        schedule_weights(Schedule.ONE_F_ONE_B, num_micro_batches=4, virtual_stages=2)


# ---- degenerate and infeasible inputs --------------------------------------------------------


def test_more_stages_than_layers_raises() -> None:
    with pytest.raises(InfeasibleStagePartitionError, match="3 layers into 4") as info:
        solve_stage_partition(_costs([1, 1, 1]), num_stages=4, num_micro_batches=4, mem_budget_bytes=1.0)
    assert info.value.min_budget_bytes is None
    assert isinstance(info.value, InfeasiblePlanError)


def test_too_little_memory_raises_with_the_budget_that_would_fit() -> None:
    costs = _costs([1, 1, 1, 1], static=[5, 1, 1, 5], act=1.0)
    with pytest.raises(InfeasibleStagePartitionError) as info:
        solve_stage_partition(costs, num_stages=2, num_micro_batches=4, mem_budget_bytes=5.0)
    need = info.value.min_budget_bytes
    # stage 0 holds 2 micro-batches: cuts after layer 1, 2, 3 need max(7, 10), max(10, 8), max(13, 6) bytes
    assert need == pytest.approx(10.0)
    assert f"{need:.4g}" in str(info.value)
    part = solve_stage_partition(costs, num_stages=2, num_micro_batches=4, mem_budget_bytes=need)
    assert max(part.mem_bytes) <= need


def test_interleaved_infeasible_reports_a_rank_budget() -> None:
    costs = StageCosts.uniform(4, forward_s=1.0, backward_s=1.0, static_mem_bytes=10.0, activation_bytes=0.0,
                               boundary_send_s=0.0)
    with pytest.raises(InfeasibleStagePartitionError) as info:
        solve_stage_partition(costs, num_stages=4, num_micro_batches=4, mem_budget_bytes=15.0,
                              schedule=Schedule.INTERLEAVED_1F1B, virtual_stages=2)
    assert info.value.min_budget_bytes == pytest.approx(20.0)  # two 10-byte chunks per rank


def test_bad_costs_are_rejected() -> None:
    with pytest.raises(ValueError, match="backward_s has 2 entries"):
        StageCosts(forward_s=(1.0, 1.0, 1.0), backward_s=(1.0, 1.0), static_mem_bytes=(0.0,) * 3,
                   activation_bytes=(0.0,) * 3, boundary_send_s=(0.0,) * 3)
    with pytest.raises(ValueError, match="finite and >= 0"):
        _costs([1.0, -1.0])
    with pytest.raises(ValueError, match="multiple of virtual_stages"):
        solve_stage_partition(_costs([1, 1, 1]), num_stages=3, num_micro_batches=2, mem_budget_bytes=1.0,
                              schedule=Schedule.INTERLEAVED_1F1B, virtual_stages=2)


# ---- brute-force cross-check -----------------------------------------------------------------


@st.composite
def _instances(draw: st.DrawFn) -> tuple[StageCosts, int, tuple[int, ...], float, float, float]:
    n = draw(st.integers(1, 8))
    s = draw(st.integers(1, min(4, n)))
    ints = st.integers(0, 9)
    costs = StageCosts(
        forward_s=tuple(float(draw(ints)) for _ in range(n)), backward_s=tuple(float(draw(ints)) for _ in range(n)),
        static_mem_bytes=tuple(float(draw(ints)) for _ in range(n)),
        activation_bytes=tuple(float(draw(ints)) for _ in range(n)),
        boundary_send_s=tuple(float(draw(st.integers(0, 3))) for _ in range(n)),
    )
    m = draw(st.integers(1, 8))
    schedule = draw(st.sampled_from([Schedule.ONE_F_ONE_B, Schedule.GPIPE]))
    in_flight = in_flight_per_stage(schedule, pp=s, num_micro_batches=m)
    alpha, beta = schedule_weights(schedule, num_micro_batches=m)
    budget = float(draw(st.integers(0, 120)))
    return costs, s, in_flight, budget, alpha, beta


@settings(max_examples=300, deadline=None)
@given(_instances())
def test_dp_matches_brute_force(instance: tuple[StageCosts, int, tuple[int, ...], float, float, float]) -> None:
    costs, s, in_flight, budget, alpha, beta = instance
    try:
        expected = brute_force_stage_partition(costs, num_stages=s, in_flight=in_flight, mem_budget_bytes=budget,
                                               alpha=alpha, beta=beta)
    except InfeasibleStagePartitionError as e:
        with pytest.raises(InfeasibleStagePartitionError) as info:
            partition_stages(costs, num_stages=s, in_flight=in_flight, mem_budget_bytes=budget, alpha=alpha,
                             beta=beta)
        assert info.value.min_budget_bytes == pytest.approx(e.min_budget_bytes)
        return
    bounds = partition_stages(costs, num_stages=s, in_flight=in_flight, mem_budget_bytes=budget, alpha=alpha,
                              beta=beta)
    got = evaluate_partition(costs, bounds, in_flight=in_flight, alpha=alpha, beta=beta)
    assert max(got.mem_bytes) <= budget
    assert got.step_time_s == pytest.approx(expected.step_time_s, abs=1e-9)


@settings(max_examples=100, deadline=None)
@given(_instances(), st.integers(1, 3))
def test_interleaved_weights_match_brute_force(instance: tuple[StageCosts, int, tuple[int, ...], float, float, float],
                                               v: int) -> None:
    costs, s, in_flight, budget, _, _ = instance
    alpha, beta = schedule_weights(Schedule.INTERLEAVED_1F1B, num_micro_batches=4, virtual_stages=v)
    try:
        expected = brute_force_stage_partition(costs, num_stages=s, in_flight=in_flight, mem_budget_bytes=budget,
                                               alpha=alpha, beta=beta)
    except InfeasibleStagePartitionError:
        with pytest.raises(InfeasibleStagePartitionError):
            partition_stages(costs, num_stages=s, in_flight=in_flight, mem_budget_bytes=budget, alpha=alpha,
                             beta=beta)
        return
    bounds = partition_stages(costs, num_stages=s, in_flight=in_flight, mem_budget_bytes=budget, alpha=alpha,
                              beta=beta)
    got = evaluate_partition(costs, bounds, in_flight=in_flight, alpha=alpha, beta=beta)
    assert got.step_time_s == pytest.approx(expected.step_time_s, abs=1e-9)


@settings(max_examples=200, deadline=None)
@given(_instances(), st.booleans())
def test_band_holds_every_range_that_fits(instance: tuple[StageCosts, int, tuple[int, ...], float, float, float],
                                          identical: bool) -> None:
    """The band of the feasible width gives the partition the full (dense) table gives, ties included."""
    costs, s, in_flight, budget, alpha, beta = instance
    if identical:  # runs of equal layers make exact ties, which the band must break as the dense table does
        costs = StageCosts.uniform(costs.num_layers, forward_s=1.0, backward_s=2.0, static_mem_bytes=3.0,
                                   activation_bytes=1.0, boundary_send_s=0.5)
    width = feasible_width(costs.static_mem_bytes, costs.activation_bytes, in_flight, budget)
    narrow = masked_stage_times(costs, num_stages=s, in_flight=in_flight, mem_budget_bytes=budget, width=width)
    full = masked_stage_times(costs, num_stages=s, in_flight=in_flight, mem_budget_bytes=budget,
                              width=costs.num_layers)
    assert not np.isfinite(full.tables[:, :, :costs.num_layers - width]).any()  # longer ranges never fit
    assert partition_times(narrow, alpha=alpha, beta=beta) == partition_times(full, alpha=alpha, beta=beta)


# ---- speed -----------------------------------------------------------------------------------


def test_hundred_layers_sixteen_stages() -> None:
    # embedding, 98 identical blocks, head: the common shape of a real model
    work = [0.3] + [3.0] * 98 + [6.0]
    costs = _costs(work, static=2e9, act=1e8, send=0.01)
    part = solve_stage_partition(costs, num_stages=16, num_micro_batches=64, mem_budget_bytes=80e9)
    # 300.3 s of work over 16 stages (18.8 s each on average): the bottleneck is a middle stage of 7 blocks
    assert part.bottleneck_s == pytest.approx(7 * 3.0 + 2 * 0.01)
    assert math.isclose(sum(part.forward_time_s) + sum(part.backward_time_s), sum(work))
