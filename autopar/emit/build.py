"""The orchestrator: one plan, one rank, in a fixed order.

``apply_plan`` composes the ``apply_*`` mechanisms the way torchtitan's
``parallelize_llama`` does, with the pipeline split first:

1. pipeline split: cut this rank's stage modules from the (meta) model at the
   plan's boundaries (``cut_stages``, ``ModelAdapter.build_stage``);
2. tensor (+ sequence) parallelism over ``tp``: ``parallelize_module`` with the
   plan's styles (``apply_tp``);
3. activation checkpointing of the blocks the stage recomputes (``apply_ac``),
   after TP so recomputation re-runs the TP collectives;
4. data parallelism over ``dp``: FSDP2 / replicate by ZeRO stage (``apply_dp``),
   last, so it shards TP's DTensors into 2-D ones;
5. materialisation: ``to_empty`` on this rank's device and the model's own
   initialiser under the seed (meta models only: each rank allocates its shards);
6. the pipeline schedule over this rank's stages (``build_schedule``).
"""

from __future__ import annotations

import itertools
import logging
import warnings
from collections.abc import Sequence

from typing import TYPE_CHECKING

import torch
from torch import nn

from autopar.emit.ac import apply_ac
from autopar.emit.adapters import ModelAdapter, StageCut, adapter_for
from autopar.emit.dp import TRAINING_DTYPES, apply_dp, needs_dp_wrapper
from autopar.emit.mesh import DistEnv, MeshAxis, axis_rank, build_mesh
from autopar.emit.pipeline import build_schedule, cut_stages, validate_schedule
from autopar.emit.runtime import LossSlot, ParallelModel, StageRole
from autopar.emit.tp import apply_tp
from autopar.errors import PlanValidationError, UserInputError
from autopar.plan import Plan, StagePlan

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

logger = logging.getLogger(__name__)

_SEED_STRIDE = 1_000_003
"""Per-stage seed offset (a prime), so stages initialise different layers with different streams."""


def apply_plan(
    model: nn.Module, example_inputs: Sequence[torch.Tensor], plan: Plan, env: DistEnv, *, seed: int
) -> ParallelModel:
    """Build this rank's ``ParallelModel`` (see the module docstring for the order)."""
    adapter = adapter_for(model)
    seq_len = int(example_inputs[0].shape[1]) if example_inputs[0].dim() > 1 else 1
    validate_for_model(plan, seq_len)
    check_tied_parameters(model, plan)
    cuts = cut_stages(plan, model, adapter)  # validated before any collective, so every rank fails alike
    mesh = build_mesh(plan.layout, env.device)
    pp_rank = axis_rank(mesh, MeshAxis.PP)
    local = [(stage, cut) for stage, cut in zip(plan.stages, cuts, strict=True) if stage.pp_rank == pp_rank]
    parts = [build_part(model, stage, cut, plan, adapter, mesh, env, seed=seed) for stage, cut in local]
    role = StageRole(first=any(c.has_pre for _, c in local), last=any(c.has_post for _, c in local))
    slot = LossSlot()
    schedule = None
    if len(plan.stages) > 1:
        examples = [
            (stage.index, part, *_boundary(model, cut, plan, adapter, seq_len, example_inputs[0].dtype))
            for (stage, cut), part in zip(local, parts, strict=True)
        ]
        schedule = build_schedule(examples, layout=plan.layout, device=env.device,
                                  group=mesh[str(MeshAxis.PP)].get_group(), loss_fn=slot)
    logger.info("rank %d: %s applied (%d local stage(s))", env.rank, plan.layout.describe(), len(parts))
    return ParallelModel(plan=plan, mesh=mesh, env=env, parts=parts, schedule=schedule, role=role, loss_slot=slot)


