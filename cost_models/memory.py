"""Memory per GPU: model states under ZeRO, saved activations, in-flight micro-batches, buffers.

Model states follow Rajbhandari et al. 2020 ("ZeRO", §3 and Fig. 1): mixed-precision
Adam keeps 2 bytes of bf16/fp16 weights, 2 of gradients and K = 12 of optimizer
state (fp32 master weights, momentum, variance) per parameter; ZeRO stages 1/2/3
shard the optimizer states, then the gradients, then the weights over the N_d
data-parallel ranks. fp32 training keeps 4 + 4 + 8 bytes.

Activations are measured from the captured graph (``Layer.saved``), not from a
transformer formula, then scaled to the micro-batch and the training dtype; the
recompute policy and tensor/sequence parallelism decide which of them stay and at
what size (Korthikanti et al. 2022).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Collection
from dataclasses import dataclass

from autopar.cost_models.profiling.calibration import FLOAT_DTYPES
from autopar.cost_models.dtensor_host import weight_children
from autopar.cost_models.layer_info import boundary_shapes, infer_seq_len, is_attention_core, layer_capture_dtype
from autopar.graph.ir import DTYPE_BYTES, Layer, SavedTensor, TensorMeta
from autopar.layout import MemoryBreakdown, Recompute, Schedule
from autopar.schedule import in_flight_per_stage

MIXED_PRECISION_BYTES_PER_PARAM = (2, 2, 12)
"""(weights, gradients, optimizer) bytes per parameter, bf16/fp16 mixed-precision Adam (ZeRO §3: 2 + 2 + K, K = 12)."""
FP32_BYTES_PER_PARAM = (4, 4, 8)
"""fp32 training with Adam: fp32 weights and gradients, two fp32 moments."""

ALLOCATOR_HEADROOM = 0.10
"""Fraction added on top of all tensors for allocator fragmentation.

PyTorch's caching allocator rounds requests up (512-byte blocks, 2 MiB segments for
small tensors, 20 MiB for large ones) and splits cached blocks between tensors of
varying sizes; the freed fragments cannot serve a larger request, so reserved memory
exceeds allocated memory. In LLM training the gap (``max_memory_reserved`` minus
``max_memory_allocated``; torchtitan logs both) is typically 5-15 % of allocated;
10 % is the middle of that range. Plans that fit only without it would OOM in practice.
"""
RUNTIME_RESERVED_BYTES = 2**30
"""Device memory outside the caching allocator: CUDA context (~300-500 MiB), cuBLAS workspaces and NCCL's
per-channel buffers (NCCL_BUFFSIZE 4 MiB × channels × peers); 1 GiB covers them on Ampere/Hopper."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelStateBytes:
    """Bytes of model states on one GPU."""

    params: int
    """Weights."""
    grads: int
    """Gradients."""
    optimizer: int
    """Optimizer states (with fp32 master weights under mixed precision)."""

    @property
    def total(self) -> int:
        """params + grads + optimizer."""
        return self.params + self.grads + self.optimizer


def bytes_per_param(dtype: str) -> tuple[int, int, int]:
    """(weights, gradients, optimizer) bytes per parameter for training in ``dtype``.

    Example:
        >>> bytes_per_param("bfloat16"), bytes_per_param("float32")
        ((2, 2, 12), (4, 4, 8))
    """
    if dtype in ("bfloat16", "float16"):
        return MIXED_PRECISION_BYTES_PER_PARAM
    if dtype == "float32":
        return FP32_BYTES_PER_PARAM
    raise ValueError(f"no model-state rule for training dtype {dtype!r}; use bfloat16, float16 or float32")


