"""``ParallelModel``: this rank's share of a model under a plan, and one training step.

``step(inputs, targets, loss_fn)`` runs forward and backward of one global batch:
this rank's data-parallel slice, cut into ``num_micro_batches`` micro-batches,
either accumulated here (no pipeline) or driven by the pipeline schedule. Each
micro-batch's mean loss is scaled by ``1 / num_micro_batches`` and FSDP/replicate
average gradients over ``dp``, so the gradients are those of the mean loss over
the global batch, as in a single-process run. The caller then steps its optimizer.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from autopar.emit.mesh import DistEnv, MeshAxis, axis_rank
from autopar.emit.pipeline import LossFn
from autopar.errors import UserInputError
from autopar.plan import Plan

if TYPE_CHECKING:
    from pathlib import Path

    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.pipelining.schedules import _PipelineSchedule

    from autopar.emit.program import Program

logger = logging.getLogger(__name__)

Batch = torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor]
"""Model inputs: one tensor, a tuple of positional tensors, or keyword tensors (batch dim first)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class StageRole:
    """Which ends of the pipeline this rank holds."""

    first: bool
    """Holds the first stage (feeds the inputs)."""
    last: bool
    """Holds the last stage (computes the loss)."""


class LossSlot:
    """The loss function the pipeline schedule calls: whichever ``step`` was last given.

    The schedule is built once with a fixed ``loss_fn``; this indirection lets
    every ``ParallelModel.step`` pass its own. The last stage's flat outputs are
    nested back into what ``model.forward`` returns (a ``ModelOutput``, a dict, a
    tensor) before the loss sees them. A vocabulary-split head's logits arrive as
    ``Shard(-1)`` DTensors: with ``parallel`` set (``step`` runs under
    ``loss_parallel()``), the loss reads them at V/t per rank where that is exact,
    else on the gathered logits (``autopar.emit.loss``). The loss leaves as a plain tensor.
    """

    def __init__(self, out_spec: Any, order: Sequence[int] | None = None) -> None:
        from autopar.emit.loss import VocabParallelLoss

        self.fn: LossFn | None = None
        self.parallel = False
        self.out_spec = out_spec
        self.order = order
        self._vocab = VocabParallelLoss()

    def __call__(self, output: Any, target: torch.Tensor) -> torch.Tensor:
        from autopar.emit.program import unflatten_output

        if self.fn is None:
            raise UserInputError("the pipeline computed a loss outside ParallelModel.step()")
        return self._vocab(self.fn, unflatten_output(output, self.out_spec, self.order), target,
                           parallel=self.parallel)


def optimizer_kwargs(optimizer_cls: type[torch.optim.Optimizer], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``kwargs`` with ``foreach=True`` added when the optimizer takes it and neither ``foreach`` nor ``fused``
    is given: the multi-tensor implementation the plan prices (``cost_models/runtimes.py``: the autopar
    runtime's ``optimizer``), which torch picks by itself only when every tensor is on CUDA (``torch/optim/optimizer.py::_default_to_fused_or_foreach``;
    elsewhere it runs a Python loop over the parameters, one dispatch per tensor and op).

    Example:
        >>> optimizer_kwargs(torch.optim.AdamW, {"lr": 1e-3})
        {'lr': 0.001, 'foreach': True}
        >>> optimizer_kwargs(torch.optim.AdamW, {"fused": True}), optimizer_kwargs(torch.optim.LBFGS, {})
        ({'fused': True}, {})
    """
    import inspect

    out = dict(kwargs)
    if "foreach" not in out and "fused" not in out and "foreach" in inspect.signature(optimizer_cls).parameters:
        out["foreach"] = True
    return out


class PartsOptimizer(torch.optim.Optimizer):
    """One optimizer per local model part, stepped together (for interleaved pipelines).

    Each part gets its own optimizer so that distributed checkpointing can map
    every optimizer state to the part's parameter names. ``param_groups`` are the
    parts' groups themselves, so learning-rate schedulers act on all of them.
    """

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        params = [p for opt in optimizers for group in opt.param_groups for p in group["params"]]
        super().__init__(params, dict(optimizers[0].defaults))
        self.optimizers = tuple(optimizers)
        self.param_groups = [g for opt in self.optimizers for g in opt.param_groups]

    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        """Step every part's optimizer."""
        for opt in self.optimizers:
            opt.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero every part's gradients."""
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)


