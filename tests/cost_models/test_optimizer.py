"""AdamW step traffic and temporaries (cost_models/optimizer.py): closed forms, and torch's own kernels."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from autopar.cost_models.cluster import Cluster
from autopar.cost_models.optimizer import (
    CLIP_GRAD_NORM_KERNELS,
    FOREACH_ADAMW_KERNELS,
    adamw_step_bytes_per_param,
    estimate_optimizer_step_time,
    optimizer_temporary_bytes,
)

GPU = Cluster.preset("dgx-h100").gpu


class _Log(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, int]] = []  # (op name, elements of the tensors it returns that are new)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name.startswith("_foreach_"):
            new = 0 if name.endswith("_") else sum(t.numel() for t in out if isinstance(t, torch.Tensor))
            self.calls.append((name, new))
        return out


def _step(clip: bool) -> list[tuple[str, int]]:
    params = [torch.nn.Parameter(torch.randn(64, 32)), torch.nn.Parameter(torch.randn(32))]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, foreach=True)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # the first step creates the states
    with _Log() as log:
        if clip:
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
    return log.calls


def test_foreach_adamw_kernels_are_torchs_own() -> None:
    calls = [name for name, _ in _step(clip=False)]
    expected = [k.split("(")[0] for k in FOREACH_ADAMW_KERNELS]
    # the first call adds 1 to the per-parameter step counters (scalars, no parameter-sized traffic)
    assert calls[0] == "_foreach_add_" and calls[1:] == expected
    clipped = [name for name, _ in _step(clip=True)]
    assert clipped == [k.split("(")[0] for k in CLIP_GRAD_NORM_KERNELS] + calls


def test_foreach_step_allocates_one_state_sized_temporary() -> None:
    numel = 64 * 32 + 32
    allocated = sum(new for name, new in _step(clip=False) if name == "_foreach_sqrt")
    assert allocated == numel
    assert optimizer_temporary_bytes(numel) == numel * 4
    assert optimizer_temporary_bytes(numel, implementation="fused") == 0.0


def test_step_bytes_and_time_closed_form() -> None:
    # foreach: 8 kernels moving 2+3+2+4+2+2+2+4 = 21 fp32 tensors; fused: 7 tensors; clipping: 3 more
    assert adamw_step_bytes_per_param() == 21 * 4
    assert adamw_step_bytes_per_param(implementation="fused") == 28
    assert adamw_step_bytes_per_param(clip_grad_norm=True) == 24 * 4
    n = 1e9
    assert estimate_optimizer_step_time(n, GPU) == pytest.approx(n * 84 / (3.35e12 * 0.90), rel=1e-12)
    assert estimate_optimizer_step_time(10, GPU) == pytest.approx(8 * GPU.kernel_launch_s)  # launch floor
    with pytest.raises(ValueError, match="implementation"):
        adamw_step_bytes_per_param(implementation="sgd")
