"""Step 3 of planning: the cost models and the intra-op ILP price layer settings into frozen tables.

For each distinct (layer kind, tp, sequence parallelism) the sharding ILP picks a
strategy per op once; for each (micro-batch, recompute) the compute model prices the
layer's forward and backward with the ops the ILP split running on 1/tp of the work,
the TP collectives the ILP issued are priced on the TP group (backward issues the
conjugate collectives: an all-reduce for an all-reduce, reduce-scatter for all-gather),
and the memory model measures the activations from the graph's saved tensors.

``LayerPricer.table(settings)`` returns those prices as a ``LayerCostTable`` (a frozen value
keyed by ``LayerSetting``); the search (step 4) reads them and never calls back: ``run_search``
prices exactly the settings ``search_steps`` asks for and sends each new table in.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Mapping
from typing import Any

from autopar.cost_models import comm, compute, dtensor_host, loss, memory
from autopar.cost_models.dtensor_host import REDUCING_COLLECTIVES
from autopar.cost_models.cluster import Cluster
from autopar.graph.flops import MOE_ROUTING_SOURCE, has_routed_experts
from autopar.cost_models.layer_info import layer_capture_dtype
from autopar.cost_models.runtimes import RuntimeProgram, program_of
from autopar.graph.ir import DTYPE_BYTES, Layer, Op, OpGraph
from autopar.layout import Recompute, Runtime, TPStyle
from autopar.plan import ShardingPlan
from autopar.solvers.costs import LayerCost, LayerCostTable, LayerSetting, PriceTable
from autopar.solvers.search import SearchResult, Steps
from autopar.solvers.space import ModelShape
from autopar.solvers.sharding.layer_result import LayerShardingResult
from autopar.solvers.sharding.strategies import solve_layer_sharding


def model_shape(graph: OpGraph) -> ModelShape:
    """What the search space needs from the graph."""
    info = graph.info
    return ModelShape(num_layers=len(graph.layers), num_heads=info.get("heads"), num_kv_heads=info.get("kv_heads"))


class _Memo:
    """Rows and shardings already priced, keyed by value; shared by pricers of one graph on one node kind."""

    def __init__(self, node: tuple[object, ...]) -> None:
        self.node = node
        self.rows: dict[LayerSetting, tuple[LayerCost, ...]] = {}
        self.shardings: dict[tuple[str, int, bool], LayerShardingResult] = {}
        self.op_times: dict[tuple[str, int, bool, int], dict[str, compute.OpTime]] = {}  # every policy's


class LayerPricer:
    """Prices the layers of one captured graph on one cluster's node kind (GPU and intra-node link).

    Layer costs depend only on the GPU and the links inside a node (TP groups stay in a node), so a
    pricer for another cluster of the same node kind reuses every row (``for_cluster``).
    """

    def __init__(self, graph: OpGraph, cluster: Cluster, *, dtype: str = "bfloat16", calibration: Any = None,
                 runtime: Runtime = Runtime.AUTOPAR, _memo: _Memo | None = None) -> None:
        if dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"training dtype must be bfloat16, float16 or float32, got {dtype!r}")
        self.graph = graph
        self.cluster = cluster
        self.dtype = dtype
        self.calibration = calibration
        self.runtime = Runtime(runtime)  # the program priced; the layer rows do not depend on it (yet: _loss_terms)
        self._kinds = {layer.kind: layer for layer in graph.layers}  # first layer of each kind
        self._layer_kinds = tuple(layer.kind for layer in graph.layers)
        # layers whose input differs in size from their kind's first layer's: boundary priced apart (read once)
        self._odd_boundaries = tuple(i for i, layer in enumerate(graph.layers)
                                     if layer.boundary_nbytes != self._kinds[layer.kind].boundary_nbytes)
        self._logits = loss.uncaptured_logits(graph)  # a whole-graph scan: once, not per priced setting
        node = (cluster.gpu, cluster.intra_node)  # dtype and calibration: the pricer's own (for_cluster keeps them)
        self._memo = _memo if _memo is not None and _memo.node == node else _Memo(node)
        self._collective = functools.lru_cache(maxsize=1 << 16)(self._collective_uncached)

    def for_cluster(self, cluster: Cluster) -> LayerPricer:
        """The same graph on another cluster; rows already priced are reused when its nodes are the same."""
        return LayerPricer(self.graph, cluster, dtype=self.dtype, calibration=self.calibration, runtime=self.runtime,
                           _memo=self._memo)

    @property
    def peak_flops_per_s(self) -> float:
        """Dense peak of one GPU at the training dtype."""
        return self.cluster.peak_flops(self.dtype)

    def table(self, settings: Iterable[LayerSetting]) -> LayerCostTable:
        """The costs of every layer at each of ``settings``, as a frozen table."""
        rows = {}
        for setting in settings:
            setting = LayerSetting(setting.tp, setting.sequence_parallel, setting.micro_batch_size,
                                   Recompute(setting.recompute))
            if setting not in self._memo.rows:
                self._memo.rows[setting] = self._price_row(setting)
            rows[setting] = self._memo.rows[setting]
        return LayerCostTable.of(len(self.graph.layers), rows)

    def prices(self, settings: Iterable[LayerSetting] = ()) -> PriceTable:
        """A ``PriceTable`` for this pricer's cluster holding ``settings``."""
        return PriceTable(layers=self.table(settings), cluster=self.cluster, dtype=self.dtype, runtime=self.runtime)

    @property
    def program(self) -> RuntimeProgram:
        """What the priced runtime runs (``cost_models/runtimes.py``)."""
        return program_of(self.runtime)

    def sharding_plans(self, *, tp: int, sequence_parallel: bool) -> Mapping[str, ShardingPlan]:
        """Per layer kind: the ILP's sharding at this TP size (empty at tp = 1)."""
        if tp == 1:
            return {}
        return {kind: self._sharding(kind, tp, sequence_parallel).to_sharding_plan() for kind in self._kinds}

    def sources(self) -> dict[str, str]:
        """Where the prices come from, for ``Predicted.sources``."""
        calib = getattr(self.calibration, "device_name", None)
        found = {"compute": "profiled table + roofline" if calib else "roofline",
                 "calibration": str(calib or "none"), "communication": "alpha-beta (NCCL tuning model)",
                 "memory": "saved tensors measured on meta + ZeRO formulas", "runtime": self.program.label}
        if has_routed_experts([op.target for layer in self._kinds.values() for op in layer.ops]):  # one per kind
            found["experts"] = MOE_ROUTING_SOURCE
        return found

    def collective_time(self, kind: str, nbytes: float, *, group_size: int, nodes_spanned: int) -> float:
        """Seconds for one collective of ``nbytes`` over a group of this cluster (TP collectives)."""
        return self._collective(kind, nbytes, group_size, nodes_spanned)

    def _collective_uncached(self, kind: str, nbytes: float, group_size: int, nodes_spanned: int) -> float:
        if group_size <= 1 and kind != "p2p":
            return 0.0
        return comm.estimate_collective_time(comm.Collective(kind), nbytes, max(2, group_size), cluster=self.cluster,
                                             nodes_spanned=min(nodes_spanned, self.cluster.nodes))

    def _sharding(self, kind: str, tp: int, sequence_parallel: bool) -> LayerShardingResult:
        key = (kind, tp, sequence_parallel)
        if key not in self._memo.shardings:
            self._memo.shardings[key] = self._solve_sharding(kind, tp, sequence_parallel)
        return self._memo.shardings[key]

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
        captured, grads = layer_capture_dtype(layer), compute.layer_grad_inputs(layer)

        def op_cost(op: Op, shard: int) -> tuple[float, float]:
            """(forward, backward) seconds with the op's work split ``shard`` ways (fixed costs are not split), as
            the layer is priced (``layer_op_times``): measured ops from the calibration table, each op's backward
            for the inputs that need a gradient."""
            t = compute.estimate_op_time(op, self.cluster, dtype=self.dtype, shard=shard, capture_dtype=captured,
                                         calibration=self.calibration, grad_inputs=grads[op.name])
            return t.forward_s, t.backward_s

        # the last layer's logits may stay split over the vocabulary: the emitted program hands them to the loss
        # as they are (``emit/loss.py``: loss_parallel), so no gather is priced there
        free = self._logits is not None and kind == self.graph.layers[-1].kind
        return solve_layer_sharding(
            layer, tp=tp, sequence_parallel=sequence_parallel, op_cost=op_cost, free_output=free,
            collective_time=lambda k, b: self.collective_time(k, b * scale, group_size=tp, nodes_spanned=1))

    def _price_row(self, setting: LayerSetting) -> tuple[LayerCost, ...]:
        """Every layer's cost at ``setting``: each kind priced once, layers of a kind share its value."""
        tp, sp, mbs, recompute = setting
        by_kind = {kind: self._kind_cost(layer, tp, sp, mbs, recompute) for kind, layer in self._kinds.items()}
        costs = [by_kind[kind] for kind in self._layer_kinds]
        for i in self._odd_boundaries:
            layer = self.graph.layers[i]
            costs[i] = dataclasses.replace(costs[i], boundary_bytes=self._boundary(layer, mbs, tp, sp))
        return tuple(costs)

    def _boundary(self, layer: Layer, micro_batch_size: int, tp: int, sequence_parallel: bool) -> float:
        """Bytes of one micro-batch a stage boundary before ``layer`` sends: split over tp under sequence
        parallelism only where the program sends the sequence shard (``RuntimeProgram.sp_shards_boundaries``)."""
        nbytes = layer.boundary_nbytes * self._batch_scale(micro_batch_size) * self._float_scale()
        return nbytes / tp if sequence_parallel and self.program.sp_shards_boundaries else nbytes

    def _kind_cost(self, layer: Layer, tp: int, sp: bool, mbs: int, recompute: Recompute) -> LayerCost:
        scale = self._batch_scale(mbs)
        sharding = self._sharding(layer.kind, tp, sp) if tp > 1 else None
        split = sharding.is_split if sharding is not None else None
        key = (layer.kind, tp, sp, mbs)  # the ops' times, shared by the recomputation policies
        if key not in self._memo.op_times:
            self._memo.op_times[key] = compute.layer_op_times(layer, self.cluster, dtype=self.dtype, batch_scale=scale,
                                                              shard=tp, sharded_op=split, calibration=self.calibration)
        t = compute.estimate_layer_time(layer, self.cluster, dtype=self.dtype, batch_scale=scale, shard=tp,
                                        sharded_op=split, recompute=recompute, calibration=self.calibration,
                                        op_times=self._memo.op_times[key])
        fwd_comm, bwd_comm = self._tp_comm(sharding, tp, scale, recompute)
        hooks_fwd, hooks_bwd = self._tp_hooks(layer, sharding, sp, recompute)
        placed = sp and sharding is not None and self.program.sp_by_placement
        held_split = sharding.is_sharded if sharding is not None else None  # which saved tensors are held split
        if placed and sharding is not None:
            rowwise = {m for m, style in sharding.modules.items() if style is TPStyle.ROWWISE}
            held_split = memory.sequence_parallel_split(layer, sharding.is_sharded, rowwise)
        acts = memory.estimate_layer_activation_bytes(
            layer, micro_batch_size=mbs, graph_batch_size=self.graph.batch_size, recompute=recompute,
            dtype=self.dtype, tp=tp, sharded=held_split, sequence_parallel=sp, placed=placed)
        flops = layer.forward_flops * scale
        recompute_flops = flops * (t.recompute_s / t.forward_s) if t.forward_s > 0 else 0.0
        params = sharding.param_count_per_gpu() if sharding is not None else float(layer.num_params)
        loss_fwd, loss_bwd, loss_acts, loss_working, logits, loss_comm = self._loss_terms(layer, scale, sharding)
        return LayerCost(
            forward_s=t.forward_s + sum(fwd_comm.values()) + loss_fwd + hooks_fwd,
            backward_s=t.backward_s + sum(bwd_comm.values()) + loss_bwd + hooks_bwd,
            forward_flops=flops, recompute_flops=recompute_flops, activation_bytes=float(acts) + loss_acts,
            param_count=params, boundary_bytes=self._boundary(layer, mbs, tp, sp),
            tp_comm_s=sum(fwd_comm.values()) + sum(bwd_comm.values()) + loss_comm, working_bytes=loss_working,
            output_bytes=logits,
        )

    def _loss_terms(self, layer: Layer, scale: float,
                    sharding: LayerShardingResult | None) -> tuple[float, float, float, float, float, float]:
        """(forward_s, backward_s, saved bytes, backward working bytes, logits bytes, TP collective seconds) of the
        fp32 cross-entropy on the last layer's logits, one micro-batch (loss.py).

        On vocabulary-split logits the emitted program keeps them ``Shard(-1)`` and runs the loss under
        ``loss_parallel()`` (``emit/loss.py``): time and memory at V/t per rank, plus its all-reduces.
        """
        logits = self._logits
        if logits is None or layer.kind != self.graph.layers[-1].kind:
            return 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
        op, tokens, vocab = logits
        tokens *= scale
        out = sharding.output_placements.get(op.name, ()) if sharding is not None else ()
        split = sharding is not None and bool(out) and out[0].is_shard and out[0].dim == len(op.outputs[0].shape) - 1
        local = vocab // sharding.tp if split and sharding is not None else vocab
        fwd, bwd = loss.estimate_cross_entropy_time(tokens, local, logits_dtype=self.dtype, gpu=self.cluster.gpu)
        comm_s = sum(self.collective_time("all_reduce", nbytes, group_size=sharding.tp, nodes_spanned=1)
                     for nbytes in loss.loss_parallel_all_reduce_bytes(tokens)) if split and sharding else 0.0
        return (fwd + comm_s, bwd, loss.cross_entropy_saved_bytes(tokens, local),
                loss.cross_entropy_backward_working_bytes(tokens, local, vocab_parallel=split),
                tokens * local * DTYPE_BYTES[self.dtype], comm_s)

    def _tp_hooks(self, layer: Layer, sharding: LayerShardingResult | None, sequence_parallel: bool,
                  recompute: Recompute) -> tuple[float, float]:
        """(forward, backward) seconds of the layer's Megatron *f* wraps per micro-batch (``dtensor_host``): one at
        each weight-holding child's input without SP (under SP those inputs are redistributed: collectives), and
        one after each row-split module's reduction (a forward reducing collective); the forward's again in
        backward under full recompute."""
        if sharding is None:
            return 0.0, 0.0
        reductions = sum(1 for kind, _ in sharding.forward_collectives if kind in REDUCING_COLLECTIVES)
        sites = 0 if sequence_parallel else dtensor_host.tp_hook_sites(layer)
        fwd, bwd = dtensor_host.dtensor_hook_host_s(sites + reductions, self.cluster.gpu)
        return fwd, bwd + (fwd if recompute is Recompute.FULL else 0.0)

    def _tp_comm(self, sharding: LayerShardingResult | None, tp: int, scale: float,
                 recompute: Recompute) -> tuple[dict[str, float], dict[str, float]]:
        """TP collective seconds per micro-batch: forward, and backward (+ the forward's again under full recompute)."""
        if sharding is None:
            return {}, {}

        def price(calls: tuple[tuple[str, int], ...]) -> dict[str, float]:
            out: dict[str, float] = {}
            for kind, nbytes in calls:
                size = nbytes * scale * self._float_scale()
                out[kind] = (out.get(kind, 0.0) + self.collective_time(kind, size, group_size=tp, nodes_spanned=1)
                             + dtensor_host.dtensor_collective_host_s(1, self.cluster.gpu))
            return out

        fwd, bwd = price(sharding.forward_collectives), price(sharding.backward_collectives)
        if recompute is Recompute.FULL:
            for kind, seconds in fwd.items():
                bwd[kind] = bwd.get(kind, 0.0) + seconds
        return fwd, bwd



def run_search(steps: Steps, pricer: LayerPricer, prices: PriceTable | None = None) -> SearchResult:
    """Drive ``search_steps``: price each batch of settings it asks for into a new table and send it in."""
    table = prices if prices is not None else pricer.prices()
    try:
        wanted = next(steps)
        while True:
            table = table.with_layers(pricer.table(wanted))
            wanted = steps.send(table)
    except StopIteration as done:
        result: SearchResult = done.value
        return result
