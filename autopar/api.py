"""The public entry points: ``autopar.plan(...)`` and ``autopar.parallelize(...)``."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from autopar.capture import ExampleInputs, capture
from autopar.cost_models.cluster import Cluster
from autopar.goodput import GOODPUT_CANDIDATES, Objective, parse_objective, rank_plans
from autopar.graph.ir import OpGraph
from autopar.plan import Plan
from autopar.pricing import GraphPricing, model_shape
from autopar.solvers.search import require_plans, search
from autopar.solvers.space import build_space

log = logging.getLogger(__name__)

Progress = Callable[[str, float], None]


def plan(model: nn.Module, example_inputs: ExampleInputs, *, cluster: Cluster | str | Path,
         global_batch_size: int, constraints: Mapping[str, Any] | None = None, top_k: int = 1,
         dtype: str = "bfloat16", calibration: Any = None, allow_cross_node_tp: bool = False,
         overlap_grad_reduce: bool = True, progress: Progress | None = None,
         objective: str = "throughput") -> Plan | list[Plan]:
    """Find the fastest plan for ``model`` on ``cluster`` that fits in memory.

    Args:
        model: the module (build big ones under ``torch.device("meta")``).
        example_inputs: per-sample inputs (batch dimension first, any batch size); the planner
            scales the batch to the micro-batch sizes it tries.
        cluster: a ``Cluster``, a preset name (see ``autopar clusters``) or a YAML file.
        global_batch_size: samples per optimizer step.
        constraints: pins on ``Layout`` fields (dp, tp, pp, micro_batch_size, zero_stage, recompute,
            sequence_parallel, schedule, virtual_stages); a fully pinned layout prices a hand-written plan.
        top_k: return the best ``top_k`` plans as a ranked list when > 1.
        dtype: ``"bfloat16"`` (mixed precision with fp32 master weights) or ``"float32"``.
        calibration: a profiled ``CalibrationTable`` for the compute model (see ``autopar profile``).
        allow_cross_node_tp: let tensor-parallel groups span nodes.
        overlap_grad_reduce: model gradient reduction as overlapping the last backward pass.
        progress: called with (phase, fraction done).
        objective: ``"throughput"`` ranks by step time; ``"goodput"`` by expected throughput once
            failures, restarts and checkpoints are paid for (``autopar/goodput.py``). Every plan
            carries its goodput estimate and checkpoint interval in ``Plan.reliability`` either way.

    Returns:
        The best ``Plan``, or a list of ``top_k`` plans, best first.

    Raises:
        CaptureError: the model cannot be captured.
        PlanValidationError: pins contradict each other, the model or the cluster.
        InfeasiblePlanError: nothing fits; says what would.
    """
    report = progress or (lambda phase, done: None)
    report("capture", 0.0)
    graph = capture(model, example_inputs)  # 1. capture the forward pass on meta
    return plan_graph(graph, cluster=cluster, global_batch_size=global_batch_size, constraints=constraints,
                      top_k=top_k, dtype=dtype, calibration=calibration, allow_cross_node_tp=allow_cross_node_tp,
                      overlap_grad_reduce=overlap_grad_reduce, progress=progress, objective=objective)


def plan_graph(graph: OpGraph, *, cluster: Cluster | str | Path, global_batch_size: int,
               constraints: Mapping[str, Any] | None = None, top_k: int = 1, dtype: str = "bfloat16",
               calibration: Any = None, allow_cross_node_tp: bool = False, overlap_grad_reduce: bool = True,
               progress: Progress | None = None, objective: str = "throughput") -> Plan | list[Plan]:
    """``plan`` for an already captured graph (steps 2–5); same arguments and errors."""
    goal = parse_objective(objective)
    report = progress or (lambda phase, done: None)
    resolved = Cluster.resolve(cluster)  # 2. the hardware
    if calibration is not None:  # a table measured on one device kind never prices another
        calibration.require_device(resolved.gpu.name)
    report("price", 0.0)
    pricing = GraphPricing(graph, resolved, dtype=dtype, calibration=calibration)  # 3. cost models

    def solve(on: Cluster, k: int, pricer: GraphPricing) -> Any:
        space = build_space(model_shape(graph), num_gpus=on.num_gpus, gpus_per_node=on.gpus_per_node,
                            global_batch_size=global_batch_size, constraints=constraints,
                            allow_cross_node_tp=allow_cross_node_tp)
        return search(space, pricer, top_k=k, overlap_grad_reduce=overlap_grad_reduce,
                      progress=lambda done: report("search", done))

    report("search", 0.0)
    wanted = top_k + 1 if goal is Objective.THROUGHPUT else max(top_k + 1, GOODPUT_CANDIDATES)
    result = solve(resolved, wanted, pricing)  # 4. solve (one extra: the last plan's runner-up)
    if not result.ranked:
        require_plans(result, capacity_bytes=resolved.gpu.mem_bytes, num_gpus=resolved.num_gpus,
                      smallest_fit=_smallest_fit(resolved, lambda c: solve(c, 1, pricing.for_cluster(c))))
    plans = rank_plans(goal, result.ranked, graph, pricing, cluster=resolved, keep=top_k,  # 5. the plan
                       complete=len(result.ranked) < wanted, dtype=dtype)
    report("done", 1.0)
    return plans if top_k > 1 else plans[0]


def _smallest_fit(cluster: Cluster, solve: Callable[[Cluster], Any]) -> str | None:
    """The fewest nodes of this cluster's kind (doubling, up to 64×) on which some plan fits."""
    for factor in (2, 4, 8, 16, 32, 64):
        bigger = cluster.with_nodes(cluster.nodes * factor)
        if solve(bigger).ranked:
            return f"{bigger.nodes} node(s) of {bigger.gpus_per_node} × {cluster.gpu.name} ({bigger.num_gpus} GPUs)"
    return None


def parallelize(model: nn.Module, example_inputs: ExampleInputs, *, plan: Plan | None = None,
                cluster: Cluster | str | Path | None = None, global_batch_size: int | None = None, seed: int = 0,
                **plan_options: Any) -> Any:
    """Apply a plan to ``model`` inside a ``torchrun`` job (see ``autopar.emit.parallelize``).

    With no ``plan``, rank 0 plans with ``autopar.plan(model, example_inputs, cluster=...,
    global_batch_size=..., **plan_options)`` for this job's world size and every rank
    receives that plan; a planning error reaches every rank with its own class.

    Raises:
        UserInputError: Neither a plan nor a cluster and batch size were given.
        AutoparError: Whatever planning or emission raised (same class on every rank).
    """
    import os

    from autopar.emit.parallelize import parallelize as emit, share_from_rank0
    from autopar.errors import UserInputError

    if plan is None:
        if cluster is None or global_batch_size is None:
            raise UserInputError("parallelize needs either plan= or both cluster= and global_batch_size=")

        def make() -> str:
            import torch.distributed as dist

            world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
            pins = {"num_gpus": world, **(plan_options.pop("constraints", None) or {})}  # fill this job
            made = globals()["plan"](model, example_inputs, cluster=cluster, global_batch_size=global_batch_size,
                                     constraints=pins, **plan_options)
            return (made[0] if isinstance(made, list) else made).to_json()  # a ranking: its best (globals(): the parameter `plan` shadows the function)

        plan = Plan.from_json(share_from_rank0(make))
    return emit(model, example_inputs, plan=plan, seed=seed)
