"""Profile every distinct (op, shapes, dtypes) of a captured graph on the local device.

    table = profile_graph(graph, progress=lambda done, total: ...)   # CUDA if present, else CPU
    table.save("calibration.json")

Each op is rebuilt from its ATen target (``torch.ops.aten.<name>.<overload>``),
its recorded input shapes and dtypes and its recorded scalar arguments, run on
random inputs of those shapes, and checked to produce the captured output shapes.
Forward time is the median of repeats after warm-up (CUDA events on a GPU, with
the L2 cache overwritten before each call; ``perf_counter`` on CPU) of the op as
training runs it, recording autograd's graph. Backward time is that of
``torch.autograd.grad`` through the op with a random output gradient, less the
autograd engine's fixed start-up (measured once), for the inputs that need a
gradient in training.

Ops that cannot be rebuilt (a scalar argument capture did not record, a kernel the
device lacks) are listed in ``CalibrationTable.skipped`` with the reason, and the
compute model prices them by the roofline. torch is imported here only.
"""

from __future__ import annotations

import difflib
import logging
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from autopar.cost_models.profiling.calibration import CalibrationTable, cast_float_inputs, op_key
from autopar.cost_models.compute import layer_grad_inputs
from autopar.cost_models.profiling.op_call import OpCall, RebuildError, build_call

from autopar._compat import StrEnum
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
CUDA_L2_FLUSH_BYTES = 256 * 2**20
"""Written before each timed CUDA call so inputs come from HBM as in a large model, not from L2 (50 MB on
H100); the same size Triton's ``do_bench`` clears."""
ENGINE_CHAIN_LENGTH = 8
"""Nodes in the view chain used to separate autograd's per-call start-up from its per-node cost."""

Progress = Callable[[int, int], None]


class Statistic(StrEnum):
    """How the timed samples of one op are summarised."""

    MEDIAN = "median"  # robust to a stray slow sample
    MIN = "min"  # the uncontended time on a machine shared with other processes


class Clock(StrEnum):
    """What a CPU sample measures (CUDA samples always use CUDA events)."""

    WALL = "wall"  # perf_counter: elapsed time
    THREAD = "thread"  # CPU time of the calling thread: immune to other processes, valid with one torch thread


@dataclass(frozen=True, slots=True, kw_only=True)
class Timing:
    """How each op is timed."""

    repeats: int = DEFAULT_REPEATS
    """Timed samples."""
    warmup: int = DEFAULT_WARMUP
    """Untimed runs first."""
    statistic: Statistic = Statistic.MEDIAN
    """Summary of the samples."""
    clock: Clock = Clock.WALL
    """CPU clock."""

    def __post_init__(self) -> None:
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError(f"timing needs repeats >= 1 and warmup >= 0, got {self.repeats}, {self.warmup}")


def profile_graph(graph: OpGraph, *, device: str | None = None, repeats: int = DEFAULT_REPEATS,
                  warmup: int = DEFAULT_WARMUP, dtype: str | None = None, statistic: str = "median",
                  clock: str = "wall", progress: Progress | None = None,
                  batch_graphs: Mapping[float, OpGraph] | None = None) -> CalibrationTable:
    """Measure forward and backward time of each distinct op of ``graph`` on ``device``.

    Args:
        graph: the captured graph.
        device: ``"cuda"``, ``"cuda:1"``, ``"cpu"``; None picks CUDA when available.
        repeats: timed samples per op.
        warmup: untimed runs before timing.
        dtype: cast floating-point inputs to this dtype (e.g. ``"bfloat16"`` to profile bf16 training
            from an fp32 capture); None runs the captured dtypes.
        statistic: ``"median"`` of the samples (default), or ``"min"``: on a shared machine where
            other processes steal time, the fastest sample is the best estimate of the op alone.
        clock: on CPU, ``"wall"`` time (default) or ``"thread"`` CPU time of the calling thread, which
            other processes cannot inflate; use it only with ``torch.set_num_threads(1)``.
        progress: called as ``progress(done, total)`` after each distinct op.
        batch_graphs: the same model captured at other batch sizes, by batch scale (that batch / ``graph``'s):
            their ops are timed too and kept under ``graph``'s keys (``CalibrationTable.batch_entries``), matched
            by position (layer, then op along the common runs of targets; a graph of another number of layers
            raises ``ValueError``).

    Returns:
        The table, keyed by ``op_key`` at the captured shapes and the profiled dtypes, with the ops
        that could not be run listed in ``skipped``.
    """
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    timing = Timing(repeats=repeats, warmup=warmup, statistic=Statistic(statistic), clock=Clock(clock))
    others = {scale: _matching_keys(graph, other, dtype) for scale, other in (batch_graphs or {}).items()}
    own_ops = _distinct_ops(graph, dtype)
    own = {key for key, *_ in own_ops}
    todo = own_ops + [op for other in (batch_graphs or {}).values() for op in _distinct_ops(other, dtype)]
    todo = list({key: (key, op, grads, producers) for key, op, grads, producers in todo}.values())
    engine_s = _autograd_startup_s(dev, timing)
    timed: dict[str, tuple[float, float]] = {}
    skipped: dict[str, str] = {}
    for i, (key, op, grads, producers) in enumerate(todo):
        try:
            call = build_call(op, dev, dtype, producers)
            timed[key] = _profile_call(call, grads, dev, timing, engine_s=engine_s)
        except RebuildError as e:
            skipped[key] = str(e)
            log.info("not profiled %s: %s", op.target, e)
        except (RuntimeError, NotImplementedError) as e:  # e.g. an op without a derivative formula
            skipped[key] = f"{op.target}: timing failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log.info("not profiled %s: %s", op.target, e)
        if progress is not None:
            progress(i + 1, len(todo))
    entries = {key: t for key, t in timed.items() if key in own}
    batch_entries: dict[str, dict[float, tuple[float, float]]] = {}
    for scale, keys in others.items():
        for key, other_key in keys.items():
            if key in entries and other_key in timed:
                batch_entries.setdefault(key, {})[scale] = timed[other_key]
    log.info("profiled %d ops on %s, %d skipped", len(timed), dev, len(skipped))
    return CalibrationTable(device_name=device_name(dev), torch_version=torch.__version__, entries=entries,
                            skipped={k: v for k, v in skipped.items() if k in own}, dtype=dtype,
                            batch_entries=batch_entries)


