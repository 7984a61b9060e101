"""Price one layout: stage partition, pipeline time, data-parallel communication, memory.

Step time of a layout (seconds)::

    step = pipeline + exposed data-parallel communication + optimizer update

- pipeline: the stage DP's ``alpha · max_j t_j + beta · Σ_j t_j`` (``stage_dp``), where t_j
  includes TP collectives (inside the layer costs) and stage-boundary sends;
- data-parallel communication per pipeline rank, on the dp group (Rajbhandari et al. 2020):
  ZeRO 0 all-reduces gradients; ZeRO 1/2 reduce-scatter gradients and all-gather updated
  parameters (same volume as one all-reduce); ZeRO 3 (FSDP) also all-gathers parameters
  before forward and backward of every micro-batch (1.5× the volume of ZeRO 1/2 per step
  when m = 1). With ``overlap_grad_reduce`` the gradient reduction hides behind the last
  micro-batch's backward, ZeRO 1/2's gather of updated parameters behind the next step's first
  forward (about a third of a micro-batch's compute), and ZeRO 3's parameter gathers behind each
  micro-batch's compute (prefetching), so only the excess is exposed;
- optimizer update: memory-bound over the parameters a GPU owns (see ``Pricing``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from autopar.plan import Layout, MemoryBreakdown
from autopar.solvers.costs import LayerCost, Pricing
from autopar.solvers.stage_dp import (
    InfeasibleStagePartitionError,
    StageCosts,
    StagePartition,
    evaluate_partition,
    in_flight_micro_batches,
    schedule_weights,
    solve_stage_partition,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Evaluation:
    """A priced layout."""

    layout: Layout
    """The layout."""
    partition: StagePartition
    """Stage boundaries and per-stage times (an even split when nothing fits)."""
    step_time_s: float
    """Predicted step time."""
    pipeline_time_s: float
    """Forward/backward time of all micro-batches including the bubble."""
    bubble_fraction: float
    """Share of the step the busiest pipeline rank is idle in fill/drain."""
    comm_time_s: Mapping[str, float]
    """Exposed communication per step by kind (TP collectives, p2p, data-parallel)."""
    optimizer_time_s: float
    """Optimizer update time."""
    memory: tuple[MemoryBreakdown, ...]
    """Peak memory per pipeline rank."""
    model_flops: float
    """Model FLOPs per step, whole job (3 × forward)."""
    hardware_flops: float
    """Model FLOPs plus recomputed forward FLOPs."""
    fits: bool
    """Every rank's memory fits."""

    @property
    def peak_memory_bytes(self) -> int:
        """Largest per-GPU total."""
        return max(m.total for m in self.memory)

    @property
    def dominant_memory_term(self) -> str:
        """Largest term on the fullest rank."""
        return max(self.memory, key=lambda m: m.total).dominant_term()


def _nodes_spanned(group_size: int, stride: int, gpus_per_node: int) -> int:
    """Nodes a group of ``group_size`` ranks ``stride`` GPUs apart covers (mesh order pp, dp, tp)."""
    span = group_size * stride
    return max(1, math.ceil(span / gpus_per_node)) if span > gpus_per_node else 1


def _stage_costs(layout: Layout, costs: Sequence[LayerCost], pricing: Pricing, p2p_nodes: int) -> StageCosts:
    static = []
    for c in costs:
        params, grads, opt = pricing.model_state_bytes(c.param_count, zero_stage=layout.zero_stage, dp=layout.dp)
        static.append(params + grads + opt)
    send = tuple(pricing.collective_time("p2p", c.boundary_bytes, group_size=2, nodes_spanned=p2p_nodes)
                 for c in costs)
    return StageCosts(forward_s=tuple(c.forward_s for c in costs), backward_s=tuple(c.backward_s for c in costs),
                      static_mem_bytes=tuple(static), activation_bytes=tuple(c.activation_bytes for c in costs),
                      boundary_send_s=send)


