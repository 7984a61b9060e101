"""The training loss the captured forward leaves out: cross-entropy over the vocabulary, in fp32.

A causal LM's ``forward`` returns logits; the training loop then runs
``F.cross_entropy(logits.float(), targets)`` (torchtitan ``cross_entropy_loss``, nanoGPT,
Megatron's fp32 ``cross_entropy_loss_fusion=False`` path, and autopar's own examples). So the
graph autopar captures has no loss op, and the step missed its kernels, which are memory-bound
and large at a 128K vocabulary: one pass over tokens × V elements per kernel. In eager PyTorch:

forward, per logit element (bf16/fp16 logits; fp32 logits skip the two casts):
- cast to fp32: read 2 B, write 4 B;
- log_softmax: read 4 B, write 4 B (the fp32 log-probabilities are saved for backward);
- nll_loss: gathers one element per token (negligible);

backward:
- nll_loss_backward: a zero-filled fp32 gradient, write 4 B (plus one scatter per token);
- log_softmax_backward: read the gradient and the saved output, write the input gradient: 12 B;
- cast backward: read 4 B, write 2 B.

The saved fp32 log-probabilities (4 B per element) are also activation memory that the captured
graph does not hold (a micro-batch of 2 × 8,192 tokens at V = 128,256 saves 8.4 GB), and the backward's
two fp32 gradients (of the log-probabilities and of the logits) are alive with them at its peak: 16.8 GB more.

On a vocabulary-split head the emitted program runs the loss under torch's ``loss_parallel()``
(``autopar/emit/loss.py``): every term above is at V/t per rank, plus three all-reduces of one fp32
value per token, and its fused backward holds three arrays of the local logits' size instead of two.
"""

from __future__ import annotations

from autopar.cost_models.cluster import GPUSpec
from autopar.graph.ir import DTYPE_BYTES, Op, OpClass, OpGraph

FP32_BYTES = 4
"""The loss runs in fp32 whatever the training dtype."""


def cross_entropy_bytes(tokens: float, vocab: int, *, logits_dtype: str) -> tuple[float, float]:
    """(forward, backward) bytes the eager fp32 cross-entropy moves over ``tokens`` × ``vocab`` logits.

    Example:
        >>> cross_entropy_bytes(1, 1000, logits_dtype="bfloat16")  # (2+4 + 4+4) B and (4 + 12 + 4+2) B per element
        (14000.0, 22000.0)
        >>> cross_entropy_bytes(1, 1000, logits_dtype="float32")
        (8000.0, 16000.0)
    """
    elements = float(tokens) * vocab
    width = DTYPE_BYTES[logits_dtype]
    cast = width + FP32_BYTES if width != FP32_BYTES else 0
    log_softmax_fwd = 2 * FP32_BYTES
    nll_bwd = FP32_BYTES
    log_softmax_bwd = 3 * FP32_BYTES
    return elements * (cast + log_softmax_fwd), elements * (nll_bwd + log_softmax_bwd + cast)


def estimate_cross_entropy_time(tokens: float, vocab: int, *, logits_dtype: str, gpu: GPUSpec) -> tuple[float, float]:
    """(forward_s, backward_s) of the eager fp32 cross-entropy: its bytes at the achievable bandwidth.

    Example:
        >>> from autopar.cost_models.cluster import Cluster
        >>> gpu = Cluster.preset("dgx-h100").gpu
        >>> fwd, bwd = estimate_cross_entropy_time(16384, 128256, logits_dtype="bfloat16", gpu=gpu)
        >>> round(fwd * 1e3, 1), round(bwd * 1e3, 1)  # ms for 2 × 8,192 tokens at Llama 3's vocabulary
        (9.8, 15.3)
    """
    fwd, bwd = cross_entropy_bytes(tokens, vocab, logits_dtype=logits_dtype)
    rate = gpu.achievable_mem_bytes_per_s
    kernels_fwd, kernels_bwd = (2, 3) if DTYPE_BYTES[logits_dtype] != FP32_BYTES else (1, 2)
    return (max(fwd / rate, kernels_fwd * gpu.kernel_launch_s), max(bwd / rate, kernels_bwd * gpu.kernel_launch_s))


