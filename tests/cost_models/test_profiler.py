"""Profiler and calibration tables: rebuilding ops, table files, and calibrated accuracy on this device."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import autopar
from autopar.cost_models.profiling.calibration import CalibrationTable, op_key, op_key_for
from autopar.cost_models.cluster import GPUSpec
from autopar.cost_models.compute import estimate_layer_time, estimate_op_time
from autopar.cost_models.profiling.op_call import RebuildError, build_call
from autopar.cost_models.profiling.profiler import profile_graph
from autopar.errors import UserInputError
from autopar.graph.ir import Op, OpClass, OpGraph, TensorMeta
from tests.cost_models.conftest import capture_gpt

CPU = torch.device("cpu")
# The roofline spec is irrelevant when every op is in the table; it only has to accept float32.
ANY_CPU_SPEC = GPUSpec(name="cpu", peak_flops_per_s={"float32": 1e11}, mem_bytes=2**34, mem_bytes_per_s=2e10,
                       matmul_efficiency=1.0, memory_efficiency=1.0, kernel_launch_s=3e-6, half_efficiency_s=3e-6)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Time single-threaded: on a shared 2-core machine other processes then only slow us down in
    proportion (no stalled OpenMP barriers), and the thread's CPU time is exactly our work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_op_of_the_examples_is_rebuilt_and_profiled(gpt_unfused: OpGraph, gpt_fused: OpGraph,
                                                         one_thread: None) -> None:
    from autopar.examples.mlp import MLP, MLPConfig

    mlp = autopar.capture(MLP(MLPConfig(in_features=32, hidden=64, out_features=16, n_layer=2)),
                          (torch.randn(4, 32),))
    for graph in (gpt_unfused, gpt_fused, mlp):
        calls = []
        table = profile_graph(graph, device="cpu", repeats=1, warmup=0, progress=lambda d, n: calls.append((d, n)))
        distinct = {op_key_for(op) for op in graph.ops}
        assert table.skipped == {} and set(table.entries) == distinct
        assert calls == [(i + 1, len(distinct)) for i in range(len(distinct))]
        for fwd, bwd in table.entries.values():
            assert fwd > 0 and bwd >= 0
        assert table.device_name.startswith("cpu:") and table.torch_version == torch.__version__


def test_rebuilt_calls_have_the_captured_strides_and_shapes(gpt_fused: OpGraph, one_thread: None) -> None:
    producers = {op.name: op for op in gpt_fused.ops}
    addmm = next(op for op in gpt_fused.ops if op.target == "aten.addmm.default")
    call = build_call(addmm, CPU, None, producers)
    weight_t = call.tensor_args[2]
    assert tuple(weight_t.shape) == addmm.inputs[2].shape and not weight_t.is_contiguous()  # W.t() as in nn.Linear
    sdpa = next(op for op in gpt_fused.ops if op.op_class is OpClass.ATTENTION)
    out = build_call(sdpa, CPU, None, producers).fn(*build_call(sdpa, CPU).args)
    assert tuple(out.shape) == sdpa.outputs[0].shape  # the CUDA-only fused kernel runs as CPU SDPA
    bf16 = build_call(addmm, CPU, "bfloat16")
    assert all(t.dtype == torch.bfloat16 for t in bf16.tensor_args)


def make_op(target: str, inputs: list[TensorMeta], outputs: list[TensorMeta], scalars: tuple[object, ...]) -> Op:
    return Op(name="x", target=target, op_class=OpClass.UNKNOWN, inputs=tuple(inputs), input_ops=(None,) * len(inputs),
              input_params=(None,) * len(inputs), outputs=tuple(outputs), flops=0, nbytes_moved=0, module_path="",
              scalars=scalars)


def test_ops_that_cannot_be_rebuilt_are_reported_not_guessed() -> None:
    x = TensorMeta(shape=(4, 8), dtype="float32")
    with pytest.raises(RebuildError, match="no op"):
        build_call(make_op("aten.frobnicate.default", [x], [x], ()), CPU)
    with pytest.raises(RebuildError, match="schema"):
        build_call(make_op("aten.transpose.int", [x], [x], ()), CPU)  # dims not recorded
    with pytest.raises(RebuildError, match="shapes"):
        build_call(make_op("aten.transpose.int", [x], [x], (0, 1)), CPU)  # gives (8, 4), capture said (4, 8)
    ok = build_call(make_op("aten.transpose.int", [x], [TensorMeta(shape=(8, 4), dtype="float32")], (0, 1)), CPU)
    assert tuple(ok.fn(*ok.args).shape) == (8, 4)


def test_calibration_file_round_trips_and_keeps_other_devices(tmp_path: Path) -> None:
    x = TensorMeta(shape=(4, 8), dtype="float32")
    key = op_key("aten.mm.default", [x, x])
    a = CalibrationTable(device_name="NVIDIA H100 80GB HBM3", torch_version="2.13.0", entries={key: (1e-5, 2e-5)},
                         skipped={"k": "why"}, dtype="bfloat16")
    b = CalibrationTable(device_name="cpu:EPYC", torch_version="2.13.0", entries={key: (3e-4, 5e-4)})
    path = tmp_path / "calib.json"
    a.save(path)
    b.save(path)
    assert sorted(json.loads(path.read_text())["tables"]) == ["NVIDIA H100 80GB HBM3 | torch 2.13.0",
                                                              "cpu:EPYC | torch 2.13.0"]
    loaded = CalibrationTable.load(path, device_name="NVIDIA H100 80GB HBM3")
    assert loaded == a
    assert CalibrationTable.load(path, device_name="cpu:EPYC").entries[key] == (3e-4, 5e-4)
    with pytest.raises(UserInputError, match="2 tables"):
        CalibrationTable.load(path)
    with pytest.raises(UserInputError, match="0 tables"):
        CalibrationTable.load(path, device_name="TPU")
    (tmp_path / "bad.json").write_text('{"format": 99}')
    with pytest.raises(UserInputError, match="format"):
        CalibrationTable.load(tmp_path / "bad.json")
    (tmp_path / "trunc.json").write_text('{"format": 1, "tab')
    with pytest.raises(UserInputError, match="not valid JSON"):
        CalibrationTable.load(tmp_path / "trunc.json")


def test_table_keys_carry_the_profiled_dtype(gpt_fused: OpGraph) -> None:
    op = next(op for op in gpt_fused.ops if op.target == "aten.addmm.default")
    assert op_key_for(op, "bfloat16") != op_key_for(op) and "bfloat16" in op_key_for(op, "bfloat16")


def test_a_profiled_graph_is_priced_op_by_op_from_its_table(one_thread: None) -> None:
    # How close the sum comes to a measured step is an accuracy figure, printed by bench/cost_model_accuracy.py
    # (the calibrated rows); here: every op of a whole GPT is rebuilt, timed and priced from exactly its entry.
    from autopar.examples.gpt import GPT, GPTConfig, example_inputs

    cfg = GPTConfig(n_layer=2, n_embd=64, n_head=4, block_size=32, vocab_size=128, dropout=0.0,
                    fused_attention=False)
    torch.manual_seed(0)
    (ids,) = example_inputs(cfg, batch_size=2)
    graph = autopar.capture(GPT(cfg), (ids,))
    table = profile_graph(graph, device="cpu", repeats=1, warmup=0)
    assert table.skipped == {}
    times = [estimate_layer_time(layer, ANY_CPU_SPEC, dtype="float32", calibration=table) for layer in graph.layers]
    assert all(t.source == "profiled" and t.num_estimated == 0 for t in times)
    forward = sum(table.entries[op_key_for(op)][0] for op in graph.ops)
    backward = sum(table.entries[op_key_for(op)][1] for op in graph.ops)
    assert sum(t.forward_s for t in times) == pytest.approx(forward, rel=1e-9)
    assert sum(t.backward_s for t in times) == pytest.approx(backward, rel=1e-9)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_profiles_on_cuda_with_events() -> None:
    graph = capture_gpt(fused=True, dropout=0.0)
    table = profile_graph(graph, device="cuda", dtype="bfloat16", repeats=3)
    assert table.entries and table.dtype == "bfloat16"
    assert table.device_name == torch.cuda.get_device_name()
    assert all(f > 0 for f, _ in table.entries.values())


def test_ops_are_also_timed_at_other_batch_sizes_and_priced_from_them(one_thread: None) -> None:
    g2 = capture_gpt(fused=True, dropout=0.0, batch=2)
    others = {0.5: capture_gpt(fused=True, dropout=0.0, batch=1), 2.0: capture_gpt(fused=True, dropout=0.0, batch=4)}
    table = profile_graph(g2, device="cpu", repeats=1, warmup=0, batch_graphs=others)
    assert table.skipped == {} and set(table.entries) == {op_key_for(op) for op in g2.ops}
    # every op whose shapes change with the batch has its own measurement at each other size
    batch_dependent = {op_key_for(op) for op, twin in zip(g2.ops, others[0.5].ops) if op_key_for(twin) != op_key_for(op)}
    assert batch_dependent and batch_dependent <= set(table.batch_entries)
    assert all(set(points) == {0.5, 2.0} for points in table.batch_entries.values())
    assert CalibrationTable.from_dict(json.loads(json.dumps(table.to_dict()))) == table
    for bad in ([1, 2], {"0.5": [1.0]}, {"x": [1.0, 2.0]}):  # a corrupt file is refused, not half-read
        with pytest.raises(UserInputError, match="malformed"):
            CalibrationTable.from_dict({**table.to_dict(), "batch_entries": {"k": bad}})
    mm = next(op for op in g2.ops if op.op_class is OpClass.MATMUL and op_key_for(op) in batch_dependent)
    for scale in (0.5, 2.0):  # a measured micro-batch is priced as measured, not scaled from the captured one
        t = estimate_op_time(mm, ANY_CPU_SPEC, dtype="float32", batch_scale=scale, calibration=table)
        assert (t.forward_s, t.backward_s) == table.batch_entries[op_key_for(mm)][scale]
        assert t.source == "profiled"
    with pytest.raises(ValueError, match="same model"):
        profile_graph(g2, device="cpu", repeats=1, warmup=0, batch_graphs={2.0: capture_gpt(fused=True, n_layer=2)})
    # an op the other batch size does not run (export drops a broadcast at batch 1) keeps its captured measurement
    layer = others[0.5].layers[1]
    gone = next(k for k, op in enumerate(layer.ops) if op.op_class is OpClass.MATMUL)
    fewer = dataclasses.replace(others[0.5], layers=(*others[0.5].layers[:1], dataclasses.replace(
        layer, ops=layer.ops[:gone] + layer.ops[gone + 1:]), *others[0.5].layers[2:]))
    partial = profile_graph(g2, device="cpu", repeats=1, warmup=0, batch_graphs={0.5: fewer})
    dropped = op_key_for(g2.layers[1].ops[gone])
    elsewhere = [op for op in g2.ops if op_key_for(op) == dropped and op is not g2.layers[1].ops[gone]]
    assert dropped in partial.entries and (dropped in partial.batch_entries) == bool(elsewhere)
    assert set(partial.batch_entries) | {dropped} >= set(table.batch_entries)