PartitionCache = dict[tuple[object, ...], tuple[int, ...]]
"""Time-optimal stage boundaries keyed by what they depend on (not memory): see ``_partition``."""


def _partition(layout: Layout, stage_costs: StageCosts, budget: float, cache: PartitionCache | None,
               key: tuple[object, ...]) -> tuple[StagePartition, bool]:
    """The stage partition of ``layout`` and whether it fits ``budget`` per pipeline rank.

    The time-optimal partition depends on the stage times only, not on the ZeRO stage or dp
    (those change memory), so it is computed once per ``key`` with no memory limit and reused;
    the memory-constrained DP runs only when that partition does not fit.
    """
    stages, v = layout.pp * layout.virtual_stages, layout.virtual_stages
    m, schedule = layout.num_micro_batches, layout.schedule
    in_flight = in_flight_micro_batches(schedule, pp=layout.pp, num_micro_batches=m, virtual_stages=v)
    alpha, beta = schedule_weights(schedule, num_micro_batches=m, virtual_stages=v)
    if cache is not None:
        if key not in cache:
            cache[key] = solve_stage_partition(stage_costs, num_stages=stages, num_micro_batches=m,
                                               mem_budget_bytes=math.inf, schedule=schedule,
                                               virtual_stages=v).boundaries
        fastest = evaluate_partition(stage_costs, cache[key], in_flight=in_flight, alpha=alpha, beta=beta,
                                     virtual_stages=v)
        if max(fastest.rank_mem_bytes) <= budget:
            return fastest, True
    try:
        part = solve_stage_partition(stage_costs, num_stages=stages, num_micro_batches=m, mem_budget_bytes=budget,
                                     schedule=schedule, virtual_stages=v, report_min_budget=False)
        return part, True
    except InfeasibleStagePartitionError:
        n = stage_costs.num_layers
        bounds = [round(j * n / stages) for j in range(stages + 1)]
        return evaluate_partition(stage_costs, bounds, in_flight=in_flight, alpha=alpha, beta=beta,
                                  virtual_stages=v), False


def _dp_comm(layout: Layout, rank_params: float, rank_compute_s: float, last_backward_s: float,
             pricing: Pricing, dp_nodes: int, overlap: bool) -> dict[str, float]:
    """Exposed data-parallel communication of one pipeline rank per step, by collective kind."""
    if layout.dp == 1:
        return {}
    grad_bytes = rank_params * pricing.grad_bytes_per_param()

    def t(kind: str, nbytes: float) -> float:
        return pricing.collective_time(kind, nbytes, group_size=layout.dp, nodes_spanned=dp_nodes)

    hide = last_backward_s if overlap else 0.0
    if layout.zero_stage == 0:
        return {"all_reduce": max(0.0, t("all_reduce", grad_bytes) - hide)}
    reduce = max(0.0, t("reduce_scatter", grad_bytes) - hide)
    gather = t("all_gather", grad_bytes)  # updated parameter shards, at the training dtype's width
    if layout.zero_stage < 3:
        # the gather of updated shards overlaps the next step's first forward (Megatron-LM's
        # --overlap-param-gather; FSDP's reshard_after_forward=False prefetch)
        first_forward = rank_compute_s / layout.num_micro_batches / 3 if overlap else 0.0
        return {"reduce_scatter": reduce, "all_gather": max(0.0, gather - first_forward)}
    m = layout.num_micro_batches
    per_mb = 2 * gather  # forward and backward gathers of every micro-batch
    exposed = m * max(0.0, per_mb - (rank_compute_s / m if overlap else 0.0))
    return {"reduce_scatter": reduce, "all_gather": exposed}


