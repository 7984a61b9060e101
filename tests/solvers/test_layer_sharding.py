"""The layer sharding solver on captured models: it rediscovers Megatron-LM's layout from costs alone."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

import autopar
from autopar.errors import InfeasiblePlanError
from autopar.examples.gpt import GPT, GPTConfig
from autopar.graph.ir import Layer, Op, OpGraph
from autopar.plan import ShardingPlan, TPStyle
from autopar.solvers.sharding.strategies import solve_layer_sharding

MEGATRON_GPT = {"attn.q_proj": TPStyle.COLWISE, "attn.k_proj": TPStyle.COLWISE, "attn.v_proj": TPStyle.COLWISE,
                "attn.c_proj": TPStyle.ROWWISE, "mlp.c_fc": TPStyle.COLWISE, "mlp.c_proj": TPStyle.ROWWISE}

PEAK_FLOPS = 100e12
HBM_BYTES_PER_S = 1e12
LINK_BYTES_PER_S = 100e9
LATENCY_S = 5e-6


def roofline(op: Op) -> float:
    """A simple roofline: FLOPs at 100 TFLOP/s plus bytes at 1 TB/s."""
    return op.flops / PEAK_FLOPS + op.nbytes_moved / HBM_BYTES_PER_S


def ring(tp: int):  # noqa: ANN201 - a cost callable
    """Alpha-beta ring collective on tp ranks (all kinds priced like an all-reduce, on purpose: simple)."""
    return lambda kind, nbytes: 2 * (tp - 1) / tp * nbytes / LINK_BYTES_PER_S + LATENCY_S


def capture_gpt(*, n_embd: int, seq: int, batch: int = 1, fused: bool = True, dropout: float = 0.0) -> OpGraph:
    cfg = GPTConfig(n_layer=2, n_embd=n_embd, n_head=8, block_size=seq, vocab_size=1024, dropout=dropout,
                    fused_attention=fused)
    with torch.device("meta"):
        model = GPT(cfg)
    return autopar.capture(model, (torch.zeros(batch, seq, dtype=torch.long),))


def layer(graph: OpGraph, path: str) -> Layer:
    return next(lay for lay in graph.layers if lay.module_path == path)


@pytest.fixture(scope="module")
def gpt() -> OpGraph:
    """A GPT with realistic block sizes (h = 1024, s = 512): communication and compute both matter."""
    return capture_gpt(n_embd=1024, seq=512)


RINGS = {tp: ring(tp) for tp in (1, 2, 4, 8)}


def solve(lay: Layer, tp: int, *, sp: bool = False, **kw: object):  # noqa: ANN201
    return solve_layer_sharding(lay, tp=tp, sequence_parallel=sp, op_time=roofline, collective_time=RINGS[tp],
                                **kw)  # type: ignore[arg-type]


# ---- Megatron-LM rediscovered ----------------------------------------------------------------


def test_gpt_block_at_tp8_is_megatron(gpt: OpGraph) -> None:
    block = layer(gpt, "blocks.0")
    result = solve(block, 8)
    assert result.module_styles() == MEGATRON_GPT
    hidden_bytes = 1 * 512 * 1024 * 4  # (B, T, h) fp32 as captured
    # Megatron's g (forward) and f (backward): two all-reduces of the hidden state each way
    assert result.forward_collectives == (("all_reduce", hidden_bytes),) * 2
    assert result.backward_collectives == (("all_reduce", hidden_bytes),) * 2
    # q, k and v read one normed tensor: their partial gradients meet there and need one all-reduce, not three
    assert any(c.tensor == "native_layer_norm" and c.reader == "<readers>" for c in result.backward_calls)
    # 12h² of weights and the q, k, v, c_fc biases (7h) split; both c_proj biases (2h) and the norms (4h) whole
    assert result.params_per_gpu == (12 * 1024**2 + 7 * 1024) / 8 + 6 * 1024
    assert result.tp_grad_sync_bytes == 0.0


def test_gpt_block_with_sequence_parallelism(gpt: OpGraph) -> None:
    result = solve(layer(gpt, "blocks.0"), 8, sp=True)
    assert result.module_styles() == MEGATRON_GPT
    fwd = Counter(kind for kind, _ in result.forward_collectives)
    bwd = Counter(kind for kind, _ in result.backward_collectives)
    assert fwd == Counter({"all_gather": 2, "reduce_scatter": 2})  # Korthikanti et al. 2022, Fig. 5
    assert bwd == Counter({"reduce_scatter": 2, "all_gather": 2})
    # norm weights see sequence shards: their gradients are partial and all-reduced once per step
    assert result.tp_grad_sync_bytes == 4 * 1024 * 4
    assert result.strategies["native_layer_norm"] == "S(1), S(1), S(1) = S(1) x R x R"


def test_tp1_is_all_replicated(gpt: OpGraph) -> None:
    result = solve(layer(gpt, "blocks.0"), 1)
    assert set(result.module_styles().values()) == {TPStyle.REPLICATE}
    assert result.forward_collectives == () and result.backward_collectives == ()
    placements = [*result.input_placements.values(), *result.output_placements.values()]
    assert all(p.is_replicate for ps in placements for p in ps)
    assert result.forward_compute_s == pytest.approx(sum(roofline(op) for op in layer(gpt, "blocks.0").ops))


def test_tiny_hidden_size_stays_replicated() -> None:
    graph = capture_gpt(n_embd=64, seq=64)
    block = layer(graph, "blocks.0")
    replicated_s = sum(roofline(op) for op in block.ops) * 3  # forward + 2 × forward for backward
    # Megatron would pay at least four collectives (two each way), each at least the latency
    assert replicated_s < 4 * LATENCY_S
    result = solve(block, 8)
    assert result.forward_collectives == () and result.backward_collectives == ()
    assert result.objective_s == pytest.approx(replicated_s)
    assert set(result.module_styles().values()) == {TPStyle.REPLICATE}


def test_op_cost_that_gains_nothing_from_splitting_keeps_everything_whole(gpt: OpGraph) -> None:
    block = layer(gpt, "blocks.0")
    result = solve_layer_sharding(block, tp=8, sequence_parallel=False, collective_time=RINGS[8],
                                  op_cost=lambda op, n: (roofline(op), 2 * roofline(op)))  # n ignored
    assert result.forward_collectives == () and set(result.module_styles().values()) == {TPStyle.REPLICATE}
    with pytest.raises(ValueError, match="exactly one of op_time"):
        solve_layer_sharding(block, tp=8, sequence_parallel=False, collective_time=RINGS[8])


def test_memory_budget_forces_sharding_a_tiny_block() -> None:
    block = layer(capture_gpt(n_embd=64, seq=64), "blocks.0")
    full = solve(block, 8).param_bytes_per_gpu
    squeezed = solve(block, 8, mem_budget_bytes=full / 2)
    assert squeezed.param_bytes_per_gpu <= full / 2
    assert TPStyle.COLWISE in squeezed.module_styles().values()
    assert squeezed.forward_collectives  # paid for with communication
    with pytest.raises(InfeasiblePlanError, match="blocks.0 at tp=8"):
        solve(block, 8, mem_budget_bytes=full / 100)


def test_explicit_attention_with_batch_two_uses_strided_shards() -> None:
    graph = capture_gpt(n_embd=512, seq=256, batch=2, fused=False, dropout=0.1)
    result = solve(layer(graph, "blocks.0"), 4)
    assert result.module_styles() == MEGATRON_GPT
    assert [k for k, _ in result.forward_collectives] == ["all_reduce", "all_reduce"]
    # (B, H, T, T) scores flattened to (B·H, T, T) with H split: a strided shard over the batch
    assert result.strategies["bmm"] == "S(0,sf=2) = S(0,sf=2) x S(0,sf=2)"
    assert result.strategies["_softmax"] == "S(1) = S(1)"


# ---- what the rest of the planner reads ------------------------------------------------------


def test_saved_activations_know_whether_they_are_sharded(gpt: OpGraph) -> None:
    block = layer(gpt, "blocks.0")
    result = solve(block, 8)
    by_saver = {(s.producer, s.saver): result.is_sharded(s) for s in block.saved}
    assert by_saver[("native_layer_norm_1", "addmm_4")] is False  # c_fc's input is replicated
    assert by_saver[("gelu", "addmm_5")] is True  # c_proj's input is split on its hidden dim
    assert by_saver[("addmm_1", "_scaled_dot_product_efficient_attention")] is True  # k, split by heads
    sp = solve(block, 8, sp=True)
    saved_input = next(s for s in block.saved if s.saver == "native_layer_norm" and s.meta.shape == (1, 512, 1024))
    assert sp.is_sharded(saved_input) and not result.is_sharded(saved_input)


def test_result_becomes_a_sharding_plan(gpt: OpGraph) -> None:
    result = solve(layer(gpt, "blocks.0"), 8)
    plan = result.to_sharding_plan()
    assert isinstance(plan, ShardingPlan)
    assert plan.modules == MEGATRON_GPT
    assert plan.ops["addmm_3"] == "P = P x S(1) x S(0)"  # c_proj: row split, bias added once
    assert plan.forward_collectives == result.forward_collectives
    assert result.is_split(layer(gpt, "blocks.0").ops[3]) is True  # addmm (q_proj)


def test_result_rebinds_to_other_layers_of_the_same_kind(gpt: OpGraph) -> None:
    first, second = layer(gpt, "blocks.0"), layer(gpt, "blocks.1")
    assert first.kind == second.kind
    a = solve(first, 8)
    b = a.rebind(second)  # solved once per kind, bound to every layer of it
    assert b.layer_path == "blocks.1"
    assert list(b.strategies) == [op.name for op in second.ops]
    assert list(b.strategies.values()) == list(a.strategies.values())
    saved = second.saved[3]
    assert b.is_sharded(saved) == a.is_sharded(first.saved[3])


def test_embedding_and_head_layers(gpt: OpGraph) -> None:
    emb, head = gpt.layers[0], gpt.layers[-1]
    for lay in (emb, head):
        result = solve(lay, 8)
        assert math.isfinite(result.objective_s)
    # the head's logits are replicated for the next consumer unless the loss runs on shards
    free = solve(head, 8, free_output=True)
    assert free.module_styles()["lm_head"] is TPStyle.COLWISE
    assert free.forward_collectives == ()


# ---- Hugging Face Llama ----------------------------------------------------------------------


def test_llama_decoder_layer_is_megatron() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=1024, hidden_size=1024, intermediate_size=2816, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    graph = autopar.capture(model, {"input_ids": torch.zeros(1, 512, dtype=torch.long)})
    decoder = layer(graph, "model.layers.0")
    result = solve(decoder, 4)
    assert result.module_styles() == {
        "self_attn.q_proj": TPStyle.COLWISE, "self_attn.k_proj": TPStyle.COLWISE,
        "self_attn.v_proj": TPStyle.COLWISE, "self_attn.o_proj": TPStyle.ROWWISE,
        "mlp.gate_proj": TPStyle.COLWISE, "mlp.up_proj": TPStyle.COLWISE, "mlp.down_proj": TPStyle.ROWWISE,
    }
    assert [k for k, _ in result.forward_collectives] == ["all_reduce", "all_reduce"]
    assert [k for k, _ in result.backward_collectives] == ["all_reduce", "all_reduce"]
