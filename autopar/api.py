"""The public entry points: ``autopar.plan(...)``, ``autopar.plan_ranked(...)`` and ``autopar.parallelize(...)``.

Planning reads as five steps, each a function from one value to the next:
1. capture the model into an ``OpGraph`` (``autopar.capture``);
2. resolve the cluster (``Cluster.resolve``);
3. price layer settings with the cost models and the intra-op ILP into frozen tables (``LayerPricer``);
4. search the layouts (``solvers.space.build_space`` and ``solvers.search.search_steps``), which reads
   those tables and asks for the settings it needs priced (``pricing.run_search``);
5. build the ``Plan`` values and their explanations (``planner.build_plans``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from autopar.capture import ExampleInputs, capture
from autopar import goodput
from autopar.cost_models.profiling.calibration import CalibrationTable
from autopar.cost_models.cluster import DTYPE_ALIASES, TRAINING_DTYPES, Cluster
from autopar.cost_models.runtimes import program_of, searched_zero_stages
from autopar.errors import PlanValidationError, UserInputError
from autopar.graph.ir import OpGraph
from autopar.layout import Pins, Runtime
from autopar.plan import Plan
from autopar.pricing import LayerPricer, model_shape, run_search
from autopar.solvers.search import SearchResult, require_plans, search_steps
from autopar.solvers.space import build_space

log = logging.getLogger(__name__)

Progress = Callable[[str, float], None]

@dataclass(frozen=True, slots=True, kw_only=True)
class PlanOptions:
    """What planning needs besides the model and the cluster, checked once when built.

    Build it with ``PlanOptions.from_args`` (which parses pins and dtype spellings); the fields
    hold parsed values only, and ``__post_init__`` raises ``UserInputError`` naming a bad one.
    """

    global_batch_size: int
    """Samples per optimizer step."""
    pins: Pins = field(default_factory=Pins)
    """Layout knobs the user fixed."""
    top_k: int = 1
    """Plans to return, best first."""
    dtype: str | None = None
    """Training precision (one of ``TRAINING_DTYPES``); None: the GPU's best 16-bit type."""
    calibration: CalibrationTable | None = None
    """A profiled table for the compute model (``autopar profile``)."""
    allow_cross_node_tp: bool = False
    """Let tensor-parallel groups span nodes."""
    overlap_grad_reduce: bool = True
    """Model gradient reduction and parameter gathers as overlapping compute."""
    objective: goodput.Objective = goodput.Objective.THROUGHPUT
    """Rank by step time, or by expected goodput once failures and checkpoints are paid for."""
    runtime: Runtime = Runtime.AUTOPAR
    """The training program priced: autopar's emitter (``autopar run``), or Megatron-LM's (``autopar export``)."""

    def __post_init__(self) -> None:
        for name in ("global_batch_size", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserInputError(f"{name} must be a positive integer, got {value!r} ({type(value).__name__})")
        if not isinstance(self.pins, Pins):
            raise UserInputError(f"pins must be a Pins value, got {type(self.pins).__name__}")
        if self.dtype is not None and self.dtype not in TRAINING_DTYPES:
            raise UserInputError(f"dtype {self.dtype!r} is not a training precision autopar prices; use one of "
                                 f"{', '.join(TRAINING_DTYPES)} (or bf16, fp16, fp32), or leave it unset for "
                                 "the GPU's best 16-bit type")
        if self.calibration is not None and not isinstance(self.calibration, CalibrationTable):
            raise UserInputError(f"calibration must be a CalibrationTable (see `autopar profile`), "
                                 f"got {type(self.calibration).__name__}")
        for name in ("allow_cross_node_tp", "overlap_grad_reduce"):
            if not isinstance(getattr(self, name), bool):
                raise UserInputError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.runtime, Runtime):
            raise UserInputError(f"runtime must be a Runtime, got {self.runtime!r}")
        _check_pins_for_runtime(self.pins, self.runtime)

    @classmethod
    def from_args(cls, *, global_batch_size: Any, constraints: Pins | Mapping[str, Any] | None = None,
                  top_k: Any = 1, dtype: Any = None, calibration: Any = None, allow_cross_node_tp: Any = False,
                  overlap_grad_reduce: Any = True, objective: Any = goodput.Objective.THROUGHPUT,
                  runtime: Any = Runtime.AUTOPAR) -> PlanOptions:
        """The options from ``plan``'s keyword arguments: pins parsed, dtype aliases resolved, all checked."""
        if constraints is not None and not isinstance(constraints, (Pins, Mapping)):
            raise UserInputError(f"constraints must be a mapping of pins or a Pins value, "
                                 f"got {type(constraints).__name__}")
        pins = Pins.from_mapping(constraints)  # PlanValidationError names a bad or contradictory pin
        if isinstance(dtype, str):
            dtype = DTYPE_ALIASES.get(dtype, dtype)
        return cls(global_batch_size=global_batch_size, pins=pins, top_k=top_k, dtype=dtype, calibration=calibration,
                   allow_cross_node_tp=allow_cross_node_tp, overlap_grad_reduce=overlap_grad_reduce,
                   objective=goodput.parse_objective(objective), runtime=parse_runtime(runtime))

    def training_dtype(self, cluster: Cluster) -> str:
        """``dtype``, or the cluster's GPU's best 16-bit type when unset."""
        return self.dtype or cluster.gpu.best_training_dtype()


