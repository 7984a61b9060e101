"""The search runs the cost-model formulas the cost-model tests check (one implementation per formula).

Each test swaps the cost-model function the search imports for a spy and shows that the
evaluation's numbers come from it: if the search kept a private copy of the formula,
the spy would not be called and these tests would fail.
"""

from __future__ import annotations

import dataclasses

import pytest

from autopar.layout import CommBreakdown, Layout, Recompute, Schedule
from autopar.report.explain import explain_choice
from autopar.solvers import evaluate
from autopar.solvers.bounds import setting_prices
from autopar.solvers.space import ModelShape, build_space

from .synthetic import SyntheticPricing

PRICING = SyntheticPricing()
SPACE = build_space(ModelShape(num_layers=PRICING.num_layers, num_heads=16), num_gpus=16, gpus_per_node=8,
                    global_batch_size=32)
TABLE = PRICING.prices(SPACE)


def _layout(**kw: object) -> Layout:
    base = dict(dp=4, tp=2, pp=2, micro_batch_size=2, num_micro_batches=4, zero_stage=1, recompute=Recompute.NONE,
                sequence_parallel=False, schedule=Schedule.ONE_F_ONE_B)
    return Layout(**{**base, **kw})  # type: ignore[arg-type]


def _evaluate(layout: Layout) -> evaluate.Evaluation:
    prices = setting_prices(TABLE.layers, SPACE.recompute, layout.tp, layout.sequence_parallel,
                            layout.micro_batch_size)
    return evaluate.evaluate_layout(layout, prices.variants, PRICING.formulas(), gpus_per_node=8)


def test_step_time_adds_the_exposed_dp_comm_the_cost_model_returns(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, object]] = []

    def spy(**kw: object) -> CommBreakdown:
        calls.append(kw)
        return CommBreakdown(dp_reduce_scatter_s=1000.0, dp_all_gather_s=0.5)

    monkeypatch.setattr(evaluate, "estimate_exposed_dp_comm", spy)
    ev = _evaluate(_layout())
    assert len(calls) == 2 and all(c["zero_stage"] == 1 and c["num_micro_batches"] == 4 for c in calls)
    assert ev.communication.dp_reduce_scatter_s == 1000.0 and ev.communication.dp_all_gather_s == 0.5
    assert ev.step_time_s == pytest.approx(ev.pipeline_time_s + 1000.5 + ev.optimizer_time_s)


def test_rank_memory_is_the_cost_models_breakdown(monkeypatch: pytest.MonkeyPatch) -> None:
    from autopar.cost_models import memory

    seen: list[dict[str, float]] = []

    def spy(**kw: float) -> object:
        seen.append(kw)
        return memory.estimate_rank_memory(**kw)

    monkeypatch.setattr(evaluate, "estimate_rank_memory", spy)
    ev = _evaluate(_layout())
    assert len(seen) == 2  # one per pipeline rank
    for kw, got in zip(seen, ev.memory):
        assert got == memory.estimate_rank_memory(**kw)
        g, live, acts = kw["grads_bytes"], kw["accumulated_grads_bytes"], kw["activation_bytes"]
        peak = max(live + acts + kw["working_bytes"], g + kw["reduce_bytes"], g + kw["optimizer_temp_bytes"])
        assert got.total == pytest.approx(memory.with_headroom(
            kw["params_bytes"] + kw["optimizer_bytes"] + kw["fixed_bytes"] + max(peak, max(live, g) + acts)), abs=8)


def test_breakdown_keeps_tp_dp_and_pp_apart() -> None:
    ev = _evaluate(_layout(zero_stage=0))
    c = ev.communication
    assert c.tp_s > 0 and c.pp_p2p_s > 0  # tp = 2 and pp = 2 on the synthetic model
    assert c.dp_reduce_scatter_s == 0.0  # ZeRO 0 all-reduces; its "all-gather" is replicate's copy-out, once
    assert 0.0 < c.dp_all_gather_s < c.dp_all_reduce_s
    assert ev.step_time_s == pytest.approx(ev.pipeline_time_s + c.dp_all_reduce_s + c.dp_all_gather_s
                                           + ev.optimizer_time_s)
    no_dp = _evaluate(_layout(dp=1, zero_stage=0, num_micro_batches=16))
    assert no_dp.communication.dp_s == 0.0 and no_dp.communication.tp_s > 0


