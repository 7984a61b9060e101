"""The optimizer step: AdamW's HBM traffic per parameter and the temporaries it allocates, by implementation.

The step is memory-bound (a handful of FLOPs per element), so its time is the bytes its kernels
read and write over the achievable bandwidth. What those bytes are depends on how torch runs it
(``torch/optim/adam.py``, shared by ``AdamW`` with ``decoupled_weight_decay``):

- ``fused`` (``_fused_adamw``): one kernel reads the parameter, gradient and both moments and writes the
  parameter and both moments: (4 + 4 + 4 + 4) + (4 + 4 + 4) = 28 B per fp32 parameter.
- ``foreach`` (``_multi_tensor_adam``, torch's default on CUDA and torchtitan's at its 2024-12 benchmark,
  ``fused = job_config.optimizer.fused`` default False): one multi-tensor kernel per ``_foreach_`` call,
  each an HBM round trip over every parameter (``FOREACH_ADAMW_KERNELS``), 84 B per fp32 parameter, and
  ``exp_avg_sq_sqrt = torch._foreach_sqrt(exp_avg_sqs)`` allocates a state-sized temporary per step.

``clip_grad_norm_`` (torchtitan ``max_norm = 1.0``) adds a ``_foreach_norm`` over the gradients and a
``_foreach_mul_`` scaling them: 4 + 8 B per parameter. FSDP2 keeps the sharded parameters, their
gradients (``reduce_dtype=float32``) and both moments in fp32, so every width here is 4 bytes.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from types import MappingProxyType

from autopar.cost_models.cluster import GPUSpec

STATE_BYTES = 4
"""fp32: the width of the parameter the optimizer updates (master weights), its gradient and both moments."""

FOREACH_ADAMW_KERNELS: Mapping[str, tuple[int, int]] = MappingProxyType({
    # (state-width tensors read, written) per parameter element, in torch's order (decoupled weight decay,
    # capturable=False, amsgrad=False); addcmul reads grads twice (two operand lists)
    "_foreach_mul_(params, 1 - lr*wd)": (1, 1),
    "_foreach_lerp_(exp_avgs, grads)": (2, 1),
    "_foreach_mul_(exp_avg_sqs, beta2)": (1, 1),
    "_foreach_addcmul_(exp_avg_sqs, grads, grads)": (3, 1),
    "_foreach_sqrt(exp_avg_sqs) -> tmp": (1, 1),
    "_foreach_div_(tmp, bias_correction2_sqrt)": (1, 1),
    "_foreach_add_(tmp, eps)": (1, 1),
    "_foreach_addcdiv_(params, exp_avgs, tmp)": (3, 1),
})
"""The kernels of one foreach AdamW step (torch ``_multi_tensor_adam``) and the tensors each moves."""

FUSED_ADAMW_KERNEL = (4, 3)
"""``_fused_adamw_``: reads parameter, gradient, exp_avg, exp_avg_sq; writes parameter and both moments."""

CLIP_GRAD_NORM_KERNELS: Mapping[str, tuple[int, int]] = MappingProxyType({
    "_foreach_norm(grads)": (1, 0),  # one partial norm per tensor: negligible writes
    "_foreach_mul_(grads, clip_coef)": (1, 1),
})
"""``torch.nn.utils.clip_grad_norm_(foreach=True)``: a norm pass and a scaling pass over the gradients."""

FOREACH_TEMPORARIES = 1
"""State-sized tensors the foreach step allocates: ``exp_avg_sq_sqrt`` (the others update in place)."""

IMPLEMENTATIONS = ("fused", "foreach")
"""AdamW implementations priced here."""


@functools.cache  # a constant per implementation: the planner asks for it once per priced layout
def adamw_step_bytes_per_param(*, implementation: str = "foreach", clip_grad_norm: bool = False,
                               state_bytes: int = STATE_BYTES) -> int:
    """HBM bytes one AdamW step reads and writes per parameter.

    Example:
        >>> adamw_step_bytes_per_param(implementation="fused"), adamw_step_bytes_per_param()
        (28, 84)
        >>> adamw_step_bytes_per_param(clip_grad_norm=True)  # + norm 4 + scale 8
        96
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"AdamW implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    kernels = FOREACH_ADAMW_KERNELS.values() if implementation == "foreach" else (FUSED_ADAMW_KERNEL,)
    tensors = sum(r + w for r, w in kernels)
    if clip_grad_norm:
        tensors += sum(r + w for r, w in CLIP_GRAD_NORM_KERNELS.values())
    return tensors * state_bytes


def estimate_optimizer_step_time(num_params: float, gpu: GPUSpec, *, implementation: str = "foreach",
                                 clip_grad_norm: bool = False) -> float:
    """Seconds of one AdamW step over the ``num_params`` parameters this GPU owns: its bytes at the
    achievable bandwidth, floored by one launch per kernel.

    Example:
        >>> from autopar.cost_models.cluster import Cluster
        >>> gpu = Cluster.preset("dgx-h100").gpu
        >>> round(estimate_optimizer_step_time(1e9, gpu) * 1e3, 1)  # 84 GB at 3.015 TB/s
        27.9
    """
    nbytes = num_params * adamw_step_bytes_per_param(implementation=implementation, clip_grad_norm=clip_grad_norm)
    kernels = len(FOREACH_ADAMW_KERNELS) if implementation == "foreach" else 1
    kernels += len(CLIP_GRAD_NORM_KERNELS) if clip_grad_norm else 0
    return max(nbytes / gpu.achievable_mem_bytes_per_s, kernels * gpu.kernel_launch_s)


def optimizer_temporary_bytes(num_params: float, *, implementation: str = "foreach",
                              state_bytes: int = STATE_BYTES) -> float:
    """Bytes the step allocates on top of the states while it runs: foreach's ``exp_avg_sq_sqrt``, one
    state-sized tensor per parameter it owns (torch groups all of a device's tensors into one call); fused: 0.

    Example:
        >>> optimizer_temporary_bytes(1e9), optimizer_temporary_bytes(1e9, implementation="fused")
        (4000000000.0, 0.0)
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"AdamW implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    return float(num_params) * state_bytes * FOREACH_TEMPORARIES if implementation == "foreach" else 0.0


__all__ = [
    "CLIP_GRAD_NORM_KERNELS",
    "FOREACH_ADAMW_KERNELS",
    "FOREACH_TEMPORARIES",
    "FUSED_ADAMW_KERNEL",
    "IMPLEMENTATIONS",
    "STATE_BYTES",
    "adamw_step_bytes_per_param",
    "estimate_optimizer_step_time",
    "optimizer_temporary_bytes",
]
