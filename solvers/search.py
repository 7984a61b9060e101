"""Outer search: enumerate layouts, prune, price each survivor, keep the fastest that fit.

Order of work (cheapest test first):
1. groups (tp, sp, micro-batch) × pp × dp get a *lower bound* on step time — every GPU
   busy, no bubble, no data-parallel communication — tightened when the search reaches
   them (``bounds.group_bound``: the least bubble over the allowed schedules and the least
   optimizer step, then the least data-parallel floor over the allowed ZeRO stages, then, under
   a pipeline, the least bottleneck memory allows with ranks kept apart: ``group_rank_floor_s``) — and a
   lower bound on memory (ZeRO-3 states, one micro-batch in flight). Groups whose memory
   bound exceeds the GPU are dropped; the rest are visited in order of their time bound, and
   the search stops once a bound is no better than the k-th best plan found (branch and bound);
2. inside a group, dominated choices are skipped: GPipe keeps more micro-batches in
   flight than 1F1B for the same step time in this model, so it is priced only when
   pinned; interleaving is tried only when pp > 1 and every virtual stage gets a layer;
3. each survivor gets the stage DP (``stage_dp``) and a full price: pipeline time,
   exposed data-parallel communication, optimizer step, memory per pipeline rank.

The search reads prices and never calls back (``solvers.costs``): ``search_steps`` is a generator
that yields the layer settings it is about to read and receives, in return, a ``PriceTable`` that
holds them (a new value each time). It asks first for the one policy per (tp, sp, micro-batch) that
the group bounds read, then, when a group of a setting it has not read yet reaches the rank level or
is expanded, for that setting's other policies, so the cost models price only the settings that survive
the bounds.
``search`` runs it on a table that already holds every setting it asks for.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Callable, Collection, Generator, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from autopar.errors import InfeasiblePlanError
from autopar.layout import Layout, Recompute, Schedule
from autopar.schedule import fits_micro_batches
from autopar.solvers.bounds import (
    Footprint,
    SettingPrices,
    Sums,
    footprint,
    group_bound,
    group_rank_floor_s,
    pipeline_floor_s,
    pipeline_weights,
    layout_bound,
    layout_memory_bound,
    memory_bound,
    recompute_ceiling,
    setting_prices,
)
from autopar.solvers.costs import Formulas, LayerCostTable, LayerSetting, PriceTable
from autopar.solvers.evaluate import Evaluation, PartitionCache, evaluate_layout, fastest_partition_fits
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


Steps = Generator[frozenset[LayerSetting], PriceTable, SearchResult]
"""``search_steps``: yields the settings it needs priced, is sent a table holding them, returns the result."""


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

    @property
    def setting(self) -> Setting:
        """The layer setting its prices belong to."""
        return self.tp, self.sequence_parallel, self.micro_batch_size


_RANKS_LEVEL = 3
"""The last level of a group's bound: with the ranks kept apart (``tighter_group_bound``)."""

Setting = tuple[int, bool, int]
"""(tp, sequence parallelism, micro-batch size): the layer setting a group's prices belong to."""


def _settings(space: SearchSpace) -> Iterator[Setting]:
    for tp in space.tp:
        for sp in space.sequence_parallel:
            if not (sp and tp == 1):
                for mbs in space.micro_batch_size:
                    yield tp, sp, mbs


def _bound_policies(space: SearchSpace) -> tuple[Recompute, ...]:
    """The policies a group's time bound reads: the fastest one allowed.

    Recomputation only adds backward time (``compute.estimate_layer_time``: recompute_s ≥ 0; full
    recomputation repeats the forward TP collectives), so when ``NONE`` is allowed it is the fastest
    and ``setting_prices`` would pick it too (first in ``Recompute`` order): it alone is read for the
    bounds, and the other policies only for settings whose groups the search visits.
    """
    return (Recompute.NONE,) if Recompute.NONE in space.recompute else tuple(space.recompute)


def bound_settings(space: SearchSpace) -> frozenset[LayerSetting]:
    """The layer settings the group bounds read: what ``search_steps`` asks for first."""
    policies = _bound_policies(space)
    return frozenset(LayerSetting(tp, sp, mbs, rc) for tp, sp, mbs in _settings(space) for rc in policies)


def _bound_sums(space: SearchSpace, table: LayerCostTable) -> dict[Setting, Sums]:
    """Per setting, the totals of its ``_bound_policies``; when those leave policies out (``NONE`` alone),
    the slowest-policy totals are raised to ``recompute_ceiling``'s (an upper bound on every policy's)."""
    policies = _bound_policies(space)
    out = {}
    for tp, sp, mbs in _settings(space):
        sums = setting_prices(table, policies, tp, sp, mbs).sums
        out[tp, sp, mbs] = recompute_ceiling(sums) if len(policies) < len(space.recompute) else sums
    return out