def parse_runtime(runtime: Runtime | str) -> Runtime:
    """``runtime`` as a ``Runtime``; raises ``UserInputError`` naming the choices."""
    try:
        return Runtime(runtime)
    except ValueError:
        raise UserInputError(f"runtime {runtime!r} is not one autopar prices; use one of "
                             f"{', '.join(r.value for r in Runtime)}") from None


def _check_pins_for_runtime(pins: Pins, runtime: Runtime) -> None:
    """Refuse pins the runtime's program does not run (``cost_models/runtimes.py``)."""
    program = program_of(runtime)
    if pins.zero_stage is not None and pins.zero_stage not in program.zero_stages:
        raise PlanValidationError(
            f"zero_stage={pins.zero_stage} is not priced for runtime {runtime.value}: it prices Megatron-LM's DDP "
            f"and distributed optimizer (ZeRO {' and '.join(map(str, program.zero_stages))}), not Megatron-FSDP; "
            f"pin zero_stage=1 (or 0), or plan with runtime autopar")
    if pins.schedule is not None and pins.schedule not in program.schedules:
        raise PlanValidationError(
            f"schedule={pins.schedule.value} is not a schedule runtime {runtime.value} runs; pin one of "
            f"{', '.join(s.value for s in program.schedules)}, or plan with runtime autopar")


def plan(model: nn.Module, example_inputs: ExampleInputs, *, cluster: Cluster | str | Path,
         global_batch_size: int, constraints: Pins | Mapping[str, Any] | None = None, dtype: str | None = None,
         calibration: CalibrationTable | None = None, allow_cross_node_tp: bool = False,
         overlap_grad_reduce: bool = True, progress: Progress | None = None,
         objective: goodput.Objective | str = goodput.Objective.THROUGHPUT,
         runtime: Runtime | str = Runtime.AUTOPAR) -> Plan:
    """Find the fastest plan for ``model`` on ``cluster`` that fits in memory.

    Args:
        model: the module (build big ones under ``torch.device("meta")``).
        example_inputs: per-sample inputs (batch dimension first, any batch size); the planner
            scales the batch to the micro-batch sizes it tries.
        cluster: a ``Cluster``, a preset name (see ``autopar clusters``) or a YAML file.
        global_batch_size: samples per optimizer step.
        constraints: pins on ``Layout`` fields (dp, tp, pp, micro_batch_size, zero_stage, recompute,
            sequence_parallel, schedule, virtual_stages) and num_gpus, as a ``Pins`` or a mapping;
            a fully pinned layout prices a hand-written plan.
        dtype: ``"bfloat16"`` or ``"float16"`` (mixed precision with fp32 master weights) or ``"float32"``;
            default: the GPU's best 16-bit type (bf16, or fp16 on GPUs without bf16 such as V100).
        calibration: a profiled ``CalibrationTable`` for the compute model (see ``autopar profile``).
        allow_cross_node_tp: let tensor-parallel groups span nodes.
        overlap_grad_reduce: model gradient reduction as overlapping the last backward pass.
        progress: called with (phase, fraction done).
        objective: ``"throughput"`` ranks by step time; ``"goodput"`` by expected throughput once
            failures, restarts and checkpoints are paid for (``autopar/goodput.py``). Every plan
            carries its goodput estimate and checkpoint interval in ``Plan.reliability`` either way.
        runtime: the training program to price: ``"autopar"`` (what ``parallelize`` runs) or ``"megatron"``
            (Megatron-LM's program, for ``autopar export --to megatron``; ``cost_models/runtimes.py``).

    Returns:
        The best ``Plan``. ``plan_ranked`` returns the best few.

    Raises:
        UserInputError: an argument of the wrong type or value.
        CaptureError: the model cannot be captured.
        PlanValidationError: pins contradict each other, the model or the cluster.
        InfeasiblePlanError: nothing fits; says what would.
    """
    options = PlanOptions.from_args(global_batch_size=global_batch_size, constraints=constraints, dtype=dtype,
                                    calibration=calibration, allow_cross_node_tp=allow_cross_node_tp,
                                    overlap_grad_reduce=overlap_grad_reduce, objective=objective, runtime=runtime)
    return rank_plans(_capture(model, example_inputs, progress), cluster, options, progress)[0]


