"""FSDP2's host time per unit and micro-batch on one rank of a data-parallel group (``local_worker`` runs it on
every rank at once).

``autopar.emit.dp`` wraps every repeated block, and the stage root, as an FSDP2 unit (``replicate`` for ZeRO 0,
``fully_shard`` for ZeRO 1-3). Every micro-batch, each unit runs FSDP2's hooks on the host: pre-forward (unshard
or its wait, the post-backward hook's registration), post-forward, pre-backward and post-backward (gradient
accumulation while ``set_requires_gradient_sync(False)``). On a GPU they overlap the kernels queued before them;
on a CPU rank they add to the step.

Measured as the emitted program runs it: a stack of ``UNITS`` blocks with a block's worth of compute each, at
one and at ``MICRO_BATCHES`` micro-batches, synchronising gradients on the last only (``emit/runtime.py``),
against the same stack without FSDP2. The slope per unit and extra micro-batch is what FSDP2 adds; the
gradient reduction at the step's end is the same in both runs and cancels (the collectives are priced apart).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

UNITS = 4
"""Blocks in the probe stack (each an FSDP2 unit)."""
MICRO_BATCHES = 4
"""Micro-batches of the second run (the first has one)."""
HIDDEN, ROWS = 128, 512
"""Each block is Linear(HIDDEN, 4·HIDDEN) → GELU → Linear(4·HIDDEN, HIDDEN) on ROWS tokens: a few ms of compute
a micro-batch, as a transformer block of the bench models (a hook's cost on a busy core depends on the work
around it; with no work around them the same hooks took a third as long)."""
SAMPLES = 25
"""Samples of the four runs, in turns (the median of the per-sample slopes)."""


def _stack() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(HIDDEN, 4 * HIDDEN), nn.GELU(), nn.Linear(4 * HIDDEN, HIDDEN))
                           for _ in range(UNITS)])


def _step(model: nn.Module, x: torch.Tensor, wrapped: bool) -> Callable[[], float]:
    """A timed step of ``len(x)`` micro-batches (forward + backward each), every rank starting at a barrier."""
    micro_batches = len(x)

    def step() -> float:
        dist.barrier()
        start = time.perf_counter()
        for i in range(micro_batches):
            if wrapped:  # as ``emit/runtime.py`` accumulates: reduce and reshard after the last micro-batch only
                last = i == micro_batches - 1
                getattr(model, "set_requires_gradient_sync")(last)  # FSDP2's methods, added to the class it wraps
                getattr(model, "set_reshard_after_backward")(last)
            model(x[i]).sum().backward()
        took = time.perf_counter() - start
        for p in model.parameters():
            p.grad = None
        return took

    return step


def measure_fsdp_host(world: int) -> dict[str, float]:
    """``GPUSpec.fsdp_unit_s`` on this rank of a ``world``-rank gloo group: host seconds FSDP2 adds per unit and
    micro-batch (ZeRO 0's ``replicate``, the machinery every stage shares)."""
    from torch.distributed._composable.replicate_with_fsdp import replicate
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    plain = _stack()
    wrapped = _stack()
    for block in wrapped:
        replicate(block, mesh=mesh)
    replicate(wrapped, mesh=mesh)
    x = torch.randn(MICRO_BATCHES, ROWS, HIDDEN)
    steps = [_step(model, batch, is_wrapped) for model, is_wrapped in ((plain, False), (wrapped, True))
             for batch in (x, x[:1])]
    for step in steps * 3:  # warm-up
        step()
    samples = []
    for _ in range(SAMPLES):  # the four runs take turns, so a slow spell of the machine hits all of them
        plain_m, plain_1, wrapped_m, wrapped_1 = (step() for step in steps)
        samples.append((wrapped_m - wrapped_1) - (plain_m - plain_1))
    return {"fsdp_unit_s": max(0.0, statistics.median(samples)) / ((MICRO_BATCHES - 1) * UNITS)}
