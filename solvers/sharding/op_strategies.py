"""Sharding strategies of single ATen ops over one tensor-parallel mesh axis of size t.

A strategy fixes a placement (``R``, ``S(d)``, ``P``; see ``solvers/sharding/placement.py``)
for every tensor input and output of an op. Its text form follows Colossal-AI's
readable names, outputs first: ``S(1) = R x S(1)`` is a column-split matmul
(activation replicated, weight split on its output features, output split on
its last dim), ``P = S(1) x S(0)`` a row split whose output is a partial sum.

Rules, by op family (R everywhere is always a strategy):

* matmuls (mm, addmm, bmm, baddbmm, linear) as einsums: shard one index; an index
  that is summed over gives a partial output (and a partial addend/bias);
* routed experts' grouped GEMM: each expert's matmul split on N (column) or K (row, P out);
* attention kernels: shard the heads dim (1) of q/k/v/out (and the batch dim 0 on request);
* pointwise ops and dropout: any output dim, inputs agree, broadcast dims stay R;
  linear ones (add, sub, neg, mul/div by a replicated factor) also take P → P;
* norms: any dim that is not normalised (batch/sequence: Megatron's sequence parallelism);
* softmax: any dim but the softmax dim; reductions: kept dims, or the reduced dim → P (sum/mean);
* embedding: vocab split (weight S(0), output P) or embedding-dim split (weight S(1));
* views, reshapes, transposes, slices, splits: the input placement mapped through (``view_rules``);
  a parameter may also take the strided shards a split of its layer asks for (a fused projection
  cut into k equal parts: ``S(d,sf=k)``, split at the parts' seams; ``fused_param_placements``);
* cat/stack: any dim but the joined one; losses: batch split → P;
* anything else: replicate only.

An op's own collective is always none: a partial output is resolved by the
resharding on the edge to its consumer. Strategies that split a matmul's or an
embedding's work while its weight stays replicated (batch/data parallelism
inside the TP group) are off unless ``allow_batch_split``: the dp axis owns
data parallelism, and the emitted TP plan cannot express them.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

from autopar.graph.flops import GROUPED_MATMUL, op_name
from autopar.graph.ir import Op, OpClass, TensorMeta
from autopar.solvers.sharding.op_rules import (
    OpStrategy,
    attention_strategies,
    cat_strategies,
    creation_strategies,
    dim_scalar,
    dims_except_strategies,
    elementwise_strategies,
    embedding_strategies,
    grouped_matmul_strategies,
    loss_strategies,
    matmul_strategies,
    norm_strategies,
    reduction_strategies,
)
from autopar.solvers.sharding.placement import REPLICATE, Placement, PlacementKind, shard
from autopar.solvers.sharding.view_rules import VIEW_TARGETS, map_placement, packet, shard_fits


def op_strategies(op: Op, *, tp: int, hints: Sequence[Iterable[Placement]] | None = None,
                  allow_batch_split: bool = False) -> tuple[OpStrategy, ...]:
    """All strategies of one op at TP size ``tp`` (the all-replicated one first).

    Args:
        op: the ATen op.
        tp: size of the tensor-parallel axis.
        hints: per tensor input, placements its producer can deliver; used to offer
            strided shards (``S(d,sf=k)``) that match them, and the candidate inputs of views.
            For a parameter: the strided shards it may take besides R and S(d) (``fused_param_placements``).
        allow_batch_split: keep strategies that split a matmul's/embedding's work over a replicated weight.

    Returns:
        Distinct strategies; at tp = 1 only the replicated one.

    Example:
        >>> from autopar.graph.ir import Op, OpClass, TensorMeta
        >>> m = lambda *s: TensorMeta(shape=s, dtype="float32")
        >>> mm = Op(name="mm", target="aten.mm.default", op_class=OpClass.MATMUL, inputs=(m(32, 64), m(64, 256)),
        ...         input_ops=("x", "t"), input_params=(None, "fc.weight"), outputs=(m(32, 256),), flops=0,
        ...         nbytes_moved=0, module_path="fc")
        >>> [s.name for s in op_strategies(mm, tp=4)]
        ['R = R x R', 'P = S(1) x S(0)', 'S(1) = R x S(1)']
    """
    replicate = OpStrategy(inputs=(REPLICATE,) * len(op.inputs), outputs=(REPLICATE,) * len(op.outputs),
                           work_split=False)
    if tp == 1:
        return (replicate,)
    hint_sets = [frozenset(h) for h in hints] if hints is not None else [frozenset() for _ in op.inputs]
    found = [replicate, *_rule_for(op, tp, hint_sets)]
    found += _strided_variants(op, found, hint_sets, tp)
    keep = [s for s in found if _shards_fit(op, s, tp) and (allow_batch_split or not _replicated_weight_split(op, s))]
    return tuple(dict.fromkeys(keep))


def _rule_for(op: Op, tp: int, hints: Sequence[frozenset[Placement]]) -> list[OpStrategy]:
    name = packet(op.target)
    if not op.inputs:
        return creation_strategies(op)
    if name in VIEW_TARGETS and len(op.inputs) == 1:
        if op.input_params[0] is not None and op.input_ops[0] is None:
            # a view of a parameter: the parameter's own placement is the choice (hints: its strided ones)
            return view_strategies(op, tp, [*_all_placements(op.inputs[0]), *_ordered(hints[0])])
        if not hints[0]:
            return view_strategies(op, tp, _all_placements(op.inputs[0]))
        deferred = OpStrategy(inputs=(REPLICATE,), outputs=(REPLICATE,) * len(op.outputs), work_split=False,
                              partial_grad=True)
        return [deferred, *view_strategies(op, tp, _ordered(hints[0]))]
    match op.op_class:
        case OpClass.MATMUL if op_name(op.target) in GROUPED_MATMUL:
            return grouped_matmul_strategies(op)
        case OpClass.MATMUL:
            return matmul_strategies(op)
        case OpClass.ATTENTION:
            return attention_strategies(op)
        case OpClass.EMBEDDING:
            return embedding_strategies(op)
        case OpClass.NORM if name in _LAYER_NORMS:
            return norm_strategies(op)
        case OpClass.SOFTMAX:
            return dims_except_strategies(op, {dim_scalar(op, default=-1)})
        case OpClass.REDUCTION:
            return reduction_strategies(op)
        case OpClass.LOSS if name.startswith("nll_loss"):
            return loss_strategies(op)
        case OpClass.ELEMENTWISE | OpClass.DROPOUT:
            return elementwise_strategies(op)
        case OpClass.COPY if name in ("cat", "stack"):
            return cat_strategies(op)
        case OpClass.COPY if name in ("where", "masked_fill", "fill", "zeros_like", "ones_like", "full_like",
                                      "empty_like"):
            return elementwise_strategies(op)
        case OpClass.COPY if name in ("triu", "tril"):
            out_ndim = len(op.outputs[0].shape)
            return dims_except_strategies(op, {out_ndim - 2, out_ndim - 1})
        case _:
            return []


_LAYER_NORMS = frozenset({"native_layer_norm", "layer_norm", "rms_norm", "_fused_rms_norm"})


def _ordered(placements: Iterable[Placement]) -> list[Placement]:
    """R first, then shards by dim and split factor, then P: a stable order for reproducible plans."""
    rank = {PlacementKind.REPLICATE: 0, PlacementKind.SHARD: 1, PlacementKind.PARTIAL: 2}
    return sorted(set(placements), key=lambda p: (rank[p.kind], p.dim, p.sf))


def _all_placements(meta: TensorMeta) -> list[Placement]:
    return [REPLICATE, *(shard(d) for d in range(len(meta.shape)))]


def view_strategies(op: Op, tp: int, candidates: Iterable[Placement]) -> list[OpStrategy]:
    """Strategies of a view-like op: one per candidate input placement that maps through."""
    out = []
    for p in candidates:
        mapped = map_placement(op, p, tp)
        if mapped is not None:
            out.append(OpStrategy(inputs=(p,), outputs=(mapped,) * len(op.outputs), work_split=False))
    return out


# ---- filters and strided variants ------------------------------------------------------------


def _shards_fit(op: Op, s: OpStrategy, tp: int) -> bool:
    metas = itertools.chain(zip(op.inputs, s.inputs), zip(op.outputs, s.outputs))
    return all(not p.is_shard or (p.dim < len(m.shape) and shard_fits(m.shape[p.dim], p.sf, tp)) for m, p in metas)


def _replicated_weight_split(op: Op, s: OpStrategy) -> bool:
    """A matmul/embedding doing 1/t of the work while a weight (not an addend/bias) stays whole."""
    if op.op_class not in (OpClass.MATMUL, OpClass.EMBEDDING, OpClass.ATTENTION) or not s.work_split:
        return False
    if op.op_class is OpClass.ATTENTION:
        return any(p.is_shard and p.dim == 0 for p in s.inputs[:1])
    return any(param is not None and p.is_replicate and len(m.shape) >= 2
               for param, p, m in zip(op.input_params, s.inputs, op.inputs))


def _strided_variants(op: Op, found: Sequence[OpStrategy], hints: Sequence[frozenset[Placement]],
                      tp: int) -> list[OpStrategy]:
    """Copies of sharded strategies with the strided split factor a producer delivers (one mesh axis: one factor)."""
    if packet(op.target) in VIEW_TARGETS:
        return []
    out = []
    for s in found:
        factors = {h.sf for p, hs in zip(s.inputs, hints) if p.is_shard for h in hs
                   if h.is_shard and h.dim == p.dim and h.sf > 1}
        for sf in sorted(factors):  # a set's order may follow the (hash-seeded) order of the hints
            def widen(p: Placement, sf: int = sf) -> Placement:
                return shard(p.dim, sf) if p.is_shard else p

            out.append(OpStrategy(inputs=tuple(map(widen, s.inputs)), outputs=tuple(map(widen, s.outputs)),
                                  work_split=s.work_split))
    return out


def param_bytes(op: Op, strategy: OpStrategy, tp: int, *, trainable: frozenset[str] | None = None,
                per_element: bool = False) -> float:
    """Bytes (or elements) of the parameters this op reads directly (not through a view), / t where sharded.

    Example:
        >>> from autopar.graph.ir import Op, OpClass, TensorMeta
        >>> m = TensorMeta(shape=(256, 64), dtype="bfloat16")
        >>> t = Op(name="t", target="aten.t.default", op_class=OpClass.VIEW, inputs=(m,), input_ops=(None,),
        ...        input_params=("fc.weight",), outputs=(TensorMeta(shape=(64, 256), dtype="bfloat16"),), flops=0,
        ...        nbytes_moved=0, module_path="fc")
        >>> param_bytes(t, OpStrategy(inputs=(shard(0),), outputs=(shard(1),), work_split=False), 4)
        8192.0
    """
    total = 0.0
    for meta, src, param, p in zip(op.inputs, op.input_ops, op.input_params, strategy.inputs):
        if param is None or src is not None or (trainable is not None and param not in trainable):
            continue
        size = meta.numel if per_element else meta.nbytes
        total += size / tp if p.is_shard else size
    return total


__all__ = ["op_strategies", "param_bytes", "view_strategies"]
