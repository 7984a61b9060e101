"""FLOPs and bytes moved per ATen op, from shapes alone (torch-free).

Conventions (Megatron-LM, PaLM): 2 FLOPs per multiply-add; attention counts the
full s×s score and value matmuls, with no discount for a causal mask. Pointwise
and normalisation ops get small per-element counts (cited below); they do not
enter ``matmul_flops`` and matter only for roofline pricing, where such ops are
memory-bound anyway.

Bytes moved = bytes of tensor inputs read + outputs written, except views (0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from autopar.graph.ir import OpClass, TensorMeta

# Per-element FLOP counts for non-matmul ops. They follow the usual convention of
# fvcore/PyTorch's FlopCounterMode for pointwise ops (one FLOP per output element)
# and count the arithmetic of the normalising ops explicitly:
LAYER_NORM_FLOPS_PER_ELEMENT = 5  # mean, subtract, square+accumulate variance, scale, shift
RMS_NORM_FLOPS_PER_ELEMENT = 4  # square+accumulate, rsqrt-scale, weight multiply
SOFTMAX_FLOPS_PER_ELEMENT = 5  # max, subtract, exp, sum, divide
POINTWISE_FLOPS_PER_ELEMENT = 1
REDUCTION_FLOPS_PER_ELEMENT = 1  # one add/max per input element
CROSS_ENTROPY_FLOPS_PER_ELEMENT = 6  # log-softmax (5) + gather/negate (1)

GROUPED_MATMUL = frozenset({"_grouped_mm", "grouped_mm", "grouped_mm_fallback"})
"""Mixture-of-experts GEMMs over tokens sorted by expert: ``torch._grouped_mm`` / ``F.grouped_mm`` and
transformers' custom op ``transformers::grouped_mm_fallback`` (its per-expert ``torch.mm`` loop, opaque to
capture). Input (S, K) holds every routed (token, expert) pair, S = tokens · top-k, so the shapes alone
give the routed FLOPs; the weight (E, K, N) is read whole, which is the uniform-load case (every expert
receives tokens)."""
_MATMUL = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "convolution", "_convolution", "addbmm",
           "_addmm_activation", *GROUPED_MATMUL}
_ATTENTION = {
    "scaled_dot_product_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_cudnn_attention",
    "_flash_attention_forward",
    "_efficient_attention_forward",
}
_EMBEDDING = {"embedding", "_embedding_bag", "embedding_bag"}
_NORM = {"native_layer_norm", "layer_norm", "rms_norm", "_fused_rms_norm", "native_batch_norm",
         "_native_batch_norm_legit", "_native_batch_norm_legit_no_training", "native_group_norm",
         "batch_norm", "group_norm"}
_SOFTMAX = {"_softmax", "softmax", "_log_softmax", "log_softmax", "_safe_softmax"}
_DROPOUT = {"native_dropout", "dropout", "bernoulli", "bernoulli_"}
_LOSS = {"nll_loss_forward", "nll_loss", "cross_entropy_loss", "nll_loss2d_forward", "mse_loss"}
_REDUCTION = {"sum", "mean", "amax", "amin", "max", "min", "var", "var_mean", "std", "prod", "norm",
              "linalg_vector_norm", "logsumexp", "argmax", "argmin", "cumsum", "topk", "sort", "all", "any",
              # MoE routers: tokens per expert (histc/bincount), sorting tokens by expert
              "histc", "bincount", "argsort", "searchsorted"}
_VIEW = {"view", "_unsafe_view", "reshape", "transpose", "t", "permute", "expand", "unsqueeze", "squeeze",
         "slice", "select", "split", "split_with_sizes", "chunk", "unbind", "narrow", "as_strided",
         "alias", "detach", "lift_fresh", "view_as", "flatten", "unflatten", "movedim", "expand_as",
         "_reshape_alias", "diagonal", "unfold", "numpy_T", "lift_fresh_copy", "sym_size", "sym_numel"}
_COPY = {"clone", "contiguous", "_to_copy", "to", "copy", "copy_", "cat", "stack", "repeat",
         "repeat_interleave", "index_select", "gather", "index", "scatter", "masked_select", "pad",
         "constant_pad_nd", "empty", "empty_like", "zeros", "zeros_like", "ones", "ones_like", "full",
         "full_like", "arange", "new_zeros", "new_ones", "new_empty", "new_full", "scalar_tensor",
         "empty_strided", "fill", "fill_", "zero_", "_assert_tensor_metadata", "lift", "triu", "tril",
         "_local_scalar_dense", "item", "where", "masked_fill", "masked_fill_", "index_put", "index_put_",
         "_unsafe_index", "flip", "roll", "resize_", "set_",
         # MoE dispatch/combine: moving routed rows and weights, no arithmetic beyond an add per element
         "scatter_", "scatter_add", "scatter_add_", "scatter_reduce", "scatter_reduce_", "index_add",
         "index_add_", "index_copy", "index_copy_", "nonzero", "one_hot"}
_ELEMENTWISE = {
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "neg", "exp", "log", "sqrt", "rsqrt", "pow",
    "tanh", "sigmoid", "relu", "relu_", "gelu", "silu", "silu_", "mish", "hardswish", "leaky_relu", "elu",
    "abs", "clamp", "clamp_min", "clamp_max", "maximum", "minimum", "reciprocal", "sin", "cos", "erf",
    "square", "eq", "ne", "lt", "le", "gt", "ge", "logical_not", "logical_and", "logical_or", "bitwise_not",
    "bitwise_and", "bitwise_or", "rsub", "floor", "ceil", "round", "sign", "addcmul", "addcdiv", "lerp",
    "softplus", "log1p", "expm1", "_log_softmax_backward_data", "glu", "gelu_", "tanh_", "threshold",
    "hardtanh", "selu", "celu", "exp2", "pow_", "isinf", "isnan", "atan", "atan2", "frac", "trunc",
    "fmod", "remainder", "floor_divide", "true_divide", "logit", "xlogy", "nan_to_num", "cumprod",
    "sgn", "relu6", "hardsigmoid", "softshrink", "hardshrink", "_softmax_backward_data",
}


OP_NAMESPACES = ("aten", "prims", "transformers")
"""Operator namespaces whose targets read ``namespace.packet.overload`` (transformers registers its
MoE fallback as a custom op)."""


MOE_ROUTING_SOURCE = "top-k routing, uniform expert load (grouped-GEMM shapes)"
"""What ``Predicted.sources["experts"]`` says for a model with routed experts."""


def has_routed_experts(targets: Sequence[str]) -> bool:
    """Whether any op is a routed-expert grouped GEMM (priced at top-k routing, uniform load).

    Example:
        >>> has_routed_experts(["aten.mm.default", "transformers.grouped_mm_fallback.default"])
        True
    """
    return any(op_name(t) in GROUPED_MATMUL for t in targets)


def op_name(target: str) -> str:
    """The packet name of an ATen target: ``"aten.addmm.default"`` → ``"addmm"``.

    Example:
        >>> op_name("aten.addmm.default")
        'addmm'
        >>> op_name("aten.add.Tensor")
        'add'
        >>> op_name("transformers.grouped_mm_fallback.default")
        'grouped_mm_fallback'
    """
    parts = target.split(".")
    return parts[1] if len(parts) >= 2 and parts[0] in OP_NAMESPACES else parts[0]


def classify(target: str) -> OpClass:
    """The pricing class of an ATen target.

    Example:
        >>> classify("aten.mm.default").value
        'matmul'
        >>> classify("aten.frobnicate.default").value
        'unknown'
    """
    name = op_name(target)
    for names, cls in (
        (_MATMUL, OpClass.MATMUL), (_ATTENTION, OpClass.ATTENTION), (_EMBEDDING, OpClass.EMBEDDING),
        (_NORM, OpClass.NORM), (_SOFTMAX, OpClass.SOFTMAX), (_DROPOUT, OpClass.DROPOUT),
        (_LOSS, OpClass.LOSS), (_REDUCTION, OpClass.REDUCTION), (_VIEW, OpClass.VIEW),
        (_COPY, OpClass.COPY), (_ELEMENTWISE, OpClass.ELEMENTWISE),
    ):
        if name in names:
            return cls
    return OpClass.UNKNOWN


def count_flops(target: str, inputs: Sequence[TensorMeta], outputs: Sequence[TensorMeta]) -> int:
    """Forward FLOPs of one op call (2 per multiply-add).

    Example:
        >>> a, b = TensorMeta(shape=(4, 8), dtype="float32"), TensorMeta(shape=(8, 16), dtype="float32")
        >>> count_flops("aten.mm.default", [a, b], [TensorMeta(shape=(4, 16), dtype="float32")])
        1024
    """
    cls = classify(target)
    out_numel = sum(t.numel for t in outputs[:1])
    match cls:
        case OpClass.MATMUL:
            return _matmul_flops(op_name(target), inputs, outputs)
        case OpClass.ATTENTION:
            return _attention_flops(inputs)
        case OpClass.NORM:
            per = RMS_NORM_FLOPS_PER_ELEMENT if "rms" in target else LAYER_NORM_FLOPS_PER_ELEMENT
            return per * out_numel
        case OpClass.SOFTMAX:
            return SOFTMAX_FLOPS_PER_ELEMENT * out_numel
        case OpClass.ELEMENTWISE | OpClass.DROPOUT:
            return POINTWISE_FLOPS_PER_ELEMENT * out_numel
        case OpClass.REDUCTION:
            return REDUCTION_FLOPS_PER_ELEMENT * (inputs[0].numel if inputs else 0)
        case OpClass.LOSS:
            return CROSS_ENTROPY_FLOPS_PER_ELEMENT * (inputs[0].numel if inputs else 0)
        case OpClass.EMBEDDING | OpClass.VIEW | OpClass.COPY | OpClass.UNKNOWN:
            return 0
        case _:
            raise ValueError(f"no FLOP rule for op class {cls}")


def count_bytes(target: str, inputs: Sequence[TensorMeta], outputs: Sequence[TensorMeta]) -> int:
    """Bytes a kernel reads and writes; 0 for views (no data moves).

    Embedding reads only the rows it gathers, not the whole table.
    """
    cls = classify(target)
    if cls is OpClass.VIEW:
        return 0
    written = sum(t.nbytes for t in outputs)
    if cls is OpClass.EMBEDDING:
        return 2 * written + sum(t.nbytes for t in inputs[1:2])  # gathered rows read + written, plus indices
    return sum(t.nbytes for t in inputs) + written


def _matmul_flops(name: str, inputs: Sequence[TensorMeta], outputs: Sequence[TensorMeta]) -> int:
    """2·M·K·N for mm-like ops; bias additions of addmm/baddbmm add one FLOP per output element."""
    out = outputs[0]
    if name in ("convolution", "_convolution"):
        weight = inputs[1]
        c_in_per_group, *kernel = weight.shape[1:]
        return 2 * out.numel * c_in_per_group * math.prod(kernel)
    if name in ("addmm", "baddbmm", "addbmm", "_addmm_activation"):
        a, b = inputs[1], inputs[2]
        k = a.shape[-1]
        batch = a.shape[0] if name == "addbmm" else 1
        return 2 * out.numel * k * batch + out.numel
    if name in GROUPED_MATMUL:
        return _grouped_matmul_flops(inputs)
    if name == "linear":
        return 2 * out.numel * inputs[0].shape[-1] + (out.numel if len(inputs) > 2 else 0)
    a = inputs[0]
    return 2 * out.numel * a.shape[-1]


def _attention_flops(inputs: Sequence[TensorMeta]) -> int:
    """Scores q·kᵀ and probabilities·v: 2·B·H·Sq·Sk·(Dqk + Dv), full s×s (no causal discount)."""
    q, k, v = inputs[0], inputs[1], inputs[2]
    *batch_heads, s_q, d_qk = q.shape
    s_k, d_v = k.shape[-2], v.shape[-1]
    return 2 * math.prod(batch_heads) * s_q * s_k * (d_qk + d_v)


def _grouped_matmul_flops(inputs: Sequence[TensorMeta]) -> int:
    """2·S·K·N for a grouped GEMM; S counts each routed (token, expert) pair once, whatever the load.

    Shapes (``torch._grouped_mm``): (S, K) x (E, K, N) → (S, N), groups along the rows; (E, M, K) x
    (E, K, N) → (E, M, N), a batched GEMM; (M, S) x (S, N) → (E, M, N), groups along the contraction
    (the weight gradient), still 2·M·S·N in all.

    Example:
        >>> x, w = TensorMeta(shape=(32, 64), dtype="float32"), TensorMeta(shape=(8, 64, 16), dtype="float32")
        >>> _grouped_matmul_flops([x, w]) == 2 * 32 * 64 * 16
        True
    """
    a, b = inputs[0], inputs[1]
    if len(a.shape) == 2 and len(b.shape) == 3:
        return 2 * a.shape[0] * a.shape[1] * b.shape[2]
    if len(a.shape) == 3 and len(b.shape) == 3:
        return 2 * math.prod(a.shape) * b.shape[2]
    if len(a.shape) == 2 and len(b.shape) == 2:
        return 2 * a.shape[0] * a.shape[1] * b.shape[1]
    return 2 * math.prod(a.shape) * b.shape[-1]  # (E, M, K) x (K_total, N) variants: rows x contraction x cols
