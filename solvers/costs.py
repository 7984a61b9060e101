"""Prices as values: what the solvers read, and the cost-model formulas they apply to those values.

Planning prices in two steps, each a function from values to a value (``autopar.api.plan``):

1. the cost models price layer settings into a frozen ``LayerCostTable`` keyed by
   ``LayerSetting(tp, sequence_parallel, micro_batch_size, recompute)`` (``autopar/pricing.py``);
2. the search reads a ``PriceTable`` (that table, the cluster and the training dtype) and never calls
   back. The per-layout formulas that are not per-layer (model states, collectives, the optimizer
   step, buffers) are ``autopar.cost_models`` functions of values, each called in one place below.

The search asks for the settings it will read before it reads them (``search.search_steps``), so the
planner prices only those: the group bounds need one policy per (tp, sp, micro-batch), the other
policies only the settings whose groups survive the bounds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple

from autopar.cost_models import comm, optimizer, program_memory
from autopar.cost_models.cluster import Cluster
from autopar.cost_models.runtimes import program_of
from autopar.graph.ir import DTYPE_BYTES
from autopar.layout import Collective, Recompute, Runtime, Schedule


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerCost:
    """One layer at one (tp, sequence_parallel, micro_batch_size, recompute) setting, one micro-batch."""

    forward_s: float
    """Forward time on one GPU, TP collectives included."""
    backward_s: float
    """Backward time on one GPU, recomputation and TP collectives included."""
    forward_flops: float
    """Model FLOPs of one forward pass of the micro-batch (whole layer, all TP ranks together)."""
    recompute_flops: float
    """FLOPs recomputed in backward (whole layer), counted in hardware FLOPs only."""
    activation_bytes: float
    """Bytes kept for backward per GPU (after TP sharding and recomputation)."""
    param_count: float
    """Trainable parameters held per GPU after TP sharding (before ZeRO)."""
    boundary_bytes: float
    """Bytes per GPU that enter the layer from the previous one (a stage boundary sends them)."""
    tp_comm_s: float = 0.0
    """TP collective time per micro-batch (forward + backward), already inside the times above."""
    working_bytes: float = 0.0
    """Bytes one micro-batch's backward of this layer allocates on top of its saved activations, once per rank
    (the fp32 loss's two logits-sized gradients on the last layer; 0 elsewhere)."""
    output_bytes: float = 0.0
    """Bytes of this layer's output that a pipeline stage ending here keeps per in-flight micro-batch when
    nothing saves it for backward (the last layer's logits, held in the stage's ``fwd_cache``; 0 elsewhere)."""


class LayerSetting(NamedTuple):
    """The value one row of layer costs is priced at (a NamedTuple: hashed tens of thousands of times)."""

    tp: int
    """Tensor-parallel size."""
    sequence_parallel: bool
    """Megatron sequence parallelism in the TP group."""
    micro_batch_size: int
    """Samples per micro-batch."""
    recompute: Recompute
    """Activation recomputation policy."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerCostTable:
    """Per-layer costs of one graph on one node kind, for the settings priced: a read-only mapping."""

    num_layers: int
    """Layers in the graph (every row has this many entries)."""
    rows: Mapping[LayerSetting, tuple[LayerCost, ...]]
    """Setting → per-layer costs in model order (read-only)."""

    def __post_init__(self) -> None:
        if not isinstance(self.rows, MappingProxyType):
            raise ValueError("LayerCostTable.rows must be read-only: build the table with LayerCostTable.of")
        bad = [s for s, row in self.rows.items() if len(row) != self.num_layers]
        if bad:
            raise ValueError(f"rows {bad[:3]} do not have {self.num_layers} layer costs")

    @classmethod
    def of(cls, num_layers: int, rows: Mapping[LayerSetting, tuple[LayerCost, ...]]) -> LayerCostTable:
        """A table over a read-only copy of ``rows``."""
        return cls(num_layers=num_layers, rows=MappingProxyType(dict(rows)))

    def __getitem__(self, setting: LayerSetting) -> tuple[LayerCost, ...]:
        return self.rows[setting]

    def __contains__(self, setting: object) -> bool:
        return setting in self.rows

    def missing(self, settings: Iterable[LayerSetting]) -> frozenset[LayerSetting]:
        """The settings of ``settings`` this table has no row for."""
        return frozenset(s for s in settings if s not in self.rows)

    def merged(self, other: LayerCostTable) -> LayerCostTable:
        """A new table with the rows of both (``other`` wins on a shared setting; they are equal by value)."""
        if other.num_layers != self.num_layers:
            raise ValueError(f"tables of {self.num_layers} and {other.num_layers} layers do not merge")
        return LayerCostTable.of(self.num_layers, {**self.rows, **other.rows})


@dataclass(frozen=True, slots=True, kw_only=True)
class PriceTable:
    """Everything the search prices with: the layer costs, the cluster and the training dtype."""

    layers: LayerCostTable
    """Per-layer costs by setting."""
    cluster: Cluster
    """The hardware (memory, links, peak FLOP/s) the per-layout formulas read."""
    dtype: str
    """Training dtype (weights, gradients and activations)."""
    runtime: Runtime = Runtime.AUTOPAR
    """The training program priced (``cost_models/runtimes.py``): autopar's emitter, or Megatron-LM's."""

    @property
    def num_layers(self) -> int:
        """Layers in the graph."""
        return self.layers.num_layers

    @property
    def gpu_mem_bytes(self) -> int:
        """Memory per GPU."""
        return int(self.cluster.gpu.mem_bytes)

    @property
    def peak_flops_per_s(self) -> float:
        """Dense peak of one GPU at the training dtype."""
        return self.cluster.peak_flops(self.dtype)

    def with_layers(self, more: LayerCostTable) -> PriceTable:
        """The same prices with ``more`` rows of layer costs."""
        return PriceTable(layers=self.layers.merged(more), cluster=self.cluster, dtype=self.dtype,
                          runtime=self.runtime)


CLIP_GRAD_NORM = True
"""Gradients clipped by ``clip_grad_norm_(foreach=True)`` before the step (torchtitan ``max_norm = 1.0``,
Megatron-LM ``--clip-grad 1.0``, nanoGPT ``grad_clip = 1.0``)."""

class Formulas:
    """The per-layout formulas on one cluster at one dtype for one runtime's program: one ``cost_models`` call
    each, memoised by value. The runtime selects the terms (``cost_models/runtimes.py``): the AdamW
    implementation (autopar: torch's foreach, its default on GPUs; Megatron: ``FusedAdam``), the model states,
    buffers and pipeline receive tensors (``program_memory``).

    One instance lives for one search (or one evaluation); it holds no state but the memo tables of
    pure functions of its arguments, so it never changes a result.
    """

    __slots__ = ("cluster", "dtype", "runtime", "_states", "_collectives", "_fixed")

    def __init__(self, cluster: Cluster, dtype: str, runtime: Runtime = Runtime.AUTOPAR) -> None:
        self.cluster = cluster
        self.dtype = dtype
        self.runtime = Runtime(runtime)
        self._states: dict[tuple[float, int, int, int, bool], program_memory.ProgramStateBytes] = {}
        self._collectives: dict[tuple[Collective, float, int, int], float] = {}
        self._fixed: dict[tuple[float, int, int, bool], float] = {}

    @classmethod
    def of(cls, prices: PriceTable) -> Formulas:
        """The formulas of ``prices``'s cluster, dtype and runtime."""
        return cls(prices.cluster, prices.dtype, prices.runtime)

    @property
    def gpu_mem_bytes(self) -> int:
        """Memory per GPU."""
        return int(self.cluster.gpu.mem_bytes)

    def program_states(self, num_params: float, *, zero_stage: int, dp: int, num_micro_batches: int = 1,
                       pipelined: bool = False) -> program_memory.ProgramStateBytes:
        """Model states per GPU as the runtime's program holds them (``program_memory``)."""
        key = (num_params, zero_stage, dp, num_micro_batches, pipelined)
        if key not in self._states:
            self._states[key] = program_memory.estimate_program_state_bytes(
                num_params, zero_stage=zero_stage, dp=dp, dtype=self.dtype, num_micro_batches=num_micro_batches,
                pipelined=pipelined, runtime=self.runtime)
        return self._states[key]

    def model_state_bytes(self, num_params: float, *, zero_stage: int, dp: int, num_micro_batches: int = 1,
                          pipelined: bool = False) -> tuple[float, float, float]:
        """(params, larger gradient footprint, optimizer) bytes per GPU for ``num_params`` (``program_states``);
        the defaults (one micro-batch, no pipeline) give the least of any layout of this (zero, dp)."""
        s = self.program_states(num_params, zero_stage=zero_stage, dp=dp, num_micro_batches=num_micro_batches,
                                pipelined=pipelined)
        return float(s.params), float(s.peak_grads), float(s.optimizer)

    def collective_time(self, kind: Collective, nbytes: float, *, group_size: int, nodes_spanned: int) -> float:
        """Seconds for one collective of ``nbytes`` over a group (0 for a group of one, except a send)."""
        key = (kind, nbytes, group_size, nodes_spanned)
        if key not in self._collectives:
            if group_size <= 1 and kind is not Collective.SEND_RECV:
                seconds = 0.0
            else:
                cluster = self.cluster
                seconds = comm.estimate_collective_time(kind, nbytes, max(2, group_size), cluster=cluster,
                                                        nodes_spanned=min(nodes_spanned, cluster.nodes))
            self._collectives[key] = seconds
        return self._collectives[key]

    def grad_accumulation_time(self, num_params: float, *, num_micro_batches: int, zero_stage: int, dp: int,
                               pipelined: bool) -> float:
        """Seconds per step one GPU spends adding each micro-batch's gradients of its ``num_params`` parameters
        into the accumulated ones, a memory-bound pass on the backward's critical path.

        autopar's program accumulates outside the GEMMs: autograd's ``AccumulateGrad`` adds every later
        micro-batch's gradient into ``.grad`` in place (read both, write one), and FSDP2, whose reduce waits for
        the last micro-batch, first casts the unsharded gradient to its fp32 reduce dtype
        (``FSDPParam.to_accumulated_grad_if_needed``) and then adds each later one into it
        (``accumulate_unsharded_grad_if_needed``). The accumulated width is ``program_states``'s. Megatron's
        ``gradient_accumulation_fusion`` has the weight-gradient GEMM accumulate into ``main_grad`` itself
        (``RuntimeProgram.fuses_grad_accumulation``): 0 there, as with one micro-batch.

        Example:
            >>> from autopar.cost_models.cluster import Cluster
            >>> f = Formulas(Cluster.preset("dgx-h100"), "bfloat16")
            >>> bw = f.cluster.gpu.achievable_mem_bytes_per_s
            >>> f.grad_accumulation_time(1e9, num_micro_batches=4, zero_stage=3, dp=8, pipelined=False) * bw / 1e9
            36.0
        """
        if num_micro_batches <= 1 or program_of(self.runtime).fuses_grad_accumulation:
            return 0.0
        states = self.program_states(num_params, zero_stage=zero_stage, dp=dp, num_micro_batches=num_micro_batches,
                                     pipelined=pipelined)
        if num_params <= 0 or states.accumulated_grads <= 0:
            return 0.0
        fresh = DTYPE_BYTES[self.dtype] * num_params  # one micro-batch's gradient, in the compute dtype
        kept = float(states.accumulated_grads)
        cast = kept + fresh if kept != fresh else 0.0  # FSDP2's first micro-batch: bf16 -> its fp32 accumulator
        traffic = cast + (num_micro_batches - 1) * (2 * kept + fresh)
        return traffic / self.cluster.gpu.achievable_mem_bytes_per_s

    def optimizer_step_time(self, num_params: float) -> float:
        """Seconds for the optimizer update of ``num_params`` parameters held by one GPU (the runtime's AdamW)."""
        return optimizer.estimate_optimizer_step_time(num_params, self.cluster.gpu, implementation=self.optimizer,
                                                      clip_grad_norm=CLIP_GRAD_NORM)

    @property
    def optimizer(self) -> str:
        """The AdamW implementation the runtime runs (``optimizer.IMPLEMENTATIONS``)."""
        return program_of(self.runtime).optimizer

    def optimizer_temp_bytes(self, num_params: float) -> float:
        """Bytes the optimizer step allocates on top of its states for ``num_params`` parameters one GPU owns."""
        return optimizer.optimizer_temporary_bytes(num_params, implementation=self.optimizer)

    def fsdp_copy_time(self, num_params: float, *, gathers_per_step: int) -> tuple[float, float]:
        """Seconds of FSDP's (all-gather copy-out, reduce copy-in) kernels per step on the compute stream; 0 under
        Megatron, which gathers into and reduces in its parameter and gradient buffers in place."""
        if not program_of(self.runtime).fsdp:
            return 0.0, 0.0
        return comm.estimate_fsdp_copy_time(num_params, self.cluster.gpu, gathers_per_step=gathers_per_step,
                                            param_bytes=DTYPE_BYTES[self.dtype],
                                            reduce_bytes=self.grad_bytes_per_param())

    def buffer_bytes(self, *, largest_layer_params: float, zero_stage: int, dp: int, pipelined: bool = False) -> float:
        """Bytes the stage DP reserves beside its per-layer sums: the runtime's reservation and the larger of ZeRO
        3's gathered unit and one unit's gradient reduction (``program_memory.estimate_fixed_bytes``)."""
        key = (largest_layer_params, zero_stage, dp, pipelined)
        if key not in self._fixed:
            self._fixed[key] = program_memory.estimate_fixed_bytes(
                largest_unit_params=largest_layer_params, zero_stage=zero_stage, dp=dp, dtype=self.dtype,
                pipelined=pipelined, runtime=self.runtime)
        return self._fixed[key]

    def working_bytes(self, *, gathered_params: float, largest_unit_params: float, zero_stage: int, dp: int,
                      pipelined: bool) -> tuple[float, float]:
        """(ZeRO 3's units gathered at once, ``gathered_params``; the largest unit's reduction buffers) in bytes
        (``program_memory``)."""
        return (program_memory.estimate_fsdp_gather_bytes(gathered_params, zero_stage=zero_stage, dp=dp,
                                                          dtype=self.dtype, pipelined=pipelined, runtime=self.runtime),
                program_memory.estimate_fsdp_reduce_bytes(largest_unit_params, zero_stage=zero_stage, dp=dp,
                                                          dtype=self.dtype, runtime=self.runtime))

    def recv_bytes(self, *, num_micro_batches: int, input_bytes: float, output_bytes: float) -> float:
        """Receive buffers of one pipeline stage chunk beyond its activations (``program_memory``)."""
        return program_memory.pipeline_recv_bytes(num_micro_batches=num_micro_batches, input_bytes=input_bytes,
                                                  output_bytes=output_bytes, runtime=self.runtime)

    def sent_bytes(self, *, num_micro_batches: int, in_flight: int, input_bytes: float, output_bytes: float,
                   schedule: Schedule) -> float:
        """Sent tensors one pipeline stage chunk still holds at its rank's peak (``program_memory``)."""
        return program_memory.pipeline_sent_bytes(num_micro_batches=num_micro_batches, in_flight=in_flight,
                                                  input_bytes=input_bytes, output_bytes=output_bytes,
                                                  schedule=schedule, runtime=self.runtime)

    def held_output_bytes(self, output_bytes: float) -> float:
        """Bytes of a last stage's output kept per in-flight micro-batch (``program_memory``)."""
        return program_memory.held_output_bytes(output_bytes, self.runtime)

    def grad_bytes_per_param(self) -> float:
        """Bytes of one gradient element as reduced over dp (FSDP2's reduce dtype, fp32; Megatron's buffer's)."""
        return float(program_memory.grad_bytes_per_param(self.dtype, self.runtime))

    def param_bytes_per_param(self) -> float:
        """Bytes of one parameter element as all-gathered over dp (the training dtype)."""
        return float(DTYPE_BYTES[self.dtype])


__all__ = ["LayerCost", "LayerSetting", "LayerCostTable", "PriceTable", "Formulas"]
