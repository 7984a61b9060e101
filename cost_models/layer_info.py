"""What the cost models read off a captured layer: its sequence length and its s×s attention core.

Megatron's selective recomputation (Korthikanti et al. 2022, §4.3) drops the
activations of the attention core, the tensors whose last two dimensions are both
the sequence length (scores, softmax output, dropout mask and output), and
recomputes them in backward. Both the memory model (what is no longer kept) and the
compute model (what is re-run) use the one definition here.
"""

from __future__ import annotations

from autopar.cost_models.profiling.calibration import FLOAT_DTYPES
from autopar.graph.ir import Layer, Op, TensorMeta

ATTENTION_CORE_MIN_DIMS = 3
"""Score tensors are (batch·heads, s, s) or (batch, heads, s, s): at least 3 dims."""


def infer_seq_len(layer: Layer) -> int | None:
    """The sequence length of a layer: dim 1 of its first boundary tensor with ≥ 2 dims (batch, seq, ...).

    Example:
        >>> from autopar.graph.ir import TensorMeta
        >>> x = TensorMeta(shape=(4, 128, 256), dtype="float32")
        >>> infer_seq_len(Layer(index=0, module_path="b.0", kind="k", ops=(), params=(), input_meta=(x,)))
        128
    """
    for t in layer.input_meta:
        if len(t.shape) >= 2:
            return t.shape[1]
    return None


def is_attention_core(meta: TensorMeta, seq_len: int | None, boundary_shapes: frozenset[tuple[int, ...]]) -> bool:
    """Whether a tensor is part of the s×s attention core.

    Its last two dims both equal ``seq_len`` and it has at least 3 dims; a tensor shaped like the
    layer's own input (batch, s, h) is excluded, which only matters when h happens to equal s.
    """
    shape = meta.shape
    return (seq_len is not None and len(shape) >= ATTENTION_CORE_MIN_DIMS
            and shape[-1] == seq_len and shape[-2] == seq_len and shape not in boundary_shapes)


def boundary_shapes(layer: Layer) -> frozenset[tuple[int, ...]]:
    """Shapes of the tensors entering the layer."""
    return frozenset(t.shape for t in layer.input_meta)


def attention_core_ops(layer: Layer, seq_len: int | None = None) -> tuple[Op, ...]:
    """Ops that read or write an s×s tensor: what selective recomputation re-runs in backward."""
    seq = seq_len if seq_len is not None else infer_seq_len(layer)
    shapes = boundary_shapes(layer)
    return tuple(op for op in layer.ops
                 if any(is_attention_core(t, seq, shapes) for t in (*op.inputs, *op.outputs)))


def layer_capture_dtype(layer: Layer) -> str | None:
    """The float dtype the layer's trainable parameters were captured in, or None (no such parameter).

    Float tensors of that dtype are priced and stored at the training dtype; a float tensor of another
    dtype is a cast the model's code makes on purpose (RMSNorm's ``x.float()``) and keeps its width.
    """
    return next((p.dtype for p in layer.params if not p.is_buffer and p.dtype in FLOAT_DTYPES), None)


__all__ = ["attention_core_ops", "boundary_shapes", "infer_seq_len", "is_attention_core", "layer_capture_dtype"]
