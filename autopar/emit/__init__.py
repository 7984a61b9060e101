"""Apply a ``Plan`` to a real module on a real process group.

The entry point is ``autopar.parallelize`` (defined in ``autopar.emit.parallelize``;
import it as ``from autopar.emit.parallelize import parallelize``: the package
attribute ``autopar.emit.parallelize`` is that module). The names below load on
first use, so importing this package does not import ``torch.distributed``.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY: dict[str, str] = {
    "ParallelModel": "autopar.emit.runtime",
    "PartsOptimizer": "autopar.emit.runtime",
    "apply_plan": "autopar.emit.build",
    "save_checkpoint": "autopar.emit.checkpoint",
    "load_checkpoint": "autopar.emit.checkpoint",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'autopar.emit' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = list(_LAZY)
