"""Lower bounds for the outer search: on a setting's groups and on each layout, in time and memory.

The layout bounds (``layout_bound``, ``layout_memory_bound``) hold for every stage partition and
every recomputation policy per stage; ``rank_bottleneck_s`` couples memory and time per pipeline rank
(the least-bottleneck solvers are in ``bottlenecks``). A group's bound (``group_bound``) is the least
layout bound over its ZeRO stages and schedules, read off ``NONE``'s prices alone (``recompute_ceiling``).

The cheaper layout bound (``layout_bound``) spread the work evenly over the stages and
price the recomputation memory forces over all ranks together, so they miss that the first ranks of
a 1F1B pipeline hold more micro-batches in flight and must take fewer layers or recompute. The bound
here keeps the ranks apart for the most repeated layer alone (the other layers only add time and
memory, so leaving them out keeps it a lower bound).
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from autopar.cost_models.comm import fsdp_gathers_per_step
from autopar.cost_models.memory import tensor_budget_bytes, with_headroom
from autopar.layout import Layout, Recompute, Schedule
from autopar.schedule import in_flight_per_stage, schedule_weights
from autopar.solvers.bottlenecks import chunk_bottleneck_s, least_bottleneck_s, rank_bottleneck_s, runs_of
from autopar.solvers.costs import Formulas, LayerCost, LayerCostTable, LayerSetting
from autopar.solvers.evaluate import dp_comm_s, recv_reserve


class SettingPrices(NamedTuple):
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
    sums: Sums
    """Whole-model totals the bounds read (summed once per setting, not once per layout)."""
    least_s: tuple[float, ...]
    """Per layer, the least forward + backward over the policies."""
    bottlenecks: dict[object, Any]
    """Memo of the bottleneck bounds, filled as layouts ask: ``least_bottleneck_s(least_s, S)`` by the number of
    stages S (and ``runs_of(least_s)`` by "runs"), ``rank_bottleneck_s`` of the most repeated layer by (states,
    in-flight counts, budget), ``chunk_bottleneck_s`` by those and the pinned layers."""


class Sums(NamedTuple):
    """Totals over every layer of one setting's ``fastest`` and ``leanest`` costs."""

    fastest_s: float
    """Σ forward + backward of ``fastest``."""
    fastest_forward_s: float
    """Σ forward of ``fastest``."""
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
    widest_boundary: float
    """The most bytes a layer sends to the next (the stage DP reserves receive buffers for it: ``recv_reserve``)."""
    runs: tuple[tuple[int, float], ...]
    """(count, forward + backward seconds in ``fastest``) of each distinct layer."""
    slowest_s: float
    """Σ over layers of the slowest policy's forward + backward (no partition computes more)."""
    slowest_backward_s: float
    """Σ over layers of the slowest policy's backward."""
    root_params: float
    """Parameters of the layers that do not repeat (FSDP's stage-root units, ``comm.fsdp_edge_params``)."""
    first_block_params: float
    """Parameters of the first repeated layer (0 if none)."""
    every_layer_has_params: bool
    """Whether each layer holds parameters (then every pipeline rank's FSDP collectives are non-empty)."""


def _total(costs: Sequence[LayerCost], repeats: tuple[tuple[int, int], ...],
           value: Callable[[LayerCost], float]) -> float:
    """Σ ``value`` over every layer, each distinct layer (``repeats``: first index, count) valued once."""
    return sum(n * value(costs[i]) for i, n in repeats)


