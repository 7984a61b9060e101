"""Outer search: enumerate layouts, prune, price each survivor, keep the fastest that fit.

Order of work (cheapest test first):
1. groups (tp, sp, micro-batch, recompute) × pp × dp get a *lower bound* on step time —
   every GPU busy, no bubble, no data-parallel communication — and a lower bound on
   memory (ZeRO-3 states, one micro-batch in flight). Groups whose memory bound exceeds
   the GPU are dropped; the rest are visited in order of their time bound, and the
   search stops once a bound is no better than the k-th best plan found (branch and bound);
2. inside a group, dominated choices are skipped: GPipe keeps more micro-batches in
   flight than 1F1B for the same step time in this model, so it is priced only when
   pinned; interleaving is tried only when pp > 1 and every virtual stage gets a layer;
3. each survivor gets the stage DP (``stage_dp``) and a full price: pipeline time,
   exposed data-parallel communication, optimizer step, memory per pipeline rank.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from autopar.cost_models.memory import tensor_budget_bytes, with_headroom
from autopar.errors import InfeasiblePlanError
from autopar.layout import Layout, Recompute, Schedule
from autopar.schedule import fits_micro_batches, in_flight_per_stage, schedule_weights
from autopar.solvers.bounds import rank_bottleneck_s
from autopar.solvers.costs import LayerCost, Pricing
from autopar.solvers.evaluate import Evaluation, PartitionCache, evaluate_layout
from autopar.solvers.space import SearchSpace

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class SearchResult:
    """The ranked plans and what the search did."""

    ranked: tuple[Evaluation, ...]
    """Best first; at most top_k."""
    candidates_priced: int
    """Layouts that got a full price (stage DP included)."""
    groups_considered: int
    """(tp, sp, micro-batch, recompute, pp, dp) groups enumerated."""
    groups_pruned: int
    """Groups dropped by a bound before pricing."""
    min_memory: Evaluation | None
    """The priced layout with the smallest peak memory (for infeasibility reports)."""


class _Group(NamedTuple):
    """Layouts sharing (tp, pp, dp, micro-batch, sp): one set of price tables, one time bound.

    A NamedTuple rather than a frozen dataclass: tens of thousands are built per search.
    """

    time_bound_s: float
    tp: int
    pp: int
    dp: int
    micro_batch_size: int
    sequence_parallel: bool


class _Prices(NamedTuple):
    """Per-layer costs of one (tp, sp, micro-batch) setting under each recomputation policy allowed."""

    variants: dict[Recompute, tuple[LayerCost, ...]]
    """Policy → per-layer costs (each stage picks the fastest that fits: ``stage_policies``)."""
    fastest: tuple[LayerCost, ...]
    """The costs with the least time (for time bounds)."""
    leanest: tuple[LayerCost, ...]
    """The costs with the least activation memory (for memory bounds)."""
    key: tuple[object, ...]
    """The setting's value (tp, sp, micro-batch, policies): what cached partitions are keyed by."""
    repeats: tuple[tuple[int, int], ...]
    """(first layer index, count) per distinct layer, equal by value under every policy."""
    block: tuple[int, int]
    """(index, count) of the most repeated layer in ``leanest``."""
    sums: _Sums
    """Whole-model totals the bounds read (summed once per setting, not once per layout)."""


class _Sums(NamedTuple):
    """Totals over every layer of one setting's ``fastest`` and ``leanest`` costs."""

    fastest_s: float
    """Σ forward + backward of ``fastest``."""
    fastest_params: float
    """Σ parameters of ``fastest``."""
    fastest_acts: float
    """Σ activation bytes of ``fastest``."""
    leanest_params: float
    """Σ parameters of ``leanest``."""
    leanest_acts: float
    """Σ activation bytes of ``leanest``."""
    largest_params: float
    """The most parameters of one layer of ``leanest``."""
    runs: tuple[tuple[int, float], ...]
    """(count, forward + backward seconds in ``fastest``) of each distinct layer."""


