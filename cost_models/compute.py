"""Compute time of ops and layers: roofline with per-class efficiency, or a calibration table.

Per op (Williams, Waterman & Patterson 2009, "Roofline"):

    work_s = max(flops / (peak · e_c), bytes / (bandwidth · e_m))
    time_s = max(kernel_launch_s, work_s + half_efficiency_s)

``e_c`` and ``e_m`` are the device's measured large-kernel efficiencies times the op
class's fraction (``efficiency.py``). The additive ``half_efficiency_s`` is Hockney's
n½ model of start-up cost (r = r∞ · n / (n + n½), so t = n/r∞ + n½/r∞): small
kernels run far below peak, large ones approach it. ``kernel_launch_s`` is the floor
of one eager op. Matmul and attention FLOPs use the dtype's tensor-core peak; other
classes' FLOPs run on vector units (fp32 peak).

Backward is priced per class: each matmul operand that needs a gradient costs one
GEMM of the forward's size (so 2× forward for a Linear on an activation), attention
2.5× the FLOPs (FlashAttention-2), memory-bound classes by the reads and writes of
their backward kernels. Recomputation adds forward time to the backward pass.

With a calibration table, an op measured at the same shapes is priced from the
table ("profiled"); a measured op at another micro-batch or TP shard is scaled by
the roofline's ratio ("profiled-scaled"); others fall back to the roofline.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from autopar.cost_models.profiling.calibration import FLOAT_DTYPES, CalibrationTable
from autopar.cost_models.cluster import Cluster, GPUSpec
from autopar.cost_models.dtensor_host import dtensor_host_s
from autopar.cost_models.efficiency import (
    CAUSAL_WORK_FRACTION,
    OP_CLASS_COSTS,
    PASS_THROUGH_BACKWARD,
    PRODUCT_BACKWARD,
)
from autopar.cost_models.layer_info import attention_core_ops, layer_capture_dtype

from autopar._compat import StrEnum
from autopar.graph.flops import op_name
from autopar.graph.ir import DTYPE_BYTES, Layer, Op, OpClass, TensorMeta
from autopar.layout import Recompute

VECTOR_DTYPE = "float32"
"""Peak used for FLOPs that run on vector units (pointwise, norms): the fp32 CUDA-core rate."""


class TimeSource(StrEnum):
    """Where a predicted time came from."""

    PROFILED = "profiled"  # measured at this shape on the target device
    PROFILED_SCALED = "profiled-scaled"  # measured at the captured shape, scaled by the roofline ratio
    ROOFLINE = "roofline"  # estimated from FLOPs and bytes
    MIXED = "mixed"  # a layer whose ops come from more than one source


@dataclass(frozen=True, slots=True, kw_only=True)
class OpTime:
    """Predicted time of one op for one micro-batch."""

    forward_s: float
    """Forward kernel time."""
    backward_s: float
    """Backward kernel time (0 when no input needs a gradient)."""
    source: str
    """A ``TimeSource`` value: ``"profiled"``, ``"profiled-scaled"`` or ``"roofline"``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerTime:
    """Predicted time of one layer for one micro-batch."""

    forward_s: float
    """Forward time."""
    backward_s: float
    """Backward time, recomputation included."""
    recompute_s: float
    """The part of ``backward_s`` spent re-running forward ops."""
    source: str
    """``"profiled"``, ``"profiled-scaled"``, ``"roofline"`` or ``"mixed"``."""
    num_profiled: int
    """Ops (with non-zero time) priced from the calibration table, scaled or not."""
    num_estimated: int
    """Ops (with non-zero time) priced by the roofline."""


def gpu_of(cluster_or_gpu: Cluster | GPUSpec) -> GPUSpec:
    """The GPU spec of a cluster, or the spec itself."""
    return cluster_or_gpu.gpu if isinstance(cluster_or_gpu, Cluster) else cluster_or_gpu


