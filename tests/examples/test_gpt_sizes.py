"""Every named GPT size builds, and its parameter count matches the name (GPT-3 Table 2.1)."""

from __future__ import annotations

import pytest
import torch

from autopar.examples.gpt import GPT, GPT_SIZES, GPTConfig

NOMINAL = {"125m": 125e6, "350m": 350e6, "760m": 760e6, "1.3b": 1.3e9, "2.7b": 2.7e9, "6.7b": 6.7e9,
           "13b": 13e9, "15b": 15e9, "22b": 22e9, "39b": 39e9, "175b": 175e9}


@pytest.mark.parametrize("name", sorted(GPT_SIZES))
def test_named_size_builds(name):
    cfg = GPTConfig.from_name(name)
    with torch.device("meta"):
        model = GPT(cfg)
    blocks = sum(p.numel() for p in model.blocks.parameters())
    # 12·l·h² plus biases and norms (13·h per block: relatively large only for the tiny test size)
    assert blocks == pytest.approx(12 * cfg.n_layer * cfg.n_embd**2 + 13 * cfg.n_layer * cfg.n_embd, rel=1e-6)
    if name in NOMINAL:
        # the names count the blocks and the tied embedding (GPT-3 ties input and output embeddings)
        counted = blocks + cfg.vocab_size * cfg.n_embd
        assert counted == pytest.approx(NOMINAL[name], rel=0.12)


def test_unknown_size_names_the_choices():
    with pytest.raises(ValueError, match="choose one of"):
        GPTConfig.from_name("7t")