def validate_for_model(plan: Plan, seq_len: int) -> None:
    """Checks that need the model's inputs, not only the plan.

    Raises:
        PlanValidationError: Unknown dtype, a sequence not divisible for sequence
            parallelism, or micro-batch counts the schedule cannot run.
    """
    lay = plan.layout
    if plan.dtype not in TRAINING_DTYPES:
        raise PlanValidationError(f"plan dtype {plan.dtype!r} is not one of {sorted(TRAINING_DTYPES)}")
    if lay.sequence_parallel and seq_len % lay.tp:
        raise PlanValidationError(f"sequence parallelism needs seq_len {seq_len} divisible by tp={lay.tp}")
    if plan.seq_len != seq_len:
        logger.warning("plan was made for seq_len %d, example inputs have %d", plan.seq_len, seq_len)
    validate_schedule(lay)


def check_tied_parameters(model: nn.Module, plan: Plan) -> None:
    """Refuse plans that would split a parameter shared by two modules (e.g. tied embeddings).

    Data parallelism keeps a shared parameter in one FSDP unit (the stage root), but
    pipeline stages and tensor-parallel styles act per module and would untie it.

    Raises:
        UserInputError: The model shares a parameter and the plan uses pp or tp.
    """
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    tied = [names for names in owners.values() if len(names) > 1]
    lay = plan.layout
    if tied and (len(plan.stages) > 1 or lay.tp > 1):
        raise UserInputError(
            f"parameters {tied[0]} are one tensor (tied weights); pipeline and tensor parallelism would untie "
            f"them (plan {lay.describe()}); untie them or use a data-parallel plan"
        )


def build_part(
    model: nn.Module, stage: StagePlan, cut: StageCut, plan: Plan, adapter: ModelAdapter, mesh: DeviceMesh,
    env: DistEnv, *, seed: int,
) -> nn.Module:
    """One stage module of this rank, split and materialised: steps 1–5 of the module docstring."""
    lay = plan.layout
    # 1. pipeline split: a copy of the model holding only this stage's layers (original names kept)
    module = adapter.build_stage(model, cut, seq_shards=lay.tp if lay.sequence_parallel else 1)
    meta = _is_meta(module)
    if not meta:
        module.to(env.device)
    # 2. tensor parallelism first: it turns the split weights into DTensors on the tp axis
    if lay.tp > 1:
        apply_tp(module, mesh[str(MeshAxis.TP)], stage, adapter, sequence_parallel=lay.sequence_parallel)
    # 3. activation checkpointing wraps the (already split) blocks
    apply_ac(module, cut.blocks, stage.recompute)
    # 4. data parallelism last: FSDP units are the wrapped blocks plus the stage root
    if needs_dp_wrapper(lay.dp, plan.dtype):
        apply_dp(module, mesh[str(MeshAxis.DP)], cut.blocks, zero_stage=lay.zero_stage, dtype=plan.dtype)
    # 5. only now allocate: each rank materialises its own shards
    if meta:
        materialize(module, env.device, adapter, seed=seed * _SEED_STRIDE + stage.index)
    return module


def materialize(module: nn.Module, device: torch.device, adapter: ModelAdapter, *, seed: int) -> None:
    """Allocate a meta module's (sharded) tensors on ``device`` and initialise them under ``seed``.

    The global RNG state is restored afterwards.
    """
    module.to_empty(device=device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad(), warnings.catch_warnings():
        # On a CPU mesh DTensor draws each shard from the local generator (no offset tracking);
        # the weights are still deterministic for a given plan and seed, which is all init needs.
        warnings.filterwarnings("ignore", message="DTensor random operators may not have complete support")
        torch.manual_seed(seed)
        adapter.init_weights(module)


def _is_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in itertools.chain(module.parameters(), module.buffers()))


def _boundary(
    model: nn.Module, cut: StageCut, plan: Plan, adapter: ModelAdapter, seq_len: int, token_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    lay = plan.layout
    return adapter.boundary_meta(
        model, cut, micro_batch_size=lay.micro_batch_size, seq_len=seq_len,
        seq_shards=lay.tp if lay.sequence_parallel else 1, dtype=TRAINING_DTYPES[plan.dtype],
        token_dtype=token_dtype,
    )
