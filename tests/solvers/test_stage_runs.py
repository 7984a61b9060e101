"""Stage partition by counts over a run of identical layers (no memory limit): brute force, ties, the band DP."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autopar.plan import Schedule
from autopar.schedule import in_flight_per_stage, schedule_weights
from autopar.solvers.oracles import brute_force_stage_partition
from autopar.solvers.pipeline.band import partition_times
from autopar.solvers.pipeline.runs import MAX_EDGE_LAYERS, longest_run, partition_runs
from autopar.solvers.pipeline.stage_dp import StageCosts, masked_stage_times, partition_stages, solve_stage_partition


def _model(prefix: list[float], block: float, n: int, suffix: list[float], *, send: float = 0.0,
           edge_sends: list[float] | None = None) -> tuple[list[float], list[float]]:
    """(work, send) of prefix layers, n identical blocks and suffix layers."""
    work = [*prefix, *([block] * n), *suffix]
    sends = [send] * len(work)
    for i, s in enumerate(edge_sends or []):  # the prefix's and suffix's own sends, in order
        sends[i if i < len(prefix) else len(prefix) + n + i - len(prefix)] = s
    return work, sends


def _times(work: list[float], send: list[float], bounds: tuple[int, ...]) -> list[float]:
    last = len(bounds) - 2
    ext = [*send, 0.0]
    return [math.fsum(work[i:k]) + (ext[i] if j > 0 else 0.0) + (ext[k] if j < last else 0.0)
            for j, (i, k) in enumerate(zip(bounds, bounds[1:]))]


def _oracle(work: list[float], send: list[float], stages: int, alpha: float, beta: float) -> tuple[int, ...]:
    """Every composition; the least (score, bottleneck, boundaries): exact here (small integers, dyadic weights)."""
    best: tuple[float, float, tuple[int, ...]] | None = None
    for cuts in itertools.combinations(range(1, len(work)), stages - 1):
        bounds = (0, *cuts, len(work))
        times = _times(work, send, bounds)
        key = (alpha * max(times) + beta * math.fsum(times), max(times), bounds)
        best = key if best is None or key < best else best
    assert best is not None
    return best[2]


# ---- known answers and ties ------------------------------------------------------------------


def test_uniform_layers_take_the_least_bottleneck_front_stages_shortest() -> None:
    # 8 equal layers in 3 stages: the bottleneck is 3 layers; of (2, 3, 3), (3, 2, 3) and (3, 3, 2) the first
    work, send = _model([], 1.0, 8, [])
    assert partition_runs(work, send, num_stages=3, alpha=7, beta=1) == (0, 2, 5, 8)


def test_embedding_blocks_and_head() -> None:
    # embedding 1, 6 blocks of 3, head 2 in 3 stages: below 8 the stages hold at most 2 + 2 + 1 blocks, so the
    # least bottleneck is 8 (2 blocks + head), where only 2 + 2 + 2 fits
    work, send = _model([1.0], 3.0, 6, [2.0])
    assert partition_runs(work, send, num_stages=3, alpha=7, beta=1) == (0, 3, 5, 8)


def test_one_micro_batch_still_takes_the_least_bottleneck() -> None:
    # alpha = 0 (one micro-batch): every split of 6 equal layers costs the same sum; the least bottleneck
    # (2 layers per stage) is the tie-break, not the first split found
    work, send = _model([], 2.0, 6, [])
    assert partition_runs(work, send, num_stages=3, alpha=0, beta=1) == (0, 2, 4, 6)


def test_a_cheap_edge_boundary_takes_the_cut() -> None:
    # the embedding sends 1 byte-second, the blocks 5: with 2 stages the cut after the embedding saves 8
    work, send = _model([4.0], 1.0, 4, [], send=5.0, edge_sends=[0.0])
    send[1] = 1.0  # the first block's input (the embedding's output) is small
    assert partition_runs(work, send, num_stages=2, alpha=1, beta=1) == (0, 1, 5)


def test_golden_interleaved_tie() -> None:
    # 320 blocks, embedding and head, 48 chunks (16 ranks × 3): 7 blocks per chunk at most (6 with the head);
    # many splits tie: the embedding alone, then the front chunks as short as the 7-block ones after them allow
    work, send = _model([0.05], 1.0, 320, [0.5], send=0.01)
    bounds = partition_runs(work, send, num_stages=48, alpha=767, beta=1 / 3)
    assert bounds is not None
    assert bounds[:5] == (0, 1, 2, 7, 14) and bounds[-3:] == (308, 315, 322)
    assert max(_times(work, send, bounds)) == pytest.approx(7 * 1.0 + 2 * 0.01)


def test_longest_run_and_when_it_does_not_apply() -> None:
    assert longest_run([1.0, 2.0, 2.0, 1.0, 1.0], [0.0] * 5) == (1, 3)  # equal lengths: the first
    assert longest_run([1.0, 1.0, 1.0], [0.0, 1.0, 1.0]) == (1, 3)  # sends count too
    alternating = [1.0, 2.0] * 4
    assert partition_runs(alternating, [0.0] * 8, num_stages=2, alpha=1, beta=1) is None
    many_edges = [float(i) for i in range(MAX_EDGE_LAYERS + 1)] + [9.0] * 4
    assert partition_runs(many_edges, [0.0] * len(many_edges), num_stages=2, alpha=1, beta=1) is None


# ---- brute-force cross-check -----------------------------------------------------------------


@st.composite
def _runs(draw: st.DrawFn) -> tuple[list[float], list[float], int, float, float]:
    ints = st.integers(0, 9)
    prefix = [float(draw(ints)) for _ in range(draw(st.integers(0, 2)))]
    suffix = [float(draw(ints)) for _ in range(draw(st.integers(0, 2)))]
    n = draw(st.integers(2, 6))
    edge_sends = [float(draw(st.integers(0, 3))) for _ in range(len(prefix) + len(suffix))]
    work, send = _model(prefix, float(draw(ints)), n, suffix, send=float(draw(st.integers(0, 3))),
                        edge_sends=edge_sends)
    stages = draw(st.integers(1, min(4, len(work))))
    alpha = float(draw(st.sampled_from([0, 1, 3, 7, 15])))
    beta = draw(st.sampled_from([1.0, 0.5, 0.25]))  # dyadic: every score is exact, so ties are exact
    return work, send, stages, alpha, beta


@settings(max_examples=150, deadline=None)
@given(_runs())
def test_counts_match_brute_force_ties_included(instance: tuple[list[float], list[float], int, float, float]) -> None:
    work, send, stages, alpha, beta = instance
    got = partition_runs(work, send, num_stages=stages, alpha=alpha, beta=beta)
    if got is None:  # the longest run may be an edge layer repeated: then the band DP decides
        r0, r1 = longest_run(work, send)
        assert r1 - r0 < 2 or len(work) - (r1 - r0) > MAX_EDGE_LAYERS
        return
    assert got == _oracle(work, send, stages, alpha, beta)


@settings(max_examples=40, deadline=None)
@given(_runs(), st.sampled_from([Schedule.ONE_F_ONE_B, Schedule.GPIPE]), st.integers(1, 8))
def test_unlimited_memory_matches_the_stage_dp_oracle(instance: tuple[list[float], list[float], int, float, float],
                                                      schedule: Schedule, m: int) -> None:
    """``partition_stages`` with no memory limit (the counting path when it applies) is optimal."""
    work, send, stages, _, _ = instance
    costs = StageCosts(forward_s=tuple(w / 4 for w in work), backward_s=tuple(3 * w / 4 for w in work),
                       static_mem_bytes=(1.0,) * len(work), activation_bytes=(1.0,) * len(work),
                       boundary_send_s=tuple(send))
    in_flight = in_flight_per_stage(schedule, pp=stages, num_micro_batches=m)
    alpha, beta = schedule_weights(schedule, num_micro_batches=m)
    expected = brute_force_stage_partition(costs, num_stages=stages, in_flight=in_flight, mem_budget_bytes=math.inf,
                                           alpha=alpha, beta=beta)
    got = solve_stage_partition(costs, num_stages=stages, num_micro_batches=m, mem_budget_bytes=math.inf,
                                schedule=schedule)
    assert got.step_time_s == pytest.approx(expected.step_time_s, abs=1e-9)


def test_same_partition_as_the_band_dp_when_the_optimum_is_unique() -> None:
    # 320 blocks over 64 stages: 5 each is the only split with no 6-block stage (embedding and head light)
    work, send = _model([0.05], 1.0, 320, [0.5], send=0.01)
    costs = StageCosts(forward_s=tuple(w / 3 for w in work), backward_s=tuple(2 * w / 3 for w in work),
                       static_mem_bytes=(0.0,) * len(work), activation_bytes=(0.0,) * len(work),
                       boundary_send_s=tuple(send))
    in_flight = in_flight_per_stage(Schedule.INTERLEAVED_1F1B, pp=8, num_micro_batches=128, virtual_stages=8)
    alpha, beta = schedule_weights(Schedule.INTERLEAVED_1F1B, num_micro_batches=128, virtual_stages=8)
    band = partition_times(masked_stage_times(costs, num_stages=64, in_flight=in_flight, mem_budget_bytes=math.inf),
                           alpha=alpha, beta=beta)
    counted = partition_stages(costs, num_stages=64, in_flight=in_flight, mem_budget_bytes=math.inf, alpha=alpha,
                               beta=beta)
    assert counted == band == (0, 6, *range(11, 317, 5), 322)
