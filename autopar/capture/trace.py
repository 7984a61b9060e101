"""Turn a module into an fx ``GraphModule``: symbolic_trace first, torch.export (non-strict) second."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from autopar.errors import CaptureError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Traced:
    """A traced program and how it was obtained."""

    gm: fx.GraphModule
    """The program: module-level (fx) or ATen-level (export)."""
    method: str
    """``"fx"`` or ``"export"``."""
    note: str
    """Why this method (the fx error that forced the fallback, if any)."""


def trace_module(model: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> Traced:
    """Trace ``model`` with fx; if that fails, export it non-strictly.

    Raises:
        CaptureError: neither path works; the message names the failing module/op and a fix.
    """
    try:
        gm = fx.symbolic_trace(model)
        return Traced(gm=gm, method="fx", note="torch.fx.symbolic_trace")
    except Exception as e:  # fx raises many types (TraceError, TypeError, ...) for untraceable code
        fx_error = f"{type(e).__name__}: {_first_line(e)}"
        log.info("fx.symbolic_trace failed (%s); falling back to torch.export", fx_error)
    try:
        ep = torch.export.export(model, args, dict(kwargs), strict=False)
    except Exception as e:  # export failures are diverse; all end in one CaptureError
        raise CaptureError(_explain_export_failure(model, e, fx_error)) from e
    return Traced(gm=ep.module(), method="export",
                  note=f"torch.export (non-strict); fx.symbolic_trace failed with {fx_error}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def _failing_frame(e: BaseException) -> str:
    """The innermost frame of user code (not torch) in the traceback, as ``file:line in func``."""
    frames = traceback.extract_tb(e.__traceback__)
    user = [f for f in frames if "/torch/" not in f.filename and "/site-packages/torch" not in f.filename]
    frame = (user or frames or [None])[-1]
    if frame is None:
        return "<unknown>"
    return f"{frame.filename}:{frame.lineno} in {frame.name} ({(frame.line or '').strip()})"


def _explain_export_failure(model: nn.Module, e: BaseException, fx_error: str) -> str:
    return (
        f"cannot capture {type(model).__name__}: torch.fx.symbolic_trace failed ({fx_error}) and "
        f"torch.export(strict=False) failed ({type(e).__name__}: {_first_line(e)}) at {_failing_frame(e)}. "
        "Fixes: pass example inputs of the shapes and dtypes forward() expects (a tuple of tensors, or a "
        "dict of keyword tensors such as {'input_ids': ...}); avoid data-dependent Python control flow on "
        "tensor values in forward() (use torch.where / torch.cond); or mark the offending submodule as a "
        "leaf so fx does not trace into it."
    )
