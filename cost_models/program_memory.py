"""What the emitted training program holds per GPU, by mechanism (FSDP2, torch pipelining, the fp32 loss).

The ZeRO paper's per-parameter bytes (``memory.estimate_model_state_bytes``) describe DeepSpeed. autopar emits
FSDP2 (``autopar/emit/dp.py``: ``fully_shard`` for ZeRO 1-3, ``replicate`` for ZeRO 0, also over a one-rank dp
axis for a bf16 plan) and ``torch.distributed.pipelining``, whose allocations are read off torch's code
(torch 2.13, ``torch/distributed/fsdp/_fully_shard``, ``torch/distributed/pipelining/stage.py``):

- weights: the sharded parameter is the fp32 original (the optimizer's master copy; for ZeRO 0 the whole of
  it), and every unit all-gathers an unsharded copy in the compute dtype (``FSDPParam.init_unsharded_param``:
  a separate storage, also in fp32 and under ``replicate``). ZeRO 0-2 keep the copies from forward to the end
  of backward (``reshard_after_forward=False``), ZeRO 3 frees each after its unit's forward and backward; under a
  pipeline torch keeps them from the first backward to the step's end (``stage.py``:
  ``set_reshard_after_backward(False)`` until ``perform_reduce_grad``);
- gradients: one reduce per step (``runtime._accumulate``: ``set_requires_gradient_sync`` on the last
  micro-batch; the pipeline schedule alike), so earlier micro-batches accumulate *unsharded* gradients in the
  reduce dtype, fp32 (``FSDPParam.to_accumulated_grad_if_needed``); the reduce leaves fp32 gradients sharded
  over dp (ZeRO >= 1) or whole (ZeRO 0). Gradients are set to None between steps, so with one micro-batch none
  is alive while the activations peak;
- per unit, transient: an all-gather output beside its unsharded copy at copy-out (``foreach_all_gather_copy_out``),
  and the reduce-scatter input in fp32 (``foreach_reduce``; one kept in flight, ``reduce_scatter_states``);
- pipeline stages preallocate one receive buffer per micro-batch for their input and one for their output's
  gradient (``_create_act_recv_info``, ``_create_grad_recv_info``), and keep each in-flight micro-batch's output
  (``fwd_cache``) until its backward: on the last stage, the logits.

A fp32 plan without data parallelism has no FSDP: plain fp32 weights, gradients and Adam moments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from autopar.cost_models.memory import RUNTIME_RESERVED_BYTES, bytes_per_param
from autopar.graph.ir import DTYPE_BYTES

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
    """Weights used by compute: FSDP's unsharded compute-dtype copies kept through the step (ZeRO 0-2, or under
    a pipeline), or the plain fp32 weights without FSDP; 0 for ZeRO 3 (gathered per unit: a buffer)."""
    grads: int
    """Gradients the optimizer reads (after the reduce): fp32, sharded over dp for ZeRO >= 1."""
    accumulated_grads: int
    """Gradients alive during the last micro-batch's backward, accumulated over the earlier ones: FSDP's
    unsharded fp32 buffer (freed by the reduce), or ``grads`` themselves without FSDP; 0 with one micro-batch."""
    optimizer: int
    """Adam's moments and, under FSDP, the fp32 sharded parameters (the master weights)."""

    @property
    def peak_grads(self) -> int:
        """The larger of the two gradient footprints (the stage DP budgets for it)."""
        return max(self.grads, self.accumulated_grads)

    @property
    def total(self) -> int:
        """params + peak gradients + optimizer: what the stage DP counts per layer."""
        return self.params + self.peak_grads + self.optimizer


def estimate_program_state_bytes(num_params: float, *, zero_stage: int, dp: int, dtype: str,
                                 num_micro_batches: int = 1, pipelined: bool = False) -> ProgramStateBytes:
    """Weights, gradients and optimizer states of one GPU under the emitted FSDP2 program (module docstring).

    Args:
        num_params: parameters this GPU holds before data parallelism (after TP/PP splits).
        zero_stage: 0-3 (ZeRO 1 runs as ZeRO 2: ``emit/dp.py``).
        dp: data-parallel size.
        dtype: training dtype (the compute dtype of the unsharded copies).
        num_micro_batches: micro-batches per step on this rank; more than one accumulates gradients.
        pipelined: pp > 1 (torch's schedule keeps unsharded weights and accumulates over every micro-batch).

    Example:
        >>> s = estimate_program_state_bytes(1000, zero_stage=3, dp=4, dtype="bfloat16", num_micro_batches=2)
        >>> s.params, s.grads, s.accumulated_grads, s.optimizer   # 0, 4/4, 4 (unsharded fp32), 12/4 B per param
        (0, 1000, 4000, 3000)
    """
    if zero_stage not in (0, 1, 2, 3) or dp < 1 or num_params < 0 or num_micro_batches < 1:
        raise ValueError(f"bad model-state inputs: num_params={num_params}, zero_stage={zero_stage}, dp={dp}, "
                         f"num_micro_batches={num_micro_batches}")
    bytes_per_param(dtype)  # validates the training dtype
    n = int(num_params)
    accumulating = num_micro_batches > 1 or pipelined
    if not uses_fsdp(dp=dp, dtype=dtype):  # plain fp32: .grad accumulates in place
        grads = FP32_BYTES * n
        return ProgramStateBytes(params=FP32_BYTES * n, grads=grads, accumulated_grads=grads if accumulating else 0,
                                 optimizer=ADAM_MOMENT_BYTES * n)
    owned = math.ceil(n / dp) if zero_stage >= 1 else n
    kept = zero_stage <= 2 or pipelined
    return ProgramStateBytes(params=DTYPE_BYTES[dtype] * n if kept else 0, grads=FP32_BYTES * owned,
                             accumulated_grads=FP32_BYTES * n if accumulating else 0,
                             optimizer=(FP32_BYTES + ADAM_MOMENT_BYTES) * owned)


