"""Apply a ``Plan`` to a real module on a real process group.

The entry point is ``autopar.parallelize`` (defined in ``autopar.emit.parallelize``;
import it as ``from autopar.emit.parallelize import parallelize``: the package
attribute ``autopar.emit.parallelize`` is that module). The names below load on
first use, so importing this package does not import ``torch.distributed``.
"""

from __future__ import annotations

from autopar._modules import lazy_attributes

_LAZY: dict[str, str] = {
    "ParallelModel": "autopar.emit.runtime",
    "PartsOptimizer": "autopar.emit.runtime",
    "apply_plan": "autopar.emit.build",
    "save_checkpoint": "autopar.emit.checkpoint",
    "load_checkpoint": "autopar.emit.checkpoint",
}


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)

__all__ = list(_LAZY)
