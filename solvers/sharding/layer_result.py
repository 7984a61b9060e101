"""What the intra-op solver decided for one layer, in the terms the rest of autopar uses.

``LayerShardingResult`` holds the chosen strategy and placements per op, the
collectives one micro-batch issues, predicted times, parameter bytes per GPU,
the TP style of every parameterised module (for the emitter), and
``is_sharded(saved)`` for the activation-memory model.
"""

from __future__ import annotations

from typing import TypeVar

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

from autopar.graph.ir import Layer, Op, SavedTensor
from autopar.layout import TPStyle
from autopar.plan import ShardingPlan
from autopar.solvers.sharding.layer_graph import LayerGraph, SourceKind
from autopar.solvers.sharding.placement import Placement
from autopar.solvers.sharding.sharding_ilp import ShardingSolution
from autopar.solvers.sharding.op_rules import OpStrategy
from autopar.solvers.sharding.op_strategies import param_bytes
from autopar.solvers.sharding.view_rules import packet

V = TypeVar("V")
"""Value type of a mapping being re-keyed by ``rename``."""


class CollectiveCall(NamedTuple):
    """One collective issued by a resharding, per micro-batch."""

    kind: str
    """``all_reduce``, ``all_gather``, ``reduce_scatter`` or ``all_to_all``."""
    nbytes: int
    """Size as NCCL counts it: the whole tensor (one rank's buffer, the whole / t, for all-to-all)."""
    time_s: float
    """Its predicted time."""
    tensor: str
    """Op that produced the tensor (``<input>`` for the layer's input)."""
    reader: str
    """Op that needed it resharded (``<readers>`` when shared by several readers, ``<output>`` for the next layer)."""


_LINEAR_WEIGHT_READERS = frozenset({"t", "transpose", "permute", "linear", "numpy_T"})


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerShardingResult:
    """The sharding of one layer (and of every layer of its kind) at one TP size."""

    layer_kind: str
    """``Layer.kind`` solved for."""
    layer_path: str
    """Module path of the layer the names below refer to."""
    tp: int
    """Tensor-parallel size."""
    sequence_parallel: bool
    """Whether the hidden state was pinned to S(1) at the layer boundary."""
    op_names: tuple[str, ...]
    """The layer's ops in order (used to rebind the result to another layer of the same kind)."""
    strategies: Mapping[str, str]
    """Op → chosen strategy, e.g. ``"S(1) = R x S(1)"`` (inputs in call order, parameters included)."""
    input_placements: Mapping[str, tuple[Placement, ...]]
    """Op → placement of each tensor input."""
    output_placements: Mapping[str, tuple[Placement, ...]]
    """Op → placement of each tensor output."""
    input_producers: Mapping[str, tuple[str | None, ...]]
    """Op → producer op of each tensor input (None outside the layer)."""
    input_shapes: Mapping[str, tuple[tuple[int, ...], ...]]
    """Op → shape of each tensor input."""
    output_shapes: Mapping[str, tuple[tuple[int, ...], ...]]
    """Op → shape of each output."""
    work_split: Mapping[str, bool]
    """Op → whether each GPU does 1/t of its work."""
    forward_calls: tuple[CollectiveCall, ...]
    """Collectives of one forward pass of one micro-batch, with where they happen and their time."""
    backward_calls: tuple[CollectiveCall, ...]
    """Collectives of one backward pass of one micro-batch (activation gradients), likewise."""
    forward_compute_s: float
    """Forward compute of one micro-batch on one GPU."""
    forward_comm_s: float
    """Forward collectives of one micro-batch."""
    backward_comm_s: float
    """Backward collectives of one micro-batch."""
    objective_s: float
    """The ILP objective: forward + backward compute and communication of one micro-batch."""
    param_bytes_per_gpu: float
    """Trainable parameter bytes each GPU holds (capture dtype)."""
    params_per_gpu: float
    """Trainable parameters (elements) each GPU holds."""
    tp_grad_sync_bytes: float
    """Bytes of replicated parameters whose gradients are partial over TP (all-reduced once per step)."""
    modules: Mapping[str, TPStyle]
    """Relative module path → TP style, for modules whose weight feeds a Linear or an Embedding."""
    params: Mapping[str, str]
    """Relative parameter path → placement (``"S(1,sf=2)"``) where no module style says it (``ShardingPlan.params``)."""
    optimal: bool
    """False when the ILP hit its time limit before proving optimality."""

    @property
    def forward_time_s(self) -> float:
        """Forward compute + forward communication of one micro-batch."""
        return self.forward_compute_s + self.forward_comm_s

    @property
    def forward_collectives(self) -> tuple[tuple[str, int], ...]:
        """(kind, NCCL size in bytes) of each forward collective, as ``ShardingPlan`` stores them."""
        return tuple((c.kind, c.nbytes) for c in self.forward_calls)

    @property
    def backward_collectives(self) -> tuple[tuple[str, int], ...]:
        """(kind, NCCL size in bytes) of each backward collective."""
        return tuple((c.kind, c.nbytes) for c in self.backward_calls)

    def op_strategies(self) -> dict[str, str]:
        """Op name → chosen strategy text (``ShardingPlan.ops``)."""
        return dict(self.strategies)

    def is_split(self, op: Op) -> bool:
        """Whether ``op`` (of this layer, or the same position in a layer of this kind) runs on 1/t of its work."""
        return self.work_split.get(op.name, False)

    def param_count_per_gpu(self) -> float:
        """Trainable parameters each GPU holds after TP sharding."""
        return self.params_per_gpu

    def module_styles(self) -> dict[str, TPStyle]:
        """Relative module path (e.g. ``"attn.q_proj"``) → ``TPStyle``."""
        return dict(self.modules)

    def is_sharded(self, saved: SavedTensor) -> bool:
        """Whether a saved activation is held 1/t per GPU: its producer's output, or the saver's copy, is S.

        A tensor from outside the layer (its input) is matched to the saver's
        boundary inputs by shape.
        """
        outs = self.output_placements.get(saved.producer or "", ())
        shapes = self.output_shapes.get(saved.producer or "", ())
        if any(p.is_shard for p, shape in zip(outs, shapes) if shape == saved.meta.shape):
            return True
        inside = saved.producer in self.output_placements
        ins = zip(self.input_placements.get(saved.saver, ()), self.input_producers.get(saved.saver, ()),
                  self.input_shapes.get(saved.saver, ()))
        return any(p.is_shard for p, prod, shape in ins
                   if (prod == saved.producer if inside else prod is None and shape == saved.meta.shape))

    def to_sharding_plan(self) -> ShardingPlan:
        """The ``ShardingPlan`` stored in a ``StagePlan``."""
        return ShardingPlan(layer_kind=self.layer_kind, modules=dict(self.modules), params=dict(self.params),
                            ops=dict(self.strategies),
                            forward_collectives=self.forward_collectives)

    def rebind(self, layer: Layer) -> LayerShardingResult:
        """The same result named after another layer of the same kind (ops matched by position)."""
        if layer.kind != self.layer_kind or len(layer.ops) != len(self.op_names):
            raise ValueError(f"cannot rebind a result for kind {self.layer_kind} to layer {layer.module_path} "
                             f"of kind {layer.kind}")
        names = dict(zip(self.op_names, (op.name for op in layer.ops)))
        if all(a == b for a, b in names.items()):
            return self

        def rename(mapping: Mapping[str, V]) -> dict[str, V]:
            return {names[k]: v for k, v in mapping.items()}

        def calls(cs: tuple[CollectiveCall, ...]) -> tuple[CollectiveCall, ...]:
            return tuple(c._replace(tensor=names.get(c.tensor, c.tensor), reader=names.get(c.reader, c.reader))
                         for c in cs)

        producers = {names[k]: tuple(names.get(p, p) if p else None for p in v)
                     for k, v in self.input_producers.items()}
        return dataclasses.replace(
            self, layer_path=layer.module_path, op_names=tuple(op.name for op in layer.ops),
            strategies=rename(self.strategies), input_placements=rename(self.input_placements),
            output_placements=rename(self.output_placements), output_shapes=rename(self.output_shapes),
            input_shapes=rename(self.input_shapes),
            work_split=rename(self.work_split), input_producers=producers,
            forward_calls=calls(self.forward_calls), backward_calls=calls(self.backward_calls),
        )


