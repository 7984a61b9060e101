"""FLOP counts against closed forms (Megatron-LM / PaLM conventions)."""

from __future__ import annotations

import pytest
import torch

import autopar
from autopar.examples.gpt import GPT, GPTConfig
from autopar.graph.flops import classify, count_bytes, count_flops
from autopar.graph.ir import OpClass, TensorMeta


def gpt_forward_matmul_flops(B: int, s: int, l: int, h: int, V: int) -> float:
    """One forward pass of Megatron-LM's 96·B·s·l·h²·(1 + s/(6h) + V/(16·l·h)) (fwd + bwd + recompute = 4×).

    The forward-only form is 24·B·s·l·h²·(1 + s/(6h) + V/(12·l·h)): the logit layer is 2·B·s·h·V in
    forward and is not recomputed, so it is 1/3 rather than 1/4 of its term in the 4× formula.
    """
    return 24 * B * s * l * h * h * (1 + s / (6 * h) + V / (12 * l * h))


@pytest.mark.parametrize("size,seq,batch", [("125m", 1024, 2), ("350m", 512, 1), ("1.3b", 2048, 1),
                                            ("2.7b", 256, 4)])
def test_gpt_matmul_flops_match_megatron(size, seq, batch):
    cfg = GPTConfig.from_name(size)
    with torch.device("meta"):
        model = GPT(cfg)
    graph = autopar.capture(model, (torch.zeros(batch, seq, dtype=torch.long, device="meta"),))
    expected = gpt_forward_matmul_flops(batch, seq, cfg.n_layer, cfg.n_embd, cfg.vocab_size)
    got = graph.summary().matmul_flops
    assert abs(got - expected) / expected < 0.005, (got, expected)
    assert graph.summary().forward_flops > got  # norms, activations, softmax add a little


def test_wrong_count_would_be_caught():
    """Guard: the tolerance rejects a count that forgets the attention term."""
    B, s, l, h, V = 1, 2048, 24, 2048, 51200
    without_attention = 24 * B * s * l * h * h * (1 + V / (12 * l * h))
    assert abs(without_attention - gpt_forward_matmul_flops(B, s, l, h, V)) / without_attention > 0.005


def test_hf_gpt2_matmul_flops():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_embd=768, n_layer=4, n_head=12, vocab_size=50304, n_positions=1024)
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(cfg)
    B, s = 2, 512
    graph = autopar.capture(model, {"input_ids": torch.zeros(B, s, dtype=torch.long)})
    assert graph.capture_method == "export"
    expected = gpt_forward_matmul_flops(B, s, 4, 768, 50304)
    assert abs(graph.summary().matmul_flops - expected) / expected < 0.005
    assert graph.num_params == sum(p.numel() for p in model.parameters())


def llama_forward_matmul_flops(B, s, l, h, a, kv, ffn, V):
    """q,o: 2·2Bsh²; k,v: 2·2Bsh·(kv·h/a); SwiGLU MLP: 3·2Bsh·ffn; attention 4Bs²h; head 2BshV."""
    hd = h // a
    per_layer = 4 * B * s * h * h + 4 * B * s * h * kv * hd + 6 * B * s * h * ffn + 4 * B * s * s * h
    return l * per_layer + 2 * B * s * h * V


def test_hf_llama_matmul_flops_and_kinds():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=3,
                                   num_attention_heads=8, num_key_value_heads=2, vocab_size=32000)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    B, s = 2, 256
    graph = autopar.capture(model, {"input_ids": torch.zeros(B, s, dtype=torch.long)})
    expected = llama_forward_matmul_flops(B, s, 3, 512, 8, 2, 1376, 32000)
    assert abs(graph.summary().matmul_flops - expected) / expected < 0.005
    assert graph.num_params == sum(p.numel() for p in model.parameters())
    kinds = graph.layer_kinds()
    assert [len(v) for v in kinds.values()] == [1, 3, 1]
    assert [graph.layers[i].module_path for i in list(kinds.values())[1]] == [f"model.layers.{i}" for i in range(3)]


def test_op_rules_closed_form():
    f32 = "float32"
    a, b = TensorMeta(shape=(4, 3, 5), dtype=f32), TensorMeta(shape=(4, 5, 7), dtype=f32)
    out = TensorMeta(shape=(4, 3, 7), dtype=f32)
    assert count_flops("aten.bmm.default", [a, b], [out]) == 2 * 4 * 3 * 5 * 7
    q = TensorMeta(shape=(2, 8, 128, 64), dtype=f32)
    assert count_flops("aten._scaled_dot_product_efficient_attention.default", [q, q, q], [q]) == \
        2 * 2 * 8 * 128 * 128 * (64 + 64)
    x = TensorMeta(shape=(1, 16, 3, 3), dtype=f32)
    w = TensorMeta(shape=(32, 16, 3, 3), dtype=f32)
    y = TensorMeta(shape=(1, 32, 1, 1), dtype=f32)
    assert count_flops("aten.convolution.default", [x, w], [y]) == 2 * 32 * 16 * 9
    assert count_bytes("aten.view.default", [x], [x]) == 0
    assert count_bytes("aten.add.Tensor", [x, x], [x]) == 3 * x.nbytes
    assert classify("aten.frobnicate.default") is OpClass.UNKNOWN


def test_unknown_ops_are_listed():
    class Odd(torch.nn.Module):
        def forward(self, x):
            return torch.special.bessel_j0(x)

    graph = autopar.capture(Odd(), (torch.randn(2, 3),))
    assert graph.unknown_ops == ("aten.special_bessel_j0.default",)
    op = graph.ops[0]
    assert op.op_class is OpClass.UNKNOWN and op.flops == 0 and op.nbytes_moved == 2 * 2 * 3 * 4