def _sums(fastest: tuple[LayerCost, ...], leanest: tuple[LayerCost, ...],
          repeats: tuple[tuple[int, int], ...], tables: Sequence[tuple[LayerCost, ...]]) -> Sums:
    """Totals over the distinct layers (``repeats``: equal under every policy) times their counts: a
    transformer's blocks are summed once, however deep it is."""
    def total(costs: Sequence[LayerCost], value: Callable[[LayerCost], float]) -> float:
        return _total(costs, repeats, value)

    def slowest(value: Callable[[LayerCost], float]) -> float:
        return sum(n * max(value(t[i]) for t in tables) for i, n in repeats)

    param_layers = Counter[float]()  # layers per parameter count: FSDP's blocks are the counts that repeat
    for i, n in repeats:
        param_layers[fastest[i].param_count] += n
    roots = [(i, n) for i, n in repeats if param_layers[fastest[i].param_count] == 1]
    return Sums(slowest_s=slowest(lambda c: c.forward_s + c.backward_s),
                slowest_backward_s=slowest(lambda c: c.backward_s),
                root_params=sum(n * fastest[i].param_count for i, n in roots),
                first_block_params=next((fastest[i].param_count for i, _ in repeats
                                         if param_layers[fastest[i].param_count] > 1), 0.0),
                every_layer_has_params=min(fastest[i].param_count for i, _ in repeats) > 0,
                runs=tuple((n, fastest[i].forward_s + fastest[i].backward_s) for i, n in repeats),
                fastest_s=total(fastest, lambda c: c.forward_s + c.backward_s),
                fastest_forward_s=total(fastest, lambda c: c.forward_s),
                fastest_params=total(fastest, lambda c: c.param_count),
                fastest_acts=total(fastest, lambda c: c.activation_bytes),
                leanest_params=total(leanest, lambda c: c.param_count),
                leanest_acts=total(leanest, lambda c: c.activation_bytes),
                largest_params=max(leanest[i].param_count for i, _ in repeats),
                widest_boundary=max(fastest[i].boundary_bytes for i, _ in repeats))


def setting_prices(table: LayerCostTable, policies: Sequence[Recompute], tp: int, sp: bool,
                   mbs: int) -> SettingPrices:
    """The rows of one (tp, sp, micro-batch) setting under ``policies``, with the totals the bounds read."""
    variants: dict[Recompute, tuple[LayerCost, ...]] = {}
    for rc in policies:
        costs = table[LayerSetting(tp, sp, mbs, rc)]
        if not any(_equal_rows(costs, other) for other in variants.values()):  # e.g. selective = none when
            variants[rc] = costs  # fused attention keeps no s×s tensor
    tables = list(variants.values())
    repeats, member = _distinct(tables)
    leanest = min(tables, key=lambda cs: _total(cs, repeats, lambda c: c.activation_bytes))
    fastest = min(tables, key=lambda cs: _total(cs, repeats, lambda c: c.forward_s + c.backward_s))
    least = {i: min(t[i].forward_s + t[i].backward_s for t in tables) for i, _ in repeats}
    return SettingPrices(variants=variants, fastest=fastest, leanest=leanest, key=(tp, sp, mbs, tuple(variants)),
                         repeats=repeats, block=_most_repeated(leanest, repeats),
                         sums=_sums(fastest, leanest, repeats, tables), bottlenecks={},
                         least_s=tuple(map(least.__getitem__, member)))


def _equal_rows(a: Sequence[LayerCost], b: Sequence[LayerCost]) -> bool:
    """``tuple(a) == tuple(b)``, comparing each pair of distinct objects once (a row shares one object per layer
    kind, so a deep model's rows hold a few pairs many times over)."""
    if len(a) != len(b):
        return False
    pairs = dict(zip(zip(map(id, a), map(id, b)), zip(a, b)))  # at C speed; the objects are alive in a and b
    return all(x is y or x == y for x, y in pairs.values())