def relative_module(param: str, layer_path: str) -> str:
    """Module path of a parameter, relative to the layer when the layer is a module.

    Example:
        >>> relative_module("blocks.0.attn.q_proj.weight", "blocks.0")
        'attn.q_proj'
        >>> relative_module("lm_head.weight", "ln_f+lm_head")
        'lm_head'
    """
    module = param.rsplit(".", 1)[0] if "." in param else param
    if layer_path and module.startswith(layer_path + "."):
        return module[len(layer_path) + 1:]
    return module


# [emit, issue 10] A weight that a matmul reads directly as its right operand is stored (in, out),
# as Hugging Face's Conv1D (GPT-2's c_attn, c_fc, c_proj) keeps it: ``x @ W (+ b)``. Naming its style
# lets the emitter split it (autopar/emit/tp.py WEIGHT_DIMS["Conv1D"]); before, such weights got no
# style and were run replicated although the ILP priced them split.
_IN_OUT_WEIGHT_READERS = frozenset({"mm", "addmm"})
"""Ops whose last operand, when it is a parameter, is a weight stored (in, out)."""


def _style(op: Op, placement: Placement, position: int = 0) -> TPStyle | None:
    """TP style from where a weight is split: Linear (out, in), Embedding (vocab, dim), or (in, out) for
    a weight a matmul reads directly (``position``: the weight's index among the op's tensor inputs)."""
    name = packet(op.target)
    if name == "embedding":
        split_vocab, split_other = TPStyle.ROWWISE, TPStyle.COLWISE
    elif name in _IN_OUT_WEIGHT_READERS and position == len(op.inputs) - 1:  # [emit, issue 10]
        split_vocab, split_other = TPStyle.ROWWISE, TPStyle.COLWISE  # dim 1 of an (in, out) weight = out-features
    elif name in _LINEAR_WEIGHT_READERS:
        split_vocab, split_other = TPStyle.COLWISE, TPStyle.ROWWISE  # dim 0 of a Linear weight = out-features
    else:
        return None
    if placement.is_replicate:
        return TPStyle.REPLICATE
    return split_vocab if placement.dim == 0 else split_other


