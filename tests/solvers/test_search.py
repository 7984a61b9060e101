"""Outer search: branch and bound equals exhaustive pricing; pins; known answers; infeasibility."""

from __future__ import annotations

import dataclasses

import pytest

from autopar.errors import InfeasiblePlanError, PlanValidationError
from autopar.plan import Recompute, Schedule
from autopar.solvers.evaluate import evaluate_layout
from autopar.solvers.bounds import setting_prices
from autopar.solvers.costs import Formulas
from autopar.solvers.search import _groups, _layouts, require_plans, search
from autopar.solvers.space import ModelShape, build_space

from .synthetic import SyntheticPricing

SHAPE = ModelShape(num_layers=10, num_heads=16)


def _space(pricing, gpus=16, batch=32, **pins):
    return build_space(dataclasses.replace(SHAPE, num_layers=pricing.num_layers), num_gpus=gpus, gpus_per_node=8,
                       global_batch_size=batch, constraints=pins or None)


def _run(space, pricing, **kw):
    return search(space, pricing.prices(space), **kw)


def _exhaustive(space, pricing):
    """Every layout the search may consider, all priced; the fastest that fits."""
    best = None
    table = pricing.prices(space)
    for group in _groups(space, table.layers):
        setting = group.setting
        prices = setting_prices(table.layers, space.recompute, *setting)
        for layout in _layouts(group, space, len(prices.fastest)):
            ev = evaluate_layout(layout, prices.variants, Formulas.of(table), gpus_per_node=space.gpus_per_node)
            if ev.fits and (best is None or ev.step_time_s < best.step_time_s):
                best = ev
    return best


@pytest.mark.parametrize("kw", [dict(), dict(mem=6e9), dict(hidden=4096, mem=40e9), dict(inter_bw=1e9, blocks=12),
                                dict(mem=3e9, hidden=2048)])
def test_branch_and_bound_matches_exhaustive(kw):
    pricing = SyntheticPricing(**kw)
    space = _space(pricing)
    result = _run(space, pricing, top_k=1)
    best = _exhaustive(space, pricing)
    assert best is not None and result.ranked
    assert result.ranked[0].step_time_s == pytest.approx(best.step_time_s, rel=1e-12)
    assert result.candidates_priced <= sum(1 for _ in _groups(space, pricing.prices(space).layers)) * 12


@pytest.mark.parametrize(("kw", "overlap", "memory_bound"), [(dict(inter_bw=1e9, blocks=12, mem=8e9), True, False),
                                                             (dict(hidden=4096, mem=40e9), False, False),
                                                             (dict(hidden=2048, mem=6e9, blocks=24), True, True)])