def estimate_fsdp_gather_bytes(largest_unit_params: float, *, zero_stage: int, dp: int, dtype: str,
                               pipelined: bool = False) -> float:
    """Bytes of ZeRO 3's gathered unit on top of the states, alive with the activations (its backward gather).

    Example:
        >>> estimate_fsdp_gather_bytes(1000, zero_stage=3, dp=8, dtype="bfloat16")  # all-gather output + copy
        4000.0
        >>> estimate_fsdp_gather_bytes(1000, zero_stage=2, dp=8, dtype="bfloat16")  # copies kept: in params
        0.0
    """
    if zero_stage < 3 or pipelined or not uses_fsdp(dp=dp, dtype=dtype):
        return 0.0
    return float(FSDP_GATHER_COPIES * DTYPE_BYTES[dtype] * largest_unit_params)


def estimate_fsdp_reduce_bytes(largest_unit_params: float, *, zero_stage: int, dp: int, dtype: str) -> float:
    """Bytes of one unit's gradient reduction on top of the gradients: the fp32 reduce-scatter input (whole unit)
    and its output (the unit's shard; for ZeRO 0 the whole unit, then the unit's gradient itself).

    Example:
        >>> estimate_fsdp_reduce_bytes(1000, zero_stage=2, dp=4, dtype="bfloat16")   # 4 B input + 4/4 B output
        5000.0
        >>> estimate_fsdp_reduce_bytes(1000, zero_stage=0, dp=1, dtype="float32")   # no FSDP: nothing reduced
        0.0
    """
    if not uses_fsdp(dp=dp, dtype=dtype):
        return 0.0
    shard = largest_unit_params / (dp if zero_stage >= 1 else 1)
    return float(FP32_BYTES * (largest_unit_params + shard))


def estimate_fixed_bytes(*, largest_unit_params: float, zero_stage: int, dp: int, dtype: str,
                         pipelined: bool = False) -> float:
    """Bytes per GPU the stage DP reserves beside its per-layer sums (states, activations, the loss's working
    bytes): the runtime's reservation and the larger of ZeRO 3's gathered unit and one unit's reduction.

    Example:
        >>> estimate_fixed_bytes(largest_unit_params=10**9, zero_stage=0, dp=1, dtype="float32") == RUNTIME_RESERVED_BYTES
        True
    """
    gather = estimate_fsdp_gather_bytes(largest_unit_params, zero_stage=zero_stage, dp=dp, dtype=dtype,
                                        pipelined=pipelined)
    reduce = estimate_fsdp_reduce_bytes(largest_unit_params, zero_stage=zero_stage, dp=dp, dtype=dtype)
    return float(RUNTIME_RESERVED_BYTES + max(gather, reduce))


def pipeline_recv_bytes(*, num_micro_batches: int, input_bytes: float, output_bytes: float) -> float:
    """Receive buffers one pipeline stage chunk preallocates: one for its input per micro-batch (0 on the first
    stage) and one for its output's gradient per micro-batch (0 on the last).

    Example:
        >>> pipeline_recv_bytes(num_micro_batches=8, input_bytes=100, output_bytes=100)
        1600.0
    """
    return float(num_micro_batches * (input_bytes + output_bytes))


__all__ = [
    "ADAM_MOMENT_BYTES",
    "FP32_BYTES",
    "FSDP_GATHER_COPIES",
    "ProgramStateBytes",
    "estimate_fsdp_gather_bytes",
    "estimate_fixed_bytes",
    "estimate_fsdp_reduce_bytes",
    "estimate_program_state_bytes",
    "pipeline_recv_bytes",
    "uses_fsdp",
]
