"""A plain multi-layer perceptron: the smallest model worth parallelizing.

``MLP(MLPConfig(...))`` is a ``nn.Sequential`` of (Linear → GELU) blocks and a
final Linear, so its layers are ``0``, ``1``, … in module paths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True, slots=True, kw_only=True)
class MLPConfig:
    """Sizes of the perceptron."""

    in_features: int = 1024
    """Input width."""
    hidden: int = 4096
    """Hidden width of every block."""
    out_features: int = 1024
    """Output width."""
    n_layer: int = 4
    """Hidden blocks."""

    def __post_init__(self) -> None:
        for name in ("in_features", "hidden", "out_features", "n_layer"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


class Block(nn.Module):
    """Linear followed by GELU."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))


class MLP(nn.Sequential):
    """``n_layer`` blocks of width ``hidden`` and an output projection."""

    def __init__(self, config: MLPConfig) -> None:
        widths = [config.in_features] + [config.hidden] * config.n_layer
        blocks: list[nn.Module] = [Block(a, b) for a, b in zip(widths[:-1], widths[1:])]
        super().__init__(*blocks, nn.Linear(config.hidden, config.out_features))
        self.config = config


MLP_SIZES: dict[str, MLPConfig] = {
    "tiny": MLPConfig(in_features=32, hidden=64, out_features=32, n_layer=2),
    "small": MLPConfig(),
    "large": MLPConfig(in_features=8192, hidden=32768, out_features=8192, n_layer=8),
}
"""Named sizes for ``autopar plan mlp:SIZE``."""


def build_mlp(size: str = "small") -> MLP:
    """Factory: an MLP of a named size."""
    if size not in MLP_SIZES:
        raise ValueError(f"unknown MLP size {size!r}; choose one of {', '.join(MLP_SIZES)}")
    return MLP(MLP_SIZES[size])


def example_inputs(config: MLPConfig, batch_size: int = 8) -> tuple[torch.Tensor]:
    """A random batch of shape (batch_size, in_features)."""
    return (torch.randn(batch_size, config.in_features),)
