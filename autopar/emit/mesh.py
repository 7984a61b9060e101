"""Process group and device mesh: the (pp, dp, tp) grid a plan runs on.

The backend follows the hardware, with one code path: NCCL when CUDA is present,
gloo on CPU. Ranks are laid out with ``tp`` innermost (neighbouring ranks share a
node's fast links), then ``dp``, then ``pp`` outermost, as Megatron-LM and
torchtitan do.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import torch

from autopar._compat import StrEnum
from autopar.errors import UserInputError
from autopar.plan import Layout

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

logger = logging.getLogger(__name__)

_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
"""Environment variables torchrun (and ``torch.distributed.launch``) sets for every worker."""

DEFAULT_COLLECTIVE_TIMEOUT_S = 120.0
"""Collective timeout of the process groups autopar creates, unless ``AUTOPAR_COLLECTIVE_TIMEOUT_S`` says
otherwise. Short, for training: PyTorch's default (600 s, 10 min) leaves a job whose rank died hanging; the
heartbeat watchdog (``autopar.emit.watchdog``) reports a silent rank after half of it."""


def collective_timeout_s() -> float:
    """The collective timeout: ``AUTOPAR_COLLECTIVE_TIMEOUT_S`` if set, else ``DEFAULT_COLLECTIVE_TIMEOUT_S``.

    Raises:
        UserInputError: The variable is not a positive number.
    """
    raw = os.environ.get("AUTOPAR_COLLECTIVE_TIMEOUT_S", "")
    if not raw:
        return DEFAULT_COLLECTIVE_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UserInputError(f"AUTOPAR_COLLECTIVE_TIMEOUT_S={raw!r}: expected a positive number of seconds")
    return value


def init_process_group(backend: str, **kwargs: object) -> None:
    """``torch.distributed.init_process_group`` with autopar's collective timeout and heartbeat watchdog."""
    import torch.distributed as dist

    timeout_s = collective_timeout_s()
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kwargs)  # type: ignore[arg-type]
    from autopar.emit.watchdog import start_watchdog

    start_watchdog(timeout_s)


class MeshAxis(StrEnum):
    """Named axes of the device mesh, outermost first."""

    PP = "pp"
    DP = "dp"
    TP = "tp"


MESH_AXES: tuple[MeshAxis, ...] = (MeshAxis.PP, MeshAxis.DP, MeshAxis.TP)
"""Axis order of every mesh autopar builds (``tp`` varies fastest over ranks)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    """Global rank."""
    world_size: int
    """Number of processes in the job."""
    device: torch.device
    """The device this rank computes on (``cuda:<local rank>`` or ``cpu``)."""
    backend: str
    """Process-group backend: ``"nccl"`` or ``"gloo"``."""


def select_backend() -> tuple[str, str]:
    """The (backend, device type) pair for this machine: NCCL on CUDA, gloo on CPU.

    Example:
        >>> select_backend() in {("nccl", "cuda"), ("gloo", "cpu")}
        True
    """
    if torch.cuda.is_available():
        return "nccl", "cuda"
    return "gloo", "cpu"


def init_distributed(num_gpus: int, *, timeout_s: float | None = None) -> DistEnv:
    """Join (or start) the process group for a plan that uses ``num_gpus`` ranks.

    Inside a ``torchrun`` job the default process group is created from the
    environment if the caller has not created one. Outside one, a plan for a
    single GPU runs in this process (a one-rank group on an in-memory store);
    anything larger raises.

    Args:
        num_gpus: Ranks the plan needs (``dp · tp · pp``).
        timeout_s: Collective timeout for a group created here (default: ``collective_timeout_s()``).
            Every multi-rank job also gets the heartbeat watchdog, whoever made its group.

    Returns:
        The rank, world size, device and backend of this process.

    Raises:
        UserInputError: Not in a distributed job and the plan needs more than one
            rank, or the job's world size differs from ``num_gpus``.
    """
    import torch.distributed as dist

    backend, device_type = select_backend()
    timeout_s = collective_timeout_s() if timeout_s is None else timeout_s
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        if all(name in os.environ for name in _TORCHRUN_ENV):
            dist.init_process_group(backend, timeout=timeout)
        elif num_gpus == 1:
            store = dist.HashStore()
            dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
        else:
            raise UserInputError(
                f"the plan uses {num_gpus} GPUs but this is not a distributed job; launch it with "
                f"`torchrun --nproc-per-node {num_gpus} your_script.py` (or call "
                f"torch.distributed.init_process_group first)"
            )
    from autopar.emit.watchdog import start_watchdog

    start_watchdog(timeout_s)
    world = dist.get_world_size()
    if world != num_gpus:
        raise UserInputError(
            f"the plan uses dp·tp·pp = {num_gpus} ranks but the job has {world}; "
            f"launch with --nproc-per-node {num_gpus} (per node) or re-plan for {world} GPUs"
        )
    backend = dist.get_backend()
    if device_type == "cuda" and backend == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank() % torch.cuda.device_count()))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistEnv(rank=dist.get_rank(), world_size=world, device=device, backend=str(backend))


def build_mesh(layout: Layout, device: torch.device) -> DeviceMesh:
    """A ``DeviceMesh`` of shape (pp, dp, tp) with named axes ``("pp", "dp", "tp")``.

    Args:
        layout: The plan's layout; its sizes must multiply to the world size.
        device: This rank's device (its type picks the mesh's device type).

    Returns:
        The mesh; slice it by axis name, e.g. ``mesh["tp"]``.
    """
    from torch.distributed.device_mesh import init_device_mesh

    shape = (layout.pp, layout.dp, layout.tp)
    mesh = init_device_mesh(device.type, shape, mesh_dim_names=tuple(str(a) for a in MESH_AXES))
    logger.info("device mesh %s over %s", dict(zip(MESH_AXES, shape, strict=True)), device.type)
    return mesh


def axis_rank(mesh: DeviceMesh, axis: MeshAxis) -> int:
    """This rank's coordinate along ``axis``."""
    return int(mesh.get_local_rank(str(axis)))
