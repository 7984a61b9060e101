"""What the outer search needs priced, as numbers: per-layer costs and a pricing protocol.

The planner (``autopar/api.py``) implements ``Pricing`` with the cost models and the
intra-op ILP; the search only sees numbers, so it never imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from autopar.layout import Recompute
from autopar.plan import ShardingPlan


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


class Pricing(Protocol):
    """Prices the search asks for. Implemented by the planner on top of ``autopar.cost_models``."""

    @property
    def num_layers(self) -> int:
        """Layers in the graph."""
        ...

    @property
    def gpu_mem_bytes(self) -> int:
        """Memory per GPU."""
        ...

    @property
    def peak_flops_per_s(self) -> float:
        """Dense peak of one GPU at the training dtype."""
        ...

    def layer_costs(self, *, tp: int, sequence_parallel: bool, micro_batch_size: int,
                    recompute: Recompute) -> tuple[LayerCost, ...]:
        """Costs of every layer at one setting (cached by the implementation)."""
        ...

    def model_state_bytes(self, num_params: float, *, zero_stage: int, dp: int) -> tuple[float, float, float]:
        """(params, grads, optimizer) bytes per GPU for ``num_params`` under ZeRO over ``dp`` ranks."""
        ...

    def collective_time(self, kind: str, nbytes: float, *, group_size: int, nodes_spanned: int) -> float:
        """Seconds for one collective of ``nbytes`` over a group."""
        ...

    def optimizer_step_time(self, num_params: float) -> float:
        """Seconds for the optimizer update of ``num_params`` parameters held by one GPU."""
        ...

    def optimizer_temp_bytes(self, num_params: float) -> float:
        """Bytes the optimizer step allocates on top of its states for ``num_params`` parameters one GPU owns."""
        ...

    def fsdp_copy_time(self, num_params: float, *, gathers_per_step: int) -> tuple[float, float]:
        """Seconds of FSDP's (all-gather copy-out, reduce copy-in) kernels per step on the compute stream."""
        ...

    def buffer_bytes(self, *, largest_layer_params: float, zero_stage: int, dp: int) -> float:
        """Communication buffers and the runtime's own reservation per GPU (before headroom)."""
        ...

    def grad_bytes_per_param(self) -> float:
        """Bytes of one gradient element as reduced over dp (the emitter's reduce dtype: fp32)."""
        ...

    def param_bytes_per_param(self) -> float:
        """Bytes of one parameter element as all-gathered over dp (the training dtype)."""
        ...

    def sharding_plans(self, *, tp: int, sequence_parallel: bool) -> Mapping[str, ShardingPlan]:
        """Per layer kind: the ILP's sharding at this TP size (empty at tp = 1)."""
        ...
