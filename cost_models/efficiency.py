"""Per-op-class efficiency and backward-pass factors for the roofline compute model.

A device's large-GEMM rate and streaming bandwidth are measured properties of the
device (``GPUSpec.matmul_efficiency``/``memory_efficiency``). This table says how
each op class fares relative to those two rates, and how its backward pass relates
to its forward pass. Each number is sourced on its line; where a class has no
published figure, the kernel's reads and writes are counted instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from autopar.graph.ir import OpClass

# ---- attention (FlashAttention-2, Dao 2023, §4.1 and Fig. 4-6, A100) --------------------------
FLASH_FWD_PEAK_FRACTION = 0.73
"""FlashAttention-2 forward reaches up to 73 % of A100 peak."""
FLASH_BWD_PEAK_FRACTION = 0.63
"""FlashAttention-2 backward reaches up to 63 % of A100 peak."""
A100_MAMF_FRACTION = 0.859
"""Large bf16 GEMM on A100 SXM: 267.9 / 312 TFLOP/s (ml-engineering MAMF table); the reference rate."""
ATTENTION_BACKWARD_FLOPS_RATIO = 2.5
"""Attention backward does 5 matmuls to the forward's 2, i.e. 2.5× the FLOPs (FlashAttention-2 §4.1)."""
ATTENTION_BACKWARD_BYTES_RATIO = 2.0
"""Backward reads q, k, v, o, do, lse and writes dq, dk, dv: about twice the forward's q, k, v → o."""
ATTENTION_BACKWARD_KERNELS = 2
"""The dq/dk/dv kernel plus the row-wise dot(do, o) preprocessing kernel (FlashAttention-2 backward)."""
CAUSAL_WORK_FRACTION = 0.5
"""Causal fused attention skips the blocks above the diagonal: about half the work (FlashAttention-2 §3.1.1)."""

# ---- memory-bound classes: reads + writes of the backward kernels vs the forward's ----------
UNARY_BACKWARD_BYTES_RATIO = 1.5
"""y = f(x): forward reads x, writes y (2 tensors); backward reads dy and x, writes dx (3 tensors)."""
NORM_BACKWARD_BYTES_RATIO = 2.0
"""LayerNorm/RMSNorm backward: reads dy, x, stats, γ and writes dx (≈ 1.5×), plus a dγ/dβ reduction pass
over dy·x̂ (≈ 0.5×)."""
NORM_BACKWARD_KERNELS = 2
"""One kernel for dx, one for the parameter gradients (PyTorch's layer_norm_backward on CUDA)."""
DROPOUT_BACKWARD_BYTES_RATIO = 1.0
"""Forward reads x, writes y and a 1-byte mask; backward reads dy and the mask, writes dx: about equal."""
REDUCTION_BACKWARD_BYTES_RATIO = 1.0
"""The gradient of a reduction broadcasts dy back to the input's size: one input-sized write."""
COPY_BACKWARD_BYTES_RATIO = 1.0
"""The gradient of a copy/layout change is the inverse copy."""
NORM_MEMORY_FRACTION = 0.8
"""Row-wise kernels (norm, softmax, loss) against a copy's bandwidth: a row reduction, then a pass that
writes. Rows that fit on chip are read once (fraction 1); rows that do not are read twice (3 passes for
2 tensors of useful traffic: 2/3). 0.8 sits between the two."""


@dataclass(frozen=True, slots=True, kw_only=True)
class OpClassCost:
    """How one op class runs relative to the device's large-GEMM rate and streaming bandwidth."""

    compute_fraction: float
    """Forward FLOP rate as a fraction of the device's large-GEMM rate."""
    backward_compute_fraction: float
    """Backward FLOP rate, same reference."""
    memory_fraction: float
    """Forward and backward bandwidth as a fraction of the device's streaming bandwidth."""
    backward_flops_ratio: float
    """Backward FLOPs / forward FLOPs (for matmuls: per operand that needs a gradient)."""
    backward_bytes_ratio: float
    """Backward bytes / forward bytes (for matmuls: per operand that needs a gradient)."""
    backward_kernels: int
    """Kernels the backward launches (for matmuls: per operand that needs a gradient)."""
    tensor_cores: bool
    """Whether the FLOPs run on matrix units (dtype peak) or vector units (fp32 peak)."""


