"""The fp32 cross-entropy the captured forward leaves out: closed-form bytes, found on the logits."""

from __future__ import annotations

import pytest
import torch

import autopar
from autopar.cost_models.cluster import Cluster
from autopar.cost_models.loss import (
    cross_entropy_bytes,
    cross_entropy_saved_bytes,
    estimate_cross_entropy_time,
    uncaptured_logits,
)
from autopar.examples.gpt import GPT, GPTConfig


def test_bytes_per_logit_match_the_eager_kernels():
    # bf16 logits: cast 2+4, log_softmax 4+4 | nll grad 4, log_softmax grad 4+4+4, cast grad 4+2
    assert cross_entropy_bytes(10, 100, logits_dtype="bfloat16") == (1000 * 14, 1000 * 22)
    assert cross_entropy_bytes(10, 100, logits_dtype="float32") == (1000 * 8, 1000 * 16)
    assert cross_entropy_saved_bytes(10, 100) == 1000 * 4


def test_time_is_bytes_at_the_achievable_bandwidth():
    gpu = Cluster.preset("dgx-h100").gpu
    fwd, bwd = estimate_cross_entropy_time(16384, 128256, logits_dtype="bfloat16", gpu=gpu)
    elements = 16384 * 128256
    assert fwd == pytest.approx(14 * elements / gpu.achievable_mem_bytes_per_s)
    assert bwd == pytest.approx(22 * elements / gpu.achievable_mem_bytes_per_s)


def test_logits_of_a_captured_gpt_are_found_and_a_loss_op_turns_the_term_off():
    cfg = GPTConfig(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, block_size=32)
    with torch.device("meta"):
        model = GPT(cfg)
    graph = autopar.capture(model, (torch.zeros(3, 32, dtype=torch.long, device="meta"),))
    found = uncaptured_logits(graph)
    assert found is not None and found[1:] == (3 * 32, 1000)

    class WithLoss(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gpt = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(self.gpt(x).flatten(0, 1), x.flatten())

    with_loss = autopar.capture(WithLoss(), (torch.zeros(3, 32, dtype=torch.long, device="meta"),))
    assert uncaptured_logits(with_loss) is None


def test_the_planner_prices_the_loss_on_the_last_stage():
    """A bigger vocabulary with the same layers costs more, by about the loss's closed form."""
    times = []
    for vocab in (1024, 65536):
        cfg = GPTConfig(n_layer=2, n_embd=256, n_head=4, vocab_size=vocab, block_size=1024)
        with torch.device("meta"):
            model = GPT(cfg)
        plan = autopar.plan(model, (torch.zeros(1, 1024, dtype=torch.long),), cluster="dgx-h100",
                            global_batch_size=8, constraints=dict(dp=1, tp=1, pp=1, micro_batch_size=8))
        times.append(plan.predicted.step_time_s)
    gpu = Cluster.preset("dgx-h100").gpu
    loss_delta = sum(estimate_cross_entropy_time(8 * 1024, 65536, logits_dtype="bfloat16", gpu=gpu)) - sum(
        estimate_cross_entropy_time(8 * 1024, 1024, logits_dtype="bfloat16", gpu=gpu))
    # the head GEMMs grow too: at least 3 × 2·T·h·ΔV FLOPs at the achievable rate; the loss comes on top
    gemm_floor = 6 * 8 * 1024 * 256 * (65536 - 1024) / (gpu.peak_flops("bfloat16") * gpu.matmul_efficiency)
    assert times[1] - times[0] > gemm_floor + 0.9 * loss_delta, (times, gemm_floor, loss_delta)


def test_a_vocabulary_split_head_prices_the_loss_at_v_over_t_with_its_all_reduces():
    """What the emitted program runs (emit/loss.py): the logits stay split, the loss under loss_parallel."""
    from autopar.cost_models.loss import cross_entropy_backward_working_bytes, loss_parallel_all_reduce_bytes
    from autopar.layout import Recompute
    from autopar.plan import TPStyle
    from autopar.pricing import LayerPricer

    cfg = GPTConfig(n_layer=2, n_embd=1024, n_head=8, vocab_size=32768, block_size=512, dropout=0.0)
    with torch.device("meta"):
        model = GPT(cfg)
    graph = autopar.capture(model, (torch.zeros(2, 512, dtype=torch.long, device="meta"),))
    pricer = LayerPricer(graph, Cluster.preset("dgx-h100"), dtype="float32")
    head = graph.layers[-1]
    sharding = pricer._sharding(head.kind, 2, False)
    assert sharding.module_styles()["lm_head"] is TPStyle.COLWISE  # V ≫ h: split over the vocabulary, not gathered
    assert not any(kind == "all_gather" for kind, _ in sharding.forward_collectives)
    vocab = 32768
    tokens, local = 4 * 512, vocab // 2  # micro-batch 4
    split = pricer._kind_cost(head, 2, False, 4, Recompute.NONE)
    whole = pricer._kind_cost(head, 1, False, 4, Recompute.NONE)
    assert split.working_bytes == cross_entropy_backward_working_bytes(tokens, local, vocab_parallel=True)
    assert split.working_bytes == 3 * tokens * local * 4 and whole.working_bytes == 2 * tokens * vocab * 4
    assert split.output_bytes == tokens * local * 4 and whole.output_bytes == tokens * vocab * 4
    assert whole.activation_bytes - split.activation_bytes >= tokens * (vocab - local) * 4  # saved log-probs at V/t
    reduces = sum(pricer.collective_time("all_reduce", b, group_size=2, nodes_spanned=1)
                  for b in loss_parallel_all_reduce_bytes(tokens))
    assert reduces > 0 and split.tp_comm_s >= reduces