def estimate_model_state_bytes(num_params: int, *, zero_stage: int, dp: int,
                               dtype: str = "bfloat16") -> ModelStateBytes:
    """Weights, gradients and optimizer states per GPU under ZeRO stage 0-3 over ``dp`` ranks.

    ``num_params`` is what this GPU is responsible for before data parallelism (after TP/PP splits).

    Example:
        >>> s = estimate_model_state_bytes(7_500_000_000, zero_stage=1, dp=64)
        >>> round(s.total / 1e9, 1)   # ZeRO paper, Fig. 1: 31.4 GB
        31.4
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
    if dp < 1 or num_params < 0:
        raise ValueError(f"bad model-state inputs: num_params={num_params}, dp={dp}")
    p, g, k = bytes_per_param(dtype)
    shard = math.ceil(num_params / dp)
    return ModelStateBytes(
        params=(shard if zero_stage >= 3 else num_params) * p,
        grads=(shard if zero_stage >= 2 else num_params) * g,
        optimizer=(shard if zero_stage >= 1 else num_params) * k,
    )


# ---- activations ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SavedBytes:
    """Sizes of a set of saved tensors, split so the training dtype can be applied later."""

    float_numel: int
    """Elements of floating-point tensors (stored at the training dtype's width)."""
    other_bytes: int
    """Bytes of integer and bool tensors (ids, dropout masks), kept as captured."""

    def at(self, dtype: str) -> int:
        """Bytes when floats are stored as ``dtype``."""
        return self.float_numel * DTYPE_BYTES[dtype] + self.other_bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerActivations:
    """A layer's saved tensors at the captured batch, sorted by what recompute and TP do to them."""

    replicated: SavedBytes
    """Kept whole on every TP rank (LayerNorm inputs, residual-branch dropout masks)."""
    sharded: SavedBytes
    """Split over TP ranks (inside Megatron's column→row regions)."""
    core_replicated: SavedBytes
    """s×s attention-core tensors kept whole (dropped under selective recompute)."""
    core_sharded: SavedBytes
    """s×s attention-core tensors split over TP ranks (dropped under selective recompute)."""
    layer_input: SavedBytes
    """The layer's input tensors: all that full recomputation keeps."""


ShardedSpec = Callable[[SavedTensor], bool] | Collection[str] | None
"""Which saved tensors TP shards: a predicate, or a set of producer op names, or None (none)."""


def summarize_layer_activations(layer: Layer, *, sharded: ShardedSpec = None,
                                seq_len: int | None = None) -> LayerActivations:
    """Sort a layer's saved tensors into the categories of ``LayerActivations`` (cached per layer)."""
    if sharded is None or isinstance(sharded, (frozenset, set, tuple, list)):
        names = frozenset(sharded) if sharded is not None else frozenset()
        return _summary_cached(layer, names, seq_len)
    return _summary(layer, sharded, seq_len)


@functools.lru_cache(maxsize=1024)
def _summary_cached(layer: Layer, names: frozenset[str], seq_len: int | None) -> LayerActivations:
    return _summary(layer, lambda s: s.producer in names, seq_len)


def _summary(layer: Layer, sharded: Callable[[SavedTensor], bool] | Collection[str],
             seq_len: int | None) -> LayerActivations:
    is_sharded = sharded if callable(sharded) else (lambda s: s.producer in sharded)
    seq = seq_len if seq_len is not None else infer_seq_len(layer)
    shapes = boundary_shapes(layer)
    buckets: dict[tuple[bool, bool], list[TensorMeta]] = {(c, s): [] for c in (False, True) for s in (False, True)}
    for saved in layer.saved:
        buckets[(is_attention_core(saved.meta, seq, shapes), bool(is_sharded(saved)))].append(saved.meta)
    captured = layer_capture_dtype(layer)
    return LayerActivations(
        replicated=_sizes(buckets[(False, False)], captured), sharded=_sizes(buckets[(False, True)], captured),
        core_replicated=_sizes(buckets[(True, False)], captured),
        core_sharded=_sizes(buckets[(True, True)], captured), layer_input=_sizes(layer.input_meta, captured))


def _sizes(metas: Collection[TensorMeta], captured: str | None = None) -> SavedBytes:
    """Float tensors at the capture dtype (or all floats, when it is unknown) take the training dtype's width;
    others (a deliberate fp32 upcast in a bf16 capture, masks, ids) keep their captured bytes."""
    def trained(t: TensorMeta) -> bool:
        return t.dtype in FLOAT_DTYPES and captured in (None, t.dtype)

    return SavedBytes(float_numel=sum(t.numel for t in metas if trained(t)),
                      other_bytes=sum(t.nbytes for t in metas if not trained(t)))


def estimate_layer_activation_bytes(layer: Layer, *, micro_batch_size: int, graph_batch_size: int,
                                    recompute: Recompute, dtype: str, tp: int = 1, sharded: ShardedSpec = None,
                                    sequence_parallel: bool = False, seq_len: int | None = None,
                                    placed: bool = False) -> int:
    """Bytes one micro-batch leaves saved for backward in one layer, on one TP rank.

    Args:
        layer: the captured layer (its ``saved`` tensors and ``input_meta``).
        micro_batch_size: samples per micro-batch.
        graph_batch_size: samples the graph was captured with (``OpGraph.batch_size``).
        recompute: ``NONE`` keeps every saved tensor; ``SELECTIVE`` drops the s×s attention core;
            ``FULL`` keeps only the layer's input.
        dtype: training dtype; floating-point tensors are stored at its width, masks and ids as captured.
        tp: tensor-parallel size.
        sharded: which saved tensors TP splits: a predicate on ``SavedTensor`` or a set of producer op
            names (None: none).
        sequence_parallel: Megatron sequence parallelism: the replicated tensors (and a fully
            recomputed layer's input) are split over the sequence too, so everything is divided by tp.
        seq_len: sequence length for finding the s×s tensors (default: read off the layer input).
        placed: ``sharded`` already says what sequence parallelism splits (``sequence_parallel_split``).

    Example:
        >>> from autopar.graph.ir import TensorMeta
        >>> x = TensorMeta(shape=(2, 128, 256), dtype="float32")
        >>> layer = Layer(index=1, module_path="b.0", kind="k", ops=(), params=(), input_meta=(x,),
        ...               saved=(SavedTensor(producer="ln", saver="mm", meta=x),))
        >>> estimate_layer_activation_bytes(layer, micro_batch_size=4, graph_batch_size=2,
        ...                                 recompute=Recompute.NONE, dtype="bfloat16")   # 2 bytes · (4·128·256)
        262144
    """
    if micro_batch_size < 1 or graph_batch_size < 1 or tp < 1:
        raise ValueError(f"bad activation inputs: micro_batch_size={micro_batch_size}, "
                         f"graph_batch_size={graph_batch_size}, tp={tp}")
    acts = summarize_layer_activations(layer, sharded=sharded, seq_len=seq_len)
    return activation_bytes(acts, scale=micro_batch_size / graph_batch_size, recompute=recompute, dtype=dtype,
                            tp=tp, sequence_parallel=sequence_parallel, placed=placed)


def sequence_parallel_split(layer: Layer, placed: Callable[[SavedTensor], bool],
                            reducing: Collection[str] = ()) -> Callable[[SavedTensor], bool]:
    """Which saved tensors of ``layer`` the emitted program holds split under sequence parallelism.

    In a block (``emit/tp.py::_prepare_block_inputs``) the residual stream and the ops between the block's
    weight-holding children (norms, residual adds, dropouts: activations of 3 or more dims) run on sequence
    shards; each such child gathers its input whole and runs as its weights are placed, so a tensor it saves is
    split as ``placed`` (the sharding ILP's placements) says, except the gathered input itself, which is whole
    on every rank, and what follows a row-split module of ``reducing`` (paths relative to the layer), whose
    output is reduce-scattered back to the sequence shard (``_reduce_row_outputs``). A layer of several modules
    (outside the blocks) keeps Megatron's rule: everything split.

    Example:
        >>> from autopar.graph.ir import Op, OpClass, ParamInfo, TensorMeta
        >>> x = TensorMeta(shape=(2, 8, 4), dtype="float32")
        >>> def op(name, path, cls=OpClass.NORM, param=None):
        ...     return Op(name=name, target="t", op_class=cls, inputs=(x, x), input_ops=(None, None),
        ...               input_params=(None, param), outputs=(x,), flops=1, nbytes_moved=1, module_path=path)
        >>> ops = (op("ln", "b.ln"), op("fc", "b.mlp.fc", OpClass.MATMUL, "b.mlp.fc.weight"), op("gelu", "b.mlp"),
        ...        op("proj", "b.mlp.proj", OpClass.MATMUL, "b.mlp.proj.weight"), op("drop", "b.mlp.drop"))
        >>> saved = tuple(SavedTensor(producer=p, saver=v, meta=x)
        ...               for p, v in (("x", "ln"), ("ln", "fc"), ("fc", "gelu"), ("gelu", "proj"), ("drop", "drop")))
        >>> layer = Layer(index=1, module_path="b", kind="k", ops=ops, saved=saved, params=tuple(
        ...     ParamInfo(name=f"b.mlp.{m}.weight", shape=(4, 4), dtype="float32") for m in ("fc", "proj")))
        >>> kept_whole = sequence_parallel_split(layer, lambda s: False)   # the ILP kept the MLP replicated
        >>> [kept_whole(s) for s in layer.saved]   # ln's input: a sequence shard; the gathered input; the rest whole
        [True, False, False, False, False]
        >>> megatron = sequence_parallel_split(layer, lambda s: s.producer in ("fc", "gelu"), reducing={"mlp.proj"})
        >>> [megatron(s) for s in layer.saved]   # the column split's outputs, and the dropout after the reduction
        [True, False, True, True, True]
    """
    if "+" in layer.module_path:
        return lambda saved: True
    prefix = f"{layer.module_path}."
    children = weight_children(layer)
    child = {op.name: op.module_path[len(prefix):].split(".")[0] for op in layer.ops
             if op.module_path.startswith(prefix)}
    resharded, reduced = set(), False  # ops after a reducing module, in their child
    for op in layer.ops:
        if op.module_path.startswith(prefix) and op.module_path[len(prefix):] in reducing:
            reduced = True
        elif reduced and child.get(op.name) in children and not any(
                op.module_path.startswith(f"{prefix}{r}") for r in reducing):
            resharded.add(op.name)
        if child.get(op.name) not in children:
            reduced = False

    def split(saved: SavedTensor) -> bool:
        inside = child.get(saved.saver)
        if inside not in children or saved.saver in resharded:
            return len(saved.meta.shape) >= 3
        return saved.producer is not None and child.get(saved.producer) == inside and placed(saved)

    return split


def activation_bytes(acts: LayerActivations, *, scale: float, recompute: Recompute, dtype: str, tp: int,
                     sequence_parallel: bool, placed: bool = False) -> int:
    """Bytes kept from a ``LayerActivations`` summary: the O(1) core of the activation model; ``placed``: the
    summary's split is the emitted program's own, sequence shards included (``sequence_parallel_split``), so
    sequence parallelism divides nothing more."""
    match Recompute(recompute):
        case Recompute.FULL:
            kept = acts.layer_input.at(dtype) / (tp if sequence_parallel else 1)
            return math.ceil(kept * scale)
        case Recompute.SELECTIVE:
            replicated, sharded = acts.replicated.at(dtype), acts.sharded.at(dtype)
        case Recompute.NONE:
            replicated = acts.replicated.at(dtype) + acts.core_replicated.at(dtype)
            sharded = acts.sharded.at(dtype) + acts.core_sharded.at(dtype)
        case _:
            raise ValueError(f"unknown recompute policy {recompute!r}")
    per_rank = (replicated + sharded) / tp if sequence_parallel and not placed else replicated + sharded / tp
    return math.ceil(per_rank * scale)


def inflight_micro_batches(schedule: Schedule, *, pp: int, stage: int, num_micro_batches: int,
                           virtual_stages: int = 1) -> float:
    """Micro-batches whose activations pipeline rank ``stage`` holds at its peak, in units of the
    activations of all the layers that rank owns.

    - GPipe (Huang et al. 2019): all forwards run before any backward: ``m``.
    - 1F1B (Narayanan et al. 2019, PipeDream-Flush): rank i warms up with pp − i − 1 forwards and
      then alternates, so ``min(pp − i, m)``.
    - Interleaved 1F1B (Narayanan et al. 2021, §2.2; Megatron-LM ``schedules.py``,
      ``forward_backward_pipelining_with_interleaving``): rank i runs 2(pp − i − 1) + (v − 1)·pp
      warm-up forwards of model chunks (1/v of its layers each), then one more before the first
      backward: ``min(2(pp − i − 1) + (v − 1)·pp + 1, m·v) / v``. For rank 0 this is
      pp·(1 + (pp − 1)/(pp·v)), the first-stage figure of Korthikanti et al. 2022, §4.2.3.

    Example:
        >>> inflight_micro_batches(Schedule.ONE_F_ONE_B, pp=4, stage=1, num_micro_batches=8)
        3.0
        >>> inflight_micro_batches(Schedule.INTERLEAVED_1F1B, pp=4, stage=0, num_micro_batches=8, virtual_stages=2)
        5.5
    """
    m, v = num_micro_batches, virtual_stages
    if pp < 1 or not 0 <= stage < pp or m < 1 or v < 1:
        raise ValueError(f"bad pipeline: pp={pp}, stage={stage}, num_micro_batches={m}, virtual_stages={v}")
    match Schedule(schedule):
        case Schedule.GPIPE:
            return float(m)
        case Schedule.ONE_F_ONE_B:
            return float(min(pp - stage, m))
        case Schedule.INTERLEAVED_1F1B if v == 1:
            return float(min(pp - stage, m))
        case Schedule.INTERLEAVED_1F1B:  # the rank's chunks, each 1/v of its layers
            return sum(in_flight_per_stage(schedule, pp=pp, num_micro_batches=m, virtual_stages=v)[stage::pp]) / v
        case _:
            raise ValueError(f"unknown schedule {schedule!r}")


# ---- buffers and the per-stage total ----------------------------------------------------------


def with_headroom(tensor_bytes: float) -> float:
    """Device memory that ``tensor_bytes`` of tensors take once the allocator's fragmentation is added.

    Example:
        >>> round(with_headroom(100.0), 6)
        110.0
    """
    return tensor_bytes * (1 + ALLOCATOR_HEADROOM)


def tensor_budget_bytes(capacity_bytes: float, *, fixed_bytes: float) -> float:
    """Bytes of model states and activations one GPU can hold: the largest x with
    ``with_headroom(x + fixed_bytes) <= capacity_bytes`` (the stage DP's memory budget).

    Example:
        >>> round(tensor_budget_bytes(110.0, fixed_bytes=10.0), 6)
        90.0
    """
    return capacity_bytes / (1 + ALLOCATOR_HEADROOM) - fixed_bytes


def estimate_rank_memory(*, params_bytes: float, grads_bytes: float, optimizer_bytes: float,
                         activation_bytes: float, fixed_bytes: float, capacity_bytes: int,
                         optimizer_temp_bytes: float = 0.0, accumulated_grads_bytes: float | None = None,
                         working_bytes: float = 0.0, reduce_bytes: float = 0.0) -> MemoryBreakdown:
    """Peak memory of one GPU of a pipeline rank, as the ``MemoryBreakdown`` a ``Plan`` carries.

    The peak is the largest of three moments of the step, each on top of the weights, optimizer states and
    the fixed bytes (all with ``ALLOCATOR_HEADROOM``, which ``tensor_budget_bytes`` inverts for the stage DP):

    - the activations' peak (the last micro-batch's backward starting): the gradients accumulated so far,
      every in-flight activation and the working bytes then alive (the loss backward's logits gradients,
      ZeRO 3's gathered unit);
    - a unit's gradient reduction: the gradients and the reduction's buffers (``reduce_bytes``);
    - the optimizer step, after backward freed the activations: the gradients and the step's temporaries
      (``optimizer.optimizer_temporary_bytes``: foreach AdamW's ``exp_avg_sq_sqrt``).

    The breakdown reports the larger gradient footprint as ``grads`` and every in-flight activation as
    ``activations``; ``buffers`` holds the fixed bytes, what the peak moment adds beyond those two (never
    less than 0: when one micro-batch's activations and working bytes are smaller than the gradients, the
    total keeps both, an over-estimate of at most the gradients) and the headroom.

    Args:
        params_bytes: weights on this GPU (``program_memory.estimate_program_state_bytes``).
        grads_bytes: gradients the optimizer reads.
        optimizer_bytes: optimizer states on this GPU.
        activation_bytes: saved activations of all in-flight micro-batches on this GPU.
        fixed_bytes: bytes alive all step (the runtime's reservation, pipeline receive buffers).
        capacity_bytes: the GPU's memory.
        optimizer_temp_bytes: bytes the optimizer step allocates on top of the states (0: fused step).
        accumulated_grads_bytes: gradients alive at the activations' peak (default: ``grads_bytes``).
        working_bytes: transient bytes alive with the activations at their peak.
        reduce_bytes: buffers of one gradient reduction on top of the gradients.

    Example:
        >>> m = estimate_rank_memory(params_bytes=20, grads_bytes=20, optimizer_bytes=40, activation_bytes=10,
        ...                          fixed_bytes=10, capacity_bytes=200)
        >>> m.buffers, m.total
        (20, 110)
    """
    p, g, o, acts = params_bytes, grads_bytes, optimizer_bytes, activation_bytes
    live = g if accumulated_grads_bytes is None else accumulated_grads_bytes
    peak = max(live + acts + working_bytes, g + reduce_bytes, g + optimizer_temp_bytes)
    grads = max(live, g)
    fixed = fixed_bytes + max(0.0, peak - grads - acts)
    buffers = fixed + ALLOCATOR_HEADROOM * (p + grads + o + acts + fixed)
    return MemoryBreakdown(params=int(p), grads=int(grads), optimizer=int(o), activations=int(acts),
                           buffers=int(buffers), capacity=int(capacity_bytes))


__all__ = [
    "ALLOCATOR_HEADROOM",
    "FP32_BYTES_PER_PARAM",
    "LayerActivations",
    "MIXED_PRECISION_BYTES_PER_PARAM",
    "ModelStateBytes",
    "RUNTIME_RESERVED_BYTES",
    "SavedBytes",
    "ShardedSpec",
    "activation_bytes",
    "bytes_per_param",
    "estimate_layer_activation_bytes",
    "estimate_model_state_bytes",
    "estimate_rank_memory",
    "inflight_micro_batches",
    "sequence_parallel_split",
    "summarize_layer_activations",
    "tensor_budget_bytes",
    "with_headroom",
]
