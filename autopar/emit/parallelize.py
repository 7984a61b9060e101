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
``import autopar`` stays fast. Planning when no plan is given lives in the API (``autopar.parallelize``),
which calls this module with a plan: emit never imports the API.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from autopar import errors
from autopar.errors import AutoparError, UserInputError
from autopar.plan import Plan

if TYPE_CHECKING:
    from autopar.emit.runtime import ParallelModel

logger = logging.getLogger(__name__)

ExampleInputs = Sequence[torch.Tensor] | Mapping[str, torch.Tensor] | torch.Tensor
"""A tensor, positional tensors, or keyword tensors (``{"input_ids": ..., "attention_mask": ...}``)."""


def parallelize(model: nn.Module, example_inputs: ExampleInputs, *, plan: Plan, seed: int = 0) -> ParallelModel:
    """Split ``model`` over this job's ranks as ``plan`` says.

    Args:
        model: The full model, preferably on the meta device. It is not modified.
        example_inputs: Inputs of one example batch (batch dim first), positional or
            keyword; the program is exported at these shapes with the plan's micro-batch size.
        plan: The plan to apply (``autopar.parallelize`` plans first when given none).
        seed: Seed for initialising the weights of a meta-device model.

    Returns:
        This rank's ``ParallelModel``.

    Raises:
        UserInputError: Not launched as a distributed job of the plan's size, or the
            model cannot be exported.
        PlanValidationError: The plan does not fit the model (stage boundaries,
            shardings, micro-batches). Both are raised before any process-group work.
    """
    from autopar.emit.build import apply_plan, prepare
    from autopar.emit.mesh import init_distributed

    inputs = keyword_inputs(model, example_inputs)
    program = prepare(model, inputs, plan)  # everything that can refuse, before any collective
    env = init_distributed(plan.layout.num_gpus)
    return apply_plan(model, inputs, plan, env, seed=seed, program=program)


def keyword_inputs(model: nn.Module, example_inputs: ExampleInputs) -> dict[str, torch.Tensor]:
    """Example inputs as keyword tensors, positional ones named after ``model.forward``'s parameters.

    Raises:
        UserInputError: Not tensors, or more positional inputs than ``forward`` takes.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, Mapping):
        inputs = dict(example_inputs)
    else:
        values = tuple(example_inputs)
        names = [p.name for p in inspect.signature(model.forward).parameters.values()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(values) > len(names):
            raise UserInputError(f"{len(values)} positional example inputs, but {type(model).__name__}.forward "
                                 f"takes {len(names)} ({names})")
        inputs = dict(zip(names, values))
    bad = {k: type(v).__name__ for k, v in inputs.items() if not isinstance(v, torch.Tensor)}
    if not inputs or bad:
        raise UserInputError(f"example_inputs must be tensors, got {bad or 'nothing'}")
    return inputs


def share_from_rank0(compute: Callable[[], str]) -> str:
    """Run ``compute`` on rank 0 only and hand its text (or its autopar error) to every rank.

    Outside a distributed job it just runs ``compute``. An ``AutoparError`` raised
    on rank 0 is raised on every rank with its original class and message, so no
    rank waits forever for a plan that never comes.
    """
    import torch.distributed as dist

    from autopar.emit.mesh import init_process_group, select_backend

    distributed = dist.is_initialized() or "WORLD_SIZE" in os.environ
    if distributed and not dist.is_initialized():
        init_process_group(select_backend()[0])  # autopar's collective timeout and heartbeat watchdog
    rank = dist.get_rank() if distributed else 0
    message: tuple[str, str] = ("", "")
    if rank == 0:
        try:
            message = ("ok", compute())
        except AutoparError as e:
            message = (type(e).__name__, str(e))
            if not distributed:
                raise
    if distributed:
        box: list[Any] = [message]
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        dist.broadcast_object_list(box, src=0, device=device)
        message = box[0]
    kind, text = message
    if kind != "ok":
        cls = getattr(errors, kind, AutoparError)
        raise (cls if isinstance(cls, type) and issubclass(cls, AutoparError) else AutoparError)(
            f"on rank 0: {text}")
    return text