_MATMUL = OpClassCost(compute_fraction=1.0, backward_compute_fraction=1.0, memory_fraction=1.0,
                      backward_flops_ratio=1.0, backward_bytes_ratio=1.0, backward_kernels=1, tensor_cores=True)
# dX = dY·Wᵀ and dW = Xᵀ·dY are GEMMs of the forward's size (Narayanan et al. 2021: backward ≈ 2× forward).


def _memory_bound(backward_bytes_ratio: float, memory_fraction: float = 1.0, backward_kernels: int = 1) -> OpClassCost:
    return OpClassCost(compute_fraction=1.0, backward_compute_fraction=1.0, memory_fraction=memory_fraction,
                       backward_flops_ratio=1.0, backward_bytes_ratio=backward_bytes_ratio,
                       backward_kernels=backward_kernels, tensor_cores=False)


OP_CLASS_COSTS: Mapping[OpClass, OpClassCost] = MappingProxyType({
    OpClass.MATMUL: _MATMUL,
    OpClass.ATTENTION: OpClassCost(
        compute_fraction=FLASH_FWD_PEAK_FRACTION / A100_MAMF_FRACTION,
        backward_compute_fraction=FLASH_BWD_PEAK_FRACTION / A100_MAMF_FRACTION,
        memory_fraction=1.0, backward_flops_ratio=ATTENTION_BACKWARD_FLOPS_RATIO,
        backward_bytes_ratio=ATTENTION_BACKWARD_BYTES_RATIO, backward_kernels=ATTENTION_BACKWARD_KERNELS,
        tensor_cores=True),
    OpClass.EMBEDDING: _memory_bound(COPY_BACKWARD_BYTES_RATIO),  # plus the dense weight gradient (compute.py)
    OpClass.ELEMENTWISE: _memory_bound(UNARY_BACKWARD_BYTES_RATIO),
    OpClass.REDUCTION: _memory_bound(REDUCTION_BACKWARD_BYTES_RATIO),
    OpClass.NORM: _memory_bound(NORM_BACKWARD_BYTES_RATIO, NORM_MEMORY_FRACTION, NORM_BACKWARD_KERNELS),
    OpClass.SOFTMAX: _memory_bound(UNARY_BACKWARD_BYTES_RATIO, NORM_MEMORY_FRACTION),
    OpClass.DROPOUT: _memory_bound(DROPOUT_BACKWARD_BYTES_RATIO),
    OpClass.VIEW: _memory_bound(0.0, backward_kernels=0),  # no data moves either way
    OpClass.COPY: _memory_bound(COPY_BACKWARD_BYTES_RATIO),
    OpClass.LOSS: _memory_bound(UNARY_BACKWARD_BYTES_RATIO, NORM_MEMORY_FRACTION),
    OpClass.UNKNOWN: _memory_bound(UNARY_BACKWARD_BYTES_RATIO),  # priced as a pointwise op and listed
})
"""Cost factors per op class."""

PASS_THROUGH_BACKWARD = frozenset({"add", "sub", "add_", "sub_", "alias"})
"""Pointwise ops whose gradient is dy itself: no backward kernel unless an input was broadcast (then a sum)."""

PRODUCT_BACKWARD = frozenset({"mul", "div", "mul_", "div_"})
"""Pointwise products of tensors: the gradient of each operand is dy times (a function of) the other operand,
so backward runs one kernel per operand that needs a gradient, reading dy and the other operand and writing
that operand's gradient (autograd's ``mul_tensor_backward``/``div_tensor_self_backward``); a broadcast
operand's gradient is that full-size product summed over the broadcast dims (``sum_to_size``): one more
write and read of the full size. A product of two activations (SwiGLU's gate · up) so moves 2× its forward
bytes, one with a constant (rotary's · cos) 1×, where the unary rule gives 1.5×."""

__all__ = [
    "ATTENTION_BACKWARD_FLOPS_RATIO",
    "CAUSAL_WORK_FRACTION",
    "OP_CLASS_COSTS",
    "OpClassCost",
    "PASS_THROUGH_BACKWARD",
    "PRODUCT_BACKWARD",
]
