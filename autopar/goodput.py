"""Plans ranked by goodput: throughput once failures, restarts and checkpoints are paid for.

The search ranks layouts by step time. ``rank_by_goodput`` re-ranks its best ``K`` by the
goodput that ``cost_models/reliability.py`` predicts for each, and says whether ``K`` was
enough: a layout outside the K fastest has at most the K-th throughput, and no layout on
n GPUs keeps more than ``M(n) / (M(n) + restart)`` of its throughput (no checkpoint costs at
all), nor more throughput than n GPUs at their peak FLOP/s; if the best goodput found beats
that bound, no unpriced layout can win.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from autopar._compat import StrEnum
from autopar.cost_models.cluster import Cluster
from autopar.cost_models.reliability import (
    SECONDS_PER_HOUR,
    GoodputEstimate,
    estimate_checkpoint_size,
    estimate_checkpoint_times,
    estimate_goodput,
)
from autopar.errors import UserInputError
from autopar.graph.ir import OpGraph
from autopar.plan import Layout, MemoryBreakdown, Plan
from autopar.planner import build_plans

GOODPUT_CANDIDATES = 64
"""Layouts the search returns for goodput re-ranking (the K fastest); ``rank_by_goodput`` says if more could win."""


class Objective(StrEnum):
    """What ``autopar plan`` ranks plans by."""

    THROUGHPUT = "throughput"  # predicted step time (tokens per second while running)
    GOODPUT = "goodput"  # expected tokens per second once failures and checkpoints are paid for


def parse_objective(value: Objective | str) -> Objective:
    """``"goodput"`` → ``Objective.GOODPUT``; raises ``UserInputError`` for anything else."""
    try:
        return Objective(value)
    except ValueError:
        raise UserInputError(f"objective {value!r} is not one of {', '.join(o.value for o in Objective)}") from None


def estimate_layout_goodput(*, layout: Layout, memory: Sequence[MemoryBreakdown], step_time_s: float,
                            tokens_per_s: float, cluster: Cluster) -> GoodputEstimate:
    """Checkpoint size and times, interval and goodput of one priced layout on ``cluster``."""
    size = estimate_checkpoint_size(params_bytes=[m.params for m in memory],
                                    optimizer_bytes=[m.optimizer for m in memory], dp=layout.dp, tp=layout.tp,
                                    zero_stage=layout.zero_stage)
    times = estimate_checkpoint_times(size, cluster.reliability, gpus_per_node=cluster.gpus_per_node,
                                      host_mem_bytes=cluster.host_mem_bytes)
    return estimate_goodput(size, times, cluster.reliability, num_gpus=layout.num_gpus,
                            gpus_per_node=cluster.gpus_per_node, step_time_s=step_time_s, tokens_per_s=tokens_per_s)


def plan_goodput(plan: Plan, cluster: Cluster) -> GoodputEstimate:
    """``estimate_layout_goodput`` for a built plan."""
    p = plan.predicted
    return estimate_layout_goodput(layout=plan.layout, memory=p.memory, step_time_s=p.step_time_s,
                                   tokens_per_s=p.tokens_per_s, cluster=cluster)


def _evaluation_goodput(ev: Any, cluster: Cluster, seq_len: int) -> GoodputEstimate:
    tokens = ev.layout.global_batch_size * seq_len / ev.step_time_s
    return estimate_layout_goodput(layout=ev.layout, memory=ev.memory, step_time_s=ev.step_time_s,
                                   tokens_per_s=tokens, cluster=cluster)


def goodput_bound_outside(ranked: Sequence[Any], *, complete: bool, cluster: Cluster, seq_len: int,
                          peak_flops_per_s: float) -> float:
    """Upper bound on the goodput (tokens/s) of any layout the search did not return (0 if it returned all).

    A layout outside the K fastest has throughput at most T (the K-th), and at most n·c on n GPUs
    (c: tokens/s of one GPU at peak FLOP/s); it keeps at most ``M(n) / (M(n) + restart)`` of it.
    Counting n/gpus_per_node nodes (not the whole nodes it occupies) only raises M(n) and makes
    n·M(n) constant, so ``n·c·M(n)/(M(n) + restart)`` grows with n while ``T·M(n)/(M(n) + restart)``
    falls: the bound is ``T · M(n₀)/(M(n₀) + restart)`` with n₀ = ⌊T/c⌋.
    """
    if complete or not ranked:
        return 0.0
    last = ranked[-1]
    tokens_per_step = last.layout.global_batch_size * seq_len
    throughput = tokens_per_step / last.step_time_s
    per_gpu_peak = peak_flops_per_s / (last.model_flops / tokens_per_step)
    n = max(1.0, math.floor(throughput / per_gpu_peak))
    spec = cluster.reliability
    mtbf = SECONDS_PER_HOUR / (n / spec.gpu_mtbf_hours + n / cluster.gpus_per_node / spec.node_mtbf_hours)
    return throughput * mtbf / (mtbf + spec.restart_s)


def rank_by_goodput(ranked: Sequence[Any], *, cluster: Cluster, seq_len: int) -> list[tuple[Any, GoodputEstimate]]:
    """The search's evaluations, each with its estimate, best goodput first (ties: the faster first)."""
    scored = [(ev, _evaluation_goodput(ev, cluster, seq_len)) for ev in ranked]
    order = sorted(range(len(scored)), key=lambda i: (-scored[i][1].goodput_tokens_per_s, i))
    return [scored[i] for i in order]