def shape_efficiency(work_s: float, gpu: GPUSpec) -> float:
    """Hockney's factor n / (n + n½) for a kernel whose work takes ``work_s`` at full rate.

    Example:
        >>> g = Cluster.preset("dgx-h100").gpu
        >>> round(shape_efficiency(3e-6, g), 2), round(shape_efficiency(3e-3, g), 3)
        (0.5, 0.999)
    """
    return work_s / (work_s + gpu.half_efficiency_s) if work_s > 0 else 0.0


def kernel_time(flops: float, nbytes: float, *, flops_per_s: float, bytes_per_s: float, gpu: GPUSpec) -> float:
    """One kernel's time: roofline at the given achievable rates, plus start-up, floored by the launch cost.

    Returns 0 for a kernel with no work (a view).

    Example:
        >>> g = Cluster.preset("dgx-h100").gpu
        >>> kernel_time(0, 8, flops_per_s=1e15, bytes_per_s=3e12, gpu=g) == g.kernel_launch_s
        True
    """
    work_s = max(flops / flops_per_s, nbytes / bytes_per_s)
    if work_s <= 0:
        return 0.0
    return max(gpu.kernel_launch_s, work_s + gpu.half_efficiency_s)


def matmul_flops_per_s(gpu: GPUSpec, dtype: str) -> float:
    """Achievable large-GEMM rate: dense peak × matmul_efficiency."""
    return gpu.peak_flops(dtype) * gpu.matmul_efficiency


def dtype_bytes_ratio(op: Op, dtype: str | None, capture_dtype: str | None = None) -> float:
    """Bytes of the op's tensors with floats at ``dtype`` over bytes at the captured dtypes.

    With ``capture_dtype`` (the dtype the model's parameters were captured in), only float tensors of that
    dtype take the training dtype's width; a float tensor of another dtype is a cast the model's code makes
    on purpose (RMSNorm's ``x.float()``, an fp32 softmax) and runs at its own width in eager training too.
    Without it every float tensor is priced at ``dtype`` (an fp32 capture cannot tell the casts apart).

    Example:
        >>> from autopar.graph.ir import OpClass, TensorMeta
        >>> x32 = TensorMeta(shape=(1024,), dtype="float32")
        >>> op = Op(name="pow", target="aten.pow.Tensor_Scalar", op_class=OpClass.ELEMENTWISE, inputs=(x32,),
        ...         input_ops=("to",), input_params=(None,), outputs=(x32,), flops=1024, nbytes_moved=8192,
        ...         module_path="norm")
        >>> dtype_bytes_ratio(op, "bfloat16"), dtype_bytes_ratio(op, "bfloat16", capture_dtype="bfloat16")
        (0.5, 1.0)
    """
    if dtype is None:
        return 1.0
    tensors = (*op.inputs, *op.outputs)
    captured = sum(t.nbytes for t in tensors)
    if captured == 0:
        return 1.0
    width = DTYPE_BYTES[dtype]
    cast = sum(t.numel * width if t.dtype in FLOAT_DTYPES and capture_dtype in (None, t.dtype) else t.nbytes
               for t in tensors)
    return cast / captured


def op_work(op: Op, *, dtype: str | None, batch_scale: float, shard: int,
            capture_dtype: str | None = None) -> tuple[float, float]:
    """(FLOPs, bytes) of the op's forward at ``batch_scale`` × the captured batch, split over ``shard`` ranks.

    Parameter bytes do not grow with the batch; activation bytes and FLOPs do. An embedding reads only
    the rows it gathers (``count_bytes``), so all its bytes grow with the batch.
    """
    ratio = dtype_bytes_ratio(op, dtype, capture_dtype)
    reads_params = op.op_class is not OpClass.EMBEDDING
    param_bytes = sum(t.nbytes for t, p in zip(op.inputs, op.input_params) if p is not None and reads_params) * ratio
    act_bytes = max(op.nbytes_moved * ratio - param_bytes, 0.0)
    return op.flops * batch_scale / shard, (act_bytes * batch_scale + param_bytes) / shard


def default_grad_inputs(op: Op) -> tuple[bool, ...]:
    """Which inputs need a gradient, from the op alone: float parameters and float outputs of other ops."""
    return tuple(t.dtype in FLOAT_DTYPES and (param is not None or src is not None)
                 for t, src, param in zip(op.inputs, op.input_ops, op.input_params))


