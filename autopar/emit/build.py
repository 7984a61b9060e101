"""The orchestrator: one plan, one rank, in a fixed order.

``apply_plan`` composes the ``apply_*`` mechanisms the way torchtitan's
``parallelize_llama`` does, on the model's own exported program:

1. the program: export the model at one micro-batch's shapes and cut it at the
   plan's stage boundaries (``autopar.emit.program``); this rank keeps its stages;
2. tensor (+ sequence) parallelism over ``tp``: every parameter becomes a DTensor
   with the placement the ILP chose, and the stage runs on DTensors (``apply_tp``);
3. activation checkpointing of the blocks the stage recomputes (``apply_ac``),
   after TP so recomputation re-runs the TP collectives;
4. data parallelism over ``dp``: FSDP2 / replicate by ZeRO stage on the stage's
   blocks and root (``apply_dp``), last, so it shards TP's DTensors into 2-D ones;
5. materialisation: ``to_empty`` on this rank's device and the model's own
   initialiser under the seed (meta models only: each rank allocates its shards);
6. the pipeline schedule over this rank's stages (``build_schedule``).

Everything that can refuse the plan (export, stage boundaries, shardings) runs
before the first collective, so every rank fails alike and early.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from autopar.emit.ac import apply_ac
from autopar.emit.dp import TRAINING_DTYPES, apply_dp, needs_dp_wrapper
from autopar.emit.init import materialize
from autopar.emit.mesh import DistEnv, MeshAxis, axis_rank, build_mesh
from autopar.emit.pipeline import build_schedule, validate_schedule
from autopar.emit.program import Program, build_program, retarget_device
from autopar.emit.runtime import LossSlot, ParallelModel, StageRole
from autopar.emit.tp import apply_tp, param_placements, resolve_param_splits, resolve_styles
from autopar.errors import PlanValidationError
from autopar.layout import Schedule
from autopar.plan import Plan, StagePlan

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

logger = logging.getLogger(__name__)

_SEED_STRIDE = 1_000_003
"""Per-stage seed offset (a prime), so stages initialise different layers with different streams."""


def prepare(model: nn.Module, inputs: Mapping[str, torch.Tensor], plan: Plan) -> Program:
    """Everything that needs no process group: validation, the split program, the shardings.

    Raises:
        PlanValidationError, UserInputError: The plan cannot run on this model;
            the message names the module or op and the pin that avoids it.
    """
    validate_for_model(plan, token_count(inputs))
    program = build_program(model, inputs, plan)
    if plan.layout.tp > 1:
        for stage in plan.stages:
            names = [n for n, _ in program.stage_module(stage.index).named_parameters(remove_duplicate=False)]
            param_placements(model, resolve_styles(model, stage), names)
            resolve_param_splits(model, stage)
    return program


def apply_plan(model: nn.Module, inputs: Mapping[str, torch.Tensor], plan: Plan, env: DistEnv, *,
               seed: int, program: Program | None = None) -> ParallelModel:
    """Build this rank's ``ParallelModel`` (see the module docstring for the order)."""
    program = program or prepare(model, inputs, plan)
    mesh = build_mesh(plan.layout, env.device)
    pp_rank = axis_rank(mesh, MeshAxis.PP)
    local = [stage for stage in plan.stages if stage.pp_rank == pp_rank]
    parts = [build_part(program, model, stage, plan, mesh, env, seed=seed) for stage in local]
    n = len(plan.stages)
    role = StageRole(first=any(s.index == 0 for s in local), last=any(s.index == n - 1 for s in local))
    slot = LossSlot(program.out_spec, program.output_order)
    schedule = None
    if n > 1:
        schedule = build_schedule(program, [(s.index, p) for s, p in zip(local, parts, strict=True)],
                                  layout=plan.layout, device=env.device, group=mesh[str(MeshAxis.PP)].get_group(),
                                  loss_fn=slot)
    logger.info("rank %d: %s applied (%d local stage(s))", env.rank, plan.layout.describe(), len(parts))
    return ParallelModel(plan=plan, mesh=mesh, env=env, parts=parts, schedule=schedule, role=role, loss_slot=slot,
                         program=program, seed=seed)


def token_count(inputs: Mapping[str, torch.Tensor]) -> int:
    """Tokens per sample of the first input with a sequence dim (1 if none): for divisibility checks only."""
    for x in inputs.values():
        if x.dim() > 1:
            return int(x.shape[1])
    return 1


def validate_for_model(plan: Plan, seq_len: int) -> None:
    """Checks that need the model's inputs, not only the plan.

    Raises:
        PlanValidationError: Unknown dtype, or micro-batch counts the schedule cannot run.
    """
    if plan.dtype not in TRAINING_DTYPES:
        raise PlanValidationError(f"plan dtype {plan.dtype!r} is not one of {sorted(TRAINING_DTYPES)}")
    if plan.seq_len != seq_len:
        logger.info("plan was made for %d tokens per sample, the first example input has %d", plan.seq_len, seq_len)
    validate_schedule(plan.layout)


def build_part(program: Program, model: nn.Module, stage: StagePlan, plan: Plan, mesh: DeviceMesh,
               env: DistEnv, *, seed: int) -> nn.Module:
    """One stage module of this rank, split and materialised: steps 2–5 of the module docstring."""
    lay = plan.layout
    module = program.stage_module(stage.index)
    blocks = program.block_paths[stage.index]
    meta = _is_meta(module)
    if not meta:
        module.to(env.device)
    retarget_device(module, env.device)  # factory ops (arange, masks) ran on the export's device
    # 2. tensor parallelism first: it turns the parameters into DTensors on the tp axis
    if lay.tp > 1:
        last = len(plan.stages) - 1
        apply_tp(module, model, mesh[str(MeshAxis.TP)], stage, sequence_parallel=lay.sequence_parallel,
                 block_paths=blocks, keep_vocab_shards=stage.index == last, receives=stage.index > 0,
                 sends=stage.index < last)
    # 3. activation checkpointing wraps the (already split) blocks
    apply_ac(module, blocks, stage.recompute)
    # 4. data parallelism last: FSDP units are the wrapped blocks plus the stage root
    if needs_dp_wrapper(lay.dp, plan.dtype):
        apply_dp(module, mesh[str(MeshAxis.DP)], blocks, zero_stage=lay.zero_stage, dtype=plan.dtype)
    # 5. only now allocate: each rank materialises its own shards
    if meta:
        materialize(module, model, env.device, seed=seed * _SEED_STRIDE + stage.index)
    return module


def _is_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in itertools.chain(module.parameters(), module.buffers()))
