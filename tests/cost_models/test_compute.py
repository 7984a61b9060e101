"""Compute model: roofline closed forms, launch floor, backward factors, recompute, calibration lookup."""

from __future__ import annotations

import dataclasses

import pytest

from autopar.cost_models.profiling.calibration import CalibrationTable, op_key_for
from autopar.cost_models.cluster import Cluster
from autopar.cost_models.compute import (
    TimeSource,
    _cached_layer_time,
    estimate_layer_time,
    estimate_op_time,
    layer_capture_dtype,
    layer_grad_inputs,
    shape_efficiency,
)
from autopar.cost_models.efficiency import (
    ATTENTION_BACKWARD_FLOPS_RATIO,
    FLASH_BWD_PEAK_FRACTION,
    FLASH_FWD_PEAK_FRACTION,
    OP_CLASS_COSTS,
)
from autopar.cost_models.layer_info import attention_core_ops
from autopar.graph.flops import classify, count_bytes, count_flops
from autopar.graph.ir import Layer, Op, OpGraph, TensorMeta
from autopar.plan import Recompute
from tests.cost_models.conftest import block

H100 = Cluster.preset("dgx-h100")
GPU = H100.gpu


def make_op(target: str, inputs: list[TensorMeta], outputs: list[TensorMeta], *, producers: tuple[str | None, ...],
            params: tuple[str | None, ...], scalars: tuple[object, ...] = (), name: str = "op") -> Op:
    return Op(name=name, target=target, op_class=classify(target), inputs=tuple(inputs), input_ops=producers,
              input_params=params, outputs=tuple(outputs), flops=count_flops(target, inputs, outputs),
              nbytes_moved=count_bytes(target, inputs, outputs), module_path="m", scalars=scalars)


def t(*shape: int, dtype: str = "bfloat16") -> TensorMeta:
    return TensorMeta(shape=shape, dtype=dtype)


def linear(m: int, k: int, n: int, *, activation_from: str | None = "prev", dtype: str = "bfloat16") -> Op:
    """x (m, k) @ W (k, n) with W a parameter; x produced by ``activation_from`` (None: a graph input)."""
    return make_op("aten.mm.default", [t(m, k, dtype=dtype), t(k, n, dtype=dtype)], [t(m, n, dtype=dtype)],
                   producers=(activation_from, None), params=(None, "w"))


def test_big_matmul_time_is_flops_over_peak_times_efficiency() -> None:
    op = linear(8192, 8192, 8192)
    rate = GPU.peak_flops("bfloat16") * GPU.matmul_efficiency
    work_s = op.flops / rate
    got = estimate_op_time(op, H100).forward_s
    assert got == pytest.approx(op.flops / (GPU.peak_flops("bfloat16") * GPU.matmul_efficiency
                                            * shape_efficiency(work_s, GPU)), rel=1e-12)
    assert shape_efficiency(work_s, GPU) > 0.997  # a large GEMM runs at the device's measured efficiency
    assert op.flops / got / 1e12 == pytest.approx(989.4 * 0.801, rel=0.005)


def test_small_matmuls_run_far_below_peak_and_tiny_ops_hit_the_launch_floor() -> None:
    small = linear(1024, 1024, 1024)
    achieved = small.flops / estimate_op_time(small, H100).forward_s
    assert achieved < 0.55 * GPU.peak_flops("bfloat16") * GPU.matmul_efficiency  # one under-filled wave
    tiny = linear(16, 16, 16)
    assert estimate_op_time(tiny, H100).forward_s == GPU.kernel_launch_s
    add = make_op("aten.add.Tensor", [t(8), t(8)], [t(8)], producers=("a", "b"), params=(None, None))
    assert estimate_op_time(add, H100).forward_s == GPU.kernel_launch_s


def test_memory_bound_op_time_is_bytes_over_bandwidth_times_efficiency() -> None:
    x = t(64, 2048, 8192)
    gelu = make_op("aten.gelu.default", [x], [x], producers=("prev",), params=(None,))
    bw = GPU.mem_bytes_per_s * GPU.memory_efficiency * OP_CLASS_COSTS[gelu.op_class].memory_fraction
    work_s = gelu.nbytes_moved / bw
    got = estimate_op_time(gelu, H100).forward_s
    assert got == pytest.approx(gelu.nbytes_moved / (bw * shape_efficiency(work_s, GPU)), rel=1e-12)
    assert gelu.nbytes_moved / got == pytest.approx(3.35e12 * 0.90, rel=0.01)
    # a LayerNorm runs at a lower fraction of the bandwidth than a pointwise op
    norm = make_op("aten.native_layer_norm.default", [x, t(8192), t(8192)], [x, t(64, 2048, 1, dtype="float32")] * 1,
                   producers=("prev", None, None), params=(None, "g", "b"), scalars=((8192,), 1e-5))
    assert norm.nbytes_moved / estimate_op_time(norm, H100).forward_s < 0.85 * 3.35e12 * 0.9


