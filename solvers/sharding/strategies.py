"""Sharding strategies for a layer at one TP size: ATen ops → ``ShardingProblem`` → ILP → ``LayerShardingResult``.

Per-op strategies come from ``solvers/op_strategies.py`` (rules per op family in
``solvers/op_rules.py``, views in ``solvers/view_rules.py``); this module wires them
into one problem per layer, solves it with ``solvers/sharding/sharding_ilp.py`` and reads
the answer back (``solvers/layer_result.py``).

Nodes of the problem, in execution order:

* ``in:<key>``  a boundary tensor with its pinned placement (one strategy: a constant);
* ``<op>``      one per ATen op, with the strategies of ``solvers/op_strategies.py``;
  view-like ops follow their producer (Alpa's follow strategy);
* ``fan:<op>:<k>`` a tensor read by more than one op: it chooses the placement
  the readers share and where their gradients accumulate, so one all-gather (or
  one backward all-reduce) serves all readers, as in Megatron-LM, instead of one each;
* ``out:<op>``  a layer output (read by the next layer) with its pinned placement.

Costs are per micro-batch and include the backward pass: node cost = forward +
backward compute of the op at its split (by default backward = 2 × forward, as
FLOPs go: Narayanan et al. 2021; or the caller's ``op_cost``); edge cost =
forward resharding of the tensor plus the backward resharding of its gradient
(the consumer's input-gradient placement to the gradient placement the producer
needs). Memory is parameter bytes per GPU.

In the forward pass a replicated or sharded tensor may not be turned into a
partial sum (R → P, S → P). DTensor allows it, but Megatron-style TP never does
it and ``RowwiseParallel`` cannot express it: a partial output is reduced (or
reduce-scattered) before anything but a linear op reads it. Gradients may turn
partial freely (a rank simply does not add what it does not own), which is
how one backward all-reduce serves q, k and v together. Without sequence
parallelism a partial output is all-reduced, never reduce-scattered: splitting
the sequence between the TP regions (reduce-scatter there, all-gather later) is
exactly what sequence parallelism adds, and it must be asked for.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from autopar.errors import InfeasiblePlanError
from autopar.graph.ir import Layer, Op, TensorMeta
from autopar.layout import Collective
from autopar.solvers.sharding.layer_graph import LayerGraph, Source, SourceKind, build_layer_graph
from autopar.solvers.sharding.layer_result import CollectiveCall, LayerShardingResult, build_result
from autopar.solvers.sharding.op_rules import OpStrategy
from autopar.solvers.sharding.op_strategies import op_strategies, param_bytes
from autopar.solvers.sharding.placement import (
    PARTIAL,
    REPLICATE,
    Placement,
    grad_placement,
    nccl_size,
    reshard_collective,
    shard,
)
from autopar.solvers.sharding.sharding_ilp import ShardingEdge, ShardingNode, ShardingProblem, ShardingSolution, solve_sharding
from autopar.solvers.sharding.view_rules import VIEW_TARGETS, fused_cuts, fused_param_placements, packet, shard_fits

logger = logging.getLogger(__name__)

OpTime = Callable[[Op], float]
"""Forward time of one op on one GPU, unsharded (seconds)."""
OpCost = Callable[[Op, int], tuple[float, float]]
"""(forward, backward) seconds of one op when its work is split over n ranks (n = 1: unsharded)."""
CollectiveTime = Callable[[str, float], float]
"""Time of a collective (``"all_reduce"``, ...) over the TP group, given its NCCL size in bytes (``nccl_size``)."""

BACKWARD_COMPUTE_FACTOR = 2.0
"""Backward compute / forward compute: two matmuls (input and weight gradients) per forward matmul."""


@dataclass(frozen=True, slots=True, kw_only=True)
class NodePlan:
    """A node's strategies as placements: what flows out of it and what gradient it needs back."""

    name: str
    """Node name in the problem."""
    outs: tuple[Placement, ...]
    """Per strategy: placement of the tensor it hands to its readers."""
    grad_needs: tuple[Placement, ...]
    """Per strategy: placement of the gradient it needs back."""


