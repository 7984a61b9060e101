"""ZeRO 3 under torch pipelining: the forward before each backward reshards every unit (``program_memory``).

torch's stage keeps a chunk's FSDP units gathered after its backward (``stage.py``: ``set_reshard_after_backward
(False)`` until ``perform_reduce_grad``), but ``FSDPParamGroup.post_forward`` reshards a unit whenever
``reshard_after_forward`` holds, so at the activations' peak (a backward's start, after the forwards) a ZeRO 3
rank holds its gathered unit, not an unsharded copy of all its weights. Measured (``bench/plan_regret.py``, GPT,
4 gloo ranks, dp2 pp2 ZeRO 3): pricing that copy over-predicted the peak by up to 14 %.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from autopar.cost_models.program_memory import estimate_fsdp_gather_bytes, estimate_program_state_bytes
from autopar.layout import Layout, MemoryBreakdown, Recompute, Schedule
from autopar.solvers import evaluate
from autopar.solvers.costs import Formulas
from tests.solvers.synthetic import SyntheticPricing

N = 1_000_000


@pytest.mark.parametrize("dtype, width", [("float32", 4), ("bfloat16", 2)])
def test_zero3_under_a_pipeline_holds_the_gathered_unit_not_the_weights(dtype: str, width: int) -> None:
    """The states of ZeRO 3 are the same with and without a pipeline (no unsharded copy), gradients accumulated
    unsharded in fp32 over the micro-batches; the gathered unit (all-gather output + copy) is priced either way."""
    for m in (1, 4):
        piped = estimate_program_state_bytes(N, zero_stage=3, dp=2, dtype=dtype, num_micro_batches=m, pipelined=True)
        flat = estimate_program_state_bytes(N, zero_stage=3, dp=2, dtype=dtype, num_micro_batches=4)
        assert piped == flat and piped.params == 0 and piped.accumulated_grads == 4 * N
    unit = N / 10
    assert estimate_fsdp_gather_bytes(unit, zero_stage=3, dp=2, dtype=dtype, pipelined=True) == \
        estimate_fsdp_gather_bytes(unit, zero_stage=3, dp=2, dtype=dtype) == 2 * width * unit
    # ZeRO 2 keeps its copies from the first forward (reshard_after_forward=False): a pipeline changes nothing
    assert estimate_program_state_bytes(N, zero_stage=2, dp=2, dtype=dtype, pipelined=True).params == width * N


def test_a_pipelined_zero3_rank_is_priced_below_zero2_by_its_weights_less_the_gathered_unit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """dp2 pp2 GPipe, fp32: every rank's peak inputs under ZeRO 3 are ZeRO 2's less the unsharded copy of its weights
    (4 B a parameter) plus, gathered twice (all-gather output and copy) in its working bytes, its stage root with its
    largest block: a stage's backward starts at the root's output, so the root's pre-backward gather meets the last
    block's (``evaluate._gathered_together``); the rest is the same."""
    calls: list[dict[str, float]] = []
    real = evaluate.estimate_rank_memory

    def record(**kw: Any) -> MemoryBreakdown:
        calls.append(kw)
        return real(**kw)

    monkeypatch.setattr(evaluate, "estimate_rank_memory", record)
    syn = SyntheticPricing(blocks=4, mem=80e9)
    costs = syn.layer_costs(tp=1, sequence_parallel=False, micro_batch_size=1, recompute=Recompute.FULL)
    # an untied head, smaller than the embedding: the two ends are root units, not repeated blocks
    costs = (*costs[:-1], dataclasses.replace(costs[-1], param_count=costs[-1].param_count / 2))

    def rank_inputs(zero: int) -> tuple[list[dict[str, float]], evaluate.StagePartition]:
        calls.clear()
        layout = Layout(dp=2, tp=1, pp=2, micro_batch_size=1, num_micro_batches=4, zero_stage=zero,
                        recompute=Recompute.FULL, sequence_parallel=False, schedule=Schedule.GPIPE, virtual_stages=1)
        ev = evaluate.evaluate_layout(layout, {Recompute.FULL: costs}, Formulas(syn.cluster(), "float32"),
                                      gpus_per_node=8)
        return list(calls), ev.partition

    zero2, part = rank_inputs(2)
    zero3, part3 = rank_inputs(3)
    assert part3.boundaries == part.boundaries and len(zero3) == len(zero2) == 2
    for rank, (two, three) in enumerate(zip(zero2, zero3, strict=True)):
        layers = costs[part.boundaries[rank]:part.boundaries[rank + 1]]
        weights = sum(c.param_count for c in layers)
        assert two["params_bytes"] == 4 * weights and three["params_bytes"] == 0
        root = sum(c.param_count for c in layers if c.param_count != costs[1].param_count)
        gathered = 2 * 4 * (root + costs[1].param_count)
        assert root > 0 and gathered > 2 * 4 * evaluate._largest_unit([c.param_count for c in layers])
        assert three["working_bytes"] - two["working_bytes"] == pytest.approx(gathered)
        for key in ("grads_bytes", "optimizer_bytes", "activation_bytes", "fixed_bytes", "reduce_bytes",
                    "accumulated_grads_bytes"):
            assert three[key] == two[key], key


def test_the_gathered_root_and_block_are_the_last_chunks() -> None:
    """Under a pipeline the units gathered at the activations' peak are the root and largest block of the rank's
    last chunk (its backward runs first); without one, the largest unit. Measured on GPT dp2 pp2 interleaved v2
    mb2x2 ZeRO 3: rank 0 (stages 0 and 2) peaks with stage 2's units, not with the embedding (stage 0's root):
    pricing the embedding there over-predicted by 10 %, the last chunk's units by 0.6 % under."""
    params = [30.0, 10.0, 10.0, 10.0, 10.0, 20.0]  # embedding, four blocks, head
    blocks = evaluate.fsdp_blocks(params)
    first, last = range(0, 2), range(3, 4)  # rank 0 of pp2 v2: stages 0 and 2
    assert evaluate._gathered_together(params, blocks, [first, last], pipelined=True) == 10.0
    assert evaluate._gathered_together(params, blocks, [first], pipelined=True) == 40.0  # 1F1B: embedding + block
    assert evaluate._gathered_together(params, blocks, [range(6)], pipelined=False) == 50.0  # one root: both ends