def _sums(fastest: tuple[LayerCost, ...], leanest: tuple[LayerCost, ...],
          repeats: tuple[tuple[int, int], ...]) -> _Sums:
    return _Sums(runs=tuple((n, fastest[i].forward_s + fastest[i].backward_s) for i, n in repeats),
                 fastest_s=sum(c.forward_s + c.backward_s for c in fastest),
                 fastest_params=sum(c.param_count for c in fastest),
                 fastest_acts=sum(c.activation_bytes for c in fastest),
                 leanest_params=sum(c.param_count for c in leanest),
                 leanest_acts=sum(c.activation_bytes for c in leanest),
                 largest_params=max(c.param_count for c in leanest))


def _prices(space: SearchSpace, pricing: Pricing, tp: int, sp: bool, mbs: int) -> _Prices:
    variants: dict[Recompute, tuple[LayerCost, ...]] = {}
    for rc in space.recompute:
        costs = pricing.layer_costs(tp=tp, sequence_parallel=sp, micro_batch_size=mbs, recompute=rc)
        if costs not in variants.values():  # e.g. selective = none when fused attention keeps no s×s tensor
            variants[rc] = costs
    tables = list(variants.values())
    leanest = min(tables, key=lambda cs: sum(c.activation_bytes for c in cs))
    fastest = min(tables, key=lambda cs: sum(c.forward_s + c.backward_s for c in cs))
    repeats = _repeats([tuple(t[i] for t in tables) for i in range(len(leanest))])
    return _Prices(variants=variants, fastest=fastest, leanest=leanest, key=(tp, sp, mbs, tuple(variants)),
                   repeats=repeats, block=max(_repeats(list(leanest)), key=lambda ic: ic[1]),
                   sums=_sums(fastest, leanest, repeats))


def _repeats(values: list[object]) -> tuple[tuple[int, int], ...]:
    """(first index, count) of each distinct value, in order of first appearance (layers compared by value)."""
    first: dict[object, int] = {}
    counts: Counter[object] = Counter()
    for i, value in enumerate(values):
        first.setdefault(value, i)
        counts[value] += 1
    return tuple((first[v], counts[v]) for v in first)


Setting = tuple[int, bool, int]
"""(tp, sequence parallelism, micro-batch size): the layer setting a group's prices belong to."""


def _fastest_total_s(space: SearchSpace, pricing: Pricing, tp: int, sp: bool, mbs: int) -> tuple[float, int]:
    """(Σ forward + backward over layers, layer count) of the fastest allowed policy: a group's time bound.

    Recomputation only adds backward time (``compute.estimate_layer_time``: recompute_s ≥ 0; full
    recomputation repeats the forward TP collectives), so when ``NONE`` is allowed it is the fastest
    and ``_prices`` would pick it too (first in ``Recompute`` order): it is priced alone here, and the
    other policies only for settings whose groups the search visits.
    """
    if Recompute.NONE in space.recompute:
        costs = pricing.layer_costs(tp=tp, sequence_parallel=sp, micro_batch_size=mbs, recompute=Recompute.NONE)
    else:
        costs = _prices(space, pricing, tp, sp, mbs).fastest
    return sum(c.forward_s + c.backward_s for c in costs), len(costs)


def _groups(space: SearchSpace, pricing: Pricing) -> Iterator[tuple[_Group, Setting]]:
    dp_sizes = {(tp, pp): tuple(space.dp_sizes(tp, pp)) for tp in space.tp for pp in space.pp}
    for tp in space.tp:
        for sp in space.sequence_parallel:
            if sp and tp == 1:
                continue
            for mbs in space.micro_batch_size:
                total_s, num_layers = _fastest_total_s(space, pricing, tp, sp, mbs)
                for pp in space.pp:
                    if pp > num_layers or tp * pp > space.num_gpus:
                        continue
                    for dp in dp_sizes[tp, pp]:
                        if space.global_batch_size % (dp * mbs):
                            continue
                        m = space.global_batch_size // (dp * mbs)
                        yield _Group(m * total_s / pp, tp, pp, dp, mbs, sp), (tp, sp, mbs)


