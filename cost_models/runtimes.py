"""What each training program the planner can price runs: the value ``Runtime`` selects terms by.

A plan is priced for one program (``autopar.layout.Runtime``). The memory formulas live once, in
``program_memory.py``, and read the runtime's ``RuntimeProgram`` to choose their terms; the optimizer
step (``optimizer.py``) reads its AdamW implementation. Sources:

- ``autopar``: the emitted program (``autopar/emit``): FSDP2 ``fully_shard``/``replicate`` for every ZeRO
  stage, ``torch.distributed.pipelining`` (GPipe, 1F1B, interleaved 1F1B), torch's foreach AdamW.
- ``megatron``: Megatron-LM on megatron-core (read in the installed megatron-core 0.16.1):
  ``distributed/distributed_data_parallel.py`` (``DistributedDataParallel``: one contiguous gradient buffer,
  ``grad_dtype = torch.float if ddp_config.grad_reduce_in_fp32 else param.dtype``; Megatron-LM's
  ``arguments.py``, not in the wheel, turns ``accumulate_allreduce_grads_in_fp32`` on for ``--bf16``),
  ``optimizer/distrib_optimizer.py`` (``--use-distributed-optimizer``: ZeRO 1, fp32 master weights and Adam
  shards over dp), ``optimizer/__init__.py`` (``FusedAdam`` from Transformer Engine or apex),
  ``pipeline_parallel/schedules.py`` (1F1B and interleaved 1F1B; no GPipe schedule) and
  ``tensor_parallel/cross_entropy.py`` (the vocab-parallel loss). Megatron-FSDP (``--use-megatron-fsdp``,
  ZeRO 2/3) is another program and is not priced here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from autopar.layout import Runtime, Schedule


@dataclass(frozen=True, slots=True, kw_only=True)
class RuntimeProgram:
    """The mechanisms of one training program that change what a layout costs."""

    label: str
    """How a plan says what it was priced for (``Predicted.sources["runtime"]``, ``Plan.explain``)."""
    fsdp: bool
    """Data parallelism runs as torch FSDP2 (mixed-precision unsharded copies, gathered units, fp32 reduce
    buffers); False: Megatron's DDP with its contiguous gradient buffer, reduced in place."""
    optimizer: str
    """AdamW implementation of the step (``optimizer.IMPLEMENTATIONS``)."""
    zero_stages: tuple[int, ...]
    """ZeRO stages a plan for the program may pin."""
    zero_runs_as: Mapping[int, int]
    """ZeRO stages the program runs as another (the same program, priced the same): a free search skips them."""
    schedules: tuple[Schedule, ...]
    """Pipeline schedules the program runs."""
    recv_buffer_per_micro_batch: bool
    """A pipeline stage preallocates a receive buffer per micro-batch and direction (torch pipelining); False:
    one tensor per transfer, the activation one being the stage input it saves for backward (Megatron)."""
    keeps_stage_output: bool
    """The last stage keeps its output (the logits) per in-flight micro-batch (torch's ``fwd_cache``); False:
    the loss is computed inside the stage's forward and its output is the loss (Megatron's ``forward_step``)."""
    sends_held_to_step_end: tuple[Schedule, ...]
    """Schedules under which every tensor a stage sends stays alive until the step ends. torch's interleaved 1F1B
    runs on ``_PipelineScheduleRuntime``, whose ``_step_microbatches`` keeps each send's ``Work`` (which holds
    the tensor sent) in ``send_ops`` and waits on them only when the step ends; GPipe and 1F1B
    (``PipelineScheduleSingle``) wait each micro-batch's sends in the loop. Megatron's ``_communicate`` waits
    each transfer."""
    sp_shards_boundaries: bool
    """Under sequence parallelism what crosses a stage boundary is the sequence shard (Megatron's
    ``get_tensor_shapes``: ``seq_length // tp``; autopar's ``emit/tp.py::sequence_boundaries``); False: a stage's
    outputs leave as full tensors, the same on every tp rank."""
    fuses_grad_accumulation: bool
    """The weight-gradient GEMMs accumulate into the gradient buffer over micro-batches (Megatron's
    ``gradient_accumulation_fusion``: ``fused_weight_gradient_mlp_cuda`` writes into ``main_grad``); False: each
    later micro-batch's gradients are added in a pass of their own (autograd's ``AccumulateGrad``, FSDP2's
    fp32 accumulator): ``Formulas.grad_accumulation_time``."""
    sp_by_placement: bool
    """Under sequence parallelism the program runs a block's weight-holding children as the sharding ILP places
    them, from their input gathered and saved whole (DTensor, ``emit/tp.py``: ``memory.sequence_parallel_split``);
    False: Megatron's fixed program, which saves the sequence shard and gathers it again in backward, so every
    saved tensor is split (Korthikanti et al. 2022, 34·sbh/t)."""


PROGRAMS = MappingProxyType({
    Runtime.AUTOPAR: RuntimeProgram(
        label="autopar (torch FSDP2 + torch.distributed.pipelining, foreach AdamW)", fsdp=True, optimizer="foreach",
        zero_stages=(0, 1, 2, 3), zero_runs_as=MappingProxyType({1: 2}),  # emit/dp.py: "a ZeRO-1 plan is run as ZeRO-2"
        schedules=tuple(Schedule), recv_buffer_per_micro_batch=True,
        keeps_stage_output=True, sends_held_to_step_end=(Schedule.INTERLEAVED_1F1B,),
        sp_shards_boundaries=True, fuses_grad_accumulation=False, sp_by_placement=True),
    Runtime.MEGATRON: RuntimeProgram(
        label="megatron-lm (DDP grad buffer, distributed optimizer, FusedAdam, per-transfer pipeline receives)",
        fsdp=False, optimizer="fused", zero_stages=(0, 1), zero_runs_as=MappingProxyType({}),
        schedules=(Schedule.ONE_F_ONE_B, Schedule.INTERLEAVED_1F1B),
        recv_buffer_per_micro_batch=False, keeps_stage_output=False, sends_held_to_step_end=(),
        sp_shards_boundaries=True, fuses_grad_accumulation=True, sp_by_placement=False),
})
"""Runtime → its program (sources in the module docstring)."""


def program_of(runtime: Runtime | str) -> RuntimeProgram:
    """The program of ``runtime`` (a ``Runtime`` or its name).

    Example:
        >>> program_of("megatron").optimizer, program_of(Runtime.AUTOPAR).zero_stages
        ('fused', (0, 1, 2, 3))
    """
    return PROGRAMS[Runtime(runtime)]


def searched_zero_stages(program: RuntimeProgram) -> tuple[int, ...]:
    """The ZeRO stages a free search enumerates: each distinct program once.

    Example:
        >>> searched_zero_stages(program_of("autopar")), searched_zero_stages(program_of("megatron"))
        ((0, 2, 3), (0, 1))
    """
    return tuple(z for z in program.zero_stages if z not in program.zero_runs_as)


__all__ = ["PROGRAMS", "RuntimeProgram", "program_of", "searched_zero_stages"]