def _groups(space: SearchSpace, table: LayerCostTable, sums: dict[Setting, Sums] | None = None) -> Iterator[_Group]:
    """Every group with its cheapest bound: m · Σ fastest forward + backward / pp (every GPU busy, no
    bubble, no optimizer step, no data-parallel term); the search tightens it (``group_bound``) when it
    reaches the group."""
    sums = _bound_sums(space, table) if sums is None else sums
    dp_sizes = {(tp, pp): tuple(space.dp_sizes(tp, pp)) for tp in space.tp for pp in space.pp}
    num_layers = table.num_layers
    for (tp, sp, mbs), setting_sums in sums.items():
        total_s = setting_sums.fastest_s
        for pp in space.pp:
            if pp > num_layers or tp * pp > space.num_gpus:
                continue
            for dp in dp_sizes[tp, pp]:
                if space.global_batch_size % (dp * mbs):
                    continue
                m = space.global_batch_size // (dp * mbs)
                yield _Group(m * total_s / pp, tp, pp, dp, mbs, sp)


def _priced(table: PriceTable, wanted: Collection[LayerSetting]) -> Generator[frozenset[LayerSetting], PriceTable,
                                                                               PriceTable]:
    """``table``, or the table sent back after asking for the settings of ``wanted`` it lacks."""
    missing = table.layers.missing(wanted)
    if missing:
        table = yield missing
        still = table.layers.missing(wanted)
        if still:
            raise ValueError(f"the price table sent back lacks {len(still)} of the settings asked for, "
                             f"e.g. {min(still)}")
    return table


def _zeros(space: SearchSpace, dp: int) -> list[int]:
    """The ZeRO stages of a group's layouts: any allowed with dp > 1, else 0."""
    return [z for z in space.zero_stage if dp > 1 or z == 0] or [0]


def _pipelines(space: SearchSpace, pp: int, m: int, num_layers: int) -> Iterator[tuple[Schedule, int]]:
    """The (schedule, virtual stages) of a group's layouts with ``m`` micro-batches over ``pp`` ranks."""
    pinned_schedule = "schedule" in space.pinned
    for schedule in space.schedule:
        if pp == 1 and schedule is not Schedule.ONE_F_ONE_B:
            if pinned_schedule and schedule is Schedule.GPIPE:
                pass  # a pinned GPipe with pp = 1 is plain gradient accumulation
            else:
                continue
        if schedule is Schedule.GPIPE and not pinned_schedule and pp > 1 and m >= pp:
            continue  # dominated by 1F1B: same time, more activations in flight
        if not fits_micro_batches(schedule, pp=pp, num_micro_batches=m):
            continue  # 1F1B with fewer than pp micro-batches is GPipe; interleaving needs multiples of pp
        for v in space.virtual_stages:
            interleaved = schedule is Schedule.INTERLEAVED_1F1B
            if (v > 1) != interleaved or pp * v > num_layers:
                continue
            yield schedule, v


def _micro_batches(space: SearchSpace, group: _Group) -> int:
    """Micro-batches per step of the group's layouts."""
    return space.global_batch_size // (group.dp * group.micro_batch_size)


def _layouts(group: _Group, space: SearchSpace, num_layers: int,
             recompute: Recompute = Recompute.NONE) -> Iterator[Layout]:
    """Layouts of a group; ``recompute`` is provisional (evaluation sets the policy its stages use)."""
    m = _micro_batches(space, group)
    pipelines = tuple(_pipelines(space, group.pp, m, num_layers))
    for zero in _zeros(space, group.dp):
        for schedule, v in pipelines:
            yield Layout(dp=group.dp, tp=group.tp, pp=group.pp, micro_batch_size=group.micro_batch_size,
                         num_micro_batches=m, zero_stage=zero, recompute=recompute,
                         sequence_parallel=group.sequence_parallel, schedule=schedule, virtual_stages=v)


def search(space: SearchSpace, prices: PriceTable, *, top_k: int = 1, overlap_grad_reduce: bool = True,
           progress: Callable[[float], None] | None = None) -> SearchResult:
    """Find the ``top_k`` fastest layouts that fit, on a table that holds every setting the search reads.

    Raises:
        ValueError: ``prices`` lacks a setting the search reads (drive ``search_steps`` to price lazily).
        InfeasiblePlanError: nothing fits (from ``require_plans``, which the caller runs).
    """
    steps = search_steps(space, prices, top_k=top_k, overlap_grad_reduce=overlap_grad_reduce, progress=progress)
    try:
        missing = next(steps)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    steps.close()
    raise ValueError(f"the price table lacks {len(missing)} setting(s) the search reads, e.g. {min(missing)}")


