"""Megatron-LM's program, term by term: closed forms of ``program_memory`` under ``Runtime.MEGATRON``, and the
planner's path (``Formulas`` → ``evaluate_layout``) reading them."""

from __future__ import annotations

import pytest

from autopar.cost_models import optimizer
from autopar.cost_models.memory import RUNTIME_RESERVED_BYTES
from autopar.cost_models.program_memory import (
    estimate_fixed_bytes,
    estimate_program_state_bytes,
    grad_bytes_per_param,
    held_output_bytes,
    pipeline_recv_bytes,
)
from autopar.cost_models.runtimes import program_of
from autopar.layout import Layout, Recompute, Runtime, Schedule
from autopar.solvers import evaluate
from autopar.solvers.costs import Formulas
from tests.solvers.synthetic import SyntheticPricing

N = 1_000_000
MEGATRON = Runtime.MEGATRON


def per_param(zero: int, dp: int, dtype: str) -> tuple[float, float, float]:
    s = estimate_program_state_bytes(N, zero_stage=zero, dp=dp, dtype=dtype, runtime=MEGATRON)
    return s.params / N, s.grads / N, s.optimizer / N


@pytest.mark.parametrize("dtype, whole, distributed", [
    ("bfloat16", (2, 4, 12), (2, 4, 12 / 8)),   # 18 B; 6 + 12/d (bf16 params, fp32 main_grad)
    ("float16", (2, 2, 16), (2, 2, 16 / 8)),    # 20 B; 4 + 16/d (fp16 grads, fp32 copy in the optimizer)
    ("float32", (4, 4, 8), (4, 4, 8 / 8)),      # 16 B; 8 + 8/d (the weights are the master copy)
])
def test_megatron_states_are_the_distributed_optimizer_table(dtype: str, whole: tuple, distributed: tuple) -> None:
    assert per_param(0, 8, dtype) == whole
    assert per_param(1, 8, dtype) == distributed


def test_megatron_grad_buffer_is_resident_and_not_accumulated_on_top() -> None:
    one = estimate_program_state_bytes(N, zero_stage=1, dp=4, dtype="bfloat16", runtime=MEGATRON)
    many = estimate_program_state_bytes(N, zero_stage=1, dp=4, dtype="bfloat16", num_micro_batches=8,
                                        pipelined=True, runtime=MEGATRON)
    assert one == many  # one contiguous buffer, accumulated in place whatever the micro-batches
    assert one.live_grads(backward_ran=False) == one.live_grads(backward_ran=True) == 4 * N
    assert one.total == (2 + 4 + 3) * N
    fsdp = estimate_program_state_bytes(N, zero_stage=1, dp=4, dtype="bfloat16", num_micro_batches=8)
    assert (fsdp.live_grads(backward_ran=False), fsdp.live_grads(backward_ran=True)) == (0, 4 * N)


def test_megatron_refused_stages_price_as_the_distributed_optimizer() -> None:
    """ZeRO 2/3 are not offered under Megatron; the lower bounds that ask get ZeRO 1's states (its least)."""
    assert per_param(3, 8, "bfloat16") == per_param(1, 8, "bfloat16")
    assert program_of(MEGATRON).zero_stages == (0, 1)


def test_megatron_has_no_fsdp_buffers_and_reduces_in_its_buffer() -> None:
    for zero in (0, 1):
        assert estimate_fixed_bytes(largest_unit_params=N, zero_stage=zero, dp=8, dtype="bfloat16",
                                    runtime=MEGATRON) == RUNTIME_RESERVED_BYTES
    assert estimate_fixed_bytes(largest_unit_params=N, zero_stage=1, dp=8, dtype="bfloat16") == \
        RUNTIME_RESERVED_BYTES + 4 * (N + N / 8)  # autopar: FSDP2's fp32 reduce-scatter input and output
    assert grad_bytes_per_param("bfloat16", MEGATRON) == 4 and grad_bytes_per_param("float16", MEGATRON) == 2
    assert grad_bytes_per_param("float16") == 4


def test_pipeline_receives_per_transfer_and_no_held_logits() -> None:
    # 280 micro-batches of 84 MB: torch pipelining preallocates 2 × 280 buffers, Megatron holds one gradient
    mb = 84e6
    assert pipeline_recv_bytes(num_micro_batches=280, input_bytes=mb, output_bytes=mb) == 2 * 280 * mb
    assert pipeline_recv_bytes(num_micro_batches=280, input_bytes=mb, output_bytes=mb, runtime=MEGATRON) == mb
    assert pipeline_recv_bytes(num_micro_batches=280, input_bytes=mb, output_bytes=0.0, runtime=MEGATRON) == 0.0
    assert held_output_bytes(mb) == mb and held_output_bytes(mb, MEGATRON) == 0.0


def test_formulas_select_the_runtime_terms() -> None:
    cluster = SyntheticPricing().cluster()
    meg, own = Formulas(cluster, "bfloat16", MEGATRON), Formulas(cluster, "bfloat16")
    assert (meg.optimizer, own.optimizer) == ("fused", "foreach")
    assert meg.optimizer_step_time(1e9) == optimizer.estimate_optimizer_step_time(
        1e9, cluster.gpu, implementation="fused", clip_grad_norm=True)
    assert meg.optimizer_temp_bytes(1e9) == 0.0 and own.optimizer_temp_bytes(1e9) == 4e9
    assert meg.fsdp_copy_time(1e9, gathers_per_step=1) == (0.0, 0.0)
    assert own.fsdp_copy_time(1e9, gathers_per_step=1) != (0.0, 0.0)
    assert meg.model_state_bytes(N, zero_stage=1, dp=4) == (2 * N, 4 * N, 3 * N)


def test_evaluate_layout_reads_megatron_terms(monkeypatch: pytest.MonkeyPatch) -> None:
    """pp 2 × 8 micro-batches, 1F1B: each rank's states, receive tensors and live gradients as Megatron holds."""
    calls: list[dict[str, float]] = []
    real = evaluate.estimate_rank_memory
    monkeypatch.setattr(evaluate, "estimate_rank_memory", lambda **kw: (calls.append(kw), real(**kw))[1])
    syn = SyntheticPricing(blocks=4, mem=80e9)
    costs = syn.layer_costs(tp=1, sequence_parallel=False, micro_batch_size=1, recompute=Recompute.FULL)
    layout = Layout(dp=2, tp=1, pp=2, micro_batch_size=1, num_micro_batches=8, zero_stage=1,
                    recompute=Recompute.FULL, sequence_parallel=False, schedule=Schedule.ONE_F_ONE_B)
    ev = evaluate.evaluate_layout(layout, {Recompute.FULL: costs}, Formulas(syn.cluster(), "bfloat16", MEGATRON),
                                  gpus_per_node=8)
    bounds = ev.partition.boundaries
    for rank, kw in enumerate(calls):
        params = sum(c.param_count for c in costs[bounds[rank]:bounds[rank + 1]])
        assert kw["params_bytes"] == 2 * params and kw["grads_bytes"] == 4 * params
        assert kw["optimizer_bytes"] == 12 * params / 2 and kw["accumulated_grads_bytes"] == 4 * params
        assert kw["optimizer_temp_bytes"] == 0.0 and kw["reduce_bytes"] == 0.0
    boundary = costs[bounds[1]].boundary_bytes  # rank 0 receives one output gradient, rank 1 nothing extra
    assert [kw["fixed_bytes"] - RUNTIME_RESERVED_BYTES for kw in calls] == [boundary, 0.0]
