"""Captured graphs shared by the cost-model tests (captured once per session, on meta tensors)."""

from __future__ import annotations

import pytest

from autopar.graph.ir import Layer, OpGraph

HIDDEN, HEADS, SEQ, BATCH = 256, 8, 128, 2
"""Korthikanti-test sizes: s·b·h large against the LayerNorm statistics (2·b·s per norm), a·s/h = 4."""

COLUMN_LINEARS = ("q_proj", "k_proj", "v_proj", "c_fc")
ROW_LINEARS = ("c_proj",)


def capture_gpt(*, fused: bool, n_layer: int = 1, dropout: float = 0.1, batch: int = BATCH, hidden: int = HIDDEN,
                heads: int = HEADS, seq: int = SEQ, vocab: int = 512) -> OpGraph:
    import autopar
    from autopar.examples.gpt import GPT, GPTConfig, example_inputs

    cfg = GPTConfig(n_layer=n_layer, n_embd=hidden, n_head=heads, block_size=seq, vocab_size=vocab,
                    dropout=dropout, fused_attention=fused)
    return autopar.capture(GPT(cfg), example_inputs(cfg, batch_size=batch))


@pytest.fixture(scope="session")
def gpt_unfused() -> OpGraph:
    """One GPT block with explicit attention (scores, softmax, dropout, ·V) and dropout 0.1, fp32 capture."""
    return capture_gpt(fused=False)


@pytest.fixture(scope="session")
def gpt_fused() -> OpGraph:
    """The same block with fused SDPA (no s×s tensor kept)."""
    return capture_gpt(fused=True)


def block(graph: OpGraph) -> Layer:
    """The first transformer block of a captured GPT."""
    return next(layer for layer in graph.layers if layer.module_path == "blocks.0")


def megatron_region_ops(layer: Layer) -> frozenset[str]:
    """Ops inside Megatron's column→row regions: from q/k/v_proj or c_fc up to (not including) c_proj.

    A saved tensor produced by one of these ops is split over the TP ranks; everything else
    (LayerNorm inputs and outputs, residual-branch dropout masks) is replicated.
    """
    inside = False
    names: set[str] = set()
    for op in layer.ops:
        leaf = op.module_path.rsplit(".", 1)[-1]
        if leaf in COLUMN_LINEARS:
            inside = True
        elif leaf in ROW_LINEARS:
            inside = False
        if inside:
            names.add(op.name)
    return frozenset(names)
