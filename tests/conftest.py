"""Shared fixtures: tiny models built from config, never downloaded."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def tiny_gpt_graph():
    """An OpGraph of a 2-block GPT (fx path)."""
    import autopar
    from autopar.examples.gpt import GPT, GPTConfig

    cfg = GPTConfig(n_layer=2, n_embd=64, n_head=4, vocab_size=128, block_size=16)
    with torch.device("meta"):
        model = GPT(cfg)
    return autopar.capture(model, (torch.zeros(2, 16, dtype=torch.long),))
