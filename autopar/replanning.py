"""Re-planning after node failures: the best plan for the surviving cluster, fast.

    new = autopar.replan(plan, lost_nodes=2, graph=graph)            # re-price templates (about a second)
    plan = precompute_contingencies(plan, max_lost_nodes=8, graph=graph)
    new = autopar.replan(plan, lost_nodes=2)                         # a lookup: no model, no solver

Three ways, fastest first:

1. **contingency** — the plan carries plans precomputed for 1 … k lost nodes
   (``Plan.contingencies``, filled by ``precompute_contingencies``; ``autopar plan --contingency k``),
   as Oobleck keeps pipeline templates for N−1 … N−k nodes (Jang et al., SOSP 2023).
2. **templates** — the plan's own layout and its runners-up keep their tensor/pipeline shape,
   micro-batch, ZeRO stage and schedule; only data parallelism shrinks to the GPUs left (keeping
   the global batch whenever a data-parallel size divides it), and a few other pipeline depths
   are tried (``restaged_layouts``). Each gets the stage DP and a full price on the survivors; the
   layer prices are reused (``LayerPricer.for_cluster``). A template whose shape already fits,
   differing only in its ZeRO stage, is skipped. A heuristic: the search may find better.
3. **search** — the full search on the survivors (when no template fits, or ``exhaustive=True``).

The re-planned plan's ``replanned_from`` says what changed and why.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

from autopar.errors import ClusterSpecError, InfeasiblePlanError, PlanValidationError, UserInputError
from autopar.layout import Pins
from autopar.plan import Layout, Plan, Recompute, Schedule
from autopar.replan_record import ReplanRecord

if TYPE_CHECKING:  # the solver side loads on first use: a contingency lookup stays an import of plan.py
    from autopar.cost_models.cluster import Cluster
    from autopar.graph.ir import OpGraph
    from autopar.pricing import LayerPricer
    from autopar.solvers.evaluate import Evaluation

log = logging.getLogger(__name__)

LAYOUT_KNOBS = ("dp", "tp", "pp", "micro_batch_size", "num_micro_batches", "zero_stage", "recompute",
                "sequence_parallel", "schedule", "virtual_stages")
"""Layout fields a re-plan reports when they change."""
RESTAGED_PER_TEMPLATE = 3
"""Other pipeline depths tried per template (``restaged_layouts``): each costs one stage DP (~0.1 s at 70B)."""


def replan(plan: Plan, *, lost_nodes: int, cluster: Cluster | str | Path | None = None, graph: OpGraph | None = None,
           model: Any = None, example_inputs: Any = None, pricing: LayerPricer | None = None,
           templates: Sequence[Layout] = (), exhaustive: bool = False, calibration: Any = None,
           objective: str = "throughput", constraints: Mapping[str, Any] | Pins | None = None) -> Plan:
    """The best plan for ``plan``'s cluster minus ``lost_nodes`` nodes: same model, same global batch if possible.

    Args:
        plan: the plan that was running.
        lost_nodes: nodes that failed (at least 1, fewer than the cluster has).
        cluster: the cluster the plan was made for (default: the preset named in the plan).
        graph, model + example_inputs, pricing: the model, as a captured graph, a module to capture,
            or a ``LayerPricer`` kept from planning (fastest). Not needed when the plan carries a
            contingency for ``lost_nodes``.
        templates: more layouts to try (e.g. the other ranked plans); the plan's own always is.
        exhaustive: run the full search instead of re-pricing templates.
        calibration: the calibration table the plan was made with.
        objective: ``"throughput"`` or ``"goodput"`` (``autopar.goodput``), as for ``autopar.plan``.
        constraints: the pins the plan was made with (``autopar.plan``'s ``constraints``). Those that still
            mean something on fewer GPUs hold for the re-plan; ``dp`` and ``num_gpus``, which the survivors
            decide, do not (``survivor_pins``).

    Raises:
        UserInputError: a bad ``lost_nodes``, or no model was given and the plan has no contingency.
        PlanValidationError: the model is not the one the plan was made for.
        InfeasiblePlanError: nothing fits on the survivors.
    """
    start = time.perf_counter()
    nodes = plan.num_gpus_available // plan.gpus_per_node
    if not 1 <= lost_nodes < nodes:
        raise UserInputError(f"lost_nodes must be between 1 and {nodes - 1} (the plan's cluster has {nodes} nodes), "
                             f"got {lost_nodes}")
    pins = survivor_pins(constraints)
    cached = None if exhaustive else contingency_for(plan, lost_nodes, pins)
    if cached is not None and cached.replanned_from is not None:
        record = dataclasses.replace(cached.replanned_from, method=f"contingency ({cached.replanned_from.method})",
                                     solve_time_s=time.perf_counter() - start)
        return dataclasses.replace(cached, replanned_from=record)
    from autopar.goodput import Objective, parse_objective, plan_goodput, rank_by_goodput
    from autopar.planner import build_plans

    goal = parse_objective(objective)

    full = _resolve_cluster(plan, cluster)
    pricing = _pricing(plan, full, graph=graph, model=model, example_inputs=example_inputs, pricing=pricing,
                       calibration=calibration)
    survivors = full.with_nodes(nodes - lost_nodes)
    on_survivors = pricing.for_cluster(survivors)
    shapes = [plan.layout, *templates, *(c.layout for c in plan.contingencies)]
    ranked, method = ([], "search") if exhaustive else ([ev for ev in _price_templates(
        shapes, plan, on_survivors, survivors) if pins.admits(ev.layout)], "templates")
    if not ranked:
        ranked, method = _search(plan, on_survivors, survivors, pins, many=goal is Objective.GOODPUT), "search"
    if goal is Objective.GOODPUT:  # among layouts that keep the batch (if any do), the best goodput first
        same = [ev for ev in ranked if ev.layout.global_batch_size == plan.layout.global_batch_size] or ranked
        ranked = [ev for ev, _ in rank_by_goodput(same, cluster=survivors, seq_len=plan.seq_len)]
    new = build_plans(ranked, pricing.graph, on_survivors, cluster_name=plan.cluster_name, keep=1,
                      num_gpus=survivors.num_gpus, gpus_per_node=survivors.gpus_per_node, dtype=plan.dtype,
                      sources=on_survivors.sources())[0]
    new = dataclasses.replace(new, model_name=plan.model_name, reliability=plan_goodput(new, survivors))
    record = _record(plan, new, lost_nodes=lost_nodes, method=method, tried=len(shapes),
                     seconds=time.perf_counter() - start)
    log.info("replan: %s → %s in %.3f s (%s)", plan.layout.describe(), new.layout.describe(), record.solve_time_s,
             method)
    return dataclasses.replace(new, replanned_from=record)


def precompute_contingencies(plan: Plan, *, max_lost_nodes: int, cluster: Cluster | str | Path | None = None,
                             graph: OpGraph | None = None, model: Any = None, example_inputs: Any = None,
                             pricing: LayerPricer | None = None, templates: Sequence[Layout] = (),
                             calibration: Any = None, exhaustive: bool = True, objective: str = "throughput",
                             constraints: Mapping[str, Any] | Pins | None = None) -> Plan:
    """``plan`` carrying re-plans for losing 1 … ``max_lost_nodes`` nodes (``Plan.contingencies``).

    Done ahead of any failure, so by default each is a full search on the survivors (``exhaustive``);
    ``exhaustive=False`` re-prices templates instead (seconds rather than minutes for large models).
    ``constraints``: the pins the plan was made with; they hold for every contingency as for ``replan``.
    """
    full = _resolve_cluster(plan, cluster)
    warm = _pricing(plan, full, graph=graph, model=model, example_inputs=example_inputs, pricing=pricing,
                    calibration=calibration)
    nodes = plan.num_gpus_available // plan.gpus_per_node
    base = dataclasses.replace(plan, contingencies=())
    found = []
    for k in range(1, min(max_lost_nodes, nodes - 1) + 1):
        try:
            found.append(replan(base, lost_nodes=k, cluster=full, pricing=warm, templates=templates,
                                exhaustive=exhaustive, objective=objective, constraints=constraints))
        except InfeasiblePlanError as e:
            log.warning("no plan fits after losing %d node(s): %s", k, e)
            break
    return dataclasses.replace(plan, contingencies=tuple(found))


def contingency_for(plan: Plan, lost_nodes: int,
                    constraints: Mapping[str, Any] | Pins | None = None) -> Plan | None:
    """The plan precomputed for losing ``lost_nodes`` nodes, if ``plan`` carries one that keeps ``constraints``
    (those that hold on fewer GPUs, ``survivor_pins``: one precomputed without them is not served under them)."""
    survivors = plan.num_gpus_available - lost_nodes * plan.gpus_per_node
    pins = survivor_pins(constraints)
    return next((c for c in plan.contingencies if c.num_gpus_available == survivors and pins.admits(c.layout)),
                None)


# ---- inputs --------------------------------------------------------------------------------------


def _resolve_cluster(plan: Plan, cluster: Cluster | str | Path | None) -> Cluster:
    from autopar.cost_models.cluster import Cluster

    nodes = plan.num_gpus_available // plan.gpus_per_node
    try:
        resolved = Cluster.resolve(cluster if cluster is not None else plan.cluster_name, nodes=nodes)
    except ClusterSpecError as e:
        raise UserInputError(f"cannot rebuild cluster {plan.cluster_name!r} of the plan ({e}); pass the cluster "
                             f"it was planned for (--cluster)") from e
    if resolved.gpus_per_node != plan.gpus_per_node:
        raise UserInputError(f"cluster {resolved.name!r} has {resolved.gpus_per_node} GPUs per node but the plan "
                             f"was made for {plan.gpus_per_node}")
    return resolved


def _pricing(plan: Plan, cluster: Cluster, *, graph: OpGraph | None, model: Any, example_inputs: Any,
             pricing: LayerPricer | None, calibration: Any) -> LayerPricer:
    from autopar.pricing import LayerPricer

    if pricing is None:
        if graph is None:
            if model is None:
                raise UserInputError(
                    f"the plan has no precomputed contingency for this failure: give the model (autopar replan "
                    f"--model, or graph=/model= in autopar.replan) to re-plan {plan.model_name!r}")
            from autopar.capture import capture

            graph = capture(model, example_inputs)
        pricing = LayerPricer(graph, cluster, dtype=plan.dtype, calibration=calibration, runtime=plan.runtime)
    plan.validate_for(pricing.graph.fingerprint())
    if pricing.dtype != plan.dtype:
        raise PlanValidationError(f"the pricing is for {pricing.dtype} but the plan trains in {plan.dtype}")
    return pricing


# ---- solving -------------------------------------------------------------------------------------


def survivor_layouts(template: Layout, *, num_gpus: int, global_batch_size: int,
                     num_layers: int) -> list[tuple[Layout, bool]]:
    """Layouts that keep ``template``'s shape on ``num_gpus`` GPUs, each with whether it keeps the global batch.

    The largest data-parallel size that divides the batch keeps it (if it uses at least half the
    replicas that fit); the largest that fits, with the batch rounded to a whole number of
    micro-batches, is the fallback.

    Example:
        >>> t = Layout(dp=8, tp=8, pp=4, micro_batch_size=1, num_micro_batches=16, zero_stage=1,
        ...            recompute=Recompute.NONE, sequence_parallel=True, schedule=Schedule.ONE_F_ONE_B)
        >>> [(lay.dp, lay.num_micro_batches, same) for lay, same in survivor_layouts(
        ...     t, num_gpus=248, global_batch_size=128, num_layers=80)]
        [(4, 32, True), (7, 18, False)]
    """
    limit = num_gpus // (template.tp * template.pp)
    mbs = template.micro_batch_size
    same = next((d for d in range(limit, 0, -1) if global_batch_size % (d * mbs) == 0 and 2 * d >= limit), None)
    options = [(same, global_batch_size // (same * mbs), True)] if same is not None else []
    if limit >= 1 and same != limit:
        options.append((limit, max(1, round(global_batch_size / (limit * mbs))), False))
    out = []
    for dp, m, keeps in options:
        layout = _layout_like(template, dp=dp, num_micro_batches=m, num_layers=num_layers)
        if layout is not None:
            out.append((layout, keeps))
    return out


def restaged_layouts(template: Layout, *, num_gpus: int, global_batch_size: int, num_layers: int,
                     keep: int = RESTAGED_PER_TEMPLATE) -> list[Layout]:
    """``template`` with another pipeline depth: the ``keep`` that promise most, keeping the global batch.

    A failure can leave a GPU count that no power-of-two layout fills (1,016 = 8 · 127); a deeper
    or shallower pipeline often fills it better. Each pipeline size pp′ gets the largest data-parallel
    size that divides the batch and fits; they are ordered by the GPUs they keep busy,
    ``dp′ · tp · pp′ · m′ / (m′ + (pp′ − 1) / v) / imbalance`` (1F1B's bubble; ``imbalance`` =
    ⌈L / S⌉ / (L / S) for L layers on S stages, as the fullest stage sets the pace), and the best
    ``keep`` are returned for pricing.

    Example:
        >>> t = Layout(dp=512, tp=2, pp=1, micro_batch_size=1, num_micro_batches=2, zero_stage=3,
        ...            recompute=Recompute.NONE, sequence_parallel=True, schedule=Schedule.ONE_F_ONE_B)
        >>> [(lay.dp, lay.pp) for lay in restaged_layouts(t, num_gpus=1016, global_batch_size=1024, num_layers=83)]
        [(64, 7), (32, 14), (16, 28)]
    """
    mbs, v = template.micro_batch_size, template.virtual_stages
    scored: list[tuple[float, int, Layout]] = []
    for pp in range(1, min(num_layers // v, num_gpus // template.tp) + 1):
        limit = num_gpus // (template.tp * pp)
        dp = next((d for d in range(limit, 0, -1) if global_batch_size % (d * mbs) == 0), None)
        if dp is None or (pp == 1) != (template.pp == 1) and v > 1:
            continue
        m = global_batch_size // (dp * mbs)
        schedule = template.schedule if pp > 1 else Schedule.ONE_F_ONE_B
        shaped = dataclasses.replace(template, pp=pp, schedule=schedule, virtual_stages=v if pp > 1 else 1)
        layout = _layout_like(shaped, dp=dp, num_micro_batches=m, num_layers=num_layers)
        if layout is not None and pp != template.pp:
            stages = pp * layout.virtual_stages
            imbalance = math.ceil(num_layers / stages) * stages / num_layers
            busy = dp * template.tp * pp * m / (m + (pp - 1) / layout.virtual_stages) / imbalance
            scored.append((-busy, pp, layout))
    return [lay for *_, lay in sorted(scored, key=lambda t: t[:2])[:keep]]


def _layout_like(t: Layout, *, dp: int, num_micro_batches: int, num_layers: int) -> Layout | None:
    """``t`` with another dp and micro-batch count, or None where its schedule cannot run them."""
    pp, m = t.pp, num_micro_batches
    if t.schedule is Schedule.ONE_F_ONE_B and pp > 1 and m < pp:
        return None  # 1F1B needs at least pp micro-batches
    if t.schedule is Schedule.INTERLEAVED_1F1B and m % pp:
        return None  # Megatron's interleaving needs micro-batches in multiples of pp
    if pp * t.virtual_stages > num_layers:
        return None
    return dataclasses.replace(t, dp=dp, num_micro_batches=m, zero_stage=t.zero_stage if dp > 1 else 0)


def _variants(pricing: LayerPricer, layout: Layout) -> dict[Recompute, Any]:
    from autopar.solvers.costs import LayerSetting

    table = pricing.table(LayerSetting(layout.tp, layout.sequence_parallel, layout.micro_batch_size, rc)
                          for rc in Recompute)
    variants: dict[Recompute, Any] = {}
    for rc in Recompute:
        costs = table[LayerSetting(layout.tp, layout.sequence_parallel, layout.micro_batch_size, rc)]
        if costs not in variants.values():
            variants[rc] = costs
    return variants


def _price_templates(shapes: Sequence[Layout], plan: Plan, pricing: LayerPricer,
                     survivors: Cluster) -> list[Evaluation]:
    """Fitting evaluations of every template on the survivors, best first (same global batch before others)."""
    from autopar.solvers.costs import Formulas
    from autopar.solvers.evaluate import PartitionCache, evaluate_layout

    formulas = Formulas(survivors, pricing.dtype, pricing.runtime)
    seen: set[Layout] = set()
    cache: PartitionCache = {}
    scored: list[tuple[bool, float, int, Evaluation]] = []
    batch, gpus, layers = plan.layout.global_batch_size, survivors.num_gpus, plan.num_layers
    for shape in shapes:
        options = survivor_layouts(shape, num_gpus=gpus, global_batch_size=batch, num_layers=layers)
        options += [(lay, True) for lay in restaged_layouts(shape, num_gpus=gpus, global_batch_size=batch,
                                                            num_layers=layers)]
        for layout, keeps in options:
            if layout in seen:
                continue
            seen.add(layout)
            variants = _variants(pricing, layout)
            ev = evaluate_layout(layout, variants, formulas, gpus_per_node=survivors.gpus_per_node,
                                 partition_cache=cache, costs_key=(layout.tp, layout.sequence_parallel,
                                                                   layout.micro_batch_size, tuple(variants)))
            if ev.fits:
                tokens = layout.global_batch_size / ev.step_time_s  # throughput in samples/s
                scored.append((not keeps, -tokens, len(scored), ev))
    return [ev for *_, ev in sorted(scored, key=lambda t: t[:3])]


def survivor_pins(constraints: Mapping[str, Any] | Pins | None) -> Pins:
    """The pins of a plan that hold on fewer GPUs: all but ``dp`` and ``num_gpus``, which the survivors decide.

    Example:
        >>> p = survivor_pins({"tp": 8, "dp": 16, "recompute": "full"})
        >>> (p.tp, p.dp, p.recompute.value)
        (8, None, 'full')
    """
    return dataclasses.replace(Pins.from_mapping(constraints), dp=None, num_gpus=None)


def _search(plan: Plan, pricing: LayerPricer, survivors: Cluster, pins: Pins, *, many: bool) -> list[Evaluation]:
    from autopar.pricing import model_shape, run_search
    from autopar.solvers.search import search_steps
    from autopar.cost_models.runtimes import searched_zero_stages
    from autopar.solvers.space import build_space

    space = build_space(model_shape(pricing.graph), num_gpus=survivors.num_gpus,
                        gpus_per_node=survivors.gpus_per_node, global_batch_size=plan.layout.global_batch_size,
                        constraints=pins, zero_stages=searched_zero_stages(pricing.program),
                        schedules=pricing.program.schedules)
    from autopar.goodput import GOODPUT_CANDIDATES

    result = run_search(search_steps(space, pricing.prices(), top_k=GOODPUT_CANDIDATES if many else 2), pricing)
    if not result.ranked:
        words = pins.describe()
        pinned = f" and the pins {words}" if words else ""
        raise InfeasiblePlanError(f"no plan for {plan.model_name} fits on the {survivors.num_gpus} GPUs left "
                                  f"with global batch {plan.layout.global_batch_size}{pinned}")
    return list(result.ranked)


# ---- the record ------------------------------------------------------------------------------------


def _record(old: Plan, new: Plan, *, lost_nodes: int, method: str, tried: int, seconds: float) -> ReplanRecord:
    a, b = old.layout, new.layout
    changes = [f"{name} {_text(getattr(a, name))} → {_text(getattr(b, name))}" for name in LAYOUT_KNOBS
               if getattr(a, name) != getattr(b, name)]
    reasons = [f"{lost_nodes} node(s) lost: {old.num_gpus_available} → {new.num_gpus_available} GPUs; the old "
               f"layout used {a.num_gpus}" + (" and no longer fits" if a.num_gpus > new.num_gpus_available
                                               else " and still fits")]
    if b.global_batch_size == a.global_batch_size:
        reasons.append(f"global batch {a.global_batch_size} kept as dp {b.dp} × micro-batch {b.micro_batch_size} × "
                       f"{b.num_micro_batches} micro-batches on {b.num_gpus} GPUs")
    else:
        reasons.append(f"no layout that fits divides global batch {a.global_batch_size} over the GPUs left: "
                       f"{b.global_batch_size} is the nearest (scale the learning rate accordingly)")
    old_t, new_t = old.predicted.tokens_per_s, new.predicted.tokens_per_s
    reasons.append(f"throughput {new_t:,.0f} tokens/s ({new_t / old_t - 1:+.1%} vs {old_t:,.0f})"
                   + (f", goodput {new.reliability.goodput_tokens_per_s:,.0f}" if new.reliability else ""))
    reasons.append(f"best of {tried} pipeline template(s) (the plan's layout, its runners-up and contingencies) "
                   "re-priced on the survivors" if method == "templates" else
                   "full search on the survivors (no template fits, or asked for)")
    return ReplanRecord(previous_layout=a.describe(), previous_num_gpus_available=old.num_gpus_available,
                        lost_nodes=lost_nodes, num_gpus_available=new.num_gpus_available,
                        previous_global_batch_size=a.global_batch_size, global_batch_size=b.global_batch_size,
                        changes=tuple(changes), reasons=tuple(reasons), method=method, solve_time_s=seconds)


def _text(value: Any) -> str:
    return str(getattr(value, "value", value))


__all__ = ["LAYOUT_KNOBS", "RESTAGED_PER_TEMPLATE", "contingency_for", "precompute_contingencies", "replan",
           "restaged_layouts", "survivor_layouts", "survivor_pins"]