def test_fp32_capture_is_priced_at_the_training_dtype_width() -> None:
    x32 = t(64, 2048, 8192, dtype="float32")
    gelu = make_op("aten.gelu.default", [x32], [x32], producers=("prev",), params=(None,))
    bf16 = estimate_op_time(gelu, H100, dtype="bfloat16").forward_s
    fp32 = estimate_op_time(gelu, H100, dtype="float32").forward_s
    assert fp32 / bf16 == pytest.approx(2.0, rel=0.01)


def test_backward_is_twice_forward_for_a_linear_and_once_without_input_gradient() -> None:
    hidden = linear(8192, 8192, 8192)
    first = linear(8192, 8192, 8192, activation_from=None)  # input is a graph input: no dX
    t_hidden, t_first = estimate_op_time(hidden, H100), estimate_op_time(first, H100)
    assert t_hidden.backward_s == pytest.approx(2 * t_hidden.forward_s)
    assert t_first.backward_s == pytest.approx(t_first.forward_s)
    ids = make_op("aten.add.Tensor", [t(4096, dtype="int64"), t(4096, dtype="int64")], [t(4096, dtype="int64")],
                  producers=("a", "b"), params=(None, None))
    assert estimate_op_time(ids, H100).backward_s == 0.0  # integers carry no gradient


def test_elementwise_backward_reads_and_writes_half_again_the_forward_bytes() -> None:
    x = t(64, 2048, 8192)
    gelu = make_op("aten.gelu.default", [x], [x], producers=("prev",), params=(None,))
    times = estimate_op_time(gelu, H100)
    assert times.backward_s / times.forward_s == pytest.approx(1.5, rel=0.01)
    add = make_op("aten.add.Tensor", [x, x], [x], producers=("a", "b"), params=(None, None))
    assert estimate_op_time(add, H100).backward_s == 0.0  # the gradient of a sum is passed through


def test_attention_backward_and_causal_discount() -> None:
    q = t(8, 32, 4096, 128)
    target = "aten._scaled_dot_product_efficient_attention.default"
    outs = [q, t(8, 32, 4096, dtype="float32")]
    full = make_op(target, [q, q, q], outs, producers=("q", "k", "v"), params=(None,) * 3,
                   scalars=(None, True, 0.0, False))
    causal = make_op(target, [q, q, q], outs, producers=("q", "k", "v"), params=(None,) * 3,
                     scalars=(None, True, 0.0, True))
    tf, tc = estimate_op_time(full, H100), estimate_op_time(causal, H100)
    expected = ATTENTION_BACKWARD_FLOPS_RATIO * FLASH_FWD_PEAK_FRACTION / FLASH_BWD_PEAK_FRACTION
    assert tf.backward_s / tf.forward_s == pytest.approx(expected, rel=0.01)
    assert tc.forward_s / tf.forward_s == pytest.approx(0.5, rel=0.01)


def test_batch_scale_and_tp_shard() -> None:
    op = linear(8192, 8192, 8192)
    base = estimate_op_time(op, H100).forward_s
    assert estimate_op_time(op, H100, batch_scale=2.0).forward_s == pytest.approx(2 * base, rel=0.01)
    assert estimate_op_time(op, H100, shard=4).forward_s == pytest.approx(base / 4, rel=0.01)
    # a memory-bound op with parameters: parameter bytes do not grow with the batch
    x, w = t(8, 8192), t(8192, 8192)
    gemv = make_op("aten.mm.default", [x, w], [x], producers=("prev", None), params=(None, "w"))
    assert estimate_op_time(gemv, H100, batch_scale=2.0).forward_s < 1.01 * estimate_op_time(gemv, H100).forward_s