def plan_ranked(model: nn.Module, example_inputs: ExampleInputs, *, cluster: Cluster | str | Path,
                global_batch_size: int, top_k: int = 5, constraints: Pins | Mapping[str, Any] | None = None,
                dtype: str | None = None, calibration: CalibrationTable | None = None,
                allow_cross_node_tp: bool = False, overlap_grad_reduce: bool = True,
                progress: Progress | None = None,
                objective: goodput.Objective | str = goodput.Objective.THROUGHPUT,
                runtime: Runtime | str = Runtime.AUTOPAR) -> tuple[Plan, ...]:
    """``plan``, returning the ``top_k`` best plans (fewer when fewer fit), best first."""
    options = PlanOptions.from_args(global_batch_size=global_batch_size, constraints=constraints, top_k=top_k,
                                    dtype=dtype, calibration=calibration, allow_cross_node_tp=allow_cross_node_tp,
                                    overlap_grad_reduce=overlap_grad_reduce, objective=objective, runtime=runtime)
    return rank_plans(_capture(model, example_inputs, progress), cluster, options, progress)


def plan_graph(graph: OpGraph, *, cluster: Cluster | str | Path, progress: Progress | None = None,
               **options: Any) -> Plan:
    """``plan`` for an already captured graph (steps 2–5); ``options`` as ``PlanOptions.from_args`` takes."""
    return rank_plans(graph, cluster, PlanOptions.from_args(**options), progress)[0]


def plan_graph_ranked(graph: OpGraph, *, cluster: Cluster | str | Path, progress: Progress | None = None,
                      **options: Any) -> tuple[Plan, ...]:
    """``plan_ranked`` for an already captured graph."""
    return rank_plans(graph, cluster, PlanOptions.from_args(**options), progress)


def _capture(model: nn.Module, example_inputs: ExampleInputs, progress: Progress | None) -> OpGraph:
    (progress or _silent)("capture", 0.0)
    return capture(model, example_inputs)  # 1. capture the forward pass on meta


def rank_plans(graph: OpGraph, cluster: Cluster | str | Path, options: PlanOptions,
               progress: Progress | None = None) -> tuple[Plan, ...]:
    """Steps 2-5 of planning: the ``options.top_k`` best plans for ``graph``, best first."""
    report = progress or _silent
    resolved = Cluster.resolve(cluster)  # 2. the hardware
    if options.calibration is not None:  # a table measured on one device kind never prices another
        options.calibration.require_device(resolved.gpu.name)
    dtype = options.training_dtype(resolved)
    report("price", 0.0)
    pricing = LayerPricer(graph, resolved, dtype=dtype, calibration=options.calibration,  # 3. cost models
                          runtime=options.runtime)
    report("search", 0.0)
    goal = options.objective
    wanted = options.top_k + 1 if goal is goodput.Objective.THROUGHPUT else max(options.top_k + 1,
                                                                                 goodput.GOODPUT_CANDIDATES)
    result = _search(graph, resolved, pricing, options, wanted, report)  # 4. one extra: the last runner-up
    if not result.ranked:
        require_plans(result, capacity_bytes=resolved.gpu.mem_bytes, num_gpus=resolved.num_gpus,
                      smallest_fit=_smallest_fit(resolved, lambda c: _search(graph, c, pricing.for_cluster(c),
                                                                             options, 1, report)))
    plans = goodput.rank_plans(goal, result.ranked, graph, pricing, cluster=resolved, keep=options.top_k,  # 5.
                               complete=len(result.ranked) < wanted, dtype=dtype)
    report("done", 1.0)
    return tuple(plans)


def _search(graph: OpGraph, cluster: Cluster, pricing: LayerPricer, options: PlanOptions, top_k: int,
            report: Progress) -> SearchResult:
    space = build_space(model_shape(graph), num_gpus=cluster.num_gpus, gpus_per_node=cluster.gpus_per_node,
                        global_batch_size=options.global_batch_size, constraints=options.pins,
                        allow_cross_node_tp=options.allow_cross_node_tp,
                        zero_stages=searched_zero_stages(program_of(options.runtime)),
                        schedules=program_of(options.runtime).schedules)
    steps = search_steps(space, pricing.prices(), top_k=top_k, overlap_grad_reduce=options.overlap_grad_reduce,
                         progress=lambda done: report("search", done))
    return run_search(steps, pricing)  # the search asks for the settings it reads; they are priced as values


def _silent(phase: str, done: float) -> None:
    """The default progress callback: says nothing."""


def _smallest_fit(cluster: Cluster, solve: Callable[[Cluster], SearchResult]) -> str | None:
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
        UserInputError: Neither a plan nor a cluster and batch size were given, or the plan was priced for
            another runtime's program (``Plan.runtime``).
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
            pins = dataclasses.replace(Pins.from_mapping(plan_options.pop("constraints", None)),
                                       num_gpus=world)  # the plan must fill this job
            made = globals()["plan"](model, example_inputs, cluster=cluster, global_batch_size=global_batch_size,
                                     constraints=pins, **plan_options)  # globals(): the parameter `plan` shadows it
            return made.to_json()

        plan = Plan.from_json(share_from_rank0(make))
    if plan.runtime is not Runtime.AUTOPAR:  # its memory was priced for another program than the one emitted
        raise UserInputError(f"this plan was priced for runtime {plan.runtime.value} "
                             f"({plan.predicted.sources.get('runtime', '')}), not for the program autopar runs; "
                             "re-plan with runtime='autopar' to run it here, or export it to that library")
    return emit(model, example_inputs, plan=plan, seed=seed)
