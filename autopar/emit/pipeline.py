"""Pipeline parallelism: the plan's stage boundaries and schedule, on ``torch.distributed.pipelining``.

``cut_stages`` maps the plan's stages (ranges of layers named by module path) to
what each stage module keeps; ``build_schedule`` wraps this rank's stage modules
in ``PipelineStage`` objects and picks the schedule the plan named:
GPipe → ``ScheduleGPipe``, 1F1B → ``Schedule1F1B``, interleaved 1F1B →
``ScheduleInterleaved1F1B`` over ``virtual_stages`` stages per rank.

Stage input/output shapes are given statically (from the model's sizes and the
plan's micro-batch), so no metadata-inference pass runs before the first step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from autopar.emit.adapters import ModelAdapter, StageCut
from autopar.errors import PlanValidationError
from autopar.plan import Layout, Plan, Schedule

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup
    from torch.distributed.pipelining.schedules import _PipelineSchedule

logger = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``loss_fn(output, target) -> scalar``: the mean loss of one micro-batch."""


def cut_stages(plan: Plan, model: nn.Module, adapter: ModelAdapter) -> tuple[StageCut, ...]:
    """What each of the plan's stages keeps of ``model``.

    Layers whose paths are the model's blocks go to their stage; every other layer
    must precede all blocks (embeddings: the first stage) or follow them (head:
    the last stage).

    Raises:
        PlanValidationError: The plan's block paths are not the model's blocks in
            order, or an embedding/head layer sits in a middle stage.
    """
    blocks = adapter.block_paths(model)
    block_set = set(blocks)
    order = [p for stage in plan.stages for p in stage.module_paths]
    positions = [i for i, p in enumerate(order) if p in block_set]
    if not positions or [order[i] for i in positions] != list(blocks):
        raise PlanValidationError(
            f"the plan's layers {order} do not list the model's blocks {list(blocks)} in order; "
            f"was the plan made for this model?"
        )
    first_end, last_start = plan.stages[0].layer_end, plan.stages[-1].layer_start
    for i, path in enumerate(order):
        in_first = i < positions[0] and i < first_end  # embeddings, in the first stage
        in_last = i > positions[-1] and i >= last_start  # head, in the last stage
        if path not in block_set and not (in_first or in_last):
            raise PlanValidationError(
                f"layer {i} ({path!r}) is not a block; it must sit in the first stage (before the blocks) "
                f"or the last stage (after them)"
            )
    n = len(plan.stages)
    return tuple(
        StageCut(
            blocks=tuple(p for p in stage.module_paths if p in block_set),
            has_pre=stage.index == 0,
            has_post=stage.index == n - 1,
        )
        for stage in plan.stages
    )


def validate_schedule(layout: Layout) -> None:
    """Raise ``PlanValidationError`` for micro-batch counts the schedule cannot run."""
    nmb = layout.num_micro_batches
    if layout.schedule is Schedule.INTERLEAVED_1F1B:
        rounds = max(1, nmb // layout.pp)
        if nmb % rounds:
            raise PlanValidationError(
                f"interleaved 1F1B needs num_micro_batches ({nmb}) to be a multiple of "
                f"{rounds} rounds of pp={layout.pp}"
            )


def build_schedule(
    modules: Sequence[tuple[int, nn.Module, torch.Tensor, torch.Tensor]], *, layout: Layout, device: torch.device,
    group: ProcessGroup, loss_fn: LossFn,
) -> _PipelineSchedule:
    """``PipelineStage`` objects for this rank's stage modules, run by the plan's schedule.

    Args:
        modules: (stage index, stage module, example input, example output) for
            each local stage, in stage order; examples are meta tensors shaped like
            one micro-batch.
        layout: The plan's layout (schedule, pp, virtual stages, micro-batches).
        device: This rank's device.
        group: The ``pp`` process group.
        loss_fn: Called on the last stage per micro-batch; gradients are divided by
            the number of micro-batches (``scale_grads``), so a mean loss per
            micro-batch gives the mean over the whole batch.
    """
    from torch.distributed.pipelining import (
        PipelineStage,
        Schedule1F1B,
        ScheduleGPipe,
        ScheduleInterleaved1F1B,
    )

    num_stages = layout.pp * layout.virtual_stages
    stages = [
        PipelineStage(module, index, num_stages, device, input_args=(x,), output_args=(y,), group=group)
        for index, module, x, y in modules
    ]
    nmb = layout.num_micro_batches
    match layout.schedule:
        case Schedule.GPIPE:
            schedule: _PipelineSchedule = ScheduleGPipe(stages[0], nmb, loss_fn=loss_fn, scale_grads=True)
        case Schedule.ONE_F_ONE_B if nmb < num_stages:
            # torch's Schedule1F1B needs a micro-batch per stage. With fewer, 1F1B's warm-up already
            # holds all of them on the first stage, so GPipe computes the same with the same peak
            # of in-flight micro-batches (nmb) as 1F1B's first stage.
            logger.info("1F1B with %d micro-batches < %d stages runs as GPipe", nmb, num_stages)
            schedule = ScheduleGPipe(stages[0], nmb, loss_fn=loss_fn, scale_grads=True)
        case Schedule.ONE_F_ONE_B:
            schedule = Schedule1F1B(stages[0], nmb, loss_fn=loss_fn, scale_grads=True)
        case Schedule.INTERLEAVED_1F1B:
            schedule = ScheduleInterleaved1F1B(stages, nmb, loss_fn=loss_fn, scale_grads=True)
        case _:
            raise ValueError(f"unknown schedule {layout.schedule!r}")
    logger.info("pipeline: stages %s of %d, %s, %d micro-batches", [m[0] for m in modules], num_stages,
                type(schedule).__name__, nmb)
    return schedule
