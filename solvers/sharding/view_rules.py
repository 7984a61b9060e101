"""How a placement passes through ops that only rearrange a tensor (views, reshapes, transposes, slices).

These ops move no data between ranks when the sharded dim survives the
rearrangement, so they *follow* their producer (Alpa's follow strategy): the
output placement is a function of the input placement. ``map_placement`` is
that function; None means the sharded dim cannot survive and the input must
be gathered first.

Reshapes follow DTensor's ``view_groups``: the input and output shapes are cut
into groups of dims with equal products, and a shard maps from a dim of the
input group to the dim of the output group that starts at the same offset of the
flattened group (a strided shard, ``S(d,sf=k)``, when the offset is not zero).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from autopar.graph.ir import Op
from autopar.solvers.sharding.placement import Placement, shard

VIEW_TARGETS = frozenset({
    "view", "_unsafe_view", "reshape", "_reshape_alias", "flatten", "unflatten", "view_as", "squeeze",
    "unsqueeze", "expand", "expand_as", "t", "transpose", "permute", "movedim", "numpy_T", "slice", "select",
    "narrow", "alias", "detach", "lift_fresh", "lift_fresh_copy", "clone", "contiguous", "_to_copy", "to",
    "split", "split_with_sizes", "chunk", "unbind",
})
"""ATen packet names handled here (single tensor input; outputs all mapped alike)."""

_RESHAPES = frozenset({"view", "_unsafe_view", "reshape", "_reshape_alias", "flatten", "unflatten", "view_as",
                       "squeeze", "unsqueeze"})
_IDENTITIES = frozenset({"alias", "detach", "lift_fresh", "lift_fresh_copy", "clone", "contiguous", "_to_copy",
                         "to"})


def packet(target: str) -> str:
    """``"aten.view.default"`` → ``"view"``.

    Example:
        >>> packet("aten._unsafe_view.default")
        '_unsafe_view'
    """
    parts = target.split(".")
    return parts[1] if len(parts) >= 2 and parts[0] == "aten" else parts[0]


def shard_fits(size: int, sf: int, tp: int) -> bool:
    """Whether a dim of ``size`` can be split t ways within each of ``sf`` outer blocks.

    Example:
        >>> shard_fits(64, 1, 8), shard_fits(12, 1, 8), shard_fits(64, 4, 8)
        (True, False, True)
    """
    return size % sf == 0 and (size // sf) % tp == 0 and size // sf >= tp


def map_placement(op: Op, placement: Placement, tp: int) -> Placement | None:
    """Output placement of a view-like op (see ``VIEW_TARGETS``) given its input placement.

    R and P pass through unchanged (all these ops are linear); a shard maps to
    the dim it becomes, or None when that dim is destroyed or no longer divisible.

    Example:
        >>> from autopar.graph.ir import Op, OpClass, TensorMeta
        >>> m = lambda *s: TensorMeta(shape=s, dtype="float32")
        >>> op = Op(name="v", target="aten.view.default", op_class=OpClass.VIEW, inputs=(m(2, 16, 64),),
        ...         input_ops=("x",), input_params=(None,), outputs=(m(2, 16, 4, 16),), flops=0,
        ...         nbytes_moved=0, module_path="")
        >>> str(map_placement(op, shard(2), 4))
        'S(2)'
    """
    if not placement.is_shard:
        return placement
    name = packet(op.target)
    src, dst = op.inputs[0].shape, op.outputs[0].shape
    if name in _IDENTITIES:
        out: Placement | None = placement
    elif name in _RESHAPES:
        out = _map_reshape(src, dst, placement, tp)
    elif name in ("t", "transpose", "permute", "movedim", "numpy_T"):
        out = _map_permute(op, placement)
    elif name in ("expand", "expand_as"):
        offset = len(dst) - len(src)
        out = shard(placement.dim + offset, placement.sf) if src[placement.dim] == dst[placement.dim + offset] \
            else None
    else:
        out = _map_indexing(op, placement)
    if out is None or not shard_fits(dst[out.dim], out.sf, tp):
        return None
    return out


def view_groups(src: Sequence[int], dst: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """Pair runs of input dims with runs of output dims of equal product (size-1 dims on their own).

    Example:
        >>> view_groups((2, 16, 64), (32, 64))
        [([0, 1], [0]), ([2], [1])]
    """
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(src) or j < len(dst):
        if i < len(src) and src[i] == 1:
            groups.append(([i], []))
            i += 1
        elif j < len(dst) and dst[j] == 1:
            groups.append(([], [j]))
            j += 1
        elif i < len(src) and j < len(dst):
            ga, gb, pa, pb = [i], [j], src[i], dst[j]
            i, j = i + 1, j + 1
            while pa != pb and i <= len(src) and j <= len(dst):
                if pa < pb and i < len(src):
                    ga.append(i)
                    pa, i = pa * src[i], i + 1
                elif pb < pa and j < len(dst):
                    gb.append(j)
                    pb, j = pb * dst[j], j + 1
                else:
                    return []  # products never meet: not a reshape of this shape
            groups.append((ga, gb))
        else:
            return []
    return groups


def _map_reshape(src: Sequence[int], dst: Sequence[int], p: Placement, tp: int) -> Placement | None:
    for ga, gb in view_groups(src, dst):
        if p.dim not in ga:
            continue
        # flattened group = outer blocks × (sharded extent) × inner; the shard survives on the
        # output dim whose own outer blocks times its split factor equal the input's outer blocks
        outer = math.prod(src[d] for d in ga[: ga.index(p.dim)]) * p.sf
        for pos, e in enumerate(gb):
            before = math.prod(dst[d] for d in gb[:pos])
            if dst[e] > 1 and outer % before == 0 and shard_fits(dst[e], outer // before, tp):
                return shard(e, outer // before)
        return None
    return None


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _int_scalars(op: Op) -> list[int]:
    return [int(s) for s in op.scalars if isinstance(s, int) and not isinstance(s, bool)]


def _map_permute(op: Op, p: Placement) -> Placement | None:
    ndim = len(op.inputs[0].shape)
    name = packet(op.target)
    if name in ("t", "numpy_T"):
        perm = list(range(ndim))[::-1]
    elif name in ("transpose", "movedim"):
        dims = _int_scalars(op)
        if len(dims) < 2:
            return None
        a, b = _norm_dim(dims[0], ndim), _norm_dim(dims[1], ndim)
        perm = list(range(ndim))
        if name == "transpose":
            perm[a], perm[b] = perm[b], perm[a]
        else:
            perm.pop(a)
            perm.insert(b, a)
    else:
        dims = _flat_ints(op.scalars)
        if sorted(_norm_dim(d, ndim) for d in dims) != list(range(ndim)):
            return None
        perm = [_norm_dim(d, ndim) for d in dims]
    return shard(perm.index(p.dim), p.sf)


def _flat_ints(values: Sequence[object]) -> list[int]:
    out: list[int] = []
    for v in values:
        if isinstance(v, (tuple, list)):
            out.extend(_flat_ints(v))
        elif isinstance(v, int) and not isinstance(v, bool):
            out.append(v)
    return out


def changed_dim(op: Op) -> int | None:
    """The dim an indexing op (slice/select/split/cat) works along: from its scalars, else from its shapes."""
    ndim = len(op.inputs[0].shape)
    name = packet(op.target)
    ints = _int_scalars(op)
    if name in ("slice", "select", "narrow") and ints:
        return _norm_dim(ints[0], ndim)
    if name in ("split", "split_with_sizes", "chunk") and len(op.scalars) >= 2:
        last = op.scalars[-1]
        if isinstance(last, int) and not isinstance(last, bool):
            return _norm_dim(last, ndim)
    src, dst = op.inputs[0].shape, op.outputs[0].shape
    if len(src) == len(dst):
        diff = [d for d in range(ndim) if src[d] != dst[d]]
        return diff[0] if diff else None
    return None


def _map_indexing(op: Op, p: Placement) -> Placement | None:
    name = packet(op.target)
    dim = changed_dim(op)
    src, dst = op.inputs[0].shape, op.outputs[0].shape
    if name in ("select", "unbind"):
        removed = dim if dim is not None else next((d for d in range(len(src)) if src[d] not in dst), 0)
        if p.dim == removed:
            return None
        return shard(p.dim - (p.dim > removed), p.sf)
    if dim is not None and p.dim == dim and src[dim] != dst[dim]:
        if p.sf > 1 and equal_pieces(op) == p.sf:
            return shard(dim)  # a fused projection cut at its seams: each piece is plainly sharded
        return None
    return p


def equal_pieces(op: Op) -> int:
    """How many equal pieces a split/chunk cuts its input into along its dim (0: not such an op).

    Example:
        >>> from autopar.graph.ir import Op, OpClass, TensorMeta
        >>> m = lambda *s: TensorMeta(shape=s, dtype="float32")
        >>> op = Op(name="split", target="aten.split.Tensor", op_class=OpClass.VIEW, inputs=(m(32, 128),),
        ...         input_ops=("g",), input_params=(None,), outputs=(m(32, 64), m(32, 64)), flops=0,
        ...         nbytes_moved=0, module_path="", scalars=(64, -1))
        >>> equal_pieces(op)
        2
    """
    if packet(op.target) not in ("split", "split_with_sizes", "chunk") or len(op.outputs) < 2:
        return 0
    dim = changed_dim(op)
    shapes = {o.shape for o in op.outputs}
    if dim is None or len(shapes) != 1 or op.inputs[0].shape[dim] != len(op.outputs) * op.outputs[0].shape[dim]:
        return 0
    return len(op.outputs)


def fused_cuts(ops: Sequence[Op]) -> frozenset[tuple[int, int]]:
    """(size, k) for every split of ``ops`` that cuts a dim of that size into k equal pieces."""
    return frozenset((op.inputs[0].shape[d], k) for op in ops
                     if (k := equal_pieces(op)) and (d := changed_dim(op)) is not None)


def fused_param_placements(shape: Sequence[int], cuts: frozenset[tuple[int, int]], tp: int) -> frozenset[Placement]:
    """Strided shards a parameter may take: S(d,sf=k) where a split of the layer cuts a dim of d's size
    into k equal pieces (a fused projection: Phi-3's and the MoE experts' gate/up, GPT-2's q/k/v).

    Split t ways within each of its k blocks, the weight computes each piece sharded, so the
    pieces are split at the fused tensor's seams (``_map_indexing``). A size that matches by
    chance only adds a candidate that the costs decide on.

    Example:
        >>> from autopar.graph.ir import Op, OpClass, TensorMeta
        >>> m = lambda *s: TensorMeta(shape=s, dtype="float32")
        >>> split = Op(name="split", target="aten.split.Tensor", op_class=OpClass.VIEW, inputs=(m(32, 128),),
        ...            input_ops=("g",), input_params=(None,), outputs=(m(32, 64), m(32, 64)), flops=0,
        ...            nbytes_moved=0, module_path="", scalars=(64, -1))
        >>> sorted(map(str, fused_param_placements((4, 128, 32), fused_cuts([split]), tp=2)))
        ['S(1,sf=2)']
    """
    return frozenset(shard(d, k) for d, size in enumerate(shape) for cut, k in cuts
                     if size == cut and shard_fits(size, k, tp))


__all__ = ["VIEW_TARGETS", "changed_dim", "equal_pieces", "fused_cuts", "fused_param_placements", "map_placement", "packet",
           "shard_fits", "view_groups"]
