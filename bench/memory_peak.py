"""Where one layout's memory peaks: the heap after every op of a step, and the tensors alive at the peak op.

    python bench/plan_regret.py --models gpt --ranks 2 --memory-only --out bench/out/mem   # cluster + table
    python bench/memory_peak.py gpt "dp2 tp1 pp1 mb1x4 zero3 rc=none" --cluster-dir bench/out/mem

Re-plans ``plan_regret``'s model on the cluster file and op table a ``plan_regret`` run saved (so the plan,
its stage boundaries and its sharding are the ones that run measured), runs the layout on its ranks with
``autopar.parallelize`` + AdamW for two warm-up steps, then measures one step twice: first the tensor bytes
after every ATen op (glibc's heap less the heap that is not tensors, as
``cost_models/profiling/tensor_memory.py``), then, at the op where that peaked, every live CPU tensor storage
(shape of the first view found, dtype, whether it was alive at the step's start). Each rank prints the ops
around its peak and the largest storages alive there, grouped by shape. This is how the memory terms of
``cost_models/program_memory.py`` were found; it is a diagnostic, not a test.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import plan_regret  # noqa: E402
import regret_worker  # noqa: E402

from autopar.cost_models.profiling.tensor_memory import heap_in_use  # noqa: E402


def _storages() -> dict[int, tuple[int, tuple[int, ...], str]]:
    """data_ptr → (bytes, shape of the first view found, dtype) of every live CPU tensor storage."""
    from torch.distributed.tensor import DTensor

    found: dict[int, tuple[int, tuple[int, ...], str]] = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and not issubclass(type(obj), DTensor) and obj.device.type == "cpu":
            try:
                storage = obj.untyped_storage()
                ptr = storage.data_ptr()
            except RuntimeError:
                continue
            if ptr and ptr not in found:
                found[ptr] = (storage.nbytes(), tuple(obj.shape), str(obj.dtype).removeprefix("torch."))
    return found


class _Trace(TorchDispatchMode):
    """Heap after every op; at op ``stop_at``, the live storages."""

    def __init__(self, stop_at: int | None = None) -> None:
        super().__init__()
        self.rows: list[tuple[str, int]] = []
        self.stop_at = stop_at
        self.snapshot: dict[int, tuple[int, tuple[int, ...], str]] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self.rows.append((str(func), heap_in_use()))
        if len(self.rows) - 1 == self.stop_at:
            self.snapshot = _storages()
        return out


def _traced_step(step: Any, stop_at: int | None) -> tuple[_Trace, dict[int, Any], int]:
    with _Trace():  # the mode's own first-use allocations happen here
        torch.zeros(1).add_(1)
    gc.collect()
    start = _storages()
    not_tensors = heap_in_use() - sum(v[0] for v in start.values())
    with _Trace(stop_at) as trace:
        step()
    return trace, start, not_tensors


def run_rank(rank: int, world: int, port: int, spec: dict[str, Any], text: str) -> None:
    import torch.distributed as dist

    from autopar.emit.parallelize import parallelize
    from autopar.plan import Plan

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    plan = Plan.from_json(text)
    seq, vocab, batch = spec["seq_len"], spec["vocab"], plan.layout.global_batch_size
    pm = parallelize(regret_worker.build_model(spec), (torch.zeros(2, seq, dtype=torch.long),), plan=plan, seed=0)
    opt = pm.optimizer(torch.optim.AdamW, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, vocab, (batch, seq), generator=g) for _ in range(2))

    def step() -> None:
        pm.step(x, y, regret_worker.loss_fn)
        opt.step()
        opt.zero_grad()

    for _ in range(regret_worker.WARMUP_STEPS):
        step()
    first, _, not_tensors = _traced_step(step, None)
    levels = [heap - not_tensors for _, heap in first.rows]
    peak = max(range(len(levels)), key=levels.__getitem__)
    second, start, _ = _traced_step(step, peak)
    lines = [f"rank {rank}: {sum(v[0] for v in start.values()) / 1e6:.2f} MB of tensors at the step's start, "
             f"peak {levels[peak] / 1e6:.2f} MB after op {peak} ({first.rows[peak][0]})"]
    lines += [f"  {i:5d} {first.rows[i][0]:48s} {levels[i] / 1e6:8.2f} MB" for i in range(max(0, peak - 8), peak + 2)]
    grouped: Counter[tuple[tuple[int, ...], str, bool]] = Counter()
    counts: Counter[tuple[tuple[int, ...], str, bool]] = Counter()
    for ptr, (nbytes, shape, dtype) in second.snapshot.items():
        grouped[(shape, dtype, ptr in start)] += nbytes
        counts[(shape, dtype, ptr in start)] += 1
    lines += [f"  {n / 1e6:8.2f} MB  {counts[k]:3d} × {k[0]} {k[1]}{'  (alive at the start)' if k[2] else ''}"
              for k, n in grouped.most_common(16)]
    print("\n".join(lines), flush=True)
    dist.destroy_process_group()


def main() -> None:
    import torch.multiprocessing as mp

    import autopar
    from autopar.cost_models.profiling.calibration import CalibrationTable
    from autopar.cost_models.profiling.local_worker import free_port

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=list(plan_regret.MODELS))
    parser.add_argument("layout", help="a layout as plan_regret prints it")
    parser.add_argument("--ranks", type=int, default=2, help="the cluster's ranks (plan_regret's --ranks)")
    parser.add_argument("--cluster-dir", type=Path, default=Path("bench/out/plan_regret"))
    args = parser.parse_args()
    spec = plan_regret.MODELS[args.model]
    calibration = CalibrationTable.load(args.cluster_dir / f"{args.model}_local{args.ranks}_calib.json")
    plans = autopar.plan_ranked(regret_worker.build_model(spec), (torch.zeros(2, plan_regret.SEQ_LEN, dtype=torch.long),),
                                cluster=args.cluster_dir / f"local{args.ranks}.yaml",
                                global_batch_size=plan_regret.GLOBAL_BATCH, dtype="float32", calibration=calibration,
                                top_k=1000)
    plan = next((p for p in plans if p.layout.describe() == args.layout), None)
    if plan is None:
        raise SystemExit(f"no layout {args.layout!r}; the plans are: {[p.layout.describe() for p in plans]}")
    print(f"predicted live tensors {plan_regret.predicted_live_bytes(plan) / 1e6:.2f} MB per rank at most")
    mp.start_processes(run_rank, args=(plan.layout.num_gpus, free_port(), spec, plan.to_json(indent=None)),
                       nprocs=plan.layout.num_gpus, join=True, start_method="spawn")


if __name__ == "__main__":
    main()