def _matching_keys(graph: OpGraph, other: OpGraph, dtype: str | None) -> dict[str, str]:
    """``graph``'s op keys → the keys of the same ops in ``other`` (the model at another batch size).

    Layer by layer, ops are paired along the longest common runs of targets: a batch of 1 can drop an op
    (``torch.export`` specializes a broadcast ``expand`` away), and an op without a twin keeps only its
    captured-size measurement.
    """
    if len(graph.layers) != len(other.layers):
        raise ValueError(f"the graphs to profile at other batch sizes must be the same model: {len(graph.layers)} "
                         f"layers vs {len(other.layers)}")
    keys: dict[str, str] = {}
    for layer, twin in zip(graph.layers, other.layers):
        targets = difflib.SequenceMatcher(None, [op.target for op in layer.ops], [op.target for op in twin.ops],
                                          autojunk=False)
        for i, j, n in targets.get_matching_blocks():
            for op, same in zip(layer.ops[i:i + n], twin.ops[j:j + n]):
                keys.setdefault(op_key(op.target, cast_float_inputs(op.inputs, dtype), op.scalars),
                                op_key(same.target, cast_float_inputs(same.inputs, dtype), same.scalars))
    return keys


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


def _distinct_ops(graph: OpGraph, dtype: str | None) -> list[tuple[str, Op, tuple[bool, ...], Mapping[str, Op]]]:
    """(key, op, inputs needing a gradient, the graph's ops by name) of each distinct op key of ``graph``."""
    producers = {op.name: op for op in graph.ops}
    seen: dict[str, tuple[str, Op, tuple[bool, ...], Mapping[str, Op]]] = {}
    for layer in graph.layers:
        grads = layer_grad_inputs(layer)
        for op in layer.ops:
            key = op_key(op.target, cast_float_inputs(op.inputs, dtype), op.scalars)
            seen.setdefault(key, (key, op, grads[op.name], producers))
    return list(seen.values())


def _profile_call(call: OpCall, grads: Sequence[bool], dev: torch.device, timing: Timing, *,
                  engine_s: float) -> tuple[float, float]:
    """(forward_s, backward_s): forward as training runs it (recording autograd's graph), then backward."""
    wanted = [i for i, (g, t) in enumerate(zip(grads, call.tensor_args)) if g and t.is_floating_point()]
    leaves = list(call.tensor_args)
    for i in wanted:
        leaves[i] = leaves[i].detach().requires_grad_(True)
    args = call.with_tensors(leaves)
    forward = time_call(lambda: call.fn(*args), dev, timing)
    outs = [o for o in _flat_tensors(call.fn(*args)) if o.requires_grad and o.is_floating_point()]
    if not outs:
        return forward, 0.0
    grad_outs = [torch.randn_like(o) for o in outs]
    inputs = [leaves[i] for i in wanted]
    backward = time_call(lambda: torch.autograd.grad(outs, inputs, grad_outs, retain_graph=True, allow_unused=True),
                         dev, timing)
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


def time_call(fn: Callable[[], object], dev: torch.device, timing: Timing = Timing()) -> float:
    """Seconds of one call of ``fn`` (median or min of samples): CUDA events on a GPU, perf_counter on CPU."""
    for _ in range(max(timing.warmup, 1)):
        fn()
    _sync(dev)
    start = time.perf_counter()
    fn()
    _sync(dev)
    once = max(time.perf_counter() - start, 1e-9)
    inner = int(min(MAX_INNER_REPEATS, max(1, MIN_SAMPLE_S // once)))
    samples = [_sample(fn, dev, inner, timing.clock) for _ in range(timing.repeats)]
    return statistics.median(samples) if timing.statistic is Statistic.MEDIAN else min(samples)


def _sample(fn: Callable[[], object], dev: torch.device, inner: int, clock: Clock) -> float:
    if dev.type == "cuda":
        return _cuda_sample(fn, dev, inner)
    now = time.thread_time if clock is Clock.THREAD else time.perf_counter
    start = now()
    for _ in range(inner):
        fn()
    return (now() - start) / inner


def _cuda_sample(fn: Callable[[], object], dev: torch.device, inner: int) -> float:
    """Mean of ``inner`` calls, each after the L2 cache was overwritten, timed by CUDA events around the call."""
    flush = torch.empty(CUDA_L2_FLUSH_BYTES // 4, dtype=torch.float32, device=dev)
    total_ms = 0.0
    for _ in range(inner):
        flush.zero_()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        total_ms += begin.elapsed_time(end)
    return total_ms / 1e3 / inner


def _autograd_startup_s(dev: torch.device, timing: Timing) -> float:
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

    one = time_call(chain(1), dev, timing)
    many = time_call(chain(ENGINE_CHAIN_LENGTH), dev, timing)
    per_node = max(many - one, 0.0) / (ENGINE_CHAIN_LENGTH - 1)
    return max(one - per_node, 0.0)


__all__ = ["DEFAULT_REPEATS", "DEFAULT_WARMUP", "Clock", "Statistic", "Timing", "device_name", "profile_graph",
           "time_call"]
