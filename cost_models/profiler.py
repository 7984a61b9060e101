"""Profile every distinct (op, shapes, dtypes) of a captured graph on the local device.

    table = profile_graph(graph, progress=lambda done, total: ...)   # CUDA if present, else CPU
    table.save("calibration.json")

Each op is rebuilt from its ATen target (``torch.ops.aten.<name>.<overload>``),
its recorded input shapes and dtypes and its recorded scalar arguments, run on
random inputs of those shapes, and checked to produce the captured output shapes.
Forward time is the median of repeats after warm-up (CUDA events on a GPU,
``perf_counter`` on CPU); backward time is that of ``torch.autograd.grad`` through
the op with a random output gradient, less the autograd engine's fixed start-up
(measured once), for the inputs that need a gradient in training.

Ops that cannot be rebuilt (a scalar argument capture did not record, a kernel the
device lacks) are listed in ``CalibrationTable.skipped`` with the reason, and the
compute model prices them by the roofline. torch is imported here only.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from autopar.cost_models.calibration import FLOAT_DTYPES, CalibrationTable, cast_float_inputs, op_key
from autopar.cost_models.compute import layer_grad_inputs
from autopar.cost_models.op_call import OpCall, RebuildError, build_call
from autopar.graph.ir import Op, OpGraph

log = logging.getLogger(__name__)

DEFAULT_REPEATS = 7
"""Timed samples per op; the median is kept (robust to a stray slow sample)."""
DEFAULT_WARMUP = 2
"""Untimed runs first: allocator warm-up, lazy kernel loading, caches."""
MIN_SAMPLE_S = 2e-4
"""A sample repeats a fast op until it lasts this long, so timer resolution and Python overhead average out."""
MAX_INNER_REPEATS = 200
"""Upper bound on those repetitions."""
ENGINE_CHAIN_LENGTH = 8
"""Nodes in the view chain used to separate autograd's per-call start-up from its per-node cost."""

Progress = Callable[[int, int], None]


def profile_graph(graph: OpGraph, *, device: str | None = None, repeats: int = DEFAULT_REPEATS,
                  warmup: int = DEFAULT_WARMUP, dtype: str | None = None,
                  progress: Progress | None = None) -> CalibrationTable:
    """Measure forward and backward time of each distinct op of ``graph`` on ``device``.

    Args:
        graph: the captured graph.
        device: ``"cuda"``, ``"cuda:1"``, ``"cpu"``; None picks CUDA when available.
        repeats: timed samples per op (median kept).
        warmup: untimed runs before timing.
        dtype: cast floating-point inputs to this dtype (e.g. ``"bfloat16"`` to profile bf16 training
            from an fp32 capture); None runs the captured dtypes.
        progress: called as ``progress(done, total)`` after each distinct op.

    Returns:
        The table, keyed by ``op_key`` at the captured shapes and the profiled dtypes, with the ops
        that could not be run listed in ``skipped``.
    """
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    todo = _distinct_ops(graph, dtype)
    engine_s = _autograd_startup_s(dev, repeats=repeats, warmup=warmup)
    entries: dict[str, tuple[float, float]] = {}
    skipped: dict[str, str] = {}
    for i, (key, op, grads) in enumerate(todo):
        try:
            call = build_call(op, dev, dtype)
            entries[key] = _profile_call(call, grads, dev, repeats=repeats, warmup=warmup, engine_s=engine_s)
        except RebuildError as e:
            skipped[key] = str(e)
            log.info("not profiled %s: %s", op.target, e)
        if progress is not None:
            progress(i + 1, len(todo))
    log.info("profiled %d ops on %s, %d skipped", len(entries), dev, len(skipped))
    return CalibrationTable(device_name=device_name(dev), torch_version=torch.__version__, entries=entries,
                            skipped=skipped, dtype=dtype)


def device_name(device: torch.device) -> str:
    """A device's name as calibration tables key it: the CUDA product name, or ``cpu:<model>``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu:{_cpu_model()}:{torch.get_num_threads()}threads"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _distinct_ops(graph: OpGraph, dtype: str | None) -> list[tuple[str, Op, tuple[bool, ...]]]:
    seen: dict[str, tuple[str, Op, tuple[bool, ...]]] = {}
    for layer in graph.layers:
        grads = layer_grad_inputs(layer)
        for op in layer.ops:
            key = op_key(op.target, cast_float_inputs(op.inputs, dtype), op.scalars)
            seen.setdefault(key, (key, op, grads[op.name]))
    return list(seen.values())


def _profile_call(call: OpCall, grads: Sequence[bool], dev: torch.device, *, repeats: int, warmup: int,
                  engine_s: float) -> tuple[float, float]:
    with torch.no_grad():
        forward = _median_time(lambda: call.fn(*call.args), dev, repeats=repeats, warmup=warmup)
    wanted = [i for i, (g, t) in enumerate(zip(grads, call.tensor_args)) if g and t.is_floating_point()]
    if not wanted:
        return forward, 0.0
    leaves = list(call.tensor_args)
    for i in wanted:
        leaves[i] = leaves[i].detach().requires_grad_(True)
    out = call.fn(*call.with_tensors(leaves))
    outs = [o for o in _flat_tensors(out) if o.requires_grad and o.is_floating_point()]
    if not outs:
        return forward, 0.0
    grad_outs = [torch.randn_like(o) for o in outs]
    inputs = [leaves[i] for i in wanted]
    backward = _median_time(lambda: torch.autograd.grad(outs, inputs, grad_outs, retain_graph=True,
                                                        allow_unused=True), dev, repeats=repeats, warmup=warmup)
    return forward, max(backward - engine_s, 0.0)


def _flat_tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _flat_tensors(v)]
    return []


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _median_time(fn: Callable[[], object], dev: torch.device, *, repeats: int, warmup: int) -> float:
    """Median seconds of one call of ``fn``: CUDA events on a GPU, perf_counter on CPU."""
    for _ in range(max(warmup, 1)):
        fn()
    _sync(dev)
    start = time.perf_counter()
    fn()
    _sync(dev)
    once = max(time.perf_counter() - start, 1e-9)
    inner = int(min(MAX_INNER_REPEATS, max(1, MIN_SAMPLE_S // once)))
    samples = [_sample(fn, dev, inner) for _ in range(repeats)]
    return statistics.median(samples)


def _sample(fn: Callable[[], object], dev: torch.device, inner: int) -> float:
    if dev.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3 / inner
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner


def _autograd_startup_s(dev: torch.device, *, repeats: int, warmup: int) -> float:
    """autograd's fixed cost per ``backward`` call (paid once per training step, not once per op).

    Measured as t(1 node) − per-node cost, the per-node cost from a chain of ``ENGINE_CHAIN_LENGTH`` views.
    """
    x = torch.zeros(1, device=dev, requires_grad=True)
    g = torch.ones(1, device=dev)

    def chain(n: int) -> Callable[[], object]:
        y = x
        for _ in range(n):
            y = y.view(1)
        return lambda: torch.autograd.grad(y, x, g, retain_graph=True)

    one = _median_time(chain(1), dev, repeats=repeats, warmup=warmup)
    many = _median_time(chain(ENGINE_CHAIN_LENGTH), dev, repeats=repeats, warmup=warmup)
    per_node = max(many - one, 0.0) / (ENGINE_CHAIN_LENGTH - 1)
    return max(one - per_node, 0.0)


__all__ = ["DEFAULT_REPEATS", "DEFAULT_WARMUP", "device_name", "profile_graph"]
