"""Sharding strategies of single ATen ops over one tensor-parallel mesh axis of size t.

A strategy fixes a placement (``R``, ``S(d)``, ``P``; see ``solvers/placement.py``)
for every tensor input and output of an op. Its text form follows Colossal-AI's
readable names, outputs first: ``S(1) = R x S(1)`` is a column-split matmul
(activation replicated, weight split on its output features, output split on
its last dim), ``P = S(1) x S(0)`` a row split whose output is a partial sum.

Rules, by op family (R everywhere is always a strategy):

* matmuls (mm, addmm, bmm, baddbmm, linear) as einsums: shard one index; an index
  that is summed over gives a partial output (and a partial addend/bias);
* attention kernels: shard the heads dim (1) of q/k/v/out (and the batch dim 0 on request);
* pointwise ops and dropout: any output dim, inputs agree, broadcast dims stay R;
  linear ones (add, sub, neg, mul/div by a replicated factor) also take P → P;
* norms: any dim that is not normalised (batch/sequence: Megatron's sequence parallelism);
* softmax: any dim but the softmax dim; reductions: kept dims, or the reduced dim → P (sum/mean);
* embedding: vocab split (weight S(0), output P) or embedding-dim split (weight S(1));
* views, reshapes, transposes, slices, splits: the input placement mapped through (``view_rules``);
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
from dataclasses import dataclass

from autopar.graph.ir import Op, OpClass, TensorMeta
from autopar.solvers.placement import (
    PARTIAL,
    REPLICATE,
    Placement,
    input_grad_placement,
    shard,
)
from autopar.solvers.view_rules import VIEW_TARGETS, changed_dim, map_placement, packet, shard_fits

FLOAT_DTYPES = frozenset({"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"})
"""Dtypes that carry gradients."""


@dataclass(frozen=True, slots=True, kw_only=True)
class OpStrategy:
    """Placements of one op's tensors, and whether the op's work is divided among the t ranks."""

    inputs: tuple[Placement, ...]
    """Placement per tensor input, in call order."""
    outputs: tuple[Placement, ...]
    """Placement per tensor output."""
    work_split: bool
    """True when each rank does 1/t of the op's work."""

    @property
    def name(self) -> str:
        """Readable form, outputs first: ``"S(1) = R x S(1)"``."""
        outs = ", ".join(str(p) for p in self.outputs) or "-"
        ins = " x ".join(str(p) for p in self.inputs) or "-"
        return f"{outs} = {ins}"

    def input_grads(self) -> tuple[Placement, ...]:
        """Placement of the gradient the backward produces for each input."""
        return tuple(input_grad_placement(p, self.outputs) for p in self.inputs)


def is_float(meta: TensorMeta) -> bool:
    """Whether a tensor's dtype can carry a gradient."""
    return meta.dtype in FLOAT_DTYPES