def estimate_op_time(op: Op, cluster_or_gpu: Cluster | GPUSpec, *, dtype: str = "bfloat16", batch_scale: float = 1.0,
                     shard: int = 1, calibration: CalibrationTable | None = None,
                     grad_inputs: Sequence[bool] | None = None, capture_dtype: str | None = None) -> OpTime:
    """Forward and backward time of one op.

    Args:
        op: the op as captured.
        cluster_or_gpu: the device to price on.
        dtype: training dtype; floating-point tensors are priced at its width and matmuls at its peak.
        batch_scale: micro-batch size / captured batch size (scales FLOPs and activation bytes).
        shard: tensor-parallel ranks the op's work is split over.
        calibration: measured times on the target device, used when the op is in it.
        grad_inputs: per input, whether it needs a gradient (default: ``default_grad_inputs``).
        capture_dtype: the dtype the model's parameters were captured in; float tensors of another dtype keep
            their width (``dtype_bytes_ratio``). None prices every float tensor at ``dtype``.

    Example:
        >>> from autopar.graph.ir import OpClass, TensorMeta
        >>> a, w = TensorMeta(shape=(8192, 8192), dtype="bfloat16"), TensorMeta(shape=(8192, 8192), dtype="bfloat16")
        >>> op = Op(name="mm", target="aten.mm.default", op_class=OpClass.MATMUL, inputs=(a, w),
        ...         input_ops=("x", None), input_params=(None, "w"), outputs=(a,), flops=2 * 8192**3,
        ...         nbytes_moved=3 * a.nbytes, module_path="lin")
        >>> t = estimate_op_time(op, Cluster.preset("dgx-h100"))
        >>> round(op.flops / t.forward_s / 1e12), t.backward_s / t.forward_s
        (791, 2.0)
    """
    gpu = gpu_of(cluster_or_gpu)
    grads = tuple(grad_inputs) if grad_inputs is not None else default_grad_inputs(op)
    fwd, bwd = roofline_op_time(op, gpu, dtype=dtype, batch_scale=batch_scale, shard=shard, grad_inputs=grads,
                                capture_dtype=capture_dtype)
    if calibration is None:
        return OpTime(forward_s=fwd, backward_s=bwd, source=TimeSource.ROOFLINE.value)
    points = calibration.measured_points(op, dtype)  # only a table profiled in the training dtype matches
    if not points:
        return OpTime(forward_s=fwd, backward_s=bwd, source=TimeSource.ROOFLINE.value)
    exact = next((p for p in points if p[0] == batch_scale), None)
    if exact is not None and shard == 1:
        return OpTime(forward_s=exact[1], backward_s=exact[2], source=TimeSource.PROFILED.value)

    def roofline(scale: float, split: int) -> tuple[float, float]:
        return roofline_op_time(op, gpu, dtype=dtype, batch_scale=scale, shard=split, grad_inputs=grads,
                                capture_dtype=capture_dtype)

    at_batch = _at_batch_scale(points, batch_scale, gpu, roofline)
    if shard != 1:  # a measured batch scale, split over tp ranks: the roofline's ratio above the op floor
        at_batch = _scale_pair(at_batch, (fwd, bwd), roofline(batch_scale, 1), gpu)
    return OpTime(forward_s=at_batch[0], backward_s=at_batch[1], source=TimeSource.PROFILED_SCALED.value)


def _at_batch_scale(points: Sequence[tuple[float, float, float]], batch_scale: float, gpu: GPUSpec,
                    roofline: Callable[[float, int], tuple[float, float]]) -> tuple[float, float]:
    """(forward_s, backward_s) of one op at ``batch_scale`` from its measurements ``points`` ((scale, fwd, bwd), by
    scale): linear between the two measured scales around it (an op's time is a fixed part plus work that grows
    with the batch); outside them, the nearest measurement scaled by the roofline's ratio above the op floor."""
    below = [p for p in points if p[0] <= batch_scale]
    above = [p for p in points if p[0] >= batch_scale]
    if below and above:
        (s0, *t0), (s1, *t1) = below[-1], above[0]
        w = (batch_scale - s0) / (s1 - s0) if s1 > s0 else 0.0
        return t0[0] + w * (t1[0] - t0[0]), t0[1] + w * (t1[1] - t0[1])
    scale, *measured = (below or above)[-1 if below else 0]
    return _scale_pair((measured[0], measured[1]), roofline(batch_scale, 1), roofline(scale, 1), gpu)