def cross_entropy_saved_bytes(tokens: float, vocab: int) -> float:
    """Activation bytes the loss saves for backward: the fp32 log-probabilities.

    Example:
        >>> cross_entropy_saved_bytes(2 * 8192, 128256) / 1e9
        8.405385216
    """
    return float(tokens) * vocab * FP32_BYTES


LOSS_PARALLEL_ALL_REDUCES = 3
"""All-reduces over the TP group that ``loss_parallel`` runs per cross-entropy forward, each of one fp32 value per
token (torch 2.13 ``torch/distributed/tensor/parallel/loss.py``: ``_log_softmax``'s max and sum of exponentials,
``_nll_loss_forward``'s masked target log-probability via ``_MaskPartial._reduce_value``); its fused backward
(``_nll_loss_and_log_softmax_backward``) runs none."""

BACKWARD_WORKING_ARRAYS = {False: 2, True: 3}
"""fp32 arrays of the (local) logits' size alive at the loss backward's peak, beside the saved log-probabilities.
Whole-vocabulary eager loss: ``nll_loss_backward``'s gradient and ``_log_softmax_backward_data``'s output
(measured op by op on CPU). ``loss_parallel``: ``_nll_loss_and_log_softmax_backward`` holds ``grad_input``
(zeros, the target's −1) while ``(grad_input + exp(x)) * grad_output`` makes two more (read in torch 2.13)."""


def cross_entropy_backward_working_bytes(tokens: float, vocab: int, *, vocab_parallel: bool = False) -> float:
    """Bytes the loss backward allocates on top of the saved log-probabilities, at its peak
    (``BACKWARD_WORKING_ARRAYS``); ``vocab`` is the rank's share (V/t under ``vocab_parallel``).

    Example:
        >>> cross_entropy_backward_working_bytes(2 * 8192, 128256) / 1e9   # 2 × 8,192 tokens at Llama 3's vocabulary
        16.810770432
        >>> cross_entropy_backward_working_bytes(2 * 8192, 128256 // 8, vocab_parallel=True) / 1e9  # at V/8
        3.152019456
    """
    return BACKWARD_WORKING_ARRAYS[vocab_parallel] * float(tokens) * vocab * FP32_BYTES


def loss_parallel_all_reduce_bytes(tokens: float) -> tuple[float, ...]:
    """Bytes of each all-reduce ``loss_parallel`` runs in the loss forward (``LOSS_PARALLEL_ALL_REDUCES``).

    Example:
        >>> loss_parallel_all_reduce_bytes(4 * 8192)   # one fp32 per token, three times
        (131072.0, 131072.0, 131072.0)
    """
    return (float(tokens) * FP32_BYTES,) * LOSS_PARALLEL_ALL_REDUCES


def uncaptured_logits(graph: OpGraph) -> tuple[Op, int, int] | None:
    """(the logits' op, tokens at the captured batch, vocabulary) when the graph ends in logits and holds
    no loss op, else None.

    The logits are the last matmul's output of the graph's last layer, (..., V). When tensor parallelism
    leaves them split over the vocabulary, the loss runs on each rank's V/t columns (Megatron-LM's
    vocab-parallel cross-entropy; torch's ``loss_parallel``), so callers divide by t then.
    """
    if any(op.op_class is OpClass.LOSS for op in graph.ops) or not graph.layers:
        return None
    matmuls = [op for op in graph.layers[-1].ops if op.op_class is OpClass.MATMUL and op.outputs]
    if not matmuls:
        return None
    out = matmuls[-1].outputs[0]
    if len(out.shape) < 2:
        return None
    vocab = out.shape[-1]
    return matmuls[-1], out.numel // vocab, vocab


__all__ = ["cross_entropy_backward_working_bytes", "cross_entropy_bytes", "cross_entropy_saved_bytes", "estimate_cross_entropy_time", "loss_parallel_all_reduce_bytes", "uncaptured_logits"]