def solve_layer_sharding(layer: Layer, *, tp: int, sequence_parallel: bool, op_time: OpTime | None = None,
                         collective_time: CollectiveTime, op_cost: OpCost | None = None,
                         mem_budget_bytes: float | None = None,
                         free_output: bool = False, allow_batch_split: bool = False,
                         backward_compute_factor: float = BACKWARD_COMPUTE_FACTOR, time_limit_s: float = 30.0) -> LayerShardingResult:
    """The cheapest sharding of one layer's ops over a TP axis of size ``tp``.

    Args:
        layer: the layer (its ops in execution order).
        tp: tensor-parallel size.
        sequence_parallel: pin the hidden state at the layer boundary to S(1) (sequence) instead of R.
        op_time: unsharded forward time of an op; a split op takes 1/t of it and backward takes
            ``backward_compute_factor`` times forward.
        op_cost: instead of ``op_time``: (forward, backward) time of an op split n ways, when the compute
            model knows better than 1/n (fixed kernel costs, efficiency falling with size).
        collective_time: time of a collective on the TP group, from its kind and NCCL size in bytes.
        mem_budget_bytes: bound on parameter bytes per GPU for this layer (None: no bound).
        free_output: let the layer's outputs be R or split on their last dim, not just the pin (the last layer,
            when the loss runs on vocabulary shards: torch's ``loss_parallel``, Megatron's vocab-parallel
            cross-entropy).
        allow_batch_split: allow matmuls/embeddings to split work over a replicated weight.
        backward_compute_factor: backward compute time / forward compute time.
        time_limit_s: ILP time limit.

    Returns:
        Strategies, placements, collectives, times and TP styles for the layer.

    Raises:
        InfeasiblePlanError: no sharding keeps the parameters within ``mem_budget_bytes``.
    """
    if tp < 1:
        raise ValueError(f"tp must be >= 1, got {tp}")
    if (op_time is None) == (op_cost is None):
        raise ValueError("pass exactly one of op_time (forward seconds) and op_cost ((forward, backward) seconds)")
    start = time.perf_counter()
    graph = build_layer_graph(layer, tp=tp, sequence_parallel=sequence_parallel)
    if op_cost is None:
        assert op_time is not None
        op_cost = _scaled_cost(op_time, backward_compute_factor)
    builder = _ProblemBuilder(graph, tp=tp, sequence_parallel=sequence_parallel, op_cost=op_cost,
                              collective_time=collective_time, free_output=free_output,
                              allow_batch_split=allow_batch_split)
    problem = builder.build(mem_budget_bytes)
    try:
        solution = solve_sharding(problem, time_limit_s=time_limit_s)
    except InfeasiblePlanError as e:
        raise InfeasiblePlanError(f"layer {layer.module_path} at tp={tp}: {e}") from e
    result = builder.result(solution, sequence_parallel=sequence_parallel)
    logger.debug("layer %s tp=%d sp=%s: %d nodes, objective %.4g s, solved in %.3f s", layer.module_path, tp,
                 sequence_parallel, len(problem.nodes), solution.cost_s, time.perf_counter() - start)
    return result


def _scaled_cost(op_time: OpTime, backward_factor: float) -> OpCost:
    """The default compute model: a split op takes 1/n of the time, backward a fixed multiple of forward."""
    def cost(op: Op, n: int) -> tuple[float, float]:
        fwd = op_time(op) / n
        return fwd, backward_factor * fwd

    return cost