def test_explanation_never_calls_tp_traffic_data_parallel() -> None:
    """Two dp = 1 layouts: no data-parallel line, and the named terms add up to the step-time difference."""
    a = _evaluate(_layout(dp=1, zero_stage=0, num_micro_batches=16))
    b = _evaluate(_layout(dp=1, tp=4, pp=1, zero_stage=0, num_micro_batches=16))
    winner, runner_up = (a, b) if a.step_time_s <= b.step_time_s else (b, a)
    text = "\n".join(explain_choice(winner, runner_up))
    assert "data-parallel" not in text
    assert "TP collectives" in text
    terms = (runner_up.pipeline_time_s - winner.pipeline_time_s) + (runner_up.optimizer_time_s
                                                                       - winner.optimizer_time_s)
    assert terms == pytest.approx(runner_up.step_time_s - winner.step_time_s)
    assert dataclasses.replace(winner.communication, tp_s=0.0).dp_s == 0.0


def test_a_cluster_whose_gradient_reduce_blocks_prices_it_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a rank without streams (``GPUSpec.grad_reduce_overlaps`` false: a CPU) the reduce is not hidden."""
    seen: list[bool] = []

    def spy(**kw: object) -> CommBreakdown:
        seen.append(bool(kw["overlap"]))
        return CommBreakdown()

    monkeypatch.setattr(evaluate, "estimate_exposed_dp_comm", spy)
    formulas = PRICING.formulas()
    cpu = dataclasses.replace(formulas.cluster, gpu=dataclasses.replace(formulas.cluster.gpu,
                                                                        grad_reduce_overlaps=False))
    blocking = type(formulas)(cpu, formulas.dtype, formulas.runtime)
    prices = setting_prices(TABLE.layers, SPACE.recompute, 2, False, 2)
    evaluate.evaluate_layout(_layout(), prices.variants, formulas, gpus_per_node=8)
    evaluate.evaluate_layout(_layout(), prices.variants, blocking, gpus_per_node=8)
    assert seen == [True, True, False, False]  # two pipeline ranks each


def test_each_fsdp_unit_pays_its_own_collective(monkeypatch: pytest.MonkeyPatch) -> None:
    """FSDP2 gathers and reduces every unit (each repeated block, and the stage root) with a collective of its own,
    so a rank's reduction is the sum of its units' collectives, each with its fixed cost: more than one collective
    of the same bytes, which the search's bound (``dp_comm_s``) prices, and so stays below."""
    from autopar.cost_models.comm import Collective, fsdp_units

    seen: list[dict[str, object]] = []

    def spy(**kw: object) -> CommBreakdown:
        seen.append(kw)
        return CommBreakdown()

    monkeypatch.setattr(evaluate, "estimate_exposed_dp_comm", spy)
    layout = _layout(zero_stage=2)
    ev = _evaluate(layout)
    formulas = PRICING.formulas()
    params = [c.param_count for c in next(iter(setting_prices(TABLE.layers, SPACE.recompute, layout.tp, False,
                                                              layout.micro_batch_size).variants.values()))]
    blocks = evaluate.fsdp_blocks(params)
    nodes = evaluate._nodes_spanned(layout.dp, layout.tp, 8)
    width = formulas.grad_bytes_per_param()
    for rank, kw in enumerate(seen):
        layers = list(ev.partition.stage_layers(rank))
        units = fsdp_units([params[i] for i in layers], [blocks[i] for i in layers])
        assert len(units) >= 2
        expected = sum(formulas.collective_time(Collective.REDUCE_SCATTER, u * width, group_size=layout.dp,
                                                nodes_spanned=nodes) for u in units)
        assert kw["grad_reduce_s"] == pytest.approx(expected)
        one = formulas.collective_time(Collective.REDUCE_SCATTER, sum(units) * width, group_size=layout.dp,
                                       nodes_spanned=nodes)
        assert kw["grad_reduce_s"] > one
    monkeypatch.undo()
    prices = setting_prices(TABLE.layers, SPACE.recompute, layout.tp, False, layout.micro_batch_size)
    priced = evaluate.evaluate_layout(layout, prices.variants, formulas, gpus_per_node=8, overlap_grad_reduce=False)
    for rank in range(layout.pp):
        layers = list(priced.partition.stage_layers(rank))
        bound = evaluate.dp_comm_s(layout, sum(params[i] for i in layers), 0.0, 0.0, formulas, gpus_per_node=8,
                                   overlap=False, edge_params=0.0)
        assert bound <= priced.communication.dp_s + 1e-12


