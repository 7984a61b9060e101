"""``GraphPricing``: the cost models and the intra-op ILP, packaged as the numbers the search asks for.

For each distinct (layer kind, tp, sequence parallelism) the sharding ILP picks a
strategy per op once; for each (micro-batch, recompute) the compute model prices the
layer's forward and backward with the ops the ILP split running on 1/tp of the work,
the TP collectives the ILP issued are priced on the TP group (backward issues the
conjugate collectives: an all-reduce for an all-reduce, reduce-scatter for all-gather),
and the memory model measures the activations from the graph's saved tensors.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

from autopar.cost_models import comm, compute, loss, memory, optimizer
from autopar.cost_models.cluster import Cluster
from autopar.graph.flops import MOE_ROUTING_SOURCE, has_routed_experts
from autopar.cost_models.layer_info import layer_capture_dtype
from autopar.graph.ir import DTYPE_BYTES, Layer, Op, OpGraph
from autopar.layout import Recompute
from autopar.plan import ShardingPlan
from autopar.solvers.costs import LayerCost
from autopar.solvers.space import ModelShape
from autopar.solvers.sharding.layer_result import LayerShardingResult
from autopar.solvers.sharding.strategies import solve_layer_sharding

OPTIMIZER = "foreach"
"""The AdamW the planner prices (``optimizer.py``): torch's default on GPUs (``_default_to_fused_or_foreach``
picks foreach when every tensor is on CUDA and neither flag is set), torchtitan's at its 2024-12 benchmark."""
CLIP_GRAD_NORM = True
"""Gradients clipped by ``clip_grad_norm_(foreach=True)`` before the step (torchtitan ``max_norm = 1.0``,
Megatron-LM ``--clip-grad 1.0``, nanoGPT ``grad_clip = 1.0``)."""
REDUCE_BYTES = 4
"""FSDP2 reduces gradients in fp32 (``emit/dp.py``: ``MixedPrecisionPolicy(reduce_dtype=torch.float32)``)."""


class _NodePrices:
    """Memo tables keyed by value (the setting's arguments) for one node kind (GPU, intra-node link)."""

    def __init__(self, *, node: tuple[object, object]) -> None:
        self.node = node
        self._tables: dict[str, dict[tuple[Any, ...], Any]] = {}

    def memo(self, name: str, compute: Callable[..., Any]) -> Callable[..., Any]:
        """``compute`` memoised in the table ``name`` by its positional arguments' values."""
        table = self._tables.setdefault(name, {})

        def cached(*args: Any) -> Any:
            if args not in table:
                table[args] = compute(*args)
            return table[args]

        return cached


def model_shape(graph: OpGraph) -> ModelShape:
    """What the search space needs from the graph."""
    info = graph.info
    return ModelShape(num_layers=len(graph.layers), num_heads=info.get("heads"), num_kv_heads=info.get("kv_heads"))


