"""Cost models: hardware specs, compute / memory / communication costs, profiling and calibration.

    from autopar.cost_models import Cluster, estimate_layer_time, estimate_collective_time, Collective

Everything here is a pure function of frozen values. Importing the package does not
import torch (the solvers depend on it and must stay torch-free); the profiler and
the local-device probe, which need torch, load on first use.
"""

from __future__ import annotations

from autopar._modules import lazy_attributes
from autopar.cost_models.profiling.calibration import CalibrationTable, op_key, op_key_for
from autopar.cost_models.cluster import Cluster, GPUSpec, LinkKind, LinkSpec, list_presets
from autopar.cost_models.comm import (
    Algorithm,
    Collective,
    bus_bandwidth_factor,
    estimate_collective_time,
    estimate_exposed_dp_comm,
    group_bus_bandwidth,
    wire_bytes,
)
from autopar.cost_models.compute import (
    LayerTime,
    OpTime,
    TimeSource,
    estimate_layer_time,
    estimate_op_time,
    kernel_time,
    shape_efficiency,
)
from autopar.cost_models.layer_info import attention_core_ops, infer_seq_len
from autopar.cost_models.memory import (
    ALLOCATOR_HEADROOM,
    LayerActivations,
    ModelStateBytes,
    activation_bytes,
    estimate_layer_activation_bytes,
    estimate_model_state_bytes,
    estimate_rank_memory,
    inflight_micro_batches,
    summarize_layer_activations,
)
from autopar.cost_models.program_memory import (
    ProgramStateBytes,
    estimate_fixed_bytes,
    estimate_program_state_bytes,
)



# name -> module, imported on first attribute access (these import torch)
_LAZY: dict[str, str] = {
    "profile_graph": "autopar.cost_models.profiling.profiler",
    "device_name": "autopar.cost_models.profiling.profiler",
    "time_call": "autopar.cost_models.profiling.profiler",
    "Timing": "autopar.cost_models.profiling.profiler",
    "probe_local_device": "autopar.cost_models.profiling.probe",
}


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)


__all__ = [
    "ALLOCATOR_HEADROOM",
    "Algorithm",
    "CalibrationTable",
    "Cluster",
    "Collective",
    "GPUSpec",
    "LayerActivations",
    "LayerTime",
    "LinkKind",
    "LinkSpec",
    "ModelStateBytes",
    "OpTime",
    "TimeSource",
    "activation_bytes",
    "attention_core_ops",
    "bus_bandwidth_factor",
    "estimate_collective_time",
    "estimate_exposed_dp_comm",
    "estimate_layer_activation_bytes",
    "estimate_layer_time",
    "estimate_model_state_bytes",
    "estimate_op_time",
    "estimate_fixed_bytes",
    "estimate_program_state_bytes",
    "ProgramStateBytes",
    "estimate_rank_memory",
    "group_bus_bandwidth",
    "infer_seq_len",
    "inflight_micro_batches",
    "kernel_time",
    "list_presets",
    "op_key",
    "op_key_for",
    "shape_efficiency",
    "summarize_layer_activations",
    "wire_bytes",
    *_LAZY,
]