def test_fsdp_host_time_is_paid_per_unit_and_micro_batch_where_fsdp_wraps() -> None:
    """``GPUSpec.fsdp_unit_s`` (a CPU rank's FSDP2 hooks) joins the pipeline term: m × units on the busiest rank
    when the stage is wrapped (dp > 1), nothing without data parallelism in fp32 or on a GPU (0)."""
    from autopar.cost_models.comm import fsdp_units

    formulas = PRICING.formulas()
    hooks = type(formulas)(dataclasses.replace(formulas.cluster, gpu=dataclasses.replace(
        formulas.cluster.gpu, fsdp_unit_s=1e-3)), formulas.dtype, formulas.runtime)
    layout = _layout(zero_stage=2)
    prices = setting_prices(TABLE.layers, SPACE.recompute, layout.tp, False, layout.micro_batch_size)
    base = evaluate.evaluate_layout(layout, prices.variants, formulas, gpus_per_node=8)
    with_hooks = evaluate.evaluate_layout(layout, prices.variants, hooks, gpus_per_node=8)
    params = [c.param_count for c in next(iter(prices.variants.values()))]
    blocks = evaluate.fsdp_blocks(params)
    units = max(len(fsdp_units([params[i] for i in base.partition.stage_layers(r)],
                               [blocks[i] for i in base.partition.stage_layers(r)])) for r in range(layout.pp))
    assert with_hooks.partition == base.partition
    assert with_hooks.pipeline_time_s - base.pipeline_time_s == pytest.approx(layout.num_micro_batches * units * 1e-3)
    alone = _layout(dp=1, zero_stage=0, num_micro_batches=16)  # bf16 (the synthetic dtype): FSDP2 applies the policy
    assert evaluate.evaluate_layout(alone, prices.variants, hooks, gpus_per_node=8).pipeline_time_s > \
        evaluate.evaluate_layout(alone, prices.variants, formulas, gpus_per_node=8).pipeline_time_s
    fp32 = [type(f)(f.cluster, "float32", f.runtime) for f in (formulas, hooks)]  # dp 1 in fp32: not wrapped
    assert evaluate.evaluate_layout(alone, prices.variants, fp32[1], gpus_per_node=8).step_time_s == pytest.approx(
        evaluate.evaluate_layout(alone, prices.variants, fp32[0], gpus_per_node=8).step_time_s)