def explain_goodput(est: GoodputEstimate, *, peak: Layout | None = None, peak_est: GoodputEstimate | None = None,
                    certified: str = "") -> tuple[str, ...]:
    """Lines for a plan's explanation: its goodput, interval, and why it beat the fastest plan if it did."""
    lines = [f"  goodput {est.goodput_tokens_per_s:,.0f} tokens/s = {est.goodput_fraction:.1%} of "
             f"{est.throughput_tokens_per_s:,.0f}; job MTBF {est.mtbf_s / 3600:.2f} h; checkpoint "
             f"({est.checkpoint_total_bytes / 1e12:.2f} TB, {est.mode.value}) every {est.interval_steps} steps "
             f"({est.interval_s / 60:.1f} min); {est.loss_per_failure_s / 60:.1f} min lost per failure"]
    if certified:
        lines.append(f"  {certified}")
    if peak is None or peak_est is None:
        return tuple(lines)
    lines.append(f"  the fastest plan, {peak.describe()}, runs {peak_est.throughput_tokens_per_s:,.0f} "
                 f"tokens/s but keeps {peak_est.goodput_fraction:.1%} ({peak_est.goodput_tokens_per_s:,.0f})")
    lines.extend(f"  {why}" for why in goodput_differences(est, peak_est))
    return tuple(lines)


def goodput_differences(est: GoodputEstimate, other: GoodputEstimate) -> list[str]:
    """Which goodput terms differ between two estimates, largest first (for explanations and bench notes)."""
    terms = []
    if abs(est.mtbf_s - other.mtbf_s) > 1e-6 * other.mtbf_s:
        terms.append((abs(est.mtbf_s / other.mtbf_s - 1), f"job MTBF {est.mtbf_s / 3600:.2f} h vs "
                      f"{other.mtbf_s / 3600:.2f} h (fewer GPUs and nodes that can fail)"))
    stall, other_stall = _stall(est), _stall(other)
    if abs(stall - other_stall) > 1e-3:
        terms.append((abs(stall - other_stall) / max(stall, other_stall),
                      f"checkpoint stall {stall:.1f} s vs {other_stall:.1f} s ({est.mode.value} vs "
                      f"{other.mode.value})"))
    if abs(est.load_s - other.load_s) > 1e-3:
        terms.append((abs(est.load_s - other.load_s) / max(est.load_s, other.load_s),
                      f"checkpoint load {est.load_s:.1f} s vs {other.load_s:.1f} s per restart"))
    if not terms:
        terms.append((0.0, "same failure and checkpoint costs: they differ in throughput only"))
    return [text for _, text in sorted(terms, key=lambda t: -t[0])]


def _stall(est: GoodputEstimate) -> float:
    return est.save_async_stall_s if est.mode.value == "async" else est.save_sync_s


def with_goodput(plans: Sequence[Plan], estimates: Sequence[GoodputEstimate]) -> list[Plan]:
    """The plans with their estimates attached (``Plan.reliability``)."""
    return [dataclasses.replace(p, reliability=e) for p, e in zip(plans, estimates)]


def rank_plans(goal: Objective, ranked: Sequence[Any], graph: OpGraph, pricing: Any, *, cluster: Cluster,
               keep: int, complete: bool, dtype: str) -> list[Plan]:
    """The first ``keep`` plans under ``goal``, each with its goodput estimate; goodput plans explain themselves.

    Args:
        ranked: the search's evaluations, fastest first.
        complete: the search returned every layout that fits (fewer than it was asked for).
    """
    seq_len = int(graph.info.get("seq_len", 1))

    def build(evs: Sequence[Any]) -> list[Plan]:
        return build_plans(evs, graph, pricing, cluster_name=cluster.name, keep=keep, num_gpus=cluster.num_gpus,
                           gpus_per_node=cluster.gpus_per_node, dtype=dtype, sources=pricing.sources())

    if goal is Objective.THROUGHPUT:
        plans = build(ranked)
        return with_goodput(plans, [plan_goodput(p, cluster) for p in plans])
    scored = rank_by_goodput(ranked, cluster=cluster, seq_len=seq_len)
    plans = build([ev for ev, _ in scored])
    bound = goodput_bound_outside(ranked, complete=complete, cluster=cluster, seq_len=seq_len,
                                  peak_flops_per_s=pricing.peak_flops_per_s)
    best = scored[0][1].goodput_tokens_per_s
    certified = (f"best of all {len(ranked)} layouts that fit" if complete else
                 f"best of the {len(ranked)} fastest layouts; none slower can win (their goodput ≤ {bound:,.0f})"
                 if best >= bound else
                 f"best of the {len(ranked)} fastest layouts only: a slower one could reach {bound:,.0f} tokens/s")
    peak_est = next(est for ev, est in scored if ev is ranked[0])
    out = []
    for i, (plan, (ev, est)) in enumerate(zip(plans, scored)):
        lines = explain_goodput(est, peak=None if ev is ranked[0] else ranked[0].layout, peak_est=peak_est,
                                certified=certified if i == 0 else "")
        out.append(dataclasses.replace(plan, reliability=est, explanation=lines + plan.explanation))
    return out


__all__ = ["GOODPUT_CANDIDATES", "Objective", "estimate_layout_goodput", "explain_goodput", "goodput_bound_outside",
           "goodput_differences", "parse_objective", "plan_goodput", "rank_by_goodput", "rank_plans", "with_goodput"]