def _own_loss_op(plan: Plan, role: StageRole, parts: Sequence[nn.Module]) -> str | None:
    """The op of this rank's programs that ``loss_parallel()`` would re-route, logged (None: none)."""
    from autopar.emit.loss import program_runs_own_loss

    if plan.layout.tp == 1 or not role.last:
        return None
    op = program_runs_own_loss(parts)
    if op is not None:
        logger.info("the model's program runs %s itself: the loss reads gathered logits, not loss_parallel()", op)
    return op


class ParallelModel:
    """This rank's part of a model under a plan; see ``autopar.parallelize``."""

    def __init__(
        self, *, plan: Plan, mesh: DeviceMesh, env: DistEnv, parts: Sequence[nn.Module],
        schedule: _PipelineSchedule | None, role: StageRole, loss_slot: LossSlot, program: Program,
        seed: int = 0,
    ) -> None:
        self.plan = plan
        """The plan this model runs."""
        self.mesh = mesh
        """The (pp, dp, tp) device mesh."""
        self.env = env
        """Rank, world size, device and backend of this process."""
        self.parts = tuple(parts)
        """This rank's stage modules, in stage order (several under interleaved 1F1B)."""
        self._schedule = schedule
        self._role = role
        self._loss_slot = loss_slot
        self._program = program
        self._seed = seed
        self._steps = 0
        self._own_loss_op = _own_loss_op(plan, role, parts)

    # ---- modules and parameters -----------------------------------------------------------------

    @property
    def module(self) -> nn.Module:
        """This rank's local part: the stage module, or an ``nn.ModuleList`` of them when there are several."""
        return self.parts[0] if len(self.parts) == 1 else nn.ModuleList(self.parts)

    @property
    def schedule(self) -> _PipelineSchedule | None:
        """The pipeline schedule running this rank's stages; None without pipeline parallelism."""
        return self._schedule

    @property
    def device(self) -> torch.device:
        """This rank's device."""
        return self.env.device

    def parameters(self) -> Iterator[nn.Parameter]:
        """Local parameters of every part (DTensor shards under TP/FSDP)."""
        for part in self.parts:
            yield from part.parameters()

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) of every local part; names are the original model's."""
        for part in self.parts:
            yield from part.named_parameters()

    def optimizer(self, optimizer_cls: type[torch.optim.Optimizer], **kwargs: Any) -> torch.optim.Optimizer:
        """An optimizer over the local parameters, e.g. ``pm.optimizer(torch.optim.AdamW, lr=3e-4)``.

        With several local parts it is a ``PartsOptimizer`` holding one optimizer per part.
        """
        kwargs = optimizer_kwargs(optimizer_cls, kwargs)
        optimizers = [optimizer_cls(part.parameters(), **kwargs) for part in self.parts]
        return optimizers[0] if len(optimizers) == 1 else PartsOptimizer(optimizers)

    def train(self, mode: bool = True) -> ParallelModel:
        """Set training mode on every part."""
        for part in self.parts:
            part.train(mode)
        return self

    @property
    def input_names(self) -> tuple[str, ...]:
        """Keyword names of the model inputs (positional example inputs are named after ``forward``'s parameters)."""
        return self._program.input_names

    def forward(self, inputs: Batch) -> Any:
        """Run the local model on one micro-batch and return what ``model.forward`` returns (no pipeline only).

        Raises:
            UserInputError: The plan pipelines the model (use ``step``).
        """
        from autopar.emit.program import unflatten_output
        from torch.distributed.tensor.experimental import implicit_replication

        if self._schedule is not None:
            raise UserInputError("forward() runs unpipelined plans only; this plan has pipeline stages (use step())")
        from autopar.emit.loss import gather

        with implicit_replication():
            out = gather(self.parts[0](**self._keywords(inputs)))  # vocabulary-split logits whole, as the model's
            return unflatten_output(out, self._program.out_spec, self._program.output_order)

    # ---- one step ---------------------------------------------------------------------------

    def step(self, inputs: Batch, targets: torch.Tensor, loss_fn: LossFn, *, loss_parallel: bool = True
             ) -> torch.Tensor:
        """Forward and backward of one batch under the plan; returns the mean loss over the global batch.

        Args:
            inputs: The global batch (leading dim ``layout.global_batch_size``; each
                data-parallel rank takes its slice) or this rank's slice (leading dim
                ``micro_batch_size · num_micro_batches``): a tensor, positional
                tensors, or keyword tensors such as ``{"input_ids": ..., "attention_mask": ...}``.
                The same on every rank.
            targets: Targets, batched like ``inputs``.
            loss_fn: ``loss_fn(output, target)`` → mean loss of one micro-batch; the
                output is what the model's forward returns (logits, a dict, a ``ModelOutput``).
                Under tensor parallelism a vocabulary-split head's logits are ``Shard(-1)``
                DTensors and the loss runs under ``loss_parallel()`` (``F.cross_entropy`` at
                V/t per rank); a loss it cannot run exactly gets the gathered logits.
            loss_parallel: False: every loss gets the gathered logits (full vocabulary on
                every tensor-parallel rank), e.g. for a loss that needs them whole.

        Returns:
            The global-batch mean loss (a detached scalar, the same on every rank).
        """
        from torch.distributed.tensor.experimental import implicit_replication

        from autopar.emit.loss import maybe_loss_parallel

        xs = {k: self._local(v) for k, v in self._keywords(inputs).items()}
        y = self._local(targets)
        parallel = loss_parallel and self._own_loss_op is None and self._role.last and self.plan.layout.tp > 1
        self._loss_slot.parallel = parallel
        # the whole step, backward included: loss_parallel's handlers fuse the loss's backward
        with self._step_rng(), implicit_replication(), maybe_loss_parallel(parallel):
            # tensors the program makes (masks) act as replicated
            loss = self._accumulate(xs, y, loss_fn) if self._schedule is None else self._pipeline(xs, y, loss_fn)
        from autopar.emit.tied import sum_tied_grads
        from autopar.emit.grads import reduce_grads

        reduce_grads(self.parts)  # once per step, not in every optimizer kernel
        sum_tied_grads(self.parts, self._program.tied, self.mesh)
        self._steps += 1
        return self._global_mean(loss)

    def _keywords(self, inputs: Batch) -> dict[str, torch.Tensor]:
        names = self._program.input_names
        if isinstance(inputs, Mapping):
            if set(inputs) != set(names):
                raise UserInputError(f"inputs {sorted(inputs)} differ from the example inputs {sorted(names)}")
            return dict(inputs)
        values = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
        if len(values) != len(names):
            raise UserInputError(f"{len(values)} inputs given, the example inputs had {len(names)} ({list(names)})")
        return dict(zip(names, values, strict=True))

    @contextlib.contextmanager
    def _step_rng(self) -> Iterator[None]:
        """Seed this step's randomness (dropout) alike on every tp rank of a (pp, dp) position.

        Replicated activations then get identical dropout masks across the
        tensor-parallel group, and a seed replays the same masks run after run.
        Sharded activations get independent masks: DTensor's offset-based
        tracker on CUDA, ``autopar.emit.rng.ShardSeedTracker`` on CPU. The caller's RNG state is restored.
        """
        from autopar.emit.rng import shard_seeded_dropout

        seed = hash((self._seed, self._steps, axis_rank(self.mesh, MeshAxis.PP),
                     axis_rank(self.mesh, MeshAxis.DP))) % (2**63)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []), \
                shard_seeded_dropout(self.device):
            torch.manual_seed(seed)
            yield

    def _local(self, batch: torch.Tensor) -> torch.Tensor:
        """This data-parallel rank's rows of ``batch``, on this rank's device."""
        lay = self.plan.layout
        local = lay.micro_batch_size * lay.num_micro_batches
        n = batch.shape[0]
        if n == local * lay.dp and lay.dp > 1:
            start = axis_rank(self.mesh, MeshAxis.DP) * local
            batch = batch[start : start + local]
        elif n != local:
            raise UserInputError(
                f"batch of {n} samples does not match the plan: global batch {lay.global_batch_size} "
                f"(dp {lay.dp} × micro-batch {lay.micro_batch_size} × {lay.num_micro_batches} micro-batches) "
                f"or {local} per data-parallel rank"
            )
        return batch.to(self.device, non_blocking=True)

    def _accumulate(self, xs: dict[str, torch.Tensor], y: torch.Tensor, loss_fn: LossFn) -> torch.Tensor:
        from torch.distributed.fsdp import FSDPModule

        module = self.parts[0]
        nmb = self.plan.layout.num_micro_batches
        x_chunks = {k: v.chunk(nmb) for k, v in xs.items()}
        total = torch.zeros((), device=self.device)
        # ZeRO 0-2 unshard once per step, as priced (comm.fsdp_gathers_per_step): FSDP2 reshards after every
        # backward unless told not to, and replicate's unshard is a copy of every parameter (a one-rank shard group)
        keep_gathered = self.plan.layout.zero_stage != 3
        for i, y_mb in enumerate(y.chunk(nmb)):
            if isinstance(module, FSDPModule):  # reduce gradients once, after the last micro-batch
                module.set_requires_gradient_sync(i == nmb - 1)
                if keep_gathered:  # FSDP2 reshards after every backward unless told not to
                    module.set_reshard_after_backward(i == nmb - 1)
            self._loss_slot.fn = loss_fn
            loss = self._loss_slot(module(**{k: c[i] for k, c in x_chunks.items()}), y_mb)
            (loss / nmb).backward()
            total += loss.detach().float()
        return total / nmb

    def _pipeline(self, xs: dict[str, torch.Tensor], y: torch.Tensor, loss_fn: LossFn) -> torch.Tensor:
        assert self._schedule is not None
        self._loss_slot.fn = loss_fn
        losses: list[torch.Tensor] = []
        kwargs = xs if self._role.first else {}
        target = y if self._role.last else None
        self._schedule.step(target=target, losses=losses, return_outputs=False, **kwargs)
        if not self._role.last:
            return torch.zeros((), device=self.device)
        return torch.stack([loss.detach().float() for loss in losses]).mean()

    def _global_mean(self, loss: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        lay = self.plan.layout
        share = loss if self._role.last else torch.zeros_like(loss)
        share = share / (lay.dp * lay.tp)  # every (dp, tp) rank of the last stage holds one copy
        if dist.get_world_size() > 1:
            dist.all_reduce(share)
        return share

    # ---- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Sharded model state (DTensors) of the local parts, keyed by the original parameter names."""
        from autopar.emit.checkpoint import model_state_dict

        return model_state_dict(self.parts)

    def load_state_dict(self, state_dict: dict[str, Any], *, strict: bool = True) -> None:
        """Load model state: sharded (as ``state_dict()`` returns) or full plain tensors (any rank layout).

        Args:
            state_dict: Parameter name → tensor. Full tensors (e.g. a single-process
                model's ``state_dict()``) are split as the plan says.
            strict: Raise if a local parameter has no entry.
        """
        from autopar.emit.checkpoint import load_model_state_dict

        load_model_state_dict(self.parts, state_dict, strict=strict)

    def save(self, path: str | Path, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Save model (and optimizer) state to a directory with ``torch.distributed.checkpoint``.

        Every rank must call it. The checkpoint can be loaded under any other plan.
        """
        from autopar.emit.checkpoint import save_checkpoint

        save_checkpoint(self, path, optimizer)

    def load(self, path: str | Path, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Load model (and optimizer) state saved by ``save`` under this or any other plan."""
        from autopar.emit.checkpoint import load_checkpoint

        load_checkpoint(self, path, optimizer)
