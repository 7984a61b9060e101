"""Gradients brought to their parameters' placements once per step, after backward.

Under tensor parallelism a replicated parameter read by sharded work (a norm on a
sequence shard, a bias, an embedding) can get a ``Partial`` or sharded gradient.
Left so, every foreach optimizer kernel that reads it would redistribute it again
(AdamW reads a gradient several times a step). ``reduce_grads`` moves each such
gradient to its parameter's placement once, after the whole backward (all
micro-batches accumulated), and all-reduces the ``Partial`` → ``Replicate`` ones
of a mesh together, in one collective, as Megatron-LM all-reduces its
sequence-parallel norms' gradients (``finalize_model_grads``, coalesced).

Gradients FSDP2 reduces (ZeRO 0-3) are already in their parameter's placement
(FSDP2 redistributes the tp part itself before reducing over dp): they are left
alone, so ZeRO layouts are untouched.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def reduce_grads(parts: Sequence[nn.Module]) -> int:
    """Give every DTensor gradient its parameter's placement; return how many gradients moved.

    Every rank runs this with the same parameters in the same order, so the
    collectives match across the group.
    """
    from torch.distributed.tensor import DTensor

    summed: dict[tuple[Any, torch.dtype], list[nn.Parameter]] = defaultdict(list)
    moved = 0
    with torch.no_grad():
        for param in _distinct_params(parts):
            grad = param.grad
            if not isinstance(param, DTensor) or not isinstance(grad, DTensor) or grad.placements == param.placements:
                continue
            moved += 1
            if _is_sum_to_replicate(grad, param):
                summed[(param.device_mesh, grad.dtype)].append(param)
            else:
                param.grad = grad.redistribute(param.device_mesh, param.placements)
        for (mesh, _), params in summed.items():
            _all_reduce_together(mesh, params)
    return moved


def _distinct_params(parts: Sequence[nn.Module]) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for part in parts:
        for param in part.parameters():
            seen.setdefault(id(param), param)
    return list(seen.values())


def _is_sum_to_replicate(grad: Any, param: Any) -> bool:
    """A one-axis mesh, a summed partial gradient, a replicated parameter: one all-reduce."""
    from torch.distributed.tensor import Partial, Replicate

    if param.device_mesh.ndim != 1 or grad.device_mesh != param.device_mesh:
        return False
    (g,), (p,) = grad.placements, param.placements
    return isinstance(g, Partial) and g.reduce_op == "sum" and isinstance(p, Replicate)


def _all_reduce_together(mesh: Any, params: Sequence[nn.Parameter]) -> None:
    """Sum the partial gradients of ``params`` over ``mesh`` in one all-reduce of their flattened local values."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate

    grads = [p.grad for p in params]
    flat = torch.cat([g.to_local().reshape(-1) for g in grads])  # type: ignore[union-attr]
    dist.all_reduce(flat, group=mesh.get_group())
    for param, grad, piece in zip(params, grads, flat.split([g.numel() for g in grads]), strict=True):
        param.grad = DTensor.from_local(piece.view(grad.shape), mesh, [Replicate()], run_check=False,
                                        shape=grad.shape, stride=piece.view(grad.shape).stride())