def _scale_pair(measured: tuple[float, float], target: tuple[float, float], base: tuple[float, float],
                gpu: GPUSpec) -> tuple[float, float]:
    """(forward, backward) ``measured`` at the work of ``base``, moved to that of ``target`` (roofline times)."""
    return (scale_measured(measured[0], _ratio(target[0], base[0]), gpu),
            scale_measured(measured[1], _ratio(target[1], base[1]), gpu))


def scale_measured(measured_s: float, work_ratio: float, gpu: GPUSpec) -> float:
    """A time measured at the captured shapes, at ``work_ratio`` times the work: only the part above the op floor
    (``GPUSpec.kernel_launch_s``: dispatch and launch, the same for any size) scales.

    On a CPU rank the floor is host time that adds to every op (about 6 us: dispatch and autograd's record), so a
    micro-batch of 1 pays it as often as one of 8 does; scaling the whole measured time would charge it once per
    sample instead of once per call.

    Example:
        >>> import dataclasses
        >>> gpu = dataclasses.replace(Cluster.preset("dgx-h100").gpu, kernel_launch_s=5e-6)
        >>> round(scale_measured(25e-6, 4.0, gpu) * 1e6, 6), round(scale_measured(25e-6, 0.5, gpu) * 1e6, 6)
        (85.0, 15.0)
        >>> round(scale_measured(3e-6, 4.0, gpu) * 1e6, 6)  # at or below the floor: the floor's share only
        3.0
    """
    fixed = min(measured_s, gpu.kernel_launch_s)
    return fixed + (measured_s - fixed) * work_ratio


def _ratio(scaled: float, base: float) -> float:
    return scaled / base if base > 0 else 1.0


def roofline_op_time(op: Op, gpu: GPUSpec, *, dtype: str, batch_scale: float, shard: int,
                     grad_inputs: tuple[bool, ...], capture_dtype: str | None = None) -> tuple[float, float]:
    """(forward_s, backward_s) of one op from the roofline model alone; a view moves no data and costs 0."""
    if op.op_class is OpClass.VIEW:
        return 0.0, 0.0
    cost = OP_CLASS_COSTS[op.op_class]
    flops, nbytes = op_work(op, dtype=dtype, batch_scale=batch_scale, shard=shard, capture_dtype=capture_dtype)
    if op.op_class is OpClass.ATTENTION and _is_causal(op):
        flops *= CAUSAL_WORK_FRACTION
    vector = not cost.tensor_cores and VECTOR_DTYPE in gpu.peak_flops_per_s
    rate = gpu.peak_flops(VECTOR_DTYPE if vector else dtype) * gpu.matmul_efficiency
    bandwidth = gpu.achievable_mem_bytes_per_s * cost.memory_fraction
    forward = kernel_time(flops, nbytes, flops_per_s=rate * cost.compute_fraction, bytes_per_s=bandwidth, gpu=gpu)
    if not any(grad_inputs) or forward == 0.0:
        return forward, 0.0
    table_bytes = op.inputs[0].numel * DTYPE_BYTES[dtype] / shard if op.inputs else 0.0
    backward = _backward_time(op, gpu, flops=flops, nbytes=nbytes, rate=rate, bandwidth=bandwidth,
                              grad_inputs=grad_inputs, forward=forward, table_bytes=table_bytes)
    return forward, backward


