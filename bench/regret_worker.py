"""One rank of ``bench/plan_regret.py``: runs every given plan with ``autopar.parallelize`` and times it.

Step time: each step starts and ends at a barrier, and the step's time is the slowest rank's
(an all-reduce MAX), so every rank sees the same samples and stops at the same step. Steps
repeat until ``WINDOW`` more samples no longer lower the minimum by ``TOLERANCE`` (or
``MAX_STEPS``). The minimum is the figure compared: on a machine shared with other processes a
sample is the step plus whatever they stole (the median is reported too, with the spread).

Peak memory per rank (the only measure with ``memory_only``: the warm-up steps and the measured step,
no timing loop): live tensor bytes of one extra step, started after ``zero_grad``
(``cost_models/profiling/tensor_memory.py``: glibc's heap in use read after every ATen op, less the heap
that is not tensors at the step's start), the largest over ranks.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from autopar.cost_models.profiling.fidelity import min_is_stable, spread
from autopar.cost_models.profiling.tensor_memory import peak_tensor_bytes

WARMUP_STEPS = 2
"""Untimed steps first (allocator warm-up, gloo connections of new groups)."""
WINDOW = 4
"""Samples that must fail to lower the minimum before timing stops."""
TOLERANCE = 0.03
"""Improvement of the minimum that still counts (3 %)."""
MAX_STEPS = 12
"""Cap on timed steps per layout."""


def build_model(spec: dict[str, Any]) -> torch.nn.Module:
    """The bench model on the meta device (``spec["family"]``: gpt or llama)."""
    with torch.device("meta"):
        if spec["family"] == "gpt":
            from autopar.examples.gpt import GPT, GPTConfig

            return GPT(GPTConfig(**spec["config"]))
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(**spec["config"]))


def loss_fn(output: Any, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of one micro-batch; ``output`` is the logits or, for a Hugging Face
    model, the ``ModelOutput`` the emitted program returns as ``model.forward`` does (its ``logits``)."""
    logits = output.logits if hasattr(output, "logits") else output
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def run_rank(rank: int, world: int, port: int, spec: dict[str, Any], plans: list[str], queue: Any,
             memory_only: bool = False) -> None:
    """Run each plan (JSON text) on this rank; rank 0 puts one result dict per plan on ``queue`` (if any).
    ``memory_only``: the warm-up steps and the measured step only (no timing loop)."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from autopar.plan import Plan

    try:
        for text in plans:
            plan = Plan.from_json(text)
            try:
                result = _measure(plan, spec, memory_only)
            except Exception as e:  # a layout the emitter refuses is reported, not fatal
                result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
            if rank == 0 and queue is not None:
                queue.put({"layout": plan.layout.describe(), **result})
            gc.collect()
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _measure(plan: Any, spec: dict[str, Any], memory_only: bool = False) -> dict[str, Any]:
    from autopar.emit.parallelize import parallelize

    seq, vocab = spec["seq_len"], spec["vocab"]
    example = (torch.zeros(2, seq, dtype=torch.long),)
    pm = parallelize(build_model(spec), example, plan=plan, seed=0)
    opt = pm.optimizer(torch.optim.AdamW, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (plan.layout.global_batch_size, seq), generator=g)
    y = torch.randint(0, vocab, (plan.layout.global_batch_size, seq), generator=g)

    def step() -> None:
        pm.step(x, y, loss_fn)
        opt.step()
        opt.zero_grad()

    for _ in range(WARMUP_STEPS):
        step()
    samples: list[float] = []
    while not memory_only and len(samples) < MAX_STEPS and not min_is_stable(samples, window=WINDOW, tolerance=TOLERANCE):
        dist.barrier()
        start = time.perf_counter()
        step()
        dist.barrier()
        took = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(took, op=dist.ReduceOp.MAX)
        samples.append(float(took.item()))
    peak = peak_tensor_bytes(step)
    peaks = [torch.zeros(1, dtype=torch.float64) for _ in range(dist.get_world_size())]
    dist.all_gather(peaks, torch.tensor([float(peak)], dtype=torch.float64))
    del pm, opt
    peak_bytes = max(float(p.item()) for p in peaks)
    if memory_only:
        return {"peak_bytes": peak_bytes}
    return {**timing_summary(samples), "samples": samples, "peak_bytes": peak_bytes}


def timing_summary(samples: list[float]) -> dict[str, Any]:
    """Minimum, median, spread and count of timed steps (every pass's samples of one layout together)."""
    return {"min_s": min(samples), "median_s": statistics.median(samples), "spread": spread(samples),
            "steps": len(samples)}
