"""Placement rules per ATen op family, over one tensor-parallel mesh axis of size t.

Each rule lists the non-replicated strategies of an op from its shapes and
scalars alone (the replicated one, divisibility checks and strided variants are
added by ``solvers/op_strategies.py``). A strategy fixes a placement (``R``,
``S(d)``, ``P``; see ``solvers/sharding/placement.py``) for every tensor input and output.
Its text form follows Colossal-AI's readable names, outputs first:
``S(1) = R x S(1)`` is a column-split matmul (activation replicated, weight split on
its output features, output split on its last dim), ``P = S(1) x S(0)`` a row split
whose output is a partial sum.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from autopar.graph.ir import Op, TensorMeta
from autopar.solvers.sharding.placement import (
    PARTIAL,
    REPLICATE,
    Placement,
    grad_placement,
    input_grad_placement,
    shard,
)
from autopar.solvers.sharding.view_rules import packet

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
    partial_grad: bool = False
    """For a replicated view: its gradient stays a partial sum (P) through it, so the all-reduce
    that the gradient needs happens once, further back (where several readers' gradients meet)."""

    @property
    def name(self) -> str:
        """Readable form, outputs first: ``"S(1) = R x S(1)"`` (``"R = R (grad P)"`` for a partial gradient)."""
        outs = ", ".join(str(p) for p in self.outputs) or "-"
        ins = " x ".join(str(p) for p in self.inputs) or "-"
        return f"{outs} = {ins}" + (" (grad P)" if self.partial_grad else "")

    def input_grads(self) -> tuple[Placement, ...]:
        """Placement of the gradient the backward produces for each input."""
        if self.partial_grad:
            return (PARTIAL,) * len(self.inputs)
        return tuple(input_grad_placement(p, self.outputs) for p in self.inputs)

    def output_grads(self) -> tuple[Placement, ...]:
        """Placement each output's gradient must have for this op's backward."""
        if self.partial_grad:
            return (PARTIAL,) * len(self.outputs)
        return tuple(grad_placement(p) for p in self.outputs)


def is_float(meta: TensorMeta) -> bool:
    """Whether a tensor's dtype can carry a gradient."""
    return meta.dtype in FLOAT_DTYPES



_LINEAR_POINTWISE = frozenset({"add", "sub", "neg", "mul", "div", "clone", "_to_copy", "alias"})
"""Pointwise ops that are linear in a tensor argument: partial sums pass through them."""


def creation_strategies(op: Op) -> list[OpStrategy]:
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


def elementwise_strategies(op: Op) -> list[OpStrategy]:
    """Pointwise ops with broadcasting; linear ones also keep partial sums.

    Example:
        >>> from autopar.graph.ir import OpClass
        >>> m = lambda *s: TensorMeta(shape=s, dtype="float32")
        >>> add = Op(name="add", target="aten.add.Tensor", op_class=OpClass.ELEMENTWISE, inputs=(m(4, 8), m(8)),
        ...          input_ops=("x", None), input_params=(None, "bias"), outputs=(m(4, 8),), flops=0,
        ...          nbytes_moved=0, module_path="")
        >>> [s.name for s in elementwise_strategies(add)]
        ['S(0) = S(0) x R', 'S(1) = S(1) x S(0)', 'P = P x P']
    """
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


def dims_except_strategies(op: Op, excluded: set[int]) -> list[OpStrategy]:
    """Same-shape ops (softmax, triu) that may shard any dim outside ``excluded``."""
    out_shape = op.outputs[0].shape
    return [
        OpStrategy(inputs=tuple(_aligned(out_shape, t.shape, d) for t in op.inputs),
                   outputs=tuple(_aligned(out_shape, o.shape, d) for o in op.outputs), work_split=True)
        for d in range(len(out_shape)) if d not in excluded
    ]


def dim_scalar(op: Op, *, default: int) -> int:
    ndim = len(op.inputs[0].shape)
    ints = [s for s in op.scalars if isinstance(s, int) and not isinstance(s, bool)]
    dim = ints[0] if ints else default
    return dim + ndim if dim < 0 else dim


def norm_strategies(op: Op) -> list[OpStrategy]:
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


def reduction_strategies(op: Op) -> list[OpStrategy]:
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


def cat_strategies(op: Op) -> list[OpStrategy]:
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


def loss_strategies(op: Op) -> list[OpStrategy]:
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


def matmul_strategies(op: Op) -> list[OpStrategy]:
    """One strategy per einsum index: shard it everywhere it appears; a contracted index gives P.

    Example:
        >>> from autopar.graph.ir import OpClass
        >>> m = lambda *s: TensorMeta(shape=s, dtype="float32")
        >>> bmm = Op(name="bmm", target="aten.bmm.default", op_class=OpClass.MATMUL, inputs=(m(8, 16, 4), m(8, 4, 2)),
        ...          input_ops=("q", "k"), input_params=(None, None), outputs=(m(8, 16, 2),), flops=0,
        ...          nbytes_moved=0, module_path="attn")
        >>> [s.name for s in matmul_strategies(bmm)]
        ['S(0) = S(0) x S(0)', 'S(1) = S(1) x R', 'P = S(2) x S(1)', 'S(2) = R x S(2)']
    """
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


GROUPED_LABELS = (("sk", "ekn", "e"), "sn")
"""Grouped GEMM as einsum labels: input (S, K) rows sorted by expert, weight (E, K, N), group ends (E,)."""


def grouped_matmul_strategies(op: Op) -> list[OpStrategy]:
    """Routed experts' grouped GEMM (``transformers::grouped_mm_fallback``, ``aten._grouped_mm``).

    Every expert's (K, N) matmul may be split like a Linear: on N (column split:
    weight S(2), output S(1)) or on K (row split: input S(1), weight S(1), output P).
    The row dim S and the expert dim E are coupled through the group ends (which
    rows belong to which expert), so neither is split here.

    Example:
        >>> from autopar.graph.ir import OpClass
        >>> m = lambda *s, dtype="float32": TensorMeta(shape=s, dtype=dtype)
        >>> g = Op(name="g", target="transformers.grouped_mm_fallback.default", op_class=OpClass.MATMUL,
        ...        inputs=(m(32, 32), m(4, 32, 128), m(4, dtype="int32")), input_ops=("x", "t", "offs"),
        ...        input_params=(None, None, None), outputs=(m(32, 128),), flops=0, nbytes_moved=0, module_path="e")
        >>> [s.name for s in grouped_matmul_strategies(g)]
        ['P = S(1) x S(1) x R', 'S(1) = R x S(2) x R']
    """
    (x, w, offs), out = GROUPED_LABELS
    shapes = [t.shape for t in op.inputs]
    if [len(s) for s in shapes] != [2, 3, 1]:
        return []
    found = []
    for label in "kn":
        ins = tuple(shard(lab.index(label)) if label in lab else REPLICATE for lab in (x, w, offs))
        outs = (shard(out.index(label)) if label in out else PARTIAL,) * len(op.outputs)
        found.append(OpStrategy(inputs=ins, outputs=outs, work_split=True))
    return found


def attention_strategies(op: Op) -> list[OpStrategy]:
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


def embedding_strategies(op: Op) -> list[OpStrategy]:
    """embedding(weight (V, C), indices): vocab split → partial output; embedding-dim split → S(last)."""
    if packet(op.target) != "embedding" or len(op.inputs) != 2:
        return []
    out_ndim = len(op.outputs[0].shape)
    vocab = OpStrategy(inputs=(shard(0), REPLICATE), outputs=(PARTIAL,), work_split=False)
    hidden = OpStrategy(inputs=(shard(1), REPLICATE), outputs=(shard(out_ndim - 1),), work_split=True)
    batch = [OpStrategy(inputs=(REPLICATE, shard(d)), outputs=(shard(d),), work_split=True)
             for d in range(len(op.inputs[1].shape))]
    return [vocab, hidden, *batch]


__all__ = [
    "FLOAT_DTYPES",
    "OpStrategy",
    "attention_strategies",
    "cat_strategies",
    "creation_strategies",
    "dim_scalar",
    "dims_except_strategies",
    "elementwise_strategies",
    "embedding_strategies",
    "grouped_matmul_strategies",
    "is_float",
    "loss_strategies",
    "matmul_strategies",
    "norm_strategies",
    "reduction_strategies",
]
