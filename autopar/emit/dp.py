"""Data parallelism over the ``dp`` axis, by ZeRO stage, with FSDP2.

=====  ======================================================================
zero   mechanism
=====  ======================================================================
3      ``fully_shard`` per block and on the stage root,
       ``reshard_after_forward=True``: parameters, gradients and optimizer
       state sharded; parameters re-gathered for backward.
2      ``fully_shard`` with ``reshard_after_forward=False``: gradients and
       optimizer state sharded; gathered parameters kept from forward to
       backward.
1      same as 2. FSDP2 has no mode that shards only the optimizer state;
       ZeRO-2 sends the same bytes (reduce-scatter of gradients + all-gather of
       parameters) and holds less, so a ZeRO-1 plan is run as ZeRO-2.
0      ``replicate`` (``torch.distributed._composable.replicate_with_fsdp``)
       per block and on the stage root: FSDP2's machinery with replicated
       parameters, i.e. DDP's all-reduce of gradients, one per block as its
       backward ends (overlapped, as bucketed DDP and the pricing have it).
       It works on gloo and NCCL, accepts tensor-parallel DTensor
       parameters (2-D), and pipelining treats it like FSDP (gradients reduced
       once, after the last micro-batch).
=====  ======================================================================

Mixed precision follows ``plan.dtype``: ``bfloat16`` → parameters cast to bf16
for compute, gradients reduced in fp32 (``MixedPrecisionPolicy``); ``float32``
keeps everything in fp32. For a bf16 plan without data parallelism, FSDP runs
over a one-rank ``dp`` axis only to apply that policy.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

logger = logging.getLogger(__name__)

TRAINING_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
"""``plan.dtype`` → the dtype of parameters during compute."""


def needs_dp_wrapper(dp: int, dtype: str) -> bool:
    """Whether a stage gets FSDP/replicate: data parallel, or mixed precision to apply.

    Example:
        >>> needs_dp_wrapper(1, "float32"), needs_dp_wrapper(2, "float32"), needs_dp_wrapper(1, "bfloat16")
        (False, True, True)
    """
    return dp > 1 or TRAINING_DTYPES[dtype] != torch.float32


def apply_dp(
    stage_module: nn.Module, dp_mesh: DeviceMesh, block_paths: Iterable[str], *, zero_stage: int, dtype: str,
) -> str:
    """Apply FSDP2 (ZeRO 1–3) or FSDP2-based replication (ZeRO 0) to a stage, in place.

    Args:
        stage_module: The stage, after tensor parallelism and activation checkpointing.
        dp_mesh: The one-dimensional ``dp`` sub-mesh.
        block_paths: Module paths of the stage's blocks (each its own FSDP unit).
        zero_stage: ``layout.zero_stage``.
        dtype: ``plan.dtype``.

    Returns:
        A short description of what was applied, for logs.
    """
    from torch.distributed._composable.replicate_with_fsdp import replicate
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    compute_dtype = TRAINING_DTYPES[dtype]
    mp_policy = MixedPrecisionPolicy(
        param_dtype=compute_dtype if compute_dtype != torch.float32 else None,
        reduce_dtype=torch.float32,
    )
    if zero_stage == 0:  # per block, so each block's gradients all-reduce as soon as its backward is done
        for path in block_paths:
            replicate(stage_module.get_submodule(path), mesh=dp_mesh, mp_policy=mp_policy)
        replicate(stage_module, mesh=dp_mesh, mp_policy=mp_policy)
        what = f"replicate (all-reduce) over dp={dp_mesh.size()}"
    else:
        reshard = zero_stage == 3
        for path in block_paths:
            fully_shard(stage_module.get_submodule(path), mesh=dp_mesh, reshard_after_forward=reshard,
                        mp_policy=mp_policy, shard_placement_fn=beside_strided_tp)
        fully_shard(stage_module, mesh=dp_mesh, reshard_after_forward=reshard, mp_policy=mp_policy,
                    shard_placement_fn=beside_strided_tp)
        what = f"fully_shard (ZeRO-{zero_stage}, reshard_after_forward={reshard}) over dp={dp_mesh.size()}"
    logger.info("%s, compute dtype %s", what, dtype)
    return what


def beside_strided_tp(param: nn.Parameter) -> Any:
    """FSDP's dim for a parameter: dim 0 (FSDP's default, None), unless tensor parallelism splits dim 0 strided.

    A fused projection split at its seams over TP (``_StridedShard``: Phi-3's gate/up
    weight, dim 0) cannot be split again on the same dim by FSDP: torch composes the
    two into a layout that trains right but reassembles wrong (``full_tensor``,
    checkpoints). FSDP then splits the first dim TP leaves whole.
    """
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    if not isinstance(param, DTensor) or not any(isinstance(p, _StridedShard) and p.dim == 0
                                                  for p in param.placements):
        return None
    taken = {p.dim for p in param.placements if isinstance(p, (Shard, _StridedShard))}
    free = [d for d in range(param.dim()) if d not in taken]
    return Shard(free[0]) if free else None