def search_steps(space: SearchSpace, prices: PriceTable, *, top_k: int = 1, overlap_grad_reduce: bool = True,
                 progress: Callable[[float], None] | None = None) -> Steps:
    """The search as a generator: yields the settings it needs priced, returns the ``SearchResult``.

    Send back a ``PriceTable`` holding at least the settings yielded (``PriceTable.with_layers``).
    """
    prices = yield from _priced(prices, bound_settings(space))
    formulas = Formulas.of(prices)
    sums = _bound_sums(space, prices.layers)
    groups = sorted(_groups(space, prices.layers, sums), key=lambda g: g.time_bound_s)
    state = _State(space=space, formulas=formulas, groups=groups, top_k=top_k, overlap=overlap_grad_reduce,
                   num_layers=prices.layers.num_layers)
    # best first: groups by their bound, then each layout of an expanded group by its own (tighter) bound;
    # (bound, group rank, layout rank): ties go to the order of enumeration
    # a group's level 0: every GPU busy; 1: with the bubble and the optimizer step; 2: with the data-parallel floor
    # (tightened only once top_k plans are found: before, nothing is pruned); 3: with ranks kept apart (under a
    # pipeline, once the setting's policies are priced); a level that does not tighten is skipped;
    # a layout's level 0: a bound with no memory terms; 1: with the forced recomputation; 2: with ranks kept
    # apart; 3: with chunks held to 1/v of a rank's budget (when the time-optimal partition does not fit)
    queue: list[tuple[float, int, int, Layout | None, int, Footprint | None]] = []
    for entry in _merged(groups, queue):  # the groups at level 0 stay in their sorted list, not in the heap
        bound, i, j, layout, level, foot = entry
        if len(state.best) >= top_k and bound >= -state.best[0][0]:
            break  # everything left is bounded by at least this: nothing can win
        group = groups[i]
        setting = group.setting
        if layout is None:
            tighter = state.tighter_group_bound(group, sums[setting], level, bound)
            if tighter is None and group.pp > 1 and setting not in state.settings:  # the rank level reads every
                wanted = [LayerSetting(*setting, rc) for rc in space.recompute]  # policy: price them, then try it
                prices = yield from _priced(prices, wanted)
                state.settings[setting] = setting_prices(prices.layers, space.recompute, *setting)
                tighter = state.tighter_group_bound(group, sums[setting], max(level, _RANKS_LEVEL - 1), bound)
            if tighter is not None:  # tighten the group's bound before expanding it
                heapq.heappush(queue, (tighter[0], i, -1, None, tighter[1], None))
                continue
            state.expanded += 1  # expand the group
            if progress is not None and state.expanded % 64 == 0:
                progress(i / max(1, len(groups)))
            if setting not in state.settings:
                wanted = [LayerSetting(*setting, rc) for rc in space.recompute]
                prices = yield from _priced(prices, wanted)
                state.settings[setting] = setting_prices(prices.layers, space.recompute, *setting)
            for item in state.expand(i, group, state.settings[setting]):
                heapq.heappush(queue, item)
            continue
        state.visit(entry, queue)
    state.pruned_layouts += sum(1 for entry in queue if entry[3] is not None)  # never reached
    return state.result()


def _merged(groups: list[_Group], queue: list[tuple[float, int, int, Layout | None, int, Footprint | None]]
            ) -> Iterator[tuple[float, int, int, Layout | None, int, Footprint | None]]:
    """Pop the least of ``queue`` (a heap the caller pushes to) and of the groups' level-0 entries, in the
    order one heap holding both would pop them; tens of thousands of groups never enter the heap."""
    nxt = 0
    while True:
        if nxt < len(groups) and (not queue or (groups[nxt].time_bound_s, nxt, -1) < queue[0][:3]):
            yield groups[nxt].time_bound_s, nxt, -1, None, 0, None
            nxt += 1
        elif queue:
            yield heapq.heappop(queue)
        else:
            return


