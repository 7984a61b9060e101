"""Tensor (and sequence) parallelism: the plan's module styles as a ``parallelize_module`` plan.

The plan says, per layer kind, which modules are split column-wise, row-wise or
kept whole (``ShardingPlan.modules``, paths relative to the layer). This file
turns that into torch's ``ParallelStyle`` objects, choosing input/output layouts
by where the module runs (after torchtitan's ``apply_tp``):

=========  ============================  ===========================================
region     without sequence parallelism  with sequence parallelism (residual stream
                                         sharded on the sequence dim, ``Shard(1)``)
=========  ============================  ===========================================
block      colwise: Replicate → Shard(-1) norms: ``SequenceParallel``; the parent of
           rowwise: Shard(-1) → Replicate colwise modules all-gathers its input
                                         (``PrepareModuleInput``); rowwise
                                         reduce-scatters to ``Shard(1)``
pre        colwise/rowwise with          outputs ``Shard(seq dim)`` (replicated
(embeds)   Replicate input and output    embeddings are sliced locally)
post       colwise/rowwise with          norms: ``SequenceParallel``; the head
(head)     Replicate input and output    gathers ``Shard(1)`` input; output Replicate
=========  ============================  ===========================================

The head's output is always replicated, so the loss sees full logits.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from torch import nn

from autopar.emit.adapters import ModelAdapter
from autopar.errors import PlanValidationError
from autopar.plan import StagePlan, TPStyle

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor.parallel import ParallelStyle

logger = logging.getLogger(__name__)

_NORM_SUFFIXES = ("LayerNorm", "RMSNorm")
"""Class-name endings that mark normalisation layers (torch's and Hugging Face's)."""


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` normalises over the hidden dim (LayerNorm, RMSNorm and look-alikes).

    Example:
        >>> is_norm(nn.LayerNorm(8)), is_norm(nn.Linear(8, 8))
        (True, False)
    """
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith(_NORM_SUFFIXES)


def _join(root: str, rel: str) -> str:
    return ".".join(p for p in (root, rel) if p)


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def resolve_styles(stage_module: nn.Module, stage: StagePlan) -> dict[str, TPStyle]:
    """Absolute module path → style for every module the stage's sharding plans name.

    A ``ShardingPlan`` applies to a layer of the stage when all of its relative
    paths exist under the layer's module (a layer whose path is not a module, such
    as a synthetic embedding layer, is rooted at the model itself). This applies a
    plan to every repeated layer of its kind.

    Raises:
        PlanValidationError: Two plans give one module different styles.
    """
    styles: dict[str, TPStyle] = {}
    for layer_path in stage.module_paths:
        root = layer_path if _has(stage_module, layer_path) else ""
        for sharding in stage.sharding:
            targets = {_join(root, rel): style for rel, style in sharding.modules.items()}
            if not targets or not all(_has(stage_module, t) for t in targets):
                continue
            for path, style in targets.items():
                if styles.setdefault(path, style) is not style:
                    raise PlanValidationError(
                        f"stage {stage.index}: module {path!r} is {styles[path].value} in one sharding "
                        f"plan and {style.value} in {sharding.layer_kind!r}"
                    )
    return styles


def validate_divisible(stage_module: nn.Module, styles: Mapping[str, TPStyle], tp: int) -> None:
    """Raise ``PlanValidationError`` if a split dimension is not divisible by ``tp``."""
    for path, style in styles.items():
        module = stage_module.get_submodule(path)
        if style is TPStyle.REPLICATE:
            continue
        if isinstance(module, nn.Linear):
            dim = module.out_features if style is TPStyle.COLWISE else module.in_features
        elif isinstance(module, nn.Embedding):
            dim = module.embedding_dim if style is TPStyle.COLWISE else module.num_embeddings
        else:
            raise PlanValidationError(
                f"module {path!r} ({type(module).__name__}) is {style.value} but only Linear and "
                f"Embedding modules can be split"
            )
        if dim % tp:
            raise PlanValidationError(f"module {path!r}: dimension {dim} split {style.value} is not divisible by tp={tp}")


def build_tp_plan(
    stage_module: nn.Module, styles: Mapping[str, TPStyle], adapter: ModelAdapter, *, sequence_parallel: bool
) -> dict[str, ParallelStyle]:
    """The ``parallelize_module`` plan (absolute path → ``ParallelStyle``) for one stage module."""
    plan: dict[str, ParallelStyle] = {}
    for path, style in styles.items():
        region = adapter.region(stage_module, path)
        parallel = _style(region, style, sequence_parallel, adapter.output_sequence_dim(path))
        if parallel is not None:
            plan[path] = parallel
    if sequence_parallel:
        plan.update(_sequence_parallel_extras(stage_module, styles, adapter))
    return plan


