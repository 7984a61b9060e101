"""What the emitted training program holds per GPU, by mechanism (FSDP2, torch pipelining, the fp32 loss).

The ZeRO paper's per-parameter bytes (``memory.estimate_model_state_bytes``) describe DeepSpeed. autopar emits
FSDP2 (``autopar/emit/dp.py``: ``fully_shard`` for ZeRO 1-3, ``replicate`` for ZeRO 0, also over a one-rank dp
axis for a bf16 plan) and ``torch.distributed.pipelining``, whose allocations are read off torch's code
(torch 2.13, ``torch/distributed/fsdp/_fully_shard``, ``torch/distributed/pipelining/stage.py``):

- weights: the sharded parameter is the fp32 original (the optimizer's master copy; for ZeRO 0 the whole of
  it), and every unit all-gathers an unsharded copy in the compute dtype (``FSDPParam.init_unsharded_param``:
  a separate storage, also in fp32 and under ``replicate``). ZeRO 0-2 keep the copies from forward to the end
  of backward (``reshard_after_forward=False``), ZeRO 3 frees each after its unit's forward and backward, under
  a pipeline too. There a chunk's backward leaves its units gathered (``stage.py``,
  ``backward_maybe_with_nosync``: ``set_reshard_after_backward(False)`` until ``perform_reduce_grad``), but the
  chunk's next forward reshards each unit again (``FSDPParamGroup.post_forward`` calls ``reshard``, which frees
  the copy whenever ``reshard_after_forward`` holds, whatever the backward left). So at the activations' peak,
  a backward's start right after the forwards, a ZeRO 3 rank holds only the units being gathered, as without a
  pipeline. Measured on 4 gloo ranks (GPT, dp2 pp2): rank 0's peak falls at the first backward's start (GPipe,
  1F1B) or in the forward just before it (interleaved, 2 micro-batches), with only that moment's units gathered.
  At a pipeline stage's backward start FSDP2 runs the last block's pre-backward, then the root's (the stage's
  output is the root's), so the root and a block are gathered at once (measured 2 × (root + block), more than
  ``FSDP_GATHER_COPIES`` × the largest unit when the root is the embedding): the evaluation passes that sum
  (``solvers/evaluate.py::_gathered_together``). Not modelled: under interleaved 1F1B with more micro-batches
  than pp a chunk whose backward ran keeps its units through the other chunk's forward
  (``schedule.schedule_order``: ``2F3`` after ``0B0``), up to that chunk's weights;
- gradients: one reduce per step (``runtime._accumulate``: ``set_requires_gradient_sync`` on the last
  micro-batch; the pipeline schedule alike), so earlier micro-batches accumulate *unsharded* gradients in the
  reduce dtype, fp32 (``FSDPParam.to_accumulated_grad_if_needed``); the reduce leaves fp32 gradients sharded
  over dp (ZeRO >= 1) or whole (ZeRO 0). Gradients are set to None between steps, so with one micro-batch none
  is alive while the activations peak;
- per unit, transient: an all-gather output beside its unsharded copy at copy-out (``foreach_all_gather_copy_out``),
  and the reduce-scatter input in fp32 (``foreach_reduce``; one kept in flight, ``reduce_scatter_states``);
- pipeline stages preallocate one receive buffer per micro-batch for their input and one for their output's
  gradient (``_create_act_recv_info``, ``_create_grad_recv_info``), and keep each in-flight micro-batch's output
  (``fwd_cache``) until its backward: on the last stage, the logits; elsewhere what they sent on. The interleaved
  1F1B runtime (``schedules.py``: ``_PipelineScheduleRuntime._step_microbatches``) waits on its sends only when the
  step ends, so every output and input gradient a stage sent stays alive until then (``pipeline_sent_bytes``).

A fp32 plan without data parallelism has no FSDP: plain fp32 weights, gradients and Adam moments.

Megatron-LM's program (``runtime=Runtime.MEGATRON``, ``runtimes.py``) holds other things, read off megatron-core
0.16.1: weights in the training dtype; one contiguous gradient buffer (``main_grad``, ``DistributedDataParallel``
and ``param_and_grad_buffer.py``) alive all step, accumulated over micro-batches and reduced in place (all-reduce,
or with the distributed optimizer a reduce-scatter into a view of the same buffer: no extra buffer), fp32 for
bf16 and fp32 training, fp16 for fp16; fp32 master weights and Adam moments (and for fp16 an fp32 copy of the
gradients, ``Float16OptimizerWithFloat16Params._copy_model_grads_to_main_grads``), sharded over dp by the
distributed optimizer (ZeRO 1: ``distrib_optimizer.py``). Per parameter: bf16 18 B (6 + 12/dp distributed),
fp16 20 (4 + 16/dp), fp32 16 (8 + 8/dp), the table of Megatron-LM's ``docs/source/distrib_optimizer.md``. Its
pipeline (``p2p_communication.py::_communicate``) allocates one receive tensor per transfer: the activation it
receives is the stage input that ``schedules.py`` keeps in ``input_tensors`` for backward (counted with the
first layer's saved activations), the gradient it receives lives for one backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from autopar.cost_models.memory import RUNTIME_RESERVED_BYTES, bytes_per_param
from autopar.cost_models.runtimes import program_of
from autopar.graph.ir import DTYPE_BYTES
from autopar.layout import Runtime, Schedule

FP32_BYTES = 4
"""fp32 master weights (FSDP's sharded parameters) and FSDP's reduce dtype (``emit/dp.py``: ``reduce_dtype``)."""
ADAM_MOMENT_BYTES = 8
"""AdamW's two fp32 moments per parameter."""
FSDP_GATHER_COPIES = 2
"""Copies of the largest unit alive when it is gathered: the all-gather output and the unsharded parameters it
is copied out into (``foreach_all_gather_copy_out``), measured at the copy-out on 2 gloo ranks."""


def uses_fsdp(*, dp: int, dtype: str) -> bool:
    """Whether the emitted stage is wrapped in FSDP2/replicate: data parallel, or mixed precision to apply
    (``autopar.emit.dp.needs_dp_wrapper``, restated here torch-free; a test holds the two equal).

    Example:
        >>> uses_fsdp(dp=1, dtype="float32"), uses_fsdp(dp=2, dtype="float32"), uses_fsdp(dp=1, dtype="bfloat16")
        (False, True, True)
    """
    return dp > 1 or dtype != "float32"


@dataclass(frozen=True, slots=True, kw_only=True)
class ProgramStateBytes:
    """Model states of one GPU as the emitted program holds them."""

    params: int
    """Weights used by compute: FSDP's unsharded compute-dtype copies kept through the step (ZeRO 0-2), or the
    plain fp32 weights without FSDP; 0 for ZeRO 3, with or without a pipeline (gathered per unit: a buffer,
    ``estimate_fsdp_gather_bytes``; each forward reshards what a pipelined backward left gathered)."""
    grads: int
    """Gradients the optimizer reads (after the reduce): fp32, sharded over dp for ZeRO >= 1."""
    accumulated_grads: int
    """Gradients alive during the last micro-batch's backward, accumulated over the earlier ones: FSDP's
    unsharded fp32 buffer (freed by the reduce), or ``grads`` themselves without FSDP; 0 with one micro-batch."""
    optimizer: int
    """Adam's moments and, under FSDP, the fp32 sharded parameters (the master weights)."""
    resident_grads: int = 0
    """Gradient bytes alive all step whatever the micro-batches (Megatron's contiguous ``main_grad`` buffer);
    0 for autopar's program (gradients are set to None between steps)."""

    def live_grads(self, *, backward_ran: bool) -> int:
        """Gradient bytes alive at the activations' peak: the accumulation when a backward ran before it, and
        the resident buffer always."""
        return max(self.resident_grads, self.accumulated_grads if backward_ran else 0)

    @property
    def peak_grads(self) -> int:
        """The larger of the two gradient footprints (the stage DP budgets for it)."""
        return max(self.grads, self.accumulated_grads)

    @property
    def total(self) -> int:
        """params + peak gradients + optimizer: what the stage DP counts per layer."""
        return self.params + self.peak_grads + self.optimizer


def estimate_program_state_bytes(num_params: float, *, zero_stage: int, dp: int, dtype: str,
                                 num_micro_batches: int = 1, pipelined: bool = False,
                                 runtime: Runtime = Runtime.AUTOPAR) -> ProgramStateBytes:
    """Weights, gradients and optimizer states of one GPU under ``runtime``'s program (module docstring):
    the emitted FSDP2 program by default, Megatron-LM's with ``Runtime.MEGATRON`` (``megatron_state_bytes``).

    Args:
        num_params: parameters this GPU holds before data parallelism (after TP/PP splits).
        zero_stage: 0-3 (ZeRO 1 runs as ZeRO 2: ``emit/dp.py``).
        dp: data-parallel size.
        dtype: training dtype (the compute dtype of the unsharded copies).
        num_micro_batches: micro-batches per step on this rank; more than one accumulates gradients.
        pipelined: pp > 1 (torch's schedule accumulates gradients over every micro-batch; under ZeRO 3 the
            weights are still gathered per unit: see the module docstring).
        runtime: the program priced.

    Example:
        >>> s = estimate_program_state_bytes(1000, zero_stage=3, dp=4, dtype="bfloat16", num_micro_batches=2)
        >>> s.params, s.grads, s.accumulated_grads, s.optimizer   # 0, 4/4, 4 (unsharded fp32), 12/4 B per param
        (0, 1000, 4000, 3000)
    """
    if zero_stage not in (0, 1, 2, 3) or dp < 1 or num_params < 0 or num_micro_batches < 1:
        raise ValueError(f"bad model-state inputs: num_params={num_params}, zero_stage={zero_stage}, dp={dp}, "
                         f"num_micro_batches={num_micro_batches}")
    bytes_per_param(dtype)  # validates the training dtype
    if not program_of(runtime).fsdp:
        return megatron_state_bytes(num_params, zero_stage=zero_stage, dp=dp, dtype=dtype)
    n = int(num_params)
    accumulating = num_micro_batches > 1 or pipelined
    if not uses_fsdp(dp=dp, dtype=dtype):  # plain fp32: .grad accumulates in place
        grads = FP32_BYTES * n
        return ProgramStateBytes(params=FP32_BYTES * n, grads=grads, accumulated_grads=grads if accumulating else 0,
                                 optimizer=ADAM_MOMENT_BYTES * n)
    owned = math.ceil(n / dp) if zero_stage >= 1 else n
    return ProgramStateBytes(params=DTYPE_BYTES[dtype] * n if zero_stage <= 2 else 0, grads=FP32_BYTES * owned,
                             accumulated_grads=FP32_BYTES * n if accumulating else 0,
                             optimizer=(FP32_BYTES + ADAM_MOMENT_BYTES) * owned)


def grad_bytes_per_param(dtype: str, runtime: Runtime = Runtime.AUTOPAR) -> int:
    """Bytes of one gradient element as accumulated and reduced over dp: FSDP2's ``reduce_dtype`` (fp32,
    ``emit/dp.py``); Megatron's grad buffer dtype (fp32 for bf16 and fp32 training, fp16 for fp16).

    Example:
        >>> grad_bytes_per_param("float16"), grad_bytes_per_param("float16", Runtime.MEGATRON)
        (4, 2)
    """
    if program_of(runtime).fsdp or dtype != "float16":
        return FP32_BYTES
    return DTYPE_BYTES[dtype]


def megatron_state_bytes(num_params: float, *, zero_stage: int, dp: int, dtype: str) -> ProgramStateBytes:
    """Weights, gradient buffer and optimizer states of one GPU under Megatron-LM (module docstring): ZeRO 0
    (plain DDP) or ZeRO 1 (``--use-distributed-optimizer``). ZeRO 2/3 (Megatron-FSDP) are not Megatron layouts
    the planner offers (``runtimes.PROGRAMS``); for them this returns the distributed optimizer's states, the
    least Megatron holds, which the search's lower bounds may ask for.

    Example:
        >>> s = megatron_state_bytes(1000, zero_stage=1, dp=4, dtype="bfloat16")
        >>> s.params, s.grads, s.resident_grads, s.optimizer   # 2 + 4 + 12/4 B per param
        (2000, 4000, 4000, 3000)
    """
    if zero_stage not in (0, 1, 2, 3) or dp < 1 or num_params < 0:
        raise ValueError(f"bad model-state inputs: num_params={num_params}, zero_stage={zero_stage}, dp={dp}")
    n = int(num_params)
    grad_width = grad_bytes_per_param(dtype, Runtime.MEGATRON)
    # fp32 master weights unless the weights are fp32; an fp32 gradient copy when the buffer is not fp32
    master = 0 if dtype == "float32" else FP32_BYTES
    grad_copy = FP32_BYTES if grad_width != FP32_BYTES else 0
    owned = math.ceil(n / dp) if zero_stage >= 1 else n
    grads = grad_width * n
    return ProgramStateBytes(params=DTYPE_BYTES[dtype] * n, grads=grads, accumulated_grads=grads,
                             optimizer=(master + grad_copy + ADAM_MOMENT_BYTES) * owned, resident_grads=grads)


def estimate_fsdp_gather_bytes(largest_unit_params: float, *, zero_stage: int, dp: int, dtype: str,
                               pipelined: bool = False, runtime: Runtime = Runtime.AUTOPAR) -> float:
    """Bytes of ZeRO 3's gathered unit on top of the states, alive with the activations (its backward gather).
    The same under a pipeline (``pipelined``): the forwards before the activations' peak reshard every unit a
    backward left gathered (module docstring).

    Example:
        >>> estimate_fsdp_gather_bytes(1000, zero_stage=3, dp=8, dtype="bfloat16")  # all-gather output + copy
        4000.0
        >>> estimate_fsdp_gather_bytes(1000, zero_stage=3, dp=8, dtype="bfloat16", pipelined=True)
        4000.0
        >>> estimate_fsdp_gather_bytes(1000, zero_stage=2, dp=8, dtype="bfloat16")  # copies kept: in params
        0.0
    """
    if zero_stage < 3 or not uses_fsdp(dp=dp, dtype=dtype) or not program_of(runtime).fsdp:
        return 0.0
    return float(FSDP_GATHER_COPIES * DTYPE_BYTES[dtype] * largest_unit_params)


def estimate_fsdp_reduce_bytes(largest_unit_params: float, *, zero_stage: int, dp: int, dtype: str,
                               runtime: Runtime = Runtime.AUTOPAR) -> float:
    """Bytes of one unit's gradient reduction on top of the gradients: the fp32 reduce-scatter input (whole unit)
    and its output (the unit's shard; for ZeRO 0 the whole unit, then the unit's gradient itself). Megatron
    reduces in place in its gradient buffer (``_ParamAndGradBucketGroup.start_grad_sync``): 0.

    Example:
        >>> estimate_fsdp_reduce_bytes(1000, zero_stage=2, dp=4, dtype="bfloat16")   # 4 B input + 4/4 B output
        5000.0
        >>> estimate_fsdp_reduce_bytes(1000, zero_stage=0, dp=1, dtype="float32")   # no FSDP: nothing reduced
        0.0
    """
    if not uses_fsdp(dp=dp, dtype=dtype) or not program_of(runtime).fsdp:
        return 0.0
    shard = largest_unit_params / (dp if zero_stage >= 1 else 1)
    return float(FP32_BYTES * (largest_unit_params + shard))


def estimate_fixed_bytes(*, largest_unit_params: float, zero_stage: int, dp: int, dtype: str,
                         pipelined: bool = False, runtime: Runtime = Runtime.AUTOPAR) -> float:
    """Bytes per GPU the stage DP reserves beside its per-layer sums (states, activations, the loss's working
    bytes): the runtime's reservation and the larger of ZeRO 3's gathered unit and one unit's reduction.

    Example:
        >>> estimate_fixed_bytes(largest_unit_params=10**9, zero_stage=0, dp=1, dtype="float32") == RUNTIME_RESERVED_BYTES
        True
    """
    gather = estimate_fsdp_gather_bytes(largest_unit_params, zero_stage=zero_stage, dp=dp, dtype=dtype,
                                        pipelined=pipelined, runtime=runtime)
    reduce = estimate_fsdp_reduce_bytes(largest_unit_params, zero_stage=zero_stage, dp=dp, dtype=dtype,
                                        runtime=runtime)
    return float(RUNTIME_RESERVED_BYTES + max(gather, reduce))


def pipeline_recv_bytes(*, num_micro_batches: int, input_bytes: float, output_bytes: float,
                        runtime: Runtime = Runtime.AUTOPAR) -> float:
    """Receive buffers of one pipeline stage chunk beyond its saved activations. torch pipelining preallocates
    one for its input per micro-batch (0 on the first stage) and one for its output's gradient per micro-batch
    (0 on the last). Megatron allocates a tensor per transfer (``_communicate``): the received input is the stage
    input saved for backward (already an activation), the received gradient lives for one backward: one.

    Example:
        >>> pipeline_recv_bytes(num_micro_batches=8, input_bytes=100, output_bytes=100)
        1600.0
        >>> pipeline_recv_bytes(num_micro_batches=8, input_bytes=100, output_bytes=100, runtime=Runtime.MEGATRON)
        100.0
    """
    if not program_of(runtime).recv_buffer_per_micro_batch:
        return float(output_bytes)
    return float(num_micro_batches * (input_bytes + output_bytes))


def pipeline_sent_bytes(*, num_micro_batches: int, in_flight: int, input_bytes: float, output_bytes: float,
                        schedule: Schedule, runtime: Runtime = Runtime.AUTOPAR) -> float:
    """Tensors one pipeline stage chunk has sent and still holds at its rank's peak, beyond its saved activations
    and receive buffers. A torch pipelining stage keeps each in-flight micro-batch's output (``fwd_cache``, what it
    sent on) until that micro-batch's backward, and nothing in the stage saves it: ``in_flight`` outputs. Under a
    schedule that holds its sends to the step's end (``RuntimeProgram.sends_held_to_step_end``: torch's interleaved
    1F1B) every sent tensor lives on: at the rank's peak, late in the step (activations stay level through the
    steady state while the held sends grow), the chunk holds all m outputs it sent forward and the input gradient
    each backward it has run sent back (m − ``in_flight``). Megatron frees a sent output's storage
    (``deallocate_output_tensor``) and waits each transfer: 0.

    Example:
        >>> pipeline_sent_bytes(num_micro_batches=8, in_flight=2, input_bytes=100, output_bytes=100,
        ...                     schedule=Schedule.ONE_F_ONE_B)   # the 2 in-flight outputs
        200.0
        >>> pipeline_sent_bytes(num_micro_batches=8, in_flight=2, input_bytes=100, output_bytes=100,
        ...                     schedule=Schedule.INTERLEAVED_1F1B)   # 8 outputs, 6 input gradients
        1400.0
    """
    program = program_of(runtime)
    if not program.keeps_stage_output:
        return 0.0
    m, held = num_micro_batches, min(in_flight, num_micro_batches)
    if schedule in program.sends_held_to_step_end:
        return float(m * output_bytes + (m - held) * input_bytes)
    return float(held * output_bytes)


def held_output_bytes(output_bytes: float, runtime: Runtime = Runtime.AUTOPAR) -> float:
    """Bytes a pipeline stage keeps per in-flight micro-batch of its output when nothing saves it for backward
    (the last stage's logits, torch's ``fwd_cache``); 0 under Megatron, whose last stage outputs the loss.

    Example:
        >>> held_output_bytes(100.0), held_output_bytes(100.0, Runtime.MEGATRON)
        (100.0, 0.0)
    """
    return float(output_bytes) if program_of(runtime).keeps_stage_output else 0.0


__all__ = [
    "ADAM_MOMENT_BYTES",
    "FP32_BYTES",
    "FSDP_GATHER_COPIES",
    "ProgramStateBytes",
    "estimate_fsdp_gather_bytes",
    "estimate_fixed_bytes",
    "estimate_fsdp_reduce_bytes",
    "estimate_program_state_bytes",
    "grad_bytes_per_param",
    "held_output_bytes",
    "megatron_state_bytes",
    "pipeline_recv_bytes",
    "pipeline_sent_bytes",
    "uses_fsdp",
]