class _State:
    """What one search has found so far (mutable, local to one ``search_steps`` run)."""

    def __init__(self, *, space: SearchSpace, formulas: Formulas, groups: list[_Group],
                 top_k: int, overlap: bool, num_layers: int) -> None:
        self.space, self.formulas, self.groups, self.top_k, self.overlap = space, formulas, groups, top_k, overlap
        self.num_layers = num_layers
        self.weights: dict[tuple[int, int], tuple[tuple[float, float, int], ...]] = {}  # by (pp, m)
        self.best: list[tuple[float, float, tuple[int, int], Evaluation]] = []  # max-heap via negation
        self.priced = self.expanded = self.pruned_layouts = 0
        self.min_mem: tuple[int, tuple[int, int], Evaluation] | None = None  # (peak, order, evaluation)
        self.leanest: tuple[float, _Group, SettingPrices] | None = None
        self.partitions: PartitionCache = {}  # keyed by value: the layer setting and the pipeline shape
        self.settings: dict[Setting, SettingPrices] = {}  # every allowed policy, read when a group is visited
        self.group_prices: dict[int, SettingPrices] = {}
        self.unfit: list[tuple[int, int, Layout]] = []  # no partition fits: priced only to say what is needed

    def expand(self, i: int, group: _Group, prices: SettingPrices) -> Iterator[tuple[float, int, int, Layout, int,
                                                                                      None]]:
        """The layouts of group ``i`` with their cheap bound, unless the group's memory bound rules it out."""
        memory = memory_bound(dp=group.dp, pp=group.pp, m=_micro_batches(self.space, group), sums=prices.sums,
                              formulas=self.formulas)
        if memory > self.formulas.gpu_mem_bytes:
            if self.leanest is None or memory < self.leanest[0]:
                self.leanest = (memory, group, prices)
            return
        self.group_prices[i] = prices
        for j, lay in enumerate(_layouts(group, self.space, len(prices.fastest))):  # a cheap bound first
            yield self.bound(lay, prices, None), i, j, lay, 0, None

    def tighter_group_bound(self, group: _Group, sums: Sums, level: int, bound: float) -> tuple[float, int] | None:
        """(bound, level) of the group at the first level above ``level`` whose bound exceeds ``bound``, or None
        (expand it). ``sums``: ``_bound_sums``, its compute bounded above. Level 1: ``group_bound`` with the bubble
        and the optimizer step; 2: with the data-parallel floor (once top_k plans are found, with dp); 3: with the
        ranks kept apart (``group_rank_floor_s``, under a pipeline). None at once for a group whose model states
        alone overflow the GPU: the memory test of ``expand`` drops it."""
        if level == 0 and memory_bound(dp=group.dp, pp=group.pp, m=_micro_batches(self.space, group), sums=sums,
                                       formulas=self.formulas, activations=False) > self.formulas.gpu_mem_bytes:
            return None
        for nxt in range(level + 1, _RANKS_LEVEL + 1):
            dp_floor = nxt >= 2 and group.dp > 1 and len(self.best) >= self.top_k
            if nxt == 2 and not dp_floor:
                continue  # before top_k plans are found (or without dp) the floor cannot pay
            if nxt == _RANKS_LEVEL and (group.pp == 1 or group.setting not in self.settings):
                continue  # ranks are kept apart under a pipeline, once the setting's policies are priced
            tighter = self.group_bound(group, sums, dp_floor=dp_floor, ranks=nxt == _RANKS_LEVEL)
            if tighter > bound:
                return tighter, nxt
        return None

    def group_bound(self, group: _Group, sums: Sums, *, dp_floor: bool, ranks: bool = False) -> float:
        """``bounds.group_bound`` of a group, with or without the data-parallel floor and the ranks kept apart (the
        latter once its setting's policies are priced)."""
        m = _micro_batches(self.space, group)
        if (group.pp, m) not in self.weights:
            self.weights[group.pp, m] = pipeline_weights(tuple(_pipelines(self.space, group.pp, m, self.num_layers)),
                                                         m)
        pipeline_s = pipeline_floor_s(self.weights[group.pp, m], group.pp, sums)
        zeros = _zeros(self.space, group.dp)
        if ranks:
            pipelines = tuple(_pipelines(self.space, group.pp, m, self.num_layers))
            pipeline_s = max(pipeline_s, group_rank_floor_s(self.settings[group.setting], pp=group.pp, dp=group.dp,
                                                            m=m, zeros=zeros, pipelines=pipelines,
                                                            formulas=self.formulas))
        return group_bound(tp=group.tp, sp=group.sequence_parallel, mbs=group.micro_batch_size, pp=group.pp,
                           dp=group.dp, m=m, pipeline_s=pipeline_s, zeros=zeros, sums=sums, formulas=self.formulas,
                           dp_floor=dp_floor, overlap=self.overlap, gpus_per_node=self.space.gpus_per_node)

    def bound(self, layout: Layout, prices: SettingPrices, foot: Footprint | None, *, ranks: bool = False,
              chunks: bool = False) -> float:
        """``layout_bound`` with this search's cluster shape and overlap (as ``evaluate_layout`` prices)."""
        return layout_bound(layout, prices, self.formulas, foot, ranks=ranks, chunks=chunks, overlap=self.overlap,
                            gpus_per_node=self.space.gpus_per_node)

    def visit(self, entry: tuple[float, int, int, Layout | None, int, Footprint | None],
              queue: list[tuple[float, int, int, Layout | None, int, Footprint | None]]) -> None:
        """Tighten a layout's bound (memory terms, then ranks kept apart), or price it when it is tight."""
        bound, i, j, layout, level, foot = entry
        assert layout is not None
        prices, formulas = self.group_prices[i], self.formulas
        if level == 0:  # its memory terms, then the bound with the recomputation memory forces
            foot = footprint(layout, prices.sums, formulas)
            if layout_memory_bound(layout, prices, formulas, foot) > formulas.gpu_mem_bytes:
                self.pruned_layouts += 1
            else:
                heapq.heappush(queue, (self.bound(layout, prices, foot), i, j, layout, 1, foot))
            return
        if level == 1:  # about to be priced: the tightest bound first
            ranked_bound = self.bound(layout, prices, foot, ranks=True)
            if ranked_bound > bound:
                heapq.heappush(queue, (ranked_bound, i, j, layout, 2, foot))
                return
        if level <= 2:
            # when memory decides the partition, each chunk runs one policy within 1/v of its rank's budget;
            # that bound holds only if the time-optimal partition does not fit (the costlier test, second).
            # inf: no partition fits, so the layout is priced only if nothing fits, to say what is needed
            chunk_bound = self.bound(layout, prices, foot, ranks=level == 2, chunks=True)
            if chunk_bound > bound and not fastest_partition_fits(
                    layout, prices.variants, formulas, gpus_per_node=self.space.gpus_per_node,
                    partition_cache=self.partitions, costs_key=prices.key):
                if chunk_bound == math.inf:
                    self.unfit.append((i, j, layout))
                else:
                    heapq.heappush(queue, (chunk_bound, i, j, layout, 3, foot))
                return
        self.price(i, j, layout)

    def price(self, i: int, j: int, layout: Layout) -> None:
        """Evaluate layout j of group i and keep it if it ranks."""
        prices = self.group_prices[i]
        ev = evaluate_layout(layout, prices.variants, self.formulas, gpus_per_node=self.space.gpus_per_node,
                             overlap_grad_reduce=self.overlap, partition_cache=self.partitions, costs_key=prices.key)
        self.priced += 1
        if self.min_mem is None or (ev.peak_memory_bytes, (i, j)) < self.min_mem[:2]:
            self.min_mem = (ev.peak_memory_bytes, (i, j), ev)
        if not ev.fits:
            return
        item = (-ev.step_time_s, -ev.peak_memory_bytes, (-i, -j), ev)  # ties: less memory, then enumeration order
        if len(self.best) < self.top_k:
            heapq.heappush(self.best, item)
        elif item[:3] > self.best[0][:3]:
            heapq.heapreplace(self.best, item)

    def result(self) -> SearchResult:
        """The ranked layouts; when nothing was priced, the leanest group priced to say what it needs."""
        pruned = len(self.groups) - self.expanded
        if not self.best:  # nothing fits: the layouts no partition fits take part in saying what is needed
            for i, j, layout in self.unfit:
                self.price(i, j, layout)
        lowest = self.min_mem[2] if self.min_mem is not None else None
        if lowest is None and self.leanest is not None:  # all pruned: price the leanest group to say what it needs
            _, group, prices = self.leanest
            evs = [evaluate_layout(lay, prices.variants, self.formulas, gpus_per_node=self.space.gpus_per_node)
                   for lay in _layouts(group, self.space, len(prices.fastest))]
            lowest = min(evs, key=lambda ev: ev.peak_memory_bytes, default=None)
        ranked = tuple(item[-1] for item in sorted(self.best, key=lambda t: t[:3], reverse=True))
        log.info("search: %d groups, %d pruned by bounds; %d layouts pruned, %d priced", len(self.groups), pruned,
                 self.pruned_layouts, self.priced)
        return SearchResult(ranked=ranked, candidates_priced=self.priced, groups_considered=len(self.groups),
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


__all__ = ["SearchResult", "Steps", "bound_settings", "search", "search_steps", "require_plans"]