def _style(region: str, style: TPStyle, sp: bool, seq_dim: int) -> ParallelStyle | None:
    """The style of one colwise/rowwise module; replicated modules get None (see ``_sequence_parallel_extras``)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    match region, style:
        case _, TPStyle.REPLICATE:
            return None
        case "block", TPStyle.COLWISE:
            return ColwiseParallel()
        case "block", TPStyle.ROWWISE:
            return RowwiseParallel(output_layouts=Shard(1) if sp else Replicate())
        case "pre", TPStyle.COLWISE:
            return ColwiseParallel(input_layouts=Replicate(), output_layouts=Shard(seq_dim) if sp else Replicate())
        case "pre", TPStyle.ROWWISE:
            return RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(seq_dim) if sp else Replicate())
        case "post", TPStyle.COLWISE:
            return ColwiseParallel(input_layouts=Shard(1) if sp else Replicate(), output_layouts=Replicate())
        case "post", TPStyle.ROWWISE:
            return RowwiseParallel(input_layouts=Shard(1) if sp else Replicate(), output_layouts=Replicate())
        case _:
            raise ValueError(f"no tensor-parallel rule for region {region!r}, style {style!r}")


def _sequence_parallel_extras(
    stage_module: nn.Module, styles: Mapping[str, TPStyle], adapter: ModelAdapter
) -> dict[str, ParallelStyle]:
    """Norms, input gathers and sequence slicing that sequence parallelism adds around the split modules."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        PrepareModuleOutput,
        SequenceParallel,
    )

    gather = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True)
    extras: dict[str, ParallelStyle] = {}
    blocks = set(adapter.block_paths(stage_module))
    for path, module in stage_module.named_modules():
        split = styles.get(path, TPStyle.REPLICATE) is not TPStyle.REPLICATE
        has_params = any(True for _ in module.parameters(recurse=False))
        if not path or split or not (has_params or is_norm(module)):
            continue
        region = adapter.region(stage_module, path)
        if region in ("block", "post") and is_norm(module):
            extras[path] = SequenceParallel()
        elif region == "pre":  # a replicated embedding: slice its output along the sequence locally
            seq = Shard(adapter.output_sequence_dim(path))
            extras[path] = PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=seq)
        elif region == "post":  # a replicated head: gather the sequence first
            extras[path] = gather
    for path in _colwise_parents(styles, blocks):
        parent = stage_module.get_submodule(path)
        _check_no_norm_inside(parent, path)
        kwarg = adapter.hidden_kwarg(parent)
        extras[path] = gather if kwarg is None else PrepareModuleInput(
            input_kwarg_layouts={kwarg: Shard(1)}, desired_input_kwarg_layouts={kwarg: Replicate()},
            use_local_output=True,
        )
    for path, style in styles.items():  # colwise modules that read the residual stream directly
        if style is TPStyle.COLWISE and path.rpartition(".")[0] in blocks:
            extras[path] = ColwiseParallel(input_layouts=Shard(1))
    return extras


def _colwise_parents(styles: Mapping[str, TPStyle], blocks: set[str]) -> list[str]:
    parents = {path.rpartition(".")[0] for path, style in styles.items() if style is TPStyle.COLWISE}
    inside = [p for p in parents if p not in blocks and any(p.startswith(b + ".") for b in blocks)]
    return sorted(inside)


def _check_no_norm_inside(parent: nn.Module, path: str) -> None:
    for name, module in parent.named_modules():
        if name and is_norm(module):
            raise PlanValidationError(
                f"sequence parallelism gathers the input of {path!r}, but it contains the norm {name!r}; "
                f"only pre-norm blocks whose norms sit beside attention/MLP are supported"
            )


def apply_tp(
    stage_module: nn.Module, tp_mesh: DeviceMesh, stage: StagePlan, adapter: ModelAdapter, *,
    sequence_parallel: bool,
) -> dict[str, TPStyle]:
    """Split the stage's modules over the ``tp`` axis as the plan says (in place).

    Args:
        stage_module: This rank's stage (before activation checkpointing and FSDP).
        tp_mesh: The one-dimensional ``tp`` sub-mesh.
        stage: The plan's stage (its ``sharding`` and ``module_paths``).
        adapter: The model family.
        sequence_parallel: ``layout.sequence_parallel``.

    Returns:
        The resolved absolute path → style map (for logging and tests).
    """
    from torch.distributed.tensor.parallel import parallelize_module

    styles = resolve_styles(stage_module, stage)
    validate_divisible(stage_module, styles, tp_mesh.size())
    plan = build_tp_plan(stage_module, styles, adapter, sequence_parallel=sequence_parallel)
    if plan:
        parallelize_module(stage_module, tp_mesh, plan)
    counts = {style.value: sum(s is style for s in styles.values()) for style in TPStyle}
    logger.info("stage %d: tensor parallel over %d ranks, modules per style %s%s", stage.index, tp_mesh.size(),
                counts, " with sequence parallelism" if sequence_parallel else "")
    logger.debug("stage %d styles: %s", stage.index, {p: s.value for p, s in styles.items()})
    return styles
