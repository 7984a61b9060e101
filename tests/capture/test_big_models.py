"""Big models on meta: captured without allocating weights (slow; CI runs it)."""

from __future__ import annotations

import pytest
import torch

import autopar


@pytest.mark.slow
def test_llama_70b_shaped_on_meta():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                   num_attention_heads=64, num_key_value_heads=8, vocab_size=128256)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    graph = autopar.capture(model, {"input_ids": torch.zeros(1, 1024, dtype=torch.long, device="meta")})
    s = graph.summary()
    assert s.num_params == sum(p.numel() for p in model.parameters())
    assert 70.0e9 < s.num_params < 71.0e9
    assert s.num_layers == 82 and s.num_layer_kinds == 3
    assert max(len(v) for v in graph.layer_kinds().values()) == 80
