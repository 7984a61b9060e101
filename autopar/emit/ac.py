"""Activation checkpointing of the blocks a stage recomputes (``StagePlan.recompute``).

- ``full``: each block is wrapped in ``checkpoint_wrapper``; backward re-runs the
  whole block from its input (Korthikanti et al.'s full recompute).
- ``selective``: each block is wrapped with torch's selective-checkpoint policy,
  as torchtitan's op-level SAC does: matmul outputs (the linears), fused
  attention outputs and reduce-scatters are saved; everything else (the s×s
  attention core of explicit attention, softmax, dropout, norms, activations)
  is recomputed.

Applied after tensor parallelism (the wrapped block already holds DTensors, so
recomputation re-runs its TP collectives) and before FSDP (which then shards the
wrapped blocks), the order torchtitan uses.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from autopar.plan import Recompute

logger = logging.getLogger(__name__)


def _save_list() -> frozenset[Any]:
    aten = torch.ops.aten
    ops = [
        aten.mm.default,
        aten.addmm.default,
        aten._scaled_dot_product_efficient_attention.default,
        aten._scaled_dot_product_flash_attention.default,
        aten._scaled_dot_product_flash_attention_for_cpu.default,
        aten._scaled_dot_product_cudnn_attention.default,
        torch.ops._c10d_functional.reduce_scatter_tensor.default,
    ]
    return frozenset(ops)


def selective_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    """Selective-checkpoint policy: save linear and fused-attention outputs, recompute the rest."""
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in _save_list() else CheckpointPolicy.PREFER_RECOMPUTE


def _wrapper(recompute: Recompute) -> functools.partial[nn.Module] | None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    match recompute:
        case Recompute.NONE:
            return None
        case Recompute.FULL:
            return functools.partial(checkpoint_wrapper, preserve_rng_state=True)
        case Recompute.SELECTIVE:
            context_fn = functools.partial(create_selective_checkpoint_contexts, selective_policy)
            return functools.partial(checkpoint_wrapper, context_fn=context_fn, preserve_rng_state=True)
        case _:
            raise ValueError(f"unknown recompute policy {recompute!r}")


def apply_ac(stage_module: nn.Module, block_paths: Iterable[str], recompute: Recompute) -> int:
    """Wrap each block at ``block_paths`` for recomputation (in place, names kept).

    Args:
        stage_module: The stage, after tensor parallelism.
        block_paths: Module paths of the stage's blocks.
        recompute: The stage's policy.

    Returns:
        The number of blocks wrapped.
    """
    wrap = _wrapper(recompute)
    if wrap is None:
        return 0
    count = 0
    for path in block_paths:
        parent_path, _, name = path.rpartition(".")
        parent = stage_module.get_submodule(parent_path)
        parent.register_module(name, wrap(parent.get_submodule(name)))
        count += 1
    logger.info("activation checkpointing (%s) on %d blocks", recompute.value, count)
    return count