def test_calibration_table_is_used_when_it_matches() -> None:
    op = linear(1024, 1024, 1024, dtype="float32")
    table = CalibrationTable(device_name="dev", torch_version="x", entries={op_key_for(op): (1e-3, 3e-3)})
    exact = estimate_op_time(op, H100, dtype="float32", calibration=table)
    assert (exact.forward_s, exact.backward_s, exact.source) == (1e-3, 3e-3, TimeSource.PROFILED.value)
    roof1 = estimate_op_time(op, H100, dtype="float32")
    roof2 = estimate_op_time(op, H100, dtype="float32", batch_scale=4.0)
    scaled = estimate_op_time(op, H100, dtype="float32", batch_scale=4.0, calibration=table)
    assert scaled.source == TimeSource.PROFILED_SCALED.value
    floor = H100.gpu.kernel_launch_s  # paid once per call at any size: only the rest scales
    assert scaled.forward_s == pytest.approx(floor + (1e-3 - floor) * roof2.forward_s / roof1.forward_s)
    # measured in fp32, asked for bf16: not the same kernel, so the roofline prices it
    other = estimate_op_time(op, H100, dtype="bfloat16", calibration=table)
    assert other.source == TimeSource.ROOFLINE.value
    assert other.forward_s == estimate_op_time(op, H100, dtype="bfloat16").forward_s


def test_recompute_is_priced_in_backward(gpt_unfused: OpGraph, gpt_fused: OpGraph) -> None:
    layer = block(gpt_unfused)
    none = estimate_layer_time(layer, H100, recompute=Recompute.NONE)
    full = estimate_layer_time(layer, H100, recompute=Recompute.FULL)
    selective = estimate_layer_time(layer, H100, recompute=Recompute.SELECTIVE)
    assert full.forward_s == none.forward_s and full.recompute_s == pytest.approx(none.forward_s)
    assert full.backward_s == pytest.approx(none.backward_s + none.forward_s)
    core = attention_core_ops(layer)
    assert {op.target.split(".")[1] for op in core} >= {"bmm", "_softmax", "native_dropout", "mul", "add"}
    core_s = sum(estimate_op_time(op, H100, grad_inputs=layer_grad_inputs(layer)[op.name]).forward_s for op in core)
    assert selective.recompute_s == pytest.approx(core_s) and 0 < core_s < none.forward_s / 2
    assert selective.backward_s == pytest.approx(none.backward_s + core_s)
    fused = block(gpt_fused)
    assert attention_core_ops(fused) == ()
    assert estimate_layer_time(fused, H100, recompute=Recompute.SELECTIVE).recompute_s == 0.0


def test_a_tensor_parallel_layer_pays_dtensor_host_time_per_op(gpt_unfused: OpGraph) -> None:
    """Above tp = 1 every op runs on DTensors: n ops add n·δ forward and n·δ_b backward, and recomputation
    re-runs the forward ops' dispatch (all of them for full, the attention core's for selective)."""
    layer = block(gpt_unfused)
    gpu = dataclasses.replace(H100.gpu, dtensor_op_s=1e-4, dtensor_backward_op_s=3e-4)
    n, core = len(layer.ops), len(attention_core_ops(layer))
    for rc, rerun in ((Recompute.NONE, 0), (Recompute.SELECTIVE, core), (Recompute.FULL, n)):
        base, with_host = (estimate_layer_time(layer, g, shard=2, recompute=rc) for g in (H100.gpu, gpu))
        assert with_host.forward_s - base.forward_s == pytest.approx(n * 1e-4)
        assert with_host.backward_s - base.backward_s == pytest.approx(n * 3e-4 + rerun * 1e-4)
        assert estimate_layer_time(layer, gpu, shard=1, recompute=rc) == estimate_layer_time(layer, H100.gpu, shard=1,
                                                                                          recompute=rc)


def test_layer_sources_and_sharded_ops(gpt_fused: OpGraph) -> None:
    layer = block(gpt_fused)
    roof = estimate_layer_time(layer, H100, dtype="float32")
    assert roof.source == "roofline" and roof.num_profiled == 0 and roof.num_estimated > 10
    first_mm = next(op for op in layer.ops if op.op_class.value == "matmul")
    key = op_key_for(first_mm)
    table = CalibrationTable(device_name="dev", torch_version="x", entries={key: (1.0, 2.0)})
    mixed = estimate_layer_time(layer, H100, dtype="float32", calibration=table)
    same = sum(op_key_for(op) == key for op in layer.ops)  # q, k, v and output projections share a shape
    assert same == 4
    assert mixed.source == "mixed" and mixed.num_profiled == same and mixed.num_estimated == roof.num_estimated - same
    assert mixed.forward_s == pytest.approx(same * 1.0 + roof.forward_s - same * estimate_op_time(
        first_mm, H100, dtype="float32").forward_s)
    # tp 4 on all ops vs on matmuls only: the replicated memory-bound ops keep their full cost
    big = 512.0  # micro-batch 1024: kernels well above the launch floor
    all_split = estimate_layer_time(layer, H100, batch_scale=big, shard=4)
    mm_split = estimate_layer_time(layer, H100, batch_scale=big, shard=4,
                                   sharded_op=lambda op: op.op_class.value == "matmul")
    whole = estimate_layer_time(layer, H100, batch_scale=big)
    assert whole.forward_s / 4 < all_split.forward_s < 1.25 * whole.forward_s / 4  # + per-kernel start-up
    assert all_split.forward_s < mm_split.forward_s < whole.forward_s


