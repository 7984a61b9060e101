"""The TP collectives the planner prices are the ones the emitted program issues (single process, recorded).

``python bench/tp_collectives.py --cluster <yaml>`` plans plan_regret's GPT (4 × 128, V 2048, seq 128) and
Llama (4 × 128, 4 heads, 2 KV heads, V 2048) at dp1 tp2 pp1, one micro-batch of 8, fp32, on a measured
2-gloo-rank cluster of this machine, runs one training step on 2 ranks and logs every c10d collective.
Each ``ISSUED`` below is what it printed for rank 0's forward and backward. These tests price the same
plans in one process and check the sharding ILP charges exactly those collectives, so a change of the
pricing (or of the ILP's choice) that makes them diverge fails here. The emitter side is checked by
re-running the bench (2 ranks, ~3 min).

Not recorded here: the runtime's one scalar all-reduce of the loss per step and its one all-reduce of the
replicated norms' partial gradients under SP (``autopar.emit.grads``), neither a layer's collective, and the
cases that still diverge (docs/cost-model-fidelity.md §2b).
"""

from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path

import pytest
import torch

import autopar
from autopar.cost_models.cluster import Cluster
from autopar.examples.gpt import GPT, GPTConfig
from autopar.plan import TPStyle
from autopar.pricing import LayerPricer

DATA = Path(__file__).parent / "data"
LOCAL2 = DATA / "local2_gloo.yaml"
LOADED = DATA / "local2_gloo_loaded.yaml"
"""The same machine measured while shared: there the ILP chooses Megatron's pattern for GPT with SP."""
MICRO_BATCH = 8
MB = 524_288  # one micro-batch's hidden state, 8 × 128 × 128 × 4 B (a block's collective, NCCL size)

COL, ROW = TPStyle.COLWISE, TPStyle.ROWWISE
GPT_STYLES = {"attn.q_proj": COL, "attn.k_proj": COL, "attn.v_proj": COL, "attn.c_proj": ROW, "mlp.c_fc": COL,
              "mlp.c_proj": ROW}
LLAMA_STYLES = {"self_attn.q_proj": COL, "self_attn.k_proj": COL, "self_attn.v_proj": COL,
                "self_attn.o_proj": ROW, "mlp.gate_proj": COL, "mlp.up_proj": COL, "mlp.down_proj": ROW}
"""The blocks' sharding the recordings ran (the ILP's choice on their clusters)."""

CASES: dict[str, tuple[str, Path, bool, dict[str, TPStyle], dict[tuple[str, str, int], int]]] = {
    "gpt_tp2": ("gpt", LOCAL2, False, GPT_STYLES, {  # (phase, kind, bytes as NCCL counts them) -> calls per step
        ("forward", "all_reduce", MB): 8,  # attn.c_proj and mlp.c_proj of 4 blocks (rowwise outputs)
        # the vocabulary-split logits stay split (no gather): the loss runs under loss_parallel (emit/loss.py)
        ("backward", "all_reduce", MB): 9,  # attn / mlp inputs' partial gradients of 4 blocks, and lm_head's
    }),
    "llama_tp2": ("llama", LOCAL2, False, LLAMA_STYLES, {
        ("forward", "all_reduce", MB): 8,  # o_proj and down_proj of 4 blocks
        # the vocabulary-split logits stay split (no gather)
        ("backward", "all_reduce", MB): 9,  # Megatron's f at self_attn / mlp inputs of 4 blocks, and at lm_head
    }),
    "gpt_tp2_sp": ("gpt", LOADED, True, GPT_STYLES, {
        ("forward", "all_to_all", MB // 2): 1,  # the embedding's hidden shard to the sequence shard
        ("forward", "all_gather", MB): 9,  # attention and MLP gather their sequence-sharded input, 4 blocks; lm_head
        ("forward", "reduce_scatter", MB): 8,  # attn.c_proj and mlp.c_proj to the sequence shard
        ("backward", "all_to_all", MB // 2): 1,
        ("backward", "all_gather", MB): 8,  # the reduce-scatters' backward
        ("backward", "reduce_scatter", MB): 9,  # the gathers' backward
        # lm_head is column-split (its logits stay split for loss_parallel) where it was row-split with the logits
        # all-reduced (8 × 128 × 2048 × 4 B) and its input an all-to-all to the hidden shard: recorded before then
    }),
}


def _model(family: str) -> torch.nn.Module:
    with torch.device("meta"):
        if family == "gpt":
            return GPT(GPTConfig(n_layer=4, n_embd=128, n_head=4, vocab_size=2048, block_size=128, dropout=0.0))
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(
            hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=2048, max_position_embeddings=128, attn_implementation="eager",
            use_cache=False))


@functools.cache
def _graph(family: str) -> autopar.OpGraph:
    """One capture per family for the cases that share it."""
    return autopar.capture(_model(family), (torch.zeros(2, 128, dtype=torch.long, device="meta"),))


def _priced(pricing: LayerPricer, graph: autopar.OpGraph, sp: bool) -> Counter[tuple[str, str, int]]:
    scale = MICRO_BATCH // graph.batch_size
    out: Counter[tuple[str, str, int]] = Counter()
    for layer in graph.layers:
        result = pricing._sharding(layer.kind, 2, sp)
        for phase, calls in (("forward", result.forward_collectives), ("backward", result.backward_collectives)):
            out.update((phase, kind, nbytes * scale) for kind, nbytes in calls)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_tp2_prices_the_collectives_the_emitted_program_issues(case: str) -> None:
    family, cluster, sp, styles, issued = CASES[case]
    graph = _graph(family)
    pricing = LayerPricer(graph, Cluster.from_yaml(cluster), dtype="float32")
    block = graph.layers[1].kind
    assert dict(pricing._sharding(block, 2, sp).modules) == styles, "the ILP chose another sharding: re-record"
    assert _priced(pricing, graph, sp) == Counter(issued)