def test_gradient_accumulation_is_a_memory_pass_per_later_micro_batch() -> None:
    """``Formulas.grad_accumulation_time``, closed form at the GPU's achievable bandwidth: autograd's in-place
    ``.grad += g`` (fp32: read 4 + 4, write 4 B per parameter) for each micro-batch after the first; FSDP2's bf16
    gradient cast to its fp32 accumulator once (2 + 4 B) and added into it after (2 + 4 + 4 B); nothing with one
    micro-batch or under Megatron's fused accumulation. The evaluation adds the busiest rank's to the pipeline
    term, and not to the bubble."""
    from autopar.layout import Runtime
    from autopar.solvers.costs import Formulas

    formulas = PRICING.formulas()
    bw = formulas.cluster.gpu.achievable_mem_bytes_per_s
    n = 1e8
    fp32 = Formulas(formulas.cluster, "float32")
    assert fp32.grad_accumulation_time(n, num_micro_batches=4, zero_stage=0, dp=1, pipelined=False) == \
        pytest.approx(3 * 12 * n / bw)
    bf16 = Formulas(formulas.cluster, "bfloat16")
    assert bf16.grad_accumulation_time(n, num_micro_batches=4, zero_stage=3, dp=8, pipelined=True) == \
        pytest.approx((6 + 3 * 10) * n / bw)
    assert bf16.grad_accumulation_time(n, num_micro_batches=1, zero_stage=3, dp=8, pipelined=False) == 0.0
    megatron = Formulas(formulas.cluster, "bfloat16", Runtime.MEGATRON)
    assert megatron.grad_accumulation_time(n, num_micro_batches=8, zero_stage=1, dp=8, pipelined=True) == 0.0

    layout = _layout(zero_stage=2)
    prices = setting_prices(TABLE.layers, SPACE.recompute, layout.tp, False, layout.micro_batch_size)
    own = evaluate.evaluate_layout(layout, prices.variants, formulas, gpus_per_node=8)
    fused = evaluate.evaluate_layout(layout, prices.variants, Formulas(formulas.cluster, formulas.dtype,
                                                                       Runtime.MEGATRON), gpus_per_node=8)
    params = [c.param_count for c in next(iter(prices.variants.values()))]
    busiest = max(formulas.grad_accumulation_time(
        sum(params[i] for i in own.partition.stage_layers(r)), num_micro_batches=layout.num_micro_batches,
        zero_stage=2, dp=layout.dp, pipelined=True) for r in range(layout.pp))
    assert busiest > 0 and own.partition == fused.partition
    pipeline_less_hooks = own.pipeline_time_s - fused.pipeline_time_s  # Megatron: no FSDP2 hooks either (0 here)
    assert pipeline_less_hooks == pytest.approx(busiest)
    assert own.bubble_fraction * own.step_time_s == pytest.approx(fused.bubble_fraction * fused.step_time_s)


def test_ranks_beyond_the_host_cores_take_turns() -> None:
    """``Cluster.host_cores`` (ranks that are threads on a CPU): a node of 8 busy ranks on 2 cores computes at a
    quarter of a core per rank, so the computing part of the step (the step less its communication) takes 4×,
    and the communication comes on top; with a core per rank, or on a GPU cluster (0), the step is unchanged."""
    formulas = PRICING.formulas()

    def with_cores(cores: int) -> object:
        return type(formulas)(dataclasses.replace(formulas.cluster, host_cores=cores), formulas.dtype,
                              formulas.runtime)

    layout = _layout()  # dp 4 × tp 2 × pp 2: 16 ranks, two nodes of 8
    prices = setting_prices(TABLE.layers, SPACE.recompute, layout.tp, False, layout.micro_batch_size)
    base = evaluate.evaluate_layout(layout, prices.variants, formulas, gpus_per_node=8)
    turns = evaluate.evaluate_layout(layout, prices.variants, with_cores(2), gpus_per_node=8)  # type: ignore[arg-type]
    comm = base.communication.tp_s + base.communication.pp_p2p_s + base.communication.dp_s
    assert 0 < comm < base.step_time_s
    assert turns.step_time_s == pytest.approx(4 * (base.step_time_s - comm) + comm)
    assert turns.host_wait_s == pytest.approx(turns.step_time_s - base.step_time_s)
    roomy = evaluate.evaluate_layout(layout, prices.variants, with_cores(8), gpus_per_node=8)  # type: ignore[arg-type]
    assert (roomy.step_time_s, roomy.host_wait_s) == (base.step_time_s, 0.0)
    assert base.host_wait_s == 0.0
