"""What the emitted FSDP2 / pipelining program holds: closed forms of ``cost_models/program_memory.py``."""

from __future__ import annotations

import pytest

from autopar.cost_models.loss import cross_entropy_backward_working_bytes, cross_entropy_saved_bytes
from autopar.cost_models.memory import RUNTIME_RESERVED_BYTES
from autopar.cost_models.program_memory import (
    estimate_fixed_bytes,
    estimate_fsdp_gather_bytes,
    estimate_fsdp_reduce_bytes,
    estimate_program_state_bytes,
    pipeline_recv_bytes,
    uses_fsdp,
)

N = 1_000_000


def states(zero: int, dp: int, dtype: str, m: int = 1, pipelined: bool = False) -> tuple[int, int, int, int]:
    s = estimate_program_state_bytes(N, zero_stage=zero, dp=dp, dtype=dtype, num_micro_batches=m, pipelined=pipelined)
    return s.params, s.grads, s.accumulated_grads, s.optimizer


def test_plain_fp32_without_data_parallelism() -> None:
    assert states(0, 1, "float32") == (4 * N, 4 * N, 0, 8 * N)  # weights, .grad, Adam's two moments
    assert states(0, 1, "float32", m=4) == (4 * N, 4 * N, 4 * N, 8 * N)  # .grad accumulates in place


@pytest.mark.parametrize("dtype, c", [("float32", 4), ("bfloat16", 2)])
def test_fsdp2_states_by_zero_stage(dtype: str, c: int) -> None:
    """Compute-dtype unsharded copy (kept for ZeRO 0-2), fp32 sharded master + moments (12 B / dp for ZeRO >= 1),
    fp32 gradients after the reduce (sharded for ZeRO >= 1), fp32 unsharded accumulation over micro-batches."""
    dp = 4
    assert states(0, dp, dtype) == (c * N, 4 * N, 0, 12 * N)
    assert states(1, dp, dtype) == states(2, dp, dtype) == (c * N, N, 0, 3 * N)
    assert states(3, dp, dtype) == (0, N, 0, 3 * N)
    assert states(3, dp, dtype, m=2) == (0, N, 4 * N, 3 * N)
    assert states(3, dp, dtype, pipelined=True) == (c * N, N, 4 * N, 3 * N)  # kept from the first backward on


def test_fsdp_rule_matches_the_emitter() -> None:
    from autopar.emit.dp import needs_dp_wrapper

    for dp in (1, 2, 8):
        for dtype in ("float32", "bfloat16"):
            assert uses_fsdp(dp=dp, dtype=dtype) == needs_dp_wrapper(dp, dtype)


def test_gathered_unit_reduce_buffers_and_fixed_bytes() -> None:
    assert estimate_fsdp_gather_bytes(N, zero_stage=3, dp=8, dtype="bfloat16") == 2 * 2 * N
    assert estimate_fsdp_gather_bytes(N, zero_stage=3, dp=8, dtype="bfloat16", pipelined=True) == 0
    assert estimate_fsdp_reduce_bytes(N, zero_stage=0, dp=8, dtype="bfloat16") == 4 * (N + N)
    assert estimate_fsdp_reduce_bytes(N, zero_stage=3, dp=8, dtype="bfloat16") == 4 * (N + N / 8)
    assert estimate_fixed_bytes(largest_unit_params=N, zero_stage=3, dp=8, dtype="float32") == \
        RUNTIME_RESERVED_BYTES + max(2 * 4 * N, 4 * (N + N / 8))


def test_pipeline_receive_buffers_and_the_loss_backward() -> None:
    assert pipeline_recv_bytes(num_micro_batches=8, input_bytes=3, output_bytes=0) == 24
    tokens, vocab = 1024, 2048  # plan_regret's GPT: the peak measured at _log_softmax_backward_data
    assert cross_entropy_backward_working_bytes(tokens, vocab) == 2 * cross_entropy_saved_bytes(tokens, vocab)
    assert cross_entropy_backward_working_bytes(tokens, vocab) == 2 * 1024 * 2048 * 4