def _memory_bound(group: _Group, sums: _Sums, pricing: Pricing) -> float:
    """Smallest possible peak per GPU: ZeRO-3 states and one micro-batch of the leanest policy, spread over pp."""
    zero = 3 if group.dp > 1 else 0
    states = sum(pricing.model_state_bytes(sums.leanest_params, zero_stage=zero, dp=group.dp))
    return (states + sums.leanest_acts) / group.pp


class _Footprint(NamedTuple):
    """Memory terms of a layout that do not depend on the stage partition or the recompute policy."""

    states: float
    """Model-state bytes of the whole model on one (tp, dp) slice, summed over pipeline ranks."""
    fixed: float
    """Communication buffers and runtime reservation per GPU (before headroom)."""
    k: list[int]
    """Per pipeline rank, the fewest micro-batches in flight on any of its chunks."""


def _footprint(layout: Layout, sums: _Sums, pricing: Pricing) -> _Footprint:
    """Computed once per layout for both bounds (parameters do not depend on the recompute policy)."""
    states = sum(pricing.model_state_bytes(sums.leanest_params, zero_stage=layout.zero_stage, dp=layout.dp))
    fixed = pricing.buffer_bytes(largest_layer_params=sums.largest_params, zero_stage=layout.zero_stage,
                                 dp=layout.dp)
    in_flight = in_flight_per_stage(layout.schedule, pp=layout.pp, num_micro_batches=layout.num_micro_batches,
                                    virtual_stages=layout.virtual_stages)
    # chunk j runs on rank j mod pp: row c of the (v, pp) reshape holds the ranks' c-th chunks
    k = np.asarray(in_flight).reshape(layout.virtual_stages, layout.pp).min(axis=0).tolist()
    return _Footprint(states=states, fixed=fixed, k=k)