class GraphPricing:
    """Prices layers of one captured graph on one cluster; implements ``autopar.solvers.costs.Pricing``."""

    def __init__(self, graph: OpGraph, cluster: Cluster, *, dtype: str = "bfloat16", calibration: Any = None,
                 node_prices: _NodePrices | None = None) -> None:
        if dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"training dtype must be bfloat16, float16 or float32, got {dtype!r}")
        self.graph = graph
        self.cluster = cluster
        self.dtype = dtype
        self.calibration = calibration
        self._kinds = {layer.kind: layer for layer in graph.layers}  # first layer of each kind
        self._logits = loss.uncaptured_logits(graph)  # a whole-graph scan: once, not per priced setting
        node = (cluster.gpu, cluster.intra_node)
        if node_prices is None or node_prices.node != node:
            node_prices = _NodePrices(node=node)
        # layer prices, shardings and model states depend only on the GPU and its node's links: keyed by
        # value inside one _NodePrices, shared (explicitly) by the same graph on clusters of that node
        self.node_prices = node_prices
        self._layer_costs = node_prices.memo("layer_costs", self._compute_layer_costs)
        self._sharding = node_prices.memo("sharding", self._solve_sharding)
        self._states = node_prices.memo("states", self._states_uncached)
        self._collective = functools.lru_cache(maxsize=1 << 16)(self._collective_uncached)

    def for_cluster(self, cluster: Cluster) -> GraphPricing:
        """The same graph on another cluster; layer prices are reused when its nodes are the same."""
        return GraphPricing(self.graph, cluster, dtype=self.dtype, calibration=self.calibration,
                            node_prices=self.node_prices)

    # ---- Pricing protocol --------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return len(self.graph.layers)

    @property
    def gpu_mem_bytes(self) -> int:
        return int(self.cluster.gpu.mem_bytes)

    @property
    def peak_flops_per_s(self) -> float:
        return self.cluster.peak_flops(self.dtype)

    def layer_costs(self, *, tp: int, sequence_parallel: bool, micro_batch_size: int,
                    recompute: Recompute) -> tuple[LayerCost, ...]:
        return self._layer_costs(tp, sequence_parallel, micro_batch_size, Recompute(recompute))

    def model_state_bytes(self, num_params: float, *, zero_stage: int, dp: int) -> tuple[float, float, float]:
        return self._states(num_params, zero_stage, dp)

    def collective_time(self, kind: str, nbytes: float, *, group_size: int, nodes_spanned: int) -> float:
        return self._collective(kind, nbytes, group_size, nodes_spanned)

    def _states_uncached(self, num_params: float, zero_stage: int, dp: int) -> tuple[float, float, float]:
        s = memory.estimate_model_state_bytes(num_params, zero_stage=zero_stage, dp=dp, dtype=self.dtype)
        return float(s.params), float(s.grads), float(s.optimizer)

    def _collective_uncached(self, kind: str, nbytes: float, group_size: int, nodes_spanned: int) -> float:
        if group_size <= 1 and kind != "p2p":
            return 0.0
        return comm.estimate_collective_time(comm.Collective(kind), nbytes, max(2, group_size), cluster=self.cluster,
                                             nodes_spanned=min(nodes_spanned, self.cluster.nodes))

    def optimizer_step_time(self, num_params: float) -> float:
        return optimizer.estimate_optimizer_step_time(num_params, self.cluster.gpu, implementation=OPTIMIZER,
                                                      clip_grad_norm=CLIP_GRAD_NORM)

    def optimizer_temp_bytes(self, num_params: float) -> float:
        return optimizer.optimizer_temporary_bytes(num_params, implementation=OPTIMIZER)

    def fsdp_copy_time(self, num_params: float, *, gathers_per_step: int) -> tuple[float, float]:
        return comm.estimate_fsdp_copy_time(num_params, self.cluster.gpu, gathers_per_step=gathers_per_step,
                                            param_bytes=DTYPE_BYTES[self.dtype], reduce_bytes=REDUCE_BYTES)

    def buffer_bytes(self, *, largest_layer_params: float, zero_stage: int, dp: int) -> float:
        return memory.estimate_fixed_bytes(zero_stage=zero_stage, dp=dp, largest_layer_params=largest_layer_params,
                                           dtype=self.dtype)

    def grad_bytes_per_param(self) -> float:
        return float(REDUCE_BYTES)

    def param_bytes_per_param(self) -> float:
        return float(DTYPE_BYTES[self.dtype])

    def sharding_plans(self, *, tp: int, sequence_parallel: bool) -> Mapping[str, ShardingPlan]:
        if tp == 1:
            return {}
        return {kind: self._sharding(kind, tp, sequence_parallel).to_sharding_plan() for kind in self._kinds}

    def sources(self) -> dict[str, str]:
        """Where the prices come from, for ``Predicted.sources``."""
        calib = getattr(self.calibration, "device_name", None)
        found = {"compute": "profiled table + roofline" if calib else "roofline",
                 "calibration": str(calib or "none"), "communication": "alpha-beta (NCCL tuning model)",
                 "memory": "saved tensors measured on meta + ZeRO formulas"}
        if has_routed_experts([op.target for op in self.graph.ops]):
            found["experts"] = MOE_ROUTING_SOURCE
        return found

    # ---- internals ---------------------------------------------------------------------------

    def _batch_scale(self, micro_batch_size: int) -> float:
        return micro_batch_size / self.graph.batch_size

    def _float_scale(self) -> float:
        """Bytes of the training dtype over the capture dtype for activations (captured in fp32 usually)."""
        captured = next((p.dtype for p in self.graph.params if not p.is_buffer), "float32")
        return DTYPE_BYTES[self.dtype] / DTYPE_BYTES.get(captured, 4)

    def _solve_sharding(self, kind: str, tp: int, sequence_parallel: bool) -> LayerShardingResult:
        layer = self._kinds[kind]
        scale = self._float_scale()
        captured = layer_capture_dtype(layer)

        def op_cost(op: Op, shard: int) -> tuple[float, float]:
            """(forward, backward) seconds with the op's work split ``shard`` ways (fixed costs are not split)."""
            t = compute.estimate_op_time(op, self.cluster, dtype=self.dtype, shard=shard, capture_dtype=captured)
            return t.forward_s, t.backward_s

        return solve_layer_sharding(
            layer, tp=tp, sequence_parallel=sequence_parallel, op_cost=op_cost,
            collective_time=lambda k, b: self.collective_time(k, b * scale, group_size=tp, nodes_spanned=1))

    def _compute_layer_costs(self, tp: int, sequence_parallel: bool, micro_batch_size: int,
                             recompute: Recompute) -> tuple[LayerCost, ...]:
        by_kind = {kind: self._kind_cost(layer, tp, sequence_parallel, micro_batch_size, recompute)
                   for kind, layer in self._kinds.items()}
        costs = []
        for layer in self.graph.layers:
            cost = by_kind[layer.kind]
            if layer.boundary_nbytes != self._kinds[layer.kind].boundary_nbytes:
                cost = dataclasses.replace(cost, boundary_bytes=self._boundary(layer, micro_batch_size, tp,
                                                                               sequence_parallel))
            costs.append(cost)
        return tuple(costs)

    def _boundary(self, layer: Layer, micro_batch_size: int, tp: int, sequence_parallel: bool) -> float:
        nbytes = layer.boundary_nbytes * self._batch_scale(micro_batch_size) * self._float_scale()
        return nbytes / tp if sequence_parallel else nbytes

    def _kind_cost(self, layer: Layer, tp: int, sp: bool, mbs: int, recompute: Recompute) -> LayerCost:
        scale = self._batch_scale(mbs)
        sharding = self._sharding(layer.kind, tp, sp) if tp > 1 else None
        t = compute.estimate_layer_time(
            layer, self.cluster, dtype=self.dtype, batch_scale=scale, shard=tp,
            sharded_op=(sharding.is_split if sharding is not None else None), recompute=recompute,
            calibration=self.calibration)
        fwd_comm, bwd_comm = self._tp_comm(sharding, tp, scale, recompute)
        acts = memory.estimate_layer_activation_bytes(
            layer, micro_batch_size=mbs, graph_batch_size=self.graph.batch_size, recompute=recompute,
            dtype=self.dtype, tp=tp, sharded=(sharding.is_sharded if sharding is not None else None),
            sequence_parallel=sp)
        flops = layer.forward_flops * scale
        recompute_flops = flops * (t.recompute_s / t.forward_s) if t.forward_s > 0 else 0.0
        params = sharding.param_count_per_gpu() if sharding is not None else float(layer.num_params)
        loss_fwd, loss_bwd, loss_acts = self._loss_terms(layer, scale, sharding)
        return LayerCost(
            forward_s=t.forward_s + sum(fwd_comm.values()) + loss_fwd,
            backward_s=t.backward_s + sum(bwd_comm.values()) + loss_bwd,
            forward_flops=flops, recompute_flops=recompute_flops, activation_bytes=float(acts) + loss_acts,
            param_count=params, boundary_bytes=self._boundary(layer, mbs, tp, sp),
            tp_comm_s=sum(fwd_comm.values()) + sum(bwd_comm.values()),
        )

    def _loss_terms(self, layer: Layer, scale: float,
                    sharding: LayerShardingResult | None) -> tuple[float, float, float]:
        """(forward_s, backward_s, saved bytes) of the fp32 cross-entropy on the last layer's logits (loss.py)."""
        logits = self._logits
        if logits is None or layer.kind != self.graph.layers[-1].kind:
            return 0.0, 0.0, 0.0
        op, tokens, vocab = logits
        out = sharding.output_placements.get(op.name, ()) if sharding is not None else ()
        if out and out[0].is_shard and out[0].dim == len(op.outputs[0].shape) - 1:
            vocab //= sharding.tp if sharding is not None else 1  # vocab-parallel logits: V/t per rank
        fwd, bwd = loss.estimate_cross_entropy_time(tokens * scale, vocab, logits_dtype=self.dtype,
                                                    gpu=self.cluster.gpu)
        return fwd, bwd, loss.cross_entropy_saved_bytes(tokens * scale, vocab)

    def _tp_comm(self, sharding: LayerShardingResult | None, tp: int, scale: float,
                 recompute: Recompute) -> tuple[dict[str, float], dict[str, float]]:
        """TP collective seconds per micro-batch: forward, and backward (+ the forward's again under full recompute)."""
        if sharding is None:
            return {}, {}

        def price(calls: tuple[tuple[str, int], ...]) -> dict[str, float]:
            out: dict[str, float] = {}
            for kind, nbytes in calls:
                size = nbytes * scale * self._float_scale()
                out[kind] = out.get(kind, 0.0) + self.collective_time(kind, size, group_size=tp, nodes_spanned=1)
            return out

        fwd, bwd = price(sharding.forward_collectives), price(sharding.backward_collectives)
        if recompute is Recompute.FULL:
            for kind, seconds in fwd.items():
                bwd[kind] = bwd.get(kind, 0.0) + seconds
        return fwd, bwd

