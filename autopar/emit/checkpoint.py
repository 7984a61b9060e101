"""Checkpoints that move between plans, through ``torch.distributed.checkpoint`` (DCP).

Model and optimizer state are keyed by the original model's parameter names
(``blocks.3.attn.q_proj.weight``), whatever the plan: stages keep the original
paths, and ``get_model_state_dict``/``get_optimizer_state_dict`` strip FSDP and
checkpoint-wrapper prefixes. Optimizer state is flattened per parameter
(``flatten_optimizer_state_dict``), so a checkpoint saved under one split
(e.g. TP2 × PP2) loads under another (e.g. DP4): DCP reshards each DTensor.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from autopar.errors import UserInputError

if TYPE_CHECKING:
    from autopar.emit.runtime import ParallelModel

logger = logging.getLogger(__name__)


def _options(*, full: bool = False, strict: bool = True) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full, strict=strict, flatten_optimizer_state_dict=True)


def model_state_dict(parts: Sequence[nn.Module]) -> dict[str, Any]:
    """Sharded state of all local parts, merged (their names are disjoint)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    merged: dict[str, Any] = {}
    for part in parts:
        merged.update(get_model_state_dict(part, options=_options()))
    return merged


def load_model_state_dict(parts: Sequence[nn.Module], state_dict: dict[str, Any], *, strict: bool) -> None:
    """Load sharded (DTensor) or full (plain tensor) state into the local parts.

    Raises:
        UserInputError: ``strict`` and some local parameter has no entry.
    """
    from torch.distributed.checkpoint.state_dict import set_model_state_dict
    from torch.distributed.tensor import DTensor

    full = not any(isinstance(v, DTensor) for v in state_dict.values())
    for part in parts:
        wanted = model_state_dict([part]).keys()
        missing = [k for k in wanted if k not in state_dict]
        if strict and missing:
            raise UserInputError(f"state dict lacks {len(missing)} parameter(s) of this rank, e.g. {missing[:3]}")
        subset = {k: state_dict[k] for k in wanted if k in state_dict}
        set_model_state_dict(part, subset, options=_options(full=full, strict=False))


def _pairs(pm: ParallelModel, optimizer: torch.optim.Optimizer) -> list[tuple[nn.Module, torch.optim.Optimizer]]:
    from autopar.emit.runtime import PartsOptimizer

    if isinstance(optimizer, PartsOptimizer):
        return list(zip(pm.parts, optimizer.optimizers, strict=True))
    if len(pm.parts) != 1:
        raise UserInputError(
            f"this rank holds {len(pm.parts)} model parts; build the optimizer with pm.optimizer(...) "
            f"so each part's state can be checkpointed by name"
        )
    return [(pm.parts[0], optimizer)]


def optimizer_state_dict(pm: ParallelModel, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Flattened optimizer state of all local parts, keyed by parameter name."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    merged: dict[str, Any] = {}
    for part, opt in _pairs(pm, optimizer):
        merged.update(get_optimizer_state_dict(part, opt, options=_options()))
    return merged


def load_optimizer_state_dict(pm: ParallelModel, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load flattened optimizer state into each part's optimizer."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    for part, opt in _pairs(pm, optimizer):
        set_optimizer_state_dict(part, opt, dict(state), options=_options(strict=False))


def save_checkpoint(pm: ParallelModel, path: str | Path, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Write model (and optimizer) state of every rank to the directory ``path`` (collective)."""
    import torch.distributed.checkpoint as dcp

    state: dict[str, Any] = {"model": pm.state_dict()}
    if optimizer is not None:
        state["optim"] = optimizer_state_dict(pm, optimizer)
    dcp.save(state, checkpoint_id=str(path))
    logger.info("saved checkpoint to %s (%d model entries on this rank)", path, len(state["model"]))


def load_checkpoint(pm: ParallelModel, path: str | Path, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Read state saved by ``save_checkpoint`` under any plan into ``pm`` (collective).

    Raises:
        UserInputError: ``path`` is not a checkpoint directory.
    """
    import torch.distributed.checkpoint as dcp

    if not Path(path, ".metadata").is_file():
        raise UserInputError(f"{path} is not a torch.distributed.checkpoint directory (no .metadata file)")
    state: dict[str, Any] = {"model": pm.state_dict()}
    if optimizer is not None:
        state["optim"] = optimizer_state_dict(pm, optimizer)
    dcp.load(state, checkpoint_id=str(path))
    pm.load_state_dict(state["model"])
    if optimizer is not None:
        load_optimizer_state_dict(pm, optimizer, state["optim"])
    logger.info("loaded checkpoint from %s", path)
