"""A layer's dataflow as the sharding solver sees it: which tensor each op input reads, and who reads each tensor.

Sources of an op input are another op's output in the layer, a parameter (read
directly), or a tensor from outside the layer (the boundary: the hidden state
from the previous layer, masks, rotary tables, constants). Boundary tensors are
pinned to a fixed placement so that consecutive layers compose: the hidden state
is R (or S(1), the sequence dim, under sequence parallelism) and everything
else R.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from autopar.solvers.sharding.op_rules import is_float
from autopar.solvers.sharding.placement import REPLICATE, Placement, shard
from autopar.solvers.sharding.view_rules import shard_fits

from autopar._compat import StrEnum
from autopar.graph.ir import Layer, Op, TensorMeta


class SourceKind(StrEnum):
    """What an op input reads."""

    OP = "op"  # an output of another op of the layer
    EXT = "ext"  # a tensor from outside the layer (previous layer, graph input, lost constant)
    PARAM = "param"  # a parameter or buffer, read directly


class Source(NamedTuple):
    """A tensor an op reads: (OP, producer, output index), (EXT, boundary key, 0) or (PARAM, name, 0)."""

    kind: SourceKind
    """Op output, boundary tensor or parameter."""
    name: str
    """Producer op, boundary key, or parameter name."""
    output: int
    """Output index of the producer op (0 otherwise); not ``index``, which tuples already define."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerGraph:
    """Sources, consumers, gradients and pins of one layer."""

    layer: Layer
    """The layer."""
    sources: Mapping[str, tuple[Source, ...]]
    """Op name → source of each tensor input."""
    consumers: Mapping[Source, tuple[tuple[str, int], ...]]
    """Tensor (op output or boundary key) → (op, input index) reading it."""
    metas: Mapping[Source, TensorMeta]
    """Tensor → shape and dtype."""
    requires_grad: frozenset[Source]
    """Tensors whose gradient the backward pass computes."""
    pins: Mapping[Source, Placement]
    """Boundary tensor → its fixed placement."""
    outputs: Mapping[Source, Placement]
    """The layer's outputs (first output of every op whose outputs no op of the layer reads) → pinned placement."""
    trainable: frozenset[str]
    """Names of the trainable parameters the layer reads."""


def _hidden_shape(layer: Layer) -> tuple[int, ...] | None:
    """Shape of the hidden state: the layer's first floating input, else the last op's first output."""
    if layer.input_meta and is_float(layer.input_meta[0]):
        return layer.input_meta[0].shape
    if layer.ops[-1].outputs and is_float(layer.ops[-1].outputs[0]):
        return layer.ops[-1].outputs[0].shape
    return None


def boundary_pin(meta: TensorMeta, *, hidden: bool, tp: int, sequence_parallel: bool) -> Placement:
    """R, or S(1) for a hidden state (batch, sequence, ...) under sequence parallelism when t divides the sequence.

    Example:
        >>> m = TensorMeta(shape=(2, 16, 64), dtype="bfloat16")
        >>> str(boundary_pin(m, hidden=True, tp=4, sequence_parallel=True))
        'S(1)'
    """
    if hidden and sequence_parallel and tp > 1 and len(meta.shape) >= 3 and shard_fits(meta.shape[1], 1, tp):
        return shard(1)
    return REPLICATE


def _output_index(producer: Op, meta: TensorMeta) -> int:
    for i, out in enumerate(producer.outputs):
        if out == meta:
            return i
    for i, out in enumerate(producer.outputs):
        if out.shape == meta.shape:
            return i
    return 0


def build_layer_graph(layer: Layer, *, tp: int, sequence_parallel: bool) -> LayerGraph:
    """Wire up a layer's ops (see the module docstring for the pins)."""
    by_name = {op.name: op for op in layer.ops}
    hidden = _hidden_shape(layer)
    buffers = {p.name for p in layer.params if p.is_buffer}
    sources: dict[str, tuple[Source, ...]] = {}
    consumers: dict[Source, list[tuple[str, int]]] = {}
    metas: dict[Source, TensorMeta] = {}
    pins: dict[Source, Placement] = {}
    grads: set[Source] = set()
    trainable: set[str] = set()
    for op in layer.ops:
        srcs = []
        for k, (meta, prod, param) in enumerate(zip(op.inputs, op.input_ops, op.input_params)):
            if param is not None and prod is None:
                src = Source(SourceKind.PARAM, param, 0)
                if param not in buffers and is_float(meta):
                    trainable.add(param)
            elif prod is not None and prod in by_name:
                src = Source(SourceKind.OP, prod, _output_index(by_name[prod], meta))
            else:
                src = Source(SourceKind.EXT, prod if prod is not None else f"const:{op.name}:{k}", 0)
                is_hidden = prod is not None and is_float(meta) and meta.shape == hidden
                pins.setdefault(src, boundary_pin(meta, hidden=is_hidden, tp=tp, sequence_parallel=sequence_parallel))
                if is_hidden:
                    grads.add(src)
            srcs.append(src)
            metas.setdefault(src, meta)
            if src.kind is not SourceKind.PARAM:
                consumers.setdefault(src, []).append((op.name, k))
        sources[op.name] = tuple(srcs)
        _propagate_grad(op, srcs, grads, trainable)
    outputs: dict[Source, Placement] = {}
    read = {s.name for srcs in sources.values() for s in srcs if s.kind is SourceKind.OP}
    for op in layer.ops:
        if op.name not in read and op.outputs:
            out = Source(SourceKind.OP, op.name, 0)
            metas.setdefault(out, op.outputs[0])
            is_hidden = is_float(op.outputs[0]) and op.outputs[0].shape == hidden
            outputs[out] = boundary_pin(op.outputs[0], hidden=is_hidden, tp=tp, sequence_parallel=sequence_parallel)
    return LayerGraph(
        layer=layer, sources=sources, consumers={k: tuple(v) for k, v in consumers.items()}, metas=metas,
        requires_grad=frozenset(grads), pins=pins, outputs=outputs, trainable=frozenset(trainable),
    )


def _propagate_grad(op: Op, srcs: list[Source], grads: set[Source], trainable: set[str]) -> None:
    """An op's float outputs need gradients when any input does (a trainable parameter counts)."""
    if any(s in grads or (s.kind is SourceKind.PARAM and s.name in trainable) for s in srcs):
        for i, out in enumerate(op.outputs):
            if is_float(out):
                grads.add(Source(SourceKind.OP, op.name, i))


__all__ = ["LayerGraph", "Source", "SourceKind", "boundary_pin", "build_layer_graph"]