def evaluate_layout(layout: Layout, costs: Sequence[LayerCost], pricing: Pricing, *, gpus_per_node: int,
                    overlap_grad_reduce: bool = True, partition_cache: PartitionCache | None = None) -> Evaluation:
    """Price ``layout`` given per-layer costs at its (tp, sp, micro-batch, recompute) setting.

    ``partition_cache`` (owned by the caller, e.g. one search) memoises time-optimal stage partitions;
    ``costs`` must then stay alive as long as the cache (it is keyed by identity).
    """
    dp_nodes = _nodes_spanned(layout.dp, layout.tp, gpus_per_node)
    p2p_nodes = 2 if layout.dp * layout.tp >= gpus_per_node else 1
    stage_costs = _stage_costs(layout, costs, pricing, p2p_nodes)
    largest = max(c.param_count for c in costs)
    fixed = pricing.buffer_bytes(largest_layer_params=largest, zero_stage=layout.zero_stage, dp=layout.dp)
    headroom = pricing.allocator_headroom
    # total = (states + activations + fixed buffers) · (1 + headroom) must fit the GPU
    key = (id(costs), p2p_nodes, layout.pp, layout.virtual_stages, layout.schedule, layout.num_micro_batches)
    part, solved = _partition(layout, stage_costs, pricing.gpu_mem_bytes / (1 + headroom) - fixed,
                              partition_cache, key)
    pp, m = layout.pp, layout.num_micro_batches
    comm: dict[str, float] = {}
    for c in costs:
        for kind, s in c.tp_comm_s.items():
            comm[kind] = comm.get(kind, 0.0) + s * m / pp  # per rank, roughly even over the pipeline
    comm["p2p"] = m * max(math.fsum(part.comm_time_s[r::pp]) for r in range(pp)) if pp > 1 else 0.0
    memory, dp_exposed, opt_time = [], 0.0, 0.0
    for r in range(pp):
        layers = [i for j in range(r, part.num_stages, pp) for i in part.stage_layers(j)]
        params = math.fsum(costs[i].param_count for i in layers)
        compute = m * math.fsum(costs[i].forward_s + costs[i].backward_s for i in layers)
        last_bwd = math.fsum(costs[i].backward_s for i in layers)
        by_kind = _dp_comm(layout, params, compute, last_bwd, pricing, dp_nodes, overlap_grad_reduce)
        if sum(by_kind.values()) >= dp_exposed:
            dp_exposed = sum(by_kind.values())
            for kind, s in by_kind.items():
                comm[kind] = comm.get(kind, 0.0) + s
        owned = params / (layout.dp if layout.zero_stage >= 1 else 1)
        opt_time = max(opt_time, pricing.optimizer_step_time(owned))
        p, g, o = pricing.model_state_bytes(params, zero_stage=layout.zero_stage, dp=layout.dp)
        acts = max(0.0, part.rank_mem_bytes[r] - math.fsum(stage_costs.static_mem_bytes[i] for i in layers))
        buffers = fixed + headroom * (p + g + o + acts + fixed)
        memory.append(MemoryBreakdown(params=int(p), grads=int(g), optimizer=int(o), activations=int(acts),
                                      buffers=int(buffers), capacity=int(pricing.gpu_mem_bytes)))
    busiest = max(math.fsum(part.stage_time_s[r::pp]) for r in range(pp))
    pipeline = part.step_time_s
    step = pipeline + dp_exposed + opt_time
    fwd = math.fsum(c.forward_flops for c in costs) * m * layout.dp
    recomputed = math.fsum(c.recompute_flops for c in costs) * m * layout.dp
    return Evaluation(
        layout=layout, partition=part, step_time_s=step, pipeline_time_s=pipeline,
        bubble_fraction=max(0.0, min(0.999, (pipeline - m * busiest) / step)) if pp > 1 else 0.0,
        comm_time_s=comm, optimizer_time_s=opt_time, memory=tuple(memory), model_flops=3 * fwd,
        hardware_flops=3 * fwd + recomputed, fits=solved and all(mb.fits for mb in memory),
    )
