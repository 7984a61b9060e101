"""Price one layout: stage partition, pipeline time, data-parallel communication, memory.

Step time of a layout (seconds)::

    step = pipeline + exposed data-parallel communication + optimizer update

- pipeline: the stage DP's ``alpha · max_j t_j + beta · Σ_j t_j`` (``stage_dp``), where t_j
  includes TP collectives (inside the layer costs) and stage-boundary sends, plus the busiest rank's
  gradient accumulation over micro-batches (``Formulas.grad_accumulation_time``) and FSDP2's host time;
- data-parallel communication per pipeline rank, on the dp group (Rajbhandari et al. 2020):
  ZeRO 0 all-reduces gradients; ZeRO 1/2 reduce-scatter gradients and all-gather updated
  parameters (same volume as one all-reduce); ZeRO 3 (FSDP) also all-gathers parameters
  before forward and backward of every micro-batch (1.5× the volume of ZeRO 1/2 per step
  when m = 1). With ``overlap_grad_reduce`` the gradient reduction hides behind the last
  micro-batch's backward, ZeRO 1/2's gather of updated parameters behind the next step's first
  forward (about a third of a micro-batch's compute), and ZeRO 3's parameter gathers behind each
  micro-batch's compute (prefetching), so only the excess is exposed;
- optimizer update: memory-bound over the parameters a GPU owns (``costs.Formulas.optimizer_step_time``).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from autopar.cost_models.comm import estimate_exposed_dp_comm, fsdp_edge_units, fsdp_gathers_per_step, fsdp_units
from autopar.cost_models.memory import RUNTIME_RESERVED_BYTES, estimate_rank_memory, tensor_budget_bytes
from autopar.layout import Collective, CommBreakdown, Layout, MemoryBreakdown, Recompute
from autopar.schedule import in_flight_per_stage, schedule_weights
from autopar.solvers.costs import Formulas, LayerCost
from autopar.solvers.pipeline.stage_dp import (
    InfeasibleStagePartitionError,
    StageCosts,
    StagePartition,
    evaluate_partition,
    solve_stage_partition,
)
from autopar.solvers.pipeline.stage_policies import PolicyPartition, composite_costs, solve_stage_policies


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
    communication: CommBreakdown
    """Communication per step: TP and pipeline sends (inside ``pipeline_time_s``) and exposed DP, apart."""
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
    stage_recompute: tuple[Recompute, ...]
    """Recomputation policy of each stage (``layout.recompute`` is the most recomputing of them)."""
    host_wait_s: float = 0.0
    """Time the step waits for host cores: a node whose busy ranks outnumber its ``Cluster.host_cores`` runs
    them in turns (``host_wait``; 0 on GPU clusters). Part of ``step_time_s``."""

    @property
    def peak_memory_bytes(self) -> int:
        """Largest per-GPU total."""
        return max(m.total for m in self.memory)

    @property
    def dominant_memory_term(self) -> str:
        """Largest term on the fullest rank."""
        return max(self.memory, key=lambda m: m.total).dominant_term()


def host_wait(compute_s: float, *, ranks: int, ranks_per_node: int, cores: int) -> float:
    """Seconds a step waits for host cores, beyond ``compute_s``: the computing part of its critical path (the
    step less the communication it waits for), every rank on a core of its own.

    A "GPU" that is a host thread (``Cluster.host_cores`` > 0) computes only while the scheduler gives it a
    core. The busiest node holds ``ceil(ranks / nodes used)`` of the layout's ranks; beyond its ``cores`` they
    take turns, each at ``cores / ranks`` of a core, so the computing part stretches by ``ranks / cores``.
    The communication stays on top: it was measured with every rank busy (``local_worker._in_step_s``).
    Ranks waiting on a peer (a pipeline bubble) do not give their turn back measurably: GPT's 1F1B over 4
    ranks of 2 cores ran no faster than on one rank (0.083-0.087 s against 0.082), where a model that lent
    idle ranks' cores to the busy ones predicted 0.040. 0 without shared cores (GPU clusters) or with a core
    per busy rank.

    Example:
        >>> host_wait(1.0, ranks=4, ranks_per_node=4, cores=2)  # four busy ranks on two cores
        1.0
        >>> host_wait(1.0, ranks=2, ranks_per_node=4, cores=2), host_wait(1.0, ranks=4, ranks_per_node=4, cores=0)
        (0.0, 0.0)
    """
    if cores <= 0 or ranks <= 0:
        return 0.0
    nodes = math.ceil(ranks / ranks_per_node)
    per_node = math.ceil(ranks / nodes)
    if per_node <= cores:
        return 0.0
    return max(0.0, compute_s) * (per_node / cores - 1.0)


def _nodes_spanned(group_size: int, stride: int, gpus_per_node: int) -> int:
    """Nodes a group of ``group_size`` ranks ``stride`` GPUs apart covers (mesh order pp, dp, tp)."""
    span = group_size * stride
    return max(1, math.ceil(span / gpus_per_node)) if span > gpus_per_node else 1


def _stage_costs(layout: Layout, costs: Sequence[LayerCost], formulas: Formulas, p2p_nodes: int) -> StageCosts:
    """The stage DP's per-layer inputs. A layer's static bytes are its model states as the emitted program holds
    them plus its backward working bytes (once per rank: the loss's on the last layer); under a pipeline a
    layer's activations include the output a stage ending there keeps per in-flight micro-batch (the logits)."""
    pipelined = layout.pp > 1
    # layers of a kind share one LayerCost (``LayerCostTable``): each is priced once, however deep the model, and
    # the per-layer tuples are read off by identity at C speed
    ids = list(map(id, costs))
    static, acts, send = {}, {}, {}
    for key, c in dict(zip(ids, costs)).items():
        states = sum(formulas.model_state_bytes(c.param_count, zero_stage=layout.zero_stage, dp=layout.dp,
                                                num_micro_batches=layout.num_micro_batches, pipelined=pipelined))
        held = formulas.held_output_bytes(c.output_bytes) if pipelined else 0.0
        # without a pipeline nothing is sent (and a 1-GPU cluster has no pair)
        send[key] = formulas.collective_time(Collective.SEND_RECV, c.boundary_bytes, group_size=2,
                                             nodes_spanned=p2p_nodes) if pipelined else 0.0
        static[key], acts[key] = states + c.working_bytes, c.activation_bytes + held
    return StageCosts(forward_s=tuple(map(_FORWARD, costs)), backward_s=tuple(map(_BACKWARD, costs)),
                      static_mem_bytes=tuple(map(static.__getitem__, ids)),
                      activation_bytes=tuple(map(acts.__getitem__, ids)),
                      boundary_send_s=tuple(map(send.__getitem__, ids)))


_FORWARD, _BACKWARD = operator.attrgetter("forward_s"), operator.attrgetter("backward_s")


def _largest_unit(params: Sequence[float]) -> float:
    """Parameters of the largest FSDP unit over ``params`` (one rank's layers, or the model's): each repeated
    block is a unit, every other layer joins the stage root's (``fsdp_blocks``, ``emit/dp.py``)."""
    blocks = fsdp_blocks(params)
    root = math.fsum(p for p, is_block in zip(params, blocks) if not is_block)
    return max([root] + [p for p, is_block in zip(params, blocks) if is_block])


def _gathered_together(params: Sequence[float], blocks: Sequence[bool], chunks: Sequence[range],
                       pipelined: bool) -> float:
    """Parameters of the FSDP units gathered at once at a rank's activation peak (ZeRO 3's working copies).

    Without a pipeline, the largest unit: the root's units are the model's first and last layers, gathered
    apart from the blocks. Under a pipeline, a stage's backward starts at its output, which is the stage root's
    output: the root's pre-backward hook gathers the root while the last block gathers itself (measured on GPT,
    dp2 pp2 1F1B ZeRO 3, at rank 0's first backward: root and block unsharded together, their all-gather
    outputs with them, 3.81 MB against one unit's 2.23). The activations peak as the rank's first backward
    starts, and that is its last chunk's (interleaved 1F1B runs a rank's backwards from its last stage down),
    so the root and largest block are that chunk's; an earlier chunk's backward starts with fewer micro-batches
    held. ``blocks`` are the model's block flags (``fsdp_blocks``), ``chunks`` the rank's chunks' layer ranges
    in stage order.
    """
    if not pipelined:
        return _largest_unit([params[i] for chunk in chunks for i in chunk])
    last = chunks[-1]
    root = math.fsum(params[i] for i in last if not blocks[i])
    return root + max([0.0] + [params[i] for i in last if blocks[i]])


def _fixed_bytes(layout: Layout, costs: Sequence[LayerCost], formulas: Formulas) -> float:
    """What the stage DP reserves per GPU beside its sums: ``Formulas.buffer_bytes`` for the model's largest
    unit and, under a pipeline, every receive buffer of v chunks at the largest boundary (an upper bound)."""
    fixed = formulas.buffer_bytes(largest_layer_params=_largest_unit([c.param_count for c in costs]),
                                  zero_stage=layout.zero_stage, dp=layout.dp, pipelined=layout.pp > 1)
    return fixed + recv_reserve(pp=layout.pp, virtual_stages=layout.virtual_stages,
                                num_micro_batches=layout.num_micro_batches,
                                widest_boundary=max(c.boundary_bytes for c in costs), formulas=formulas)


def recv_reserve(*, pp: int, virtual_stages: int, num_micro_batches: int, widest_boundary: float,
                 formulas: Formulas) -> float:
    """Receive buffers the stage DP reserves per GPU under a pipeline: v chunks, each at the widest boundary (an
    upper bound on every chunk's; ``_rank_memory`` counts the chunks' own). 0 without a pipeline."""
    if pp == 1:
        return 0.0
    return virtual_stages * formulas.recv_bytes(num_micro_batches=num_micro_batches, input_bytes=widest_boundary,
                                                output_bytes=widest_boundary)


PartitionCache = dict[tuple[object, ...], Any]
"""(boundaries, per-stage policy, fits): time-optimal ones keyed by what they depend on (not memory), and
memory-constrained ones keyed by that and the budget and static bytes: see ``_partition``; and the inputs
``fastest_partition_fits`` reads, keyed by a name and the values they depend on."""

Variants = Mapping[Recompute, Sequence[LayerCost]]
"""Per-layer costs under each recomputation policy the layout may use (one entry when pinned)."""

_RECOMPUTE_ORDER = (Recompute.NONE, Recompute.SELECTIVE, Recompute.FULL)


def _fastest(layout: Layout, fastest: StageCosts, quick: int, budget: float, cache: PartitionCache | None,
             key: tuple[object, ...]) -> PolicyPartition | None:
    """The time-optimal partition (every stage on the fastest policy, index ``quick`` with costs ``fastest``)
    when it fits ``budget`` per rank, else None.

    It depends on the stage times only, not on the ZeRO stage or dp (those change memory), so it is
    computed once per ``key`` with no memory limit and reused (None without a cache).
    """
    stages, v = layout.pp * layout.virtual_stages, layout.virtual_stages
    m, schedule = layout.num_micro_batches, layout.schedule
    in_flight = in_flight_per_stage(schedule, pp=layout.pp, num_micro_batches=m, virtual_stages=v)
    if cache is None or (key not in cache and (_cannot_fit(fastest, in_flight, layout.pp, budget)
                                               or _blocks_cannot_fit(fastest, in_flight, layout.pp, budget))):
        return None  # no partition of the fastest policy fits: the memory-constrained DP decides
    if key not in cache:  # without a memory limit every stage takes the fastest policy
        best = solve_stage_partition(fastest, num_stages=stages, num_micro_batches=m, mem_budget_bytes=math.inf,
                                     schedule=schedule, virtual_stages=v)
        cache[key] = (tuple(best.boundaries), (quick,) * stages, True)
    bounds, policies, _ = cache[key]
    candidate = _priced(layout, [fastest], bounds, [0] * stages)  # every stage on the fastest policy
    if max(candidate.partition.rank_mem_bytes) > budget:
        return None
    return PolicyPartition(partition=candidate.partition, policies=tuple(policies))


def _quickest(times: Sequence[float]) -> int:
    """Index of the fastest policy (the first of equals)."""
    return min(range(len(times)), key=times.__getitem__)


def _priced(layout: Layout, variants: Sequence[StageCosts], bounds: Sequence[int],
            policies: Sequence[int]) -> PolicyPartition:
    m, v, schedule = layout.num_micro_batches, layout.virtual_stages, layout.schedule
    in_flight = in_flight_per_stage(schedule, pp=layout.pp, num_micro_batches=m, virtual_stages=v)
    alpha, beta = schedule_weights(schedule, num_micro_batches=m, virtual_stages=v)
    part = evaluate_partition(composite_costs(variants, bounds, policies), bounds, in_flight=in_flight,
                              alpha=alpha, beta=beta, virtual_stages=v)
    return PolicyPartition(partition=part, policies=tuple(policies))


def _partition(layout: Layout, variants: Sequence[StageCosts], budget: float, cache: PartitionCache | None,
               key: tuple[object, ...]) -> tuple[PolicyPartition, bool]:
    """The stage partition and per-stage policies of ``layout``, and whether they fit ``budget`` per rank.

    The time-optimal partition (``_fastest``, cached) when it fits; otherwise the memory-constrained
    DP, which holds each of a rank's v chunks to 1/v of its budget (``solve_stage_policies``).
    """
    quick = _quickest([sum(c.forward_s) + sum(c.backward_s) for c in variants])
    candidate = _fastest(layout, variants[quick], quick, budget, cache, key)
    if candidate is not None:
        return candidate, True
    # the rest of the DP's input is in ``key`` (times, activations, sends: the setting and the pipeline shape);
    # layouts whose states agree (ZeRO 1 and 2 under accumulation, say) share the memory-constrained solution
    constrained = ("policies", key, budget, *(c.static_mem_bytes for c in variants))
    solution = cache.get(constrained) if cache is not None else None
    if solution is None:
        solution = _constrained(layout, variants, budget)
        if cache is not None:
            cache[constrained] = solution
    bounds, policies, fits = solution
    return _priced(layout, variants, bounds, policies), fits


def _constrained(layout: Layout, variants: Sequence[StageCosts],
                 budget: float) -> tuple[tuple[int, ...], tuple[int, ...], bool]:
    """(boundaries, per-stage policies, fits) of the memory-constrained DP; when no partition fits, the even
    split on the leanest policy (priced to say by how much it misses)."""
    stages, v = layout.pp * layout.virtual_stages, layout.virtual_stages
    try:
        chosen = solve_stage_policies(variants, num_stages=stages, num_micro_batches=layout.num_micro_batches,
                                      mem_budget_bytes=budget, schedule=layout.schedule, virtual_stages=v)
        return tuple(chosen.partition.boundaries), chosen.policies, True
    except InfeasibleStagePartitionError:
        n = variants[0].num_layers
        leanest = min(range(len(variants)), key=lambda p: sum(variants[p].activation_bytes))
        return tuple(round(j * n / stages) for j in range(stages + 1)), (leanest,) * stages, False


def _cannot_fit(costs: StageCosts, in_flight: Sequence[int], pp: int, budget: float) -> bool:
    """True when no partition of ``costs`` fits ``budget`` per rank: the ranks together hold every layer's
    static bytes and at least the fewest in-flight micro-batches of every layer's activations."""
    least = (math.fsum(costs.static_mem_bytes) + min(in_flight) * math.fsum(costs.activation_bytes)) / pp
    return least > budget * (1 + 1e-9)  # a margin for the rounding of the per-rank sums


def _blocks_cannot_fit(costs: StageCosts, in_flight: Sequence[int], pp: int, budget: float) -> bool:
    """True when the ranks cannot hold the most repeated layer (static s, activations a) even alone: rank r,
    whose chunks hold at least k_r micro-batches each, fits at most ⌊budget / (s + k_r · a)⌋ of them."""
    (static, acts), count = Counter(zip(costs.static_mem_bytes, costs.activation_bytes)).most_common(1)[0]
    held = 0.0
    for r in range(pp):
        per_layer = static + min(in_flight[r::pp]) * acts
        if per_layer <= 0:
            return False
        held += math.floor(budget / per_layer * (1 + 1e-9))  # a margin for rounding: never too few
    return held < count


def _dp_comm(layout: Layout, units: Sequence[float], rank_compute_s: float, last_backward_s: float,
             formulas: Formulas, dp_nodes: int, overlap: bool, edge_units: Sequence[float] = ()) -> CommBreakdown:
    """Exposed data-parallel communication of one pipeline rank per step (``comm.estimate_exposed_dp_comm``).

    ``units``: the parameters of each FSDP unit on the rank (``comm.fsdp_units``), each gathered and reduced by
    collectives of its own; ``edge_units``: those gathered first and reduced last (``comm.fsdp_edge_units``)."""
    if layout.dp == 1:
        return CommBreakdown()
    overlap = overlap and formulas.cluster.gpu.grad_reduce_overlaps  # a CPU rank's reduce blocks its backward

    def t(kind: Collective, unit_params: Sequence[float]) -> float:  # gradients reduced in fp32, params gathered
        width = formulas.param_bytes_per_param() if kind is Collective.ALL_GATHER else formulas.grad_bytes_per_param()
        return math.fsum(formulas.collective_time(kind, p * width, group_size=layout.dp, nodes_spanned=dp_nodes)
                         for p in unit_params)

    zero, m = layout.zero_stage, layout.num_micro_batches
    reduce = Collective.ALL_REDUCE if zero == 0 else Collective.REDUCE_SCATTER
    copy_out, copy_in = formulas.fsdp_copy_time(math.fsum(units), gathers_per_step=fsdp_gathers_per_step(zero, m))
    return estimate_exposed_dp_comm(
        zero_stage=zero, num_micro_batches=m, grad_reduce_s=t(reduce, units),
        param_gather_s=t(Collective.ALL_GATHER, units) if zero else 0.0, rank_compute_s=rank_compute_s,
        last_backward_s=last_backward_s, overlap=overlap, edge_gather_s=t(Collective.ALL_GATHER, edge_units) if zero
        else 0.0, edge_reduce_s=t(reduce, edge_units) if zero else 0.0, copy_out_s=copy_out, copy_in_s=copy_in)


def _rank_memory(layout: Layout, part: StagePartition, rank: int, costs: Sequence[LayerCost], acts: float,
                 formulas: Formulas, owned: float, blocks: Sequence[bool]) -> MemoryBreakdown:
    """Peak memory of pipeline rank ``rank`` (``estimate_rank_memory``'s three moments); ``costs``: every layer's,
    ``blocks`` their FSDP block flags (``fsdp_blocks``).

    Gradients are alive at the activations' peak only when a backward ran before it: when the rank has more
    micro-batches than it holds in flight (not under GPipe, nor with one micro-batch). The fixed bytes are the
    runtime's reservation and the receive buffers of the rank's chunks (``Formulas.recv_bytes``). What the chunks
    sent and still hold (``Formulas.sent_bytes``: the in-flight outputs, under interleaved 1F1B every send of the
    step so far) is alive with the activations at their peak, freed by the optimizer step.
    """
    pp, m, bounds = layout.pp, layout.num_micro_batches, part.boundaries
    chunks = range(rank, part.num_stages, pp)  # chunk j holds layers [bounds[j], bounds[j + 1])
    layers = [costs[i] for j in chunks for i in range(bounds[j], bounds[j + 1])]
    states = formulas.program_states(math.fsum(c.param_count for c in layers), zero_stage=layout.zero_stage,
                                     dp=layout.dp, num_micro_batches=m, pipelined=pp > 1)
    live = states.live_grads(backward_ran=m > max(part.in_flight[j] for j in chunks))
    ranges = [range(bounds[j], bounds[j + 1]) for j in chunks]
    gather, reduce = formulas.working_bytes(
        gathered_params=_gathered_together([c.param_count for c in costs], blocks, ranges, pp > 1),
        largest_unit_params=_largest_unit([c.param_count for c in layers]), zero_stage=layout.zero_stage,
        dp=layout.dp, pipelined=pp > 1)
    recv = sent = 0.0
    for j in chunks if pp > 1 else ():
        received = costs[bounds[j]].boundary_bytes if j > 0 else 0.0  # the chunk's input, and its gradient sent
        output = costs[bounds[j + 1]].boundary_bytes if j < part.num_stages - 1 else 0.0  # sent, its gradient received
        recv += formulas.recv_bytes(num_micro_batches=m, input_bytes=received, output_bytes=output)
        sent += formulas.sent_bytes(num_micro_batches=m, in_flight=part.in_flight[j], input_bytes=received,
                                    output_bytes=output, schedule=layout.schedule)
    return estimate_rank_memory(
        params_bytes=states.params, grads_bytes=states.grads, optimizer_bytes=states.optimizer,
        activation_bytes=acts, fixed_bytes=RUNTIME_RESERVED_BYTES + recv, capacity_bytes=formulas.gpu_mem_bytes,
        optimizer_temp_bytes=formulas.optimizer_temp_bytes(owned), accumulated_grads_bytes=live,
        working_bytes=max(math.fsum(c.working_bytes for c in layers), gather) + sent, reduce_bytes=reduce)


def fsdp_blocks(params: Sequence[float]) -> list[bool]:
    """Which layers are FSDP block units: those whose parameter count repeats in the model (``emit/dp.py``
    wraps each repeated block; every other layer joins the stage root)."""
    counts = Counter(params)
    return [counts[p] > 1 for p in params]


def dp_comm_s(layout: Layout, rank_params: float, rank_compute_s: float, last_backward_s: float, formulas: Formulas,
              *, gpus_per_node: int, overlap: bool, edge_params: float) -> float:
    """``_dp_comm``'s total for a rank spanning ``layout``'s data-parallel group as ``evaluate_layout`` places it,
    its parameters moved as one unit (and the edge as one): a lower bound on the per-unit price, since every
    collective's time is affine in its bytes with a non-negative fixed cost."""
    dp_nodes = _nodes_spanned(layout.dp, layout.tp, gpus_per_node)
    return _dp_comm(layout, (rank_params,), rank_compute_s, last_backward_s, formulas, dp_nodes, overlap,
                    (edge_params,)).dp_s


class _Setup(NamedTuple):
    """What pricing a layout starts from."""

    policies: list[Recompute]
    """The policies of ``variants`` in ``_RECOMPUTE_ORDER``."""
    per_policy: list[Sequence[LayerCost]]
    """Their per-layer costs."""
    stage_variants: list[StageCosts]
    """Their stage-DP inputs (model states and boundary sends of this layout)."""
    fixed: float
    """Buffers and runtime reservation per GPU (before headroom)."""
    key: tuple[object, ...]
    """What the time-optimal partition depends on (``PartitionCache`` key)."""


def _setup(layout: Layout, variants: Variants, formulas: Formulas, gpus_per_node: int,
           partition_cache: PartitionCache | None, costs_key: Hashable) -> _Setup:
    p2p_nodes = 2 if layout.dp * layout.tp >= gpus_per_node else 1
    policies = [rc for rc in _RECOMPUTE_ORDER if rc in variants]
    per_policy = [variants[rc] for rc in policies]
    stage_variants = [_stage_costs(layout, costs, formulas, p2p_nodes) for costs in per_policy]
    fixed = _fixed_bytes(layout, per_policy[0], formulas)
    # total = with_headroom(states + activations + fixed buffers) must fit the GPU
    if partition_cache is not None and costs_key is None:
        raise ValueError("a partition cache needs costs_key: the value the variants were priced at")
    key = (costs_key, p2p_nodes, layout.pp, layout.virtual_stages, layout.schedule, layout.num_micro_batches)
    return _Setup(policies=policies, per_policy=per_policy, stage_variants=stage_variants, fixed=fixed, key=key)


def fastest_partition_fits(layout: Layout, variants: Variants, formulas: Formulas, *, gpus_per_node: int,
                           partition_cache: PartitionCache, costs_key: Hashable) -> bool:
    """Whether ``evaluate_layout`` would keep the time-optimal partition (it fits every rank's memory).

    When it does not, the memory-constrained DP holds each chunk to 1/v of a rank's budget, which the
    search bounds more tightly (``bounds.layout_bound`` with ``chunks``). The partition is cached, so
    the evaluation that may follow reuses it; so are the per-layer inputs it reads, by the values they
    depend on (layouts that differ in the schedule alone share them).
    """
    p2p_nodes = 2 if layout.dp * layout.tp >= gpus_per_node else 1
    per_policy = [variants[rc] for rc in _RECOMPUTE_ORDER if rc in variants]
    if ("quickest", costs_key) not in partition_cache:
        partition_cache["quickest", costs_key] = _quickest(
            [sum(c.forward_s for c in costs) + sum(c.backward_s for c in costs) for costs in per_policy])
    quick = partition_cache["quickest", costs_key]
    fixed_key = ("fixed", costs_key, layout.zero_stage, layout.dp, layout.pp > 1, layout.virtual_stages,
                 layout.num_micro_batches)
    if fixed_key not in partition_cache:
        partition_cache[fixed_key] = _fixed_bytes(layout, per_policy[0], formulas)
    stage_key = ("stage costs", costs_key, quick, layout.zero_stage, layout.dp, layout.num_micro_batches,
                 layout.pp > 1, p2p_nodes)
    if stage_key not in partition_cache:  # the other policies are not read
        partition_cache[stage_key] = _stage_costs(layout, per_policy[quick], formulas, p2p_nodes)
    fastest = partition_cache[stage_key]
    key = (costs_key, p2p_nodes, layout.pp, layout.virtual_stages, layout.schedule, layout.num_micro_batches)
    budget = tensor_budget_bytes(formulas.gpu_mem_bytes, fixed_bytes=partition_cache[fixed_key])
    return _fastest(layout, fastest, quick, budget, partition_cache, key) is not None


def evaluate_layout(layout: Layout, variants: Variants, formulas: Formulas, *, gpus_per_node: int,
                    overlap_grad_reduce: bool = True, partition_cache: PartitionCache | None = None,
                    costs_key: Hashable = None) -> Evaluation:
    """Price ``layout`` at its (tp, sp, micro-batch) setting, each stage with the fastest policy that fits.

    ``variants`` maps each recomputation policy the layout may use to its per-layer costs (one
    entry when the policy is pinned). ``partition_cache`` (owned by the caller, e.g. one search)
    memoises time-optimal partitions, keyed by value: ``costs_key`` names the setting the variants
    were priced at (e.g. tp, sequence parallelism, micro-batch size and the policies).
    """
    dp_nodes = _nodes_spanned(layout.dp, layout.tp, gpus_per_node)
    policies, per_policy, stage_variants, fixed, key = _setup(layout, variants, formulas, gpus_per_node,
                                                              partition_cache, costs_key)
    chosen, solved = _partition(layout, stage_variants, tensor_budget_bytes(formulas.gpu_mem_bytes, fixed_bytes=fixed),
                                partition_cache, key)
    part = chosen.partition
    stage_policy = tuple(policies[p] for p in chosen.policies)
    costs = [per_policy[chosen.policies[j]][i] for j in range(part.num_stages) for i in part.stage_layers(j)]
    stage_static = composite_costs(stage_variants, part.boundaries, chosen.policies).static_mem_bytes
    layout = dataclasses.replace(layout, recompute=max(stage_policy, key=_RECOMPUTE_ORDER.index))
    pp, m = layout.pp, layout.num_micro_batches
    tp_s = math.fsum(c.tp_comm_s for c in costs) * m / pp  # per rank, roughly even over the pipeline
    p2p_s = m * max(math.fsum(part.comm_time_s[r::pp]) for r in range(pp)) if pp > 1 else 0.0
    memory, dp_comm, opt_time, fsdp_host, accumulate = [], CommBreakdown(), 0.0, 0.0, 0.0
    blocks = fsdp_blocks([c.param_count for c in costs])
    wrapped = layout.dp > 1 or formulas.dtype != "float32"  # emit/dp.py's needs_dp_wrapper
    for r in range(pp):
        layers = [i for j in range(r, part.num_stages, pp) for i in part.stage_layers(j)]
        params = math.fsum(costs[i].param_count for i in layers)
        compute = m * math.fsum(costs[i].forward_s + costs[i].backward_s for i in layers)
        last_bwd = math.fsum(costs[i].backward_s for i in layers)
        units = [u for j in range(r, part.num_stages, pp)  # each chunk is a stage module with its own root unit
                 for u in fsdp_units([costs[i].param_count for i in part.stage_layers(j)],
                                     [blocks[i] for i in part.stage_layers(j)])]
        edge = fsdp_edge_units([costs[i].param_count for i in layers], [blocks[i] for i in layers])
        rank_comm = _dp_comm(layout, units, compute, last_bwd, formulas, dp_nodes, overlap_grad_reduce, edge)
        if wrapped:  # FSDP2's hooks, every unit and micro-batch, where the host runs the kernels (0 on GPUs)
            fsdp_host = max(fsdp_host, m * len(units) * formulas.cluster.gpu.fsdp_unit_s)
        accumulate = max(accumulate, formulas.grad_accumulation_time(
            params, num_micro_batches=m, zero_stage=layout.zero_stage, dp=layout.dp, pipelined=pp > 1))
        if rank_comm.dp_s >= dp_comm.dp_s:  # the step waits for the slowest rank's reduction
            dp_comm = rank_comm
        owned = params / (layout.dp if layout.zero_stage >= 1 else 1)
        opt_time = max(opt_time, formulas.optimizer_step_time(owned))
        acts = max(0.0, part.rank_mem_bytes[r] - math.fsum(stage_static[i] for i in layers))
        memory.append(_rank_memory(layout, part, r, costs, acts, formulas, owned, blocks))
    busiest = max(math.fsum(part.stage_time_s[r::pp]) for r in range(pp))
    pipeline = part.step_time_s + fsdp_host + accumulate  # both inside every micro-batch, on the busiest rank
    step = pipeline + dp_comm.dp_s + opt_time
    wait = host_wait(step - (tp_s + p2p_s + dp_comm.dp_s),  # less the communication on the critical path
                     ranks=layout.dp * layout.tp * pp, ranks_per_node=gpus_per_node, cores=formulas.cluster.host_cores)
    step += wait
    fwd = math.fsum(c.forward_flops for c in costs) * m * layout.dp
    recomputed = math.fsum(c.recompute_flops for c in costs) * m * layout.dp
    return Evaluation(
        layout=layout, partition=part, step_time_s=step, pipeline_time_s=pipeline,
        bubble_fraction=max(0.0, min(0.999, (part.step_time_s - m * busiest) / step)) if pp > 1 else 0.0,
        communication=dataclasses.replace(dp_comm, tp_s=tp_s, pp_p2p_s=p2p_s), optimizer_time_s=opt_time,
        memory=tuple(memory), model_flops=3 * fwd,
        hardware_flops=3 * fwd + recomputed, fits=solved and all(mb.fits for mb in memory),
        stage_recompute=stage_policy, host_wait_s=wait,
    )