def test_every_layout_bound_is_below_its_price(kw, overlap, memory_bound):
    """Each bound the search prunes with, at every level, is at most the layout's evaluated step (when it fits):
    the data-parallel floor (convex over pipeline ranks) and FSDP's copies included, and the chunk bound where
    the time-optimal partition does not fit. So are the bounds its group is visited by (every GPU busy; + bubble
    and optimizer step; + the data-parallel floor, read off the ``NONE`` prices alone with the compute raised to
    ``recompute_ceiling``; + the ranks kept apart), for every layout of the group."""
    from autopar.solvers.bounds import footprint, layout_bound
    from autopar.solvers.evaluate import fastest_partition_fits
    from autopar.solvers.search import _bound_sums, _State

    pricing = SyntheticPricing(**kw)
    space = _space(pricing, gpus=16, batch=32)
    table = pricing.prices(space)
    formulas = Formulas.of(table)
    sums = _bound_sums(space, table.layers)
    state = _State(space=space, formulas=formulas, groups=[], top_k=1, overlap=overlap,
                   num_layers=table.layers.num_layers)
    checked = tighter = ranked = chunked = 0
    for group in _groups(space, table.layers):
        setting = group.setting
        prices = setting_prices(table.layers, space.recompute, *setting)
        state.settings[setting] = prices
        levels = (group.time_bound_s, state.group_bound(group, sums[setting], dp_floor=False),
                  state.group_bound(group, sums[setting], dp_floor=True),
                  state.group_bound(group, sums[setting], dp_floor=True, ranks=True))
        assert all(low <= high * (1 + 1e-12) for low, high in zip(levels, levels[1:])), levels
        tighter += levels[2] > levels[1] * 1.01
        ranked += levels[3] > levels[2] * 1.01
        for layout in _layouts(group, space, len(prices.fastest)):
            ev = evaluate_layout(layout, prices.variants, formulas, gpus_per_node=space.gpus_per_node,
                                 overlap_grad_reduce=overlap)
            if not ev.fits:
                continue
            assert levels[3] <= ev.step_time_s * (1 + 1e-9), (layout.describe(), levels, ev.step_time_s)
            foot = footprint(layout, prices.sums, formulas)
            kinds = [dict(), dict(ranks=True)]
            if not fastest_partition_fits(layout, prices.variants, formulas, gpus_per_node=space.gpus_per_node,
                                          partition_cache={}, costs_key=prices.key):
                kinds += [dict(chunks=True), dict(ranks=True, chunks=True)]
                chunked += 1
            for level in kinds:
                bound = layout_bound(layout, prices, formulas, foot, overlap=overlap,
                                     gpus_per_node=space.gpus_per_node, **level)
                assert bound <= ev.step_time_s * (1 + 1e-9), (layout.describe(), level, bound, ev.step_time_s)
            checked += layout.dp > 1
    # data-parallel layouts and groups, where the floor is not zero; groups whose ranks memory holds back
    assert checked > 20 and tighter > 10 and (ranked > 0) == memory_bound, (checked, tighter, ranked, chunked)


def test_top_k_is_sorted_and_distinct():
    pricing = SyntheticPricing(mem=8e9)
    result = _run(_space(pricing), pricing, top_k=5)
    times = [ev.step_time_s for ev in result.ranked]
    assert len(times) == 5 and times == sorted(times)
    assert len({ev.layout for ev in result.ranked}) == 5


def test_small_model_gets_pure_data_parallelism():
    pricing = SyntheticPricing(hidden=512, blocks=4, mem=80e9)
    best = _run(_space(pricing, gpus=8, batch=64), pricing).ranked[0]
    assert (best.layout.dp, best.layout.tp, best.layout.pp) == (8, 1, 1)


def test_big_model_is_split():
    pricing = SyntheticPricing(hidden=8192, blocks=16, mem=40e9)
    best = _run(_space(pricing, gpus=16, batch=16), pricing).ranked[0]
    assert best.layout.tp * best.layout.pp > 1 or best.layout.zero_stage == 3
    assert best.fits


def test_faster_fabric_never_slower():
    times = []
    for bw in (1e9, 5e9, 25e9, 100e9):
        pricing = SyntheticPricing(hidden=2048, blocks=8, mem=20e9, inter_bw=bw)
        times.append(_run(_space(pricing, gpus=32, batch=64), pricing).ranked[0].step_time_s)
    assert all(a >= b for a, b in zip(times, times[1:]))


def test_num_gpus_pin_fixes_the_world_size():
    pricing = SyntheticPricing(hidden=512, blocks=4, mem=80e9)
    best = _run(_space(pricing, gpus=16, batch=64, num_gpus=4), pricing).ranked[0]
    assert best.layout.num_gpus == 4
    with pytest.raises(PlanValidationError, match="more than the cluster"):
        _space(pricing, gpus=16, num_gpus=32)


def test_one_f_one_b_needs_pp_micro_batches():
    pricing = SyntheticPricing()
    for ev in _run(_space(pricing, gpus=16, batch=4, pp=4), pricing, top_k=5).ranked:
        if ev.layout.num_micro_batches < 4:
            assert ev.layout.schedule is not Schedule.ONE_F_ONE_B