def _backward_time(op: Op, gpu: GPUSpec, *, flops: float, nbytes: float, rate: float, bandwidth: float,
                   grad_inputs: tuple[bool, ...], forward: float, table_bytes: float) -> float:
    cost = OP_CLASS_COSTS[op.op_class]
    match op.op_class:
        case OpClass.MATMUL:
            # one GEMM of the forward's size per matrix operand needing a gradient; a bias gradient
            # is a reduction of dy over the rows (memory-bound)
            matrices = [g for t, g in zip(op.inputs, grad_inputs) if len(t.shape) >= 2]
            bias = any(g for t, g in zip(op.inputs, grad_inputs) if len(t.shape) == 1)
            out_bytes = nbytes * _output_share(op)
            bias_s = kernel_time(0, out_bytes, flops_per_s=rate, bytes_per_s=bandwidth, gpu=gpu) if bias else 0.0
            return sum(matrices) * forward + bias_s
        case OpClass.EMBEDDING:
            # dense gradient: the table (input 0) is zero-filled, then dy's rows are accumulated into it
            if not grad_inputs[0]:
                return 0.0
            return kernel_time(0, nbytes + table_bytes, flops_per_s=rate, bytes_per_s=bandwidth, gpu=gpu)
        case OpClass.ELEMENTWISE if op_name(op.target) in PASS_THROUGH_BACKWARD:
            broadcast = any(g and t.numel < op.outputs[0].numel for t, g in zip(op.inputs, grad_inputs))
            out_bytes = nbytes * _output_share(op)
            return kernel_time(0, out_bytes, flops_per_s=rate, bytes_per_s=bandwidth, gpu=gpu) if broadcast else 0.0
        case OpClass.ELEMENTWISE if op_name(op.target) in PRODUCT_BACKWARD and _tensor_operands(op) == 2:
            return _product_backward_time(op, gpu, nbytes=nbytes, rate=rate, bandwidth=bandwidth,
                                          grad_inputs=grad_inputs)
        case _ if cost.backward_kernels == 0:
            return 0.0
        case _:
            per_kernel_flops = flops * cost.backward_flops_ratio / cost.backward_kernels
            per_kernel_bytes = nbytes * cost.backward_bytes_ratio / cost.backward_kernels
            one = kernel_time(per_kernel_flops, per_kernel_bytes, flops_per_s=rate * cost.backward_compute_fraction,
                              bytes_per_s=bandwidth, gpu=gpu)
            return cost.backward_kernels * one


def _tensor_operands(op: Op) -> int:
    """Inputs that are tensors of more than one element (a 0-d or 1-element scale is not an operand here)."""
    return sum(1 for t in op.inputs if t.numel > 1)


def _product_backward_time(op: Op, gpu: GPUSpec, *, nbytes: float, rate: float, bandwidth: float,
                           grad_inputs: tuple[bool, ...]) -> float:
    """Backward of a product of two tensors (``PRODUCT_BACKWARD``): per operand needing a gradient, a kernel
    reading dy and the other operand and writing the gradient; a broadcast operand adds the full-size sum."""
    total = sum(t.nbytes for t in (*op.inputs, *op.outputs))
    share = {i: nbytes * t.nbytes / total for i, t in enumerate(op.inputs)}
    dy = nbytes * op.outputs[0].nbytes / total
    seconds = 0.0
    for i, (t, g) in enumerate(zip(op.inputs, grad_inputs)):
        if not g or t.numel <= 1:
            continue
        other = sum(b for j, b in share.items() if j != i and op.inputs[j].numel > 1)
        if t.numel < op.outputs[0].numel:  # dy · other at full size, then summed down to the operand
            seconds += kernel_time(0, dy + other + dy, flops_per_s=rate, bytes_per_s=bandwidth, gpu=gpu)
            seconds += kernel_time(0, dy + share[i], flops_per_s=rate, bytes_per_s=bandwidth, gpu=gpu)
        else:
            seconds += kernel_time(0, dy + other + share[i], flops_per_s=rate, bytes_per_s=bandwidth, gpu=gpu)
    return seconds


def _output_share(op: Op) -> float:
    """Fraction of the op's tensor bytes that are its first output (dy has that size)."""
    total = sum(t.nbytes for t in (*op.inputs, *op.outputs))
    return op.outputs[0].nbytes / total if total and op.outputs else 0.0


