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
    pipeline_sent_bytes,
    uses_fsdp,
)
from autopar.layout import Layout, Recompute, Runtime, Schedule
from autopar.solvers import evaluate
from autopar.solvers.costs import Formulas
from tests.solvers.synthetic import SyntheticPricing

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
    assert states(3, dp, dtype, pipelined=True) == (0, N, 4 * N, 3 * N)  # each forward reshards: gathered per unit


def test_fsdp_rule_matches_the_emitter() -> None:
    from autopar.emit.dp import needs_dp_wrapper

    for dp in (1, 2, 8):
        for dtype in ("float32", "bfloat16"):
            assert uses_fsdp(dp=dp, dtype=dtype) == needs_dp_wrapper(dp, dtype)


def test_gathered_unit_reduce_buffers_and_fixed_bytes() -> None:
    assert estimate_fsdp_gather_bytes(N, zero_stage=3, dp=8, dtype="bfloat16") == 2 * 2 * N
    assert estimate_fsdp_gather_bytes(N, zero_stage=3, dp=8, dtype="bfloat16", pipelined=True) == 2 * 2 * N
    assert estimate_fsdp_reduce_bytes(N, zero_stage=0, dp=8, dtype="bfloat16") == 4 * (N + N)
    assert estimate_fsdp_reduce_bytes(N, zero_stage=3, dp=8, dtype="bfloat16") == 4 * (N + N / 8)
    assert estimate_fixed_bytes(largest_unit_params=N, zero_stage=3, dp=8, dtype="float32") == \
        RUNTIME_RESERVED_BYTES + max(2 * 4 * N, 4 * (N + N / 8))


def test_pipeline_receive_buffers_and_the_loss_backward() -> None:
    assert pipeline_recv_bytes(num_micro_batches=8, input_bytes=3, output_bytes=0) == 24
    tokens, vocab = 1024, 2048  # plan_regret's GPT: the peak measured at _log_softmax_backward_data
    assert cross_entropy_backward_working_bytes(tokens, vocab) == 2 * cross_entropy_saved_bytes(tokens, vocab)
    assert cross_entropy_backward_working_bytes(tokens, vocab) == 2 * 1024 * 2048 * 4


def test_sent_tensors_a_stage_still_holds() -> None:
    """A stage keeps each in-flight output it sent (``fwd_cache``); torch's interleaved 1F1B also waits on its sends
    only when the step ends, so all m outputs and the m − k input gradients sent back so far are alive at the peak
    (measured: 4 gloo ranks, tp2 pp2 v3, waiting each send at once lowers the peak by those bytes)."""
    def sent(schedule: Schedule, runtime: Runtime = Runtime.AUTOPAR, *, k: int = 3, inp: float = 5,
             out: float = 7) -> float:
        return pipeline_sent_bytes(num_micro_batches=8, in_flight=k, input_bytes=inp, output_bytes=out,
                                   schedule=schedule, runtime=runtime)

    assert sent(Schedule.ONE_F_ONE_B) == sent(Schedule.GPIPE) == 3 * 7  # the in-flight outputs only
    assert sent(Schedule.INTERLEAVED_1F1B) == 8 * 7 + (8 - 3) * 5
    assert sent(Schedule.INTERLEAVED_1F1B, out=0.0) == (8 - 3) * 5  # the last stage sends gradients only
    assert sent(Schedule.INTERLEAVED_1F1B, Runtime.MEGATRON) == 0.0  # outputs freed once sent, transfers waited


def test_interleaved_ranks_hold_every_send_at_their_peak(monkeypatch: pytest.MonkeyPatch) -> None:
    """pp 2 × v 2, 4 micro-batches: each rank's working bytes at the activations' peak gain the sends its chunks
    hold (``_rank_memory`` → ``Formulas.sent_bytes``); 1F1B's are its in-flight outputs only."""
    calls: list[dict[str, float]] = []
    real = evaluate.estimate_rank_memory
    monkeypatch.setattr(evaluate, "estimate_rank_memory", lambda **kw: (calls.append(kw), real(**kw))[1])
    syn = SyntheticPricing(blocks=4, mem=80e9)
    costs = syn.layer_costs(tp=1, sequence_parallel=False, micro_batch_size=1, recompute=Recompute.FULL)
    m = 4

    def sent(schedule: Schedule, v: int) -> list[float]:
        calls.clear()
        layout = Layout(dp=1, tp=1, pp=2, micro_batch_size=1, num_micro_batches=m, zero_stage=0,
                        recompute=Recompute.FULL, sequence_parallel=False, schedule=schedule, virtual_stages=v)
        ev = evaluate.evaluate_layout(layout, {Recompute.FULL: costs}, Formulas(syn.cluster(), "float32"),
                                      gpus_per_node=8)
        bounds, k, stages = ev.partition.boundaries, ev.partition.in_flight, 2 * v
        expected = []
        for rank in range(2):
            chunks = range(rank, stages, 2)
            total = 0.0
            for j in chunks:
                inp = costs[bounds[j]].boundary_bytes if j > 0 else 0.0
                out = costs[bounds[j + 1]].boundary_bytes if j < stages - 1 else 0.0
                total += m * out + (m - k[j]) * inp if schedule is Schedule.INTERLEAVED_1F1B else k[j] * out
            expected.append(total)
        working = [sum(c.working_bytes for j in range(rank, stages, 2) for c in costs[bounds[j]:bounds[j + 1]])
                   for rank in range(2)]
        assert [kw["working_bytes"] - w for kw, w in zip(calls, working, strict=True)] == pytest.approx(expected)
        return expected

    interleaved, one_f_one_b = sent(Schedule.INTERLEAVED_1F1B, 2), sent(Schedule.ONE_F_ONE_B, 1)
    assert min(interleaved) > 0 and one_f_one_b[0] > 0 and one_f_one_b[1] == 0.0  # the last stage sends no output
    assert interleaved[1] > one_f_one_b[1]


def test_sequence_parallel_stage_boundaries_carry_the_sequence_shard(tiny_gpt_graph) -> None:
    """Under SP both programs send the sequence shard across a stage boundary (autopar's
    ``emit/tp.py::sequence_boundaries``, its buffers checked in ``tests/emit/test_multiproc.py``; Megatron's
    ``get_tensor_shapes``); without SP, the whole activation."""
    from autopar.cost_models.cluster import Cluster
    from autopar.pricing import LayerPricer

    cluster = Cluster.preset("dgx-h100")
    layer = tiny_gpt_graph.layers[2]
    own = LayerPricer(tiny_gpt_graph, cluster, dtype="float32")
    meg = LayerPricer(tiny_gpt_graph, cluster, dtype="float32", runtime=Runtime.MEGATRON)
    whole = own._boundary(layer, 1, 1, False)
    assert whole > 0 and own._boundary(layer, 1, 2, False) == whole
    assert own._boundary(layer, 1, 2, True) == meg._boundary(layer, 1, 2, True) == whole / 2