def _layout_bound(layout: Layout, prices: _Prices, pricing: Pricing, foot: _Footprint | None,
                  ranks: bool = False) -> float:
    """Lower bound on a layout's step time, valid for every stage partition and policy per stage.

    With S = pp·v stages the pipeline takes ``alpha · max_j t_j + beta · Σ_j t_j`` (``schedule_weights``),
    where Σ is at least the fastest policy's total plus the recomputation memory forces
    (``_forced_recompute_s``) and ``max_j t_j`` at least Σ / S and, as some stage holds ⌈n/S⌉ of any n
    equal layers, ⌈n/S⌉ times such a layer's fastest time;
    the optimizer update of the most loaded rank takes at least that of an even share of the parameters.
    Without ``foot`` the forced recomputation is left out (a weaker bound that needs no memory terms);
    with ``ranks`` a rank's chunks take at least 1/v of the time ``bounds.rank_bottleneck_s`` finds
    for the most repeated layer over ranks that hold different numbers of micro-batches (valid for
    layouts that fit, the only ones the ranking keeps).
    """
    total = prices.sums.fastest_s + (0.0 if foot is None else _forced_recompute_s(layout, prices, pricing, foot))
    m, pp, v = layout.num_micro_batches, layout.pp, layout.virtual_stages
    alpha, beta = schedule_weights(layout.schedule, num_micro_batches=m, virtual_stages=v)
    stages = pp * v  # some stage holds at least ⌈n/S⌉ of n equal layers (pigeonhole)
    bottleneck = max(total / stages, *(-(-n // stages) * work for n, work in prices.sums.runs))
    if ranks and foot is not None and pp > 1:
        bottleneck = max(bottleneck, _rank_bottleneck_s(layout, prices, pricing, foot) / v)
    owned = prices.sums.fastest_params / pp / (layout.dp if layout.zero_stage >= 1 else 1)
    return alpha * bottleneck + beta * total + pricing.optimizer_step_time(owned)


def _rank_bottleneck_s(layout: Layout, prices: _Prices, pricing: Pricing, foot: _Footprint) -> float:
    """``bounds.rank_bottleneck_s`` for the most repeated layer (equal under every policy) of the layout."""
    index, count = max(prices.repeats, key=lambda ic: ic[1])
    block = prices.fastest[index]
    static = sum(pricing.model_state_bytes(block.param_count, zero_stage=layout.zero_stage, dp=layout.dp))
    policies = [(t[index].activation_bytes, t[index].forward_s + t[index].backward_s)
                for t in prices.variants.values()]
    return rank_bottleneck_s(count=count, static_bytes=static, policies=policies, in_flight=foot.k,
                             budget_bytes=tensor_budget_bytes(pricing.gpu_mem_bytes, fixed_bytes=foot.fixed))


def _forced_recompute_s(layout: Layout, prices: _Prices, pricing: Pricing, foot: _Footprint) -> float:
    """Least extra time (summed over layers) that recomputation must add for the layout to fit.

    Every rank holds at least k_min micro-batches, so any feasible choice of policies keeps
    ``Σ_i (w_i + k_min · a_i) ≤ pp · budget``. Relaxing the choice per layer to fractions gives the
    LP of a multiple-choice knapsack; its optimum takes, in order of time added per byte saved,
    the segments of each layer's lower convex hull of (bytes saved, time added) until the excess
    is covered (Sinha & Zoltners 1979). Returns inf when even the leanest policies do not fit.
    """
    if len(prices.variants) == 1:
        return 0.0
    k = min(foot.k)
    base = prices.fastest
    budget = layout.pp * tensor_budget_bytes(pricing.gpu_mem_bytes, fixed_bytes=foot.fixed)
    excess = foot.states + k * prices.sums.fastest_acts - budget
    if excess <= 0:
        return 0.0
    tables = list(prices.variants.values())
    segments: list[tuple[float, float]] = []  # (seconds per byte, bytes) of every hull segment, all layers
    for i, count in prices.repeats:  # repeated layers share costs
        segments.extend((rate, count * nbytes) for rate, nbytes in _hull_segments(
            [(k * (base[i].activation_bytes - t[i].activation_bytes),
              (t[i].forward_s + t[i].backward_s) - (base[i].forward_s + base[i].backward_s)) for t in tables]))
    extra = 0.0
    for rate, nbytes in sorted(segments):
        take = min(nbytes, excess)
        extra += rate * take
        excess -= take
        if excess <= 0:
            return extra
    return math.inf


def _hull_segments(options: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Segments (slope, width) of the lower convex hull from (0, 0) through (bytes saved, time added) options."""
    hull = [(0.0, 0.0)]
    for saved, added in sorted(set(options)):
        if saved <= hull[-1][0]:
            continue
        while len(hull) >= 2 and (added - hull[-2][1]) * (hull[-1][0] - hull[-2][0]) <= \
                (hull[-1][1] - hull[-2][1]) * (saved - hull[-2][0]):
            hull.pop()
        hull.append((saved, added))
    return [((b[1] - a[1]) / (b[0] - a[0]), b[0] - a[0]) for a, b in zip(hull, hull[1:])]


def _layout_memory_bound(layout: Layout, prices: _Prices, pricing: Pricing, foot: _Footprint) -> float:
    """Lower bound on the fullest rank's memory over every stage partition.

    Rank r holds its states S_r and k_r micro-batches of its activations A_r (k_r: the fewest
    in flight on any of its chunks). Weighting ranks by w_r = (1/k_r)/H with H = Σ_r 1/k_r,
    ``max_r (S_r + k_r·A_r) ≥ Σ_r w_r (S_r + k_r·A_r) ≥ S/(k_max·H) + A/H`` for S = Σ S_r, A = Σ A_r;
    uniform weights give ``(S + k_min·A)/pp``; the larger of the two holds. Buffers and headroom are
    added as ``evaluate_layout`` adds them.
    """
    states, fixed, k = foot
    acts = prices.sums.leanest_acts
    h = sum(1.0 / kr for kr in k)
    spread = max(states / (max(k) * h) + acts / h, (states + min(k) * acts) / layout.pp,
                 _repeated_block_bound(layout, prices, pricing, k))
    return with_headroom(spread + fixed)


def _repeated_block_bound(layout: Layout, prices: _Prices, pricing: Pricing, k: list[int]) -> float:
    """Bound from the most repeated layer alone (identical costs; the other layers only add memory).

    N blocks of states s and activations a, n_r of them on rank r: ``max_r n_r·(s + k_r·a)`` over real
    n_r ≥ 0 summing to N is smallest when every term is equal, at ``N / Σ_r 1/(s + k_r·a)``.
    """
    index, n = prices.block
    block = prices.leanest[index]
    s = sum(pricing.model_state_bytes(block.param_count, zero_stage=layout.zero_stage, dp=layout.dp))
    return n / sum(1.0 / (s + kr * block.activation_bytes) for kr in k)


def _layouts(group: _Group, space: SearchSpace, num_layers: int,
             recompute: Recompute = Recompute.NONE) -> Iterator[Layout]:
    """Layouts of a group; ``recompute`` is provisional (evaluation sets the policy its stages use)."""
    m = space.global_batch_size // (group.dp * group.micro_batch_size)
    zeros = [z for z in space.zero_stage if group.dp > 1 or z == 0] or [0]
    pinned_schedule = "schedule" in space.pinned
    for zero in zeros:
        for schedule in space.schedule:
            if group.pp == 1 and schedule is not Schedule.ONE_F_ONE_B:
                if pinned_schedule and schedule is Schedule.GPIPE:
                    pass  # a pinned GPipe with pp = 1 is plain gradient accumulation
                else:
                    continue
            if schedule is Schedule.GPIPE and not pinned_schedule and group.pp > 1 and m >= group.pp:
                continue  # dominated by 1F1B: same time, more activations in flight
            if not fits_micro_batches(schedule, pp=group.pp, num_micro_batches=m):
                continue  # 1F1B with fewer than pp micro-batches is GPipe; interleaving needs multiples of pp
            for v in space.virtual_stages:
                interleaved = schedule is Schedule.INTERLEAVED_1F1B
                if (v > 1) != interleaved or group.pp * v > num_layers:
                    continue
                yield Layout(dp=group.dp, tp=group.tp, pp=group.pp, micro_batch_size=group.micro_batch_size,
                             num_micro_batches=m, zero_stage=zero, recompute=recompute,
                             sequence_parallel=group.sequence_parallel, schedule=schedule, virtual_stages=v)


def search(space: SearchSpace, pricing: Pricing, *, top_k: int = 1, overlap_grad_reduce: bool = True,
           progress: Callable[[float], None] | None = None) -> SearchResult:
    """Find the ``top_k`` fastest layouts that fit.

    Raises:
        InfeasiblePlanError: nothing fits; the message names the smallest peak found and its dominant term.
    """
    groups = sorted(_groups(space, pricing), key=lambda gc: gc[0].time_bound_s)
    best: list[tuple[float, int, tuple[int, int], Evaluation]] = []  # max-heap on (step, memory) via negation
    priced = expanded = pruned_layouts = 0
    min_mem: tuple[int, tuple[int, int], Evaluation] | None = None  # (peak, order, evaluation)
    leanest: tuple[float, _Group, _Prices] | None = None
    partitions: PartitionCache = {}  # keyed by value: the layer setting and the pipeline shape
    settings: dict[Setting, _Prices] = {}  # every allowed policy, priced when a group of the setting is visited
    # best first: groups by their bound, then each layout of an expanded group by its own (tighter) bound;
    # (bound, group rank, layout rank): ties go to the order of enumeration
    # level 0: a bound with no memory terms; 1: with the forced recomputation; 2: with ranks kept apart
    queue: list[tuple[float, int, int, Layout | None, int, _Footprint | None]] = [
        (g.time_bound_s, i, -1, None, 0, None) for i, (g, _) in enumerate(groups)]  # already a heap: sorted
    heap_prices: dict[int, _Prices] = {}
    while queue:
        bound, i, j, layout, level, foot = heapq.heappop(queue)
        if len(best) >= top_k and bound >= -best[0][0]:
            break  # everything left is bounded by at least this: nothing can win
        group, setting = groups[i]
        if layout is None:  # expand the group
            expanded += 1
            if progress is not None and expanded % 64 == 0:
                progress(i / max(1, len(groups)))
            if setting not in settings:
                settings[setting] = _prices(space, pricing, *setting)
            prices = settings[setting]
            memory = _memory_bound(group, prices.sums, pricing)
            if memory > pricing.gpu_mem_bytes:
                if leanest is None or memory < leanest[0]:
                    leanest = (memory, group, prices)
                continue
            heap_prices[i] = prices
            for j, lay in enumerate(_layouts(group, space, len(prices.fastest))):  # a cheap bound first
                heapq.heappush(queue, (_layout_bound(lay, prices, pricing, None), i, j, lay, 0, None))
            continue
        prices = heap_prices[i]
        if level == 0:  # its memory terms, then the bound with the recomputation memory forces
            foot = _footprint(layout, prices.sums, pricing)
            if _layout_memory_bound(layout, prices, pricing, foot) > pricing.gpu_mem_bytes:
                pruned_layouts += 1
            else:
                heapq.heappush(queue, (_layout_bound(layout, prices, pricing, foot), i, j, layout, 1, foot))
            continue
        if level == 1 and len(best) >= top_k:  # about to be priced: the tightest bound first
            ranked_bound = _layout_bound(layout, prices, pricing, foot, ranks=True)
            if ranked_bound > bound:
                heapq.heappush(queue, (ranked_bound, i, j, layout, 2, foot))
                continue
        ev = evaluate_layout(layout, prices.variants, pricing, gpus_per_node=space.gpus_per_node,
                             overlap_grad_reduce=overlap_grad_reduce, partition_cache=partitions,
                             costs_key=prices.key)
        priced += 1
        if min_mem is None or (ev.peak_memory_bytes, (i, j)) < min_mem[:2]:
            min_mem = (ev.peak_memory_bytes, (i, j), ev)
        if not ev.fits:
            continue
        item = (-ev.step_time_s, -ev.peak_memory_bytes, (-i, -j), ev)  # ties: less memory, then enumeration order
        if len(best) < top_k:
            heapq.heappush(best, item)
        elif item[:3] > best[0][:3]:
            heapq.heapreplace(best, item)
    pruned = len(groups) - expanded
    pruned_layouts += sum(1 for entry in queue if entry[3] is not None)  # never reached
    lowest = min_mem[2] if min_mem is not None else None
    if lowest is None and leanest is not None:  # all pruned: price the leanest group to say what it needs
        _, group, prices = leanest
        evs = [evaluate_layout(lay, prices.variants, pricing, gpus_per_node=space.gpus_per_node)
               for lay in _layouts(group, space, len(prices.fastest))]
        lowest = min(evs, key=lambda ev: ev.peak_memory_bytes, default=None)
    ranked = tuple(item[-1] for item in sorted(best, key=lambda t: t[:3], reverse=True))
    log.info("search: %d groups, %d pruned by bounds; %d layouts pruned, %d priced", len(groups), pruned,
             pruned_layouts, priced)
    return SearchResult(ranked=ranked, candidates_priced=priced, groups_considered=len(groups),
                        groups_pruned=pruned, min_memory=lowest)


def require_plans(result: SearchResult, *, capacity_bytes: int, num_gpus: int, smallest_fit: str | None) -> None:
    """Raise ``InfeasiblePlanError`` with what would fit when the search found nothing."""
    if result.ranked:
        return
    lowest = result.min_memory
    if lowest is None:
        detail = "no layout could even be laid out (check the pins against the cluster)"
    else:
        peak = lowest.peak_memory_bytes
        term = lowest.dominant_memory_term
        detail = (f"the leanest layout ({lowest.layout.describe()}) needs {peak / 2**30:.1f} GiB per GPU, "
                  f"dominated by {term}, but a GPU has {capacity_bytes / 2**30:.1f} GiB")
    hint = (f"; it would fit on {smallest_fit}" if smallest_fit else
            "; no cluster of up to 64× as many nodes fits either: relax the pins, lower the micro-batch or "
            "sequence length, or use GPUs with more memory")
    raise InfeasiblePlanError(f"no plan fits on {num_gpus} GPUs: {detail}{hint}")


__all__ = ["SearchResult", "search", "require_plans"]