_CAUSAL_SCALAR_INDEX = {
    # position of is_causal among the non-tensor positional arguments, per ATen schema
    "scaled_dot_product_attention": 2,  # (attn_mask, dropout_p, is_causal, ...)
    "_scaled_dot_product_efficient_attention": 3,  # (attn_bias, compute_log_sumexp, dropout_p, is_causal)
    "_scaled_dot_product_flash_attention": 1,  # (dropout_p, is_causal, ...)
    "_scaled_dot_product_flash_attention_for_cpu": 1,  # (dropout_p, is_causal)
    "_scaled_dot_product_cudnn_attention": 3,  # (attn_bias, compute_log_sumexp, dropout_p, is_causal)
}


def _is_causal(op: Op) -> bool:
    index = _CAUSAL_SCALAR_INDEX.get(op_name(op.target))
    return index is not None and len(op.scalars) > index and op.scalars[index] is True


# ---- layers -----------------------------------------------------------------------------------


def layer_grad_inputs(layer: Layer) -> dict[str, tuple[bool, ...]]:
    """Per op, which inputs need a gradient, by propagating requires-grad through the layer.

    An op's output needs a gradient when any input is a trainable parameter, an output of an
    op that needs one, or a float tensor from an earlier layer (whose own gradient flows back).
    """
    buffers = {p.name for p in layer.params if p.is_buffer}
    local = {op.name for op in layer.ops}
    live: set[str] = set()
    result: dict[str, tuple[bool, ...]] = {}
    for op in layer.ops:
        flags = tuple(
            t.dtype in FLOAT_DTYPES and (
                (param is not None and param not in buffers)
                or (src is not None and (src in live or src not in local)))
            for t, src, param in zip(op.inputs, op.input_ops, op.input_params))
        result[op.name] = flags
        if any(flags):
            live.add(op.name)
    return result


def estimate_layer_time(layer: Layer, cluster_or_gpu: Cluster | GPUSpec, *, dtype: str = "bfloat16",
                        batch_scale: float = 1.0, shard: int = 1, sharded_op: Callable[[Op], bool] | None = None,
                        recompute: Recompute = Recompute.NONE, calibration: CalibrationTable | None = None,
                        seq_len: int | None = None, op_times: Mapping[str, OpTime] | None = None) -> LayerTime:
    """Forward and backward time of one layer for one micro-batch, recomputation included.

    Args:
        layer: the captured layer.
        cluster_or_gpu: the device to price on.
        dtype: training dtype.
        batch_scale: micro-batch size / captured batch size.
        shard: tensor-parallel size (above 1, every op also pays DTensor's host time: ``dtensor_host_s``).
        sharded_op: which ops split their work over the ``shard`` ranks (default: all of them, as
            with Megatron TP plus sequence parallelism); the others run replicated.
        recompute: ``NONE``; ``SELECTIVE`` re-runs the s×s attention core in backward; ``FULL`` re-runs
            the whole forward in backward.
        calibration: measured op times on the target device.
        seq_len: sequence length for finding the attention core (default: read off the layer).
        op_times: ``layer_op_times`` of the same layer and arguments, when the caller prices several
            recomputation policies of one setting (the ops' times do not depend on the policy).

    Example:
        >>> from autopar.graph.ir import OpClass, TensorMeta
        >>> x = TensorMeta(shape=(4096, 4096), dtype="bfloat16")
        >>> op = Op(name="mm", target="aten.mm.default", op_class=OpClass.MATMUL, inputs=(x, x),
        ...         input_ops=("prev", None), input_params=(None, "w"), outputs=(x,), flops=2 * 4096**3,
        ...         nbytes_moved=3 * x.nbytes, module_path="b.0.lin")
        >>> layer = Layer(index=1, module_path="b.0", kind="k", ops=(op,), params=())
        >>> t = estimate_layer_time(layer, Cluster.preset("dgx-h100"), recompute=Recompute.FULL)
        >>> round(t.backward_s / t.forward_s, 6), t.source
        (3.0, 'roofline')
    """
    gpu = gpu_of(cluster_or_gpu)
    if op_times is None and calibration is None and sharded_op is None:
        return _cached_layer_time(layer, gpu, dtype, batch_scale, shard, Recompute(recompute), seq_len)
    if op_times is None:
        op_times = layer_op_times(layer, gpu, dtype=dtype, batch_scale=batch_scale, shard=shard,
                                  sharded_op=sharded_op, calibration=calibration)
    return _layer_time(layer, gpu, op_times, shard=shard, recompute=Recompute(recompute), seq_len=seq_len)


