"""Run a function on N CPU processes joined in a gloo process group, and collect what each returns.

Processes come from a ``forkserver`` that has already imported torch,
torch.distributed, transformers' Llama and the workers, so a spawn costs a fork,
not ~8 s of imports per rank (the suite must fit in a few minutes on 2 cores);
``run_spmd_cases`` runs many cases in one process group.
The rendezvous store lives in this (the test) process on a port the OS picks, so
concurrent test runs never collide. Each rank runs with one intra-op thread.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import queue
import traceback
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

PRELOAD = [
    "torch",
    "torch.distributed",
    "torch.distributed.tensor",
    "torch.distributed.tensor.parallel",
    "torch.distributed.fsdp",
    "torch.distributed.pipelining",
    "torch.distributed.checkpoint",
    "torch.distributed.checkpoint.state_dict",
    "torch.distributed.tensor.experimental",
    "torch.export._trace",
    "transformers.models.llama.modeling_llama",
    "transformers.masking_utils",
    "autopar.api",
    "autopar.emit.build",
    "autopar.emit.checkpoint",
    "autopar.emit.parallelize",
    "autopar.emit.program",
    "tests.emit.zoo",
    "tests.emit.workers",
    "tests.emit.matrix_workers",
]
"""Modules the fork server imports once, before any rank is forked."""

_CTX: Any = None


def _context() -> Any:
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(PRELOAD)
    return _CTX


def _entry(rank: int, world: int, port: int | None, target: str, args: Sequence[Any], results: Any) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["TORCH_DISTRIBUTED_DEBUG"] = "OFF"
    os.environ["LOCAL_RANK"] = str(rank)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        if port is not None:
            store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60))
            dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=120))
        module, _, name = target.partition(":")
        value = getattr(importlib.import_module(module), name)(*args)
        results.put((rank, "ok", value))
    except BaseException:  # report every failure to the test process, which re-raises it
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_spmd(target: str, world: int, *args: Any, timeout_s: float = 240.0, init_group: bool = True) -> list[Any]:
    """Run ``module:function(*args)`` on ``world`` ranks; return the values by rank.

    With ``init_group=False`` (one rank only) no process group is created, as in
    a plain ``python script.py`` run.

    Raises:
        RuntimeError: A rank raised (its traceback is in the message) or the run
            exceeded ``timeout_s``.
    """
    import torch.distributed as dist

    ctx = _context()
    if not init_group and world != 1:
        raise ValueError(f"init_group=False needs world 1, got {world}")
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False) if init_group else None
    port = store.port if store is not None else None
    results = ctx.Queue()
    procs = [ctx.Process(target=_entry, args=(r, world, port, target, args, results), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    values: dict[int, Any] = {}
    try:
        while len(values) < world:
            try:
                rank, status, value = results.get(timeout=timeout_s)
            except queue.Empty as e:
                raise RuntimeError(f"{target} on {world} ranks timed out after {timeout_s} s; "
                                   f"finished ranks: {sorted(values)}") from e
            if status != "ok":
                raise RuntimeError(f"rank {rank} of {world} failed in {target}:\n{value}")
            values[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    return [values[r] for r in range(world)]


def run_cases(target: str, cases: Sequence[tuple[str, Sequence[Any]]]) -> dict[str, tuple[str, Any]]:
    """Rank code of ``run_spmd_cases``: ``target(*args)`` per case, in order, in this rank's process group.

    A case that raises is reported as ``("error", traceback)``. After each case the ranks agree (one
    all-reduce) whether any of them failed; if one did, the cases left are not run (``("not run", why)``):
    the ranks may no longer be in step.
    """
    import torch
    import torch.distributed as dist

    module, _, name = target.partition(":")
    fn = getattr(importlib.import_module(module), name)
    out: dict[str, tuple[str, Any]] = {}
    failed = ""
    for key, args in cases:
        if failed:
            out[key] = ("not run", f"an earlier case of the same process group failed: {failed}")
            continue
        try:
            out[key] = ("ok", fn(*args))
        except BaseException:
            out[key] = ("error", traceback.format_exc())
        flag = torch.tensor([float(out[key][0] != "ok")])
        dist.all_reduce(flag)
        if flag.item():
            failed = key
    return out


def run_spmd_cases(target: str, world: int, cases: Sequence[tuple[str, Sequence[Any]]], *,
                   timeout_s: float = 600.0) -> dict[str, list[tuple[str, Any]]]:
    """Run ``module:function(*args)`` for every case in one process group of ``world`` ranks; per case, the
    (status, value) of each rank by rank (``run_cases``).

    One process group for many cases spares each case a group's start and its lazy imports. A long-lived group
    is not always quicker: every DeviceMesh adds gloo subgroups that live as long as the group (the 16-architecture
    matrix took 505 s in one group against 394 s in one group each), so group a few cases, not a whole file.
    """
    per_rank = run_spmd("tests.emit.harness:run_cases", world, target, list(cases), timeout_s=timeout_s)
    return {key: [rank[key] for rank in per_rank] for key, _ in cases}


def values(results: list[tuple[str, Any]], what: str) -> list[Any]:
    """The per-rank values of one case of ``run_spmd_cases``; raises if a rank failed or the case did not run."""
    for rank, (status, value) in enumerate(results):
        if status != "ok":
            raise RuntimeError(f"{what}: rank {rank} of {len(results)}: {status}:\n{value}")
    return [value for _, value in results]
