"""Checkpoints that move between plans, through ``torch.distributed.checkpoint`` (DCP).

Model and optimizer state are keyed by the original model's parameter names
(``blocks.3.attn.q_proj.weight``), whatever the plan: stages keep the original
paths, and ``get_model_state_dict``/``get_optimizer_state_dict`` strip FSDP and
checkpoint-wrapper prefixes. Optimizer state is flattened per parameter
(``flatten_optimizer_state_dict``), so a checkpoint saved under one split
(e.g. TP2 × PP2) loads under another (e.g. DP4): DCP reshards each DTensor.

A checkpoint also holds what a resumed run needs to continue exactly: the caller's
run position (step, samples consumed, global batch), the learning-rate scheduler,
named generators (the data sampler's) and every rank's RNG states. It is published
by a rename and verifies itself on load (``autopar.emit.manifest``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from autopar.errors import CheckpointError, UserInputError

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


def save_checkpoint(
    pm: ParallelModel, path: str | Path, optimizer: torch.optim.Optimizer | None = None, *,
    scheduler: Any = None, train_state: Mapping[str, Any] | None = None,
    generators: Mapping[str, torch.Generator] | None = None,
) -> Path:
    """Write model, optimizer and run state of every rank to the directory ``path`` (collective).

    Written into ``path.partial`` and renamed when complete, with a manifest holding every
    file's checksum (``autopar.emit.manifest``): a job killed mid-save leaves the previous
    checkpoint, never half of one.

    Args:
        pm: This rank's model.
        path: Checkpoint directory (replaced if it exists).
        optimizer: Its optimizer state is saved too (flattened, by parameter name).
        scheduler: A learning-rate scheduler whose ``state_dict()`` is saved.
        train_state: JSON-able run position (step, samples consumed, global batch, ...),
            returned by ``load_checkpoint`` and readable with ``read_train_state``.
        generators: Named ``torch.Generator``s (e.g. the data sampler's) saved from rank 0.

    Returns:
        The published checkpoint directory.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from autopar.emit.manifest import Manifest, data_files, file_record, prepare_staging, publish, staging_dir

    final, rank, world = Path(path), dist.get_rank(), dist.get_world_size()
    staging = prepare_staging(final) if rank == 0 else staging_dir(final)
    dist.barrier()  # the staging directory exists before any rank writes into it
    state: dict[str, Any] = {"model": pm.state_dict()}
    if optimizer is not None:
        state["optim"] = optimizer_state_dict(pm, optimizer)
    dcp.save(unstrided(state), checkpoint_id=str(staging))
    extras = _run_state(scheduler, generators, world)
    if rank == 0:
        _write_run_state(staging / RUN_STATE_NAME, extras)
    dist.barrier()  # every file is on disk before any is hashed
    names = _broadcast(data_files(staging) if rank == 0 else None)
    shares: list[Any] = [None] * world
    dist.all_gather_object(shares, {n: file_record(staging / n) for n in names[rank::world]})  # hash in parallel
    if rank == 0:
        records = {name: record for share in shares for name, record in share.items()}
        publish(staging, Manifest(files=records, world_size=world, layout=pm.plan.layout.describe(),
                                  train_state=dict(train_state or {})), final)
    dist.barrier()  # published before any rank returns
    logger.info("saved checkpoint to %s (%d model entries on this rank)", final, len(state["model"]))
    return final


def load_checkpoint(
    pm: ParallelModel, path: str | Path, optimizer: torch.optim.Optimizer | None = None, *,
    scheduler: Any = None, generators: Mapping[str, torch.Generator] | None = None,
) -> dict[str, Any]:
    """Verify, then read state saved by ``save_checkpoint`` under any plan into ``pm`` (collective).

    Every file's checksum is checked first (the ranks share the work and agree on the
    verdict), so a corrupt, truncated or missing shard is refused on every rank alike
    before ``torch.distributed.checkpoint`` reads it. RNG states are restored when the
    world size is the one that saved them.

    Returns:
        The ``train_state`` given to ``save_checkpoint``.

    Raises:
        CheckpointError: ``path`` is not a finished checkpoint, a file is missing, truncated
            or corrupt (the message names it), or its state does not fit this model.
    """
    import torch.distributed as dist

    from autopar.emit.manifest import read_manifest

    directory = Path(path)
    problem = _agreed(_first_problem(directory, dist.get_rank(), dist.get_world_size()))
    if problem is not None:
        raise CheckpointError(problem)
    manifest = read_manifest(directory)
    _read_into(pm, directory, optimizer)
    _restore_run_state(directory / RUN_STATE_NAME, scheduler, generators, manifest.world_size)
    logger.info("loaded checkpoint from %s (saved under %s)", directory, manifest.layout)
    return dict(manifest.train_state)


def read_train_state(path: str | Path) -> dict[str, Any]:
    """The ``train_state`` of a finished checkpoint, without loading it (no process group needed).

    Raises:
        CheckpointError: ``path`` is not a finished checkpoint.
    """
    from autopar.emit.manifest import read_manifest

    return dict(read_manifest(path).train_state)


# ---- helpers ----------------------------------------------------------------------------------

RUN_STATE_NAME = "autopar_run_state.pt"
"""File (tensors and plain values only: loads with ``weights_only=True``) holding RNG, scheduler and generators."""


def _read_into(pm: ParallelModel, directory: Path, optimizer: torch.optim.Optimizer | None) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    state: dict[str, Any] = {"model": pm.state_dict()}
    if optimizer is not None:
        state["optim"] = optimizer_state_dict(pm, optimizer)
    readable = unstrided(state)
    try:
        dcp.load(readable, checkpoint_id=str(directory))
    except (CheckpointException, RuntimeError, ValueError, KeyError, OSError) as e:  # verified files: a mismatch
        raise CheckpointError(f"checkpoint {str(directory)!r} does not fit this model or optimizer: "
                              f"{_short(e)}") from None
    state = restrided(readable, state)
    pm.load_state_dict(state["model"])
    if optimizer is not None:
        load_optimizer_state_dict(pm, optimizer, state["optim"])


def unstrided(state: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """``state`` with every strided-sharded DTensor replicated over its strided mesh axes.

    DCP stores each rank's shard as one box of the global tensor, and a strided shard
    (a fused projection's gate and up halves, each split over TP) is several boxes:
    DCP would record them as one and overlap them. Replicated over those axes, the
    tensor is stored once, whole, and loads under any other plan.
    """
    from torch.distributed.tensor import DTensor, Replicate
    from torch.distributed.tensor.placement_types import _StridedShard

    def plain(v: Any) -> Any:
        if not isinstance(v, DTensor) or not any(isinstance(p, _StridedShard) for p in v.placements):
            return v
        return v.redistribute(placements=[Replicate() if isinstance(p, _StridedShard) else p for p in v.placements])

    return {group: {k: plain(v) for k, v in values.items()} for group, values in state.items()}


def restrided(loaded: Mapping[str, Mapping[str, Any]], like: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``loaded`` (read through ``unstrided``) with each tensor back in the placements of ``like``."""
    from torch.distributed.tensor import DTensor

    def back(v: Any, want: Any) -> Any:
        if isinstance(v, DTensor) and isinstance(want, DTensor) and v.placements != want.placements:
            return v.redistribute(placements=want.placements)
        return v

    return {group: {k: back(v, like[group][k]) for k, v in values.items()} for group, values in loaded.items()}


def _first_problem(directory: Path, rank: int, world: int) -> str | None:
    """This rank's share of the verification: the manifest, then every ``world``-th file from ``rank``."""
    from autopar.emit.manifest import read_manifest, verify_files

    try:
        manifest = read_manifest(directory)
    except CheckpointError as e:
        return str(e)
    return verify_files(directory, manifest, sorted(manifest.files)[rank::world])


def _agreed(problem: str | None) -> str | None:
    """The lowest rank's problem, the same on every rank (so all raise, and only rank 0 need say it)."""
    import torch.distributed as dist

    problems: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    return next((p for p in problems if p is not None), None)


def _broadcast(value: Any) -> Any:
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _run_state(scheduler: Any, generators: Mapping[str, torch.Generator] | None, world: int) -> dict[str, Any]:
    """RNG states of every rank (gathered), plus the scheduler's and generators' states (this rank's)."""
    import random

    import torch.distributed as dist

    mine = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "python_version": random.getstate()[0], "python_gauss": random.getstate()[2],
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None}
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, mine)
    return {"world_size": world, "rng": everyone,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "generators": {name: g.get_state() for name, g in (generators or {}).items()}}


def _write_run_state(path: Path, state: dict[str, Any]) -> None:
    import io

    from autopar._io import write_atomic

    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomic(path, buffer.getvalue())


def _restore_run_state(path: Path, scheduler: Any, generators: Mapping[str, torch.Generator] | None,
                       saved_world: int) -> None:
    import random

    import torch.distributed as dist

    try:
        state = torch.load(path, weights_only=True)
    except Exception as e:  # verified bytes, yet unreadable: written by something else
        raise CheckpointError(f"checkpoint file {str(path)!r} cannot be read: {_short(e)}") from None
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    for name, generator in (generators or {}).items():
        if name not in state["generators"]:
            raise CheckpointError(f"checkpoint {str(path.parent)!r} holds no generator {name!r} "
                                  f"(it has {sorted(state['generators'])})")
        generator.set_state(state["generators"][name])
    if dist.get_world_size() != saved_world:
        logger.warning("RNG states not restored: saved by %d ranks, resumed on %d", saved_world,
                       dist.get_world_size())
        return
    mine = state["rng"][dist.get_rank()]
    torch.set_rng_state(mine["torch"])
    random.setstate((mine["python_version"], tuple(mine["python"]), mine["python_gauss"]))
    if mine["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(mine["cuda"])


def _short(error: BaseException) -> str:
    """One line of an error: its last meaningful line (DCP wraps the cause in per-rank tracebacks)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip() and not line.startswith(" ")]
    text = lines[-1] if lines else type(error).__name__
    return text.split("WeightsUnpickler error")[0].strip()[:300]