def test_pins_are_respected():
    pricing = SyntheticPricing()
    best = _run(_space(pricing, tp=2, pp=2, schedule="gpipe", recompute="full"), pricing).ranked[0]
    lay = best.layout
    assert (lay.tp, lay.pp, lay.schedule, lay.recompute) == (2, 2, Schedule.GPIPE, Recompute.FULL)


@pytest.mark.parametrize("pins,match", [
    (dict(tp=3), "does not divide"),
    (dict(tp=16), "larger than a node"),
    (dict(pp=11), "larger than the model's 10 layers"),
    (dict(dp=4, tp=4, pp=2), "larger than the cluster's 16"),
    (dict(dp=3), "not divisible by dp"),
    (dict(sequence_parallel=True, tp=1), "needs tp > 1"),
    (dict(schedule="interleaved-1f1b", pp=1), "needs pp > 1"),
    (dict(virtual_stages=2, schedule="1f1b"), "needs schedule interleaved"),
    (dict(recompute="sometimes"), "use none, selective or full"),
    (dict(tensor_parallel=2), "unknown constraint"),
])
def test_contradictory_pins_raise(pins, match):
    with pytest.raises(PlanValidationError, match=match):
        _space(SyntheticPricing(), **pins)


def test_tp_divides_grouped_key_value_heads_but_not_a_single_one():
    """GQA's key/value heads bound tp (a head view split unevenly cannot emit); multi-query attention's one
    head does not: the ILP keeps its projection whole or splits its head dim (the MQA rows of the emit matrix)."""
    from autopar.solvers.space import build_space

    def tps(kv: int, **pins) -> tuple[int, ...]:
        return build_space(ModelShape(num_layers=10, num_heads=16, num_kv_heads=kv), num_gpus=8, gpus_per_node=8,
                           global_batch_size=8, constraints=pins).tp

    assert tps(2) == (1, 2)
    assert tps(1) == (1, 2, 4, 8)
    assert tps(1, tp=8) == (8,)
    with pytest.raises(PlanValidationError, match="tp=4 does not divide the model's 2 key/value heads"):
        tps(2, tp=4)


def test_infeasible_reports_memory():
    pricing = SyntheticPricing(hidden=16384, blocks=8, mem=2e9)
    space = _space(pricing, gpus=8, batch=8)
    result = _run(space, pricing)
    assert not result.ranked
    with pytest.raises(InfeasiblePlanError, match=r"needs \d+\.\d GiB per GPU, dominated by"):
        require_plans(result, capacity_bytes=pricing.gpu_mem_bytes, num_gpus=8, smallest_fit="64 GPUs")


def test_recompute_is_chosen_per_stage():
    """Under 1F1B the first stage holds the most micro-batches: it recomputes, later stages need not."""
    # 6 GB: the first stage fits only with full recompute, the last two without any (4.5 GB was the figure
    # before each rank held the emitted program's FSDP2 states under bf16 and the pipeline's 32 receive
    # buffers per direction: 5.25 GB fits none now)
    pricing = SyntheticPricing(hidden=2048, blocks=16, mem=6e9, seq=4096)
    pins = dict(pp=4, tp=2, dp=1, micro_batch_size=1, schedule="1f1b", zero_stage=0)
    mixed = _run(_space(pricing, gpus=8, batch=32, **pins), pricing).ranked[0]
    assert len(set(mixed.stage_recompute)) > 1 and mixed.stage_recompute[0] is Recompute.FULL
    assert mixed.layout.recompute is Recompute.FULL  # the layout names the most recomputing stage's policy
    uniform = _run(_space(pricing, gpus=8, batch=32, recompute="full", **pins), pricing).ranked[0]
    assert set(uniform.stage_recompute) == {Recompute.FULL}
    assert mixed.step_time_s < uniform.step_time_s


