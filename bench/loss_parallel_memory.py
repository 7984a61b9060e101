"""The memory ``loss_parallel``'s fused backward allocates inside one op, which op-boundary traces miss.

    python bench/loss_parallel_memory.py

``bench/memory_peak.py`` and ``plan_regret --memory-only`` read the heap after every ATen op a step
dispatches. Under ``loss_parallel()`` the loss backward is one DTensor op (``aten.nll_loss_backward``), whose
handler (``torch/distributed/tensor/parallel/loss.py::_nll_loss_and_log_softmax_backward``) runs its own local
ops while the tracing mode is off: ``grad_input`` (zeros, −1 at the targets), ``exp(x)``, their sum and the
product with the incoming gradient. This script runs that handler on one gloo rank with a trace inside it and
prints the heap after each inner op in arrays of the local logits' size: 3 at the peak (``exp``/``add``/``mul``);
the op returns one (the gradient), which is all a trace at op boundaries sees. The high-water mark is the former; that is what ``cost_models/loss.py``
(``BACKWARD_WORKING_ARRAYS[True]``) prices.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from autopar.cost_models.profiling.tensor_memory import heap_in_use

TOKENS, VOCAB = 1024, 1024
"""A (tokens, local vocabulary) fp32 logits block: 4.19 MB, far above the heap's noise."""


class _Trace(TorchDispatchMode):
    """Heap above its start after every op."""

    def __init__(self) -> None:
        super().__init__()
        self.base = heap_in_use()
        self.rows: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self.rows.append((str(func), heap_in_use() - self.base))
        return out


def main() -> None:
    import torch.distributed.tensor.parallel.loss as lp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("gloo", rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (1,))
    traces: list[_Trace] = []
    fused = lp._nll_loss_and_log_softmax_backward

    def traced(*args: Any, **kwargs: Any) -> Any:
        with _Trace() as trace:
            out = fused(*args, **kwargs)
        traces.append(trace)
        return out

    lp._nll_loss_and_log_softmax_backward = traced
    try:
        x = torch.randn(TOKENS, VOCAB, requires_grad=True)
        y = torch.randint(0, VOCAB, (TOKENS,))
        with lp.loss_parallel():
            F.cross_entropy(DTensor.from_local(x, mesh, [Shard(1)], run_check=False), y).backward()
    finally:
        lp._nll_loss_and_log_softmax_backward = fused
        dist.destroy_process_group()
    array = TOKENS * VOCAB * 4
    rows = traces[0].rows
    print(f"inside the fused loss backward, heap above its start in arrays of {array / 1e6:.2f} MB:")
    for name, nbytes in rows:
        print(f"  {name:<40} {nbytes / array:5.2f}")
    print(f"peak {max(b for _, b in rows) / array:.2f} arrays (the handler returns one of them, the gradient: "
          "an op-boundary trace sees 1)")


if __name__ == "__main__":
    main()