def _modules(graph: LayerGraph, chosen: Mapping[str, OpStrategy]) -> dict[str, TPStyle]:
    styles: dict[str, TPStyle] = {}
    for op in graph.layer.ops:
        for position, (meta, src, p) in enumerate(zip(op.inputs, graph.sources[op.name], chosen[op.name].inputs)):
            if src.kind is SourceKind.PARAM and len(meta.shape) == 2 and src.name in graph.trainable:
                style = _style(op, p, position)
                if style is not None:
                    styles[relative_module(src.name, graph.layer.module_path)] = style
    return styles


def _params(graph: LayerGraph, chosen: Mapping[str, OpStrategy]) -> dict[str, str]:
    """Relative parameter path → placement, for split parameters no module style describes: weights of more
    than two dims (an MoE's stacked experts, (E, out, in)) and strided shards (a fused projection split at its
    seams). 1-D parameters follow their module's style or stay replicated, as before: a fused projection's
    bias is then plainly split (DTensor moves its few elements to the strided layout the output needs), and
    FSDP can still split it on dim 0 (torch cannot reassemble a strided TP split that FSDP splits again on
    the same dim; ``autopar.emit.dp.beside_strided_tp`` moves FSDP to another dim where a weight has one)."""
    out: dict[str, str] = {}
    for op in graph.layer.ops:
        for meta, src, p in zip(op.inputs, graph.sources[op.name], chosen[op.name].inputs):
            if src.kind is SourceKind.PARAM and src.name in graph.trainable and p.is_shard \
                    and (len(meta.shape) > 2 or (p.sf > 1 and len(meta.shape) == 2)):
                out[relative_param(src.name, graph.layer.module_path)] = str(p)
    return out


def relative_param(param: str, layer_path: str) -> str:
    """A parameter's path relative to the layer when the layer is a module.

    Example:
        >>> relative_param("model.layers.0.mlp.experts.down_proj", "model.layers.0")
        'mlp.experts.down_proj'
    """
    return param[len(layer_path) + 1:] if layer_path and param.startswith(layer_path + ".") else param


def build_result(graph: LayerGraph, *, tp: int, sequence_parallel: bool, solution: ShardingSolution,
                 strategies: Mapping[str, tuple[OpStrategy, ...]], fwd_calls: list[CollectiveCall],
                 bwd_calls: list[CollectiveCall], forward_time: Callable[[Op, bool], float]) -> LayerShardingResult:
    """Assemble the result from the solver's choice."""
    layer = graph.layer
    chosen = {op.name: strategies[op.name][solution.choice[op.name]] for op in layer.ops}
    compute = math.fsum(forward_time(op, chosen[op.name].work_split) for op in layer.ops)
    params = math.fsum(param_bytes(op, chosen[op.name], tp, trainable=graph.trainable) for op in layer.ops)
    count = math.fsum(param_bytes(op, chosen[op.name], tp, trainable=graph.trainable, per_element=True)
                      for op in layer.ops)
    sync = math.fsum(
        meta.nbytes for op in layer.ops
        for meta, src, g in zip(op.inputs, graph.sources[op.name], chosen[op.name].input_grads())
        if src.kind is SourceKind.PARAM and src.name in graph.trainable and g.is_partial
    )
    return LayerShardingResult(
        layer_kind=layer.kind, layer_path=layer.module_path, tp=tp, sequence_parallel=sequence_parallel,
        op_names=tuple(op.name for op in layer.ops),
        strategies={n: s.name for n, s in chosen.items()},
        input_placements={n: s.inputs for n, s in chosen.items()},
        output_placements={n: s.outputs for n, s in chosen.items()},
        input_producers={op.name: tuple(s.name if s.kind is SourceKind.OP else None for s in graph.sources[op.name])
                         for op in layer.ops},
        input_shapes={op.name: tuple(i.shape for i in op.inputs) for op in layer.ops},
        output_shapes={op.name: tuple(o.shape for o in op.outputs) for op in layer.ops},
        work_split={n: s.work_split for n, s in chosen.items()},
        forward_calls=tuple(fwd_calls), backward_calls=tuple(bwd_calls),
        forward_compute_s=compute, forward_comm_s=math.fsum(c.time_s for c in fwd_calls),
        backward_comm_s=math.fsum(c.time_s for c in bwd_calls), objective_s=solution.cost_s,
        param_bytes_per_gpu=params, params_per_gpu=count, tp_grad_sync_bytes=sync, modules=_modules(graph, chosen),
        params=_params(graph, chosen),
        optimal=solution.optimal,
    )


__all__ = ["CollectiveCall", "LayerShardingResult", "build_result", "relative_module", "relative_param"]