def _most_repeated(costs: Sequence[LayerCost], repeats: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """(first index, count) of the layer of ``costs`` repeated most by value (``repeats``: a finer grouping)."""
    head: dict[LayerCost, int] = {}
    counts: Counter[int] = Counter()
    for i, n in repeats:
        counts[head.setdefault(costs[i], i)] += n
    return max(sorted(counts.items()), key=operator.itemgetter(1))


def _distinct(tables: Sequence[Sequence[object]]) -> tuple[tuple[tuple[int, int], ...], list[int]]:
    """Layers equal by value in every one of ``tables`` (per-layer values, one table per policy): (first index,
    count) of each distinct layer in order of first appearance, and for each layer the first index of its equals.

    Rows share one object per layer kind, and a model repeats its blocks back to back, so layers are grouped into
    runs of the same objects first (at C speed) and the runs' representatives then by value: the same result as
    grouping every layer by value.
    """
    keys = map(id, tables[0]) if len(tables) == 1 else zip(*(map(id, t) for t in tables))
    head: dict[object, int] = {}  # value → first index of its equals
    counts: Counter[int] = Counter()
    member: list[int] = []
    for _, run in itertools.groupby(keys):
        i, n = len(member), len(list(run))
        first = head.setdefault(tuple(t[i] for t in tables), i)
        counts[first] += n
        member += [first] * n
    return tuple((i, counts[i]) for i in sorted(counts)), member


def memory_bound(*, dp: int, pp: int, m: int, sums: Sums, formulas: Formulas, activations: bool = True) -> float:
    """Smallest possible peak per GPU of a (dp, pp) group: ZeRO-3 states and one micro-batch of the leanest
    policy (unless not ``activations``), spread over pp."""
    zero = 3 if dp > 1 else 0
    states = sum(formulas.model_state_bytes(sums.leanest_params, zero_stage=zero, dp=dp, num_micro_batches=m,
                                            pipelined=pp > 1))
    return (states + (sums.leanest_acts if activations else 0.0)) / pp


def _state_bytes(num_params: float, layout: Layout, formulas: Formulas) -> float:
    """Model-state bytes per GPU of ``num_params`` under ``layout``, as the stage DP counts each layer's
    (``evaluate._stage_costs``: gradients accumulated over the micro-batches, or under a pipeline)."""
    return sum(formulas.model_state_bytes(num_params, zero_stage=layout.zero_stage, dp=layout.dp,
                                          num_micro_batches=layout.num_micro_batches, pipelined=layout.pp > 1))


class Footprint(NamedTuple):
    """Memory terms of a layout that do not depend on the stage partition or the recompute policy."""

    states: float
    """Model-state bytes of the whole model on one (tp, dp) slice, summed over pipeline ranks."""
    fixed: float
    """Communication buffers, pipeline receive buffers and runtime reservation per GPU (before headroom)."""
    k: list[int]
    """Per pipeline rank, the fewest micro-batches in flight on any of its chunks."""


def footprint(layout: Layout, sums: Sums, formulas: Formulas) -> Footprint:
    """Computed once per layout for both bounds (parameters do not depend on the recompute policy)."""
    states = _state_bytes(sums.leanest_params, layout, formulas)
    fixed = formulas.buffer_bytes(largest_layer_params=sums.largest_params, zero_stage=layout.zero_stage,
                                  dp=layout.dp, pipelined=layout.pp > 1)  # as evaluate_layout: never above it
    fixed += recv_reserve(pp=layout.pp, virtual_stages=layout.virtual_stages,  # as the stage DP's budget does
                          num_micro_batches=layout.num_micro_batches, widest_boundary=sums.widest_boundary,
                          formulas=formulas)
    in_flight = in_flight_per_stage(layout.schedule, pp=layout.pp, num_micro_batches=layout.num_micro_batches,
                                    virtual_stages=layout.virtual_stages)
    # chunk j runs on rank j mod pp: row c of the (v, pp) reshape holds the ranks' c-th chunks
    k = np.asarray(in_flight).reshape(layout.virtual_stages, layout.pp).min(axis=0).tolist()
    return Footprint(states=states, fixed=fixed, k=k)


def layout_bound(layout: Layout, prices: SettingPrices, formulas: Formulas, foot: Footprint | None,
                 ranks: bool = False, chunks: bool = False, overlap: bool = True, gpus_per_node: int = 0) -> float:
    """Lower bound on a layout's step time, valid for every stage partition and policy per stage.

    With S = pp·v stages the pipeline takes ``alpha · max_j t_j + beta · Σ_j t_j`` (``schedule_weights``),
    where Σ is at least the fastest policy's total plus the recomputation memory forces
    (``_forced_recompute_s``) and ``max_j t_j`` at least Σ / S and, as some stage holds ⌈n/S⌉ of any n
    equal layers, ⌈n/S⌉ times such a layer's fastest time;
    the optimizer update of the most loaded rank takes at least that of an even share of the parameters,
    and the slowest rank's exposed data-parallel time is at least ``_dp_floor_s`` (``overlap`` and
    ``gpus_per_node`` as ``evaluate_layout`` is given them; without ``gpus_per_node`` only FSDP2's copy
    kernels count).
    Without ``foot`` the forced recomputation and the data-parallel term are left out (a weaker, cheaper
    bound that needs no memory terms);
    with ``ranks`` a rank's chunks take at least 1/v of the time ``rank_bottleneck_s`` finds
    for the most repeated layer over ranks that hold different numbers of micro-batches (valid for
    layouts that fit, the only ones the ranking keeps). With ``chunks`` (for a layout whose time-optimal
    partition does not fit: ``evaluate.fastest_partition_fits``) the stage DP holds each chunk to 1/v
    of its rank's budget, so ``max_j t_j`` is at least what ``rank_bottleneck_s`` finds over the chunks.
    """
    total = prices.sums.fastest_s + (0.0 if foot is None else _forced_recompute_s(layout, prices, formulas, foot))
    m, pp, v = layout.num_micro_batches, layout.pp, layout.virtual_stages
    alpha, beta = schedule_weights(layout.schedule, num_micro_batches=m, virtual_stages=v)
    bottleneck = max(_even_bottleneck_s(total, pp * v, prices.sums.runs), _partition_bottleneck_s(prices, pp * v))
    if ranks and foot is not None and pp > 1:
        bottleneck = max(bottleneck, _rank_bottleneck_s(layout, prices, formulas, foot) / v)
    if chunks and foot is not None:
        bottleneck = max(bottleneck, _chunk_bottleneck_s(layout, prices, formulas, foot))
    step = alpha * bottleneck + beta * total + _optimizer_s(layout.zero_stage, layout.dp, pp, prices.sums, formulas)
    return step + (0.0 if foot is None else _dp_floor_s(layout, prices.sums, formulas, overlap, gpus_per_node))


def _even_bottleneck_s(total_s: float, stages: int, runs: tuple[tuple[int, float], ...]) -> float:
    """Least ``max_j t_j`` over ``stages`` stages: the mean, and ⌈n/S⌉ of any n equal layers (pigeonhole)."""
    return max(total_s / stages, *(-(-n // stages) * work for n, work in runs))


def _partition_bottleneck_s(prices: SettingPrices, stages: int) -> float:
    """``least_bottleneck_s`` of the setting's least per-layer times over ``stages`` stages (memoised)."""
    if stages not in prices.bottlenecks:
        if "runs" not in prices.bottlenecks:
            prices.bottlenecks["runs"] = runs_of(prices.least_s)
        prices.bottlenecks[stages] = least_bottleneck_s(prices.least_s, stages, prices.bottlenecks["runs"])
    return prices.bottlenecks[stages]


def _optimizer_s(zero_stage: int, dp: int, pp: int, sums: Sums, formulas: Formulas) -> float:
    """The most loaded rank's optimizer step: at least that of an even share of the parameters it owns."""
    return formulas.optimizer_step_time(sums.fastest_params / pp / (dp if zero_stage >= 1 else 1))


def pipeline_weights(pipelines: Sequence[tuple[Schedule, int]], m: int) -> tuple[tuple[float, float, int], ...]:
    """(alpha, beta, virtual stages) of each (schedule, virtual stages) with ``m`` micro-batches."""
    return tuple((*schedule_weights(schedule, num_micro_batches=m, virtual_stages=v), v) for schedule, v in pipelines)


def pipeline_floor_s(weights: Sequence[tuple[float, float, int]], pp: int, sums: Sums) -> float:
    """Least pipeline term of ``layout_bound`` without memory terms over ``weights`` (+inf when empty)."""
    total = sums.fastest_s
    return min((alpha * _even_bottleneck_s(total, pp * v, sums.runs) + beta * total for alpha, beta, v in weights),
               default=math.inf)


def group_bound(*, tp: int, sp: bool, mbs: int, pp: int, dp: int, m: int, pipeline_s: float, zeros: Sequence[int],
                sums: Sums, formulas: Formulas, dp_floor: bool = False, overlap: bool = True,
                gpus_per_node: int = 0) -> float:
    """Least ``layout_bound`` over a group's layouts, with or without ``_dp_floor_s``.

    The layouts are every ZeRO stage in ``zeros`` × (schedule, virtual stages) of one (tp, sp,
    micro-batch, pp, dp) with ``m`` micro-batches, whose least pipeline term is ``pipeline_s``
    (``pipeline_floor_s``). The pipeline term depends on the second choice only, the optimizer step
    and the data-parallel floor on the first, so the least sum is ``pipeline_s`` plus the least of the
    rest. With ``dp_floor``, ``sums.slowest_*`` must bound every policy's compute from above
    (``recompute_ceiling``): compute hides communication, so more of it lowers the floor.
    """
    if not dp_floor:  # the optimizer step reads only whether the stage is at least 1
        return pipeline_s + min(_optimizer_s(z, dp, pp, sums, formulas) for z in {min(z, 1) for z in zeros})
    rest = math.inf
    for z in set(zeros):
        layout = Layout(dp=dp, tp=tp, pp=pp, micro_batch_size=mbs, num_micro_batches=m, zero_stage=z,
                        recompute=Recompute.NONE, sequence_parallel=sp, schedule=Schedule.ONE_F_ONE_B)
        rest = min(rest, _optimizer_s(z, dp, pp, sums, formulas)  # the floor reads neither schedule nor policy
                   + _dp_floor_s(layout, sums, formulas, overlap, gpus_per_node))
    return pipeline_s + rest


def group_rank_floor_s(prices: SettingPrices, *, pp: int, dp: int, m: int, zeros: Sequence[int],
                       pipelines: tuple[tuple[Schedule, int], ...], formulas: Formulas) -> float:
    """Least pipeline term of ``layout_bound`` with ``ranks`` over a (tp, sp, micro-batch, pp, dp) group's layouts
    (every ZeRO stage in ``zeros`` × (schedule, virtual stages) in ``pipelines``, ``m`` micro-batches).

    ``rank_bottleneck_s`` only grows with the block's model states and with each rank's micro-batches in flight,
    and only shrinks with the budget, so one call bounds every layout's: at the fewest state bytes over the ZeRO
    stages, the least reserved bytes (ZeRO stage and the fewest chunks' receive buffers) and, per rank, the fewest
    micro-batches in flight over the schedules. Memoised in ``prices.bottlenecks``; +inf when no layout fits.
    """
    if pp == 1 or not pipelines:
        return -math.inf  # ``layout_bound`` keeps ranks apart only under a pipeline
    index, _, _ = _repeated_layer(prices)
    static = min(sum(formulas.model_state_bytes(prices.fastest[index].param_count, zero_stage=z, dp=dp,
                                                num_micro_batches=m, pipelined=True)) for z in zeros)
    fixed = min(formulas.buffer_bytes(largest_layer_params=prices.sums.largest_params, zero_stage=z, dp=dp,
                                      pipelined=True) for z in zeros) + \
        recv_reserve(pp=pp, virtual_stages=min(v for _, v in pipelines), num_micro_batches=m,
                     widest_boundary=prices.sums.widest_boundary, formulas=formulas)
    rank_s = _memo_rank_bottleneck_s(prices, static_bytes=static, in_flight=fewest_in_flight(pipelines, pp, m),
                                     budget_bytes=tensor_budget_bytes(formulas.gpu_mem_bytes, fixed_bytes=fixed))
    total = prices.sums.fastest_s
    return min(alpha * max(_even_bottleneck_s(total, pp * v, prices.sums.runs), rank_s / v) + beta * total
               for alpha, beta, v in pipeline_weights(pipelines, m))


@functools.lru_cache(maxsize=4096)
def fewest_in_flight(pipelines: tuple[tuple[Schedule, int], ...], pp: int, m: int) -> tuple[int, ...]:
    """Per pipeline rank, the fewest micro-batches in flight on any of its chunks under any of ``pipelines``
    ((schedule, virtual stages) pairs; ``Footprint.k`` of each)."""
    return tuple(np.min([np.asarray(in_flight_per_stage(schedule, pp=pp, num_micro_batches=m, virtual_stages=v))
                         .reshape(v, pp).min(axis=0) for schedule, v in pipelines], axis=0).tolist())


def recompute_ceiling(sums: Sums) -> Sums:
    """``sums`` of the ``NONE`` policy alone, with the slowest-policy totals raised to what any policy can take.

    The cost model adds at most the forward again to a layer's backward under any recomputation
    policy (``compute.estimate_layer_time``: ``recompute_s`` is 0, the attention core's forward or the
    whole forward; ``pricing._tp_comm`` repeats the forward's TP collectives under full recomputation;
    the forward itself is the same), so a policy's forward + backward is at most 2·forward + backward
    of ``NONE`` and its backward at most forward + backward of ``NONE``. ``group_bound`` reads these
    totals as an upper bound on the compute that hides communication: with them it stays a lower bound
    before the other policies are priced. ``test_search.py`` checks the premise on the cost model.
    """
    return sums._replace(slowest_s=sums.fastest_s + sums.fastest_forward_s, slowest_backward_s=sums.fastest_s)


def _dp_floor_s(layout: Layout, sums: Sums, formulas: Formulas, overlap: bool, gpus_per_node: int) -> float:
    """At least the exposed data-parallel time of the slowest rank (``evaluate._dp_comm``).

    A rank's term grows with its parameters and FSDP edge units and shrinks with the compute it hides
    behind. With one pipeline rank those are known (compute at most the slowest policies'). Over several,
    the term is convex in them when each collective in it is affine in its bytes (ring all-gather and
    reduce-scatter with every rank's buffers non-empty; ZeRO 0's all-reduce takes the faster of ring and
    tree, which is not), so the slowest rank's is at least that of the ranks' mean (Jensen): an even share
    of the parameters and of the root units (first blocks left out), the slowest compute spread evenly.
    Otherwise: FSDP2's copy kernels of an even share of the parameters (linear in them).
    """
    if layout.dp == 1:
        return 0.0
    pp = layout.pp
    convex = layout.zero_stage >= 1 and sums.every_layer_has_params
    if gpus_per_node and (pp == 1 or convex):
        edge = sums.root_params + (sums.first_block_params if pp == 1 else 0.0)
        return dp_comm_s(layout, sums.fastest_params / pp, layout.num_micro_batches * sums.slowest_s / pp,
                         sums.slowest_backward_s / pp, formulas, gpus_per_node=gpus_per_node, overlap=overlap,
                         edge_params=edge / pp)
    share = sums.fastest_params / pp
    gathers = fsdp_gathers_per_step(layout.zero_stage, layout.num_micro_batches)
    return sum(formulas.fsdp_copy_time(share, gathers_per_step=gathers))


def _repeated_layer(prices: SettingPrices) -> tuple[int, int, list[tuple[float, float]]]:
    """The most repeated layer (equal under every policy): its first index, its count and (activation bytes,
    forward + backward seconds) per policy: what the bottleneck solvers take."""
    index, count = max(prices.repeats, key=lambda ic: ic[1])
    policies = [(t[index].activation_bytes, t[index].forward_s + t[index].backward_s)
                for t in prices.variants.values()]
    return index, count, policies


def _memo_rank_bottleneck_s(prices: SettingPrices, *, static_bytes: float, in_flight: Sequence[int],
                            budget_bytes: float) -> float:
    """``rank_bottleneck_s`` of the most repeated layer with these states per block, in-flight counts and budget,
    memoised in ``prices.bottlenecks`` (layouts and groups of a setting share it when those agree)."""
    key = ("ranks", static_bytes, tuple(in_flight), budget_bytes)
    if key not in prices.bottlenecks:
        _, count, policies = _repeated_layer(prices)
        prices.bottlenecks[key] = rank_bottleneck_s(count=count, static_bytes=static_bytes, policies=policies,
                                                    in_flight=in_flight, budget_bytes=budget_bytes)
    return prices.bottlenecks[key]


def _rank_bottleneck_s(layout: Layout, prices: SettingPrices, formulas: Formulas, foot: Footprint) -> float:
    """``rank_bottleneck_s`` for the most repeated layer of the layout (``_memo_rank_bottleneck_s``)."""
    index, _, _ = _repeated_layer(prices)
    return _memo_rank_bottleneck_s(prices, static_bytes=_state_bytes(prices.fastest[index].param_count, layout,
                                                                     formulas),
                                   in_flight=foot.k, budget_bytes=tensor_budget_bytes(formulas.gpu_mem_bytes,
                                                                                      fixed_bytes=foot.fixed))


def _chunk_bottleneck_s(layout: Layout, prices: SettingPrices, formulas: Formulas, foot: Footprint) -> float:
    """``chunk_bottleneck_s`` for the most repeated layer over the S = pp·v chunks, each held to 1/v of its
    rank's budget with its own in-flight count (the memory-constrained DP's rule, ``solve_stage_policies``).

    The model's first layer is on the first chunk and its last on the last (the partition is contiguous):
    unless they are repeated layers, they are pinned there, at their least time and their states plus their
    least activations.
    """
    index, count, policies = _repeated_layer(prices)
    static = _state_bytes(prices.fastest[index].param_count, layout, formulas)
    v = layout.virtual_stages
    in_flight = in_flight_per_stage(layout.schedule, pp=layout.pp, num_micro_batches=layout.num_micro_batches,
                                    virtual_stages=v)
    budget = tensor_budget_bytes(formulas.gpu_mem_bytes, fixed_bytes=foot.fixed) / v
    tables = list(prices.variants.values())
    pinned = [[0.0, 0.0] for _ in in_flight]
    for layer, stage in ((0, 0), (len(prices.fastest) - 1, len(in_flight) - 1)):
        if all(t[layer] == t[index] for t in tables):
            continue  # a repeated layer: ``count`` has it
        pinned[stage][0] += _state_bytes(prices.fastest[layer].param_count, layout, formulas) + \
            in_flight[stage] * min(t[layer].activation_bytes for t in tables)
        pinned[stage][1] += prices.least_s[layer]
    key = ("chunks", static, tuple(in_flight), budget, tuple(map(tuple, pinned)))
    if key not in prices.bottlenecks:
        prices.bottlenecks[key] = chunk_bottleneck_s(count=count, static_bytes=static, policies=policies,
                                                     in_flight=in_flight, budget_bytes=budget,
                                                     pinned=[tuple(p) for p in pinned])
    return prices.bottlenecks[key]


def _forced_recompute_s(layout: Layout, prices: SettingPrices, formulas: Formulas, foot: Footprint) -> float:
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
    budget = layout.pp * tensor_budget_bytes(formulas.gpu_mem_bytes, fixed_bytes=foot.fixed)
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


def layout_memory_bound(layout: Layout, prices: SettingPrices, formulas: Formulas, foot: Footprint) -> float:
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
                 _repeated_block_bound(layout, prices, formulas, k))
    return with_headroom(spread + fixed)


def _repeated_block_bound(layout: Layout, prices: SettingPrices, formulas: Formulas, k: list[int]) -> float:
    """Bound from the most repeated layer alone (identical costs; the other layers only add memory).

    N blocks of states s and activations a, n_r of them on rank r: ``max_r n_r·(s + k_r·a)`` over real
    n_r ≥ 0 summing to N is smallest when every term is equal, at ``N / Σ_r 1/(s + k_r·a)``.
    """
    index, n = prices.block
    block = prices.leanest[index]
    s = _state_bytes(block.param_count, layout, formulas)
    return n / sum(1.0 / (s + kr * block.activation_bytes) for kr in k)