def test_the_search_asks_for_the_settings_it_reads_and_matches_the_full_table():
    """Driven lazily (each request priced into a new table), the search equals the search on every setting."""
    from autopar.solvers.costs import LayerCostTable, PriceTable
    from autopar.solvers.search import bound_settings, search_steps

    pricing = SyntheticPricing(mem=6e9)
    space = _space(pricing)
    full = pricing.prices(space)
    table = PriceTable(layers=LayerCostTable.of(full.num_layers, {}), cluster=full.cluster, dtype=full.dtype)
    steps = search_steps(space, table, top_k=3)
    asked = [next(steps)]
    assert asked[0] == bound_settings(space)  # first: one policy per (tp, sp, micro-batch) for the group bounds
    assert {s.recompute for s in asked[0]} == {Recompute.NONE}
    try:
        while True:
            table = table.with_layers(LayerCostTable.of(full.num_layers, {s: full.layers[s] for s in asked[-1]}))
            asked.append(steps.send(table))
    except StopIteration as done:
        lazy = done.value
    seen = [s for batch in asked for s in batch]
    assert len(seen) == len(set(seen))  # never asks for a setting it holds
    assert len(seen) < len(full.layers.rows)  # settings whose groups the bounds prune are never priced
    eager = search(space, full, top_k=3)
    assert [ev.layout for ev in lazy.ranked] == [ev.layout for ev in eager.ranked]
    assert [ev.step_time_s for ev in lazy.ranked] == [ev.step_time_s for ev in eager.ranked]


def test_a_table_is_a_read_only_value_and_search_refuses_a_missing_setting():
    from types import MappingProxyType

    from autopar.solvers.costs import LayerCostTable, LayerSetting, PriceTable

    pricing = SyntheticPricing()
    space = _space(pricing)
    full = pricing.prices(space)
    assert isinstance(full.layers.rows, MappingProxyType)
    with pytest.raises(TypeError):
        full.layers.rows[LayerSetting(1, False, 1, Recompute.NONE)] = ()  # type: ignore[index]
    with pytest.raises(ValueError, match="read-only"):
        LayerCostTable(num_layers=full.num_layers, rows={})
    with pytest.raises(ValueError, match="do not have"):
        LayerCostTable.of(3, {LayerSetting(1, False, 1, Recompute.NONE): ()})
    empty = PriceTable(layers=LayerCostTable.of(full.num_layers, {}), cluster=full.cluster, dtype=full.dtype)
    with pytest.raises(ValueError, match="lacks"):
        search(space, empty)


def test_recomputation_adds_at_most_the_forward_to_backward(tiny_gpt_graph):
    """The premise of ``bounds.recompute_ceiling`` on the cost model itself: under every policy a layer's
    forward is the same and its backward at most ``NONE``'s forward + backward (full recomputation re-runs
    the forward and its TP collectives), so ``NONE``'s prices bound every policy's compute from above."""
    from autopar.cost_models.cluster import Cluster
    from autopar.pricing import LayerPricer
    from autopar.solvers.costs import LayerSetting

    pricer = LayerPricer(tiny_gpt_graph, Cluster.preset("dgx-h100"))
    settings = [(tp, False, mbs) for tp in (1, 2) for mbs in (1, 4)]
    table = pricer.table([LayerSetting(tp, sp, mbs, rc) for tp, sp, mbs in settings for rc in Recompute])
    grew = 0
    for tp, sp, mbs in settings:
        none = table[LayerSetting(tp, sp, mbs, Recompute.NONE)]
        for rc in (Recompute.SELECTIVE, Recompute.FULL):
            for base, cost in zip(none, table[LayerSetting(tp, sp, mbs, rc)]):
                assert cost.forward_s == pytest.approx(base.forward_s, rel=1e-12)
                assert base.backward_s <= cost.backward_s <= (base.backward_s + base.forward_s) * (1 + 1e-12)
                grew += cost.backward_s > base.backward_s * 1.01
    assert grew >= len(settings)  # recomputation does add time (the test is not vacuous)