def test_first_layer_of_an_mlp_needs_no_input_gradient() -> None:
    x = t(32, 64, dtype="float32")
    mm = make_op("aten.mm.default", [x, t(64, 64, dtype="float32")], [x], producers=(None, None),
                 params=(None, "0.weight"), name="mm")
    gelu = make_op("aten.gelu.default", [x], [x], producers=("mm",), params=(None,), name="gelu")
    layer = Layer(index=0, module_path="0", kind="k", ops=(mm, gelu), params=())
    grads = layer_grad_inputs(layer)
    assert grads == {"mm": (False, True), "gelu": (True,)}


def test_a_layer_setting_is_priced_once(gpt_unfused: OpGraph) -> None:
    # The search asks for the same (layer, micro-batch, tp, recompute) many times; only the first is computed.
    layer = block(gpt_unfused)
    configs = [(mb, tp, rc) for mb in (1, 2, 4, 8, 16) for tp in (1, 2, 4, 8) for rc in Recompute]
    _cached_layer_time.cache_clear()
    first = [estimate_layer_time(layer, H100, batch_scale=mb / 2, shard=tp, recompute=rc) for mb, tp, rc in configs]
    assert _cached_layer_time.cache_info().misses == len(configs)
    again = [estimate_layer_time(layer, H100, batch_scale=mb / 2, shard=tp, recompute=rc) for mb, tp, rc in configs]
    assert again == first and _cached_layer_time.cache_info().hits == len(configs)


def test_embedding_backward_writes_a_dense_table_gradient() -> None:
    vocab, hidden = 51200, 4096
    emb = make_op("aten.embedding.default", [t(vocab, hidden), t(8, 2048, dtype="int64")], [t(8, 2048, hidden)],
                  producers=(None, None), params=("wte", None))
    times = estimate_op_time(emb, H100)
    bw = GPU.mem_bytes_per_s * GPU.memory_efficiency
    table = vocab * hidden * 2
    assert times.backward_s == pytest.approx((emb.nbytes_moved + table) / bw + GPU.half_efficiency_s, rel=1e-9)
    frozen = estimate_op_time(emb, H100, grad_inputs=(False, False))
    assert frozen.backward_s == 0.0


def _norm_layer(capture: str) -> Layer:
    """An eager RMSNorm as a model captured in ``capture`` runs it: x.float() -> pow -> x.to(capture) * w."""
    from autopar.graph.ir import ParamInfo

    x, x32 = t(8192, 4096, dtype=capture), t(8192, 4096, dtype="float32")
    ops = [make_op("aten._to_copy.default", [x], [x32], producers=("prev",), params=(None,), name="up"),
           make_op("aten.pow.Tensor_Scalar", [x32], [x32], producers=("up",), params=(None,), name="pow"),
           make_op("aten._to_copy.default", [x32], [x], producers=("pow",), params=(None,), name="down"),
           make_op("aten.mul.Tensor", [t(4096, dtype=capture), x], [x], producers=(None, "down"),
                   params=("w", None), name="mul")]
    if capture == "float32":  # an fp32 capture holds no cast ops: x.float() of an fp32 tensor is a no-op
        ops = ops[1:2] + ops[3:]
    return Layer(index=1, module_path="b.0", kind=f"norm-{capture}", ops=tuple(ops),
                 params=(ParamInfo(name="w", shape=(4096,), dtype=capture),))


