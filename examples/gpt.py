"""A clean GPT decoder in the style of nanoGPT, autopar's default model.

Differences from nanoGPT that matter for parallelism:
- separate q/k/v projections (as torchtitan's Llama), so a column split of each is
  a split over attention heads;
- reshapes use ``-1`` for the head count, so the same code runs on a TP shard that
  holds ``n_head / tp`` heads;
- ``fused_attention=False`` spells attention out (scores, softmax, dropout, ·V),
  which is what Korthikanti et al. count in their activation formulas.

Sizes follow GPT-3's Table 2.1 (Brown et al. 2020): ``GPTConfig.from_name("175b")``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True, slots=True, kw_only=True)
class GPTConfig:
    """Hyper-parameters of the decoder."""

    block_size: int = 1024
    """Maximum (and default) sequence length."""
    vocab_size: int = 51200
    """Vocabulary size (GPT-2's 50257 padded to a multiple of 1024, as Megatron-LM does)."""
    n_layer: int = 12
    """Transformer blocks."""
    n_head: int = 12
    """Attention heads."""
    n_embd: int = 768
    """Hidden size h."""
    dropout: float = 0.0
    """Dropout probability (attention probabilities, residual branches, embeddings)."""
    bias: bool = True
    """Biases in linears and layer norms."""
    fused_attention: bool = True
    """Use ``scaled_dot_product_attention`` (no s×s tensor kept) instead of explicit attention."""
    tie_weights: bool = False
    """Share the token embedding with the output head."""

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @classmethod
    def from_name(cls, name: str, **overrides: object) -> GPTConfig:
        """A named size: ``tiny``, ``small``/``125m`` … ``175b`` (GPT-3 Table 2.1), or Megatron's ``22b``/``39b``."""
        key = name.lower()
        if key not in GPT_SIZES:
            raise ValueError(f"unknown GPT size {name!r}; choose one of {', '.join(GPT_SIZES)}")
        n_layer, n_embd, n_head = GPT_SIZES[key]
        base = cls(n_layer=n_layer, n_embd=n_embd, n_head=n_head)
        if key == "tiny":
            base = replace(base, vocab_size=512, block_size=64)
        return replace(base, **overrides)  # type: ignore[arg-type]


GPT_SIZES: dict[str, tuple[int, int, int]] = {
    # name: (n_layer, n_embd, n_head)
    "tiny": (2, 64, 4),
    "small": (12, 768, 12),
    "125m": (12, 768, 12),
    "350m": (24, 1024, 16),
    "760m": (24, 1536, 16),
    "1.3b": (24, 2048, 32),  # GPT-3 XL uses 24 heads of 128; 32 heads of 64 keeps 2048 = 32 × 64
    "2.7b": (32, 2560, 32),
    "6.7b": (32, 4096, 32),
    "13b": (40, 5120, 40),  # the paper lists d_model 5140, not divisible by 40 heads of 128; the model used 5120
    "15b": (48, 5120, 40),  # Alpa's 15B
    "22b": (48, 6144, 64),  # Korthikanti et al.'s 22B
    "39b": (48, 8192, 64),  # Alpa's 39B
    "175b": (96, 12288, 96),
}
"""GPT-3 Table 2.1 sizes plus the Megatron/Alpa benchmark sizes."""


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate q/k/v projections."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.head_dim = config.n_embd // config.n_head
        self.q_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.k_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.v_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout
        self.fused = config.fused_attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape  # batch, sequence
        # (B, T, C) -> (B, nh, T, hs); -1 heads so a TP shard with n_head/tp heads works too
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        if self.fused:
            p = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))  # (B, nh, T, T)
            # additive mask: its backward needs nothing saved (masked_fill would keep a T×T mask)
            causal = torch.full((T, T), float("-inf"), device=x.device, dtype=att.dtype).triu(1)
            att = att + causal
            att = self.attn_dropout(F.softmax(att, dim=-1))
            y = att @ v  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, C) — C/tp on a TP shard
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Two-layer feed-forward block with GELU, 4× expansion."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Decoder-only transformer language model; ``forward(idx) -> logits`` of shape (B, T, V).

    Top-level children are laid out for pipelining: ``tok_emb``, ``pos_emb``, ``drop``,
    ``blocks`` (a ModuleList), ``ln_f``, ``lm_head``. A pipeline stage that drops the
    embeddings (set to None) takes hidden states instead of token ids, and one that
    drops ``ln_f``/``lm_head`` returns hidden states.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb: nn.Embedding | None = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb: nn.Embedding | None = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f: nn.LayerNorm | None = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head: nn.Linear | None = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.tok_emb.weight
        self.init_weights()

    def init_weights(self) -> None:
        """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2·n_layer)."""
        for name, p in self.named_parameters():
            if p.device.type == "meta":
                continue
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))
            elif p.dim() >= 2:
                nn.init.normal_(p, mean=0.0, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:  # layer-norm weights
                nn.init.ones_(p)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if self.tok_emb is not None:
            T = idx.shape[1]
            pos = torch.arange(T, device=idx.device)
            x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, C)
        else:
            x = idx  # a later pipeline stage receives hidden states
        for block in self.blocks:
            x = block(x)
        if self.lm_head is None:
            return x
        return self.lm_head(self.ln_f(x))  # (B, T, V)


def build_gpt(size: str = "small", **overrides: object) -> GPT:
    """Factory used by ``autopar plan gpt:SIZE``: a GPT of a named size (on the current default device)."""
    return GPT(GPTConfig.from_name(size, **overrides))


def example_inputs(config: GPTConfig, batch_size: int = 1, seq_len: int | None = None,
                   device: str | torch.device = "cpu") -> tuple[torch.Tensor]:
    """Token ids of shape (batch_size, seq_len) for capture or training."""
    T = seq_len or config.block_size
    return (torch.randint(0, config.vocab_size, (batch_size, T), device=device),)
