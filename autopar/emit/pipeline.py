"""Pipeline parallelism: the split program's stages on ``torch.distributed.pipelining``.

``build_schedule`` wraps this rank's stage modules (cut from the exported
program by ``autopar.emit.program``) in ``_PipelineStage`` objects, which read
the shapes of what crosses each boundary from the program itself (every value
travels to the next stage only: ``program._relay_stage_by_stage``), and picks the schedule the plan
named: GPipe → ``ScheduleGPipe``, 1F1B → ``Schedule1F1B``, interleaved 1F1B →
``ScheduleInterleaved1F1B`` over ``virtual_stages`` stages per rank.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from autopar.errors import PlanValidationError
from autopar.plan import Layout, Schedule

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup
    from torch.distributed.pipelining.schedules import _PipelineSchedule

    from autopar.emit.program import Program

logger = logging.getLogger(__name__)

LossFn = Callable[[Any, torch.Tensor], torch.Tensor]
"""``loss_fn(output, target) -> scalar``: the mean loss of one micro-batch (output as ``model.forward`` returns it)."""


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


def _typed_boundaries(module: nn.Module, *, sends: bool) -> None:
    """What crosses a stage boundary is sent contiguous and in the dtype its receive buffer was made with.

    gloo's point-to-point needs contiguous tensors, and the program's own views (a rotary table's slices)
    may not be. The receive buffers take the exported program's dtypes (fp32), while a bf16 plan's FSDP
    mixed precision makes the stage compute in bf16: a stage that ``sends`` casts each output back to its
    buffer's dtype. bf16 → fp32 is exact, and the next stage's FSDP unit casts it to bf16 again, so the
    values (and, through the casts, the gradients) are a bf16 pipeline's; only the bytes sent double.
    """
    from torch.utils._pytree import tree_flatten, tree_map

    output = next(n for n in reversed(module.graph.nodes) if n.op == "output")
    crossing = set(output.all_input_nodes)  # their metadata shapes the gradient receive buffers
    for node in module.graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" or node in crossing else None
        if isinstance(val, torch.Tensor) and not val.is_contiguous():
            node.meta["val"] = val.contiguous()
    flat, _ = tree_flatten(output.args[0])
    dtypes = [n.meta["val"].dtype if sends and isinstance(getattr(n, "meta", {}).get("val"), torch.Tensor) else None
              for n in flat]

    def fix(out: Any) -> Any:
        leaves, spec = tree_flatten(out)
        if len(leaves) == len(dtypes):
            leaves = [t.to(d) if d is not None and isinstance(t, torch.Tensor) and t.dtype != d else t
                      for t, d in zip(leaves, dtypes, strict=True)]
        return tree_map(lambda t: t.contiguous() if isinstance(t, torch.Tensor) else t, spec.unflatten(leaves))

    module.register_forward_hook(lambda m, args, out: fix(out))


def _only_received(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Later stages take what earlier stages send, not the model's inputs."""
    return args, {}


def build_schedule(
    program: Program, modules: Sequence[tuple[int, nn.Module]], *, layout: Layout, device: torch.device,
    group: ProcessGroup, loss_fn: LossFn,
) -> _PipelineSchedule:
    """``_PipelineStage`` objects for this rank's stage modules, run by the plan's schedule.

    Args:
        program: The split program (its ``pipe`` describes how stages connect).
        modules: (stage index, stage module) for each local stage, in stage order,
            after TP, AC and FSDP were applied.
        layout: The plan's layout (schedule, pp, virtual stages, micro-batches).
        device: This rank's device.
        group: The ``pp`` process group.
        loss_fn: Called on the last stage per micro-batch; gradients are divided by
            the number of micro-batches (``scale_grads``), so a mean loss per
            micro-batch gives the mean over the whole batch.
    """
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
    from torch.distributed.pipelining.stage import _PipelineStage

    info = program.pipe.info()
    last = program.pipe.num_stages - 1
    for index, module in modules:
        if index > 0:  # multi-stage schedules hand the model's keyword inputs to every local stage
            module.register_forward_pre_hook(_only_received, with_kwargs=True, prepend=True)
        _typed_boundaries(module, sends=index < last)
    stages = [_PipelineStage(module, index, info, device, group) for index, module in modules]
    num_stages = layout.pp * layout.virtual_stages
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