@functools.lru_cache(maxsize=4096)
def _cached_layer_time(layer: Layer, gpu: GPUSpec, dtype: str, batch_scale: float, shard: int,
                       recompute: Recompute, seq_len: int | None) -> LayerTime:
    times = layer_op_times(layer, gpu, dtype=dtype, batch_scale=batch_scale, shard=shard)
    return _layer_time(layer, gpu, times, shard=shard, recompute=recompute, seq_len=seq_len)


def layer_op_times(layer: Layer, cluster_or_gpu: Cluster | GPUSpec, *, dtype: str = "bfloat16",
                   batch_scale: float = 1.0, shard: int = 1, sharded_op: Callable[[Op], bool] | None = None,
                   calibration: CalibrationTable | None = None) -> dict[str, OpTime]:
    """Each op's ``estimate_op_time`` in ``layer`` (arguments as ``estimate_layer_time``), keyed by op name."""
    gpu = gpu_of(cluster_or_gpu)
    grads = layer_grad_inputs(layer)
    captured = layer_capture_dtype(layer)
    times: dict[str, OpTime] = {}
    for op in layer.ops:
        op_shard = shard if sharded_op is None or sharded_op(op) else 1
        times[op.name] = estimate_op_time(op, gpu, dtype=dtype, batch_scale=batch_scale, shard=op_shard,
                                          calibration=calibration, grad_inputs=grads[op.name], capture_dtype=captured)
    return times


def _layer_time(layer: Layer, gpu: GPUSpec, times: Mapping[str, OpTime], *, shard: int, recompute: Recompute,
                seq_len: int | None) -> LayerTime:
    dtensor_f, dtensor_b = dtensor_host_s(len(layer.ops), gpu) if shard > 1 else (0.0, 0.0)
    forward = sum(t.forward_s for t in times.values()) + dtensor_f
    match recompute:
        case Recompute.NONE:
            recompute_s = 0.0
        case Recompute.SELECTIVE:
            core = attention_core_ops(layer, seq_len)
            recompute_s = sum(times[op.name].forward_s for op in core) + (
                dtensor_host_s(len(core), gpu)[0] if shard > 1 else 0.0)
        case Recompute.FULL:
            recompute_s = forward
        case _:
            raise ValueError(f"unknown recompute policy {recompute!r}")
    counted = [t for t in times.values() if t.forward_s > 0 or t.backward_s > 0]
    sources = {t.source for t in counted}
    profiled = sum(1 for t in counted if t.source != TimeSource.ROOFLINE.value)
    source = sources.pop() if len(sources) == 1 else (TimeSource.MIXED.value if sources else TimeSource.ROOFLINE.value)
    return LayerTime(forward_s=forward, backward_s=sum(t.backward_s for t in times.values()) + dtensor_b + recompute_s,
                     recompute_s=recompute_s, source=source, num_profiled=profiled,
                     num_estimated=len(counted) - profiled)


__all__ = [
    "LayerTime",
    "OpTime",
    "TimeSource",
    "VECTOR_DTYPE",
    "default_grad_inputs",
    "dtype_bytes_ratio",
    "estimate_layer_time",
    "estimate_op_time",
    "gpu_of",
    "kernel_time",
    "layer_capture_dtype",
    "layer_op_times",
    "layer_grad_inputs",
    "matmul_flops_per_s",
    "op_work",
    "roofline_op_time",
    "scale_measured",
    "shape_efficiency",
]
