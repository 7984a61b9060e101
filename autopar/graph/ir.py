"""The operator-graph IR: frozen values that every later stage reads.

Nothing here imports torch, so ``solvers/`` and ``cost_models/`` can depend on it.
Capture (``autopar/capture``) is the only producer of these values.

Units are in names: ``flops`` are floating-point operations of one forward pass
(2 per multiply-add), ``nbytes`` are bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from autopar._compat import StrEnum


class OpClass(StrEnum):
    """What an op does, for pricing: compute-bound classes vs memory-bound ones."""

    MATMUL = "matmul"  # mm, addmm, bmm, baddbmm, linear, conv
    ATTENTION = "attention"  # scaled_dot_product_attention and fused flash/efficient kernels
    EMBEDDING = "embedding"  # table lookups
    ELEMENTWISE = "elementwise"  # pointwise arithmetic and activations
    REDUCTION = "reduction"  # sum, mean, max, ...
    NORM = "norm"  # layer_norm, rms_norm, batch_norm, group_norm
    SOFTMAX = "softmax"  # softmax, log_softmax
    DROPOUT = "dropout"  # dropout (priced as elementwise; saves a 1-byte mask on GPU)
    VIEW = "view"  # view/reshape/transpose/expand/slice: no data moved when it is a view
    COPY = "copy"  # clone/contiguous/cat/to-dtype: data moved, no arithmetic
    LOSS = "loss"  # cross entropy, nll
    UNKNOWN = "unknown"  # not in the table: counted as memory-bound and listed


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorMeta:
    """Shape and dtype of one tensor."""

    shape: tuple[int, ...]
    """Sizes per dimension."""
    dtype: str
    """Torch dtype name without the ``torch.`` prefix, e.g. ``"bfloat16"``."""

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        """Bytes per element."""
        return DTYPE_BYTES.get(self.dtype, 4)

    @property
    def nbytes(self) -> int:
        """Bytes the tensor occupies when dense."""
        return self.numel * self.itemsize


DTYPE_BYTES: Mapping[str, int] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
    "complex64": 8,
}
"""Bytes per element of the dtypes capture can meet."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ParamInfo:
    """A parameter (or buffer) of the model."""

    name: str
    """Fully qualified name, as in ``model.named_parameters()``."""
    shape: tuple[int, ...]
    """Sizes per dimension."""
    dtype: str
    """Dtype name at capture time."""
    is_buffer: bool = False
    """True for registered buffers (not trained, no gradient or optimizer state)."""

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes at the capture dtype."""
        return self.numel * DTYPE_BYTES.get(self.dtype, 4)


@dataclass(frozen=True, slots=True, kw_only=True)
class Op:
    """One ATen operator of the forward pass."""

    name: str
    """Unique name within the graph, e.g. ``"mm_3"``."""
    target: str
    """ATen overload, e.g. ``"aten.mm.default"``."""
    op_class: OpClass
    """Pricing class."""
    inputs: tuple[TensorMeta, ...]
    """Tensor arguments, in call order."""
    input_ops: tuple[str | None, ...]
    """Producer op name per tensor argument; None for graph inputs, parameters and constants."""
    input_params: tuple[str | None, ...]
    """Parameter/buffer name per tensor argument when it is one, else None."""
    outputs: tuple[TensorMeta, ...]
    """Tensor results."""
    flops: int
    """Forward FLOPs (2 per multiply-add)."""
    nbytes_moved: int
    """Bytes read and written by the forward kernel (0 for views)."""
    module_path: str
    """Fully qualified name of the innermost module that called the op (``""`` for the root)."""
    scalars: tuple[object, ...] = ()
    """Non-tensor positional arguments (e.g. the dims of a transpose, a view's sizes as a tuple)."""
    keywords: tuple[tuple[str, object], ...] = ()
    """Non-tensor keyword arguments (e.g. ``("approximate", "tanh")`` of gelu, the ``scale`` of attention)."""

    def __post_init__(self) -> None:
        if len(self.input_ops) != len(self.inputs) or len(self.input_params) != len(self.inputs):
            raise ValueError(
                f"op {self.name}: {len(self.inputs)} inputs but {len(self.input_ops)} producers "
                f"and {len(self.input_params)} param slots"
            )
        if self.flops < 0 or self.nbytes_moved < 0:
            raise ValueError(f"op {self.name}: negative flops {self.flops} or bytes {self.nbytes_moved}")


@dataclass(frozen=True, slots=True, kw_only=True)
class SavedTensor:
    """A tensor that autograd keeps from the forward pass for the backward pass."""

    producer: str | None
    """Op that produced it (None for a graph input)."""
    saver: str
    """Op whose backward needs it."""
    meta: TensorMeta
    """Shape and dtype as saved (a dropout mask is saved as ``bool``)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Layer:
    """A contiguous run of ops owned by one top-level block (embedding, one transformer block, head)."""

    index: int
    """Position in ``OpGraph.layers``."""
    module_path: str
    """Module path of the block, e.g. ``"transformer.h.3"``."""
    kind: str
    """Structural hash: equal for structurally identical layers (same ops, shapes, params)."""
    ops: tuple[Op, ...]
    """The layer's ops in execution order."""
    params: tuple[ParamInfo, ...]
    """Parameters and buffers first used by this layer."""
    saved: tuple[SavedTensor, ...] = ()
    """Activations saved for backward by this layer's ops."""
    input_meta: tuple[TensorMeta, ...] = ()
    """Tensors the layer reads from earlier layers or graph inputs, the hidden state first."""
    sent_meta: tuple[TensorMeta, ...] | None = None
    """What a pipeline stage boundary right before the layer sends for it; None: ``input_meta``.

    The emitted program recomputes a value made from the model's inputs alone (an attention mask, rotary
    cos/sin) in every stage that reads it, so the inputs it is made from travel instead of the value
    (``autopar.graph.layers.input_only_sources``)."""

    @property
    def forward_flops(self) -> int:
        """FLOPs of one forward pass through the layer."""
        return sum(op.flops for op in self.ops)

    @property
    def num_params(self) -> int:
        """Trainable parameter count (buffers excluded)."""
        return sum(p.numel for p in self.params if not p.is_buffer)

    @property
    def param_nbytes(self) -> int:
        """Bytes of trainable parameters at capture dtype."""
        return sum(p.nbytes for p in self.params if not p.is_buffer)

    @property
    def saved_nbytes(self) -> int:
        """Bytes of activations saved for backward, unsharded."""
        return sum(s.meta.nbytes for s in self.saved)

    @property
    def boundary_nbytes(self) -> int:
        """Bytes a pipeline stage boundary before the layer sends for it (``sent_meta``, else ``input_meta``)."""
        return sum(t.nbytes for t in (self.input_meta if self.sent_meta is None else self.sent_meta))


@dataclass(frozen=True, slots=True, kw_only=True)
class GraphSummary:
    """Headline numbers of a captured graph."""

    num_params: int
    """Trainable parameters."""
    forward_flops: int
    """FLOPs of one forward pass, all ops."""
    matmul_flops: int
    """FLOPs of matmul-class and attention ops only."""
    num_layers: int
    """Number of layers."""
    num_layer_kinds: int
    """Number of structurally distinct layers."""
    capture_method: str
    """``"fx"`` or ``"export"``."""
    unknown_ops: tuple[str, ...]
    """ATen targets that had no FLOP rule (priced as memory-bound)."""
    num_ops: int
    """Number of ATen ops."""


@dataclass(frozen=True, slots=True, kw_only=True)
class OpGraph:
    """The captured forward pass of a model for one example batch."""

    layers: tuple[Layer, ...]
    """Layers in execution order; every op belongs to exactly one."""
    params: tuple[ParamInfo, ...]
    """All parameters and buffers of the model."""
    inputs: tuple[TensorMeta, ...]
    """Example inputs as captured (batch dimension first)."""
    batch_size: int
    """Batch size of the example inputs (their leading dimension)."""
    capture_method: str
    """``"fx"`` or ``"export"``."""
    capture_note: str = ""
    """Why that method was used (e.g. the fx error that forced the fallback)."""
    model_name: str = ""
    """Class name of the captured module."""
    unknown_ops: tuple[str, ...] = ()
    """ATen targets without a FLOP rule."""
    tied_params: tuple[tuple[str, str], ...] = ()
    """(alias, owner) pairs of parameters shared between modules (e.g. tied embeddings)."""
    info: Mapping[str, int] = field(default_factory=dict)
    """Model hyper-parameters capture could read (hidden, heads, layers, vocab, seq), when known."""

    def __post_init__(self) -> None:
        if self.capture_method not in ("fx", "export"):
            raise ValueError(f"capture_method must be 'fx' or 'export', got {self.capture_method!r}")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")

    @property
    def ops(self) -> tuple[Op, ...]:
        """All ops in execution order."""
        return tuple(op for layer in self.layers for op in layer.ops)

    @property
    def num_params(self) -> int:
        """Trainable parameter count (buffers excluded, tied parameters once)."""
        return sum(p.numel for p in self.params if not p.is_buffer)

    def layer_kinds(self) -> dict[str, list[int]]:
        """Layer indices grouped by kind, in order of first appearance."""
        kinds: dict[str, list[int]] = {}
        for layer in self.layers:
            kinds.setdefault(layer.kind, []).append(layer.index)
        return kinds

    def summary(self) -> GraphSummary:
        """Headline numbers: parameters, FLOPs, layers, capture method."""
        ops = self.ops
        return GraphSummary(
            num_params=self.num_params,
            forward_flops=sum(op.flops for op in ops),
            matmul_flops=sum(op.flops for op in ops if op.op_class in (OpClass.MATMUL, OpClass.ATTENTION)),
            num_layers=len(self.layers),
            num_layer_kinds=len(self.layer_kinds()),
            capture_method=self.capture_method,
            unknown_ops=self.unknown_ops,
            num_ops=len(ops),
        )

    def fingerprint(self) -> str:
        """Stable hash of the graph's structure and shapes, per example sample.

        Two captures of the same model at different batch sizes have the same
        fingerprint; a different model (or sequence length) does not.
        """
        h = hashlib.sha256()
        h.update(f"{self.model_name}|{self.num_params}".encode())
        # what runs where; shapes enter through params and per-sample inputs (one update of the concatenation
        # is the same digest as one update per op)
        h.update("".join([f"{op.module_path}:{op.target}" for op in self.ops]).encode())
        h.update("".join([f"{p.name}{p.shape}" for p in self.params]).encode())
        per_sample = [t.shape[1:] for t in self.inputs]
        h.update(repr(per_sample).encode())
        return h.hexdigest()[:16]

    def with_layers(self, layers: tuple[Layer, ...]) -> OpGraph:
        """A copy with other layers (used by tests and transforms)."""
        return dataclasses.replace(self, layers=layers)
