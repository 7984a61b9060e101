"""``autopar.parallelize``: apply a plan to the real module under ``torch.distributed``.

Inside a ``torchrun`` job::

    pm = autopar.parallelize(model, example_inputs, plan=plan)
    opt = pm.optimizer(torch.optim.AdamW, lr=3e-4)
    for x, y in batches:
        loss = pm.step(x, y, loss_fn)
        opt.step()
        opt.zero_grad()

Build ``model`` on the meta device (``with torch.device("meta"): model = GPT(cfg)``)
so that no rank ever holds the whole model: each rank cuts its stages from the
meta model, splits them, then materialises only its shards (``to_empty`` and the
model's own initialiser under ``seed``). A model with real weights works too; its
values are kept (and must be the same on every rank).

This module imports nothing from ``torch.distributed`` at import time, so
``import autopar`` (and ``autopar.api``) stay fast.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from autopar.errors import AutoparError, PlanValidationError, UserInputError
from autopar.plan import Plan

if TYPE_CHECKING:
    from autopar.emit.runtime import ParallelModel

logger = logging.getLogger(__name__)


def parallelize(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor] | Mapping[str, torch.Tensor] | torch.Tensor,
    *,
    plan: Plan | None = None,
    cluster: Any = None,
    global_batch_size: int | None = None,
    seed: int = 0,
    **plan_options: Any,
) -> ParallelModel:
    """Split ``model`` over this job's ranks as ``plan`` says, or plan first.

    Args:
        model: The full model, preferably on the meta device. It is not modified.
        example_inputs: Inputs of one example batch (batch dim first); their
            sequence length and dtype shape the pipeline's buffers.
        plan: The plan to apply. When None, rank 0 plans with
            ``autopar.api.plan(model, example_inputs, cluster=..., global_batch_size=...,
            **plan_options)`` and broadcasts the plan, so every rank applies the same one.
        cluster: The cluster to plan for (only when ``plan`` is None).
        global_batch_size: Samples per optimizer step (only when ``plan`` is None).
        seed: Seed for initialising the weights of a meta-device model.
        **plan_options: More arguments for ``autopar.api.plan``.

    Returns:
        This rank's ``ParallelModel``.

    Raises:
        UserInputError: Not launched as a distributed job of the plan's size, or the
            model is of an unsupported family.
        PlanValidationError: The plan does not fit the model (layers, divisibility,
            micro-batches).
    """
    from autopar.emit.mesh import init_distributed

    inputs = _positional(example_inputs)
    if plan is None:
        plan = _plan_everywhere(model, inputs, cluster, global_batch_size, plan_options)
    env = init_distributed(plan.layout.num_gpus)
    from autopar.emit.build import apply_plan

    return apply_plan(model, inputs, plan, env, seed=seed)


def _positional(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    """Example inputs as a tuple of tensors: a tensor, a sequence, or a one-entry mapping (``{"input_ids": x}``)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, Mapping):
        if len(example_inputs) != 1:
            raise UserInputError(
                f"parallelize runs models on one positional input (token ids); got keyword inputs "
                f"{sorted(example_inputs)}"
            )
        return tuple(example_inputs.values())
    inputs = tuple(example_inputs)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise UserInputError(f"example_inputs must be tensors, got {[type(t).__name__ for t in inputs]}")
    return inputs


def _plan_everywhere(
    model: nn.Module, example_inputs: Sequence[torch.Tensor], cluster: Any, global_batch_size: int | None,
    options: dict[str, Any],
) -> Plan:
    """Plan on rank 0 and broadcast the plan's JSON (or rank 0's error) to every rank."""
    import os

    import torch.distributed as dist

    from autopar.emit.mesh import init_process_group, select_backend

    if cluster is None or global_batch_size is None:
        raise UserInputError("parallelize needs either plan= or both cluster= and global_batch_size=")
    distributed = dist.is_initialized() or "WORLD_SIZE" in os.environ
    if distributed and not dist.is_initialized():
        init_process_group(select_backend()[0])  # autopar's collective timeout and heartbeat watchdog
    rank = dist.get_rank() if distributed else 0
    logger.info("rank %d: %s", rank, "planning" if rank == 0 else "waiting for rank 0's plan")
    message: tuple[str, str] = ("", "")
    if rank == 0:
        from autopar import api

        world = dist.get_world_size() if distributed else 1
        pins = {"num_gpus": world, **(options.pop("constraints", None) or {})}  # the plan must fill this job
        try:
            made = api.plan(model, example_inputs, cluster=cluster, global_batch_size=global_batch_size,
                            constraints=pins, **options)
            best = made[0] if isinstance(made, list) else made  # top_k > 1 returns a ranking
            message = ("plan", best.to_json())
        except AutoparError as e:
            message = ("error", f"{type(e).__name__}: {e}")
    if distributed:
        box: list[Any] = [message]
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        dist.broadcast_object_list(box, src=0, device=device)
        message = box[0]
    kind, text = message
    if kind == "error":
        raise PlanValidationError(f"planning on rank 0 failed: {text}")
    return Plan.from_json(text)
