"""Mixture-of-experts FLOPs: routed experts priced from the grouped-GEMM shapes, routers as small ops.

Closed form per token (forward): 2 × active parameters + attention, where the active parameters are
every parameter a token multiplies (attention projections, router, top-k of the E experts, the LM head;
not the embedding table, which is a lookup) and attention is the full s×s score and value matmuls,
2·heads·s·(d_qk + d_v) per token per layer (``graph/flops.py``'s convention: no causal discount).
"""

from __future__ import annotations

import pytest
import torch

import autopar
from autopar.graph.flops import classify, count_flops
from autopar.graph.ir import OpClass, TensorMeta

transformers = pytest.importorskip("transformers")

SEQ = 256
LAYERS = 2  # real widths, two layers: the per-layer and the head terms are both exercised


def _capture(config):
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    graph = autopar.capture(model, {"input_ids": torch.zeros(1, SEQ, dtype=torch.long, device="meta")})
    return model, graph


def _active_params(model, *, experts: int, top_k: int) -> float:
    """Parameters one token multiplies: routed expert weights count top_k/E of theirs; embeddings none."""
    total = 0.0
    for name, p in model.named_parameters():
        if "embed_tokens" in name or p.dim() < 2:
            continue  # lookup table; norm weights are per-element scales, not matmul operands
        share = top_k / experts if ".experts." in name else 1.0
        total += p.numel() * share
    return total


def _closed_form_per_token(model, cfg, *, experts: int, top_k: int) -> float:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attention = cfg.num_hidden_layers * 2 * cfg.num_attention_heads * SEQ * (2 * head_dim)
    return 2 * _active_params(model, experts=experts, top_k=top_k) + attention


MIXTRAL_8X7B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                    vocab_size=32000, num_local_experts=8, num_experts_per_tok=2)
QWEN3_30B_A3B = dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_attention_heads=32,
                     num_key_value_heads=4, head_dim=128, vocab_size=151936, num_experts=128, num_experts_per_tok=8)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_moe_flops_per_token_match_two_active_params_plus_attention(family):
    if family == "mixtral":
        cfg = transformers.MixtralConfig(num_hidden_layers=LAYERS, **MIXTRAL_8X7B)
        experts, top_k = cfg.num_local_experts, cfg.num_experts_per_tok
    else:
        cfg = transformers.Qwen3MoeConfig(num_hidden_layers=LAYERS, **QWEN3_30B_A3B)
        experts, top_k = cfg.num_experts, cfg.num_experts_per_tok
    model, graph = _capture(cfg)
    summary = graph.summary()
    assert not any("grouped_mm" in u or "histc" in u for u in summary.unknown_ops), summary.unknown_ops
    expected = _closed_form_per_token(model, cfg, experts=experts, top_k=top_k)
    got = summary.matmul_flops / SEQ
    assert abs(got - expected) / expected < 0.01, (got, expected)
    # the routed experts are most of the work: a count that dropped them would miss by far more than 1 %
    dense_only = expected - 2 * sum(p.numel() for n, p in model.named_parameters() if ".experts." in n) * top_k / experts
    assert abs(dense_only - expected) / expected > 0.1


def test_grouped_matmul_counts_routed_rows():
    """(S, K) x (E, K, N): 2·S·K·N whatever E is; the router's histc is a small reduction."""
    x = TensorMeta(shape=(64, 32), dtype="float32")
    w = TensorMeta(shape=(8, 32, 16), dtype="float32")
    out = TensorMeta(shape=(64, 16), dtype="float32")
    offs = TensorMeta(shape=(8,), dtype="int32")
    for target in ("transformers.grouped_mm_fallback.default", "aten._grouped_mm.default"):
        assert classify(target) is OpClass.MATMUL
        assert count_flops(target, [x, w, offs], [out]) == 2 * 64 * 32 * 16
    routed = TensorMeta(shape=(64,), dtype="float32")
    assert classify("aten.histc.default") is OpClass.REDUCTION
    assert count_flops("aten.histc.default", [routed], [TensorMeta(shape=(8,), dtype="float32")]) == 64
    assert classify("aten.scatter_.src") is OpClass.COPY


def test_mixtral_is_not_predicted_faster_than_mistral():
    """Mixtral-8x7B is Mistral-7B's shape with 8 experts, top-2: twice the MLP work per token, so its
    step cannot be faster on the same cluster (it was, when the routed experts counted 0 FLOPs)."""
    layers, seq = 8, 4096  # per-layer shapes as published; 8 layers keep the capture short (and showed the bug)
    shape = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 vocab_size=32000, num_hidden_layers=layers)
    times = {}
    for name, cfg in (("mistral", transformers.MistralConfig(**shape)),
                      ("mixtral", transformers.MixtralConfig(num_local_experts=8, num_experts_per_tok=2, **shape))):
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(cfg)
        ids = torch.zeros(1, seq, dtype=torch.long, device="meta")
        predicted = autopar.plan(model, {"input_ids": ids}, cluster="dgx-h100", global_batch_size=16).predicted
        times[name] = predicted.step_time_s
        assert ("experts" in predicted.sources) == (name == "mixtral"), predicted.sources
    assert times["mixtral"] > 1.3 * times["mistral"], times
