"""DTensor's host time on one rank of a tensor-parallel group (``local_worker`` runs it on every rank at once).

A tensor-parallel stage emitted by ``autopar.emit.tp`` runs every op on DTensors, issues its collectives
through DTensor's redistributions, and wraps each weight-holding block child's input in Megatron's *f*
(``DTensor.from_local(x.to_local())``). Where the host runs the kernels (a CPU rank) each of the three
costs host time that a plain program does not pay; each is measured apart, as the emitted program does it:

- per op (``dtensor_op_s``, ``dtensor_backward_op_s``): a column-parallel then row-parallel projection pair
  (weights ``Shard(0)`` / ``Shard(1)``, as ``emit.tp`` places them) and a norm on a replicated input, against
  the same ops on each rank's plain shards, over the ATen ops the plain forward dispatches;
- per collective (``dtensor_collective_s``): a ``Partial`` → ``Replicate`` redistribution (DTensor's
  functional all-reduce and its wait) against gloo's own all-reduce of the same bytes, which the cluster's
  collective fits time;
- per *f* (``dtensor_hook_s``, ``dtensor_hook_backward_s``): ``from_local(to_local(x))`` on a replicated input
  whose gradient arrives replicated (no collective), against the same step without it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from autopar.cost_models.profiling.probe import PROBE_REPEATS
from autopar.cost_models.profiling.profiler import Clock, Statistic, Timing, time_call

DTENSOR_PROBE_SHAPE = (2, 8, 32)
"""(batch, sequence, hidden) of the DTensor probes: small, so their kernels take little next to dispatch."""
_CPU = torch.device("cpu")


def _timing() -> Timing:
    """The median sample: a step pays these costs thousands of times, so their typical value, not their fastest
    (even a step's fastest run is a sum over thousands of ops, whose noise does not all vanish at once)."""
    return Timing(repeats=PROBE_REPEATS, warmup=2, statistic=Statistic.MEDIAN, clock=Clock.WALL)


def _count_ops(fn: Callable[[], Any]) -> int:
    """ATen ops ``fn`` dispatches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
            Count.ops += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.ops


def _probe_ops(x: torch.Tensor, y: torch.Tensor, weights: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A norm on ``y``; a column- then row-parallel projection pair on ``x`` (a partial sum where split)."""
    w_norm, w_up, w_down = weights
    h = torch.nn.functional.gelu(torch.nn.functional.linear(x, w_up))
    return torch.nn.functional.layer_norm(y, y.shape[-1:], w_norm), torch.nn.functional.linear(h, w_down)


def _fwd_bwd_s(forward: Callable[[], Sequence[torch.Tensor]],
               local: Callable[[torch.Tensor], torch.Tensor]) -> tuple[float, float]:
    """(forward, backward) seconds of ``forward`` and of the backward of its outputs' sum."""
    timing = _timing()
    forward_s = time_call(forward, _CPU, timing)

    def step() -> None:
        sum(local(t).sum() for t in forward()).backward()  # type: ignore[union-attr]

    return forward_s, max(0.0, time_call(step, _CPU, timing) - forward_s)


def op_overhead(mesh: Any) -> dict[str, float]:
    """Host seconds DTensor adds per forward op and per forward op's backward, on sharded weights."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    world, hidden = mesh.size(), DTENSOR_PROBE_SHAPE[-1]
    full = [torch.ones(hidden), torch.randn(4 * hidden, hidden), torch.randn(hidden, 4 * hidden)]
    dims = [None, 0, 1]  # the norm's weight replicated, the projections column- then row-split
    shards = [w if d is None else w.chunk(world, d)[0].contiguous() for w, d in zip(full, dims)]
    dtensors = [distribute_tensor(w, mesh, [Replicate() if d is None else Shard(d)]) for w, d in zip(full, dims)]
    x, y = torch.randn(*DTENSOR_PROBE_SHAPE), torch.randn(*DTENSOR_PROBE_SHAPE)
    num_ops = _count_ops(lambda: _probe_ops(x, y, shards))
    times = {}
    replicated = tuple(distribute_tensor(t, mesh, [Replicate()]) for t in (x, y))
    for name, inputs, weights in (("plain", (x, y), shards), ("dtensor", replicated, dtensors)):
        params = [w.detach().requires_grad_() for w in weights]
        # the row-parallel output's gradient arrives replicated, as after the emitted all-reduce's backward
        local = (lambda t: t.to_local(grad_placements=[Replicate()])) if name == "dtensor" else (lambda t: t)
        times[name] = _fwd_bwd_s(lambda: _probe_ops(inputs[0], inputs[1], params), local)  # noqa: B023
    (plain_f, plain_b), (dt_f, dt_b) = times["plain"], times["dtensor"]
    return {"dtensor_op_s": max(0.0, dt_f - plain_f) / num_ops,
            "dtensor_backward_op_s": max(0.0, dt_b - plain_b) / num_ops}


def collective_overhead(mesh: Any) -> float:
    """Host seconds a DTensor ``Partial`` → ``Replicate`` redistribution takes over gloo's all-reduce of its bytes."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    x = torch.randn(*DTENSOR_PROBE_SHAPE)
    partial = DTensor.from_local(x.clone(), mesh, [Partial()], run_check=False)
    raw = _lockstep_s(lambda: dist.all_reduce(x, group=mesh.get_group()))
    redistributed = _lockstep_s(lambda: partial.redistribute(placements=[Replicate()]).to_local())
    return max(0.0, redistributed - raw)


COLLECTIVE_SAMPLES = 40
"""Samples of each collective in ``collective_overhead`` (median), each ``COLLECTIVE_CALLS`` calls."""
COLLECTIVE_CALLS = 5


def _lockstep_s(fn: Callable[[], Any]) -> float:
    """Median seconds of one call of a collective ``fn``: a fixed number of calls on every rank (``time_call``
    sizes its loop on each rank's own first call, which could leave the ranks' collectives unmatched)."""
    for _ in range(COLLECTIVE_CALLS):
        fn()
    samples = []
    for _ in range(COLLECTIVE_SAMPLES):
        dist.barrier()
        start = time.perf_counter()
        for _ in range(COLLECTIVE_CALLS):
            fn()
        samples.append((time.perf_counter() - start) / COLLECTIVE_CALLS)
    return statistics.median(samples)


def hook_overhead(mesh: Any) -> dict[str, float]:
    """Host seconds of one Megatron *f* (``from_local(to_local(x))``), forward and backward."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

    x = distribute_tensor(torch.randn(*DTENSOR_PROBE_SHAPE), mesh, [Replicate()]).requires_grad_()

    def f(t: Any) -> Any:
        return DTensor.from_local(t.to_local(), mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride())

    def local(t: Any) -> Any:
        return t.to_local()

    times = {name: _fwd_bwd_s(lambda: (fn(x) * 2.0,), local)  # noqa: B023
             for name, fn in (("plain", lambda t: t), ("hook", f))}
    (plain_f, plain_b), (hook_f, hook_b) = times["plain"], times["hook"]
    return {"dtensor_hook_s": max(0.0, hook_f - plain_f), "dtensor_hook_backward_s": max(0.0, hook_b - plain_b)}


def measure_dtensor_host(world: int) -> dict[str, float]:
    """Every DTensor host term (``GPUSpec.dtensor_*``) on this rank of a ``world``-rank gloo group."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    result = op_overhead(mesh)
    dist.barrier()
    result["dtensor_collective_s"] = collective_overhead(mesh)
    dist.barrier()
    result.update(hook_overhead(mesh))
    return result
