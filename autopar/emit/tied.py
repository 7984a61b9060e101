"""Tied parameters across pipeline stages: sum the gradients of every copy, as Megatron does.

``torch.distributed.pipelining`` copies a parameter that several stages read
(an embedding tied to the LM head) into each of them. Each copy then gets only
its own stage's gradient; the true gradient is their sum. After every step each
rank adds the (full) gradients of the copies it holds, the sum is all-reduced
over the pipeline axis (ranks holding no copy add zeros), and each copy gets the
total back in its own placement. The copies start equal and get equal updates,
so they stay one tensor in value, and a checkpoint holds each name once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from autopar.emit.program import TiedGroup


def _copies(parts: Sequence[nn.Module], names: Sequence[str]) -> list[nn.Parameter]:
    """Distinct parameter objects of ``parts`` under any of ``names``."""
    found: dict[int, nn.Parameter] = {}
    wanted = set(names)
    for part in parts:
        for name, param in part.named_parameters(remove_duplicate=False):
            if _plain(name) in wanted:
                found.setdefault(id(param), param)
    return list(found.values())


def _plain(name: str) -> str:
    """A parameter name without wrapper prefixes (activation checkpointing inserts one)."""
    return name.replace("_checkpoint_wrapped_module.", "")


def _full(grad: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return grad.full_tensor() if isinstance(grad, DTensor) else grad


def _like(total: torch.Tensor, param: nn.Parameter) -> torch.Tensor:
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        return distribute_tensor(total, param.device_mesh, param.placements, src_data_rank=None)
    return total


def sum_tied_grads(parts: Sequence[nn.Module], tied: Sequence[TiedGroup], mesh: DeviceMesh) -> int:
    """Give every copy of a tied parameter the sum of all copies' gradients (collective over ``pp``).

    Every rank runs the same groups in the same order. Returns the number of
    groups summed.
    """
    import torch.distributed as dist

    pp = mesh["pp"].size()
    summed = 0
    for group in tied:
        copies = _copies(parts, group.names)
        if pp == 1 and len(copies) <= 1:
            continue
        grads = [_full(p.grad) for p in copies if p.grad is not None]
        total = torch.zeros(group.shape, device=mesh.device_type)
        for g in grads:
            total += g.to(total.dtype)
        if pp > 1:
            dist.all_reduce(total, group=mesh["pp"].get_group())
        for param in copies:
            param.grad = _like(total.to(param.dtype), param)
        summed += 1
    return summed
