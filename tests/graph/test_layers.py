"""Layers: grouping by module path, structural kinds, summary, fingerprint."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import autopar
from autopar.examples.gpt import GPT, GPTConfig
from autopar.graph.layers import block_prefix


def test_repeated_blocks_share_one_kind(tiny_gpt_graph):
    g = tiny_gpt_graph
    assert [layer.module_path for layer in g.layers] == ["tok_emb+pos_emb", "blocks.0", "blocks.1", "ln_f+lm_head"]
    kinds = g.layer_kinds()
    assert len(kinds) == 3 and sorted(len(v) for v in kinds.values()) == [1, 1, 2]
    assert g.layers[1].kind == g.layers[2].kind != g.layers[0].kind
    s = g.summary()
    assert (s.num_layers, s.num_layer_kinds, s.capture_method) == (4, 3, "fx")
    assert sum(layer.num_params for layer in g.layers) == g.num_params
    assert s.forward_flops == sum(layer.forward_flops for layer in g.layers)


def test_block_input_is_the_residual_stream(tiny_gpt_graph):
    block = tiny_gpt_graph.layers[1]
    assert [t.shape for t in block.input_meta] == [(2, 16, 64)]
    assert block.boundary_nbytes == 2 * 16 * 64 * 4


def test_eighty_blocks_one_kind():
    with torch.device("meta"):
        model = GPT(GPTConfig(n_layer=80, n_embd=128, n_head=4, vocab_size=256, block_size=32))
    g = autopar.capture(model, (torch.zeros(1, 32, dtype=torch.long),))
    kinds = g.layer_kinds()
    assert len(g.layers) == 82 and len(kinds) == 3
    assert max(len(v) for v in kinds.values()) == 80


def test_kind_changes_with_structure():
    def kind(**kw):
        with torch.device("meta"):
            m = GPT(GPTConfig(n_layer=1, n_embd=64, n_head=4, vocab_size=64, block_size=8, **kw))
        return autopar.capture(m, (torch.zeros(1, 8, dtype=torch.long),)).layers[1].kind

    assert kind() != kind(bias=False) != kind(fused_attention=False)


def test_fingerprint_ignores_batch_but_not_model():
    def graph(batch, n_embd=64, seq=16):
        with torch.device("meta"):
            m = GPT(GPTConfig(n_layer=2, n_embd=n_embd, n_head=4, vocab_size=128, block_size=16))
        return autopar.capture(m, (torch.zeros(batch, seq, dtype=torch.long),))

    assert graph(1).fingerprint() == graph(4).fingerprint()
    assert graph(1).fingerprint() != graph(1, n_embd=128).fingerprint()
    assert graph(1).fingerprint() != graph(1, seq=8).fingerprint()


@pytest.mark.parametrize("path,expected", [("blocks.3.attn.q_proj", "blocks.3"), ("0.fc", "0"), ("lm_head", None),
                                           ("", None), ("model.layers.12", "model.layers.12")])
def test_block_prefix(path, expected):
    assert block_prefix(path) == expected


def test_ir_is_frozen(tiny_gpt_graph):
    with pytest.raises(dataclasses.FrozenInstanceError):
        tiny_gpt_graph.layers[0].kind = "x"  # type: ignore[misc]
