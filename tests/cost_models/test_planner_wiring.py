"""The planner runs the cost-model functions these tests' neighbours check (one implementation per formula).

Each test swaps a cost-model function for a spy, or compares the planner's number with the function's, so a
private copy of a formula in ``autopar/pricing.py`` or ``solvers/`` would fail here: the foreach AdamW step
and its temporaries, FSDP2's copy kernels, the exposed first/last FSDP units, and the sharding ILP's op
prices at the layer's capture dtype.
"""

from __future__ import annotations

import pytest
import torch

import autopar
from autopar.cost_models import comm, compute, optimizer
from autopar.cost_models.cluster import Cluster
from autopar.cost_models.layer_info import layer_capture_dtype
from autopar.examples.gpt import GPT, GPTConfig
from autopar.layout import Collective
from autopar.pricing import LayerPricer
from autopar.solvers import evaluate
from autopar.solvers.costs import Formulas

H100 = Cluster.preset("dgx-h100")
EXAMPLE = (torch.zeros(1, 128, dtype=torch.long),)


def _gpt(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    with torch.device("meta"):
        return GPT(GPTConfig(n_layer=3, n_embd=256, n_head=4, vocab_size=4096, block_size=128)).to(dtype)


def _graph(dtype: torch.dtype = torch.float32) -> autopar.OpGraph:
    return autopar.capture(_gpt(dtype), (torch.zeros(1, 128, dtype=torch.long, device="meta"),))


def test_the_optimizer_step_and_its_temporaries_are_optimizer_py() -> None:
    pricing = Formulas(H100, "bfloat16")
    assert pricing.optimizer_step_time(1e9) == optimizer.estimate_optimizer_step_time(
        1e9, H100.gpu, implementation="foreach", clip_grad_norm=True)
    assert pricing.optimizer_temp_bytes(1e9) == optimizer.optimizer_temporary_bytes(1e9, implementation="foreach")
    # 96 B per parameter at the achievable bandwidth: a 1e9-parameter shard's step
    assert pricing.optimizer_step_time(1e9) == pytest.approx(96e9 / H100.gpu.achievable_mem_bytes_per_s)


def _record_calls(monkeypatch: pytest.MonkeyPatch, name: str) -> list[dict[str, float]]:
    """The keyword arguments of every call ``evaluate`` makes to its ``name`` (which still runs)."""
    calls: list[dict[str, float]] = []
    real = getattr(evaluate, name)

    def spy(**kw: float) -> object:
        calls.append(kw)
        return real(**kw)

    monkeypatch.setattr(evaluate, name, spy)
    return calls


def test_rank_memory_holds_the_optimizer_temporaries_of_the_owned_parameters(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _record_calls(monkeypatch, "estimate_rank_memory")
    model = _gpt()
    plan = autopar.plan(model, EXAMPLE, cluster=H100, global_batch_size=4,
                        constraints=dict(dp=2, tp=1, pp=1, zero_stage=1, micro_batch_size=2))
    params = sum(p.numel() for p in model.parameters())
    temps = {kw["optimizer_temp_bytes"] for kw in seen}
    assert optimizer.optimizer_temporary_bytes(params / 2) in temps  # ZeRO 1 over 2: each rank owns half
    assert plan.predicted.memory[0].total > 0


def test_dp_comm_gets_the_fsdp_edges_and_copies(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _record_calls(monkeypatch, "estimate_exposed_dp_comm")
    graph = _graph()
    plan = autopar.plan(_gpt(), EXAMPLE, cluster=H100, global_batch_size=8,
                        constraints=dict(dp=2, tp=1, pp=1, zero_stage=3, micro_batch_size=2))
    assert plan.layout.num_micro_batches == 2
    kw = next(c for c in calls if c["zero_stage"] == 3 and c["num_micro_batches"] == 2)
    layers = [layer.num_params for layer in graph.layers]  # embedding, 3 blocks, head
    edge = layers[0] + layers[-1] + layers[1]  # the root unit and the first block
    pricing = Formulas(H100, "bfloat16")
    assert comm.fsdp_edge_params(layers, [False, True, True, True, False]) == edge
    group = dict(group_size=2, nodes_spanned=1)
    assert kw["edge_gather_s"] == pytest.approx(pricing.collective_time(Collective.ALL_GATHER, edge * 2, **group))
    # gathered in bf16, reduced in fp32 (emit/dp.py: MixedPrecisionPolicy(reduce_dtype=torch.float32))
    assert kw["edge_reduce_s"] == pytest.approx(pricing.collective_time(Collective.REDUCE_SCATTER, edge * 4, **group))
    grads = sum(layers) * 4
    assert kw["grad_reduce_s"] == pytest.approx(pricing.collective_time(Collective.REDUCE_SCATTER, grads, **group))
    out_s, in_s = comm.estimate_fsdp_copy_time(sum(layers), H100.gpu, gathers_per_step=4, param_bytes=2,
                                               reduce_bytes=4)  # 2 gathers per micro-batch × 2
    assert (kw["copy_out_s"], kw["copy_in_s"]) == (pytest.approx(out_s), pytest.approx(in_s))
    # the plan's exposed DP terms hold at least the edges and the copies
    c = plan.predicted.communication
    assert c.dp_all_gather_s >= 2 * kw["edge_gather_s"] + out_s - 1e-12
    assert c.dp_reduce_scatter_s >= kw["edge_reduce_s"] + in_s - 1e-12


def test_the_sharding_ilp_prices_ops_at_the_layers_capture_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str | None] = []
    real = compute.estimate_op_time

    def spy(*args: object, **kw: object) -> object:
        seen.append(kw.get("capture_dtype", "missing"))  # type: ignore[arg-type]
        return real(*args, **kw)  # type: ignore[arg-type]

    graph = _graph(torch.bfloat16)
    monkeypatch.setattr(compute, "estimate_op_time", spy)
    LayerPricer(graph, H100).sharding_plans(tp=2, sequence_parallel=False)
    assert seen and set(seen) <= {layer_capture_dtype(layer) for layer in graph.layers}
    assert "bfloat16" in seen and "missing" not in seen


def test_the_sharding_ilp_prices_measured_ops_from_the_calibration_table() -> None:
    """The ILP chooses with the op times the plan is priced with: measured ones where the table has them.

    On an L40S node whose PCIe link is made slow (1 GB/s), the roofline's GPT block is cheaper whole than
    split (each split's collectives outweigh the halved GEMMs); a table that measured every GEMM 1,000× its
    roofline time makes splitting them pay. Before the table reached the ILP, it replicated both times."""
    import dataclasses

    from autopar.cost_models.profiling.calibration import CalibrationTable, op_key_for

    l40s = Cluster.preset("l40s-pcie")
    slow = dataclasses.replace(l40s, intra_node=dataclasses.replace(l40s.intra_node, bytes_per_s=1e9))
    with torch.device("meta"):
        model = GPT(GPTConfig(n_layer=2, n_embd=2048, n_head=16, vocab_size=4096, block_size=64))
    graph = autopar.capture(model, (torch.zeros(1, 64, dtype=torch.long, device="meta"),))
    block = graph.layers[1]
    measured = {}
    for op in block.ops:
        if op.op_class.value == "matmul":
            t = compute.estimate_op_time(op, slow, dtype="bfloat16")
            measured[op_key_for(op, "bfloat16")] = (1000 * t.forward_s, 1000 * t.backward_s)
    table = CalibrationTable(device_name="NVIDIA L40S", torch_version=torch.__version__, entries=measured,
                             dtype="bfloat16")

    def split_modules(calibration: CalibrationTable | None) -> set[str]:
        plans = LayerPricer(graph, slow, calibration=calibration).sharding_plans(tp=2, sequence_parallel=False)
        return {path for path, style in plans[block.kind].modules.items() if style.value != "replicate"}

    assert split_modules(None) == set()
    assert {"attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"} <= split_modules(table)