def test_a_training_dtype_capture_keeps_the_models_fp32_upcasts_at_4_bytes() -> None:
    bw = GPU.achievable_mem_bytes_per_s
    elems = 8192 * 4096
    for capture, pow_bytes in (("bfloat16", 8), ("float32", 4)):  # pow reads + writes fp32 | priced at bf16
        layer = _norm_layer(capture)
        pow_op = next(op for op in layer.ops if op.name == "pow")
        got = estimate_layer_time(layer, H100, dtype="bfloat16").forward_s
        captured = layer_capture_dtype(layer)
        one = estimate_op_time(pow_op, H100, dtype="bfloat16", capture_dtype=captured).forward_s
        assert one == pytest.approx(elems * pow_bytes / bw + GPU.half_efficiency_s, rel=1e-9)
        # bf16 capture: casts 2+4 and 4+2 B, pow 4+4 B, weight mul 2+2 B (+ the 4096-element weight)
        expected = ({"bfloat16": 6 + 8 + 6 + 4, "float32": 4 + 4}[capture] * elems + 4096 * 2) / bw
        kernels = len(layer.ops) * GPU.half_efficiency_s
        assert got == pytest.approx(expected + kernels, rel=1e-3)


def test_views_move_no_data_and_cost_nothing() -> None:
    w = t(128256, 4096)
    view = make_op("aten.t.default", [w], [t(4096, 128256)], producers=(None,), params=("lm_head",))
    assert view.op_class.value == "view"
    assert estimate_op_time(view, H100) == estimate_op_time(view, H100).__class__(
        forward_s=0.0, backward_s=0.0, source="roofline")


def test_product_backward_reads_dy_and_the_other_operand_per_gradient() -> None:
    bw = GPU.achievable_mem_bytes_per_s
    x = t(8192, 14336)
    one = x.nbytes  # bytes of one full-size bf16 tensor
    gate_up = make_op("aten.mul.Tensor", [x, x], [x], producers=("silu", "up"), params=(None, None))
    both = estimate_op_time(gate_up, H100).backward_s  # SwiGLU: two kernels of dy + other + grad
    assert both == pytest.approx(2 * (3 * one / bw + GPU.half_efficiency_s), rel=1e-9)
    assert both / (3 * one / bw) == pytest.approx(2.0, rel=0.02)  # 2x the forward bytes (+ start-up), not 1.5x
    const = make_op("aten.mul.Tensor", [x, x], [x], producers=("q", None), params=(None, None))
    assert estimate_op_time(const, H100).backward_s == pytest.approx(3 * one / bw + GPU.half_efficiency_s)
    w, y = t(14336), t(8192, 14336)  # a broadcast weight: its gradient is dy·x summed over the rows
    scale = make_op("aten.mul.Tensor", [w, y], [y], producers=(None, "prev"), params=("w", None))
    small = w.nbytes
    expected = ((one + small + one) / bw  # dx = dy · w
                + (one + one + one) / bw + (one + small) / bw  # dw: dy · x written, then summed
                + 3 * GPU.half_efficiency_s)
    assert estimate_op_time(scale, H100).backward_s == pytest.approx(expected, rel=1e-9)


def test_measured_batch_sizes_are_interpolated_and_the_op_floor_does_not_scale() -> None:
    cpu = dataclasses.replace(H100.gpu, kernel_launch_s=5e-6, half_efficiency_s=1e-15)
    op = linear(1024, 1024, 1024, dtype="float32")
    key = op_key_for(op)
    table = CalibrationTable(device_name="dev", torch_version="x", entries={key: (100e-6, 300e-6)},
                             batch_entries={key: {4.0: (340e-6, 1000e-6)}})

    def at(scale: float, shard: int = 1) -> tuple[float, float]:
        t = estimate_op_time(op, cpu, dtype="float32", batch_scale=scale, shard=shard, calibration=table)
        return t.forward_s, t.backward_s

    assert at(4.0) == (340e-6, 1000e-6)
    assert at(2.0) == pytest.approx((180e-6, 300e-6 + 700e-6 / 3))  # linear between the measured 1 and 4
    # below the smallest measurement: the roofline's ratio (0.5 for a GEMM's rows) on the part above the floor
    assert at(0.5)[0] == pytest.approx(5e-6 + 95e-6 * 0.5, rel=1e-3)
    assert at(8.0)[0] == pytest.approx(5e-6 + 335e-6 * 2, rel=1e-3)  # above the largest, from the largest
    assert at(4.0, shard=2)[0] == pytest.approx(5e-6 + 335e-6 / 2, rel=1e-3)  # split over tp from the measured size
    # without other sizes, the whole measured time above the floor scales (the floor is paid once per call)
    single = CalibrationTable(device_name="dev", torch_version="x", entries={key: (100e-6, 300e-6)})
    eight = estimate_op_time(op, cpu, dtype="float32", batch_scale=8.0, calibration=single).forward_s
    assert eight == pytest.approx(5e-6 + 95e-6 * 8, rel=1e-3)