class _ProblemBuilder:
    """Turns a ``LayerGraph`` into a ``ShardingProblem`` and reads a solution back."""

    def __init__(self, graph: LayerGraph, *, tp: int, sequence_parallel: bool, op_cost: OpCost,
                 collective_time: CollectiveTime, free_output: bool, allow_batch_split: bool) -> None:
        self.graph, self.tp, self.sequence_parallel = graph, tp, sequence_parallel
        self.free_output, self.allow_batch_split = free_output, allow_batch_split
        self._op_cost = op_cost
        self._compute: dict[tuple[str, int], tuple[float, float]] = {}
        self._collective_time = collective_time
        self._comm: dict[tuple[str, int], float] = {}
        self.strategies: dict[str, tuple[OpStrategy, ...]] = {}
        self.plans: dict[str, NodePlan] = {}
        self.tensor_node: dict[Source, str] = {}  # tensor -> node its readers connect to
        self.nodes: list[ShardingNode] = []
        self.edges: list[ShardingEdge] = []
        self.edge_info: list[tuple[str, str, Source, int]] = []  # src node, dst node, tensor, dst input index
        self._cuts: frozenset[tuple[int, int]] | None = None  # fused-projection splits of the layer

    # ---- costs ----

    def op_cost(self, op: Op, split: bool) -> tuple[float, float]:
        """(forward, backward) seconds of an op, split t ways or not (memoised)."""
        n = self.tp if split else 1
        key = (op.name, n)
        if key not in self._compute:
            self._compute[key] = self._op_cost(op, n)
        return self._compute[key]

    def comm_time(self, src: Placement, dst: Placement, nbytes: int, *, forward: bool = True) -> float:
        """Resharding time of a tensor of ``nbytes``; inf for what the forward pass may not do (module docstring)."""
        if forward and dst.is_partial and not src.is_partial:
            return math.inf
        kind = reshard_collective(src, dst)
        if kind is None:
            return 0.0
        if forward and kind is Collective.REDUCE_SCATTER and not self.sequence_parallel:
            return math.inf
        size = nccl_size(kind, nbytes, self.tp)
        key = (kind.value, size)
        if key not in self._comm:
            self._comm[key] = float(self._collective_time(kind.value, float(size)))
        return self._comm[key]

    def _edge_matrix(self, tensor: Source, src: NodePlan, dst_ins: tuple[Placement, ...],
                     dst_grads: tuple[Placement, ...]) -> tuple[tuple[float, ...], ...]:
        nbytes = self.graph.metas[tensor].nbytes
        needs_grad = tensor in self.graph.requires_grad
        return tuple(
            tuple(self.comm_time(out, i, nbytes)
                  + (self.comm_time(g, need, nbytes, forward=False) if needs_grad else 0.0)
                  for i, g in zip(dst_ins, dst_grads))
            for out, need in zip(src.outs, src.grad_needs)
        )

    # ---- nodes ----

    def build(self, mem_budget_bytes: float | None) -> ShardingProblem:
        for tensor, pin in self.graph.pins.items():
            self._add_constant(f"in:{tensor.name}", tensor, pin)
        for op in self.graph.layer.ops:
            self._add_op(op)
        for tensor, pin in self.graph.outputs.items():
            name = f"out:{tensor.name}"
            allowed = self._free_placements(tensor) if self.free_output else (pin,)
            self._connect(tensor, name, allowed, allowed)
            self.nodes.append(ShardingNode(name=name, strategies=tuple(map(str, allowed)),
                                           compute_s=(0.0,) * len(allowed), comm_s=(0.0,) * len(allowed),
                                           mem_bytes=(0.0,) * len(allowed)))
            self.plans[name] = NodePlan(name=name, outs=allowed, grad_needs=allowed)
        return ShardingProblem(nodes=tuple(self.nodes), edges=tuple(self.edges), mem_budget_bytes=mem_budget_bytes)

    def _free_placements(self, tensor: Source) -> tuple[Placement, ...]:
        """An unpinned output may be R or split on its last dim (the class dim ``loss_parallel`` and Megatron's
        vocab-parallel cross-entropy read), never a partial sum, nor another shard (no loss reads it so)."""
        shape = self.graph.metas[tensor].shape
        last = len(shape) - 1
        return (REPLICATE, *((shard(last),) if shape and shard_fits(shape[last], 1, self.tp) else ()))

    def _add_constant(self, name: str, tensor: Source, pin: Placement) -> None:
        self.nodes.append(ShardingNode(name=name, strategies=(str(pin),), compute_s=(0.0,), comm_s=(0.0,),
                                       mem_bytes=(0.0,)))
        self.plans[name] = NodePlan(name=name, outs=(pin,), grad_needs=(grad_placement(pin),))
        self._register(tensor, name)

    def _add_op(self, op: Op) -> None:
        srcs = self.graph.sources[op.name]
        hints = [frozenset(self.plans[self.tensor_node[s]].outs) if s in self.tensor_node
                 else self._fused_param(meta) if s.kind is SourceKind.PARAM and s.name in self.graph.trainable
                 else None
                 for s, meta in zip(srcs, op.inputs)]
        strategies = op_strategies(op, tp=self.tp, hints=[h or () for h in hints],
                                   allow_batch_split=self.allow_batch_split)
        self.strategies[op.name] = strategies
        compute = tuple(sum(self.op_cost(op, s.work_split)) for s in strategies)
        mem = tuple(param_bytes(op, s, self.tp, trainable=self.graph.trainable) for s in strategies)
        follows, follow_map = self._follow(op, strategies)
        self.nodes.append(ShardingNode(name=op.name, strategies=tuple(s.name for s in strategies), compute_s=compute,
                                       comm_s=(0.0,) * len(strategies), mem_bytes=mem, follows=follows,
                                       follow_map=follow_map))
        for k, src in enumerate(srcs):
            if src.kind is not SourceKind.PARAM:
                self._connect(src, op.name, tuple(s.inputs[k] for s in strategies),
                              tuple(s.input_grads()[k] for s in strategies), k)
        for i in range(len(op.outputs)):
            tensor = Source(SourceKind.OP, op.name, i)
            self.plans[f"{op.name}#{i}"] = NodePlan(name=op.name, outs=tuple(s.outputs[i] for s in strategies),
                                                    grad_needs=tuple(s.output_grads()[i] for s in strategies))
            self._register(tensor, f"{op.name}#{i}")

    def _fused_param(self, meta: TensorMeta) -> frozenset[Placement]:
        """The strided shards a trainable parameter of this shape may take (``fused_param_placements``)."""
        if self._cuts is None:
            self._cuts = fused_cuts(self.graph.layer.ops)
        return fused_param_placements(meta.shape, self._cuts, self.tp)

    def _follow(self, op: Op, strategies: tuple[OpStrategy, ...]) -> tuple[str | None, tuple[int, ...]]:
        """Views follow their producer: the strategy whose input is the producer's output, else R (index 0)."""
        srcs = self.graph.sources[op.name]
        if packet(op.target) not in VIEW_TARGETS or len(srcs) != 1 or srcs[0] not in self.tensor_node:
            return None, ()
        plan = self.plans[self.tensor_node[srcs[0]]]
        assert strategies[0].inputs[0].is_replicate, "op_strategies lists the replicated strategy first"
        exact = {(s.inputs[0], s.input_grads()[0]): i for i, s in reversed(list(enumerate(strategies)))}
        by_input = {s.inputs[0]: i for i, s in reversed(list(enumerate(strategies)))}
        return plan.name, tuple(exact.get((out, need), by_input.get(out, 0))
                                for out, need in zip(plan.outs, plan.grad_needs))

    def _register(self, tensor: Source, plan_key: str) -> None:
        """Make ``tensor`` available to readers, through a fan-out node when several ops read it."""
        readers = len(self.graph.consumers.get(tensor, ())) + (tensor in self.graph.outputs)
        if readers <= 1:
            self.tensor_node[tensor] = plan_key
            return
        producer = self.plans[plan_key]
        name = f"fan:{producer.name}:{tensor.output}"
        pairs = list(dict.fromkeys(
            (p, g) for p, need in zip(producer.outs, producer.grad_needs)
            for g in ((need, PARTIAL) if p.is_replicate and tensor in self.graph.requires_grad else (need,))
        ))
        outs, grads = tuple(p for p, _ in pairs), tuple(g for _, g in pairs)
        self.nodes.append(ShardingNode(
            name=name, strategies=tuple(f"{p}" if g == grad_placement(p) else f"{p} (grad {g})" for p, g in pairs),
            compute_s=(0.0,) * len(pairs), comm_s=(0.0,) * len(pairs), mem_bytes=(0.0,) * len(pairs)))
        self.edges.append(ShardingEdge(src=producer.name, dst=name, cost_s=self._edge_matrix(tensor, producer, outs,
                                                                                             grads)))
        self.edge_info.append((producer.name, name, tensor, 0))
        self.plans[name] = NodePlan(name=name, outs=outs, grad_needs=grads)
        self.tensor_node[tensor] = name

    def _connect(self, tensor: Source, dst: str, ins: tuple[Placement, ...], grads: tuple[Placement, ...],
                 k: int = 0) -> None:
        src = self.plans[self.tensor_node[tensor]]
        self.edges.append(ShardingEdge(src=src.name, dst=dst, cost_s=self._edge_matrix(tensor, src, ins, grads)))
        self.edge_info.append((src.name, dst, tensor, k))

    # ---- reading the solution ----

    def result(self, solution: ShardingSolution, *, sequence_parallel: bool) -> LayerShardingResult:
        """Collectives on the chosen edges, then the result value."""
        fwd_calls: list[CollectiveCall] = []
        bwd_calls: list[CollectiveCall] = []
        for src, dst, tensor, k in self.edge_info:
            src_plan = self.plans[src] if src in self.plans else self.plans[f"{src}#{tensor.output}"]
            i, j = solution.choice[src], solution.choice[dst]
            dst_in, dst_grad = self._dst_placements(dst, j, k)
            nbytes = self.graph.metas[tensor].nbytes
            label = tensor.name if tensor.kind is SourceKind.OP else "<input>"
            reader = "<output>" if dst.startswith("out:") else "<readers>" if dst.startswith("fan:") else dst
            self._record(fwd_calls, src_plan.outs[i], dst_in, nbytes, label, reader, forward=True)
            if tensor in self.graph.requires_grad:
                self._record(bwd_calls, dst_grad, src_plan.grad_needs[i], nbytes, label, reader, forward=False)
        return build_result(self.graph, tp=self.tp, sequence_parallel=sequence_parallel, solution=solution,
                            strategies=self.strategies, fwd_calls=fwd_calls, bwd_calls=bwd_calls,
                            forward_time=lambda op, split: self.op_cost(op, split)[0])

    def _dst_placements(self, dst: str, j: int, k: int) -> tuple[Placement, Placement]:
        if dst in self.strategies:
            s = self.strategies[dst][j]
            return s.inputs[k], s.input_grads()[k]
        plan = self.plans[dst]
        return plan.outs[j], plan.grad_needs[j]

    def _record(self, calls: list[CollectiveCall], src: Placement, dst: Placement, nbytes: int, tensor: str,
                reader: str, *, forward: bool) -> None:
        kind = reshard_collective(src, dst)
        if kind is not None:
            time_s = self.comm_time(src, dst, nbytes, forward=forward)
            calls.append(CollectiveCall(kind=kind.value, nbytes=nccl_size(kind, nbytes, self.tp), time_s=time_s,
                                        tensor=tensor, reader=reader))


__all__ = [
    "BACKWARD_COMPUTE_FACTOR",
    "CollectiveCall",
    "CollectiveTime",
    "LayerShardingResult",
    "OpStrategy",
    "OpCost",
    "OpTime",
    "op_strategies",
    "solve_layer_sharding",
]