def op_strategies(op: Op, *, tp: int, hints: Sequence[Iterable[Placement]] | None = None,
                  allow_batch_split: bool = False) -> tuple[OpStrategy, ...]:
    """All strategies of one op at TP size ``tp`` (the all-replicated one first).

    Args:
        op: the ATen op.
        tp: size of the tensor-parallel axis.
        hints: per tensor input, placements its producer can deliver; used to offer
            strided shards (``S(d,sf=k)``) that match them, and the candidate inputs of views.
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
        return _creation(op)
    if name in VIEW_TARGETS and len(op.inputs) == 1:
        return view_strategies(op, tp, hints[0] if hints[0] else _all_placements(op.inputs[0]))
    match op.op_class:
        case OpClass.MATMUL:
            return _matmul(op)
        case OpClass.ATTENTION:
            return _attention(op)
        case OpClass.EMBEDDING:
            return _embedding(op)
        case OpClass.NORM if name in _LAYER_NORMS:
            return _norm(op)
        case OpClass.SOFTMAX:
            return _all_dims_but(op, {_dim_scalar(op, default=-1)})
        case OpClass.REDUCTION:
            return _reduction(op)
        case OpClass.LOSS if name.startswith("nll_loss"):
            return _loss(op)
        case OpClass.ELEMENTWISE | OpClass.DROPOUT:
            return _elementwise(op)
        case OpClass.COPY if name in ("cat", "stack"):
            return _cat(op)
        case OpClass.COPY if name in ("where", "masked_fill", "fill", "zeros_like", "ones_like", "full_like",
                                      "empty_like"):
            return _elementwise(op)
        case OpClass.COPY if name in ("triu", "tril"):
            out_ndim = len(op.outputs[0].shape)
            return _all_dims_but(op, {out_ndim - 2, out_ndim - 1})
        case _:
            return []


_LAYER_NORMS = frozenset({"native_layer_norm", "layer_norm", "rms_norm", "_fused_rms_norm"})
_LINEAR_POINTWISE = frozenset({"add", "sub", "neg", "mul", "div", "clone", "_to_copy", "alias"})


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


def _creation(op: Op) -> list[OpStrategy]:
    """Ops without tensor inputs (arange, full, zeros): each rank can make just its slice."""
    shape = op.outputs[0].shape
    return [OpStrategy(inputs=(), outputs=tuple(_aligned(shape, o.shape, d) for o in op.outputs), work_split=True)
            for d in range(len(shape))]


def _aligned(ref: Sequence[int], shape: Sequence[int], dim: int, *, bcast: Placement = REPLICATE) -> Placement:
    """S of the dim of ``shape`` aligned (from the right) with dim ``dim`` of ``ref``; ``bcast`` if broadcast."""
    d = dim - (len(ref) - len(shape))
    if d < 0 or shape[d] != ref[dim]:
        return bcast
    return shard(d)


def _elementwise(op: Op) -> list[OpStrategy]:
    """Pointwise ops with broadcasting; linear ones also keep partial sums."""
    out_shape = op.outputs[0].shape
    found = [
        OpStrategy(inputs=tuple(_aligned(out_shape, t.shape, d) for t in op.inputs),
                   outputs=tuple(_aligned(out_shape, o.shape, d) for o in op.outputs), work_split=True)
        for d in range(len(out_shape))
    ]
    name = packet(op.target)
    floats = [i for i, t in enumerate(op.inputs) if is_float(t)]
    if name in _LINEAR_POINTWISE and floats:
        if name in ("add", "sub") or len(floats) == 1:
            partial_ins = tuple(PARTIAL if i in floats else REPLICATE for i in range(len(op.inputs)))
            found.append(OpStrategy(inputs=partial_ins, outputs=(PARTIAL,) * len(op.outputs), work_split=False))
        elif name in ("mul", "div"):  # linear in one factor when the other is replicated
            for i in floats[: 1 if name == "div" else len(floats)]:
                ins = tuple(PARTIAL if j == i else REPLICATE for j in range(len(op.inputs)))
                found.append(OpStrategy(inputs=ins, outputs=(PARTIAL,) * len(op.outputs), work_split=False))
    return found


def _all_dims_but(op: Op, excluded: set[int]) -> list[OpStrategy]:
    """Same-shape ops (softmax, triu) that may shard any dim outside ``excluded``."""
    out_shape = op.outputs[0].shape
    return [
        OpStrategy(inputs=tuple(_aligned(out_shape, t.shape, d) for t in op.inputs),
                   outputs=tuple(_aligned(out_shape, o.shape, d) for o in op.outputs), work_split=True)
        for d in range(len(out_shape)) if d not in excluded
    ]


def _dim_scalar(op: Op, *, default: int) -> int:
    ndim = len(op.inputs[0].shape)
    ints = [s for s in op.scalars if isinstance(s, int) and not isinstance(s, bool)]
    dim = ints[0] if ints else default
    return dim + ndim if dim < 0 else dim


def _norm(op: Op) -> list[OpStrategy]:
    """Layer/RMS norm: shard a leading (not normalised) dim; weight and bias stay replicated."""
    x = op.inputs[0].shape
    first = op.scalars[0] if op.scalars else None
    if isinstance(first, (tuple, list)):
        normalized = len(first)
    elif len(op.inputs) > 1:
        normalized = len(op.inputs[1].shape)
    else:
        normalized = 1
    found = []
    for d in range(len(x) - normalized):
        ins = (shard(d),) + (REPLICATE,) * (len(op.inputs) - 1)
        outs = tuple(shard(d) if len(o.shape) > d and o.shape[d] == x[d] else REPLICATE for o in op.outputs)
        found.append(OpStrategy(inputs=ins, outputs=outs, work_split=True))
    return found


def _reduced_dims(op: Op) -> tuple[set[int], bool]:
    x, y = op.inputs[0].shape, op.outputs[0].shape
    dims: list[int] = []
    keepdim = len(x) == len(y)
    for s in op.scalars:
        if isinstance(s, (tuple, list)):
            dims = [int(d) for d in s]
        elif isinstance(s, bool):
            keepdim = s
        elif isinstance(s, int) and not dims:
            dims = [s]
    if not dims:
        dims = [d for d in range(len(x)) if keepdim and y[d] == 1 and x[d] != 1] if keepdim else list(range(len(x)))
    return {d + len(x) if d < 0 else d for d in dims}, keepdim


def _reduction(op: Op) -> list[OpStrategy]:
    """Kept dims stay sharded; a sharded summed dim gives a partial output (sum and mean only)."""
    reduced, keepdim = _reduced_dims(op)
    summable = packet(op.target) in ("sum", "mean")
    found = []
    for d in range(len(op.inputs[0].shape)):
        ins = (shard(d),) + (REPLICATE,) * (len(op.inputs) - 1)
        if d not in reduced:
            out_dim = d if keepdim else d - sum(1 for r in reduced if r < d)
            found.append(OpStrategy(inputs=ins, outputs=(shard(out_dim),) * len(op.outputs), work_split=True))
        elif summable:
            found.append(OpStrategy(inputs=ins, outputs=(PARTIAL,) * len(op.outputs), work_split=True))
    if summable:
        found.append(OpStrategy(inputs=(PARTIAL,) + (REPLICATE,) * (len(op.inputs) - 1),
                                outputs=(PARTIAL,) * len(op.outputs), work_split=False))
    return found


def _cat(op: Op) -> list[OpStrategy]:
    """cat/stack: every input sharded alike on a dim that is not joined."""
    name = packet(op.target)
    out_ndim = len(op.outputs[0].shape)
    ints = [s for s in op.scalars if isinstance(s, int) and not isinstance(s, bool)]
    joined = ints[-1] if ints else 0
    joined = joined + out_ndim if joined < 0 else joined
    found = []
    for d in range(len(op.inputs[0].shape)):
        out_dim = d + 1 if name == "stack" and d >= joined else d
        if name == "cat" and d == joined:
            continue
        found.append(OpStrategy(inputs=(shard(d),) * len(op.inputs), outputs=(shard(out_dim),), work_split=True))
    return found


def _loss(op: Op) -> list[OpStrategy]:
    """nll_loss: split the batch (dim 0 of input and target); the summed loss is partial."""
    ins = tuple(shard(0) if len(t.shape) >= 1 and i < 2 else REPLICATE for i, t in enumerate(op.inputs))
    return [OpStrategy(inputs=ins, outputs=(PARTIAL,) * len(op.outputs), work_split=True)]


# ---- matmul family as einsums ----------------------------------------------------------------

_LEADING = "abcdefgh"


def _matmul_spec(op: Op) -> tuple[list[str], str, int | None, bool] | None:
    """(labels per input, output labels, index of the addend, whether an activation follows)."""
    name = packet(op.target)
    ranks = [len(t.shape) for t in op.inputs]
    match name:
        case "mm" if ranks == [2, 2]:
            return ["mk", "kn"], "mn", None, False
        case "addmm" | "_addmm_activation" if ranks[1:] == [2, 2]:
            return ["mn"[2 - ranks[0]:], "mk", "kn"], "mn", 0, name != "addmm"
        case "bmm" if ranks == [3, 3]:
            return ["bmk", "bkn"], "bmn", None, False
        case "baddbmm" if ranks[1:] == [3, 3]:
            return ["bmn"[3 - ranks[0]:], "bmk", "bkn"], "bmn", 0, False
        case "linear" if len(ranks) >= 2 and ranks[1] == 2:
            lead = _LEADING[: ranks[0] - 1]
            labels = [lead + "k", "nk"] + (["n"] if len(ranks) > 2 else [])
            return labels, lead + "n", 2 if len(ranks) > 2 else None, False
        case _:
            return None


def _matmul(op: Op) -> list[OpStrategy]:
    """One strategy per einsum index: shard it everywhere it appears; a contracted index gives P."""
    spec = _matmul_spec(op)
    if spec is None:
        return []
    labels, out_labels, addend, activation = spec
    found = []
    for label in dict.fromkeys("".join(labels)):
        contracted = label not in out_labels
        if contracted and activation:
            continue  # a nonlinear epilogue cannot run on partial sums
        ins = []
        for i, (lab, meta) in enumerate(zip(labels, op.inputs)):
            pos = lab.find(label)
            if pos >= 0 and meta.shape[pos] > 1:
                ins.append(shard(pos))
            else:
                ins.append(PARTIAL if contracted and i == addend else REPLICATE)
        out = PARTIAL if contracted else shard(out_labels.index(label))
        found.append(OpStrategy(inputs=tuple(ins), outputs=(out,) * len(op.outputs), work_split=True))
    return found


def _attention(op: Op) -> list[OpStrategy]:
    """Fused attention: shard heads (dim 1) of q, k, v and of every (B, H, ...) output; or the batch (dim 0).

    With grouped-query attention k and v have fewer heads than q; they are
    sharded on dim 1 all the same (each rank keeps its share of the kv heads).
    A mask/bias input that broadcasts over the sharded dim stays replicated.
    """
    q = op.inputs[0].shape
    found = []
    for d in (1, 0):
        ins = tuple(shard(d) if i < 3 or (len(t.shape) == len(q) and t.shape[d] == q[d]) else REPLICATE
                    for i, t in enumerate(op.inputs))
        outs = tuple(shard(d) if len(o.shape) > d and o.shape[d] == q[d] else REPLICATE for o in op.outputs)
        found.append(OpStrategy(inputs=ins, outputs=outs, work_split=True))
    return found


def _embedding(op: Op) -> list[OpStrategy]:
    """embedding(weight (V, C), indices): vocab split → partial output; embedding-dim split → S(last)."""
    if packet(op.target) != "embedding" or len(op.inputs) != 2:
        return []
    out_ndim = len(op.outputs[0].shape)
    vocab = OpStrategy(inputs=(shard(0), REPLICATE), outputs=(PARTIAL,), work_split=False)
    hidden = OpStrategy(inputs=(shard(1), REPLICATE), outputs=(shard(out_ndim - 1),), work_split=True)
    batch = [OpStrategy(inputs=(REPLICATE, shard(d)), outputs=(shard(d),), work_split=True)
             for d in range(len(op.inputs[1].shape))]
    return [vocab, hidden, *batch]


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
        for sf in factors:
            def widen(p: Placement, sf: int = sf) -> Placement:
                return shard(p.dim, sf) if p.is_shard else p

            out.append(OpStrategy(inputs=tuple(map(widen, s.inputs)), outputs=tuple(map(widen, s.outputs)),
                                  work_split=s.work_split))
    return out


def param_bytes(op: Op, strategy: OpStrategy, tp: int, *, trainable: frozenset[str] | None = None) -> float:
    """Bytes of the parameters this op reads directly (not through a view), divided by t where sharded.

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
        total += meta.nbytes / tp if p.is_shard else meta.nbytes
    return total


__all__ = [
    "FLOAT_DTYPES",
    "OpStrategy",
    "changed_dim",
    "is_float",
    "op_strategies",
    "param_bytes",
    "view_strategies",
]
